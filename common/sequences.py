"""The token vocabulary and the vectorised event-sequence builder (step2 apply).

Vocabulary: special ids 0-3 (PAD CLS SEP MASK), then the event tokens (binned pile-up mu),
then one contiguous id range for every (object type, quantizer level). In granularity group an
object's "levels" are its slots: the level codes of each of its feature groups, one after the other
(`groups`: {obj: [[group, levels], ...]} in slot order), one id range per (object type, slot).

Sequence (docs/DESIGN.md), one position per object, Q ids per position:
  [CLS] [EVENT] e.. [SEP] mu.. [SEP] tau.. [SEP] gamma.. [SEP] jet.. [SEP] track.. [SEP] [MET]
Special and event positions hold PAD beyond level 0. Each object type keeps its first `cap`
objects (the HDF5 stores them pT-ordered); if the event is still longer than `max_length`,
objects are dropped from the last types first (tracks, then jets, ...). Both truncations are
counted and the counts go into the Parquet metadata.
"""
from __future__ import annotations

import numpy as np

from common.schema import CLS, MASK, N_SPECIAL, PAD, SEP, SEQUENCE_OBJECTS, TOKENIZED_OBJECTS, TYPE_IDS

LAYOUT = "[CLS] [EVENT] electrons.. [SEP] muons.. [SEP] taus.. [SEP] photons.. [SEP] jets.. [SEP] tracks.. [SEP] [MET]"
MU_EDGES = tuple(float(x) for x in np.arange(5.0, 80.0, 5.0))  # pile-up mu bins: <5, 5-10, ..., >=75
DEFAULT_CAPS = {"electrons": 8, "muons": 8, "taus": 8, "photons": 8, "jets": 20, "tracks": 100}
N_FIXED = 2 + len(SEQUENCE_OBJECTS) + 1  # CLS, EVENT, one SEP per sequence object, MET


def build_vocab(tokenizers: dict[str, dict], caps: dict[str, int], max_length: int,
                mu_edges=MU_EDGES, combined: bool = False, groups: dict[str, list] | None = None) -> dict:
    """tokenizers: {obj: {sha256, features, levels, codebook_size}} for every TOKENIZED_OBJECTS.
    With combined=True all objects share one id range per level (one tokenizer for all). With
    `groups` ({obj: [[group, levels], ...]}, granularity group) tokenizers are keyed '<obj>.<group>'
    and an object's slots are its groups' levels in that order."""
    if max_length < N_FIXED:
        raise ValueError(f"max_length must be at least {N_FIXED} (the fixed positions)")
    ev_offset, ev_size = N_SPECIAL, len(mu_edges) + 1
    start, ranges = ev_offset + ev_size, {}
    for obj in TOKENIZED_OBJECTS:
        if combined and ranges:
            ranges[obj] = ranges[next(iter(ranges))]
            continue
        ranges[obj] = []
        slots = [tokenizers[f"{obj}.{g}"] for g, _ in groups[obj]] if groups else [tokenizers[obj]]
        for t in slots:
            for _ in range(t["levels"]):
                ranges[obj].append([start, t["codebook_size"]])
                start += t["codebook_size"]
    levels = max(len(r) for r in ranges.values())
    layout = {"granularity": "group", "groups": groups} if groups else {"granularity": "object"}
    return {
        **layout, "levels": levels, "vocab_size": start, "type_ids": dict(TYPE_IDS), "ranges": ranges,
        "special": {"PAD": PAD, "CLS": CLS, "SEP": SEP, "MASK": MASK},
        "event_tokens": {"offset": ev_offset, "size": ev_size, "mu_edges": list(mu_edges), "feature": "mu"},
        "layout": LAYOUT, "sequence_objects": list(SEQUENCE_OBJECTS), "caps": {o: int(caps[o]) for o in SEQUENCE_OBJECTS},
        "max_length": int(max_length), "mode": "combined" if combined else "per_object",
        "tokenizers": tokenizers,
    }


def kept_counts(n: dict[str, np.ndarray], caps: dict[str, int], max_length: int) -> np.ndarray:
    """(n_events, n_sequence_objects) objects kept per type: caps first, then the length budget
    filled in sequence order."""
    capped = np.stack([np.minimum(n[o], caps[o]) for o in SEQUENCE_OBJECTS], 1).astype(np.int64)
    budget = max_length - N_FIXED
    before = np.cumsum(capped, 1) - capped  # objects of earlier types
    return np.clip(np.minimum(capped, budget - before), 0, None)


