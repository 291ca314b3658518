"""The one physics module: constants, the analysis definitions every step shares (b-tag
discriminant and b-jets, four-vectors, invariant masses, the Z-candidate pairing), and the
vectorised helpers of the converter and the detector simulation (no per-event Python loops).

Jagged arrays are awkward arrays of shape (events, var); per-event values are numpy (events,).
"""
from __future__ import annotations

import awkward as ak
import numpy as np

from common.schema import ISO_CONE, ISO_PT_FLOOR_GEV, ISO_Z0SINTHETA_CUT_MM

# --- constants (GeV) ------------------------------------------------------------------------------
Z_MASS = 91.1876
W_MASS = 80.377
HIGGS_MASS = 125.0
ELECTRON_MASS, MUON_MASS = 0.000511, 0.10566
LEPTON_MASS = {"electrons": ELECTRON_MASS, "muons": MUON_MASS}  # the HDF5 lepton objects

# --- b-tagging: D = ln(pb / (fc pc + (1 - fc) pu)), the taggers' charm fractions --------------------
BTAG_FC = {"DL1d": 0.018, "GN2": 0.2}
BTAG_EPS = 1e-6  # keeps D finite for scores at exactly 0
BJET_TAGGER = "GN2"
BJET_CUT = 2.0  # D above this is a b-jet (about the 77% efficiency working point of the built-in sample)
BJET_PT_MIN, BJET_ETA_MAX = 25.0, 2.5  # GeV; b-jets are counted among these jets


def btag_discriminant(pb, pc, pu, tagger: str):
    """D of a tagger's (pb, pc, pu) triplet; an unknown tagger is a KeyError naming it."""
    if tagger not in BTAG_FC:
        raise KeyError(f"no charm fraction for b-tagger {tagger!r} (known: {', '.join(BTAG_FC)})")
    fc = BTAG_FC[tagger]
    return np.log((np.asarray(pb) + BTAG_EPS) / (fc * np.asarray(pc) + (1 - fc) * np.asarray(pu) + BTAG_EPS))


def is_bjet(pt, eta, pb, pc, pu):
    """The b-jet definition: pT > BJET_PT_MIN, |eta| < BJET_ETA_MAX and D(BJET_TAGGER) > BJET_CUT."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(pt) > BJET_PT_MIN) & (np.abs(eta) < BJET_ETA_MAX) & (btag_discriminant(pb, pc, pu, BJET_TAGGER) > BJET_CUT)


# --- four-vectors and the Z-candidate pairing ---------------------------------------------------------
def p4(pt, eta, phi, m):
    """(E, px, py, pz) stacked on the last axis, float64."""
    pt, eta, phi = (np.asarray(v, np.float64) for v in (pt, eta, phi))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    return np.stack([np.sqrt(px**2 + py**2 + pz**2 + np.asarray(m, np.float64) ** 2), px, py, pz], axis=-1)


def invariant_mass(p):
    """Mass of (..., 4) four-vectors (E, px, py, pz), clipped at 0."""
    return np.sqrt(np.maximum(p[..., 0] ** 2 - (p[..., 1:] ** 2).sum(-1), 0.0))


# The three ways to split four leptons into two pairs.
PAIRINGS = (((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2)))


def z_pairing(p4s, flavour, charge):
    """The standard H->4l pairing of four leptons: (mZ1, mZ2, pairing index).

    p4s (N, 4, 4), flavour (N, 4) with -1 for no lepton, charge (N, 4). Of the pairings with two
    same-flavour opposite-sign pairs, the one whose pair lies closest to Z_MASS wins; that pair
    is Z1 and the other Z2. NaN (and index -1) without two such pairs."""
    n = len(p4s)
    best_z1, best_z2, best = np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1)
    sfos = lambda i, j: (flavour[:, i] >= 0) & (flavour[:, i] == flavour[:, j]) & (charge[:, i] * charge[:, j] < 0)  # noqa: E731
    for k, ((a, b), (c, d)) in enumerate(PAIRINGS):
        ok = sfos(a, b) & sfos(c, d)
        m1, m2 = invariant_mass(p4s[:, a] + p4s[:, b]), invariant_mass(p4s[:, c] + p4s[:, d])
        first = np.abs(m1 - Z_MASS) <= np.abs(m2 - Z_MASS)
        z1, z2 = np.where(first, m1, m2), np.where(first, m2, m1)
        better = ok & (np.isnan(best_z1) | (np.abs(z1 - Z_MASS) < np.abs(best_z1 - Z_MASS)))
        best_z1, best_z2, best = np.where(better, z1, best_z1), np.where(better, z2, best_z2), np.where(better, k, best)
    return best_z1, best_z2, best


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


# ----------------------------------------------------------------------------------------------
# Flat views: a jagged (events, var) array is (offsets, values), two numpy arrays. Each awkward call
# costs ~0.1-1 ms whatever its size, so the converter takes this view once per column and does
# the per-object maths in numpy.
# ----------------------------------------------------------------------------------------------
def flat(a):
    """(offsets (n_events + 1, from 0), flat values) of a jagged array; no copy for the plain
    list-of-numbers layout that uproot reads."""
    layout = a.layout if isinstance(a, ak.Array) else ak.to_layout(a)
    if isinstance(layout, ak.contents.ListOffsetArray) and isinstance(layout.content, ak.contents.NumpyArray):
        offsets = np.asarray(layout.offsets.data).astype(np.int64)
        return offsets - offsets[0], np.asarray(layout.content.data)[offsets[0]:offsets[-1]]
    counts = ak.to_numpy(ak.num(a, axis=1)).astype(np.int64)
    return counts_to_offsets(counts), ak.to_numpy(ak.flatten(a, axis=1))


def jagged(offsets, values):
    """The awkward array of (offsets, values) (no copy)."""
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(np.asarray(offsets, np.int64)),
                                                ak.contents.NumpyArray(np.asarray(values))))


def counts_to_offsets(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def event_index(offsets):
    """The event of every flat entry."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def selected_offsets(offsets, keep):
    """Offsets of the entries with `keep` (flat bool)."""
    return counts_to_offsets(np.bincount(event_index(offsets)[keep], minlength=len(offsets) - 1))


