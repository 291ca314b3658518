"""Per-object tokenizers: feature preprocessing by kind, an MLP autoencoder and a quantizer (a
residual EMA vector quantizer, or finite scalar quantisation). Used by step2 (fit, apply), the
diagnostics and step4 (continuous baseline).

Quantizer kinds (settings "quantizer"; a checkpoint without the key is a vq):
  vq    `levels` residual levels of a learned codebook of `codebook_size` codes (EMA, k-means init)
  fsq   finite scalar quantisation (Mentzer et al. 2023, arXiv:2309.15505): the latent is projected
        to len(fsq_levels) dimensions, each bounded and rounded to its number of levels; one level,
        an implicit codebook of prod(fsq_levels) codes (the grid), nothing learned but the projections
  rfsq  `levels` residual levels of FSQ (vector-quantize-pytorch's ResidualFSQ), each prod(fsq_levels) codes
For every kind codebook_size is the codes per level (for FSQ the product of its levels), and
code_vectors() gives the (levels, codebook_size, dim) latent vector of every code, whose sum over
levels is the quantised latent the decoder reads.

Feature kinds (common/schema.py) decide the preprocessing and the loss:
  continuous  quantile -> normal (default), log1p + standard, or standard;  MSE
  angle       (cos, sin) in and out; atan2 to decode;                        MSE
  score       a triplet on the simplex: 2 standardised log-ratios in, 3 logits out; softmax to
              decode (so decoded scores stay in [0, 1] and sum to 1); soft cross-entropy + MSE
              of the logit differences
  flag        +-1 in, one logit out;  BCE
  category    one-hot in, logits out; cross-entropy

Encoders (settings "encoder"; a checkpoint without the key is "mlp"):
  mlp          each object alone
  transformer  the mlp encoder's latent plus an attention term: the object's MLP embedding
               attends (one layer, CONTEXT_HEADS heads) over the embeddings of the leading
               CONTEXT_OBJECTS objects of the same type in its event (itself among them), so a
               code can carry context; encode() then needs each object's event. The decoder
               stays per object, from the object's own codes.

A checkpoint is a plain dict of tensors, numbers and strings (torch.load(weights_only=True))
plus a JSON sidecar with the features, kinds, settings and quality metrics.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.special import ndtr, ndtri
from torch import nn

from common.code_search import nearest_codes
from common.schema import OBJECTS, TOKEN_GROUPS, Feature, dataset_path

N_QUANTILES = 1001  # quantile-table points of the quantile -> normal transform
QUANTILE_Z = 5.0  # the table spans +-5 sigma, its points evenly spaced in z: the tails keep their resolution
OLD_QUANTILE_Z = 3.719  # the clip of tables fitted before QUANTILE_Z (evenly spaced in probability), kept for them
SCORE_EPS = 1e-6  # floor of a score before its log-ratio
SEARCH_BLOCK = 512  # rows per nearest-code matmul block: the distance block stays in cache
COMPILED_SEARCH_ON_CPU = True  # CPU code search with common.code_search (False: the torch matmul search)
MAX_LEVELS = 8  # residual levels a quantizer may have
QUANTIZERS = ("vq", "fsq", "rfsq")
# FSQ levels per dimension for a codebook size: the sets recommended by Mentzer et al. 2023 (table 1);
# the implicit codebook, their product, is near the size (2^10 -> 8x5x5x5 = 1000 codes)
FSQ_LEVELS = {2**8: [8, 6, 5], 2**10: [8, 5, 5, 5], 2**12: [7, 5, 5, 5, 5], 2**14: [8, 8, 8, 6, 5],
              2**16: [8, 8, 8, 5, 5, 5]}
KMEANS_ITERS = 15  # Lloyd iterations of the codebook initialisation
ENCODERS = ("mlp", "transformer")
CONTEXT_OBJECTS = 16  # the transformer encoder's context: the event's leading objects of the type (pT order)
CONTEXT_DIM = 32  # width of the embeddings the attention works on
CONTEXT_HEADS = 2
EVENT_KEY = "__event__"  # an object stream's per-object event number (common/object_stream.py, context=True)

# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------


def build_specs(features: list[Feature]) -> list[dict]:
    """One spec per model input unit: a continuous/angle/flag/category feature, or a score triplet.
    A triplet is kept only when all three members are present."""
    specs, seen_groups = [], set()
    for f in features:
        if f.kind == "score":
            if f.score_group in seen_groups:
                continue
            members = [g.name for g in features if g.kind == "score" and g.score_group == f.score_group]
            if len(members) != 3:
                continue
            seen_groups.add(f.score_group)
            specs.append({"kind": "score", "names": members, "n_in": 2, "n_out": 3})
        elif f.kind == "continuous":
            specs.append({"kind": "continuous", "names": [f.name], "transform": f.transform, "n_in": 1, "n_out": 1})
        elif f.kind == "angle":
            specs.append({"kind": "angle", "names": [f.name], "n_in": 2, "n_out": 2})
        elif f.kind == "flag":
            specs.append({"kind": "flag", "names": [f.name], "n_in": 1, "n_out": 1})
        elif f.kind == "category":
            k = len(f.categories)
            specs.append({"kind": "category", "names": [f.name], "categories": list(f.categories), "n_in": k, "n_out": k})
    i = o = 0
    for s in specs:
        s["in"], s["out"] = [i, i + s["n_in"]], [o, o + s["n_out"]]
        i, o = i + s["n_in"], o + s["n_out"]
    return specs


COMBINED = "combined"
TYPE_FEATURE = "type"  # the combined tokenizer's object-type input (schema type id)


def combined_specs(features: dict[str, list[Feature]]) -> list[dict]:
    """One spec list over all objects: each object's features as '<obj>/<name>', plus the type."""
    from dataclasses import replace

    from common.schema import TYPE_IDS

    prefixed = [replace(f, name=f"{obj}/{f.name}", score_group=f"{obj}/{f.score_group}")
                for obj, feats in features.items() for f in feats]
    type_feature = Feature(TYPE_FEATURE, "common", "category", categories=tuple(sorted(TYPE_IDS[o] for o in features)))
    return build_specs(prefixed + [type_feature])


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[np.isfinite(x)]


