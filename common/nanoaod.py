"""CMS NanoAOD reading (`Events`, a TTree or an RNTuple) into the same /common keys as ATLAS, CMS extras into /cms.

COLLECTIONS is the one table: for each object, the NanoAOD collections that can fill it in the order
they are tried, and for each collection the schema feature -> candidate branch suffixes (first that
exists wins). The first collection whose listed kinematic branches all exist is read. An object with
no such collection is absent from the file: zero objects in every event (no MET: NaN), named in
/metadata missing_features as '<object>: all', with a warning. A file with no usable list object
at all is refused. Standard NanoAOD collections come first, then the Run 3 scouting ones (`Scouting*`,
PhysicsTools/NanoAOD run3scouting_cff), so a standard file with scouting tables added reads the
offline objects. docs/nanoaod.md lists what maps to what.

Jet constituents (common/jet_constituents.py): PFNano's JetPFCands association (charged and neutral PF
candidates; PFCONSTITUENTS), else the tracks (IsoTrack / ScoutingTrack) within dR < 0.4 of the jet axis.

MET: the first of MET_DEFINITIONS present (v15 renamed the type-1 PF MET `MET_*` to `PFMET_*`);
/metadata met_definition names the branches read. NanoAOD is already in GeV; lengths are cm and
become mm. NanoAOD keeps no PF candidates, so trk_iso03 is `<Object>_pfRelIso03_chg`: the pT sum of
charged PF candidates from the primary vertex within dR < 0.3 over the object's pT, the CMS
counterpart of the ATLAS definition (no 0.5 GeV floor / z0 cut of its own; CMS associates candidates
to the PV instead); scouting isolation sums are not the same quantity and are not substituted.
Tracks are `IsoTrack` (isolated tracks, the only tracks standard NanoAOD stores) or `ScoutingTrack`.
"""
from __future__ import annotations

import awkward as ak
import numpy as np

from common import jet_constituents, physics
from common.physlite import ColumnReader, _fill_like, column, first_present, tree_keys
from common.runtime import InputError
from common.schema import EXPERIMENT_ID, LIST_OBJECTS, MISSING_INT, OBJECTS, features_for

TREES = ("Events",)  # a TTree, or an RNTuple with the same field names

_KIN = {"pt": ["pt"], "eta": ["eta"], "phi": ["phi"]}
_KIN_Q = {**_KIN, "charge": ["charge"]}
_MET = {"pt": ["pt"], "phi": ["phi"], "sumet": ["sumEt"]}