def kept_masks(mask: dict[str, np.ndarray], caps: dict[str, int], max_length: int) -> dict[str, np.ndarray]:
    """The objects that enter the sequences: `mask` less what the caps and max_length drop
    (apply encodes only these)."""
    kept = kept_counts({o: mask[o].sum(1) for o in SEQUENCE_OBJECTS}, caps, max_length)
    return {o: mask[o] & (slot_of(mask[o]) < kept[:, i, None]) for i, o in enumerate(SEQUENCE_OBJECTS)}


def truncation_stats(n: dict[str, np.ndarray], caps: dict[str, int], max_length: int) -> dict:
    """Counts of objects dropped by the per-type caps and by max_length, per type."""
    kept = kept_counts(n, caps, max_length)
    stats = {"events": int(len(kept)), "events_truncated": 0, "by_type": {}}
    truncated = np.zeros(len(kept), bool)
    for i, o in enumerate(SEQUENCE_OBJECTS):
        total = np.asarray(n[o], np.int64)
        capped = np.minimum(total, caps[o])
        truncated |= kept[:, i] < total
        stats["by_type"][o] = {"objects": int(total.sum()), "dropped_by_cap": int((total - capped).sum()),
                               "dropped_by_max_length": int((capped - kept[:, i]).sum())}
    stats["events_truncated"] = int(truncated.sum())
    return stats


def mu_tokens(mu: np.ndarray, vocab: dict) -> np.ndarray:
    ev = vocab["event_tokens"]
    return (ev["offset"] + np.digitize(np.nan_to_num(mu, nan=0.0), ev["mu_edges"])).astype(np.int32)


def slot_of(mask: np.ndarray) -> np.ndarray:
    """Rank of each stored object within its event (0, 1, ...), -1 where the mask is off."""
    return np.where(mask, np.cumsum(mask, 1) - 1, -1)


def build_sequences(mask: dict[str, np.ndarray], codes: dict[str, np.ndarray], met_codes: np.ndarray,
                    mu: np.ndarray, vocab: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mask: {obj: (n_events, max_obj) bool}; codes: {obj: (n_stored_objects, L_obj)} in the row-major
    order of mask's True entries; met_codes (n_events, L_met); mu (n_events,).

    Returns input_ids (n_events, L, Q) int32, token_type_ids (n_events, L) int8, lengths (n_events,)."""
    n_events, q = len(mu), vocab["levels"]
    caps, max_length = vocab["caps"], vocab["max_length"]
    counts = {o: mask[o].sum(1) for o in SEQUENCE_OBJECTS}
    kept = kept_counts(counts, caps, max_length)
    lengths = N_FIXED + kept.sum(1)
    width = int(lengths.max()) if n_events else N_FIXED
    ids = np.zeros((n_events, width, q), dtype=np.int32)
    types = np.zeros((n_events, width), dtype=np.int8)
    rows = np.arange(n_events)

    ids[:, 0, 0], types[:, 0] = CLS, TYPE_IDS["CLS"]
    ids[:, 1, 0], types[:, 1] = mu_tokens(mu, vocab), TYPE_IDS["event"]
    start = np.full(n_events, 2, dtype=np.int64)
    for i, obj in enumerate(SEQUENCE_OBJECTS):
        slot = slot_of(mask[obj])
        ev, col = np.nonzero(mask[obj])  # row-major, the order of codes[obj]
        s = slot[ev, col]
        keep = s < kept[ev, i]
        ev, s = ev[keep], s[keep]
        pos = start[ev] + s
        offsets = np.array([r[0] for r in vocab["ranges"][obj]], dtype=np.int32)
        c = codes[obj][keep]
        ids[ev, pos, : c.shape[1]] = c + offsets[None, :]
        types[ev, pos] = TYPE_IDS[obj]
        start += kept[:, i]
        ids[rows, start, 0], types[rows, start] = SEP, TYPE_IDS["SEP"]
        start += 1
    met_offsets = np.array([r[0] for r in vocab["ranges"]["met"]], dtype=np.int32)
    ids[rows, start, : met_codes.shape[1]] = met_codes + met_offsets[None, :]
    types[rows, start] = TYPE_IDS["met"]
    assert np.array_equal(start + 1, lengths)
    return ids, types, lengths
