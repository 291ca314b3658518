"""A parametric ATLAS-like detector: Pythia8 particles in, reconstructed objects out.

Vectorised over a chunk of events: every step works on flat numpy arrays (one entry per
particle/object of the chunk, with an event index) or on awkward arrays; there is no
per-event Python loop. Units: GeV, mm, radians (the PHYSLITE writer converts to MeV).
Every number the simulation uses is a named constant below; this table is the one place
that documents them.

| what | parametrisation | constants |
|---|---|---|
| pile-up | mu ~ Normal(38, 11) clipped to [5, 80] per event (Run-3-like); the number of pile-up interactions is Poisson(mu) | MU_MEAN, MU_SIGMA, MU_MIN, MU_MAX |
| beam spot | hard-scatter vertex x,y ~ N(0, 0.012 mm), z ~ N(0, 35 mm); pile-up vertices z ~ N(0, 35 mm) | BEAMSPOT_XY_MM, BEAMSPOT_Z_MM |
| pile-up tracks | Poisson(7) charged tracks per pile-up vertex, pT = 0.5 GeV + Exp(0.7 GeV), uniform in |eta| < 2.5 | PU_TRACKS_PER_VERTEX, PU_TRACK_PT_SLOPE_GEV |
| vertices | the hard-scatter vertex (type 1), pile-up vertices with >= 2 tracks (type 3, z smeared by 0.1 mm), a dummy (type 0) | VERTEX_Z_RES_MM |
| tracks | charged final-state particles, pT > 0.5 GeV, |eta| < 2.5, produced within r < 300 mm; efficiency 0.91 (|eta|<1.5) / 0.85; sigma(pT)/pT = 0.01 (+) 0.0005 pT; sigma(d0) = 0.010 (+) 0.080/pT mm; sigma(z0) = 0.030 (+) 0.120/pT mm; nDoF ~ round N(38, 6); chi2 ~ nDoF * Gamma(8)/8 | TRACK_* |
| hit summaries | pixel layers at r = 33 (IBL), 50.5, 88.5, 122.5 mm, crossed when produced inside them: one hit per crossed layer with efficiency 0.995, a crossed layer without a hit is a hole, plus Poisson(0.3) module-overlap hits (|eta| > 1.7 endcap: Poisson(0.6)); innermost-layer hit = the IBL hit; SCT: 8 crossed sides, the same efficiency, holes and overlaps Poisson(0.6); TRT: Poisson of a mean vs |eta| (34 barrel, 22 in the barrel-endcap transition 0.7-1.1, 30 endcap, 0 beyond 2.0); shared hits: each hit shared with probability 0.02 (pixel) / 0.01 (SCT), x4 for a track in a jet core (dR < 0.05 of another track of the same jet) | HITS_* |
| ghost tracks | the tracks of each jet (AnalysisJetsAuxDyn.GhostTrack): a track whose particle the jet clustered; a track with none (pile-up, muons: not jet inputs) goes to the nearest jet axis within dR < 0.4 (JET_R) | - |
| track thinning | written tracks: |z0 - z_PV| sin(theta) < 10 mm (keeps all hard-scatter tracks and the pile-up tracks near the vertex, as a derivation does) | TRACK_KEEP_DZ_SINTHETA_MM |
| electrons | final-state e, pT > 4.5 GeV, |eta| < 2.47 outside 1.37-1.52; efficiency 0.96 * (1 - exp(-(pT-4.5)/8)); sigma(E)/E = 0.10/sqrt(E) (+) 0.007 (+) 0.25/E; photons within dR < 0.05 are added back (cluster dressing) | ELECTRON_* |
| muons | final-state mu, pT > 3 GeV, |eta| < 2.7; efficiency 0.97 (|eta| < 0.1: 0.70); sigma(pT)/pT = 0.015 (+) 0.0001 pT, x1.4 for |eta| > 1.05 | MUON_* |
| photons | final-state photons, pT > 10 GeV, |eta| < 2.37 outside the crack; efficiency 0.90; electron resolution; 30 % converted (author 16, else 4) | PHOTON_* |
| ID flags | score = N(2.0 prompt / 0.0 non-prompt, 1) - 4 * min(topoetcone20/pT, 1) - 4 * min(ptvarcone30/pT, 1); nested thresholds give Loose/Medium/Tight (muons: VeryLoose/Loose/Medium/Tight; photons: isLoose/isTight). Prompt = the first ancestor of another id (through taus) is not a hadron | ID_PROMPT_MEAN, ID_THRESHOLDS, ID_ISO_WEIGHT |
| isolation | topoetcone20/40: sum ET of visible calorimeter particles (pT > 0.4 GeV) in dR < 0.2/0.4 outside a core of 0.05, plus pile-up noise N(0, 0.06 GeV * mu); ptcone20 / ptvarcone30: sum pT of written tracks with pT > 1 GeV, |dz0 sin theta| < 3 mm, in dR < 0.2 / min(0.3, 10 GeV/pT), the object's own track excluded | ISO_* |
| hadronic taus | visible (non-neutrino) decay products of each tau that decays to hadrons; pT_vis > 15 GeV, |eta| < 2.5; efficiency 0.75; sigma(pT)/pT = 0.08; decay mode from prongs and pi0s (70 % correct, else a neighbour); RNNJetScore ~ Beta(5, 1.5); jets with 1 or 3 charged constituents (QG_nTracks) fake a tau with probability 0.1, RNNJetScore ~ Beta(1.2, 5); RNNEleScore ~ Beta(1, 8) | TAU_* |
| jets | anti-kt R=0.4 (fastjet) on visible final-state particles (no neutrinos, no muons) with |eta| < 4.9; sigma(pT)/pT = 0.75/sqrt(pT) (+) 0.04 (+) (2.5 + 0.06 mu)/pT; kept if reconstructed pT > 20 GeV and |eta| < 4.5 | JET_* |
| jet flavour | b if a b-hadron with pT > 5 GeV is within dR < 0.3, else c (c-hadron), else tau (hadronic tau), else light: HadronConeExclTruthLabelID 5/4/15/0 | FLAVOUR_* |
| b-tagging | per-jet logits (b, c, u) ~ N(mean_flavour, 1) with correlated noise between DL1d and GN2 (rho = 0.8); GN2 means separate better than DL1d; softmax -> (pb, pc, pu), summing to 1 | BTAG_LOGIT_MEANS, BTAG_CORRELATION |
| QG variables | from the charged constituents with pT > 0.5 GeV, |eta| < 2.5: NTracks, TracksWidth = sum pT dR / sum pT, TracksC1 = sum_{i<j} pT_i pT_j dR_ij^0.2 / (sum pT)^2 | QG_* |
| MET | soft term = -(sum of visible calorimeter particles not in a reconstructed jet, lepton or photon) + noise N(0, 0.5 sqrt(sumET) (+) 0.15 mu) per component; the final MET of the converter, -(sum of objects) + soft term, then holds the neutrinos, the particles outside the acceptance, and the smearing of the objects | MET_* |
"""
from __future__ import annotations

