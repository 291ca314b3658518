"""ATLAS DAOD_PHYSLITE reading: TTree `CollectionTree` (Run 2 / Run 3) and RNTuple `EventData` (Athena 25).

BRANCHES below is the ONE place that says which file branch feeds which schema feature:
candidates in order, the first that exists in the file wins (TRUTH_BRANCHES: the same for the
truth branches the sample plots read). Names are written in the TTree
spelling `<Container>AuxDyn.<var>`; an RNTuple spells them `<Container>AuxDyn:<var>` (derived).
A step0 file (Pythia8 + parametric detector) is read by the same code as a real file.

Units: PHYSLITE stores MeV; features whose schema unit is GeV are divided by 1000, q/p (1/MeV)
multiplied by 1000. Lengths are mm, angles rad, as stored.
"""
from __future__ import annotations

import json
import os

import awkward as ak
import numpy as np
import uproot

from common import jet_constituents, physics
from common.runtime import InputError
from common.schema import (EXPERIMENT_ID, HIT_SUMMARIES, ISO_CONE, ISO_PT_FLOOR_GEV, ISO_Z0SINTHETA_CUT_MM, MISSING_INT,
                           OBJECTS, dataset_path, features_for)

TREES = {"CollectionTree": "ttree", "EventData": "rntuple"}

_E, _MU, _TAU, _PH = "AnalysisElectronsAuxDyn.", "AnalysisMuonsAuxDyn.", "AnalysisTauJetsAuxDyn.", "AnalysisPhotonsAuxDyn."
_JET, _BTAG, _TRK = "AnalysisJetsAuxDyn.", "BTagging_AntiKt4EMPFlowAuxDyn.", "InDetTrackParticlesAuxDyn."
_PV, _EVT, _MET = "PrimaryVerticesAuxDyn.", "EventInfoAuxDyn.", "MET_Core_AnalysisMETAuxDyn."

