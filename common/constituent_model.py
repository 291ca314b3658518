"""Jet constituents in the event model: read from the step1 HDF5, encoded per jet, added to the jet.

step1 stores up to MAX_CONSTITUENTS constituents per stored jet (`common/jet_constituents/*`,
shape (events, jets, constituents), docs/DESIGN.md section 2). Here they become model inputs:

- `ConstituentReader.column(table)` attaches to a token table, in file order, each event's
  constituents as one list of rows [jet slot, inputs...] (only real constituents, so a shuffle
  buffer stays small); `dense` pads a batch of them to (B, jets, constituents, inputs).
- `ConstituentEncoder` (the slides' jet-constituent block): per jet, constituents -> linear
  projection -> one transformer layer -> attention pooling -> one vector, which enters the
  jet's embedding through a gated residual `jet + sigmoid(W [jet; const]) * const`. A jet
  without constituents (none stored, beyond the stored jets, or hidden because it is masked in
  pretraining) keeps its object-only embedding. The mean gate and the fraction of jets without
  constituents are kept in `stats`, so a user sees how much the constituents are used.

The k-th jet position of a sequence is the k-th stored jet of its HDF5 row (the same alignment
as common/continuous_inputs.py).
"""
from __future__ import annotations

import h5py
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from common.continuous_inputs import h5_locations
from common.h5io import read_metadata
from common.runtime import EXIT_SOME_FAILED, die, first_line
from common.schema import JET_CONSTITUENTS, OBJECTS, dataset_path

GROUP = "common/jet_constituents"
HITS_GROUP = "common/track_hits"
JET_TYPE = OBJECTS["jets"].type_id
# Model inputs per constituent, computed from the stored features (fixed scales, nothing fitted):
# log pT, log(pT / pT_jet), delta eta, delta phi, delta R to the jet axis, charge, asinh(d0 / D0_SCALE),
# asinh(z0 / Z0_SCALE), then every further stored feature (hit counts) / HITS_SCALE; NaN -> 0.
KINEMATIC_INPUTS = ("log_pt", "log_pt_rel", "deta", "dphi", "dr", "charge", "d0", "z0")
D0_SCALE, Z0_SCALE, HITS_SCALE = 0.05, 0.5, 10.0  # mm, mm, hits
BASE_FEATURES = ("pt", "eta", "phi", "charge", "d0", "z0")
EXTRA_FEATURES = tuple(f.name for f in JET_CONSTITUENTS.features if f.tokenize and f.name not in BASE_FEATURES)
N_INPUTS = len(KINEMATIC_INPUTS) + len(EXTRA_FEATURES)


def _has_group(h5_path: str, group: str) -> bool:
    with h5py.File(h5_path, "r") as f:
        return group in f


def has_constituents(h5_path: str) -> bool:
    return _has_group(h5_path, f"{GROUP}/mask")


def constituent_inputs(c: dict[str, np.ndarray], jet_pt, jet_eta, jet_phi) -> np.ndarray:
    """(..., N_INPUTS) float32 model inputs of constituents `c` (feature -> array (...)) of jets
    with the given axes (arrays broadcastable to the constituents)."""
    pt = np.maximum(c["pt"], 1e-3)
    deta = c["eta"] - jet_eta
    dphi = np.mod(c["phi"] - jet_phi + np.pi, 2 * np.pi) - np.pi
    cols = [np.log(pt), np.log(pt / np.maximum(jet_pt, 1e-3)), deta, dphi, np.hypot(deta, dphi), c["charge"],
            np.arcsinh(c["d0"] / D0_SCALE), np.arcsinh(c["z0"] / Z0_SCALE)]
    cols += [c[n] / HITS_SCALE for n in EXTRA_FEATURES]
    return np.nan_to_num(np.stack(cols, -1).astype(np.float32))


def _read(f: h5py.File, key: str, lo: int, hi: int, take: np.ndarray, shape) -> np.ndarray:
    """Rows `take` of rows [lo, hi) of a dataset; NaN when the file lacks it (hit counts of PF candidates)."""
    return f[key][lo:hi][take].astype(np.float32) if key in f else np.full(shape, np.nan, np.float32)


