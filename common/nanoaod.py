"""CMS NanoAOD reading (TTree `Events`) into the same /common keys as ATLAS, CMS extras into /cms.

BRANCHES is the one table: schema feature -> candidate branches, first that exists wins.
NanoAOD is already in GeV; lengths are cm and become mm. NanoAOD keeps no PF candidates, so
trk_iso03 is taken from `<Object>_pfRelIso03_chg`: the pT sum of charged PF candidates from the
primary vertex within dR < 0.3 over the object's pT, the CMS counterpart of the ATLAS definition
(no 0.5 GeV floor / z0 cut of its own; CMS associates candidates to the PV instead). Tracks are the
`IsoTrack` collection (isolated tracks, the only tracks standard NanoAOD stores).
"""
from __future__ import annotations

import awkward as ak
import numpy as np

from common import physics
from common.physlite import ColumnReader, _fill_like, column, first_present, tree_keys
from common.runtime import InputError
from common.schema import EXPERIMENT_ID, MISSING_INT, OBJECTS

TREES = {"Events": "ttree"}

BRANCHES: dict[str, dict[str, list[str]]] = {
    "electrons": {
        "pt": ["Electron_pt"], "eta": ["Electron_eta"], "phi": ["Electron_phi"], "charge": ["Electron_charge"],
        "trk_iso03": ["Electron_pfRelIso03_chg"],
        "cutBased": ["Electron_cutBased"], "pfRelIso03_all": ["Electron_pfRelIso03_all"],
        "mvaIso_WP90": ["Electron_mvaIso_WP90", "Electron_mvaFall17V2Iso_WP90", "Electron_mvaFall17V1Iso_WP90"],
    },
    "muons": {
        "pt": ["Muon_pt"], "eta": ["Muon_eta"], "phi": ["Muon_phi"], "charge": ["Muon_charge"],
        "trk_iso03": ["Muon_pfRelIso03_chg"],
        "looseId": ["Muon_looseId"], "mediumId": ["Muon_mediumId"], "tightId": ["Muon_tightId"],
        "pfRelIso04_all": ["Muon_pfRelIso04_all"],
    },
    "taus": {
        "pt": ["Tau_pt"], "eta": ["Tau_eta"], "phi": ["Tau_phi"], "charge": ["Tau_charge"],
        "is_1prong": ["Tau_decayMode"],  # decay modes 0, 1, 2 have one charged hadron
        "decayMode": ["Tau_decayMode"],
        "rawDeepTau2018v2p5VSjet": ["Tau_rawDeepTau2018v2p5VSjet", "Tau_rawDeepTau2017v2p1VSjet"],
    },
    "photons": {
        "pt": ["Photon_pt"], "eta": ["Photon_eta"], "phi": ["Photon_phi"],
        "trk_iso03": ["Photon_pfRelIso03_chg"],
        "cutBased": ["Photon_cutBased", "Photon_cutBasedBitmap"],  # bitmap: loose 1, medium 2, tight 4 (nested)
        "pfRelIso03_all": ["Photon_pfRelIso03_all"],
    },
    "jets": {
        "pt": ["Jet_pt"], "eta": ["Jet_eta"], "phi": ["Jet_phi"], "mass": ["Jet_mass"],
        "n_trk": ["Jet_chMultiplicity"],  # charged constituents (NanoAOD v10+)
        "btagDeepFlavB": ["Jet_btagDeepFlavB"], "btagDeepFlavCvL": ["Jet_btagDeepFlavCvL"], "qgl": ["Jet_qgl"],
        "jetId": ["Jet_jetId"], "hadronFlavour": ["Jet_hadronFlavour"],
    },
    "tracks": {
        "pt": ["IsoTrack_pt"], "eta": ["IsoTrack_eta"], "phi": ["IsoTrack_phi"],
        "d0": ["IsoTrack_dxy"], "z0": ["IsoTrack_dz"],  # dz is already w.r.t. the primary vertex
    },
    "met": {"pt": ["MET_pt", "PuppiMET_pt"], "phi": ["MET_phi", "PuppiMET_phi"], "sumet": ["MET_sumEt", "PuppiMET_sumEt"]},
    "event": {
        "pvx": ["PV_x"], "pvy": ["PV_y"], "pvz": ["PV_z"],
        "mu": ["Pileup_nTrueInt"],  # simulation only
        "weight": ["genWeight"],  # simulation only; real data get weight 1
        "event": ["event"], "run": ["run"], "luminosityBlock": ["luminosityBlock"],
    },
}
SCALE = {"mm": 10.0}  # NanoAOD cm -> schema mm
MET_DEFINITION = "CMS NanoAOD MET_pt / MET_phi / MET_sumEt (type-1 corrected PF MET) as stored"


class NanoAODReader(ColumnReader):
    experiment = "cms"

    def __init__(self, tree, kind: str, pt_cuts: dict[str, float]):
        self.tree, self.kind = tree, kind
        keys = tree_keys(tree)
        self.columns: dict[tuple[str, str], str] = {}
        missing = []
        for obj, table in BRANCHES.items():
            for feat, candidates in table.items():
                col = first_present(candidates, keys, kind)
                f = OBJECTS[obj].feature(feat)
                if col is not None:
                    self.columns[(obj, feat)] = col
                elif not f.optional and obj != "event":
                    raise InputError(f"missing kinematic branch {candidates[0]}")
                elif feat not in ("weight",):
                    missing.append(f"{f.group}/{obj}/{feat}")
        self.missing = sorted(missing)

    def convert(self, chunk) -> dict:
        n = len(chunk)
        out: dict = {}
        for obj, table in BRANCHES.items():
            ref = column(chunk, self.columns[(obj, "pt")]) if obj not in ("event",) else None
            for feat in table:
                f = OBJECTS[obj].feature(feat)
                out[f"{f.group}/{obj}/{feat}"] = self._feature(chunk, obj, feat, ref, n)
        if self.has("taus", "is_1prong"):
            mode = column(chunk, self.columns[("taus", "is_1prong")])
            out["common/taus/is_1prong"] = ak.values_astype((mode >= 0) & (mode <= 2), np.int8)
        if self.columns.get(("photons", "cutBased"), "").endswith("Bitmap"):
            bits = ak.values_astype(column(chunk, self.columns[("photons", "cutBased")]), np.int64)
            out["cms/photons/cutBased"] = (bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1)
        is_sim = self.has("event", "weight")
        out["common/event/experiment_id"] = np.full(n, EXPERIMENT_ID["cms"], np.int8)
        out["common/event/is_simulation"] = np.full(n, int(is_sim), np.int8)
        if not is_sim:
            out["common/event/weight"] = np.ones(n, np.float32)
        return out

    def _feature(self, chunk, obj, feat, ref, n):
        f = OBJECTS[obj].feature(feat)
        missing_value = np.nan if f.dtype == "float32" else MISSING_INT
        if not self.has(obj, feat):
            if ref is None or OBJECTS[obj].per_event:
                return np.full(n, missing_value, np.float64 if f.dtype == "float32" else np.int64)
            return _fill_like(ref, missing_value)
        values = column(chunk, self.columns[(obj, feat)])
        scale = SCALE.get(f.unit, 1.0)
        if OBJECTS[obj].per_event:
            values = ak.to_numpy(values)
            return values.astype(np.float64) * scale if f.dtype == "float32" else values
        if f.dtype == "float32":  # on the flat values: one awkward call per column, not one per operation
            offsets, flat = physics.flat(values)
            values = physics.jagged(offsets, flat.astype(np.float64) * scale)
        return values
