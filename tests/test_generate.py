"""step0_generate.py: real Pythia8 events through the parametric detector, checked for physics
sanity, file contract (real PHYSLITE names and units, step1 reads it), determinism and bad usage.
Samples of a few hundred events per process are generated once per session (session_cache.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pytest
import uproot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from plotting import plot_sample as ps  # noqa: E402
from session_cache import GENERATED_EVENTS, generated  # noqa: E402
from step_runner import run_script  # noqa: E402

EVENTS = GENERATED_EVENTS


def step0(*args, check=True):
    res = run_script("step0_generate.py", *args)
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return {proc: generated(tmp_path_factory, proc) for proc in EVENTS}


@pytest.fixture(scope="module")
def loaded(samples):
    return {p: ps.load(path) for p, path in samples.items()}


def tree_arrays(path):
    with uproot.open(path) as f:
        return f["CollectionTree"].arrays(library="ak")


def test_signal_m4l_peaks_at_125_with_a_few_gev_width(loaded):
    m4l = ps.four_lepton_mass(loaded["hzz4l"])
    assert len(m4l) >= 40, f"only {len(m4l)} of {EVENTS['hzz4l']} signal events pass the 4-lepton selection"
    core = m4l[(m4l > 110) & (m4l < 140)]
    assert len(core) / len(m4l) > 0.8
    assert 123.0 < np.median(core) < 126.5
    lo, hi = np.percentile(core, [16, 84])
    assert 0.5 < (hi - lo) / 2 < 5.0, f"m4l width {(hi - lo) / 2:.2f} GeV"
    # the ZZ background is broad and mostly above 180 GeV (on-shell ZZ)
    bkg = ps.four_lepton_mass(loaded["zz4l"])
    assert len(bkg) >= 30 and np.median(bkg) > 180


@pytest.mark.parametrize("proc", ["dy", "zz4l"])
def test_z_peak_at_91(loaded, proc):
    mll = ps.z_candidate_mass(loaded[proc])
    window = mll[(mll > 70) & (mll < 110)]
    assert len(window) > 60
    assert 89.0 < np.median(window) < 93.0
    assert np.mean(np.abs(window - 91.19) < 5) > 0.6  # a peak, not a flat spread


def test_ttbar_has_two_b_jets_and_gn2_separates_b_from_light(loaded):
    tt = loaded["ttbar"]
    assert 1.2 < ps.n_truth_bjets(tt).mean() < 2.3
    assert ps.n_truth_bjets(loaded["dy"]).mean() < 0.2
    samples = list(loaded.values())
    pooled = {lab: np.concatenate([ps.btag_discriminant(s, lab) for s in samples]) for lab in (ps.TRUTH_B, ps.TRUTH_LIGHT)}
    assert len(pooled[ps.TRUTH_B]) > 100 and len(pooled[ps.TRUTH_LIGHT]) > 100
    # the pipeline's b-jet definition (physics.is_bjet) tags b-labelled jets and rejects light ones
    eff_b, eff_light = ps.tagged_fraction(samples, ps.TRUTH_B), ps.tagged_fraction(samples, ps.TRUTH_LIGHT)
    assert eff_b > 0.6 and eff_light < 0.05, (eff_b, eff_light)


def test_btag_scores_sum_to_one_and_link_to_jets(samples):
    a = tree_arrays(samples["ttbar"])
    for tagger in ("DL1dv01", "GN2v01"):
        s = sum(a[f"BTagging_AntiKt4EMPFlowAuxDyn.{tagger}_{x}"] for x in ("pb", "pc", "pu"))
        assert np.allclose(ak.flatten(s), 1.0, atol=1e-5)
    idx = a["AnalysisJetsAuxDyn.btaggingLink_m_persIndex"]
    assert ak.all(idx == ak.local_index(a["AnalysisJetsAuxDyn.pt"]))
    assert ak.all(ak.num(a["BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pb"]) == ak.num(a["AnalysisJetsAuxDyn.pt"]))


def test_multiplicities_are_plausible(loaded, samples):
    mean = lambda p, o: float(ak.mean(loaded[p]["n"][o]))  # noqa: E731
    # four leptons, most reconstructed: 2.81 +- 0.03 per event in 2 000 events, +- 0.06 in this sample's 300
    assert mean("hzz4l", "electrons") + mean("hzz4l", "muons") > 2.5
    assert 4.0 < mean("ttbar", "jets") < 10.0
    assert mean("ttbar", "jets") > 2 * mean("dy", "jets")
    assert mean("dy", "taus") > mean("hzz4l", "taus")  # Z -> tau tau in dy, none in the signal
    for p in EVENTS:
        assert 40 < mean(p, "tracks") < 400
    a = tree_arrays(samples["dy"])
    mu = a["EventInfoAuxDyn.averageInteractionsPerCrossing"]
    n_vtx = ak.num(a["PrimaryVerticesAuxDyn.z"])
    assert 25 < np.mean(mu) < 50 and np.corrcoef(ak.to_numpy(mu), ak.to_numpy(n_vtx))[0, 1] > 0.7
    assert ak.all(a["PrimaryVerticesAuxDyn.vertexType"][:, 0] == 1)


def test_isolation_separates_prompt_from_nonprompt(loaded):
    prompt = np.concatenate([ps.lepton_isolation(s, True) for s in loaded.values()])
    nonprompt = np.concatenate([ps.lepton_isolation(s, False) for s in loaded.values()])
    assert len(prompt) > 200 and len(nonprompt) > 20
    assert np.mean(prompt < 0.1) > 0.85
    assert np.mean(nonprompt < 0.1) < 0.5
    # ID flags correlate with promptness: LHTight is much more frequent for prompt electrons
    el = ak.concatenate([s["electrons"] for s in loaded.values()])
    el = ak.flatten(el[el.pt > 10])
    assert ak.mean(el.loose[el.prompt]) > ak.mean(el.loose[~el.prompt]) + 0.2


def test_real_physlite_names_units_and_metadata(samples):
    a = tree_arrays(samples["hzz4l"])
    real = uproot.open(ROOT / "tests/data/physlite/PHYSLITE_example.root")["CollectionTree"].keys()
    ours = [k for k in a.fields if not k.startswith("n")]
    split_links = ("m_persKey", "m_persIndex", "GhostTrack_n")  # common/physlite_writer.py
    foreign = [k for k in ours if k not in real and "GN2v01" not in k and not k.endswith(split_links)
               and k.split(".")[-1] not in ("topoetcone40", "ptcone20", "DFCommonElectronsLHMedium", "truthType")]
    assert not foreign, f"branch names not in a real PHYSLITE file: {foreign}"
    assert np.median(ak.flatten(a["AnalysisMuonsAuxDyn.pt"])) > 5000  # MeV
    assert ak.all(a["EventInfoAuxDyn.mcChannelNumber"] == 345060)
    with uproot.open(samples["hzz4l"]) as f:
        meta = f["GeneratorMetaData"].arrays(library="np")
    assert meta["process"][0] == "hzz4l" and meta["dsid"][0] == 345060
    assert 1e-4 < meta["cross_section_pb"][0] < 1.0 and meta["sum_weights"][0] == EVENTS["hzz4l"]


def test_step1_reads_it_like_a_real_file(samples, tmp_path):
    res = run_script("step1_convert.py", samples["ttbar"], "--out-dir", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    with h5py.File(tmp_path / "ttbar.h5") as f:
        meta = dict(f["metadata"].attrs)
        assert meta["process"] == "ttbar" and int(meta["dsid"]) == 410470 and meta["cross_section_pb"] > 100
        # every feature is present: the jet track count comes as one int per jet, not per vertex
        assert meta["missing_features"] == "[]"
        jets = f["common/jets"]
        n_trk = jets["n_trk"][:][jets["mask"][:]]
        assert np.all(np.isfinite(n_trk)) and 2 < n_trk.mean() < 30
        assert np.nanmean(f["common/met/pt"][:]) > 20  # neutrinos from W decays
        assert np.all(f["common/event/mu"][:] > 0)


def test_same_seed_same_file_whatever_the_workers(tmp_path):
    a, b, c = tmp_path / "a.root", tmp_path / "b.root", tmp_path / "c.root"
    step0("--process", "dy", "--events", 90, "--seed", 3, "--block", 30, "--out", a)
    step0("--process", "dy", "--events", 90, "--seed", 3, "--block", 30, "--workers", 2, "--chunk", 40, "--out", b)
    step0("--process", "dy", "--events", 90, "--seed", 4, "--block", 30, "--out", c)
    ta, tb, tc = tree_arrays(a), tree_arrays(b), tree_arrays(c)
    assert ta.fields == tb.fields
    for k in ta.fields:
        assert ak.all(ak.ravel(ta[k]) == ak.ravel(tb[k])), k
    assert not ak.all(ak.num(ta["InDetTrackParticlesAuxDyn.phi"]) == ak.num(tc["InDetTrackParticlesAuxDyn.phi"]))


def test_bad_usage_skip_and_overwrite(tmp_path):
    out = tmp_path / "x.root"
    assert step0("--events", 0, "--out", out, check=False).returncode == 2
    assert step0("--process", "nope", "--out", out, check=False).returncode == 2
    step0("--process", "zz4l", "--events", 20, "--out", out)
    mtime = out.stat().st_mtime_ns
    res = step0("--process", "zz4l", "--events", 20, "--out", out)
    assert "skipped" in res.stderr and out.stat().st_mtime_ns == mtime
    step0("--process", "zz4l", "--events", 25, "--out", out, "--overwrite")
    assert uproot.open(out)["CollectionTree"].num_entries == 25
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind
    # a Pythia install whose data folder is not found (as with pip --target): one line that says what to set
    res = subprocess.run([sys.executable, str(ROOT / "step0_generate.py"), "--process", "dy", "--events", "10", "--out",
                          tmp_path / "y.root"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHIA8DATA": str(tmp_path / "nowhere")})
    assert res.returncode == 1 and "PYTHIA8DATA" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "y.root").exists()