# ---------------------------------------------------------------------------------------------
# schema feature -> candidate branches (first that exists wins). Features not listed here are
# computed (trk_iso03, is_1prong, n_trk, track pt/eta, met, pv*, weight, is_simulation ...) from INPUTS.
# ---------------------------------------------------------------------------------------------
BRANCHES: dict[str, dict[str, list[str]]] = {
    "electrons": {
        "pt": [_E + "pt"], "eta": [_E + "eta"], "phi": [_E + "phi"], "charge": [_E + "charge"],
        "LHLoose": [_E + "DFCommonElectronsLHLoose"],
        "LHMedium": [_E + "DFCommonElectronsLHMedium"],
        "LHTight": [_E + "DFCommonElectronsLHTight"],
        "topoetcone20": [_E + "topoetcone20"],
        "ptvarcone30": [_E + "ptvarcone30_Nonprompt_All_MaxWeightTTVALooseCone_pt1000",
                        _E + "ptvarcone30_Nonprompt_All_MaxWeightTTVALooseCone_pt500", _E + "ptvarcone30"],
        "mass": [_E + "m"],
    },
    "muons": {
        "pt": [_MU + "pt"], "eta": [_MU + "eta"], "phi": [_MU + "phi"], "charge": [_MU + "charge"],
        "quality": [_MU + "quality"],  # packed bits: quality = bits & 3, passesIDCuts = bits & 8 (xAOD Muon_v1)
        "muonType": [_MU + "muonType"],
        "passIDCuts": [_MU + "DFCommonMuonPassIDCuts"],  # else decoded from the quality bits
        "topoetcone20": [_MU + "topoetcone20"],
        "ptvarcone30": [_MU + "ptvarcone30_Nonprompt_All_MaxWeightTTVA_pt1000",
                        _MU + "ptvarcone30_Nonprompt_All_MaxWeightTTVA_pt500", _MU + "ptvarcone30"],
    },
    "taus": {
        "pt": [_TAU + "pt"], "eta": [_TAU + "eta"], "phi": [_TAU + "phi"], "charge": [_TAU + "charge"],
        "NNDecayMode": [_TAU + "NNDecayMode", _TAU + "PanTau_DecayMode"],
        "RNNJetScore": [_TAU + "RNNJetScore", _TAU + "RNNJetScoreSigTrans"],  # GNTau (Run 3) is another tagger: not substituted
        "RNNEleScore": [_TAU + "RNNEleScore", _TAU + "RNNEleScoreSigTrans_v1", _TAU + "RNNEleScoreSigTrans"],
    },
    "photons": {
        "pt": [_PH + "pt"], "eta": [_PH + "eta"], "phi": [_PH + "phi"],
        "isLoose": [_PH + "DFCommonPhotonsIsEMLoose"], "isTight": [_PH + "DFCommonPhotonsIsEMTight"],
        "author": [_PH + "author"],
        "topoetcone20": [_PH + "topoetcone20"], "topoetcone40": [_PH + "topoetcone40"], "ptcone20": [_PH + "ptcone20"],
    },
    "jets": {
        "pt": [_JET + "pt"], "eta": [_JET + "eta"], "phi": [_JET + "phi"], "mass": [_JET + "m"],
        "n_trk": [_JET + "NumTrkPt500"],  # one count per primary vertex: the hard-scatter PV's entry is taken
        # b-tagging: BTagging container entries reached through AnalysisJetsAuxDyn.btaggingLink
        "DL1d_pb": [_BTAG + "DL1dv01_pb", _BTAG + "DL1dv00_pb"],
        "DL1d_pc": [_BTAG + "DL1dv01_pc", _BTAG + "DL1dv00_pc"],
        "DL1d_pu": [_BTAG + "DL1dv01_pu", _BTAG + "DL1dv00_pu"],
        "GN2_pb": [_BTAG + "GN2v01_pb", _BTAG + "GN2v00_pb"],
        "GN2_pc": [_BTAG + "GN2v01_pc", _BTAG + "GN2v00_pc"],
        "GN2_pu": [_BTAG + "GN2v01_pu", _BTAG + "GN2v00_pu"],
        "QG_nTracks": [_JET + "DFCommonJets_QGTagger_NTracks"],
        "QG_tracksWidth": [_JET + "DFCommonJets_QGTagger_TracksWidth"],
        "QG_tracksC1": [_JET + "DFCommonJets_QGTagger_TracksC1"],
    },
    "tracks": {  # no pt/eta stored: pt = sin(theta)/|q/p|, eta from theta; z0 re-expressed w.r.t. the PV
        "phi": [_TRK + "phi"], "d0": [_TRK + "d0"], "z0": [_TRK + "z0"],
        "qOverP": [_TRK + "qOverP"], "chiSquared": [_TRK + "chiSquared"], "nDoF": [_TRK + "numberDoF"],
        **{f.name: [_TRK + f.name] for f in HIT_SUMMARIES},  # uint8 summary values
    },
    "event": {
        "mu": [_EVT + "averageInteractionsPerCrossing", _EVT + "actualInteractionsPerCrossing"],
        "event_number": [_EVT + "eventNumber"], "run_number": [_EVT + "runNumber"],
        "mcChannelNumber": [_EVT + "mcChannelNumber"],
    },
}

# Truth branches of simulated PHYSLITE (step0 writes them too): never converted, read by the sample
# plots (plotting/plot_sample.py). truthType is MCTruthClassifier's type (2/3 iso/non-iso electron,
# 6/7 muon); HadronConeExclTruthLabelID the jet's hadron label (5 b, 4 c, 0 light).
TRUTH_BRANCHES: dict[str, dict[str, list[str]]] = {
    "electrons": {"truthType": [_E + "truthType"]},
    "muons": {"truthType": [_MU + "truthType"]},
    "jets": {"HadronConeExclTruthLabelID": [_JET + "HadronConeExclTruthLabelID"]},
}

# Inputs that computed features are made from. `required` ones are kinematic: their absence is an error.
INPUTS: dict[str, tuple[list[str], bool]] = {
    "track_theta": ([_TRK + "theta"], True),
    "track_vz": ([_TRK + "vz"], False),  # z of the track reference point; 0 when absent
    "pv_x": ([_PV + "x"], True), "pv_y": ([_PV + "y"], True), "pv_z": ([_PV + "z"], True),
    "pv_type": ([_PV + "vertexType"], True),  # 1 = primary (hard-scatter) vertex
    "jet_btag_link": ([_JET + "btaggingLink"], False),  # ElementLink: real, or uproot-split _m_persKey/_m_persIndex
    # vector<vector<ElementLink>> into InDetTrackParticles, or step0's split spelling: per event the links of all
    # its jets (_m_persKey/_m_persIndex) and per jet their number (_n) (common/physlite_writer.py)
    "jet_ghost_tracks": ([_JET + "GhostTrack"], False),
    "tau_track_links": ([_TAU + "tauTrackLinks"], False),  # ElementLinks into TauTracks
    "tau_track_flags": (["TauTracksAuxDyn.flagSet"], False),  # bit 5 = classifiedCharged
    "met_mpx": ([_MET + "mpx"], True), "met_mpy": ([_MET + "mpy"], True), "met_sumet": ([_MET + "sumet"], True),
    "met_source": ([_MET + "source"], True),  # MissingETBase source bits of each core term
    "mc_weights": ([_EVT + "mcEventWeights"], False),  # nominal = first entry
    "event_type": ([_EVT + "eventTypeBitmask"], False),  # bit 0 = IS_SIMULATION
}

