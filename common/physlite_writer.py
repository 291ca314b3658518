"""Writing the detector's objects as a PHYSLITE-like ROOT file with uproot.

TTree `CollectionTree` with the real DAOD_PHYSLITE branch names `<Container>AuxDyn.<var>`
and units (MeV, mm, rad; q/p in 1/MeV), so step1 reads it through the same code path as a
real file (common/physlite.py BRANCHES). uproot adds one counter branch per container
(`nAnalysisJetsAuxDyn`, ...); real files have none, readers ignore them.

Departures from a real file, forced by what uproot can write:
- ElementLinks are written as two split integer branches (a real file has `B/B.m_persKey`):
  `AnalysisJetsAuxDyn.btaggingLink_m_persKey` / `_m_persIndex` (the converter accepts this spelling);
  the BTagging container is aligned with the jets (m_persIndex = jet index).
- `AnalysisJetsAuxDyn.GhostTrack` (vector<vector<ElementLink>> in a real file) is split the same way,
  one level flatter: `AnalysisJetsAuxDyn.GhostTrack_m_persKey` / `_m_persIndex` hold, per event, the
  links of all its jets in jet order (key detector.TRACK_PERS_KEY, index into the event's
  InDetTrackParticles), and `AnalysisJetsAuxDyn.GhostTrack_n` (in the jet record) how many belong to
  each jet (the converter accepts both spellings).
- `AnalysisJetsAuxDyn.NumTrkPt500` (vector<vector<int>>, one count per vertex) cannot be
  written: it holds the hard-scatter vertex's count only, one int per jet (the converter
  accepts both shapes).
- MET_Core_AnalysisMETAuxDyn has no `name` branch (vector<string>); the terms are
  identified, as in a real file, by their `source` bits (SOFT_CLUS_SOURCE, SOFT_TRACK_SOURCE).
Extra truth branches that real PHYSLITE also carries: truthType (2/3 Iso/NonIsoElectron,
6/7 muon, 14/15 photon), HadronConeExclTruthLabelID, IsTruthMatched (taus).
"""
from __future__ import annotations

import awkward as ak
import numpy as np
import uproot

from common import detector as det
from common.physlite import METADATA_TREE
from common.schema import HIT_SUMMARIES

TREE = "CollectionTree"
# The generator metadata (physlite.METADATA_TREE, read by physlite.read_generator_metadata): a
# one-entry TTree with branches process (string), dsid (int64), cross_section_pb (float64),
# sum_weights (float64), plus n_events, sum_weights_squared, cross_section_error_pb, description,
# ecm_gev, generator and provenance (a JSON string: script, settings, git hash).
MEV = 1000.0
RUN_NUMBER = 410000  # mc23a-like MC run number
SOFT_CLUS_SOURCE, SOFT_TRACK_SOURCE = 69664, 81952  # MissingETBase source bits of SoftClusCore, PVSoftTrkCore
TRUTH_TYPE = {"electrons": (2, 3), "muons": (6, 7), "photons": (14, 15)}  # (prompt, non-prompt)
VERTEX_PRIMARY, VERTEX_PILEUP, VERTEX_DUMMY = 1, 3, 0
HIT_SUMMARY_NAMES = tuple(f.name for f in HIT_SUMMARIES)  # uint8 InDetTrackParticlesAuxDyn branches, real names


def _jagged(table: dict, n_events: int, columns: dict) -> ak.Array:
    """A record of jagged columns (one list per event) from a flat per-object table."""
    counts = np.bincount(table["event"], minlength=n_events)
    return ak.zip({name: ak.unflatten(np.asarray(values), counts) for name, values in columns.items()})


def _f32(x):
    return np.asarray(x, np.float32)


def _wp(score, thresholds):
    """Nested working points: one int8 flag per threshold (loosest first)."""
    return [(score > t).astype(np.int8) for t in thresholds]


