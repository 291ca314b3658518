"""Streaming training batches from step2's token Parquet files (step3 and step4).

Files are read in record batches (pyarrow), rows are selected by split (the shared hash of
common.token_parquet.split_of), process and label fraction, shuffled inside a bounded buffer,
and padded per batch. Memory holds one shuffle buffer whatever the number of events.
Under DDP every rank walks the same shuffled batch sequence and keeps every world-th batch.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import constituent_model, highlevel
from common.runtime import InputError, first_line
from common.schema import MASK, PAD
from common.token_parquet import (REQUIRED_COLUMNS, _splitmix64, batch_to_numpy, check_columns, interleaved_batches,
                                  iter_batches, read_vocab, split_of)
from common.transformer import vocab_checksum

LIGHT_COLUMNS = ("event_index", "source_file", "process", "dsid", "weight")


def open_sequences(paths: Sequence[str], want: str | None = None) -> tuple[dict | None, list[str], list[str]]:
    """Check every file (columns, vocabulary). Returns (vocab, usable paths in name order, error lines).
    Files of another vocabulary than the chosen one are errors, not a silent mix: the chosen one is the
    vocabulary with checksum `want` (a backbone's, say), else the one most files share. The name order
    makes a training independent of how its files were listed: the shuffle reads them in this order."""
    vocabs, errors = {}, []
    for path in paths:
        try:
            check_columns(path)
            v = read_vocab(path)
            vocabs.setdefault(vocab_checksum(v), (v, []))[1].append(path)
        except (InputError, OSError, ValueError, KeyError, pa.ArrowException) as exc:
            errors.append(f"error: {path}: {first_line(exc)}")
    if not vocabs:
        return None, [], errors
    chosen = want if want in vocabs else max(vocabs, key=lambda k: len(vocabs[k][1]))
    for checksum, (_, files) in vocabs.items():
        if checksum != chosen:
            why = "the backbone's" if want == chosen else f"the one of {len(vocabs[chosen][1])} other file(s)"
            errors += [f"error: {f}: token vocabulary (checksum {checksum}) differs from {why} ({chosen})" for f in files]
    vocab, good = vocabs[chosen]
    return vocab, sorted(p for p in paths if p in good), errors


def fraction_keep(source_file: str, event_index: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A deterministic subset of about `fraction` of the events (independent of the split hash)."""
    if fraction >= 1:
        return np.ones(len(event_index), dtype=bool)
    salt = np.uint64((zlib.crc32(Path(source_file).name.encode()) ^ 0x5EED0000 ^ (seed & 0xFFFF)) & 0xFFFFFFFF)
    u = (_splitmix64(_splitmix64(np.asarray(event_index, dtype=np.uint64)) ^ salt) >> np.uint64(11)) / 2.0**53
    return u < fraction


@dataclass
class SequenceStream:
    """An iterable over padded numpy batches of the selected events, epoch by epoch."""

    paths: Sequence[str]
    levels: int
    batch_size: int
    split: int | None = None  # token_parquet.SPLITS value; None keeps all
    processes: Sequence[str] | None = None  # keep only these process names
    fraction: float = 1.0  # label-fraction subsample of the events
    fraction_seed: int = 0
    shuffle_buffer: int = 0  # 0: file order; otherwise shuffle inside buffers of this many events
    seed: int = 0
    rank: int = 0
    world: int = 1
    read_rows: int = 8192
    columns: Sequence[str] = REQUIRED_COLUMNS
    features: object = None  # a ContinuousFeatures: each event's normalised features ride along as column "features"
    failed: dict = field(default_factory=dict)  # file -> the error that stopped its reading (the other files go on)
    observables: dict | None = None  # source_file -> HDF5 path: each event's high-level observables ride along
    constituents: object = None  # a constituent_model.ConstituentReader: each event's jet constituents ride along
    kinematics: object = None  # a pair_kinematics.KinematicsDecoder: each batch gets its positions' decoded kinematics

    def _keep(self, batch: pa.RecordBatch) -> np.ndarray:
        idx = batch.column("event_index").to_numpy(zero_copy_only=False)
        files = batch.column("source_file").to_numpy(zero_copy_only=False)
        keep = np.ones(len(idx), dtype=bool)
        for name in np.unique(files):  # usually one source file per Parquet file
            rows = files == name
            if self.split is not None:
                keep[rows] &= split_of(name, idx[rows]) == self.split
            keep[rows] &= fraction_keep(name, idx[rows], self.fraction, self.fraction_seed)
        if self.processes is not None:
            keep &= pc.is_in(batch.column("process"), value_set=pa.array(list(self.processes))).to_numpy(
                zero_copy_only=False)
        return keep

    def _tables(self, epoch: int, columns: Sequence[str]) -> Iterator[pa.Table]:
        paths, columns = list(self.paths), list(dict.fromkeys(list(columns) + list(LIGHT_COLUMNS)))
        if self.shuffle_buffer:  # the files interleaved in chunks of 1/16 of the buffer, so a buffer mixes them
            rng = np.random.default_rng([self.seed, epoch, 1])
            rng.shuffle(paths)
            rows = max(64, min(self.read_rows, self.shuffle_buffer // 16))
            chunks = interleaved_batches(paths, rows, rng, columns=columns, failed=self.failed)
        else:
            chunks = iter_batches(paths, self.read_rows, columns=columns, failed=self.failed)
        for _, batch in chunks:
            keep = self._keep(batch)
            if keep.any():
                table = pa.Table.from_batches([batch]).filter(pa.array(keep))
                if self.features is not None and "input_ids" in columns:
                    # read here, in file order (each HDF5 block once per pass), not per shuffled batch
                    table = table.append_column("features", self.features.column(table, self.levels))
                if self.observables is not None and "input_ids" in columns:
                    table = table.append_column("observables", observables_column(table, self.observables))
                if self.constituents is not None and "input_ids" in columns:
                    table = table.append_column("constituents", self.constituents.column(table))
                yield table

    def totals(self) -> dict[str, float]:
        """Events, summed weights and summed |weights| per process of the selection (reads the light columns only)."""
        out: dict[str, list] = {}
        for table in self._tables(0, LIGHT_COLUMNS):
            procs = table.column("process").to_numpy(zero_copy_only=False)
            w = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
            dsid = table.column("dsid").to_numpy(zero_copy_only=False)
            for p in np.unique(procs):
                acc = out.setdefault(str(p), [0, 0.0, 0.0, int(dsid[procs == p][0])])
                acc[0] += int((procs == p).sum())
                acc[1] += float(w[procs == p].sum())
                acc[2] += float(np.abs(w[procs == p]).sum())
        return {p: {"events": n, "sum_weights": s, "sum_abs_weights": a, "dsid": d} for p, (n, s, a, d) in out.items()}

    def count(self) -> int:
        return sum(v["events"] for v in self.totals().values())

    def steps_per_epoch(self, n_events: int, even: bool = True) -> int:
        """Batches this rank takes per epoch; `even` gives every rank the same number (DDP)."""
        n_batches = -(-n_events // self.batch_size)
        return n_batches // self.world if even else len(range(self.rank, n_batches, self.world))

    def _shuffled_tables(self, epoch: int) -> Iterator[pa.Table]:
        rng = np.random.default_rng([self.seed, epoch, 2])
        buffer, n = [], 0
        for table in self._tables(epoch, self.columns):
            buffer.append(table)
            n += table.num_rows
            if self.shuffle_buffer and n < self.shuffle_buffer:
                continue
            merged = pa.concat_tables(buffer)
            if self.shuffle_buffer:
                merged = merged.take(pa.array(rng.permutation(merged.num_rows)))
            full = (merged.num_rows // self.batch_size) * self.batch_size
            yield merged.slice(0, full)
            buffer, n = [merged.slice(full)], merged.num_rows - full
        if n:
            merged = pa.concat_tables(buffer)
            yield merged.take(pa.array(rng.permutation(merged.num_rows))) if self.shuffle_buffer else merged

    def batches(self, epoch: int = 0, max_steps: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Padded batches for this rank: batch i of the shared sequence goes to rank i % world."""
        i = taken = 0
        for table in self._shuffled_tables(epoch):
            for lo in range(0, table.num_rows, self.batch_size):
                if max_steps is not None and taken >= max_steps:
                    return
                if i % self.world == self.rank:
                    taken += 1
                    part = table.slice(lo, self.batch_size)
                    batch = batch_to_numpy(part, self.levels)
                    if self.constituents is not None:
                        batch["constituents"], batch["constituent_mask"] = constituent_model.dense(part.column("constituents"))
                    if self.kinematics is not None:
                        batch["kinematics"] = self.kinematics(batch["input_ids"], batch["token_type_ids"])
                    yield batch
                i += 1


def observables_column(table: pa.Table, h5_files: dict) -> pa.FixedSizeListArray:
    """common.highlevel's observables of every event of a token table, from its source HDF5 rows."""
    x = highlevel.for_events(table.column("source_file").to_numpy(zero_copy_only=False),
                             table.column("event_index").to_numpy(zero_copy_only=False), h5_files)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])


# --- masking -------------------------------------------------------------------------------------

def code_ranges(vocab: dict) -> tuple[np.ndarray, np.ndarray]:
    """(start, count) int arrays of shape (n_types, Q): the id range of each (type, level);
    count 0 where a type has no codes at that level (special tokens, missing levels)."""
    q = vocab["levels"]
    n_types = max(vocab["type_ids"].values()) + 1
    start, count = np.zeros((n_types, q), np.int64), np.zeros((n_types, q), np.int64)
    for obj, ranges in vocab["ranges"].items():
        for level, (s, c) in enumerate(ranges):
            start[vocab["type_ids"][obj], level], count[vocab["type_ids"][obj], level] = s, c
    return start, count


def mask_objects(input_ids: np.ndarray, token_type_ids: np.ndarray, attention_mask: np.ndarray,
                 ranges: tuple[np.ndarray, np.ndarray], rng: np.random.Generator, prob: float | np.ndarray = 0.15,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking of whole object positions: each object position is chosen with `prob` (a number,
    or an array indexed by type id: a rate per object type); of
    the chosen, 80% get [MASK] at every level, 10% a random code legal for the same type at
    every level, 10% stay. Returns (masked ids, labels (B,L,Q) with -100 where not predicted,
    chosen (B,L) bool)."""
    start, count = ranges
    t = token_type_ids.astype(np.int64)
    has_codes = (count[t] > 0).any(-1) & (attention_mask > 0)
    chosen = has_codes & (rng.random(t.shape) < (prob[t] if np.ndim(prob) else prob))
    action = rng.random(t.shape)
    ids = input_ids.copy()
    to_mask = chosen & (action < 0.8)
    to_rand = chosen & (action >= 0.8) & (action < 0.9)
    ids[to_mask] = np.where(count[t[to_mask]] > 0, MASK, PAD)
    rnd = start[t[to_rand]] + (rng.random(count[t[to_rand]].shape) * count[t[to_rand]]).astype(np.int64)
    ids[to_rand] = np.where(count[t[to_rand]] > 0, rnd, PAD)
    labels = np.where(chosen[..., None] & (count[t] > 0), input_ids, -100)
    return ids, labels, chosen