class ConstituentReader:
    """Each event's constituents as model inputs, read from the HDF5 rows of a token table."""

    def __init__(self, h5_files: dict[str, str], fallback: bool = True):
        self.h5_files = h5_files  # source_file name -> HDF5 path
        self.missing = sorted(n for n, p in h5_files.items() if not has_constituents(p))
        if self.missing and not fallback:
            raise ValueError(f"{h5_files[self.missing[0]]}: no jet constituents in this HDF5 (step1 --constituents); "
                             "the constituent model needs them, or allow the object-only fallback")
        self.methods = {n: read_metadata(p)["jet_constituents"]["method"] for n, p in h5_files.items() if n not in self.missing}
        # Per-hit records would enrich the tracks the way constituents enrich the jets; no format this
        # project reads has them, so the model says which path the hits take.
        self.track_hits = "hit summaries as track features (the tracks' quality group)"
        if any(_has_group(p, HITS_GROUP) for p in h5_files.values()):
            self.track_hits += f"; the {HITS_GROUP} records in the inputs are not read (no hit encoder)"

    def _rows(self, path: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in `rows`, jet slot, inputs (n, N_INPUTS)) of every constituent of the given HDF5
        rows, ordered by position then jet."""
        order = np.argsort(rows)
        with h5py.File(path, "r") as f:
            lo, hi = int(rows.min()), int(rows.max()) + 1  # one contiguous read, then pick the rows
            take = rows[order] - lo
            mask = f[f"{GROUP}/mask"][lo:hi][take]
            feats = {n: _read(f, dataset_path("jet_constituents", JET_CONSTITUENTS.feature(n)), lo, hi, take, mask.shape)
                     for n in BASE_FEATURES + EXTRA_FEATURES}
            jets = {n: f[f"common/jets/{n}"][lo:hi][take][:, : mask.shape[1], None] for n in ("pt", "eta", "phi")}
        x = constituent_inputs(feats, jets["pt"], jets["eta"], jets["phi"])
        ev, jet, _ = np.nonzero(mask)
        pos = order[ev]
        by_event = np.lexsort((jet, pos))  # stable: constituents keep their pT order within a jet
        return pos[by_event], jet[by_event], x[mask][by_event]

    def column(self, table: pa.Table) -> pa.ListArray:
        """list<fixed_size_list<float32>[1 + N_INPUTS]> per event: [jet slot, inputs...] per constituent."""
        files = table.column("source_file").to_numpy(zero_copy_only=False)
        index = table.column("event_index").to_numpy(zero_copy_only=False)
        parts, events = [], []
        for name in np.unique(files):
            ev = np.flatnonzero(files == name)
            if name not in self.h5_files:
                raise ValueError(f"no HDF5 file for source_file {name} (use --h5-dir)")
            if name in self.missing:
                continue
            pos, jet, x = self._rows(self.h5_files[name], index[ev])
            events.append(ev[pos])
            parts.append(np.concatenate([jet[:, None].astype(np.float32), x], 1))
        rows = np.concatenate(parts) if parts else np.zeros((0, 1 + N_INPUTS), np.float32)
        event = np.concatenate(events) if events else np.zeros(0, np.int64)
        order = np.argsort(event, kind="stable")
        counts = np.bincount(event, minlength=table.num_rows)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(rows[order].ravel()), 1 + N_INPUTS))


def open_reader(parquet: list[str], h5_dir: str | None, fallback: bool) -> ConstituentReader:
    """The constituents of a step's token files (their HDF5: --h5-dir, else the inputs the Parquet records);
    a missing HDF5, or constituents without the fallback, end the step in one line (exit 1)."""
    try:
        return ConstituentReader(h5_locations(parquet, h5_dir), fallback)
    except (OSError, ValueError, KeyError) as exc:
        die(first_line(exc), EXIT_SOME_FAILED)


def dense(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A batch's constituent column -> (x (B, J, C, N_INPUTS) float32, mask (B, J, C) bool), J and C
    the largest jet slot + 1 and constituent count of the batch."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = column.offsets.to_numpy()
    rows = column.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, 1 + N_INPUTS)
    rows = rows[: offsets[-1] - offsets[0]] if offsets[0] == 0 else rows[offsets[0] : offsets[-1]]
    event = np.repeat(np.arange(len(column)), np.diff(offsets))
    jet = rows[:, 0].astype(np.int64)
    pair = event * 1000 + jet
    start = np.r_[0, np.flatnonzero(np.diff(pair)) + 1]  # rows of one jet are contiguous
    rank = np.arange(len(pair)) - np.repeat(start, np.diff(np.r_[start, len(pair)]))
    n_jets = int(jet.max()) + 1 if len(jet) else 1
    n_const = int(rank.max()) + 1 if len(rank) else 1
    x = np.zeros((len(column), n_jets, n_const, N_INPUTS), np.float32)
    mask = np.zeros((len(column), n_jets, n_const), bool)
    x[event, jet, rank], mask[event, jet, rank] = rows[:, 1:], True
    return x, mask


def jet_slots(token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_jet (B, L) bool, slot (B, L) long): the k-th jet position of an event is stored jet k."""
    is_jet = token_type_ids == JET_TYPE
    return is_jet, (is_jet.long().cumsum(1) - 1).clamp(min=0)


