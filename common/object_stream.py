"""Objects of step1 HDF5 files as flat feature arrays, streamed in chunks (step2 fit and apply,
the benchmarks): what a file holds, the features every input holds, the held-out split, the
bounded preprocessing sample, the training and held-out streams and the training minibatches.

An object stream yields {feature name: 1-D array over the objects of a chunk of events}
(row-major: event by event, each event's objects in pT order); memory holds one chunk. With
context=True each dict also holds EVENT_KEY, every object's event number in the stream: the
context of the transformer encoder (common/tokenizer.py), whose minibatches are whole events.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from common import h5io, runtime, token_parquet
from common.schema import OBJECTS, TYPE_IDS, Feature, dataset_path
from common.tokenizer import EVENT_KEY, TYPE_FEATURE, event_cuts, preprocess, usable_features

CHUNK_EVENTS = 8192  # events per chunk of the training and held-out streams
SAMPLE_BLOCK_EVENTS = 256  # events per random block of the preprocessing sample
CACHE_BYTES = 256 << 20  # a preprocessed training set up to this size is kept in memory after the first pass


# --- what the inputs hold -------------------------------------------------------------------------


def describe_file(path: str) -> dict:
    """Experiment, missing features, datasets and event count of a step1 file (one clear error)."""
    try:
        meta = h5io.read_metadata(path)
        with h5py.File(path, "r") as f:
            present = set()
            f.visit(lambda name: present.add(name) if isinstance(f[name], h5py.Dataset) else None)
    except (OSError, ValueError) as exc:
        raise runtime.InputError(f"cannot read as a step1 HDF5 file ({exc})") from None
    missing = meta.get("missing_features") or []
    if isinstance(missing, str):
        missing = [m for m in missing.replace(",", " ").split() if m]
    return {"path": path, "meta": meta, "experiment": str(meta.get("experiment", "atlas")).lower(),
            "present": present, "missing": set(missing), "n_events": int(meta.get("n_events", 0))}


def common_features(obj: str, infos: list[dict]) -> list[Feature]:
    """The schema's tokenize=True features of `obj` present in every input (dataset present and
    not in missing_features), in the schema order."""
    sets = [{(f.name, f.group) for f in usable_features(obj, i["experiment"], i["present"], i["missing"])} for i in infos]
    keep = set.intersection(*sets) if sets else set()
    return [f for f in OBJECTS[obj].features if (f.name, f.group) in keep]


def dropped_features(obj: str, infos: list[dict]) -> list[str]:
    """Tokenize=True features of the first input's experiment that not every input holds."""
    wanted = [f.name for f in OBJECTS[obj].token_features if f.group in ("common", infos[0]["experiment"])]
    kept = {f.name for f in common_features(obj, infos)}
    return [n for n in wanted if n not in kept]


def heldout(path: str, first: int, n: int) -> np.ndarray:
    """Events of the `test` split: never used to fit, only to measure the quality."""
    return token_parquet.split_of(Path(path).name, np.arange(first, first + n)) == token_parquet.SPLITS["test"]


def count_objects(obj: str, infos: list[dict]) -> tuple[int, int]:
    """(training objects, held-out objects) from the stored counts `n` (cheap)."""
    train = test = 0
    for info in infos:
        with h5py.File(info["path"], "r") as f:
            n = np.ones(info["n_events"], np.int64) if OBJECTS[obj].per_event else f[f"common/{obj}/n"][:]
        t = heldout(info["path"], 0, len(n))
        train, test = train + int(n[~t].sum()), test + int(n[t].sum())
    return train, test


# --- reading objects ------------------------------------------------------------------------------


def object_keys(obj: str, features: list[str], info: dict) -> dict[str, str]:
    """{feature name: dataset path} for `obj` in this file (+ mask for list objects)."""
    keys = {f.name: dataset_path(obj, f) for f in OBJECTS[obj].features
            if f.name in features and f.group in ("common", info["experiment"])}
    if not OBJECTS[obj].per_event:
        keys["__mask__"] = f"common/{obj}/mask"
    return keys