def _score_logratios(p: list[np.ndarray]) -> np.ndarray:
    p = [np.clip(np.nan_to_num(np.asarray(a, np.float64), nan=1.0 / 3), SCORE_EPS, 1.0) for a in p]
    return np.stack([np.log(p[0] / p[2]), np.log(p[1] / p[2])], axis=1)


def fit_preprocessing(specs: list[dict], sample: dict[str, np.ndarray]) -> None:
    """Fill each spec's parameters from a bounded sample {feature name: 1-D array}."""
    for s in specs:
        name = s["names"][0]
        if s["kind"] == "continuous":
            x = _finite(sample[name])
            if len(x) == 0:
                raise ValueError(f"feature {name} has no finite values in the fit sample")
            s["fill"] = float(np.median(x))
            if s["transform"] == "quantile":
                probs = ndtr(np.linspace(-QUANTILE_Z, QUANTILE_Z, N_QUANTILES))
                qs = np.quantile(x, probs)
                # ties (a spike, e.g. isolation = 0) become one point at the mean probability
                xu, inv = np.unique(qs, return_inverse=True)
                pu = np.bincount(inv, weights=probs) / np.bincount(inv)
                s["xq"], s["pq"], s["z_max"] = xu.tolist(), pu.tolist(), QUANTILE_Z
            else:
                y = np.log1p(np.clip(x, 0, None)) if s["transform"] == "log_standard" else x
                s["mean"], s["std"] = float(y.mean()), float(y.std() + 1e-8)
        elif s["kind"] == "score":
            lr = _score_logratios([sample[n] for n in s["names"]])
            s["mean"], s["std"] = lr.mean(0).tolist(), (lr.std(0) + 1e-6).tolist()


def _quantile_forward(x: np.ndarray, s: dict) -> np.ndarray:
    xq, pq = np.asarray(s["xq"]), np.asarray(s["pq"])
    if len(xq) == 1:
        return np.zeros_like(x)
    u = np.interp(x, xq, pq)
    z_max = s.get("z_max", OLD_QUANTILE_Z)
    return ndtri(np.clip(u, ndtr(-z_max), ndtr(z_max)))


def _quantile_inverse(z: np.ndarray, s: dict) -> np.ndarray:
    xq, pq = np.asarray(s["xq"]), np.asarray(s["pq"])
    if len(xq) == 1:
        return np.full_like(z, xq[0])
    return np.interp(ndtr(z), pq, xq)


def preprocess(specs: list[dict], feats: dict[str, np.ndarray], d_in: int) -> np.ndarray:
    """{feature name: (n,) array} -> (n, d_in) float32 model input. A spec whose features are
    absent stays zero (the combined tokenizer: other object types' blocks)."""
    n = len(next(iter(feats.values())))
    out = np.zeros((n, d_in), dtype=np.float32)
    for s in specs:
        a, b = s["in"]
        if any(nm not in feats for nm in s["names"]):
            continue
        if s["kind"] == "score":
            lr = _score_logratios([feats[nm] for nm in s["names"]])
            out[:, a:b] = (lr - np.asarray(s["mean"])) / np.asarray(s["std"])
            continue
        x = np.asarray(feats[s["names"][0]])
        if s["kind"] == "continuous":
            x = np.where(np.isfinite(x), x, s["fill"]).astype(np.float64)
            if s["transform"] == "quantile":
                out[:, a] = _quantile_forward(x, s)
            else:
                y = np.log1p(np.clip(x, 0, None)) if s["transform"] == "log_standard" else x
                out[:, a] = (y - s["mean"]) / s["std"]
        elif s["kind"] == "angle":
            out[:, a], out[:, a + 1] = np.cos(x), np.sin(x)
        elif s["kind"] == "flag":
            out[:, a] = np.where(x > 0, 1.0, -1.0)
        elif s["kind"] == "category":
            idx = np.searchsorted(np.asarray(s["categories"]), x)
            ok = (idx < len(s["categories"])) & (np.asarray(s["categories"])[np.minimum(idx, len(s["categories"]) - 1)] == x)
            rows = np.nonzero(ok)[0]
            out[rows, a + idx[rows]] = 1.0  # an illegal value (MISSING_INT) stays all-zero
    return out


