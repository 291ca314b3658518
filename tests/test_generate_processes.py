"""step0_generate.py's pretraining corpus (W+jets, QCD multijet, single top, WZ) and Higgs production
modes (VBF, WH, ZH, ttH beside ggF, all H -> ZZ* -> 4l), checked the way a physicist checks a new
sample: the W Jacobian edge, a falling jet spectrum, b-jets from tops, the Z in WZ, VBF tag jets,
the associated W/Z, m4l at the Higgs mass, and cross-sections against the known ones.
Each process is generated once per module (a few hundred real Pythia events) and read back through
common/sample_checks.py (the converter's branch names, MET and b-tagging)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import uproot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import step0_generate  # noqa: E402  (its main(argv) only)
from common import physlite, sample_checks  # noqa: E402
from common.physics import HIGGS_MASS, W_MASS, Z_MASS  # noqa: E402
from session_cache import GENERATED_EVENTS, generated  # noqa: E402

EVENTS = {"hzz4l": GENERATED_EVENTS["hzz4l"], "vbfh4l": 200, "whh4l": 200, "zhh4l": 150, "tthh4l": 250,
          "wjets": 250, "qcd": 150, "singletop": 150, "wz": 200}
DSID = {"hzz4l": 345060, "vbfh4l": 346228, "whh4l": 346311, "zhh4l": 346310, "tthh4l": 346343,
        "wjets": 361100, "qcd": 364701, "singletop": 410658, "wz": 364253}
HIGGS_MODES = ("hzz4l", "vbfh4l", "whh4l", "zhh4l", "tthh4l")
QCD_PTHAT_MIN = 30.0  # GeV, the qcd sample's generator cut
# Known cross-sections at 13.6 TeV (pb), higher-order: LHC Higgs WG (ggF N3LO, VBF, WH, ZH, ttH) times
# BR(H -> ZZ*) = 0.0262 and BR(Z -> ee or mumu)^2 = 0.0673^2; W, WZ and t-channel single top (t + tbar)
# at NNLO/NLO times BR(W -> l nu) = 0.326 and BR(Z -> ll) = 0.101 (l = e, mu, tau).
BR_H4L = 0.0262 * 0.0673 ** 2
REFERENCE_PB = {"hzz4l": 52.2 * BR_H4L, "vbfh4l": 4.08 * BR_H4L, "whh4l": 1.46 * BR_H4L, "zhh4l": 0.94 * BR_H4L,
                "tthh4l": 0.57 * BR_H4L, "wjets": 3 * 21.6e3, "singletop": 232.0 * 0.326, "wz": 51.0 * 0.326 * 0.101}
LO_RANGE = (0.4, 1.6)  # Pythia is leading order: within this factor of the reference


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("processes")
    paths = {"hzz4l": generated(tmp_path_factory, "hzz4l")}  # the one test_generate.py checks too
    for proc, n in EVENTS.items():
        if proc not in paths:  # one seed block per process: one Pythia initialisation each
            paths[proc] = d / f"{proc}.root"
            assert step0_generate.main(["--process", proc, "--events", str(n), "--seed", "11", "--block", str(n),
                                        "--out", str(paths[proc])]) == 0
    return paths


@pytest.fixture(scope="module")
def obs(samples):
    return {proc: sample_checks.observables(path) for proc, path in samples.items()}


def finite(x):
    return x[np.isfinite(x)]


def test_every_process_has_its_dataset_id_and_pythias_cross_section(samples):
    for proc, path in samples.items():
        with uproot.open(path) as f:
            meta = physlite.read_generator_metadata(f)
            tree = f["CollectionTree"]
            channel = tree["EventInfoAuxDyn.mcChannelNumber"].array(library="np")
            weights = np.asarray(tree["EventInfoAuxDyn.mcEventWeights"].array()[:, 0], np.float64)
        assert meta["process"] == proc and meta["dsid"] == DSID[proc] and np.all(channel == DSID[proc])
        # unweighted events, except the rare ones above Pythia's phase-space maximum (weight > 1)
        assert len(weights) == EVENTS[proc] and np.mean(weights == 1) > 0.95 and np.all(weights >= 1)
        assert meta["sum_weights"] == pytest.approx(weights.sum(), rel=1e-6)
        sigma = meta["cross_section_pb"]
        assert sigma > 0
        if proc in REFERENCE_PB:  # a missing branching ratio or a veto not counted would be off by 10-1000x
            ratio = sigma / REFERENCE_PB[proc]
            assert LO_RANGE[0] < ratio < LO_RANGE[1], f"{proc}: sigma {sigma:.3g} pb is {ratio:.2f} x the reference"
        else:
            assert sigma > 1e7, f"{proc}: sigma {sigma:.3g} pb"  # QCD at pTHat > 30 GeV: about 0.2 mb


def test_w_transverse_mass_has_its_jacobian_edge_at_the_w_mass(obs):
    mt = finite(obs["wjets"]["mt_w"])  # events with exactly one isolated lepton
    assert len(mt) > 0.35 * EVENTS["wjets"]
    near = np.mean((mt > W_MASS - 20) & (mt < W_MASS + 20))
    above = np.mean(mt > W_MASS + 20)
    edge = np.percentile(mt, 90)  # the Jacobian edge: mT falls off just below the W mass (plus resolution)
    assert near > 0.4 and above < 0.1, (near, above)
    assert W_MASS - 10 < edge < W_MASS + 15, edge


def test_qcd_jet_pt_falls_and_has_no_isolated_leptons(obs):
    q = obs["qcd"]
    jets = np.concatenate([finite(q["jet1_pt"]), finite(q["jet2_pt"])])
    counts, _ = np.histogram(jets, bins=[40, 55, 75, 100, 140])  # widening bins: a power law falls bin to bin
    assert np.all(np.diff(counts) < 0), counts
    assert np.median(finite(q["jet1_pt"])) > QCD_PTHAT_MIN
    assert np.mean(q["n_leptons"] > 0) < 0.05
    # QCD events are jets; in W+jets they come from initial-state radiation
    assert np.nanmean(q["n_jets"]) > 2 * np.nanmean(obs["wjets"]["n_jets"])


def test_single_top_has_a_b_jet_and_the_w_lepton(obs):
    t = obs["singletop"]
    assert np.mean(t["n_bjets"] >= 1) > 0.5
    assert np.mean(t["n_leptons"] >= 1) > 0.45
    assert np.mean((t["n_bjets"] >= 1) & (t["n_leptons"] >= 1)) > 0.25
    assert np.mean(obs["wjets"]["n_bjets"] >= 1) < 0.05  # b-jets are the top's, not the detector's


def test_wz_has_three_leptons_with_a_z(obs):
    w = obs["wz"]
    three = w["n_leptons"] >= 3
    assert three.mean() > 0.1
    mll = w["m_ll_z"][three]
    assert np.mean(np.abs(mll - Z_MASS) < 10) > 0.7, mll
    # the third lepton comes with the neutrino: MET well above that of QCD
    assert np.median(w["met"][three]) > 2 * np.median(obs["qcd"]["met"])


def test_vbf_has_two_forward_jets_with_a_large_mass(obs):
    def dijet(proc):
        two = np.isfinite(obs[proc]["m_jj"])
        return two.mean(), np.median(obs[proc]["deta_jj"][two]), np.median(obs[proc]["m_jj"][two])

    frac, deta, mjj = dijet("vbfh4l")
    frac_ggf, deta_ggf, mjj_ggf = dijet("hzz4l")
    assert frac > 0.45 and deta > 2.8 and mjj > 350, (frac, deta, mjj)
    assert frac > frac_ggf + 0.2 and deta > deta_ggf + 0.8 and mjj > 1.5 * mjj_ggf, (frac_ggf, deta_ggf, mjj_ggf)


@pytest.mark.parametrize("proc", ["whh4l", "zhh4l"])
def test_vh_has_the_associated_boson(obs, proc):
    vh, ggf = obs[proc], obs["hzz4l"]
    assert vh["n_jets"].mean() > ggf["n_jets"].mean() + 0.3  # W/Z -> qq
    fifth = np.mean(vh["n_leptons"] > 4)
    assert fifth > np.mean(ggf["n_leptons"] > 4) and np.mean(ggf["n_leptons"] > 4) < 0.01  # W -> l nu, Z -> ll
    assert fifth < 0.15  # the W or Z decays inclusively: rarely to leptons, unlike the H's Z bosons


def test_tth_has_b_jets(obs):
    tth = obs["tthh4l"]
    assert np.mean(tth["n_bjets"] >= 1) > 0.8
    assert tth["n_jets"].mean() > 4 and tth["n_jets"].mean() > obs["whh4l"]["n_jets"].mean() + 1.5
    assert np.mean(obs["hzz4l"]["n_bjets"] >= 1) < 0.1


@pytest.mark.parametrize("proc", HIGGS_MODES)
def test_m4l_peaks_at_the_higgs_mass_in_every_mode(obs, proc):
    m4l = finite(obs[proc]["m4l_h4l"])
    assert len(m4l) >= 10, f"only {len(m4l)} of {EVENTS[proc]} events pass the 4-lepton selection"
    core = m4l[np.abs(m4l - HIGGS_MASS) < 10]
    assert len(core) / len(m4l) > 0.7, np.sort(m4l)
    assert HIGGS_MASS - 2 < np.median(core) < HIGGS_MASS + 1.5


def test_run_all_refuses_an_unknown_pretraining_process_before_any_work(tmp_path):
    import os
    import subprocess

    env = {**os.environ, "PRETRAIN_PROCESSES": "wjets zjets", "RUN": str(tmp_path / "run"),
           "SAMPLE_DIR": str(tmp_path / "raw")}
    r = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "unknown process 'zjets'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "raw").exists(), "nothing generated"