import awkward as ak
import fastjet
import numpy as np

from common.physics import ELECTRON_MASS, MUON_MASS
from common.schema import ISO_CONE, ISO_PT_FLOOR_GEV, ISO_Z0SINTHETA_CUT_MM

# --- pile-up and beam spot -----------------------------------------------------------------
MU_MEAN, MU_SIGMA, MU_MIN, MU_MAX = 38.0, 11.0, 5.0, 80.0
BEAMSPOT_XY_MM, BEAMSPOT_Z_MM = 0.012, 35.0
PU_TRACKS_PER_VERTEX = 7.0
PU_TRACK_PT_SLOPE_GEV = 0.7
VERTEX_Z_RES_MM = 0.1
VERTEX_MIN_TRACKS = 2
# --- tracks ---------------------------------------------------------------------------------
TRACK_PT_MIN_GEV, TRACK_ETA_MAX, TRACK_RPROD_MAX_MM = 0.5, 2.5, 300.0
TRACK_EFF_CENTRAL, TRACK_EFF_FORWARD, TRACK_EFF_ETA_SPLIT = 0.91, 0.85, 1.5
TRACK_PT_RES_CONST, TRACK_PT_RES_SLOPE = 0.01, 0.0005  # sigma(pT)/pT = c (+) s*pT
TRACK_D0_RES_MM, TRACK_D0_RES_MSC_MM = 0.010, 0.080  # sigma(d0) = a (+) b/pT
TRACK_Z0_RES_MM, TRACK_Z0_RES_MSC_MM = 0.030, 0.120
TRACK_NDOF_MEAN, TRACK_NDOF_SIGMA = 38.0, 6.0
TRACK_KEEP_DZ_SINTHETA_MM = 10.0
HITS_PIXEL_RADII_MM = (33.0, 50.5, 88.5, 122.5)  # IBL first: its hit is numberOfInnermostPixelLayerHits
HITS_SCT_SIDES, HITS_EFF = 8, 0.995
HITS_PIXEL_OVERLAP, HITS_PIXEL_OVERLAP_ENDCAP, HITS_PIXEL_ENDCAP_ETA, HITS_SCT_OVERLAP = 0.3, 0.6, 1.7, 0.6
HITS_TRT_ETA, HITS_TRT_MEAN = (0.0, 0.7, 0.8, 1.0, 1.1, 1.8, 2.0), (34.0, 33.0, 22.0, 22.0, 30.0, 30.0, 0.0)
HITS_SHARED_PIXEL, HITS_SHARED_SCT, HITS_SHARED_CORE_FACTOR, HITS_CORE_DR = 0.02, 0.01, 4.0, 0.05
# --- electrons, muons, photons --------------------------------------------------------------
ELECTRON_PT_MIN_GEV, ELECTRON_ETA_MAX = 4.5, 2.47
ELECTRON_EFF_PLATEAU, ELECTRON_EFF_TURNON_GEV = 0.96, 8.0
ELECTRON_DRESS_DR = 0.05
CRACK_ETA = (1.37, 1.52)
CALO_STOCH, CALO_CONST, CALO_NOISE_GEV = 0.10, 0.007, 0.25  # sigma(E)/E = a/sqrt(E) (+) b (+) c/E
MUON_PT_MIN_GEV, MUON_ETA_MAX = 3.0, 2.7
MUON_EFF, MUON_EFF_CRACK, MUON_CRACK_ETA = 0.97, 0.70, 0.1
MUON_RES_CONST, MUON_RES_SLOPE, MUON_RES_ENDCAP_FACTOR, MUON_BARREL_ETA = 0.015, 0.0001, 1.4, 1.05
PHOTON_PT_MIN_GEV, PHOTON_ETA_MAX, PHOTON_EFF, PHOTON_CONVERTED_FRACTION = 10.0, 2.37, 0.90, 0.30
ANGLE_RES = 0.001  # eta/phi smearing of leptons and photons
# --- identification (one score per object; nested working points) --------------------------
ID_PROMPT_MEAN, ID_NONPROMPT_MEAN, ID_ISO_WEIGHT = 2.0, 0.0, 4.0
ID_THRESHOLDS = (-0.3, 0.3, 0.9)  # loosest .. tightest (muons add VeryLoose below: -1.0)
MUON_VERYLOOSE_THRESHOLD = -1.0
# --- isolation ------------------------------------------------------------------------------
ISO_CALO_PT_MIN_GEV, ISO_CORE_DR = 0.4, 0.05
ISO_CALO_PU_NOISE_GEV_PER_MU = 0.06
ISO_TRACK_PT_MIN_GEV, ISO_VARCONE_KT_GEV, ISO_VARCONE_MAX = 1.0, 10.0, 0.3
# --- taus -----------------------------------------------------------------------------------
TAU_PT_MIN_GEV, TAU_ETA_MAX, TAU_EFF, TAU_PT_RES = 15.0, 2.5, 0.75, 0.08
TAU_MODE_CORRECT = 0.70
TAU_FAKE_PROB = 0.10
TAU_PRONGS = (1, 3)  # charged tracks of a reconstructed tau, and of a jet that fakes one
TAU_TRUE_JETSCORE, TAU_FAKE_JETSCORE, TAU_ELESCORE = (5.0, 1.5), (1.2, 5.0), (1.0, 8.0)
# --- jets, flavour, tagging -----------------------------------------------------------------
JET_R, JET_INPUT_ETA_MAX, JET_CLUSTER_PT_MIN_GEV = 0.4, 4.9, 10.0
JET_PT_MIN_GEV, JET_ETA_MAX = 20.0, 4.5
JET_RES_STOCH, JET_RES_CONST, JET_RES_NOISE_GEV, JET_RES_NOISE_PER_MU_GEV = 0.75, 0.04, 2.5, 0.06
FLAVOUR_HADRON_PT_MIN_GEV, FLAVOUR_DR = 5.0, 0.3
# logit means (b, c, u) per true flavour label; GN2 separates better than DL1d
BTAG_LOGIT_MEANS = {
    "GN2": {5: (3.2, 0.6, -1.2), 4: (0.2, 1.4, 0.4), 15: (-1.0, -0.2, 1.2), 0: (-2.2, -0.6, 1.9)},
    "DL1d": {5: (2.5, 0.6, -0.8), 4: (0.3, 1.1, 0.4), 15: (-0.7, -0.1, 1.0), 0: (-1.6, -0.4, 1.5)},
}
BTAG_LOGIT_SIGMA, BTAG_CORRELATION = 1.0, 0.8
QG_TRACK_PT_MIN_GEV, QG_C1_BETA = 0.5, 0.2
# --- MET ------------------------------------------------------------------------------------
MET_SOFT_STOCH, MET_SOFT_PER_MU_GEV = 0.5, 0.15