# Optional one-entry TTree with what a real file keeps in AMI/CutBookkeepers (step0 writes it):
#   process (string), dsid (int64), cross_section_pb (float64), sum_weights (float64), ...
METADATA_TREE = "GeneratorMetaData"

TAU_TRACK_CHARGED_BIT = 5  # xAOD::TauJetParameters::classifiedCharged
MUON_QUALITY_MASK, MUON_PASS_ID_BIT = 3, 8
MET_SOFT_BIT, MET_TRACK_BIT = 0x20, 0x4000  # MissingETBase::Source: SoftEvent, Track signal
MET_JET_PT_MIN_GEV, MET_OR_DR = 20.0, 0.2
MET_DEFINITION = (
    "approximate MET: minus the vector sum of the pT of the stored electrons, muons and photons passing the "
    "converter pT cuts and of jets with pT > 20 GeV not within dR < 0.2 of such an electron or photon, plus the "
    "PHYSLITE core track soft term (MET_Core_AnalysisMET term with source bits SoftEvent|Track, PVSoftTrkCore); "
    "sumet = scalar sum of the same objects' pT plus the soft term's sumet. No taus, no calibration, no "
    "full overlap removal: not the METMaker result."
)
ISO_SELF_DR = 0.01  # the charged lepton's own track is the nearest track within this dR

SCALE = {"GeV": 1e-3, "1/GeV": 1e3}  # PHYSLITE MeV -> schema unit
# The b-tag scores (schema kind "score"): BTagging container entries, reached through btaggingLink.
JET_SCORES = tuple(f.name for f in OBJECTS["jets"].features if f.kind == "score" and f.name in BRANCHES["jets"])