def flatten_objects(obj: str, keys: dict[str, str], arrays: dict[str, np.ndarray], events: np.ndarray,
                    mask: np.ndarray | None = None, with_events: bool = False) -> dict:
    """Chunk arrays -> {feature: 1-D over the stored objects of the selected events} (row-major);
    `mask` (events x slots) selects fewer objects than the stored ones; with_events adds
    EVENT_KEY, each object's place in `events`."""
    if OBJECTS[obj].per_event:
        out = {name: arrays[k][events] for name, k in keys.items()}
        return {**out, EVENT_KEY: np.arange(len(events))} if with_events else out
    mask = arrays[keys["__mask__"]][events].astype(bool) if mask is None else mask
    out = {name: arrays[k][events][mask] for name, k in keys.items() if name != "__mask__"}
    return {**out, EVENT_KEY: np.nonzero(mask)[0]} if with_events else out


def stream_objects(obj: str, features: list[str], infos: list[dict], *, split: str, rng: np.random.Generator | None,
                   rank: int = 0, world: int = 1, max_events: int | None = None, context: bool = False):
    """Yield object feature dicts chunk by chunk. split: 'train' (not held out) or 'test'.
    With rng the chunks come in random order (a new order each pass); ranks take every world-th.
    context: each dict also holds EVENT_KEY, the objects' event numbers (counted over the stream)."""
    chunks = [(i, lo) for i, info in enumerate(infos) for lo in range(0, info["n_events"], CHUNK_EVENTS)]
    if rng is not None:
        chunks = [chunks[j] for j in rng.permutation(len(chunks))]
    by_event = len(chunks) < world  # too few chunks to share out: every rank takes every world-th event
    chunks = chunks if by_event else chunks[rank::world]
    seen = 0
    for i, lo in chunks:
        info = infos[i]
        keys = object_keys(obj, features, info)
        _, arrays = next(h5io.iter_chunks(info["path"], list(keys.values()), step=CHUNK_EVENTS, start=lo,
                                          stop=min(lo + CHUNK_EVENTS, info["n_events"])))
        test = heldout(info["path"], lo, len(next(iter(arrays.values()))))
        events = np.nonzero(test if split == "test" else ~test)[0]
        if by_event:
            events = events[rank::world]
        if max_events is not None:
            events = events[: max(0, max_events - seen)]
            if not len(events):
                return
        feats = flatten_objects(obj, keys, arrays, events, with_events=context)
        if context:
            feats[EVENT_KEY] = feats[EVENT_KEY] + seen
        seen += len(events)
        yield feats


def combined_stream(objs, features, infos, split, rng, rank=0, world=1, max_events=None):
    """The combined tokenizer's objects: every type's features as '<obj>/<name>' plus the type id."""
    streams = {o: stream_objects(o, features[o], infos, split=split, rng=rng, rank=rank, world=world,
                                 max_events=max_events) for o in objs}
    while streams:
        for o in list(streams):
            try:
                part = next(streams[o])
            except StopIteration:
                del streams[o]
                continue
            n = len(next(iter(part.values())))
            yield {**{f"{o}/{k}": v for k, v in part.items()}, TYPE_FEATURE: np.full(n, TYPE_IDS[o])}


def preprocessing_sample(obj, features, infos, n_events, rng) -> dict[str, np.ndarray]:
    """A bounded sample: whole chunks are too coarse for small inputs, so draw random event
    blocks uniformly over all files until `n_events` training events are reached."""
    block = SAMPLE_BLOCK_EVENTS
    blocks = [(i, lo) for i, info in enumerate(infos) for lo in range(0, info["n_events"], block)]
    order = rng.permutation(len(blocks))
    parts, taken = [], 0
    for j in order:
        if taken >= n_events:
            break
        i, lo = blocks[j]
        info = infos[i]
        keys = object_keys(obj, features, info)
        hi = min(lo + block, info["n_events"])
        _, arrays = next(h5io.iter_chunks(info["path"], list(keys.values()), step=block, start=lo, stop=hi))
        events = np.nonzero(~heldout(info["path"], lo, hi - lo))[0]
        taken += len(events)
        parts.append(flatten_objects(obj, keys, arrays, events))
    if not parts:
        raise ValueError("no events in the inputs")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- training minibatches -------------------------------------------------------------------------


