"""Per-position normalised feature vectors for the "continuous inputs" baseline of step4.

The object at a sequence position is found again in the step1 HDF5: `event_index` is the row,
and the k-th position of a type holds the k-th object of that type (pT order, as in the HDF5).
Features are normalised by the step2 tokenizer's own preprocessing (`<obj>.pt` in the
tokenizer folder; in granularity group its groups' `<obj>.<group>.pt`, side by side), so the
baseline sees what the tokenizer saw, minus the quantization. Without
tokenizers a documented fallback is used: cos/sin for angles, log for GeV quantities,
standardised with the mean/std of the first chunk of the first file.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.schema import OBJECTS, TOKENIZED_OBJECTS, dataset_path
from common.token_parquet import batch_to_numpy, read_provenance

FALLBACK_FIT_EVENTS = 20000
READ_BLOCK = 4096  # events per cached HDF5 read
CACHE_BLOCKS = 512  # cached (file, dataset, block) reads
CLIP = 6.0


def _dataset(obj: str, name: str, available: set[str]) -> str | None:
    """The HDF5 dataset of a tokenized feature, None when the file lacks it."""
    for f in OBJECTS[obj].features:
        if f.name == name and f.tokenize and dataset_path(obj, f) in available:
            return dataset_path(obj, f)
    return None


class FallbackNormaliser:
    """cos/sin for angles, signed log1p for GeV quantities, then standardisation."""

    def __init__(self, obj: str, h5_path: str, available: set[str]):
        self.obj = obj
        self.features = [f.name for f in OBJECTS[obj].token_features if _dataset(obj, f.name, available)]
        self.kinds = {f.name: (f.kind, f.unit) for f in OBJECTS[obj].token_features}
        with h5py.File(h5_path, "r") as f:
            raw = {n: f[_dataset(obj, n, available)][:FALLBACK_FIT_EVENTS] for n in self.features}
            if not OBJECTS[obj].per_event:
                m = f[f"common/{obj}/mask"][:FALLBACK_FIT_EVENTS].astype(bool)
                raw = {n: v[m] for n, v in raw.items()}
        x = self._raw(raw)
        self.mean, self.std = np.nanmean(x, 0) if len(x) else 0.0, np.nanstd(x, 0) if len(x) else 1.0
        self.mean, self.std = np.nan_to_num(self.mean), np.where(np.nan_to_num(self.std) > 0, np.nan_to_num(self.std), 1.0)

    def _raw(self, feats):
        cols = []
        for n in self.features:
            v = np.asarray(feats[n], dtype=np.float64)
            kind, unit = self.kinds[n]
            if kind == "angle":
                cols += [np.cos(v), np.sin(v)]
            elif unit == "GeV":
                cols.append(np.sign(v) * np.log1p(np.abs(v)))
            else:
                cols.append(v)
        return np.stack(cols, 1) if cols else np.zeros((len(next(iter(feats.values()), [])), 0))

    def preprocess(self, feats):
        return np.clip(np.nan_to_num((self._raw(feats) - self.mean) / self.std), -CLIP, CLIP).astype(np.float32)


class ContinuousFeatures:
    """features(batch) -> (B, L, F) float32 for the object positions of a padded token batch."""

    def __init__(self, h5_files: dict[str, str], vocab: dict, tokenizer_dir: str | os.PathLike | None):
        self.h5_files = h5_files  # source_file name -> HDF5 path
        self._files, self._cache = {}, {}
        first = next(iter(h5_files.values()))
        with h5py.File(first, "r") as f:
            available = set()
            f.visit(lambda k: available.add(k))
        self.objects = [o for o in TOKENIZED_OBJECTS if o in vocab["ranges"]]
        self.normalisers, self.mode = {}, "fallback (log/standardised, fitted on the first HDF5 chunk)"
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else None
        if tok_dir is not None and vocab.get("granularity") == "group":  # the group tokenizers' inputs, side by side
            from common.tokenizer import load_grouped
            self.normalisers = {o: load_grouped(tok_dir, o) for o in self.objects}
            self.mode = f"group tokenizer preprocessing ({tok_dir})"
        elif tok_dir is not None and all((tok_dir / f"{o}.pt").exists() for o in self.objects):
            from common.tokenizer import load_tokenizer
            self.normalisers = {o: load_tokenizer(tok_dir / f"{o}.pt") for o in self.objects}
            self.mode = f"tokenizer preprocessing ({tok_dir})"
        else:
            self.normalisers = {o: FallbackNormaliser(o, first, available) for o in self.objects}
        self.paths = {o: {n: _dataset(o, n, available) for n in self.normalisers[o].features} for o in self.objects}
        for o, p in self.paths.items():
            lacking = [n for n, k in p.items() if k is None]
            if lacking:
                raise ValueError(f"{first}: HDF5 lacks the {o} feature(s) {', '.join(lacking)} the tokenizer needs")
        self.type_ids = {o: vocab["type_ids"][o] for o in self.objects}
        self.dims = {o: int(self.normalisers[o].preprocess(self._dummy(o)).shape[1]) for o in self.objects}

    def _dummy(self, obj):
        return {n: np.zeros(1, np.float32) for n in self.normalisers[obj].features}

    @property
    def width(self) -> int:
        return max(self.dims.values())

    def continuous_dims(self) -> dict[str, int]:
        return {str(self.type_ids[o]): d for o, d in self.dims.items()}

    def _block(self, path: str, key: str, block: int) -> np.ndarray:
        """Rows [block*READ_BLOCK, (block+1)*READ_BLOCK) of one dataset, cached: shuffled batches
        come from a bounded window of events, so each block is decompressed about once per pass."""
        ck = (path, key, block)
        if ck not in self._cache:
            if path not in self._files:
                self._files[path] = h5py.File(path, "r")
            if len(self._cache) >= CACHE_BLOCKS:
                self._cache.pop(next(iter(self._cache)))  # drop the oldest
            self._cache[ck] = self._files[path][key][block * READ_BLOCK : (block + 1) * READ_BLOCK]
        return self._cache[ck]

    def _read(self, path: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        blocks = rows // READ_BLOCK
        out = {}
        for o in self.objects:
            for k in self.paths[o].values():
                parts = {b: self._block(path, k, b) for b in np.unique(blocks)}
                first = next(iter(parts.values()))
                arr = np.empty((len(rows),) + first.shape[1:], first.dtype)
                for b, data in parts.items():  # a loop over a few blocks, not events
                    sel = blocks == b
                    arr[sel] = data[rows[sel] - b * READ_BLOCK]
                out[k] = arr
        return out

    def column(self, table: pa.Table, levels: int) -> pa.ListArray:
        """The features of a token table's positions as a list<fixed_size_list<float32>> column,
        aligned with input_ids (see SequenceStream.features)."""
        b = batch_to_numpy(table, levels)
        x = self.features(b)
        lengths = b["length"]
        flat = x[np.arange(x.shape[1])[None] < lengths[:, None]]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), x.shape[2]))

    def features(self, batch: dict) -> np.ndarray:
        types, attn = batch["token_type_ids"], batch["attention_mask"] > 0
        out = np.zeros(types.shape + (self.width,), np.float32)
        for name in np.unique(batch["source_file"]):
            ev = np.flatnonzero(batch["source_file"] == name)
            if name not in self.h5_files:
                raise ValueError(f"no HDF5 file for source_file {name} (use --h5-dir)")
            data = self._read(self.h5_files[name], batch["event_index"][ev])
            for o in self.objects:
                sel = (types[ev] == self.type_ids[o]) & attn[ev]
                rank = np.cumsum(sel, axis=1) - 1  # k-th position of the type = k-th object in the HDF5
                e_loc, pos = np.nonzero(sel)
                feats = {}
                for n, key in self.paths[o].items():
                    v = data[key]
                    if v.ndim == 2 and rank[e_loc, pos].max(initial=-1) >= v.shape[1]:
                        raise ValueError(f"{self.h5_files[name]}: more {o} positions than stored objects")
                    feats[n] = v[e_loc, rank[e_loc, pos]] if v.ndim == 2 else v[e_loc]
                x = self.normalisers[o].preprocess(feats)
                out[ev[e_loc], pos, : x.shape[1]] = x
        return out


def h5_locations(paths: list[str], h5_dir: str | None) -> dict[str, str]:
    """source_file name -> HDF5 path: --h5-dir, else the inputs recorded in the Parquet provenance."""
    out = {}
    for path in paths:
        names = set(pq.read_table(path, columns=["source_file"]).column("source_file").unique().to_pylist())
        prov = read_provenance(path)
        recorded = {Path(p).name: p for p in prov.get("inputs", [])}
        for n in names:
            cand = Path(h5_dir) / n if h5_dir else Path(recorded.get(n, n))
            if not cand.exists():
                raise ValueError(f"{path}: source HDF5 {n} not found at {cand} (use --h5-dir)")
            out[n] = str(cand)
    return out