# ---------------------------------------------------------------------------------------------
# File access, shared with the NanoAOD reader
# ---------------------------------------------------------------------------------------------
def open_tree(path, trees):
    """(uproot TTree or RNTuple, its name, the open file) of the first of the tree names `trees` that
    `path` holds; InputError (one line) for a missing, non-ROOT or truncated file, one without such a
    tree, or one where that name is something else (a histogram, a folder)."""
    problem = _header_problem(path)
    if problem:
        raise InputError(problem)
    try:
        f = uproot.open(path)
    except FileNotFoundError:
        raise InputError("file not found") from None
    except Exception as exc:  # uproot raises many types for a non-ROOT or truncated file
        raise InputError(f"not a readable ROOT file ({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        classes = {k.split(";")[0]: c for k, c in f.classnames(recursive=False).items()}
    except Exception as exc:
        raise InputError(f"unreadable ROOT directory ({type(exc).__name__}: {_first_line(exc)})") from None
    for name in trees:
        if name in classes:
            if classes[name] != "TTree" and not classes[name].endswith("RNTuple"):
                raise InputError(f"{name} is a {classes[name]}, not a TTree or an RNTuple")
            try:
                return f[name], name, f
            except Exception as exc:
                raise InputError(f"cannot read tree {name} ({type(exc).__name__}: {_first_line(exc)})") from None
    raise InputError(f"no known tree ({', '.join(trees)}) in file")


def _header_problem(path) -> str | None:
    """A local file that is not ROOT, or shorter than the length its header announces (fEND: an
    interrupted copy); None when the header is consistent."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
        size = os.path.getsize(path)
    except OSError:
        return None  # uproot reports it
    if head[:4] != b"root":
        return "not a ROOT file (it does not start with 'root')"
    end = int.from_bytes(head[12:20] if int.from_bytes(head[4:8], "big") > 1000000 else head[12:16], "big")
    if len(head) < 20 or size < end:
        return f"truncated: {size} of the {end} bytes its header announces"
    return None


def tree_kind(tree) -> str:
    return "ttree" if hasattr(tree, "branches") else "rntuple"


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def tree_keys(tree) -> set[str]:
    """Column names: every TTree branch (split subbranches included); an RNTuple's top-level fields
    (listing its subfields recursively costs seconds in uproot 5.7; links are read as whole records)."""
    return set(tree.keys(recursive=True)) if hasattr(tree, "branches") else set(tree.keys(recursive=False))


def spelled(name: str, kind: str) -> str:
    """File spelling of a TTree-style branch name."""
    return name.replace(".", ":", 1) if kind == "rntuple" else name


def first_present(candidates: list[str], keys: set[str], kind: str) -> str | None:
    for c in candidates:
        if spelled(c, kind) in keys:
            return spelled(c, kind)
    return None


def link_columns(base: str, keys: set[str], kind: str) -> tuple[str | None, str | None]:
    """(key column, index column) of an ElementLink branch as this file stores it:
    real TTree split `B/B.m_persIndex`, uproot-written split `B_m_persIndex`, or a branch / RNTuple
    field `B` read whole as records {m_persKey, m_persIndex}."""
    b = spelled(base, kind)
    for key_col, idx_col in ((f"{b}/{b}.m_persKey", f"{b}/{b}.m_persIndex"), (f"{b}_m_persKey", f"{b}_m_persIndex")):
        if idx_col in keys:
            return (key_col if key_col in keys else None), idx_col
    return (None, b) if b in keys else (None, None)


def link_index(index_array, key_array=None):
    """Index part of an ElementLink column (records or plain ints); -1 where the link is invalid (key 0)."""
    idx = _member(index_array, "m_persIndex")
    if key_array is None:  # records carry their key; a plain split index column has none
        key = _member(index_array, "m_persKey")
    else:  # a split key column (B/B.m_persKey, B_m_persKey) or records
        key = _member(key_array, "m_persKey") if ak.fields(key_array) else key_array
    idx = ak.values_astype(idx, np.int64)
    return idx if key is None else ak.where(key != 0, idx, -1)


def column(chunk, name: str):
    """A read column of a chunk, by its file name."""
    return chunk[name]


def _member(array, suffix):
    if array is None:
        return None
    fields = ak.fields(array)
    if not fields:
        return array if suffix == "m_persIndex" else None
    match = [f for f in fields if f.endswith(suffix)]
    return array[match[0]] if match else None


def read_generator_metadata(f) -> dict:
    """The one entry of the optional METADATA_TREE as {branch: value} ({} when the file has none):
    process, dsid, cross_section_pb, sum_weights, and what step0 adds (common/physlite_writer.py),
    its provenance decoded from JSON."""
    if METADATA_TREE not in {k.split(";")[0] for k in f.keys(recursive=False)}:
        return {}
    scalar = lambda v: v.decode() if isinstance(v, bytes) else (v.item() if hasattr(v, "item") else v)  # noqa: E731
    out = {k: scalar(v[0]) for k, v in f[METADATA_TREE].arrays(library="np", entry_stop=1).items() if len(v)}
    if isinstance(out.get("provenance"), str):
        out["provenance"] = json.loads(out["provenance"])
    return out


# ---------------------------------------------------------------------------------------------
# The plan for one file: which columns to read, what is missing
# ---------------------------------------------------------------------------------------------
class ColumnReader:
    """What every input format's reader shares: `columns` maps (object, feature) to the branch
    or field read for it, and only those columns are read, chunk by chunk."""

    tree = None
    columns: dict[tuple[str, str], str]
    met_definition: str  # what common/met is, for /metadata
    notes: tuple[str, ...] = ()  # collections present but not usable, for the warning
    constituents: str | None = None  # the jet-constituent source used (jet_constituents.MODES), None: none
    links_seen = (0, 0)  # element links read, valid (the links source)

    def has(self, obj, feat) -> bool:
        return (obj, feat) in self.columns

    def sources(self) -> dict[str, str]:
        """What each feature/input was read from (recorded in /metadata)."""
        return {"/".join(k): v for k, v in self.columns.items()}

    @property
    def n_events(self) -> int:
        return int(self.tree.num_entries)

    def chunks(self, step: int):
        """Raw chunks of `step` events: only the columns this file needs."""
        columns = sorted(set(self.columns.values()))
        if tree_kind(self.tree) == "ttree":
            return self.tree.iterate(columns, step_size=step, library="ak")
        return self._rntuple_chunks(columns, step)

    def _rntuple_chunks(self, columns, step):
        """One read per field: uproot 5.7 builds a several-field RNTuple read by listing every field
        of the file, in time quadratic in their number (15 s for a 1500-field NanoAOD)."""
        fields = {c: self.tree[c] for c in columns}
        for start in range(0, self.n_events, step):
            stop = min(start + step, self.n_events)
            yield ak.zip({c: f.array(entry_start=start, entry_stop=stop) for c, f in fields.items()}, depth_limit=1)


class PhysliteReader(ColumnReader):
    experiment = "atlas"
    met_definition = MET_DEFINITION

    def __init__(self, tree, kind: str, pt_cuts: dict[str, float], constituents: str = "auto"):
        self.tree, self.kind, self.pt_cuts = tree, kind, pt_cuts
        keys = tree_keys(tree)
        self.columns: dict[tuple[str, str], str] = {}  # (obj, feature or input) -> file column
        self.missing: list[str] = []  # dataset paths NaN/MISSING_INT-filled
        for obj, table in BRANCHES.items():
            for feat, candidates in table.items():
                col = first_present(candidates, keys, self.kind)
                if col is not None:
                    self.columns[(obj, feat)] = col
                elif not OBJECTS[obj].feature(feat).optional and obj != "event":  # mu may be absent
                    raise InputError(f"missing kinematic branch {spelled(candidates[0], kind)}")
        for name, (candidates, required) in INPUTS.items():
            if name in ("jet_btag_link", "tau_track_links", "jet_ghost_tracks"):
                key_col, idx_col = link_columns(candidates[0], keys, kind)
                if idx_col:
                    self.columns[("link", name)] = idx_col
                    if key_col:
                        self.columns[("link_key", name)] = key_col
                continue
            col = first_present(candidates, keys, self.kind)
            if col is not None:
                self.columns[("input", name)] = col
            elif required:
                raise InputError(f"missing kinematic branch {spelled(candidates[0], kind)}")
        if ("tracks", "qOverP") not in self.columns:
            raise InputError(f"missing kinematic branch {spelled(_TRK + 'qOverP', kind)}")
        self._ghost_track_counts(keys)
        self.constituents = jet_constituents.choose(
            constituents, ("links", "delta_r") if self.has("link", "jet_ghost_tracks") else ("delta_r",))
        self.links_seen = [0, 0]  # GhostTrack links read, valid
        self.missing = self._missing_features()

    def _ghost_track_counts(self, keys) -> None:
        """step0's split GhostTrack (links per event) needs its per-jet counts; without them it is unusable."""
        index_col = self.columns.get(("link", "jet_ghost_tracks"), "")
        if index_col.endswith("_m_persIndex"):
            counts = index_col.removesuffix("_m_persIndex") + "_n"
            if counts in keys:
                self.columns[("input", "jet_ghost_track_counts")] = counts
            else:
                del self.columns[("link", "jet_ghost_tracks")]
                self.columns.pop(("link_key", "jet_ghost_tracks"), None)

    def _missing_features(self) -> list[str]:
        missing = []
        for obj, table in BRANCHES.items():
            for feat in table:
                if not self.has(obj, feat) and not (obj == "muons" and feat == "passIDCuts" and self.has("muons", "quality")):
                    missing.append(dataset_path(obj, OBJECTS[obj].feature(feat)))
        btag_ok = self.has("link", "jet_btag_link")
        if not btag_ok:  # scores exist but cannot be matched to jets
            missing += [dataset_path("jets", OBJECTS["jets"].feature(f)) for f in JET_SCORES if self.has("jets", f)]
        if not (self.has("link", "tau_track_links") and self.has("input", "tau_track_flags")) and not self.has("taus", "NNDecayMode"):
            missing.append("common/taus/is_1prong")
        if not self.has("input", "mc_weights") and not self.has("input", "event_type"):
            missing.append("common/event/weight")
        if self.constituents:  # constituents are tracks: the same summary values are absent
            missing += [dataset_path("jet_constituents", f) for f in HIT_SUMMARIES if not self.has("tracks", f.name)]
        return sorted(set(missing))

    # -----------------------------------------------------------------------------------------
    def convert(self, chunk) -> dict:
        """{dataset path: jagged awkward (list objects) or numpy (per event)} in schema units.
        Each column is taken once as a flat numpy view (physics.flat); the maths runs on those."""
        col = lambda o, f: column(chunk, self.columns[(o, f)])  # noqa: E731
        n = len(chunk)
        out: dict = {}

        # primary vertex: the first vertexType 1 of each event
        pv_off, pv_type = physics.flat(col("input", "pv_type"))
        pv_index = physics.first_index_where(pv_off, pv_type == 1)
        pv = {a: physics.pick_per_event(pv_off, physics.flat(col("input", f"pv_{a}"))[1], pv_index) for a in "xyz"}
        out.update({"common/event/pvx": pv["x"], "common/event/pvy": pv["y"], "common/event/pvz": pv["z"]})

        # tracks: pt and eta from the perigee parameters, z0 w.r.t. the primary vertex (no PV: w.r.t. z = 0)
        t_off, theta = physics.flat(col("input", "track_theta"))
        qop, z0 = physics.flat(col("tracks", "qOverP"))[1], physics.flat(col("tracks", "z0"))[1]
        vz = physics.flat(col("input", "track_vz"))[1] if self.has("input", "track_vz") else 0.0
        trk = {"pt": physics.track_pt_from_qoverp(qop, theta) * 1e-3, "eta": physics.eta_from_theta(theta),
               "z0": z0 + vz - np.nan_to_num(pv["z"])[physics.event_index(t_off)]}
        for feat, value in trk.items():
            out[f"common/tracks/{feat}"] = physics.jagged(t_off, value)
        out["common/tracks/phi"], out["common/tracks/d0"] = col("tracks", "phi"), col("tracks", "d0")
        for feat in BRANCHES["tracks"]:
            if feat not in ("phi", "d0", "z0"):
                out[f"atlas/tracks/{feat}"] = self._feature(chunk, "tracks", feat, t_off)

        # plain features of every object (units from the schema)
        offsets = {obj: physics.flat(col(obj, "pt"))[0] for obj in ("electrons", "muons", "taus", "photons", "jets")}
        for obj, off in offsets.items():
            for feat in BRANCHES[obj]:
                if feat == "n_trk" or feat in JET_SCORES:
                    continue
                out[dataset_path(obj, OBJECTS[obj].feature(feat))] = self._feature(chunk, obj, feat, off)

        # muon quality bits
        if self.has("muons", "quality"):
            bits = physics.flat(col("muons", "quality"))[1].astype(np.int64)
            out["atlas/muons/quality"] = physics.jagged(offsets["muons"], bits & MUON_QUALITY_MASK)
            if not self.has("muons", "passIDCuts"):
                out["atlas/muons/passIDCuts"] = physics.jagged(offsets["muons"], ((bits & MUON_PASS_ID_BIT) > 0).astype(np.int64))

        # jets: track count at the hard-scatter PV, b-tag scores through btaggingLink
        j_off = offsets["jets"]
        out["common/jets/n_trk"] = self._ntrk_at_pv(chunk, pv_index, col("jets", "pt"), j_off)
        link = None
        if self.has("link", "jet_btag_link"):
            link = physics.flat(link_index(col("link", "jet_btag_link"),
                                           col("link_key", "jet_btag_link") if self.has("link_key", "jet_btag_link") else None))[1]
        for feat in JET_SCORES:
            scores = np.full(j_off[-1], np.nan, np.float32)
            if link is not None and self.has("jets", feat):
                b_off, values = physics.flat(col("jets", feat))
                source, ok = physics.gather_index(b_off, j_off, link)
                scores[ok] = values[source[ok]].astype(np.float32)
            out[dataset_path("jets", OBJECTS["jets"].feature(feat))] = physics.jagged(j_off, scores)

        out["common/taus/is_1prong"] = self._is_1prong(chunk, offsets["taus"])

        # track isolation of electrons, muons, photons (their own track removed for the charged leptons)
        for obj, self_dr in (("electrons", ISO_SELF_DR), ("muons", ISO_SELF_DR), ("photons", 0.0)):
            out[f"common/{obj}/trk_iso03"] = physics.track_isolation(
                out[f"common/{obj}/eta"], out[f"common/{obj}/phi"], out[f"common/{obj}/pt"],
                out["common/tracks/eta"], out["common/tracks/phi"], out["common/tracks/pt"], out["common/tracks/z0"],
                physics.jagged(t_off, theta), ISO_CONE, ISO_PT_FLOOR_GEV, ISO_Z0SINTHETA_CUT_MM, self_dr=self_dr)

        out.update(self._met(chunk, out, n))
        out.update(self._event(chunk, n))
        if self.constituents:
            out["jet_constituents"] = self._constituents(chunk, out, j_off, t_off, qop)
        return out

    def _constituents(self, chunk, out, j_off, t_off, qop) -> dict:
        """The constituent table (common/jet_constituents.py) of a chunk: every track of the file (before
        the converter's track cut) that a jet's GhostTrack links point to, or that lies nearest its axis."""
        pool = {f.name: physics.flat(out[dataset_path("tracks", OBJECTS["tracks"].feature(f.name))])[1]
                for f in features_for("jet_constituents", "atlas") if f.name != "charge"}
        pool["charge"] = np.sign(qop).astype(np.int8)
        if self.constituents == "links":
            jet, source, total, valid = jet_constituents.from_links(j_off, *self._ghost_links(chunk), t_off)
            self.links_seen[0] += total
            self.links_seen[1] += valid
        else:
            jets = {v: physics.flat(out[f"common/jets/{v}"])[1] for v in ("pt", "eta", "phi")}
            keep = jets["pt"] > self.pt_cuts.get("jets", 0.0)
            jet, source = jet_constituents.from_delta_r(j_off, jets["eta"], jets["phi"], keep, t_off, pool["eta"], pool["phi"])
        return {"jet": jet, **{k: np.asarray(v)[source] for k, v in pool.items()}}

    def _ghost_links(self, chunk):
        """(links per jet, each link's track index or -1), flat over the chunk's jets."""
        col = lambda name: column(chunk, self.columns[name])  # noqa: E731
        key = col(("link_key", "jet_ghost_tracks")) if self.has("link_key", "jet_ghost_tracks") else None
        index = link_index(col(("link", "jet_ghost_tracks")), key)
        if self.has("input", "jet_ghost_track_counts"):  # step0: links per event, counts per jet
            counts = physics.flat(col(("input", "jet_ghost_track_counts")))[1]
        else:  # (events, jets, links)
            counts = ak.to_numpy(ak.flatten(ak.num(index, axis=2), axis=None))
        if len(counts) != len(physics.flat(column(chunk, self.columns[("jets", "pt")]))[1]):
            raise InputError("GhostTrack links do not line up with the jets")
        return counts.astype(np.int64), ak.to_numpy(ak.flatten(index, axis=None))

    def _feature(self, chunk, obj, feat, offsets):
        """A jagged feature in schema units (float64 before the final cast), or the missing value."""
        f = OBJECTS[obj].feature(feat)
        if not self.has(obj, feat):
            missing = np.nan if f.dtype == "float32" else MISSING_INT
            return physics.jagged(offsets, np.full(offsets[-1], missing, np.float64 if f.dtype == "float32" else np.int64))
        values = column(chunk, self.columns[(obj, feat)])
        if f.dtype == "float32":
            off, flat = physics.flat(values)
            values = physics.jagged(off, flat.astype(np.float64) * SCALE.get(f.unit, 1.0))
        return values

    def _ntrk_at_pv(self, chunk, pv_index, jets_pt, j_off):
        if not self.has("jets", "n_trk"):
            return physics.jagged(j_off, np.full(j_off[-1], np.nan))
        per_vertex = column(chunk, self.columns[("jets", "n_trk")])  # (events, jets, vertices)
        if per_vertex.ndim == 2:  # one count per jet (a writer that cannot store vector<vector<int>>)
            off, counts = physics.flat(per_vertex)
            return physics.jagged(off, counts.astype(np.float64))
        pv = ak.Array(pv_index) + ak.zeros_like(jets_pt, dtype=np.int64)  # broadcast per jet
        ok = (pv >= 0) & (pv < ak.num(per_vertex, axis=2))
        picked = ak.firsts(per_vertex[ak.local_index(per_vertex, axis=2) == pv], axis=2)
        return ak.fill_none(ak.where(ok, ak.values_astype(picked, np.float64), np.nan), np.nan)

    def _is_1prong(self, chunk, tau_off):
        """Number of tau tracks classified as charged == 1; else from the decay mode (0-2: one prong)."""
        if self.has("link", "tau_track_links") and self.has("input", "tau_track_flags"):
            links = link_index(column(chunk, self.columns[("link", "tau_track_links")]),
                               column(chunk, self.columns[("link_key", "tau_track_links")])
                               if self.has("link_key", "tau_track_links") else None)
            flags = ak.values_astype(column(chunk, self.columns[("input", "tau_track_flags")]), np.int64)
            n_links = ak.num(links, axis=2)
            flat = ak.flatten(links, axis=2)  # (events, all links of the event's taus)
            charged = ak.fill_none((physics.gather(flags, flat) >> TAU_TRACK_CHARGED_BIT) & 1, 0)
            n_charged = ak.sum(ak.unflatten(charged, ak.flatten(n_links), axis=1), axis=2)
            return ak.values_astype(n_charged == 1, np.int8)
        if self.has("taus", "NNDecayMode"):
            mode = physics.flat(column(chunk, self.columns[("taus", "NNDecayMode")]))[1]
            return physics.jagged(tau_off, ((mode >= 0) & (mode <= 2)).astype(np.int8))
        return physics.jagged(tau_off, np.full(tau_off[-1], MISSING_INT, np.int64))

    def _met(self, chunk, out, n) -> dict:
        """The approximation of MET_DEFINITION."""
        px, py, sumet = np.zeros(n), np.zeros(n), np.zeros(n)
        obj = {o: {"off": physics.flat(out[f"common/{o}/pt"])[0],
                   **{v: physics.flat(out[f"common/{o}/{v}"])[1] for v in ("pt", "eta", "phi")}}
               for o in ("electrons", "muons", "photons", "jets")}
        keep = {o: obj[o]["pt"] > self.pt_cuts.get(o, 0.0) for o in ("electrons", "muons", "photons")}
        jets = obj["jets"]
        jets_ok = jets["pt"] > MET_JET_PT_MIN_GEV
        for o in ("electrons", "photons"):
            sel = keep[o]
            jets_ok &= ~physics.overlaps(jets["off"], jets["eta"], jets["phi"], physics.selected_offsets(obj[o]["off"], sel),
                                         obj[o]["eta"][sel], obj[o]["phi"][sel], MET_OR_DR)
        for o, sel in (*keep.items(), ("jets", jets_ok)):
            pt, phi = np.asarray(obj[o]["pt"], np.float64), obj[o]["phi"]
            px = px - physics.per_event_sum(obj[o]["off"], pt * np.cos(phi), sel)
            py = py - physics.per_event_sum(obj[o]["off"], pt * np.sin(phi), sel)
            sumet += physics.per_event_sum(obj[o]["off"], pt, sel)
        m_off, source = physics.flat(column(chunk, self.columns[("input", "met_source")]))
        source = source.astype(np.int64)
        soft = ((source & MET_SOFT_BIT) > 0) & ((source & MET_TRACK_BIT) > 0)
        term = {name: physics.per_event_sum(m_off, physics.flat(column(chunk, self.columns[("input", name)]))[1], soft) * 1e-3
                for name in ("met_mpx", "met_mpy", "met_sumet")}
        px, py, sumet = px + term["met_mpx"], py + term["met_mpy"], sumet + term["met_sumet"]
        return {"common/met/pt": np.hypot(px, py).astype(np.float32), "common/met/phi": np.arctan2(py, px).astype(np.float32),
                "common/met/sumet": sumet.astype(np.float32)}

    def _event(self, chunk, n) -> dict:
        col = lambda o, f: column(chunk, self.columns[(o, f)])  # noqa: E731
        out = {"common/event/experiment_id": np.full(n, EXPERIMENT_ID["atlas"], np.int8)}
        if self.has("input", "event_type"):
            is_sim = (ak.to_numpy(col("input", "event_type")).astype(np.int64) & 1).astype(np.int8)
        elif self.has("event", "mcChannelNumber"):
            is_sim = (ak.to_numpy(col("event", "mcChannelNumber")) > 0).astype(np.int8)
        else:
            is_sim = np.full(n, MISSING_INT, np.int8)
        out["common/event/is_simulation"] = is_sim
        if self.has("input", "mc_weights"):  # nominal = first entry
            w_off, weights = physics.flat(col("input", "mc_weights"))
            weight = physics.pick_per_event(w_off, weights, np.zeros(n, np.int64))
        else:
            weight = np.where(is_sim == 0, 1.0, np.nan)  # real data: unit weight
        out["common/event/weight"] = weight.astype(np.float32)
        out["common/event/mu"] = (ak.to_numpy(col("event", "mu")).astype(np.float32) if self.has("event", "mu")
                                  else np.full(n, np.nan, np.float32))
        for feat in ("event_number", "run_number", "mcChannelNumber"):
            out[f"atlas/event/{feat}"] = (ak.to_numpy(col("event", feat)).astype(np.int64) if self.has("event", feat)
                                          else np.full(n, MISSING_INT, np.int64))
        return out


def _fill_like(like, value):
    """A jagged array shaped like `like`, every entry `value` (NaN or MISSING_INT)."""
    dtype = np.float64 if isinstance(value, float) else np.int64
    return ak.full_like(like, value, dtype=dtype)