def per_event_sum(offsets, values, keep=None):
    """Per-event float64 sum of flat `values` (where `keep`), in entry order like ak.sum."""
    event = event_index(offsets)
    values = np.asarray(values, np.float64)
    if keep is not None:
        event, values = event[keep], values[keep]
    return np.bincount(event, weights=values, minlength=len(offsets) - 1)


def gather_index(values_offsets, index_offsets, index):
    """(flat source, ok) so that values_flat[source] is values[event][index[event][i]] (ok False for an
    out-of-range or negative index: a link to an entry the chunk does not hold)."""
    event = event_index(index_offsets)
    ok = (index >= 0) & (index < np.diff(values_offsets)[event])
    return np.where(ok, values_offsets[:-1][event] + index, 0), ok


def first_index_where(offsets, condition):
    """Per event, the local index of the first True of flat `condition`; -1 when none."""
    first = np.full(len(offsets) - 1, -1, np.int64)
    hits = np.flatnonzero(condition)
    events, where = np.unique(event_index(offsets)[hits], return_index=True)
    first[events] = hits[where] - offsets[events]
    return first


def pick_per_event(offsets, values, index):
    """values[event][index[event]] as float64 (NaN where the index is -1 or out of range)."""
    ok = (index >= 0) & (index < np.diff(offsets))
    out = np.full(len(index), np.nan)
    out[ok] = values[offsets[:-1][ok] + index[ok]]
    return out