def containers(reco: dict, weights: np.ndarray, first_event_number: int, dsid: int) -> dict:
    """The branch dict of one chunk: {container record or branch name: array}."""
    n = reco["n_events"]
    el, mu, ph, tau, jet, trk = (reco[k] for k in ("electrons", "muons", "photons", "taus", "jets", "tracks"))
    out = {}

    loose, medium, tight = _wp(el["id_score"], det.ID_THRESHOLDS)
    out["AnalysisElectronsAuxDyn"] = _jagged(el, n, {
        "pt": _f32(el["pt"] * MEV), "eta": _f32(el["eta"]), "phi": _f32(el["phi"]), "m": _f32(el["m"] * MEV),
        "charge": _f32(el["charge"]),
        "DFCommonElectronsLHLoose": loose, "DFCommonElectronsLHMedium": medium, "DFCommonElectronsLHTight": tight,
        "topoetcone20": _f32(el["topoetcone20"] * MEV), "topoetcone40": _f32(el["topoetcone40"] * MEV),
        "ptcone20_Nonprompt_All_MaxWeightTTVALooseCone_pt1000": _f32(el["ptcone20"] * MEV),
        "ptvarcone30_Nonprompt_All_MaxWeightTTVALooseCone_pt1000": _f32(el["ptvarcone30"] * MEV),
        "author": el["author"], "truthType": np.where(el["prompt"], *TRUTH_TYPE["electrons"]).astype(np.int32),
    })

    very_loose = (mu["id_score"] > det.MUON_VERYLOOSE_THRESHOLD)
    m_loose, m_medium, m_tight = _wp(mu["id_score"], det.ID_THRESHOLDS)
    # xAOD::Muon quality enum 0 Tight .. 3 VeryLoose in bits 0-1; passesIDCuts in bit 3 (value 8)
    quality = np.where(m_tight == 1, 0, np.where(m_medium == 1, 1, np.where(m_loose == 1, 2, 3)))
    pass_id = (very_loose & (mu["muonType"] != 1)).astype(np.int8)
    out["AnalysisMuonsAuxDyn"] = _jagged(mu, n, {
        "pt": _f32(mu["pt"] * MEV), "eta": _f32(mu["eta"]), "phi": _f32(mu["phi"]), "charge": _f32(mu["charge"]),
        "quality": (quality | (pass_id.astype(np.int64) << 3)).astype(np.uint8),
        "muonType": mu["muonType"], "DFCommonMuonPassIDCuts": pass_id,
        "topoetcone20": _f32(mu["topoetcone20"] * MEV), "topoetcone40": _f32(mu["topoetcone40"] * MEV),
        "ptcone20": _f32(mu["ptcone20"] * MEV), "ptvarcone30": _f32(mu["ptvarcone30"] * MEV),
        "ptvarcone30_Nonprompt_All_MaxWeightTTVA_pt1000": _f32(mu["ptvarcone30"] * MEV),
        "truthType": np.where(mu["prompt"], *TRUTH_TYPE["muons"]).astype(np.int32),
    })

    p_loose, p_tight = _wp(ph["id_score"], (det.ID_THRESHOLDS[0], det.ID_THRESHOLDS[2]))
    out["AnalysisPhotonsAuxDyn"] = _jagged(ph, n, {
        "pt": _f32(ph["pt"] * MEV), "eta": _f32(ph["eta"]), "phi": _f32(ph["phi"]), "m": _f32(ph["m"]),
        "DFCommonPhotonsIsEMLoose": p_loose, "DFCommonPhotonsIsEMTight": p_tight, "author": ph["author"],
        "topoetcone20": _f32(ph["topoetcone20"] * MEV), "topoetcone40": _f32(ph["topoetcone40"] * MEV),
        "ptcone20": _f32(ph["ptcone20"] * MEV),
        "truthType": np.where(ph["prompt"], *TRUTH_TYPE["photons"]).astype(np.int32),
    })

    out["AnalysisTauJetsAuxDyn"] = _jagged(tau, n, {
        "pt": _f32(tau["pt"] * MEV), "eta": _f32(tau["eta"]), "phi": _f32(tau["phi"]), "m": _f32(tau["m"] * MEV),
        "charge": _f32(tau["charge"]), "NNDecayMode": tau["NNDecayMode"].astype(np.int32),
        "RNNJetScore": _f32(tau["RNNJetScore"]), "RNNEleScore": _f32(tau["RNNEleScore"]),
        "IsTruthMatched": tau["truth_tau"].astype(np.int8),
    })

    jet_counts = np.bincount(jet["event"], minlength=n)
    jet_index = np.arange(len(jet["event"])) - np.repeat(np.cumsum(jet_counts) - jet_counts, jet_counts)
    out["AnalysisJetsAuxDyn"] = _jagged(jet, n, {
        "pt": _f32(jet["pt"] * MEV), "eta": _f32(jet["eta"]), "phi": _f32(jet["phi"]), "m": _f32(jet["m"] * MEV),
        "NumTrkPt500": jet["QG_nTracks"].astype(np.int32),  # tracks > 500 MeV from the hard-scatter vertex
        "DFCommonJets_QGTagger_NTracks": jet["QG_nTracks"].astype(np.int32),
        "DFCommonJets_QGTagger_TracksWidth": _f32(jet["QG_tracksWidth"]),
        "DFCommonJets_QGTagger_TracksC1": _f32(jet["QG_tracksC1"]),
        "HadronConeExclTruthLabelID": jet["label"].astype(np.int32),
        "btaggingLink_m_persKey": np.full(len(jet_index), det.BTAG_PERS_KEY, np.uint32),
        "btaggingLink_m_persIndex": jet_index.astype(np.uint32),
        "GhostTrack_n": np.bincount(trk["ghost_jet"][trk["ghost_jet"] >= 0], minlength=len(jet_index)).astype(np.uint32),
    })
    out.update(_ghost_track_links(trk, jet["event"], n))
    out["BTagging_AntiKt4EMPFlowAuxDyn"] = _jagged(jet, n, {
        f"{name}_{s}": _f32(jet[f"{tagger}_{s}"])
        for tagger, name in (("DL1d", "DL1dv01"), ("GN2", "GN2v01")) for s in ("pb", "pc", "pu")})

    out["InDetTrackParticlesAuxDyn"] = _jagged(trk, n, {
        "phi": _f32(trk["phi"]), "theta": _f32(trk["theta"]), "qOverP": _f32(trk["qOverP"] / MEV),
        "d0": _f32(trk["d0"]), "z0": _f32(trk["z0"]), "vz": np.zeros(len(trk["pt"]), np.float32),
        "chiSquared": _f32(trk["chiSquared"]), "numberDoF": _f32(trk["numberDoF"]),
        **{name: trk[name] for name in HIT_SUMMARY_NAMES},
    })

    out["PrimaryVerticesAuxDyn"] = _vertices(reco["event"], n)

    met = reco["met"]
    terms = lambda a, b: ak.from_regular(np.stack([a, b], axis=1))  # noqa: E731  (SoftClusCore, PVSoftTrkCore)
    out["MET_Core_AnalysisMETAuxDyn"] = ak.zip({
        "mpx": terms(_f32(met["soft_mpx"] * MEV), _f32(met["trk_mpx"] * MEV)),
        "mpy": terms(_f32(met["soft_mpy"] * MEV), _f32(met["trk_mpy"] * MEV)),
        "sumet": terms(_f32(met["soft_sumet"] * MEV), _f32(met["trk_sumet"] * MEV)),
        "source": terms(np.full(n, SOFT_CLUS_SOURCE, np.uint64), np.full(n, SOFT_TRACK_SOURCE, np.uint64)),
    })

    ev = reco["event"]
    out["EventInfoAuxDyn.eventNumber"] = np.arange(first_event_number, first_event_number + n, dtype=np.uint64)
    out["EventInfoAuxDyn.runNumber"] = np.full(n, RUN_NUMBER, np.uint32)
    out["EventInfoAuxDyn.mcChannelNumber"] = np.full(n, dsid, np.uint32)
    out["EventInfoAuxDyn.eventTypeBitmask"] = np.full(n, 1, np.uint32)  # IS_SIMULATION
    out["EventInfoAuxDyn.averageInteractionsPerCrossing"] = _f32(ev["mu"])
    out["EventInfoAuxDyn.actualInteractionsPerCrossing"] = _f32(ev["actual_mu"])
    out["EventInfoAuxDyn.mcEventWeights"] = ak.values_astype(weights, np.float32)
    return out


