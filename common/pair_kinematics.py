"""Pairwise kinematics of an event's objects, for the attention bias of the event transformer
(--pair-bias; Particle Transformer, Qu & Gouskos, arXiv:2202.03772).

The model stays a function of the tokens: each object's (pT, eta, phi, mass) is decoded from its
code ids with the step2 tokenizers that made them (KinematicsDecoder), never read from the HDF5.
A position that holds no decodable object ([CLS], [SEP], the event token, PAD, and a [MASK]ed
object) decodes to zeros, so a masked object's kinematics cannot reach the model; a random
replacement code decodes to its random object, as BERT masking intends.

pair_features gives per pair of objects the four ParT features ln Delta R, ln kT, ln z and ln m^2
(z = min pT / (pT_i + pT_j), kT = min pT Delta R, m the pair's invariant mass), and which pairs
are valid: two different decoded objects. PairBias turns them into one additive attention bias
per head (a small MLP, evaluated on the valid pairs only; the others get 0).

overlap_targets gives step3's overlap objective its target: which visible objects of the event lie
within Delta R of a masked one.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from common.physics import LEPTON_MASS, delta_phi
from common.runtime import die, first_line

KINEMATICS = ("pt", "eta", "phi", "mass")  # the decoded columns, in this order
PAIR_FEATURES = ("ln_delta_r", "ln_kt", "ln_z", "ln_m2")
EPS = 1e-8  # ParT's floor under every logarithm
KINEMATICS_GROUP = "kinematics"  # granularity group: the feature group whose tokenizer decodes pT, eta, phi (, mass)


class KinematicsDecoder:
    """(input_ids (B, L, Q), token_type_ids (B, L)) numpy -> float32 (B, L, 4) decoded (pT, eta, phi,
    mass) per position, zeros where the position holds no decodable object. Objects without eta
    (MET) are transverse (eta 0); a type whose tokenizer has no mass gets the lepton masses of
    common.physics, else 0. Every step2 layout: one tokenizer per type, the combined one (its
    '<obj>/<name>' outputs), or granularity group (the slots of each type's kinematics group)."""

    def __init__(self, vocab: dict, tok_dir: str | os.PathLike):
        from common.tokenizer import tokenizer_name, vocab_tokenizer  # torch-heavy, needed only here

        layout = vocab.get("groups") or {obj: [[None, len(r)]] for obj, r in vocab["ranges"].items()}
        # (type id, tokenizer, first slot, first id of each level, codes per level, output prefix, mass when not decoded)
        self.types = []
        self.transverse = set()  # the type ids without eta (MET), decoded at eta 0
        for obj, ranges in vocab["ranges"].items():
            slots = {group: (sum(n for _, n in layout[obj][:i]), n) for i, (group, n) in enumerate(layout[obj])}
            group = None if None in slots else KINEMATICS_GROUP
            if group not in slots:
                raise ValueError(f"{obj}: no '{KINEMATICS_GROUP}' feature group in these token files; "
                                 "decoding the objects' kinematics reads it")
            first, n = slots[group]
            tok = vocab_tokenizer(vocab, tok_dir, tokenizer_name(obj, group), "decoding the objects' kinematics")
            prefix = f"{obj}/" if vocab.get("mode") == "combined" else ""
            missing = [k for k in ("pt", "phi") if prefix + k not in tok.features]
            if missing:
                raise ValueError(f"{tok.path}: the {obj} tokenizer encodes no {' and no '.join(missing)}; "
                                 "decoding the objects' kinematics needs them")
            if prefix + "eta" not in tok.features:
                self.transverse.add(vocab["type_ids"][obj])
            start, count = np.asarray(ranges[first : first + n], np.int64).T
            self.types.append((vocab["type_ids"][obj], tok, first, start, count, prefix, LEPTON_MASS.get(obj, 0.0)))

    def __call__(self, input_ids: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        out = np.zeros(token_type_ids.shape + (len(KINEMATICS),), np.float32)
        for t, tok, first, start, count, prefix, mass in self.types:  # a loop over object types, not events
            rows, pos = np.nonzero(token_type_ids == t)
            codes = input_ids[rows, pos, first : first + len(start)].astype(np.int64) - start
            ok = ((codes >= 0) & (codes < count)).all(1)  # [MASK] (and any id outside the type's ranges) is not decoded
            if not ok.any():
                continue
            rec = {k[len(prefix):]: v for k, v in tok.decode(codes[ok]).items() if k.startswith(prefix)}
            n = int(ok.sum())
            out[rows[ok], pos[ok]] = np.stack([np.maximum(rec["pt"], 0.0), rec.get("eta", np.zeros(n)), rec["phi"],
                                               np.maximum(rec["mass"], 0.0) if "mass" in rec else np.full(n, mass)], 1)
        return out


def open_kinematics(vocab: dict, tok_dir: str | os.PathLike | None, need: str) -> KinematicsDecoder:
    """The decoder of a step's token files (tok_dir: --tokenizers, else the folder the Parquet records);
    missing or mismatched tokenizers, or tokens it cannot decode, end the step in one line (exit 2)
    that starts with `need` (what needs them)."""
    if not tok_dir:
        die(f"{need} needs the step2 tokenizers of the token files (--tokenizers; the Parquet records none)")
    try:
        return KinematicsDecoder(vocab, tok_dir)
    except (OSError, ValueError, KeyError) as exc:
        die(f"{need}: {first_line(exc)}")


def pair_features(kin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kin (B, L, 4) decoded (pT, eta, phi, mass) -> (features (B, L, L, 4) of PAIR_FEATURES, valid
    (B, L, L) bool): a pair is valid for two different objects, and its features are zero where it is not."""
    obj = is_object(kin)
    valid = obj[:, :, None] & obj[:, None, :] & ~torch.eye(kin.shape[1], dtype=torch.bool, device=kin.device)
    k = kin.double()
    return (pair_rows(k[:, :, None], k[:, None, :]) * valid.unsqueeze(-1)).float(), valid


def is_object(kin: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions that hold a decoded object (pT > 0; the decoder writes zeros elsewhere)."""
    return kin[..., 0] > 0


def pair_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The PAIR_FEATURES (..., 4) of objects a and b (..., 4) (broadcast), in their dtype: the callers pass
    float64, as m^2 is a difference of large squares."""
    (pt_a, eta_a, phi_a, m_a), (pt_b, eta_b, phi_b, m_b) = a.unbind(-1), b.unbind(-1)
    delta = torch.sqrt((eta_a - eta_b) ** 2 + delta_phi(phi_a, phi_b) ** 2)
    pt_min = torch.minimum(pt_a, pt_b)
    (e_a, p_a), (e_b, p_b) = _four_momentum(pt_a, eta_a, phi_a, m_a), _four_momentum(pt_b, eta_b, phi_b, m_b)
    m2 = (e_a + e_b) ** 2 - ((p_a + p_b) ** 2).sum(-1)
    return torch.stack([torch.log(delta.clamp(min=EPS)), torch.log((pt_min * delta).clamp(min=EPS)),
                        torch.log((pt_min / (pt_a + pt_b).clamp(min=EPS)).clamp(min=EPS)),
                        torch.log(m2.clamp(min=EPS))], -1)


def _four_momentum(pt, eta, phi, m):
    """(E (...), p (..., 3)) of (pT, eta, phi, mass): common.physics.p4 in torch."""
    p = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(eta)], -1)
    return torch.sqrt((p**2).sum(-1) + m**2), p


def overlap_targets(masked: torch.Tensor, kin: torch.Tensor, visible: torch.Tensor, dr: float) -> torch.Tensor:
    """masked (M, 4): the decoded (pT, eta, phi, mass) of M masked objects; kin (M, L, 4): those of each one's event;
    visible (M, L) bool: the positions it may point at -> (M, L + 1) float: uniform over the visible positions within
    Delta R < dr of the masked object, else all on the last slot (nothing visible overlaps it)."""
    d2 = (masked[:, None, 1] - kin[..., 1]) ** 2 + delta_phi(masked[:, None, 2], kin[..., 2]) ** 2
    near = visible & (d2 < dr**2)
    near = torch.cat([near, ~near.any(1, keepdim=True)], 1).to(kin.dtype)
    return near / near.sum(1, keepdim=True)


class PairBias(nn.Module):
    """(kin (B, L, 4), padding (B, L) bool) -> float attention mask (B * n_heads, L, L): per pair of
    objects an MLP of its pair_features, one value per head (the same for every layer, as in ParT);
    0 for the pairs that are not two objects, -inf at padded keys. The MLP runs on the valid pairs
    i < j only (the features are symmetric)."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.mlp = nn.Sequential(nn.Linear(len(PAIR_FEATURES), width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, n_heads))

    def forward(self, kin: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        b, length = padding.shape
        obj = is_object(kin) & ~padding
        upper = torch.ones(length, length, dtype=torch.bool, device=kin.device).triu(1)
        ev, a, c = torch.nonzero(obj[:, :, None] & obj[:, None, :] & upper, as_tuple=True)
        k = kin.double()
        y = self.mlp(pair_rows(k[ev, a], k[ev, c]).float()).float()  # (pairs, heads), pairs i < j
        keys = torch.zeros(b, length, device=kin.device).masked_fill(padding, float("-inf"))
        bias = keys[:, None, None, :].repeat(1, self.n_heads, length, 1)
        bias[ev, :, a, c] = y
        bias[ev, :, c, a] = y
        return bias.view(b * self.n_heads, length, length)