COLLECTIONS: dict[str, dict[str, dict[str, list[str]]]] = {
    "electrons": {
        "Electron": {**_KIN_Q, "trk_iso03": ["pfRelIso03_chg"], "cutBased": ["cutBased"],
                     "pfRelIso03_all": ["pfRelIso03_all"],
                     "mvaIso_WP90": ["mvaIso_WP90", "mvaFall17V2Iso_WP90", "mvaFall17V1Iso_WP90"]},
        "ScoutingElectron": {**_KIN, "charge": ["bestTrack_charge"]},  # the charge of the best track (2024+)
    },
    "muons": {
        "Muon": {**_KIN_Q, "trk_iso03": ["pfRelIso03_chg"], "looseId": ["looseId"], "mediumId": ["mediumId"],
                 "tightId": ["tightId"], "pfRelIso04_all": ["pfRelIso04_all"]},
        "ScoutingMuonVtx": _KIN_Q,  # 2024+: muons fitted with the vertex constraint
        "ScoutingMuon": _KIN_Q,  # 2022-2023
        "ScoutingMuonNoVtx": _KIN_Q,  # 2024+ without the constraint: only when the file has no other muons
    },
    "taus": {
        "Tau": {**_KIN_Q, "is_1prong": ["decayMode"],  # decay modes 0, 1, 2 have one charged hadron
                "decayMode": ["decayMode"],
                "rawDeepTau2018v2p5VSjet": ["rawDeepTau2018v2p5VSjet", "rawDeepTau2017v2p1VSjet"]},
    },
    "photons": {
        "Photon": {**_KIN, "trk_iso03": ["pfRelIso03_chg"],
                   "cutBased": ["cutBased", "cutBasedBitmap"],  # bitmap: loose 1, medium 2, tight 4 (nested)
                   "pfRelIso03_all": ["pfRelIso03_all"]},
        "ScoutingPhoton": _KIN,
    },
    "jets": {
        "Jet": {**_KIN, "mass": ["mass"], "n_trk": ["chMultiplicity"],  # charged constituents (NanoAOD v10+)
                "btagDeepFlavB": ["btagDeepFlavB"], "btagDeepFlavCvL": ["btagDeepFlavCvL"], "qgl": ["qgl"],
                "jetId": ["jetId"], "hadronFlavour": ["hadronFlavour"]},
        "ScoutingPFJet": {**_KIN, "mass": ["m"]},  # the HLT jets (calibrated online)
        "ScoutingPFJetRecluster": {**_KIN, "mass": ["mass"]},  # reclustered from scouting PF candidates
    },
    "tracks": {
        "IsoTrack": {**_KIN, "d0": ["dxy"], "z0": ["dz"]},  # dz is already w.r.t. the primary vertex
        # d0 and z0 computed from the reference point, w.r.t. the first scouting primary vertex
        "ScoutingTrack": {**_KIN, "vx": ["vx"], "vy": ["vy"], "vz": ["vz"]},
    },
    "met": {"PFMET": _MET, "MET": _MET, "PuppiMET": _MET, "ScoutingMET": {"pt": ["pt"], "phi": ["phi"]}},
}
MET_DEFINITIONS = {
    "PFMET": "type-1 corrected PF MET (slimmedMETs), as NanoAOD v15 and later name it",
    "MET": "type-1 corrected PF MET (slimmedMETs), as NanoAOD up to v14 names it",
    "PuppiMET": "PUPPI MET (slimmedMETsPuppi), read because the file has no PF MET",
    "ScoutingMET": "HLT scouting PF MET (hltScoutingPFPacker pfMetPt / pfMetPhi); no sumEt is stored",
}
EVENT = {  # per-event values; a vertex collection (scouting) gives its first vertex
    "pvx": ["PV_x", "ScoutingPrimaryVertex_x"], "pvy": ["PV_y", "ScoutingPrimaryVertex_y"],
    "pvz": ["PV_z", "ScoutingPrimaryVertex_z"],
    "mu": ["Pileup_nTrueInt"],  # simulation only
    "weight": ["genWeight"],  # simulation only; real data get weight 1
    "event": ["event"], "run": ["run"], "luminosityBlock": ["luminosityBlock"],
}
SCALE = {"mm": 10.0}  # NanoAOD cm -> schema mm
# PFNano: JetPFCands (one entry per jet-candidate pair of the `Jet` collection) and the PFCands they index
PFNANO_LINKS = {"jet": "JetPFCands_jetIdx", "candidate": "JetPFCands_pFCandsIdx"}
PFCONSTITUENTS = {"pt": "PFCands_pt", "eta": "PFCands_eta", "phi": "PFCands_phi", "charge": "PFCands_charge",
                  "d0": "PFCands_d0", "z0": "PFCands_dz"}  # d0 / dz: optional (NaN), cm