def _ghost_track_links(trk: dict, jet_event: np.ndarray, n: int) -> dict:
    """The split GhostTrack links: per event, each jet's tracks in jet order (then track order)."""
    counts = np.bincount(trk["event"], minlength=n)
    local = np.arange(len(trk["event"])) - np.repeat(np.cumsum(counts) - counts, counts)  # index within the event
    linked = np.flatnonzero(trk["ghost_jet"] >= 0)
    linked = linked[np.lexsort((local[linked], trk["ghost_jet"][linked]))]
    per_event = np.bincount(jet_event[trk["ghost_jet"][linked]], minlength=n)
    keys = np.full(len(linked), det.TRACK_PERS_KEY, np.uint32)
    return {"AnalysisJetsAuxDyn.GhostTrack_m_persKey": ak.unflatten(keys, per_event),
            "AnalysisJetsAuxDyn.GhostTrack_m_persIndex": ak.unflatten(local[linked].astype(np.uint32), per_event)}


def _vertices(ev: dict, n: int) -> ak.Array:
    """Hard-scatter vertex first (type 1), reconstructed pile-up vertices (type 3), a dummy (type 0)."""
    pu = ev["pu_reco"]
    event = np.concatenate([np.arange(n), pu["event"], np.arange(n)])
    kind = np.concatenate([np.full(n, VERTEX_PRIMARY), np.full(len(pu["event"]), VERTEX_PILEUP), np.full(n, VERTEX_DUMMY)])
    x = np.concatenate([ev["pvx"], np.zeros(len(pu["event"])), np.zeros(n)])
    y = np.concatenate([ev["pvy"], np.zeros(len(pu["event"])), np.zeros(n)])
    z = np.concatenate([ev["pvz"], pu["z"], np.zeros(n)])
    order = np.argsort(event, kind="stable")
    table = {"event": event[order]}
    return _jagged(table, n, {"x": _f32(x[order]), "y": _f32(y[order]), "z": _f32(z[order]),
                              "vertexType": kind[order].astype(np.int16)})