def reconstruction_loss(specs: list[dict], out: torch.Tensor, x_in: torch.Tensor,
                        discrete_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Sum of per-kind losses, each averaged over objects; flags and categories are weighted by
    `discrete_weight` (they must come back exactly). Returns (total, {kind: value})."""
    parts: dict[str, torch.Tensor] = {}

    def add(kind, value):
        parts[kind] = parts.get(kind, 0.0) + value

    for s in specs:
        (a, b), (c, d) = s["in"], s["out"]
        y, o = x_in[:, a:b], out[:, c:d]
        if s["kind"] in ("continuous", "angle"):  # "loss_weight": e.g. pT, the feature analyses lean on most
            add(s["kind"], s.get("loss_weight", 1.0) * F.mse_loss(o, y, reduction="none").sum(1).mean())
        elif s["kind"] == "flag":
            add("flag", discrete_weight * F.binary_cross_entropy_with_logits(o[:, 0], (y[:, 0] > 0).float()))
        elif s["kind"] == "category":
            valid = y.sum(1) > 0
            if valid.any():
                add("category", discrete_weight * F.cross_entropy(o[valid], y[valid].argmax(1)))
        elif s["kind"] == "score":
            mean, std = out.new_tensor(s["mean"]), out.new_tensor(s["std"])
            lr = y * std + mean  # true log-ratios
            p = torch.softmax(torch.cat([lr, torch.zeros_like(lr[:, :1])], 1), 1)
            soft_ce = -(p * torch.log_softmax(o, 1)).sum(1).mean()
            diff = ((o[:, :2] - o[:, 2:3]) - mean) / std
            add("score", soft_ce + F.mse_loss(diff, y, reduction="none").sum(1).mean())
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def postprocess(specs: list[dict], out: np.ndarray) -> dict[str, np.ndarray]:
    """(n, d_out) decoder output -> {feature name: (n,) array} in physical units."""
    res = {}
    for s in specs:
        c, d = s["out"]
        o = out[:, c:d].astype(np.float64)
        name = s["names"][0]
        if s["kind"] == "continuous":
            if s["transform"] == "quantile":
                res[name] = _quantile_inverse(o[:, 0], s)
            else:
                y = o[:, 0] * s["std"] + s["mean"]
                res[name] = np.expm1(y) if s["transform"] == "log_standard" else y
        elif s["kind"] == "angle":
            res[name] = np.arctan2(o[:, 1], o[:, 0])
        elif s["kind"] == "flag":
            res[name] = (o[:, 0] > 0).astype(np.int8)
        elif s["kind"] == "category":
            res[name] = np.asarray(s["categories"])[o.argmax(1)].astype(np.int16)
        elif s["kind"] == "score":
            e = np.exp(o - o.max(1, keepdims=True))
            p = e / e.sum(1, keepdims=True)
            for j, nm in enumerate(s["names"]):
                res[nm] = p[:, j]
        res = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in res.items()}
    return res


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def mlp(d_in: int, hidden: int, d_out: int, depth: int) -> nn.Sequential:
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, code_sq: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """argmin_k |x - C_k|^2 as |C|^2 - 2 x.C^T (|x|^2 does not change the argmin), in cache-sized
    blocks; with cosine both sides are unit vectors, so the same matmul gives -cos."""
    out = torch.empty(len(x), dtype=torch.long, device=x.device)
    ct = codebook.t()
    for i in range(0, len(x), SEARCH_BLOCK):
        xb = x[i : i + SEARCH_BLOCK]
        d = torch.addmm(code_sq, xb, ct, alpha=-2.0) if not cosine else -(xb @ ct)
        out[i : i + SEARCH_BLOCK] = d.argmin(1)
    return out


def nearest(x: torch.Tensor, codebook: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """Nearest code of each row: the compiled exact search on the CPU, the matmul search elsewhere."""
    if x.device.type == "cpu" and COMPILED_SEARCH_ON_CPU:
        return torch.from_numpy(nearest_codes(x.detach().numpy(), codebook.detach().numpy(), cosine,
                                              torch.get_num_threads())).long()
    return nearest_code(x, codebook, (codebook * codebook).sum(1), cosine)


class ResidualEMAQuantizer(nn.Module):
    """`levels` codebooks of `size` x `dim`; level l quantises what levels < l left over.

    Codebooks follow an exponential moving average of their assigned vectors (no gradient);
    they are initialised by k-means on a buffer of encoder outputs, and codes that go unused
    for a window are reset to vectors of the current batch. Under torch.distributed the
    assignment statistics are all-reduced and resets broadcast, so every rank keeps the same
    codebooks."""

    def __init__(self, levels: int, size: int, dim: int, decay: float = 0.99, cosine: bool = False,
                 dead_fraction: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"levels must be 1..{MAX_LEVELS}, got {levels}")
        self.levels, self.size, self.dim = levels, size, dim
        self.decay, self.cosine, self.dead_fraction, self.eps = decay, cosine, dead_fraction, eps
        self.register_buffer("codebooks", torch.randn(levels, size, dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(levels, size))
        self.register_buffer("ema_sum", self.codebooks.clone())
        self.register_buffer("usage", torch.zeros(levels, size))  # hits since the last reset check
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # vectors since the last check
        self.register_buffer("resets", torch.zeros(levels, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.frozen_levels = 0  # the first levels of a nested refit: kept as loaded (no EMA, resets or k-means)

    def _norm(self, x):
        return F.normalize(x, dim=-1) if self.cosine else x

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """z (n, dim) -> (sum of chosen codes, codes (n, levels), residual before each level)."""
        residual, total = z, torch.zeros_like(z)
        codes, residuals = [], []
        for level in range(self.levels):
            r = self._norm(residual)
            cb = self.codebooks[level]
            idx = nearest(r, cb, self.cosine)
            q = cb[idx]
            residuals.append(r)
            codes.append(idx)
            total = total + q
            residual = residual - q
        return total, torch.stack(codes, 1), residuals

    def code_vectors(self) -> torch.Tensor:
        """(levels, size, dim): the codebooks."""
        return self.codebooks

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            quant, codes, residuals = self.quantize(z.detach())
            if self.training and bool(self.initialised):
                self._ema_update(residuals, codes)
        commit = F.mse_loss(z, quant)
        return z + (quant - z).detach(), codes, commit

    # --- training-time codebook maintenance ---------------------------------------------------

    @torch.no_grad()
    def _ema_update(self, residuals: list[torch.Tensor], codes: torch.Tensor) -> None:
        counts = torch.stack([torch.bincount(codes[:, l], minlength=self.size).float() for l in range(self.levels)])
        sums = torch.stack([torch.zeros(self.size, self.dim, device=codes.device).index_add_(0, codes[:, l], residuals[l])
                            for l in range(self.levels)])
        free = slice(self.frozen_levels, None)
        n = torch.tensor(float(len(codes)), device=codes.device)
        if _distributed():
            for t in (counts, sums, n):
                dist.all_reduce(t)
        self.ema_count[free].mul_(self.decay).add_(counts[free], alpha=1 - self.decay)
        self.ema_sum[free].mul_(self.decay).add_(sums[free], alpha=1 - self.decay)
        total = self.ema_count[free].sum(1, keepdim=True)
        smoothed = (self.ema_count[free] + self.eps) / (total + self.size * self.eps) * total  # Laplace smoothing
        self.codebooks[free] = self._norm(self.ema_sum[free] / smoothed.unsqueeze(-1))
        self.usage.add_(counts)
        self.seen.add_(n.long())

    @torch.no_grad()
    def reset_dead_codes(self, residuals: list[torch.Tensor]) -> torch.Tensor:
        """Replace codes hit fewer than dead_fraction x (expected hits per code) since the last
        check by random residuals of this batch (rank 0's, broadcast). Returns resets per level."""
        expected = float(self.seen) / self.size
        threshold = max(1.0, self.dead_fraction * expected)
        dead = self.usage < threshold
        dead[: self.frozen_levels] = False
        n_reset = dead.sum(1)
        for level in range(self.frozen_levels, self.levels):
            k = int(n_reset[level])
            if k == 0:
                continue
            r = residuals[level]
            pick = torch.randint(len(r), (k,), device=r.device)
            spread = r.std(0, keepdim=True) if len(r) > 1 else torch.zeros_like(r[:1])  # one residual: no NaN spread
            new = r[pick] + 0.01 * spread * torch.randn(k, self.dim, device=r.device)
            if _distributed():
                dist.broadcast(new, 0)
            new = self._norm(new)
            self.codebooks[level, dead[level]] = new
            self.ema_count[level, dead[level]] = 1.0  # a fresh code: one pseudo-hit at its position
            self.ema_sum[level, dead[level]] = new
            self.resets[level] += k
        self.usage.zero_()
        self.seen.zero_()
        return n_reset

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = KMEANS_ITERS, generator: torch.Generator | None = None) -> None:
        """Level by level k-means on a buffer of encoder outputs (rank 0's, then broadcast)."""
        residual = z.clone()
        for level in range(self.levels):
            r = self._norm(residual)
            if level < self.frozen_levels:
                residual = residual - self.codebooks[level][nearest(r, self.codebooks[level], self.cosine)]
                continue
            cb = kmeans(r, self.size, iters, self.cosine, generator)
            if _distributed():
                dist.broadcast(cb, 0)
            self.codebooks[level] = cb
            self.ema_sum[level] = cb
            self.ema_count[level] = 1.0
            residual = residual - cb[nearest(r, cb, self.cosine)]
        self.initialised.fill_(True)
        self.usage.zero_()
        self.seen.zero_()


def kmeans(x: torch.Tensor, k: int, iters: int, cosine: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Lloyd's k-means from k random points; an empty cluster takes a random point."""
    n = len(x)
    centers = x[torch.randperm(n, generator=generator)[:k]].clone()
    for _ in range(iters):
        idx = nearest(x, centers, cosine)
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centers).index_add_(0, idx, x)
        empty = counts == 0
        centers = sums / counts.clamp(min=1).unsqueeze(1)
        if empty.any():
            centers[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
        if cosine:
            centers = F.normalize(centers, dim=-1)
    return centers


def context_set(e: torch.Tensor, events: torch.Tensor, k: int = CONTEXT_OBJECTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's context as padded tensors: the rows of the first `k` objects of its event
    ((n, k, c), row-major objects: an event's objects are contiguous) and the padding mask (n, k)."""
    n = len(e)
    first = torch.ones(n, dtype=torch.bool, device=e.device)
    first[1:] = events[1:] != events[:-1]
    ev = torch.cumsum(first.long(), 0) - 1  # 0.. per event of the batch
    pos = torch.arange(n, device=e.device) - torch.nonzero(first)[:, 0][ev]  # place in its event
    keep = pos < k
    keys = e.new_zeros(int(ev[-1]) + 1 if n else 0, k, e.shape[1])
    filled = torch.zeros(keys.shape[:2], dtype=torch.bool, device=e.device)
    keys[ev[keep], pos[keep]] = e[keep]
    filled[ev[keep], pos[keep]] = True
    return keys[ev], ~filled[ev]


class ContextEncoder(nn.Module):
    """The transformer encoder: the mlp encoder's latent of each object plus what its attention
    brings, where a small MLP embedding of the object (the query) attends over the embeddings of
    its event's leading objects of the same type. Memory: objects x CONTEXT_OBJECTS x CONTEXT_DIM
    per call."""

    def __init__(self, d_in: int, hidden: int, dim: int, depth: int):
        super().__init__()
        self.own = mlp(d_in, hidden, dim, depth)  # the mlp encoder: the object alone
        self.embed = mlp(d_in, hidden, CONTEXT_DIM, 1)
        self.attention = nn.MultiheadAttention(CONTEXT_DIM, CONTEXT_HEADS, batch_first=True)
        self.out = nn.Linear(CONTEXT_DIM, dim)

    def forward(self, x: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
        e = self.embed(x)
        keys, padding = context_set(e, events)
        context = self.attention(e[:, None], keys, keys, key_padding_mask=padding, need_weights=False)[0][:, 0]
        return self.own(x) + self.out(context)


def fsq_levels_for(codebook_size: int) -> list[int]:
    """The FSQ levels per dimension of a codebook size (FSQ_LEVELS); ValueError names the sizes known."""
    problem = quantizer_problem("fsq", 1, codebook_size)
    if problem:
        raise ValueError(problem)
    return list(FSQ_LEVELS[codebook_size])


def quantizer_problem(kind: str, levels, codebook_size="auto", fsq_levels: list[int] | None = None,
                      cosine: bool = False) -> str | None:
    """Why a quantizer kind cannot take these settings (None: it can). `levels` and `codebook_size`
    may be 'auto'; FSQ levels given replace the codebook size."""
    if kind not in QUANTIZERS:
        return f"unknown quantizer {kind!r}; choose from {', '.join(QUANTIZERS)}"
    if kind == "vq":
        return "FSQ levels need --quantizer fsq or rfsq" if fsq_levels else None
    if fsq_levels is not None and (not fsq_levels or min(fsq_levels) < 2):
        return f"FSQ levels {fsq_levels}: every dimension needs at least 2 levels"
    if kind == "fsq" and str(levels) not in ("auto", "1"):
        return f"quantizer fsq has one level, not {levels} (residual levels of FSQ: --quantizer rfsq)"
    if cosine:
        return f"quantizer {kind} has no code search: --cosine is for vq"
    size = str(codebook_size)
    if not fsq_levels and size != "auto" and not (size.isdigit() and int(size) in FSQ_LEVELS):
        return (f"FSQ has no level rule for codebook size {codebook_size}; use one of "
                f"{', '.join(str(k) for k in FSQ_LEVELS)} or give its levels (--fsq-levels 8,5,5,5)")
    return None


class FiniteScalarQuantizer(nn.Module):
    """fsq: FSQ (one level, prod(fsq_levels) codes); rfsq: `levels` residual levels of FSQ. The
    vector-quantize-pytorch modules: linear projections dim <-> len(fsq_levels) around the grid (no
    codebook to learn, initialise or reset, and no commitment loss: every grid point stays reachable)."""

    def __init__(self, kind: str, levels: int, fsq_levels: list[int], dim: int):
        super().__init__()
        from vector_quantize_pytorch import FSQ, ResidualFSQ  # here: its import takes seconds

        self.kind, self.dim, self.fsq_levels = kind, dim, list(fsq_levels)
        self.levels = 1 if kind == "fsq" else levels
        self.size = math.prod(fsq_levels)
        if kind == "fsq":  # 2 levels in a dimension: only the symmetric variant has them
            self.fsq = FSQ(levels=self.fsq_levels, dim=dim, preserve_symmetry=2 in self.fsq_levels)
        else:
            self.fsq = ResidualFSQ(levels=self.fsq_levels, num_quantizers=levels, dim=dim)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
        """z (n, dim) -> (quantised latent, codes (n, levels), []) as ResidualEMAQuantizer.quantize."""
        zq, codes = self.fsq(z.unsqueeze(0))
        return zq[0], codes[0].reshape(len(z), self.levels).long(), []

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zq, codes, _ = self.quantize(z)  # straight-through gradients inside
        return zq, codes, z.new_zeros(())

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """(levels, size, dim): each level's grid points through the output projection; the
        projection's bias is split evenly over the levels, so the sum over levels of a code's
        vectors is the latent the decoder reads."""
        if self.kind == "fsq":
            return self.fsq.indices_to_codes(torch.arange(self.size, device=next(self.buffers()).device))[None]
        grids = self.fsq.codebooks * self.fsq.scales[:, None, :]  # (levels, size, len(fsq_levels))
        out = self.fsq.project_out
        if not isinstance(out, nn.Linear):  # dim == len(fsq_levels): no projection
            return grids
        return grids @ out.weight.t() + out.bias / self.levels


def make_quantizer(kind: str, levels: int, codebook_size: int, dim: int, decay: float = 0.99, cosine: bool = False,
                   dead_fraction: float = 0.1, fsq_levels: list[int] | None = None) -> nn.Module:
    """The quantizer of a kind (QUANTIZERS); FSQ kinds take fsq_levels, or the rule's for codebook_size."""
    problem = quantizer_problem(kind, levels, codebook_size, fsq_levels, cosine)
    if problem:
        raise ValueError(problem)
    if kind == "vq":
        return ResidualEMAQuantizer(levels, codebook_size, dim, decay, cosine, dead_fraction)
    return FiniteScalarQuantizer(kind, levels, fsq_levels or fsq_levels_for(codebook_size), dim)


class VQAutoencoder(nn.Module):
    """Encoder (MLP, or the context-aware ContextEncoder) -> quantizer (residual EMA VQ, FSQ or residual
    FSQ) -> MLP decoder."""

    def __init__(self, d_in: int, d_out: int, dim: int, levels: int, codebook_size: int, hidden: int = 128,
                 depth: int = 2, decay: float = 0.99, cosine: bool = False, dead_fraction: float = 0.1,
                 encoder: str = "mlp", quantizer: str = "vq", fsq_levels: list[int] | None = None):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
        self.context = encoder == "transformer"
        self.encoder = ContextEncoder(d_in, hidden, dim, depth) if self.context else mlp(d_in, hidden, dim, depth)
        self.decoder = mlp(dim, hidden, d_out, depth)
        self.quantizer = make_quantizer(quantizer, levels, codebook_size, dim, decay, cosine, dead_fraction, fsq_levels)

    def encode_z(self, x: torch.Tensor, events: torch.Tensor | None = None) -> torch.Tensor:
        """The latents of a batch; the transformer encoder needs each object's event (whole events)."""
        if not self.context:
            return self.encoder(x)
        if events is None:
            raise ValueError("the transformer encoder needs each object's event (events=...)")
        return self.encoder(x, events)

    def forward(self, x: torch.Tensor, quantize: bool = True, events: torch.Tensor | None = None):
        z = self.encode_z(x, events)
        if not quantize:  # warm-up: a plain autoencoder before the codebooks are initialised
            return self.decoder(z), None, z.new_zeros(())
        zq, codes, commit = self.quantizer(z)
        return self.decoder(zq), codes, commit


# ----------------------------------------------------------------------------------------------
# The tokenizer users load: preprocess / encode / decode, checkpoint I/O
# ----------------------------------------------------------------------------------------------

ENCODE_BATCH = 65536  # objects per quantizer call
ENCODER_BATCH = 4096  # objects per encoder call: its activations stay in cache


def event_cuts(events: np.ndarray, size: int) -> np.ndarray:
    """Where batches of about `size` rows of per-object events end, cutting only between events: the
    first event end at or after each multiple of `size` (contiguous events)."""
    ends = np.r_[np.flatnonzero(np.diff(events)) + 1, len(events)]  # where each event ends
    return ends[np.searchsorted(ends, np.arange(size, len(events) + 1, size))]


def spans(n: int, size: int, events: np.ndarray | None = None) -> list[tuple[int, int]]:
    """[lo, hi) ranges of about `size` rows; with per-object events, cut only between events."""
    if events is None:
        return [(i, min(i + size, n)) for i in range(0, n, size)]
    cuts = np.unique(np.r_[0, event_cuts(events, size), n])
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))


class Tokenizer:
    """A fitted tokenizer of one object type: specs (features, kinds, preprocessing) + model."""

    def __init__(self, obj: str, specs: list[dict], settings: dict, model: VQAutoencoder | None = None):
        self.obj, self.specs, self.settings = obj, specs, dict(settings)
        self.d_in = sum(s["n_in"] for s in specs)
        self.d_out = sum(s["n_out"] for s in specs)
        self.model = model or VQAutoencoder(self.d_in, self.d_out, settings["dim"], settings["levels"],
                                            settings["codebook_size"], settings["hidden"], settings["depth"],
                                            settings["decay"], settings["cosine"], settings["dead_fraction"],
                                            settings.get("encoder", "mlp"), self.quantizer_kind,
                                            settings.get("fsq_levels"))
        self.model.eval()

    @property
    def features(self) -> list[str]:
        return [n for s in self.specs for n in s["names"]]

    @property
    def quantizer_kind(self) -> str:
        return self.settings.get("quantizer", "vq")  # written only for the FSQ kinds

    @property
    def levels(self) -> int:
        return self.settings["levels"]

    @property
    def context(self) -> bool:
        """Whether encode reads the event's other objects (the transformer encoder)."""
        return self.model.context

    @property
    def codebook_size(self) -> int:
        return self.settings["codebook_size"]

    def preprocess(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in self.features if n not in feats]
        if missing and self.obj != COMBINED:
            raise KeyError(f"tokenizer {self.obj} needs feature(s) {', '.join(missing)}")
        return preprocess(self.specs, feats, self.d_in)

    @torch.inference_mode()
    def encode(self, feats: dict[str, np.ndarray], events: np.ndarray | None = None) -> np.ndarray:
        """Codes (n, levels) of flat objects. `events`: each object's event number (row-major: an
        event's objects contiguous, in pT order), the context of the transformer encoder; the mlp
        encoder ignores it."""
        x = torch.from_numpy(self.preprocess(feats))
        out = np.empty((len(x), self.levels), dtype=np.int32)
        device = next(self.model.decoder.parameters()).device
        if not self.model.context:
            events = None
        elif events is None or len(events) != len(x):
            raise ValueError(f"tokenizer {self.obj} has a transformer encoder: encode needs each object's event")
        events = None if events is None else np.asarray(events, np.int64)
        for i, i_end in spans(len(x), ENCODE_BATCH, events):
            xb, eb = x[i:i_end].to(device), None if events is None else events[i:i_end]
            z = torch.cat([self.model.encode_z(xb[j:j_end], None if eb is None else torch.from_numpy(eb[j:j_end]).to(device))
                           for j, j_end in spans(len(xb), ENCODER_BATCH, eb)])
            out[i:i_end] = self.model.quantizer.quantize(z)[1].cpu().numpy()
        return out

    @torch.inference_mode()
    def quantised_latent(self, codes: np.ndarray) -> torch.Tensor:
        """(n, dim): each object's codebook vectors summed over the levels, what the decoder reads."""
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        table = self.model.quantizer.code_vectors()
        return sum(table[l][codes[:, l]] for l in range(len(table)))

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> dict[str, np.ndarray]:
        return postprocess(self.specs, self.model.decoder(self.quantised_latent(codes)).numpy())

    def reconstruct(self, feats: dict[str, np.ndarray], events: np.ndarray | None = None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        codes = self.encode(feats, events)
        return codes, self.decode(codes)

    # --- checkpoint ----------------------------------------------------------------------------

    def state(self) -> dict:
        state = {f"model.{k}": v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        state["obj"] = self.obj
        state["specs_json"] = json.dumps(self.specs, sort_keys=True)
        state["settings_json"] = json.dumps(self.settings, sort_keys=True)
        return state

    def save(self, path: str | Path, sidecar: dict) -> str:
        """Write <path>.pt (atomically) and <path>.json; return the checkpoint's sha256."""
        from common.runtime import atomic_output, write_json

        path = Path(path)
        with atomic_output(path) as tmp:
            torch.save(self.state(), tmp)
        sha = file_sha256(path)
        write_json(path.with_suffix(".json"), {**sidecar, "sha256": sha, "object": self.obj,
                                               "features": self.features, "specs": self.specs,
                                               "settings": self.settings})
        return sha


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load <obj>.pt (weights_only=True: tensors, numbers, strings only)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    specs, settings = json.loads(state["specs_json"]), json.loads(state["settings_json"])
    tok = Tokenizer(state["obj"], specs, settings)
    tok.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    tok.model.eval()
    tok.sha256 = file_sha256(path)
    tok.path = str(path)
    return tok


def vocab_tokenizer(vocab: dict, tok_dir: str | Path, name: str, need: str) -> Tokenizer:
    """The step2 tokenizer `name` (tokenizer_name) behind a token vocabulary's codes, loaded from
    tok_dir and checked against the vocabulary's checksum. `need` names what needs it, for the error."""
    record = vocab["tokenizers"].get(name) or {}
    path = Path(tok_dir) / record.get("file", f"{name}.pt")  # the file: combined.pt behind every type of --mode combined
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer not found ({need} needs the step2 tokenizers)")
    tok = load_tokenizer(path)
    if tok.sha256 != record.get("sha256"):
        raise ValueError(f"{path}: not the tokenizer that made these token files (checksum differs)")
    return tok


# ----------------------------------------------------------------------------------------------
# Granularity "group": one tokenizer per (object, feature group), <obj>.<group>.pt
# ----------------------------------------------------------------------------------------------

GRANULARITIES = ("object", "group")


def tokenizer_name(obj: str, group: str | None = None) -> str:
    """The file stem of a tokenizer: '<obj>' (granularity object) or '<obj>.<group>' (group)."""
    return obj if group is None else f"{obj}.{group}"


def group_files(tok_dir: str | Path, obj: str) -> dict[str, Path]:
    """{group: <obj>.<group>.pt} of the group tokenizers of `obj` in a folder, in TOKEN_GROUPS order."""
    found = {p.name.split(".")[1]: p for p in Path(tok_dir).glob(f"{obj}.*.pt")}
    return {g: found[g] for g in TOKEN_GROUPS if g in found}


def folder_granularity(tok_dir: str | Path, objects) -> str:
    """'combined', 'group' or 'object': what step2 fit wrote into a tokenizer folder."""
    d = Path(tok_dir)
    if (d / f"{COMBINED}.pt").exists():
        return COMBINED
    grouped = [o for o in objects if group_files(d, o)]
    flat = [o for o in objects if (d / f"{o}.pt").exists()]
    if grouped and flat:
        raise ValueError(f"holds both object tokenizers ({flat[0]}.pt) and group tokenizers "
                         f"({next(iter(group_files(d, grouped[0]).values())).name}); keep one granularity per folder")
    return "group" if grouped else "object"


class GroupedTokenizer:
    """The group tokenizers of one object, used as one: its codes are the concatenation of the groups'
    level codes (the 'slots', groups in TOKEN_GROUPS order), its features the union of theirs."""

    def __init__(self, obj: str, groups: dict[str, Tokenizer]):
        self.obj, self.groups = obj, groups

    @property
    def features(self) -> list[str]:
        return [n for t in self.groups.values() for n in t.features]

    @property
    def levels(self) -> int:
        return sum(t.levels for t in self.groups.values())

    @property
    def context(self) -> bool:
        return any(t.context for t in self.groups.values())

    @property
    def layout(self) -> list[list]:
        """[[group, levels], ...] in slot order."""
        return [[g, t.levels] for g, t in self.groups.items()]

    def preprocess(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([t.preprocess(feats) for t in self.groups.values()], 1)

    def encode(self, feats: dict[str, np.ndarray], events: np.ndarray | None = None) -> np.ndarray:
        return np.concatenate([t.encode(feats, events) for t in self.groups.values()], 1)


def load_grouped(tok_dir: str | Path, obj: str) -> GroupedTokenizer:
    """The group tokenizers of `obj` in a folder. ValueError when a group the fit made for it
    (settings 'object_groups', recorded in every one of them) is not there."""
    files = group_files(tok_dir, obj)
    if not files:
        raise ValueError(f"no group tokenizer for {obj} ({obj}.<group>.pt; run step2_fit.py --granularity group)")
    toks = {g: load_tokenizer(p) for g, p in files.items()}
    fitted = {g for t in toks.values() for g in t.settings.get("object_groups", [])}
    missing = [g for g in TOKEN_GROUPS if g in fitted - set(files)]
    if missing:
        raise ValueError(f"the group tokenizer set of {obj} lacks {', '.join(f'{obj}.{g}.pt' for g in missing)}")
    return GroupedTokenizer(obj, toks)


def usable_features(obj: str, experiment: str, present: set[str], missing: set[str]) -> list[Feature]:
    """The schema's tokenize=True features of `obj` for this experiment that the file holds
    (dataset exists and not listed in missing_features)."""
    out = []
    for f in OBJECTS[obj].features:
        if not f.tokenize or f.group not in ("common", experiment):
            continue
        path = dataset_path(obj, f)
        if path in present and path not in missing and f.name not in missing:
            out.append(f)
    return out


def perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(math.exp(-(p * np.log(p)).sum())) if len(p) else 0.0