def minibatches(stream_factory, specs, d_in, batch_size, rng, cache_bytes=None):
    """Endless shuffled minibatches of preprocessed objects. The first pass streams chunk by chunk;
    a training set that fits in `cache_bytes` is kept (preprocessed) and later passes reshuffle it
    in memory: re-reading the HDF5 files every pass was half the fit time of a small set. A larger
    set streams on every pass, so memory holds one chunk (plus at most `cache_bytes`)."""
    cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
    carry = np.zeros((0, d_in), np.float32)
    cache, cached = [], 0
    while True:
        produced = False
        for feats in stream_factory():
            x = preprocess(specs, feats, d_in)
            if cache is not None:
                cache.append(x)
                cached += x.nbytes
                cache = cache if cached <= cache_bytes else None
            x = np.concatenate([carry, x])
            x = x[rng.permutation(len(x))]
            n_full = len(x) // batch_size
            for b in range(n_full):
                produced = True
                yield torch.from_numpy(x[b * batch_size : (b + 1) * batch_size])
            carry = x[n_full * batch_size :]
        if cache is not None:
            break
        if not produced:
            if not len(carry):
                raise ValueError("no training objects in the inputs")
            yield torch.from_numpy(carry)  # fewer objects than one batch: use what there is
    x = np.concatenate(cache) if cache else np.zeros((0, d_in), np.float32)
    if not len(x):
        raise ValueError("no training objects in the inputs")
    while True:  # in memory: a new permutation per pass, full batches (or the whole set if smaller)
        perm = rng.permutation(len(x))
        for b in range(max(1, len(x) // batch_size)):
            yield torch.from_numpy(x[perm[b * batch_size : (b + 1) * batch_size]])


def _whole_event_batches(x: np.ndarray, ev: np.ndarray, batch_size: int, rng):
    """Shuffle whole events (ev: contiguous event numbers per object); batches (x, events) cut at
    the first event end after each multiple of batch_size objects, and the rest (x, events 0..)."""
    ev = np.r_[0, np.cumsum(np.diff(ev) != 0)] if len(ev) else ev  # 0, 1, .. per event
    order = np.argsort(rng.permutation(int(ev[-1]) + 1 if len(ev) else 0)[ev], kind="stable")
    x, ev = x[order], ev[order]
    cuts = np.unique(np.r_[0, event_cuts(ev, batch_size)])
    batches = [(torch.from_numpy(x[a:b]), torch.from_numpy(ev[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]
    return batches, x[cuts[-1]:], ev[cuts[-1]:]


def event_minibatches(stream_factory, specs, d_in, batch_size, rng, cache_bytes=None):
    """minibatches for the transformer encoder: endless shuffled batches (x, events) of whole events
    (about batch_size objects), from a stream made with context=True; the same caching."""
    cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
    carry_x, carry_ev = np.zeros((0, d_in), np.float32), np.zeros(0, np.int64)
    cache, cached = [], 0
    while True:
        produced = False
        for feats in stream_factory():
            x, ev = preprocess(specs, feats, d_in), np.asarray(feats[EVENT_KEY], np.int64)
            if cache is not None:
                cache.append((x, ev))
                cached += x.nbytes + ev.nbytes
                cache = cache if cached <= cache_bytes else None
            ev = ev - ev[0] + len(carry_ev) if len(ev) else ev  # apart from the carry's events (numbered 0..)
            batches, carry_x, carry_ev = _whole_event_batches(np.concatenate([carry_x, x]), np.concatenate([carry_ev, ev]),
                                                              batch_size, rng)
            produced = produced or bool(batches)
            yield from batches
        if cache is not None:
            break
        if not produced:
            if not len(carry_x):
                raise ValueError("no training objects in the inputs")
            yield torch.from_numpy(carry_x), torch.from_numpy(carry_ev)  # fewer objects than one batch
    if not cache or not sum(len(x) for x, _ in cache):
        raise ValueError("no training objects in the inputs")
    x, ev = np.concatenate([x for x, _ in cache]), np.concatenate([e for _, e in cache])  # one pass: events apart
    while True:  # in memory: a new order of the events per pass
        batches, rest_x, rest_ev = _whole_event_batches(x, ev, batch_size, rng)
        yield from batches or [(torch.from_numpy(rest_x), torch.from_numpy(rest_ev))]
