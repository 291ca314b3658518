"""Jet constituents: which tracks or PF candidates belong to which jet, and their padded HDF5 layout
(common/schema.py JET_CONSTITUENTS; docs/DESIGN.md section 2).

A reader (common/physlite.py, common/nanoaod.py) turns a chunk into a constituent table:
{"jet": flat index of the jet among the chunk's jets as read (before the converter's cut), feature: flat
values in schema units}, one entry per (jet, constituent). `place` keeps the constituents of the stored
jets, the leading MAX_CONSTITUENTS of each in pT; `dense` writes them as (events, max_jets,
MAX_CONSTITUENTS) arrays for a range of events, so the converter appends them block by block.

Sources (`--constituents` of step1; under `auto` the first the file allows):
  links   -> ghost_track_links: the valid AnalysisJetsAuxDyn.GhostTrack ElementLinks into the file's
             InDetTrackParticles (key 0, or an index past the stored tracks, is invalid: PHYSLITE thins
             its tracks and keeps the links)
  pfnano  -> pfnano_association: CMS PFNano's JetPFCands_jetIdx / JetPFCands_pFCandsIdx into PFCands
  delta_r -> delta_r: every track of the file (before the converter's track cut) goes to the nearest
             jet axis within CONSTITUENT_DELTA_R, among the jets above the converter's jet pT cut
"""
from __future__ import annotations

import numpy as np

from common import physics
from common.runtime import InputError
from common.schema import CONSTITUENT_DELTA_R, CONSTITUENT_METHODS, MAX_CONSTITUENTS, dataset_path

MODES = ("auto", "links", "pfnano", "delta_r", "none")
METHOD = dict(zip(("links", "pfnano", "delta_r"), CONSTITUENT_METHODS))  # mode -> /metadata method
NEEDS = {"links": "AnalysisJetsAuxDyn.GhostTrack links (ATLAS PHYSLITE)",
         "pfnano": "Jet + JetPFCands_jetIdx/JetPFCands_pFCandsIdx + PFCands_pt/eta/phi (CMS PFNano)"}


def choose(requested: str, available: tuple[str, ...]) -> str | None:
    """The mode used for a file ('links', 'pfnano', 'delta_r'; None for none). `available`: the modes the
    file allows, preferred first (delta_r last, always); a requested mode it does not allow is an InputError."""
    if requested == "none":
        return None
    if requested == "auto":
        return available[0]
    if requested not in available:
        raise InputError(f"--constituents {requested}: the file has no {NEEDS[requested]}")
    return requested


def metadata(mode: str | None, links_total: int, links_valid: int) -> dict | None:
    """The /metadata `jet_constituents` record of a file."""
    if mode is None:
        return None
    meta = {"method": METHOD[mode], "max_constituents": MAX_CONSTITUENTS}
    if mode == "delta_r":
        meta["delta_r"] = CONSTITUENT_DELTA_R
    if mode == "links":
        meta.update(links_total=links_total, links_valid=links_valid,
                    valid_fraction=links_valid / links_total if links_total else float("nan"))
    return meta


def from_links(jet_offsets, links_per_jet, link_index, pool_offsets):
    """(jet, pool entry, links, valid links): every link of every jet; link_index is the index into the
    jet's event's pool (-1 for a null link), pool_offsets the pool's event offsets."""
    jet = np.repeat(np.arange(len(links_per_jet)), links_per_jet)
    event = physics.event_index(jet_offsets)[jet]
    ok = (link_index >= 0) & (link_index < np.diff(pool_offsets)[event])
    return jet[ok], pool_offsets[event[ok]] + link_index[ok], len(link_index), int(ok.sum())


def from_delta_r(jet_offsets, jet_eta, jet_phi, jet_keep, pool_offsets, pool_eta, pool_phi):
    """(jet, pool entry): each pool entry to the nearest jet axis among `jet_keep` within CONSTITUENT_DELTA_R."""
    kept = np.flatnonzero(jet_keep)
    kept_counts = np.diff(physics.selected_offsets(jet_offsets, jet_keep))
    ij, ip = physics.pair_indices(kept_counts, np.diff(pool_offsets))
    jet = kept[ij]
    dr = physics.delta_r(jet_eta[jet], jet_phi[jet], pool_eta[ip], pool_phi[ip])
    close = dr < CONSTITUENT_DELTA_R
    jet, ip, dr = jet[close], ip[close], dr[close]
    order = np.lexsort((dr, ip))  # per pool entry, nearest jet first
    first = np.ones(len(order), bool)
    first[1:] = ip[order][1:] != ip[order][:-1]
    return jet[order][first], ip[order][first]


def place(jet, values: dict[str, np.ndarray], jet_index, jet_mask, n_jets: int) -> dict[str, np.ndarray]:
    """Constituents of the stored jets: {"slot": event * max_jets + k, "rank": 0.. in pT order, feature: values},
    sorted by slot then rank, the leading MAX_CONSTITUENTS per jet. jet_index / jet_mask: the jets'
    physics.padded_index (which flat jet fills each stored slot); n_jets: jets in the chunk."""
    slot_of = np.full(n_jets, -1, np.int64)
    slot_of[jet_index[jet_mask]] = np.flatnonzero(jet_mask.ravel())
    slot = slot_of[jet]
    stored = np.flatnonzero(slot >= 0)
    order = stored[np.lexsort((-values["pt"][stored], slot[stored]))]
    slot = slot[order]
    start = np.searchsorted(slot, slot, side="left")
    rank = np.arange(len(slot)) - start
    fits = rank < MAX_CONSTITUENTS
    return {"slot": slot[fits], "rank": rank[fits], **{k: v[order][fits] for k, v in values.items()}}


def dense(placed: dict[str, np.ndarray], lo: int, hi: int, max_jets: int, features) -> dict[str, np.ndarray]:
    """{dataset path: array} of events [lo, hi) of a chunk's placed constituents: each feature (zero padded),
    mask and n, in the layout of the schema's JET_CONSTITUENTS."""
    a, b = np.searchsorted(placed["slot"], (lo * max_jets, hi * max_jets))
    slot, rank = placed["slot"][a:b] - lo * max_jets, placed["rank"][a:b]
    shape = ((hi - lo) * max_jets, MAX_CONSTITUENTS)
    out = {}
    for f in features:
        arr = np.zeros(shape, f.dtype)
        arr[slot, rank] = placed[f.name][a:b]
        out[dataset_path("jet_constituents", f)] = arr.reshape(hi - lo, max_jets, MAX_CONSTITUENTS)
    mask = np.zeros(shape, bool)
    mask[slot, rank] = True
    out["common/jet_constituents/mask"] = mask.reshape(hi - lo, max_jets, MAX_CONSTITUENTS)
    out["common/jet_constituents/n"] = mask.sum(axis=1).astype(np.int16).reshape(hi - lo, max_jets)
    return out