class NanoAODReader(ColumnReader):
    experiment = "cms"

    def __init__(self, tree, kind: str, pt_cuts: dict[str, float], constituents: str = "auto"):
        self.tree, self.kind, self.pt_cuts = tree, kind, pt_cuts
        keys = tree_keys(tree)
        self.columns: dict[tuple[str, str], str] = {}
        self.collections: dict[str, str] = {}  # object -> the collection read
        self.notes: list[str] = []  # collections present but unusable, for the warning
        missing = []
        for obj, collections in COLLECTIONS.items():
            prefix = self._choose(obj, collections, keys)
            if prefix is None:
                missing += [f"common/met/{f}" for f in _MET] if obj == "met" else [f"{obj}: all"]
                continue
            self.collections[obj] = prefix
            for feat, suffixes in collections[prefix].items():
                col = first_present([f"{prefix}_{s}" for s in suffixes], keys, kind)
                if col is not None:
                    self.columns[(obj, feat)] = col
            computed = ("d0", "z0") if prefix == "ScoutingTrack" else ()
            missing += [f"{f.group}/{obj}/{f.name}" for f in features_for(obj, "cms")
                        if not self.has(obj, f.name) and f.name not in computed]
        if not any(obj in self.collections for obj in LIST_OBJECTS):
            tried = ", ".join(p for obj in LIST_OBJECTS for p in COLLECTIONS[obj])
            raise InputError(f"no usable collection (none of {tried})")
        for feat, candidates in EVENT.items():
            col = first_present(candidates, keys, kind)
            if col is not None:
                self.columns[("event", feat)] = col
            elif feat != "weight":
                missing.append(f"{OBJECTS['event'].feature(feat).group}/event/{feat}")
        pfnano = self.collections.get("jets") == "Jet" and all(
            c in keys for c in (*PFNANO_LINKS.values(), *list(PFCONSTITUENTS.values())[:3]))
        self.constituents = jet_constituents.choose(constituents, ("pfnano", "delta_r") if pfnano else ("delta_r",))
        if self.constituents == "pfnano":
            for name, col in {**PFNANO_LINKS, **PFCONSTITUENTS}.items():
                if col in keys:
                    self.columns[("constituent", name)] = col
        absent = {"delta_r": ["charge"], None: [],  # delta_r: tracks carry no charge in NanoAOD
                  "pfnano": [n for n in PFCONSTITUENTS if not self.has("constituent", n)]}[self.constituents]
        missing += [f"common/jet_constituents/{name}" for name in absent]
        self.missing = sorted(missing)
        met = self.collections.get("met")
        read = ", ".join(self.columns[("met", f)] for f in _MET if self.has("met", f))
        self.met_definition = (f"CMS NanoAOD {read}: {MET_DEFINITIONS[met]}" if met
                               else f"none: the file has no MET ({', '.join(MET_DEFINITIONS)}); NaN")

    def _choose(self, obj, collections, keys) -> str | None:
        """The first collection whose kinematic branches (and inputs) all exist."""
        schema = {f.name: f for f in OBJECTS[obj].features}
        for prefix, table in collections.items():
            needed = [feat for feat in table if feat not in schema or not schema[feat].optional]
            absent = [f"{prefix}_{table[feat][0]}" for feat in needed
                      if first_present([f"{prefix}_{s}" for s in table[feat]], keys, self.kind) is None]
            if not absent:
                return prefix
            if len(absent) < len(needed):
                self.notes.append(f"{prefix} lacks {', '.join(absent)}")
        return None

    def convert(self, chunk) -> dict:
        n = len(chunk)
        out: dict = {}
        for obj in LIST_OBJECTS:
            ref = column(chunk, self.columns[(obj, "pt")]) if obj in self.collections else None
            for f in features_for(obj, "cms"):
                out[f"{f.group}/{obj}/{f.name}"] = self._feature(chunk, obj, f.name, ref, n)
        if self.has("taus", "is_1prong"):
            mode = column(chunk, self.columns[("taus", "is_1prong")])
            out["common/taus/is_1prong"] = ak.values_astype((mode >= 0) & (mode <= 2), np.int8)
        if self.columns.get(("photons", "cutBased"), "").endswith("Bitmap"):
            bits = ak.values_astype(column(chunk, self.columns[("photons", "cutBased")]), np.int64)
            out["cms/photons/cutBased"] = (bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1)
        if self.collections.get("tracks") == "ScoutingTrack":
            out["common/tracks/d0"], out["common/tracks/z0"] = self._scouting_impact_parameters(chunk)
        for obj in ("met", "event"):
            for f in features_for(obj, "cms"):
                out[f"{f.group}/{obj}/{f.name}"] = self._feature(chunk, obj, f.name, None, n)
        is_sim = self.has("event", "weight")
        out["common/event/experiment_id"] = np.full(n, EXPERIMENT_ID["cms"], np.int8)
        out["common/event/is_simulation"] = np.full(n, int(is_sim), np.int8)
        if not is_sim:
            out["common/event/weight"] = np.ones(n, np.float32)
        if self.constituents:
            out["jet_constituents"] = (self._pf_constituents(chunk, out) if self.constituents == "pfnano"
                                       else self._track_constituents(out))
        return out

    def _pf_constituents(self, chunk, out) -> dict:
        """PFNano's association: each JetPFCands entry links one jet (its Jet index) to one PF candidate."""
        j_off = physics.flat(out["common/jets/pt"])[0]
        c_off, cand = physics.flat(column(chunk, self.columns[("constituent", "candidate")]))
        jet_local = physics.flat(column(chunk, self.columns[("constituent", "jet")]))[1].astype(np.int64)
        pf = {name: physics.flat(column(chunk, self.columns[("constituent", name)])) for name in PFCONSTITUENTS
              if self.has("constituent", name)}
        p_off = pf["pt"][0]
        event = physics.event_index(c_off)
        cand = cand.astype(np.int64)
        ok = ((jet_local >= 0) & (jet_local < np.diff(j_off)[event]) & (cand >= 0) & (cand < np.diff(p_off)[event]))
        source = p_off[event[ok]] + cand[ok]
        charge = pf["charge"][1][source].astype(np.int8) if "charge" in pf else np.full(len(source), MISSING_INT, np.int8)
        values = {"pt": pf["pt"][1][source], "eta": pf["eta"][1][source], "phi": pf["phi"][1][source], "charge": charge}
        for name in ("d0", "z0"):  # no track for a neutral candidate
            v = pf[name][1][source].astype(np.float64) * SCALE["mm"] if name in pf else np.full(len(source), np.nan)
            values[name] = np.where(charge != 0, v, np.nan)
        return {"jet": j_off[event[ok]] + jet_local[ok], **values}

    def _feature(self, chunk, obj, feat, ref, n):
        f = OBJECTS[obj].feature(feat)
        missing_value = np.nan if f.dtype == "float32" else MISSING_INT
        dtype = np.float64 if f.dtype == "float32" else np.int64
        if not self.has(obj, feat):
            if OBJECTS[obj].per_event:
                return np.full(n, missing_value, dtype)
            if ref is None:  # the object is absent from the file: no objects in any event
                return physics.jagged(np.zeros(n + 1, np.int64), np.zeros(0, dtype))
            return _fill_like(ref, missing_value)
        values = column(chunk, self.columns[(obj, feat)])
        scale = SCALE.get(f.unit, 1.0)
        if OBJECTS[obj].per_event:
            if values.ndim > 1:  # a vertex collection: its first entry
                offsets, flat = physics.flat(values)
                values = physics.pick_per_event(offsets, flat.astype(np.float64), np.zeros(n, np.int64))
            values = ak.to_numpy(values)
            return values.astype(np.float64) * scale if f.dtype == "float32" else values
        if f.dtype == "float32":  # on the flat values: one awkward call per column, not one per operation
            offsets, flat = physics.flat(values)
            values = physics.jagged(offsets, flat.astype(np.float64) * scale)
        return values

    def _scouting_impact_parameters(self, chunk):
        """d0 and z0 (mm) of scouting tracks w.r.t. the event's first scouting primary vertex (the
        origin when there is none), from the track reference point (vx, vy, vz) and direction:
        d0 = -(vx - x) sin(phi) + (vy - y) cos(phi), z0 = (vz - z) - ((vx - x) cos(phi) + (vy - y) sin(phi)) sinh(eta)."""
        off, phi = physics.flat(column(chunk, self.columns[("tracks", "phi")]))
        eta = physics.flat(column(chunk, self.columns[("tracks", "eta")]))[1].astype(np.float64)
        per_track = physics.event_index(off)
        pv = {}
        for axis in "xyz":
            v = self._feature(chunk, "event", f"pv{axis}", None, len(off) - 1) / SCALE["mm"]  # cm
            pv[axis] = np.nan_to_num(v)[per_track]
        dx, dy, dz = (physics.flat(column(chunk, self.columns[("tracks", f"v{a}")]))[1] - pv[a] for a in "xyz")
        phi = phi.astype(np.float64)
        d0 = -dx * np.sin(phi) + dy * np.cos(phi)
        z0 = dz - (dx * np.cos(phi) + dy * np.sin(phi)) * np.sinh(eta)
        return physics.jagged(off, d0 * SCALE["mm"]), physics.jagged(off, z0 * SCALE["mm"])

    def _track_constituents(self, out) -> dict:
        """The delta_r association of the file's tracks (IsoTrack or ScoutingTrack: no charge stored, MISSING_INT)."""
        j_off, j_pt = physics.flat(out["common/jets/pt"])
        t_off = physics.flat(out["common/tracks/pt"])[0]
        pool = {v: physics.flat(out[f"common/tracks/{v}"])[1] for v in ("pt", "eta", "phi", "d0", "z0")}
        jet, source = jet_constituents.from_delta_r(
            j_off, physics.flat(out["common/jets/eta"])[1], physics.flat(out["common/jets/phi"])[1],
            j_pt > self.pt_cuts.get("jets", 0.0), t_off, pool["eta"], pool["phi"])
        return {"jet": jet, **{k: np.asarray(v)[source] for k, v in pool.items()},
                "charge": np.full(len(source), MISSING_INT, np.int8)}