def hide(mask: torch.Tensor, token_type_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The constituent mask without the jets at `positions` (B, L) bool: a masked jet in pretraining
    must not be predictable from its own constituents."""
    is_jet, slot = jet_slots(token_type_ids)
    b, p = torch.nonzero(is_jet & positions & (slot < mask.shape[1]), as_tuple=True)
    mask = mask.clone()
    mask[b, slot[b, p]] = False
    return mask


class ConstituentEncoder(nn.Module):
    """Constituents of each jet -> one vector -> gated residual on the jet's embedding."""

    def __init__(self, d_model: int, dim: int, n_heads: int = 2, dropout: float = 0.1):
        super().__init__()
        self.proj = nn.Linear(N_INPUTS, dim)
        self.layer = nn.TransformerEncoderLayer(dim, n_heads, 2 * dim, dropout, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.query = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.out = nn.Linear(dim, d_model)
        self.gate = nn.Linear(2 * d_model, d_model)
        self.reset()

    def reset(self) -> None:
        self.stats = {"jets": 0, "jets_without": 0, "gate_sum": 0.0}

    def forward(self, x: torch.Tensor, token_type_ids: torch.Tensor, cx: torch.Tensor, cmask: torch.Tensor):
        """x (B, L, d) embeddings; cx (B, J, C, N_INPUTS), cmask (B, J, C) -> x with the jets enriched."""
        is_jet, slot = jet_slots(token_type_ids)
        b, p = torch.nonzero(is_jet & (slot < cx.shape[1]), as_tuple=True)
        s = slot[b, p]
        with_const = cmask[b, s].any(-1)
        b, p, s = b[with_const], p[with_const], s[with_const]
        self.stats["jets"] += int(is_jet.sum())
        self.stats["jets_without"] += int(is_jet.sum()) - len(b)
        if not len(b):
            return x + 0.0 * sum(q.sum() for q in self.parameters())  # keeps every parameter in the graph (DDP)
        keep = ~cmask[b, s]  # (N, C) padding
        h = self.layer(self.proj(cx[b, s].to(x.dtype)), src_key_padding_mask=keep)
        att = (h @ self.query).masked_fill(keep, float("-inf")).softmax(-1)
        const = self.out((att.unsqueeze(-1) * h).sum(1))
        jet = x[b, p]
        g = torch.sigmoid(self.gate(torch.cat([jet, const], -1)))
        self.stats["gate_sum"] += float(g.detach().float().mean(-1).sum())
        return x.index_put((b, p), jet + g * const)

    def summary(self) -> dict:
        """Jets seen since the last reset (which this is too): the mean gate of those with constituents and
        the fraction without."""
        s, n_with = self.stats, self.stats["jets"] - self.stats["jets_without"]
        out = {"jets": s["jets"], "fraction_without_constituents": s["jets_without"] / s["jets"] if s["jets"] else float("nan"),
               "mean_gate": s["gate_sum"] / n_with if n_with else float("nan")}
        self.reset()
        return out
