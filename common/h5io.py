"""HDF5 event files (step1 output): chunked writing under a temporary name, chunked reading.

The layout is the one of common/schema.py (written out in docs/DESIGN.md). Writers append event
chunks to resizable datasets, so memory holds one chunk whatever the file size; readers iterate
in chunks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from common.schema import FORMAT_VERSION, OBJECTS, dataset_path, features_for

COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=True)
# (events, jets, constituents) datasets are mostly padding: without shuffle they write ~30% faster and smaller,
# and in chunks of PADDED_3D_CHUNK (jets, constituents), of which those where no event of a block holds
# anything are never written (HDF5 leaves them unallocated and reads them as the fill value 0)
PADDED_3D_COMPRESSION = dict(compression="gzip", compression_opts=1)
PADDED_3D_CHUNK = (5, 10)


class H5EventWriter:
    """Append chunks of events: {'common/jets/pt': (n, max_objects) array, ...}.

    Open under a temporary name; `close(metadata)` writes /metadata and renames the file.
    A writer that is dropped without close() leaves no file under the final name."""

    def __init__(self, path: str | os.PathLike, chunk_events: int = 4096):
        self.final = Path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp{os.getpid()}")
        self.file = h5py.File(self.tmp, "w", rdcc_nbytes=0)  # no chunk cache: chunks are written whole, and 80+ caches would cost memory
        self.chunk_events = chunk_events
        self.n_events = 0
        self.datasets: dict[str, h5py.Dataset] = {}  # open handles: h5py name look-ups cost ~0.5 ms each
        self.rows: dict[str, int] = {}

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        n = {len(a) for a in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"chunk arrays disagree on the number of events: {sorted(n)}")
        n = n.pop()
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            if key not in self.datasets:
                chunks = (min(self.chunk_events, max(n, 1)),) + arr.shape[1:]
                if arr.ndim == 3:
                    chunks = chunks[:1] + tuple(min(a, b) for a, b in zip(arr.shape[1:], PADDED_3D_CHUNK))
                self.datasets[key] = self.file.create_dataset(
                    key, shape=(0,) + arr.shape[1:], maxshape=(None,) + arr.shape[1:], dtype=arr.dtype, chunks=chunks,
                    **(PADDED_3D_COMPRESSION if arr.ndim == 3 else COMPRESSION))
                self.rows[key] = 0
            if self.rows[key] != self.n_events:
                raise ValueError(f"dataset {key} is missing from an earlier chunk")
            ds = self.datasets[key]
            ds.resize(self.n_events + n, axis=0)
            if arr.ndim == 3:
                _write_occupied(ds, self.n_events, arr)
            else:
                ds[self.n_events :] = arr
            self.rows[key] += n
        self.n_events += n

    def close(self, metadata: dict) -> Path:
        meta = self.file.require_group("metadata")
        for key, value in metadata.items():
            meta.attrs[key] = encode_attr(value)
        meta.attrs["n_events"] = self.n_events
        meta.attrs["format_version"] = FORMAT_VERSION
        self.file.close()
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.tmp.exists():  # close() was not reached: drop the temporary file
            self.abort()
        return False


def _write_occupied(ds, row: int, arr: np.ndarray) -> None:
    """Rows row.. of a 3-D dataset, chunk region by chunk region along axes 1 and 2, skipping the regions
    where every value is 0 (they stay unallocated)."""
    _, cj, cc = ds.chunks
    occupied = arr.any(axis=0)
    for j in range(0, arr.shape[1], cj):
        for c in range(0, arr.shape[2], cc):
            if occupied[j : j + cj, c : c + cc].any():
                ds[row:, j : j + cj, c : c + cc] = arr[:, j : j + cj, c : c + cc]


def encode_attr(value):
    """HDF5 attributes hold scalars and flat arrays; dicts and lists of strings go as JSON."""
    if isinstance(value, (dict, list, tuple)) and not (
        isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value)
    ):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metadata(path: str | os.PathLike) -> dict:
    with h5py.File(path, "r") as f:
        if "metadata" not in f:
            raise ValueError("not a step1 HDF5 file (no /metadata)")
        return {k: decode_attr(v) for k, v in f["metadata"].attrs.items()}


def converted_from(path: str | os.PathLike, source: str | os.PathLike) -> bool:
    """Whether the step1 file at `path` was converted from the ROOT file `source` (False when it is absent or
    unreadable): run_all redoes a run whose converted files came from other ROOT files."""
    try:
        return Path(read_metadata(path)["input_file"]).resolve() == Path(source).resolve()
    except (OSError, ValueError, KeyError):
        return False


def object_datasets(obj: str, experiment: str) -> list[str]:
    """Every dataset path step1 writes for `obj` (an object or jet_constituents) in a file of `experiment`."""
    keys = [dataset_path(obj, f) for f in features_for(obj, experiment)]
    if obj not in OBJECTS or not OBJECTS[obj].per_event:
        keys += [f"common/{obj}/mask", f"common/{obj}/n"]
    return keys


def iter_chunks(path: str | os.PathLike, keys: Sequence[str], step: int = 65536,
                start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (first event index, {key: array}) for consecutive event ranges of `step` events."""
    with h5py.File(path, "r") as f:
        missing = [k for k in keys if k not in f]
        if missing:
            raise KeyError(f"{path}: missing dataset(s) {', '.join(missing)}")
        total = f[keys[0]].shape[0] if keys else 0
        stop = total if stop is None else min(stop, total)
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            yield lo, {k: f[k][lo:hi] for k in keys}

