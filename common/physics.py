"""Vectorised physics helpers on awkward/numpy arrays (no per-event Python loops).

Used by the converter (step1) and by the detector simulation of step0: keep names stable.
Jagged arrays are awkward arrays of shape (events, var); per-event values are numpy (events,).
"""
from __future__ import annotations

import awkward as ak
import numpy as np

from common.schema import ISO_CONE, ISO_PT_FLOOR_GEV, ISO_Z0SINTHETA_CUT_MM


def delta_phi(phi1, phi2):
    """phi1 - phi2 wrapped into [-pi, pi)."""
    return (phi1 - phi2 + np.pi) % (2 * np.pi) - np.pi


def delta_r(eta1, phi1, eta2, phi2):
    return np.sqrt((eta1 - eta2) ** 2 + delta_phi(phi1, phi2) ** 2)


def eta_from_theta(theta):
    return -np.log(np.tan(theta / 2))


def theta_from_eta(eta):
    return 2 * np.arctan(np.exp(-eta))


def track_pt_from_qoverp(q_over_p, theta):
    """Track pT = sin(theta) / |q/p| (same energy unit as 1/q_over_p)."""
    return np.sin(theta) / np.abs(q_over_p)


def pair_indices(counts1, counts2):
    """Every (object 1, object 2) pair of the same event, as flat indices into ak.flatten of each
    collection: plain numpy, so per-pair maths runs at numpy speed whatever the event count."""
    counts1, counts2 = np.asarray(counts1, np.int64), np.asarray(counts2, np.int64)
    n_pairs = counts1 * counts2
    event = np.repeat(np.arange(len(counts1)), n_pairs)
    k = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    per2 = counts2[event]
    return (np.cumsum(counts1) - counts1)[event] + k // np.maximum(per2, 1), (np.cumsum(counts2) - counts2)[event] + k % np.maximum(per2, 1)


def _flat(a):
    return ak.to_numpy(ak.flatten(a, axis=1)).astype(np.float64)


def track_isolation(obj_eta, obj_phi, obj_pt, trk_eta, trk_phi, trk_pt, trk_z0_pv, trk_theta,
                    cone: float = ISO_CONE, pt_floor: float = ISO_PT_FLOOR_GEV,
                    z0sintheta_cut: float = ISO_Z0SINTHETA_CUT_MM, self_dr: float = 0.0):
    """trk_iso03 of every object of every event: sum pT of tracks with dR < cone, pT > pt_floor and
    |z0 sin(theta)| < z0sintheta_cut (z0 w.r.t. the primary vertex), divided by the object's pT.

    self_dr > 0 removes the object's own track: the nearest selected track if it lies within
    self_dr (a charged lepton's track would otherwise put its isolation at >= 1).
    Inputs are jagged (events, objects) / (events, tracks) in GeV, mm, rad; returns jagged float32.
    All objects x selected tracks of the chunk are evaluated at once through pair_indices."""
    good = (trk_pt > pt_floor) & (np.abs(trk_z0_pv * np.sin(trk_theta)) < z0sintheta_cut)
    o_counts = ak.to_numpy(ak.num(obj_pt, axis=1))
    io, it = pair_indices(o_counts, ak.to_numpy(ak.num(trk_pt[good], axis=1)))
    o_eta, o_phi, o_pt = _flat(obj_eta), _flat(obj_phi), _flat(obj_pt)
    t_eta, t_phi, t_pt = _flat(trk_eta[good]), _flat(trk_phi[good]), _flat(trk_pt[good])
    dr = delta_r(o_eta[io], o_phi[io], t_eta[it], t_phi[it])
    in_cone = dr < cone
    if self_dr > 0:
        nearest = np.full(len(o_pt), np.inf)
        np.minimum.at(nearest, io, dr)
        in_cone &= ~((dr == nearest[io]) & (dr < self_dr))
    sum_pt = np.bincount(io, weights=np.where(in_cone, t_pt[it], 0.0), minlength=len(o_pt))
    return ak.unflatten((sum_pt / o_pt).astype(np.float32), o_counts)


