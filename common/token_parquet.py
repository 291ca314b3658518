"""Event token sequences in Parquet (step2 apply output; step3 and step4 input).

Columns (one row per event):
  input_ids       list<fixed_size_list<int32>[Q]>  per position, one id per quantizer level
  token_type_ids  list<int8>                       schema.TYPE_IDS of each position
  attention_mask  list<int8>                       1 for every stored position
  event_index     int64                            row in the source HDF5
  source_file     string                           the source HDF5 file name (no directory)
  process, dsid, weight                            sample bookkeeping

The vocabulary (id ranges, Q, type ids, layout, caps, tokenizer checksums) is JSON under the
schema-metadata key b"vocab"; how the file was made is JSON under b"provenance".

Train/validation/test membership is a hash of (source_file, event_index): step2 fit, step3 and
step4 call the same `split_of`, so pretraining never sees a classifier's test events.
The contract (vocabulary, layout, columns, split) is written out in docs/DESIGN.md.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.runtime import atomic_output, first_line
from common.schema import CLS, SEP

VOCAB_KEY = b"vocab"
PROVENANCE_KEY = b"provenance"
REQUIRED_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "event_index", "source_file",
                    "process", "dsid", "weight")
SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)  # train, val, test
INTERLEAVE_FILES = 16  # files a shuffled stream reads from at once (open handles stay bounded with many files)


# --- splits ----------------------------------------------------------------------------------

def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_of(source_file: str, event_index: np.ndarray) -> np.ndarray:
    """0 train, 1 val, 2 test for each event: a hash of (file name, event index), so it does not
    depend on batch order, sharding, or on where the files sit."""
    salt = np.uint64(zlib.crc32(Path(source_file).name.encode())) << np.uint64(32)
    u = (_splitmix64(np.asarray(event_index, dtype=np.uint64) ^ salt) >> np.uint64(11)).astype(np.float64) / 2.0**53
    cut = np.cumsum(SPLIT_FRACTIONS)
    return np.searchsorted(cut[:-1], u, side="right").astype(np.int8)


# --- vocabulary ---------------------------------------------------------------------------------

def read_vocab(path: str | os.PathLike) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if VOCAB_KEY not in meta:
        raise ValueError("Parquet file has no token vocabulary in its metadata (not a step2 output)")
    return json.loads(meta[VOCAB_KEY])


def legal_id_mask(vocab: dict) -> np.ndarray:
    """bool[max type id + 1, Q, vocab_size]: which ids may stand at a position of a type and level.

    Object types use their (type, level) range; the event type its event-token range at level 0;
    beyond level 0 special and event positions hold PAD."""
    q, size = vocab["levels"], vocab["vocab_size"]
    n_types = max(vocab["type_ids"].values()) + 1
    legal = np.zeros((n_types, q, size), dtype=bool)
    for obj, ranges in vocab["ranges"].items():
        t = vocab["type_ids"][obj]
        for level, (start, count) in enumerate(ranges):
            legal[t, level, start : start + count] = True
        legal[t, len(ranges):, 0] = True  # fewer levels than Q: PAD
    for name, token in (("CLS", CLS), ("SEP", SEP)):  # special positions: their own id, then PAD
        if name in vocab["type_ids"]:
            legal[vocab["type_ids"][name], 0, token] = True
            legal[vocab["type_ids"][name], 1:, 0] = True
    ev = vocab["event_tokens"]
    legal[vocab["type_ids"]["event"], 0, ev["offset"] : ev["offset"] + ev["size"]] = True
    legal[vocab["type_ids"]["event"], 1:, 0] = True
    return legal


# --- writing ------------------------------------------------------------------------------------

def sequences_table(input_ids: np.ndarray, token_type_ids: np.ndarray, lengths: np.ndarray,
                    event_index: np.ndarray, source_file: str, process: str, dsid: int,
                    weight: np.ndarray) -> pa.Table:
    """Padded (N, L, Q) ids and (N, L) type ids plus per-event lengths -> an Arrow table of lists."""
    n, _, q = input_ids.shape
    lengths = np.asarray(lengths, dtype=np.int32)
    keep = np.arange(input_ids.shape[1])[None, :] < lengths[:, None]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat_ids = pa.FixedSizeListArray.from_arrays(pa.array(input_ids[keep].reshape(-1).astype(np.int32)), q)
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(offsets, flat_ids),
        "token_type_ids": pa.ListArray.from_arrays(offsets, pa.array(token_type_ids[keep].astype(np.int8))),
        "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(int(lengths.sum()), np.int8))),
        "event_index": pa.array(np.asarray(event_index, dtype=np.int64)),
        "source_file": pa.array([Path(source_file).name] * n, pa.string()),
        "process": pa.array([process] * n, pa.string()),
        "dsid": pa.array(np.full(n, dsid, dtype=np.int64)),
        "weight": pa.array(np.asarray(weight, dtype=np.float32)),
    })


def write_sequences(path: str | os.PathLike, tables: Iterable[pa.Table], vocab: dict, provenance: dict) -> Path:
    """Stream tables into one Parquet file under a temporary name; rename when complete."""
    writer = None
    with atomic_output(path) as tmp:
        try:
            for table in tables:
                if writer is None:
                    meta = {VOCAB_KEY: json.dumps(vocab, sort_keys=True).encode(),
                            PROVENANCE_KEY: json.dumps(provenance, sort_keys=True, default=str).encode()}
                    writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta), compression="zstd")
                writer.write_table(table)
            if writer is None:
                raise ValueError("no events to write")
        finally:
            if writer is not None:
                writer.close()
    return Path(path)


# --- reading ------------------------------------------------------------------------------------

def read_provenance(path: str | os.PathLike) -> dict:
    """How a token file was made (runtime.provenance of step2 apply: script, settings, inputs,
    git_hash); {} when it records none."""
    return json.loads((pq.read_schema(path).metadata or {}).get(PROVENANCE_KEY, b"{}"))


def recorded_tokenizers(path: str | os.PathLike) -> str | None:
    """The step2 tokenizer folder a token file was made with (from its provenance)."""
    return (read_provenance(path).get("settings") or {}).get("tokenizers")


def check_columns(path: str | os.PathLike) -> None:
    names = set(pq.read_schema(path).names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"Parquet file lacks the column(s) {', '.join(missing)} (not a step2 output)")


def _pad_lists(col: pa.ChunkedArray | pa.Array, q: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (padded array (N, Lmax[, Q]), lengths (N,)), without a per-row loop."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy()
    lengths = np.diff(offsets)
    values = arr.flatten()
    if q is not None:
        values = values.flatten()
    values = values.to_numpy(zero_copy_only=False)
    n, lmax = len(lengths), int(lengths.max()) if len(lengths) else 0
    shape = (n, lmax) if q is None else (n, lmax, q)
    out = np.zeros(shape, dtype=values.dtype)
    rows = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(rows)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    out[rows, pos] = values.reshape((len(rows),) if q is None else (len(rows), q))
    return out, lengths


def batch_to_numpy(batch: pa.RecordBatch | pa.Table, q: int) -> dict[str, np.ndarray]:
    """Pad one record batch into model-ready arrays: input_ids (B, L, Q), token_type_ids and
    attention_mask (B, L), plus the per-event columns that are present."""
    cols = {name: batch.column(name) for name in batch.schema.names}
    out = {}
    out["input_ids"], lengths = _pad_lists(cols["input_ids"], q)
    out["token_type_ids"], _ = _pad_lists(cols["token_type_ids"])
    out["attention_mask"], _ = _pad_lists(cols["attention_mask"])
    out["length"] = lengths
    if "features" in cols:  # per-position feature vectors attached by a SequenceStream
        out["features"], _ = _pad_lists(cols["features"], cols["features"].type.value_type.list_size)
    if "observables" in cols:  # per-event observables attached by a SequenceStream
        c = cols["observables"]
        c = c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
        out["observables"] = c.flatten().to_numpy(zero_copy_only=False).reshape(len(c), c.type.list_size)
    for name in ("event_index", "dsid", "weight", "process", "source_file"):
        if name in cols:
            c = cols[name]
            out[name] = c.to_numpy(zero_copy_only=False) if hasattr(c, "to_numpy") else np.asarray(c)
    return out


def interleaved_batches(paths: Sequence[str | os.PathLike], batch_size: int, rng: np.random.Generator,
                        columns: Sequence[str] = REQUIRED_COLUMNS, failed: dict | None = None,
                        width: int = INTERLEAVE_FILES) -> Iterator[tuple[str, pa.RecordBatch]]:
    """iter_batches over up to `width` files open at a time, each next batch from one of them picked at
    random in proportion to its unread rows: a shuffle buffer then holds a mix of every file, not one
    process after another (which is what reading the files in turn gives once they outgrow the buffer)."""
    pending, active = iter(paths), []  # active: [batch iterator, rows not yet read]

    def open_next() -> None:
        for path in pending:  # a file already in `failed` yields nothing from iter_batches and is dropped
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowException):
                rows = 1  # iter_batches meets the same error on reading and reports it
            active.append([iter_batches([path], batch_size, columns, failed), rows])
            return

    for _ in range(width):
        open_next()
    while active:
        left = np.array([max(a[1], 1) for a in active], dtype=np.float64)
        k = int(rng.choice(len(active), p=left / left.sum()))
        item = next(active[k][0], None)
        if item is None:
            active.pop(k)
            open_next()
            continue
        active[k][1] -= item[1].num_rows
        yield item


def iter_batches(paths: Sequence[str | os.PathLike], batch_size: int, columns: Sequence[str] = REQUIRED_COLUMNS,
                 failed: dict | None = None) -> Iterator[tuple[str, pa.RecordBatch]]:
    """Stream record batches of at most `batch_size` events from each file in turn. With `failed`
    (a dict), a file whose pages cannot be read (a corrupted data page under a good footer) is
    recorded there, with its error line, and skipped from then on; the other files go on."""
    for path in paths:
        if failed is not None and str(path) in failed:
            continue
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns)):
                yield str(path), batch
        except (OSError, pa.ArrowException) as exc:
            if failed is None:
                raise
            failed[str(path)] = f"error: {path}: unreadable data ({first_line(exc)}); skipped from here on"
            print(failed[str(path)], file=sys.stderr)