NEUTRINOS = (12, 14, 16)
BTAG_PERS_KEY = 582299515  # m_persKey of the BTagging container link, as in the real file
TRACK_PERS_KEY = 490246363  # m_persKey of the InDetTrackParticles links (GhostTrack), as in the real files


# ============================================================================================
# Flat particle table of a chunk: one entry per Pythia record line, with the event index.
# ============================================================================================
def flat_particles(prt: ak.Array, charge_of) -> dict:
    """Flatten the Pythia records of a chunk; mother indices become global (chunk-wide)."""
    counts = ak.num(prt.id).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    event = np.repeat(np.arange(len(counts)), counts)
    f = lambda x: ak.to_numpy(ak.flatten(x))
    vprod = prt.vProd
    p = {
        "event": event, "id": f(prt.id), "status": f(prt.status),
        "mother1": f(prt.mother1) + offsets[event], "daughter1": f(prt.daughter1),
        "px": f(prt.p.px), "py": f(prt.p.py), "pz": f(prt.p.pz), "e": f(prt.p.e), "m": f(prt.m),
        "vx": f(ak.fill_none(vprod.px, 0.0)), "vy": f(ak.fill_none(vprod.py, 0.0)),
        "vz": f(ak.fill_none(vprod.pz, 0.0)),
    }
    p["charge"] = charge_of(p["id"])
    p["pt"] = np.hypot(p["px"], p["py"])
    p["eta"] = np.arcsinh(p["pz"] / np.maximum(p["pt"], 1e-9))
    p["phi"] = np.arctan2(p["py"], p["px"])
    p["n_events"] = len(counts)
    return p


