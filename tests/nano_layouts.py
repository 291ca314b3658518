"""NanoAOD files in other real layouts, written with uproot from the real events of
tests/data/nanoaod/nano_dy.root: reduced files without some collections, the NanoAOD v15 MET names,
and the Run 3 scouting names (PhysicsTools/NanoAOD run3scouting_cff)."""
from __future__ import annotations

import functools
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from common import nanoaod

NANO = Path(__file__).resolve().parent / "data" / "nanoaod" / "nano_dy.root"
STANDARD = ("Electron", "Muon", "Tau", "Photon", "Jet", "IsoTrack")
SINGLETONS = ("MET", "PuppiMET", "PV")


@functools.lru_cache(maxsize=1)
def read_nano() -> tuple[dict[str, dict[str, ak.Array]], dict[str, np.ndarray]]:
    """({collection: {field: jagged array}}, {branch: per-event array}) with every branch the
    converter may read (a reduced NanoAOD, as analysers skim them). Cached: do not modify."""
    tree = uproot.open(NANO)["Events"]
    suffixes = {p: {s for table in nanoaod.COLLECTIONS.values() for s_list in table.get(p, {}).values() for s in s_list}
                for p in STANDARD}
    wanted = [f"{p}_{s}" for p in STANDARD for s in suffixes[p]]
    wanted += [f"{p}_{s}" for p in SINGLETONS for s in ("pt", "phi", "sumEt", "x", "y", "z")]
    wanted += [c for cands in nanoaod.EVENT.values() for c in cands]
    present = set(tree.keys())
    arrays = tree.arrays([k for k in wanted if k in present], library="ak")
    collections: dict[str, dict[str, ak.Array]] = {}
    flat = {}
    for key in arrays.fields:
        prefix, _, field = key.partition("_")
        if prefix in STANDARD:
            collections.setdefault(prefix, {})[field] = arrays[key]
        else:
            flat[key] = ak.to_numpy(arrays[key])
    return collections, flat


def write_nano(path, collections: dict[str, dict[str, ak.Array]], flat: dict[str, np.ndarray]) -> Path:
    """A TTree `Events` as NanoAOD stores it: n<Collection> counters and <Collection>_<field> branches."""
    data = {**{name: ak.zip(fields) for name, fields in collections.items()}, **flat}
    with uproot.recreate(path) as f:
        f.mktree("Events", {k: (v.type if isinstance(v, ak.Array) else v.dtype) for k, v in data.items()})
        f["Events"].extend(data)
    return Path(path)


def reduced(path, drop=()) -> Path:
    """nano_dy without the collections in `drop` (an older or reduced NanoAOD)."""
    collections, flat = read_nano()
    return write_nano(path, {k: v for k, v in collections.items() if k not in drop}, flat)


def v15(path) -> Path:
    """NanoAOD v15 names: the type-1 PF MET `MET_*` is `PFMET_*`."""
    collections, flat = read_nano()
    flat = {(f"PF{k}" if k.startswith("MET_") else k): v for k, v in flat.items()}
    return write_nano(path, collections, flat)


def scouting(path, electron_charge: bool = True, shift_cm: float = 3.0) -> Path:
    """The events of nano_dy under the Run 3 scouting NanoAOD names: ScoutingElectron (charge of the best
    track), ScoutingMuonVtx and ScoutingMuonNoVtx (2024+), ScoutingPhoton, ScoutingPFJet (mass `m`),
    ScoutingTrack with a reference point (vx, vy, vz), ScoutingPrimaryVertex (a collection), ScoutingMET
    (pt, phi; no sumEt); no taus. The track reference points are put `shift_cm` along each track from its
    point of closest approach to PV_x/y/z, so d0 and z0 w.r.t. the first vertex are IsoTrack_dxy / dz."""
    c, flat = read_nano()
    kin = lambda col, *extra: {f: c[col][f] for f in ("pt", "eta", "phi", *extra)}  # noqa: E731
    trk = c["IsoTrack"]
    pv = {a: flat[f"PV_{a}"] for a in "xyz"}
    per_track = {a: ak.broadcast_arrays(pv[a], trk["pt"])[0] for a in "xyz"}
    phi, eta = trk["phi"], trk["eta"]
    vx = per_track["x"] - trk["dxy"] * np.sin(phi) + shift_cm * np.cos(phi)
    vy = per_track["y"] + trk["dxy"] * np.cos(phi) + shift_cm * np.sin(phi)
    vz = per_track["z"] + trk["dz"] + shift_cm * np.sinh(eta)
    electrons = kin("Electron")
    if electron_charge:
        electrons["bestTrack_charge"] = c["Electron"]["charge"]
    vertices = {a: ak.Array([[v, v + 0.5] for v in pv[a]]) for a in "xyz"}  # the first is the event's PV
    collections = {
        "ScoutingElectron": electrons,
        "ScoutingMuonVtx": kin("Muon", "charge"),
        "ScoutingMuonNoVtx": {**kin("Muon", "charge"), "pt": c["Muon"]["pt"] * 1.1},
        "ScoutingPhoton": kin("Photon"),
        "ScoutingPFJet": {**kin("Jet"), "m": c["Jet"]["mass"]},
        "ScoutingTrack": {**kin("IsoTrack"), "vx": vx, "vy": vy, "vz": vz},
        "ScoutingPrimaryVertex": vertices,
    }
    singles = {"ScoutingMET_pt": flat["MET_pt"], "ScoutingMET_phi": flat["MET_phi"],
               **{k: flat[k] for k in ("event", "run", "luminosityBlock", "genWeight", "Pileup_nTrueInt")}}
    return write_nano(path, collections, singles)