def pick_per_event(values, index):
    """values[event][index[event]] for jagged `values` and an int index per event (-1: None)."""
    index = ak.Array(np.asarray(index, dtype=np.int64))
    n = ak.num(values, axis=1)
    ok = (index >= 0) & (index < n)
    safe = ak.where(ok, index, 0)
    picked = ak.firsts(values[ak.local_index(values, axis=1) == safe], axis=1)
    return ak.mask(picked, ok)


def first_index_where(condition):
    """Per event, the index of the first True of a jagged boolean array; -1 when none."""
    idx = ak.local_index(condition, axis=1)
    return ak.to_numpy(ak.fill_none(ak.firsts(idx[condition], axis=1), -1)).astype(np.int64)


def gather(values, index):
    """values[event][index[event][i]] for jagged `values` (event-level container) and jagged `index`
    (per object); an out-of-range or negative index gives None."""
    n = ak.num(values, axis=1)
    ok = (index >= 0) & (index < n)
    safe = ak.where(ok, index, 0)
    # pad each event's container by one so that index 0 of an empty container stays legal
    padded = ak.pad_none(values, 1, axis=1)
    return ak.mask(padded[safe], ok)


def pt_order(pt):
    """Indices that sort each event's objects by pT descending (stable)."""
    return ak.argsort(pt, axis=1, ascending=False, stable=True)


def to_padded(values, max_objects: int, dtype, fill=0):
    """Jagged (events, var) -> numpy (events, max_objects), cut at max_objects, padded with `fill`."""
    cut = ak.pad_none(values[:, :max_objects], max_objects, axis=1, clip=True)
    return ak.to_numpy(ak.fill_none(cut, fill)).astype(dtype, copy=False)


def padded_index(pt, keep, max_objects: int):
    """Where each output slot comes from: (flat index (events, max_objects) into ak.flatten(pt), mask).
    Slot k of an event holds its k-th highest-pT object among those with `keep`; computing this once
    per object type lets every feature be gathered with plain numpy (take_padded)."""
    counts = ak.to_numpy(ak.num(pt, axis=1))
    offsets = np.cumsum(counts) - counts
    local = ak.local_index(pt, axis=1)[keep]
    local = local[pt_order(pt[keep])]
    slots = to_padded(local, max_objects, np.int64, fill=-1)
    mask = slots >= 0
    return np.where(mask, slots + offsets[:, np.newaxis], 0), mask


def take_padded(values, flat_index, mask, dtype):
    """Jagged values -> (events, max_objects) numpy of `dtype` through padded_index; padding is 0."""
    flat = ak.to_numpy(ak.flatten(values, axis=1))
    if len(flat) == 0:
        return np.zeros(mask.shape, dtype)
    out = flat[flat_index].astype(dtype)
    out[~mask] = 0
    return out


def vector_sum(pt, phi):
    """Per event (sum px, sum py) of jagged pt/phi."""
    return (ak.to_numpy(ak.sum(pt * np.cos(phi), axis=1)).astype(np.float64),
            ak.to_numpy(ak.sum(pt * np.sin(phi), axis=1)).astype(np.float64))


def overlaps(eta1, phi1, eta2, phi2, dr_max: float):
    """Jagged bool over objects 1: True where any object 2 of the same event lies within dr_max."""
    counts1 = ak.to_numpy(ak.num(eta1, axis=1))
    i1, i2 = pair_indices(counts1, ak.to_numpy(ak.num(eta2, axis=1)))
    close = delta_r(_flat(eta1)[i1], _flat(phi1)[i1], _flat(eta2)[i2], _flat(phi2)[i2]) < dr_max
    hit = np.bincount(i1[close], minlength=int(counts1.sum())) > 0
    return ak.unflatten(hit, counts1)