def is_hadron(pid: np.ndarray) -> np.ndarray:
    a = np.abs(pid)
    return (a > 100) & ((a // 10) % 10 != 0) & (a < 1_000_000)


def has_quark(pid: np.ndarray, q: int) -> np.ndarray:
    a = np.abs(pid)
    return is_hadron(pid) & (((a // 100) % 10 == q) | ((a // 1000) % 10 == q))


def ancestry(p: dict, steps: int = 10) -> dict:
    """Walk mother1 links (vectorised over all particles), skipping copies of the particle itself.
    parent: the first ancestor with another id (global index, -1 if none);
    prompt: that ancestor is not a hadron (a tau passes the question on to its own parent);
    tau_anc: a tau among the first three ancestors (the visible decay products of a tau)."""
    n = len(p["id"])
    cur = p["mother1"].copy()
    self_id = p["id"].copy()
    parent = np.full(n, -1, np.int64)
    tau_anc = np.full(n, -1, np.int64)
    prompt = np.ones(n, bool)
    decided = np.zeros(n, bool)
    for step in range(steps):
        safe = np.clip(cur, 0, n - 1)
        valid = (cur > 0) & (p["id"][safe] != 90)
        anc_id = np.where(valid, p["id"][safe], 0)
        is_tau = np.abs(anc_id) == 15
        if step < 3:
            new_tau = valid & is_tau & (tau_anc < 0)
            tau_anc[new_tau] = cur[new_tau]
        other = valid & (anc_id != self_id)
        first = other & (parent < 0)
        parent[first] = cur[first]
        decide = other & ~decided
        prompt[decide & is_hadron(anc_id)] = False
        decided |= decide & ~is_tau
        self_id = np.where(decide & is_tau, anc_id, self_id)  # continue through the tau's own copies
        cur = np.where(valid, p["mother1"][safe], 0)
    return {"prompt": prompt, "parent": parent, "tau_anc": tau_anc}


# ============================================================================================
# Small vectorised helpers
# ============================================================================================
def quad(*terms):
    return np.sqrt(sum(np.square(t) for t in terms))


def wrap_phi(phi):
    return (phi + np.pi) % (2 * np.pi) - np.pi


def delta_r(eta1, phi1, eta2, phi2):
    return np.hypot(eta1 - eta2, wrap_phi(phi1 - phi2))


def in_crack(eta):
    return (np.abs(eta) > CRACK_ETA[0]) & (np.abs(eta) < CRACK_ETA[1])


def pairs(ev_a: np.ndarray, ev_b: np.ndarray, n_events: int):
    """All (a, b) index pairs within the same event (a and b sorted by event)."""
    cb = np.bincount(ev_b, minlength=n_events)
    ob = np.concatenate([[0], np.cumsum(cb)[:-1]])
    per_a = cb[ev_a]
    ia = np.repeat(np.arange(len(ev_a)), per_a)
    start = np.repeat(ob[ev_a], per_a)
    within = np.arange(len(ia)) - np.repeat(np.cumsum(per_a) - per_a, per_a)
    return ia, start + within


def cone_sum(obj, par, weight, radius, n_events, exclude=None, core=0.0):
    """Sum of `weight` over particles within `radius` (scalar or per object) of each object."""
    ia, ib = pairs(obj["event"], par["event"], n_events)
    dr = delta_r(obj["eta"][ia], obj["phi"][ia], par["eta"][ib], par["phi"][ib])
    r = radius[ia] if np.ndim(radius) else radius
    ok = (dr < r) & (dr >= core)
    if exclude is not None:
        ok &= par["truth"][ib] != obj["truth"][ia]
    return np.bincount(ia[ok], weights=weight[ib[ok]], minlength=len(obj["event"]))


def take(d: dict, mask) -> dict:
    return {k: (v[mask] if isinstance(v, np.ndarray) and v.ndim and len(v) == len(mask) else v) for k, v in d.items()}


def sort_by_pt(d: dict) -> dict:
    """Objects grouped by event, pT-descending within the event."""
    order = np.lexsort((-d["pt"], d["event"]))
    return {k: (v[order] if isinstance(v, np.ndarray) and v.ndim else v) for k, v in d.items()}


# ============================================================================================
# The detector
# ============================================================================================
def simulate(prt: ak.Array, charge_of, rng: np.random.Generator) -> dict:
    """Reconstruct a chunk of Pythia events. Returns flat per-object tables (dicts of numpy
    arrays with an `event` column) for every container, plus per-event arrays."""
    p = flat_particles(prt, charge_of)
    anc = ancestry(p)
    n_ev = p["n_events"]
    final = p["status"] > 0
    absid = np.abs(p["id"])
    out = {"n_events": n_ev}

    ev = pileup_and_vertices(n_ev, rng)
    out["event"] = ev
    # particles are produced at the hard-scatter vertex plus their own displacement
    for axis in ("x", "y", "z"):
        p["v" + axis] = p["v" + axis] + ev["pv" + axis][p["event"]]

    visible = final & ~np.isin(absid, NEUTRINOS)
    calo = visible & (absid != 13) & (np.abs(p["eta"]) < JET_INPUT_ETA_MAX)

    tracks = reconstruct_tracks(p, final, ev, rng)
    electrons = reconstruct_electrons(p, final, anc, rng)
    muons = reconstruct_muons(p, final, anc, rng)
    photons = reconstruct_photons(p, final, anc, rng)
    jets, jet_of_particle = reconstruct_jets(prt, p, calo, ev, anc, rng)
    in_jet = jet_of_particle >= 0
    taus = reconstruct_taus(p, final, anc, jets, rng)

    calo_iso = take(p, calo & (p["pt"] > ISO_CALO_PT_MIN_GEV))
    calo_iso["truth"] = np.flatnonzero(calo & (p["pt"] > ISO_CALO_PT_MIN_GEV))
    for obj in (electrons, muons, photons):
        add_isolation(obj, calo_iso, tracks, ev, n_ev, rng)
        obj["id_score"] = id_score(obj, rng)

    out.update(tracks=tracks, electrons=electrons, muons=muons, photons=photons, jets=jets, taus=taus)
    out["met"] = soft_term(p, calo, in_jet, electrons, photons, ev, rng)
    tracks["ghost_jet"] = ghost_jets(tracks, jets, jet_of_particle, n_ev)
    add_hit_summaries(tracks, rng)  # last: the draws above stay those of a sample without hit summaries
    return out


def pileup_and_vertices(n_ev: int, rng) -> dict:
    mu = np.clip(rng.normal(MU_MEAN, MU_SIGMA, n_ev), MU_MIN, MU_MAX)
    n_pu = rng.poisson(mu)
    pv = {"mu": mu.astype(np.float32), "actual_mu": n_pu.astype(np.float32),
          "pvx": rng.normal(0, BEAMSPOT_XY_MM, n_ev), "pvy": rng.normal(0, BEAMSPOT_XY_MM, n_ev),
          "pvz": rng.normal(0, BEAMSPOT_Z_MM, n_ev)}
    pu_event = np.repeat(np.arange(n_ev), n_pu)
    pu_z = rng.normal(0, BEAMSPOT_Z_MM, len(pu_event))
    pu_ntrk = rng.poisson(PU_TRACKS_PER_VERTEX, len(pu_event))
    pv["pu_vertices"] = {"event": pu_event, "z": pu_z, "ntrk": pu_ntrk}
    return pv


def reconstruct_tracks(p, final, ev, rng) -> dict:
    rprod = np.hypot(p["vx"] - ev["pvx"][p["event"]], p["vy"] - ev["pvy"][p["event"]])
    sel = (final & (p["charge"] != 0) & (p["pt"] > TRACK_PT_MIN_GEV) & (np.abs(p["eta"]) < TRACK_ETA_MAX)
           & (rprod < TRACK_RPROD_MAX_MM))
    eff = np.where(np.abs(p["eta"]) < TRACK_EFF_ETA_SPLIT, TRACK_EFF_CENTRAL, TRACK_EFF_FORWARD)
    sel &= rng.random(len(sel)) < eff
    idx = np.flatnonzero(sel)
    t = {"event": p["event"][idx], "truth": idx, "pt": p["pt"][idx], "eta": p["eta"][idx],
         "phi": p["phi"][idx], "charge": p["charge"][idx], "rprod": rprod[idx]}
    # impact parameters of the straight-line extrapolation from the production point
    x, y = p["vx"][idx], p["vy"][idx]
    t["d0_true"] = -x * np.sin(t["phi"]) + y * np.cos(t["phi"])
    t["z0_true"] = p["vz"][idx] - (x * np.cos(t["phi"]) + y * np.sin(t["phi"])) * np.sinh(t["eta"])
    t["hard_scatter"] = np.ones(len(idx), bool)

    pu = ev["pu_vertices"]
    n_pu_trk = pu["ntrk"].sum()
    vtx = np.repeat(np.arange(len(pu["z"])), pu["ntrk"])
    pu_t = {"event": pu["event"][vtx], "truth": np.full(n_pu_trk, -1),
            "pt": TRACK_PT_MIN_GEV + rng.exponential(PU_TRACK_PT_SLOPE_GEV, n_pu_trk),
            "eta": rng.uniform(-TRACK_ETA_MAX, TRACK_ETA_MAX, n_pu_trk),
            "phi": rng.uniform(-np.pi, np.pi, n_pu_trk),
            "charge": rng.choice([-1.0, 1.0], n_pu_trk),
            "d0_true": np.zeros(n_pu_trk), "z0_true": pu["z"][vtx], "hard_scatter": np.zeros(n_pu_trk, bool),
            "rprod": np.zeros(n_pu_trk)}
    t = sort_by_pt({k: np.concatenate([t[k], pu_t[k]]) for k in t})

    n = len(t["pt"])
    t["pt"] = t["pt"] * (1 + quad(TRACK_PT_RES_CONST, TRACK_PT_RES_SLOPE * t["pt"]) * rng.standard_normal(n))
    t["pt"] = np.abs(t["pt"])
    t["d0"] = t["d0_true"] + quad(TRACK_D0_RES_MM, TRACK_D0_RES_MSC_MM / t["pt"]) * rng.standard_normal(n)
    t["z0"] = t["z0_true"] + quad(TRACK_Z0_RES_MM, TRACK_Z0_RES_MSC_MM / t["pt"]) * rng.standard_normal(n)
    t["theta"] = 2 * np.arctan(np.exp(-t["eta"]))
    t["qOverP"] = t["charge"] * np.sin(t["theta"]) / t["pt"]  # 1/GeV
    t["numberDoF"] = np.maximum(np.round(rng.normal(TRACK_NDOF_MEAN, TRACK_NDOF_SIGMA, n)), 5)
    t["chiSquared"] = t["numberDoF"] * rng.gamma(8.0, 1 / 8.0, n)
    # z0 w.r.t. the hard-scatter vertex decides what a derivation keeps and what isolation counts
    t["dz_sintheta"] = (t["z0"] - ev["pvz"][t["event"]]) * np.sin(t["theta"])
    # pile-up vertices that have enough reconstructed tracks are reconstructed
    keep_vtx = pu["ntrk"] >= VERTEX_MIN_TRACKS
    ev["pu_reco"] = {"event": pu["event"][keep_vtx],
                     "z": pu["z"][keep_vtx] + rng.normal(0, VERTEX_Z_RES_MM, keep_vtx.sum())}
    return take(t, np.abs(t["dz_sintheta"]) < TRACK_KEEP_DZ_SINTHETA_MM)


def calo_smear(e, rng):
    return quad(CALO_STOCH / np.sqrt(np.maximum(e, 1e-3)), CALO_CONST, CALO_NOISE_GEV / np.maximum(e, 1e-3))


def lepton_table(p, idx, anc, rng, mass) -> dict:
    n = len(idx)
    return {"event": p["event"][idx], "truth": idx, "pt_true": p["pt"][idx],
            "eta": p["eta"][idx] + ANGLE_RES * rng.standard_normal(n),
            "phi": wrap_phi(p["phi"][idx] + ANGLE_RES * rng.standard_normal(n)),
            "charge": p["charge"][idx], "prompt": anc["prompt"][idx], "m": np.full(n, mass)}


def reconstruct_electrons(p, final, anc, rng) -> dict:
    absid = np.abs(p["id"])
    cand = final & (absid == 11) & (np.abs(p["eta"]) < ELECTRON_ETA_MAX) & ~in_crack(p["eta"])
    cand &= p["pt"] > ELECTRON_PT_MIN_GEV * 0.8
    idx = np.flatnonzero(cand)
    # cluster dressing: collinear FSR photons end up in the electron's cluster
    gam = np.flatnonzero(final & (absid == 22) & (p["pt"] > 0.1))
    e_obj = {"event": p["event"][idx], "eta": p["eta"][idx], "phi": p["phi"][idx]}
    g_par = {"event": p["event"][gam], "eta": p["eta"][gam], "phi": p["phi"][gam]}
    dressed_pt = p["pt"][idx] + cone_sum(e_obj, g_par, p["pt"][gam], ELECTRON_DRESS_DR, p["n_events"])
    el = lepton_table(p, idx, anc, rng, ELECTRON_MASS)
    e_true = dressed_pt * np.cosh(el["eta"])
    el["pt"] = dressed_pt * (1 + calo_smear(e_true, rng) * rng.standard_normal(len(idx)))
    eff = ELECTRON_EFF_PLATEAU * (1 - np.exp(-np.maximum(el["pt"] - ELECTRON_PT_MIN_GEV, 0) / ELECTRON_EFF_TURNON_GEV))
    keep = (el["pt"] > ELECTRON_PT_MIN_GEV) & (rng.random(len(idx)) < eff)
    el = take(el, keep)
    el["author"] = np.ones(len(el["pt"]), np.uint16)
    return sort_by_pt(el)


def reconstruct_muons(p, final, anc, rng) -> dict:
    idx = np.flatnonzero(final & (np.abs(p["id"]) == 13) & (np.abs(p["eta"]) < MUON_ETA_MAX)
                         & (p["pt"] > MUON_PT_MIN_GEV))
    mu = lepton_table(p, idx, anc, rng, MUON_MASS)
    aeta = np.abs(mu["eta"])
    res = quad(MUON_RES_CONST, MUON_RES_SLOPE * mu["pt_true"]) * np.where(aeta > MUON_BARREL_ETA, MUON_RES_ENDCAP_FACTOR, 1)
    mu["pt"] = mu["pt_true"] * (1 + res * rng.standard_normal(len(idx)))
    eff = np.where(aeta < MUON_CRACK_ETA, MUON_EFF_CRACK, MUON_EFF)
    mu = take(mu, (mu["pt"] > MUON_PT_MIN_GEV) & (rng.random(len(idx)) < eff))
    n, aeta = len(mu["pt"]), np.abs(mu["eta"])
    # muonType: 0 Combined, 1 MuonStandAlone (|eta| > 2.5), 2 SegmentTagged, 3 CaloTagged (|eta| < 0.1)
    kind = np.where(rng.random(n) < 0.04, 2, 0)
    kind = np.where(aeta < MUON_CRACK_ETA, np.where(rng.random(n) < 0.5, 3, kind), kind)
    mu["muonType"] = np.where(aeta > TRACK_ETA_MAX, 1, kind).astype(np.uint16)
    return sort_by_pt(mu)


def reconstruct_photons(p, final, anc, rng) -> dict:
    idx = np.flatnonzero(final & (p["id"] == 22) & (np.abs(p["eta"]) < PHOTON_ETA_MAX) & ~in_crack(p["eta"])
                         & (p["pt"] > PHOTON_PT_MIN_GEV * 0.8))
    ph = lepton_table(p, idx, anc, rng, 0.0)
    e_true = ph["pt_true"] * np.cosh(ph["eta"])
    ph["pt"] = ph["pt_true"] * (1 + calo_smear(e_true, rng) * rng.standard_normal(len(idx)))
    ph = take(ph, (ph["pt"] > PHOTON_PT_MIN_GEV) & (rng.random(len(idx)) < PHOTON_EFF))
    ph["author"] = np.where(rng.random(len(ph["pt"])) < PHOTON_CONVERTED_FRACTION, 16, 4).astype(np.uint16)
    return sort_by_pt(ph)


def add_isolation(obj, calo, tracks, ev, n_ev, rng) -> None:
    """Calorimeter and track isolation from the surrounding particles (GeV)."""
    et = calo["pt"]
    noise = ISO_CALO_PU_NOISE_GEV_PER_MU * ev["mu"][obj["event"]]
    for cone, name in ((0.2, "topoetcone20"), (0.4, "topoetcone40")):
        obj[name] = cone_sum(obj, calo, et, cone, n_ev, core=ISO_CORE_DR) + noise * rng.standard_normal(len(obj["pt"]))
    trk = take(tracks, (tracks["pt"] > ISO_TRACK_PT_MIN_GEV) & (np.abs(tracks["dz_sintheta"]) < ISO_Z0SINTHETA_CUT_MM))
    obj["ptcone20"] = cone_sum(obj, trk, trk["pt"], 0.2, n_ev, exclude=True)
    varcone = np.minimum(ISO_VARCONE_MAX, ISO_VARCONE_KT_GEV / np.maximum(obj["pt"], 1e-3))
    obj["ptvarcone30"] = cone_sum(obj, trk, trk["pt"], varcone, n_ev, exclude=True)
    # the trk_iso03 ingredients (schema.ISO_*) (pT > 0.5 GeV) also for the plots: ptcone30 at 500 MeV
    trk05 = take(tracks, (tracks["pt"] > ISO_PT_FLOOR_GEV) & (np.abs(tracks["dz_sintheta"]) < ISO_Z0SINTHETA_CUT_MM))
    obj["ptcone30_pt500"] = cone_sum(obj, trk05, trk05["pt"], ISO_CONE, n_ev, exclude=True)


def id_score(obj, rng) -> np.ndarray:
    """A likelihood-like score: prompt objects sit higher, isolation pulls it down."""
    n = len(obj["pt"])
    mean = np.where(obj["prompt"], ID_PROMPT_MEAN, ID_NONPROMPT_MEAN)
    rel = lambda x: np.clip(x / np.maximum(obj["pt"], 1e-3), 0, 1)
    return (mean + rng.standard_normal(n) - ID_ISO_WEIGHT * rel(obj["topoetcone20"])
            - ID_ISO_WEIGHT * rel(obj["ptvarcone30"]))


_BANNER_SHOWN = False


def _silence_fastjet_banner() -> None:
    """fastjet's C++ library prints a banner on its first clustering: do that one on /dev/null."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return
    import os
    import sys

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        one = ak.Array([[{"px": 1.0, "py": 0.0, "pz": 0.0, "E": 1.0}]])
        fastjet.ClusterSequence(one, fastjet.JetDefinition(fastjet.antikt_algorithm, JET_R)).inclusive_jets()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _BANNER_SHOWN = True


def reconstruct_jets(prt, p, calo, ev, anc, rng):
    """anti-kt R=0.4 with fastjet over the whole chunk at once, smearing, flavour, tagging, QG."""
    _silence_fastjet_banner()
    n_ev = p["n_events"]
    idx = np.flatnonzero(calo)
    counts = np.bincount(p["event"][idx], minlength=n_ev)
    unflat = lambda x: ak.unflatten(x, counts)
    inputs = ak.zip({"px": unflat(p["px"][idx]), "py": unflat(p["py"][idx]),
                     "pz": unflat(p["pz"][idx]), "E": unflat(p["e"][idx])})
    cs = fastjet.ClusterSequence(inputs, fastjet.JetDefinition(fastjet.antikt_algorithm, JET_R))
    jets_ak = cs.inclusive_jets(JET_CLUSTER_PT_MIN_GEV)
    const = cs.constituent_index(JET_CLUSTER_PT_MIN_GEV)  # event -> jet -> index into inputs
    njet = ak.to_numpy(ak.num(jets_ak))
    j = {"event": np.repeat(np.arange(n_ev), njet)}
    for k in ("px", "py", "pz", "E"):
        j[k] = ak.to_numpy(ak.flatten(jets_ak[k]))
    j["pt_true"] = np.hypot(j["px"], j["py"])
    j["eta"] = np.arcsinh(j["pz"] / np.maximum(j["pt_true"], 1e-9))
    j["phi"] = np.arctan2(j["py"], j["px"])
    j["m"] = np.sqrt(np.maximum(j["E"] ** 2 - j["px"] ** 2 - j["py"] ** 2 - j["pz"] ** 2, 0))
    # constituents -> global particle indices, and the jet each belongs to
    n_const = ak.to_numpy(ak.flatten(ak.num(const, axis=2)))
    in_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    c_local = ak.to_numpy(ak.flatten(const, axis=None))
    c_jet = np.repeat(np.arange(len(j["event"])), n_const)
    c_glob = idx[c_local + in_offsets[j["event"][c_jet]]]

    n = len(j["event"])
    mu = ev["mu"][j["event"]]
    res = quad(JET_RES_STOCH / np.sqrt(np.maximum(j["pt_true"], 1)), JET_RES_CONST,
               (JET_RES_NOISE_GEV + JET_RES_NOISE_PER_MU_GEV * mu) / np.maximum(j["pt_true"], 1))
    scale = np.maximum(1 + res * rng.standard_normal(n), 0.05)
    j["pt"], j["m"] = j["pt_true"] * scale, j["m"] * scale
    j["label"] = flavour_labels(p, anc, j)
    add_btag(j, rng)
    add_qg(p, j, c_jet, c_glob)
    keep = (j["pt"] > JET_PT_MIN_GEV) & (np.abs(j["eta"]) < JET_ETA_MAX)
    j["clustered"] = np.arange(n)
    jets = sort_by_pt(take(j, keep))
    position = np.full(n, -1)
    position[jets["clustered"]] = np.arange(len(jets["clustered"]))
    jet_of_particle = np.full(len(p["id"]), -1)  # the kept jet (index into jets) that clustered each particle
    jet_of_particle[c_glob] = position[c_jet]
    return jets, jet_of_particle


def ghost_jets(tracks, jets, jet_of_particle, n_ev) -> np.ndarray:
    """The jet (index into jets, -1 none) each written track is a ghost of: the jet that clustered its
    particle, else (pile-up tracks, muons) the nearest jet axis within JET_R."""
    ghost = np.where(tracks["truth"] >= 0, jet_of_particle[np.maximum(tracks["truth"], 0)], -1)
    rest = np.flatnonzero(ghost < 0)
    it, ij = pairs(tracks["event"][rest], jets["event"], n_ev)
    dr = delta_r(tracks["eta"][rest[it]], tracks["phi"][rest[it]], jets["eta"][ij], jets["phi"][ij])
    close = dr < JET_R
    it, ij, dr = it[close], ij[close], dr[close]
    order = np.lexsort((dr, it))  # per track, the nearest jet first
    first = order[np.r_[True, it[order][1:] != it[order][:-1]]] if len(order) else order
    ghost[rest[it[first]]] = ij[first]
    return ghost


def add_hit_summaries(t, rng) -> None:
    """The xAOD track summary values (HITS_* in the table above), uint8 like a real file's."""
    n = len(t["pt"])
    aeta = np.abs(t["eta"])
    crossed = t["rprod"][:, None] < np.asarray(HITS_PIXEL_RADII_MM)[None, :]  # (tracks, layers)
    hit = crossed & (rng.random(crossed.shape) < HITS_EFF)
    overlap = rng.poisson(np.where(aeta > HITS_PIXEL_ENDCAP_ETA, HITS_PIXEL_OVERLAP_ENDCAP, HITS_PIXEL_OVERLAP), n)
    pixel = hit.sum(axis=1) + overlap * crossed.any(axis=1)
    sct_hit = rng.binomial(HITS_SCT_SIDES, HITS_EFF, n)
    sct = sct_hit + rng.poisson(HITS_SCT_OVERLAP, n)
    core = _in_jet_core(t)
    shared = lambda hits, p: rng.binomial(hits, np.where(core, p * HITS_SHARED_CORE_FACTOR, p))  # noqa: E731
    values = {"numberOfPixelHits": pixel, "numberOfInnermostPixelLayerHits": hit[:, 0],
              "numberOfPixelHoles": (crossed & ~hit).sum(axis=1), "numberOfSCTHits": sct,
              "numberOfSCTHoles": HITS_SCT_SIDES - sct_hit,
              "numberOfTRTHits": rng.poisson(np.interp(aeta, HITS_TRT_ETA, HITS_TRT_MEAN)),
              "numberOfPixelSharedHits": shared(pixel, HITS_SHARED_PIXEL), "numberOfSCTSharedHits": shared(sct, HITS_SHARED_SCT)}
    t.update({k: np.asarray(v).astype(np.uint8) for k, v in values.items()})


def _in_jet_core(t) -> np.ndarray:
    """Tracks within HITS_CORE_DR of another track of the same ghost jet (dense cores share clusters)."""
    in_jet = np.flatnonzero(t["ghost_jet"] >= 0)
    order = in_jet[np.argsort(t["ghost_jet"][in_jet], kind="stable")]
    ia, ib = pairs(t["ghost_jet"][order], t["ghost_jet"][order], int(t["ghost_jet"].max(initial=-1)) + 1)
    other = ia != ib
    ia, ib = order[ia[other]], order[ib[other]]
    close = delta_r(t["eta"][ia], t["phi"][ia], t["eta"][ib], t["phi"][ib]) < HITS_CORE_DR
    core = np.zeros(len(t["pt"]), bool)
    core[ia[close]] = True
    return core


def flavour_labels(p, anc, j) -> np.ndarray:
    label = np.zeros(len(j["event"]), np.int32)
    hard = p["pt"] > FLAVOUR_HADRON_PT_MIN_GEV
    taus = np.abs(p["id"]) == 15
    for flav, sel in ((15, hard & taus), (4, hard & has_quark(p["id"], 4)), (5, hard & has_quark(p["id"], 5))):
        h = {"event": p["event"][sel], "eta": p["eta"][sel], "phi": p["phi"][sel]}
        near = cone_sum(j, h, np.ones(sel.sum()), FLAVOUR_DR, p["n_events"]) > 0
        label[near] = flav  # later (heavier) labels win: b over c over tau
    return label


def add_btag(j, rng) -> None:
    n = len(j["label"])
    shared = rng.standard_normal((n, 3))
    for tagger, means in BTAG_LOGIT_MEANS.items():
        own = rng.standard_normal((n, 3))
        noise = BTAG_CORRELATION * shared + np.sqrt(1 - BTAG_CORRELATION ** 2) * own
        mean = np.zeros((n, 3))
        for flav, m in means.items():
            mean[j["label"] == flav] = m
        logits = mean + BTAG_LOGIT_SIGMA * noise
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob /= prob.sum(axis=1, keepdims=True)
        for i, s in enumerate(("pb", "pc", "pu")):
            j[f"{tagger}_{s}"] = prob[:, i]


def add_qg(p, j, c_jet, c_glob) -> None:
    charged = (p["charge"][c_glob] != 0) & (p["pt"][c_glob] > QG_TRACK_PT_MIN_GEV) & (np.abs(p["eta"][c_glob]) < TRACK_ETA_MAX)
    cj, cg = c_jet[charged], c_glob[charged]
    n = len(j["event"])
    pt, eta, phi = p["pt"][cg], p["eta"][cg], p["phi"][cg]
    dr = delta_r(eta, phi, j["eta"][cj], j["phi"][cj])
    sum_pt = np.bincount(cj, weights=pt, minlength=n)
    j["QG_nTracks"] = np.bincount(cj, minlength=n)
    j["QG_tracksWidth"] = np.divide(np.bincount(cj, weights=pt * dr, minlength=n), sum_pt,
                                    out=np.full(n, -1.0), where=sum_pt > 0)
    # C1: pairs of charged constituents of the same jet (grouped by jet: c_jet is sorted)
    ia, ib = pairs(cj, cj, n)
    upper = ia < ib
    ia, ib = ia[upper], ib[upper]
    w = pt[ia] * pt[ib] * delta_r(eta[ia], phi[ia], eta[ib], phi[ib]) ** QG_C1_BETA
    num = np.bincount(cj[ia], weights=w, minlength=n)
    j["QG_tracksC1"] = np.divide(num, sum_pt ** 2, out=np.full(n, -1.0), where=sum_pt > 0)


def reconstruct_taus(p, final, anc, jets, rng) -> dict:
    """Hadronic taus from the visible decay products, plus jets faking taus."""
    absid = np.abs(p["id"])
    from_tau = final & (anc["tau_anc"] >= 0)
    leptonic = np.zeros(len(p["id"]), bool)
    lep_from_tau = final & np.isin(absid, (11, 13)) & (anc["parent"] >= 0)
    lep_from_tau &= np.abs(p["id"][np.maximum(anc["parent"], 0)]) == 15
    leptonic[anc["parent"][lep_from_tau]] = True
    prod = from_tau & ~np.isin(absid, NEUTRINOS) & ~leptonic[np.maximum(anc["tau_anc"], 0)]
    tau_ids, inv = np.unique(anc["tau_anc"][prod], return_inverse=True)
    n = len(tau_ids)
    s = lambda w: np.bincount(inv, weights=w, minlength=n)
    px, py, pz = s(p["px"][prod]), s(p["py"][prod]), s(p["pz"][prod])
    charged = p["charge"][prod] != 0
    t = {"event": p["event"][tau_ids], "pt_true": np.hypot(px, py)}
    t["eta"] = np.arcsinh(pz / np.maximum(t["pt_true"], 1e-9))
    t["phi"] = np.arctan2(py, px)
    t["charge"] = s(p["charge"][prod])
    t["n_prong"] = s(charged.astype(float)).astype(int)
    n_pi0 = (s((p["id"][prod] == 22).astype(float)) // 2).astype(int)
    mode = np.where(t["n_prong"] == 1, np.minimum(n_pi0, 2), np.where(t["n_prong"] == 3, np.where(n_pi0 > 0, 4, 3), 5))
    wrong = rng.random(n) > TAU_MODE_CORRECT
    mode = np.where(wrong & (mode < 5), np.clip(mode + rng.choice([-1, 1], n), 0, 4), mode)
    t["NNDecayMode"] = mode
    t["pt"] = t["pt_true"] * (1 + TAU_PT_RES * rng.standard_normal(n))
    t["RNNJetScore"] = rng.beta(*TAU_TRUE_JETSCORE, n)
    t["truth_tau"] = np.ones(n, bool)
    t = take(t, (t["pt"] > TAU_PT_MIN_GEV) & (np.abs(t["eta"]) < TAU_ETA_MAX) & (rng.random(n) < TAU_EFF)
             & np.isin(t["n_prong"], TAU_PRONGS))

    # jets faking taus: narrow jets with 1 or 3 charged tracks, not matched to a true tau
    fake = ((jets["label"] != 15) & np.isin(jets["QG_nTracks"], TAU_PRONGS) & (np.abs(jets["eta"]) < TAU_ETA_MAX)
            & (jets["pt"] > TAU_PT_MIN_GEV) & (rng.random(len(jets["pt"])) < TAU_FAKE_PROB))
    nf = int(fake.sum())
    f = {"event": jets["event"][fake], "pt": jets["pt"][fake], "eta": jets["eta"][fake], "phi": jets["phi"][fake],
         "charge": rng.choice([-1.0, 1.0], nf), "n_prong": jets["QG_nTracks"][fake],
         "NNDecayMode": np.where(jets["QG_nTracks"][fake] == 1, rng.integers(0, 3, nf), rng.integers(3, 5, nf)),
         "RNNJetScore": rng.beta(*TAU_FAKE_JETSCORE, nf), "truth_tau": np.zeros(nf, bool), "pt_true": jets["pt_true"][fake]}
    t = {k: np.concatenate([t[k], f[k]]) for k in f}
    t["RNNEleScore"] = rng.beta(*TAU_ELESCORE, len(t["pt"]))
    t["m"] = np.full(len(t["pt"]), 0.0)
    return sort_by_pt(t)


def soft_term(p, calo, in_jet, electrons, photons, ev, rng) -> dict:
    """The MET soft term (GeV): calorimeter particles outside the reconstructed objects."""
    used = in_jet.copy()
    used[electrons["truth"]] = True
    used[photons["truth"]] = True
    soft = calo & ~used
    n_ev = p["n_events"]
    e = p["event"][soft]
    sumet_all = np.bincount(p["event"][calo], weights=p["pt"][calo], minlength=n_ev)
    sigma = quad(MET_SOFT_STOCH * np.sqrt(sumet_all), MET_SOFT_PER_MU_GEV * ev["mu"])
    mpx = -np.bincount(e, weights=p["px"][soft], minlength=n_ev) + sigma * rng.standard_normal(n_ev)
    mpy = -np.bincount(e, weights=p["py"][soft], minlength=n_ev) + sigma * rng.standard_normal(n_ev)
    sumet = np.bincount(e, weights=p["pt"][soft], minlength=n_ev)
    # charged part (what the track soft term sees): tracks from the hard scatter outside objects
    trk = soft & (p["charge"] != 0) & (p["pt"] > TRACK_PT_MIN_GEV) & (np.abs(p["eta"]) < TRACK_ETA_MAX)
    et = p["event"][trk]
    return {"soft_mpx": mpx, "soft_mpy": mpy, "soft_sumet": sumet,
            "trk_mpx": -np.bincount(et, weights=p["px"][trk], minlength=n_ev),
            "trk_mpy": -np.bincount(et, weights=p["py"][trk], minlength=n_ev),
            "trk_sumet": np.bincount(et, weights=p["pt"][trk], minlength=n_ev)}


def charge_table(particle_data):
    """A vectorised pid -> electric charge lookup built from Pythia's particle data."""
    cache: dict[int, float] = {}

    def charge_of(pid: np.ndarray) -> np.ndarray:
        uniq, inv = np.unique(pid, return_inverse=True)
        for u in uniq:
            if int(u) not in cache:
                cache[int(u)] = particle_data.chargeType(int(u)) / 3.0
        return np.array([cache[int(u)] for u in uniq])[inv]

    return charge_of
