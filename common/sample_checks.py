"""Per-event physics observables of a PHYSLITE-like ROOT file, the ones a physicist checks a
sample with: the W transverse mass, the Z-candidate and four-lepton masses, jet and b-jet counts,
the leading-jet pT, and the VBF dijet (m_jj, |delta eta_jj|).

The file is read chunk by chunk through the converter's reader (common/physlite.py: its branch
names, units, b-tag links and MET definition); the isolated leptons and the jets of a chunk are
laid out as in step1's HDF5 (pT-ordered, padded, with a mask), so the standard variables come from
common/highlevel.py and the definitions from common/physics.py (is_bjet, z_pairing,
transverse_mass). Every observable is vectorised over the events; NaN where it is undefined.
"""
from __future__ import annotations

import numpy as np

from common import highlevel, physics, physlite

LEPTON_PT_MIN = {"electrons": 7.0, "muons": 5.0}  # GeV, as in the H->4l selection
LEPTON_ISO_MAX = 0.15  # trk_iso03 (track pT sum in dR < 0.3 / pT)
MUON_LOOSE_QUALITY = 2  # xAOD quality 0 Tight .. 3 VeryLoose: Loose or better
JET_ELECTRON_OR_DR = 0.2  # a jet this close to an isolated electron is that electron (overlap removal)
H4L_MZ1_WINDOW, H4L_MZ2_WINDOW = (50.0, 106.0), (12.0, 115.0)  # GeV, the standard H->4l selection
MAX_LEPTONS, MAX_JETS = 6, 15
STEP = 20000  # events per chunk

NAMES = highlevel.NAMES + ("m4l_h4l", "mt_w", "m_ll_z")


def isolated_leptons(c: dict, obj: str) -> np.ndarray:
    """Flat bool over the chunk's electrons or muons: pT > LEPTON_PT_MIN, Loose ID, trk_iso03 < LEPTON_ISO_MAX."""
    pt = physics.flat(c[f"common/{obj}/pt"])[1]
    iso = physics.flat(c[f"common/{obj}/trk_iso03"])[1]
    if obj == "electrons":
        loose = physics.flat(c["atlas/electrons/LHLoose"])[1] == 1
    else:
        loose = physics.flat(c["atlas/muons/quality"])[1] <= MUON_LOOSE_QUALITY
    return (pt > LEPTON_PT_MIN[obj]) & loose & (iso < LEPTON_ISO_MAX)


def jets_not_electrons(c: dict, electrons: np.ndarray) -> np.ndarray:
    """Flat bool over the chunk's jets: not within JET_ELECTRON_OR_DR of one of the `electrons` (flat bool)."""
    flat = lambda obj, v: physics.flat(c[f"common/{obj}/{v}"])  # noqa: E731
    j_off, e_off = flat("jets", "pt")[0], flat("electrons", "pt")[0]
    return ~physics.overlaps(j_off, flat("jets", "eta")[1], flat("jets", "phi")[1], physics.selected_offsets(e_off, electrons),
                             flat("electrons", "eta")[1][electrons], flat("electrons", "phi")[1][electrons], JET_ELECTRON_OR_DR)


def padded(c: dict) -> dict:
    """The isolated leptons and the jets that are not electrons of a converted chunk as step1 lays them
    out: (events, slots) arrays of every feature, pT-ordered, plus the mask; MET as is."""
    out = {"common/met/pt": c["common/met/pt"], "common/met/phi": c["common/met/phi"],
           "common/met/sumet": c["common/met/sumet"]}
    keep = {"electrons": isolated_leptons(c, "electrons"), "muons": isolated_leptons(c, "muons")}
    keep["jets"] = jets_not_electrons(c, keep["electrons"])
    features = {"electrons": ("pt", "eta", "phi", "charge"), "muons": ("pt", "eta", "phi", "charge"),
                "jets": ("pt", "eta", "phi", "mass")}
    for obj, feats in features.items():
        offsets, pt = physics.flat(c[f"common/{obj}/pt"])
        index, mask, _ = physics.padded_index(offsets, pt, keep[obj], MAX_JETS if obj == "jets" else MAX_LEPTONS)
        keys = [f"common/{obj}/{f}" for f in feats]
        keys += list(highlevel.BTAG_KEYS) if obj == "jets" else []
        for key in keys:
            out[key] = physics.take_padded(physics.flat(c[key])[1], index, mask, np.float64)
        out[f"common/{obj}/mask"] = mask
    return out


def chunk_observables(c: dict) -> dict[str, np.ndarray]:
    """Every observable of NAMES for one converted chunk (common/physlite.py PhysliteReader.convert)."""
    p = padded(c)
    cols = dict(zip(highlevel.NAMES, highlevel.compute(p).astype(np.float64).T))
    lep, flavour, charge, pt = highlevel.leading_leptons(p, MAX_LEPTONS)
    cols["n_leptons"] = (flavour >= 0).sum(axis=1).astype(np.float64)  # all of them, not only the four leading
    in_window = lambda m, w: (m > w[0]) & (m < w[1])  # noqa: E731
    h4l = in_window(cols["mZ1"], H4L_MZ1_WINDOW) & in_window(cols["mZ2"], H4L_MZ2_WINDOW)
    cols["m4l_h4l"] = np.where(h4l, cols["m4l"], np.nan)
    # W: exactly one isolated lepton, mT with the MET
    lead_phi = np.arctan2(lep[:, 0, 2], lep[:, 0, 1])
    mt = physics.transverse_mass(pt[:, 0], lead_phi, p["common/met/pt"], p["common/met/phi"])
    cols["mt_w"] = np.where(cols["n_leptons"] == 1, mt, np.nan)
    cols["m_ll_z"] = sfos_mass_closest_to_z(lep, flavour, charge)
    return cols


def sfos_mass_closest_to_z(p4s, flavour, charge) -> np.ndarray:
    """Per event, the same-flavour opposite-sign lepton pair mass closest to Z_MASS (NaN without a pair)."""
    i, j = np.triu_indices(p4s.shape[1], k=1)
    sfos = (flavour[:, i] >= 0) & (flavour[:, i] == flavour[:, j]) & (charge[:, i] * charge[:, j] < 0)
    m = np.where(sfos, physics.invariant_mass(p4s[:, i] + p4s[:, j]), np.nan)
    dist = np.where(sfos, np.abs(m - physics.Z_MASS), np.inf)
    best = np.take_along_axis(m, dist.argmin(axis=1)[:, None], axis=1)[:, 0]
    return np.where(sfos.any(axis=1), best, np.nan)


def observables(path, step: int = STEP) -> dict[str, np.ndarray]:
    """NAMES -> per-event arrays of a whole file, read chunk by chunk (common.runtime.InputError for
    a file the converter cannot read)."""
    tree, name, f = physlite.open_tree(path, physlite.TREES)
    with f:
        reader = physlite.PhysliteReader(tree, physlite.TREES[name], {}, constituents="none")  # no pT cuts: MET of every stored object
        parts = [chunk_observables(reader.convert(chunk)) for chunk in reader.chunks(step)]
    return {k: np.concatenate([part[k] for part in parts]) for k in NAMES}