def concatenate(chunks: list[dict]) -> dict:
    return {k: (np.concatenate([c[k] for c in chunks]) if isinstance(chunks[0][k], np.ndarray)
                else ak.concatenate([c[k] for c in chunks])) for k in chunks[0]}


class PhysliteWriter:
    """Appends chunks to `CollectionTree`; the first chunk fixes the branch types."""

    def __init__(self, path):
        self.file = uproot.recreate(path)
        self.tree = None

    def extend(self, branches: dict) -> None:
        if self.tree is None:
            types = {k: (v.dtype if isinstance(v, np.ndarray) else ak.type(v).content) for k, v in branches.items()}
            self.tree = self.file.mktree(TREE, types, field_name=lambda outer, inner: f"{outer}.{inner}",
                                         counter_name=lambda name: f"n{name}")
        self.tree.extend(branches)

    def write_metadata(self, meta: dict) -> None:
        """One-entry METADATA_TREE: strings as strings, numbers as int64/float64."""
        cols = {}
        for k, v in meta.items():
            if isinstance(v, str):
                cols[k] = ak.Array([v])
            elif isinstance(v, (bool, int, np.integer)):
                cols[k] = np.array([v], np.int64)
            else:
                cols[k] = np.array([v], np.float64)
        self.file[METADATA_TREE] = cols

    def close(self) -> None:
        self.file.close()