def track_isolation(obj_eta, obj_phi, obj_pt, trk_eta, trk_phi, trk_pt, trk_z0_pv, trk_theta,
                    cone: float = ISO_CONE, pt_floor: float = ISO_PT_FLOOR_GEV,
                    z0sintheta_cut: float = ISO_Z0SINTHETA_CUT_MM, self_dr: float = 0.0):
    """trk_iso03 of every object of every event: sum pT of tracks with dR < cone, pT > pt_floor and
    |z0 sin(theta)| < z0sintheta_cut (z0 w.r.t. the primary vertex), divided by the object's pT.

    self_dr > 0 removes the object's own track: the nearest selected track if it lies within
    self_dr (a charged lepton's track would otherwise put its isolation at >= 1).
    Inputs are jagged (events, objects) / (events, tracks) in GeV, mm, rad; returns jagged float32.
    All objects x selected tracks of the chunk are evaluated at once through pair_indices."""
    o_off, o_pt = flat(obj_pt)
    t_off, t_pt = flat(trk_pt)
    good = (t_pt > pt_floor) & (np.abs(flat(trk_z0_pv)[1] * np.sin(flat(trk_theta)[1])) < z0sintheta_cut)
    io, it = pair_indices(np.diff(o_off), np.diff(selected_offsets(t_off, good)))
    o_eta, o_phi, o_pt = (np.asarray(v, np.float64) for v in (flat(obj_eta)[1], flat(obj_phi)[1], o_pt))
    t_eta, t_phi, t_pt = (np.asarray(v[good], np.float64) for v in (flat(trk_eta)[1], flat(trk_phi)[1], t_pt))
    dr = delta_r(o_eta[io], o_phi[io], t_eta[it], t_phi[it])
    in_cone = dr < cone
    if self_dr > 0:
        nearest = np.full(len(o_pt), np.inf)
        np.minimum.at(nearest, io, dr)
        in_cone &= ~((dr == nearest[io]) & (dr < self_dr))
    sum_pt = np.bincount(io, weights=np.where(in_cone, t_pt[it], 0.0), minlength=len(o_pt))
    return jagged(o_off, (sum_pt / o_pt).astype(np.float32))


def gather(values, index):
    """values[event][index[event][i]] for jagged `values` (event-level container) and jagged `index`
    (per object); an out-of-range or negative index gives None."""
    n = ak.num(values, axis=1)
    ok = (index >= 0) & (index < n)
    safe = ak.where(ok, index, 0)
    # pad each event's container by one so that index 0 of an empty container stays legal
    padded = ak.pad_none(values, 1, axis=1)
    return ak.mask(padded[safe], ok)


def padded_index(offsets, pt, keep, max_objects: int):
    """Where each output slot comes from: (flat index (events, max_objects) into the values, mask,
    number kept per event). Slot k of an event holds its k-th highest-pT object among those with
    `keep` (ties in stored order); computing this once per object type lets every feature be
    gathered with plain numpy (take_padded)."""
    n = len(offsets) - 1
    kept = np.flatnonzero(keep)
    event = event_index(offsets)[kept]
    order = np.lexsort((-pt[kept], event))  # by event, then pT descending; lexsort is stable
    source, event = kept[order], event[order]
    n_kept = np.bincount(event, minlength=n)
    rank = np.arange(len(source)) - (np.cumsum(n_kept) - n_kept)[event]
    fits = rank < max_objects
    index, mask = np.zeros((n, max_objects), np.int64), np.zeros((n, max_objects), bool)
    index[event[fits], rank[fits]] = source[fits]
    mask[event[fits], rank[fits]] = True
    return index, mask, n_kept


def take_padded(values, flat_index, mask, dtype):
    """Flat values -> (events, max_objects) numpy of `dtype` through padded_index; padding is 0."""
    out = np.zeros(mask.shape, dtype)
    out[mask] = np.asarray(values)[flat_index[mask]].astype(dtype)
    return out


def overlaps(offsets1, eta1, phi1, offsets2, eta2, phi2, dr_max: float):
    """Flat bool over objects 1: True where any object 2 of the same event lies within dr_max."""
    i1, i2 = pair_indices(np.diff(offsets1), np.diff(offsets2))
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    close = delta_r(f64(eta1)[i1], f64(phi1)[i1], f64(eta2)[i2], f64(phi2)[i2]) < dr_max
    return np.bincount(i1[close], minlength=int(offsets1[-1])) > 0


def transverse_mass(pt1, phi1, pt2, phi2):
    """mT of two massless transverse objects (a lepton and the MET): sqrt(2 pT1 pT2 (1 - cos dphi))."""
    pt1, pt2 = np.asarray(pt1, np.float64), np.asarray(pt2, np.float64)
    return np.sqrt(np.maximum(2 * pt1 * pt2 * (1 - np.cos(delta_phi(phi1, phi2))), 0.0))
