"""step1_convert.py on the real PHYSLITE (TTree, RNTuple) and NanoAOD files, on synthetic PHYSLITE-like
files written here with uproot (as step0 writes them), and on bad inputs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pytest
import uproot

from common import nanoaod, physics, physlite
from common.h5io import object_datasets, read_metadata
from common.root_to_h5 import finish_chunk
from common.schema import LIST_OBJECTS, METADATA_KEYS, MISSING_INT, OBJECTS, features_for

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
RUN2 = DATA / "physlite" / "PHYSLITE_example.root"
RNTUPLE = DATA / "physlite" / "physlite_r25_rntuple.root"
NANO = DATA / "nanoaod" / "nano_dy.root"
NANO_EMPTY = DATA / "nanoaod" / "nano_dy_empty.root"
NANO_RNTUPLE = DATA / "nanoaod" / "nano_dy_rntuple.root"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import nano_layouts  # noqa: E402


def convert(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "step1_convert.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def read_all(path) -> dict:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("h5")
    r = convert(RUN2, RNTUPLE, NANO, NANO_RNTUPLE, "--out-dir", out, "--step", 37)
    assert r.returncode == 0, r.stderr
    return {"run2": out / "PHYSLITE_example.h5", "rntuple": out / "physlite_r25_rntuple.h5", "nano": out / "nano_dy.h5",
            "nano_rntuple": out / "nano_dy_rntuple.h5"}


# ------------------------------------------------------------------------------------------------
# real files: schema contract and physics sanity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which,experiment,n_events", [("run2", "atlas", 100), ("rntuple", "atlas", 100), ("nano", "cms", 40),
                                                       ("nano_rntuple", "cms", 40)])
def test_schema_dtypes_mask_sorting(real, which, experiment, n_events):
    data, meta = read_all(real[which]), read_metadata(real[which])
    assert set(METADATA_KEYS) <= set(meta), set(METADATA_KEYS) - set(meta)
    assert meta["experiment"] == experiment and meta["n_events"] == n_events
    expected = {k for obj in (*OBJECTS, "jet_constituents") for k in object_datasets(obj, experiment)}
    assert set(data) == expected
    other = "cms" if experiment == "atlas" else "atlas"
    assert not any(k.startswith(other + "/") for k in data)
    for obj in LIST_OBJECTS:
        m, mask, n = meta["max_objects"][obj], data[f"common/{obj}/mask"], data[f"common/{obj}/n"]
        assert mask.dtype == bool and n.dtype == np.int32 and mask.shape == (n_events, m)
        np.testing.assert_array_equal(mask.sum(axis=1), n)
        assert (mask == (np.arange(m) < n[:, None])).all()  # real objects first
        pt = data[f"common/{obj}/pt"]
        assert (np.diff(np.where(mask, pt, -1.0), axis=1) <= 0).all(), f"{obj} not pT-sorted"
        assert (pt[mask] > meta["pt_cuts"][obj]).all()
        for f in features_for(obj, experiment):
            arr = data[f"{f.group}/{obj}/{f.name}"]
            assert arr.dtype == np.dtype(f.dtype) and arr.shape == (n_events, m), f"{f.group}/{obj}/{f.name}"
            assert (arr[~mask] == 0).all(), f"padding of {f.name} is not zero"
    for obj in ("met", "event"):
        for f in features_for(obj, experiment):
            assert data[f"{f.group}/{obj}/{f.name}"].shape == (n_events,)
    assert (data["common/event/experiment_id"] == {"atlas": 0, "cms": 1}[experiment]).all()
    assert (data["common/event/is_simulation"] == 1).all()


@pytest.mark.parametrize("which", ["run2", "rntuple", "nano"])
def test_physical_ranges(real, which):
    d = read_all(real[which])
    e = d["common/electrons/mask"]
    assert e.any() and (d["common/electrons/pt"][e] < 7000).all()  # GeV, not MeV
    assert (np.abs(d["common/electrons/eta"][e]) < 2.7).all()
    assert set(np.unique(d["common/electrons/charge"][e])) <= {-1, 1}
    for obj in ("electrons", "muons", "photons"):
        iso = d[f"common/{obj}/trk_iso03"][d[f"common/{obj}/mask"]]
        assert np.isfinite(iso).all() and (iso >= 0).all()
    t = d["common/tracks/mask"]
    assert (np.abs(d["common/tracks/phi"][t]) <= np.pi).all() and (np.abs(d["common/tracks/eta"][t]) < 2.6).all()
    assert (np.abs(d["common/event/pvz"]) < 300).all()  # mm
    assert (d["common/met/pt"] >= 0).all() and (np.abs(d["common/met/phi"]) <= np.pi).all()
    assert (d["common/met/sumet"] >= d["common/met/pt"] - 1e-3).all()


@pytest.mark.parametrize("which", ["run2", "rntuple"])
def test_btag_scores_through_link(real, which):
    d = read_all(real[which])
    j = d["common/jets/mask"]
    for tagger in ("GN2", "DL1d"):
        p = np.stack([d[f"atlas/jets/{tagger}_{c}"][j] for c in ("pb", "pc", "pu")])
        assert ((p >= 0) & (p <= 1)).all()
        # every jet got one whole BTagging entry (no NaN, no mixing); GN2v01 also has a ptau class
        if tagger == "GN2" and which == "rntuple":
            assert (p.sum(axis=0) <= 1 + 1e-5).all() and np.median(p.sum(axis=0)) > 0.9
        else:
            np.testing.assert_allclose(p.sum(axis=0), 1.0, atol=1e-4)


def test_values_match_a_plain_uproot_read(real):
    """Leading electron pT, track pT from q/p and the link-gathered GN2 score, recomputed independently."""
    d = read_all(real["run2"])
    cut = read_metadata(real["run2"])["pt_cuts"]
    t = uproot.open(RUN2)["CollectionTree"]
    a = t.arrays(["AnalysisElectronsAuxDyn.pt", "InDetTrackParticlesAuxDyn.qOverP", "InDetTrackParticlesAuxDyn.theta",
                  "AnalysisJetsAuxDyn.pt", "BTagging_AntiKt4EMPFlowAuxDyn.GN2v00_pb",
                  "AnalysisJetsAuxDyn.btaggingLink/AnalysisJetsAuxDyn.btaggingLink.m_persIndex"], library="np")
    for i in range(100):
        ept = np.sort(a["AnalysisElectronsAuxDyn.pt"][i] / 1000)[::-1]
        ept = ept[ept > cut["electrons"]]
        assert d["common/electrons/n"][i] == min(len(ept), 6)
        np.testing.assert_allclose(d["common/electrons/pt"][i][: len(ept[:6])], ept[:6], rtol=1e-6)
        tpt = np.sin(a["InDetTrackParticlesAuxDyn.theta"][i]) / np.abs(a["InDetTrackParticlesAuxDyn.qOverP"][i]) / 1000
        tpt = np.sort(tpt[tpt > cut["tracks"]])[::-1][:30]
        np.testing.assert_allclose(d["common/tracks/pt"][i][: len(tpt)], tpt, rtol=1e-5)
        jpt = a["AnalysisJetsAuxDyn.pt"][i] / 1000
        if len(jpt) and jpt.max() > cut["jets"]:
            lead = np.argmax(jpt)
            idx = a["AnalysisJetsAuxDyn.btaggingLink/AnalysisJetsAuxDyn.btaggingLink.m_persIndex"][i][lead]
            assert d["atlas/jets/GN2_pb"][i, 0] == pytest.approx(a["BTagging_AntiKt4EMPFlowAuxDyn.GN2v00_pb"][i][idx])


def test_nanoaod_fills_the_same_common_keys(real):
    atlas = {k for k in read_all(real["run2"]) if k.startswith("common/")}
    cms = read_all(real["nano"])
    assert {k for k in cms if k.startswith("common/")} == atlas
    meta = read_metadata(real["nano"])
    assert "common/jets/n_trk" in meta["missing_features"]  # standard NanoAOD of this age has no charged multiplicity
    j = cms["common/jets/mask"]
    assert np.isnan(cms["common/jets/n_trk"][j]).all()
    mu = cms["common/muons/mask"]
    assert (cms["common/muons/pt"][mu] > 5).all() and (cms["common/muons/pt"][mu] < 1000).all()


def test_chunk_size_does_not_change_the_output(real, tmp_path):
    r = convert(RUN2, "--out-dir", tmp_path, "--step", 1000)
    assert r.returncode == 0, r.stderr
    big, small = read_all(tmp_path / "PHYSLITE_example.h5"), read_all(real["run2"])
    assert big.keys() == small.keys()
    for k in big:
        np.testing.assert_array_equal(big[k], small[k], err_msg=k)


def assert_same_datasets(a: dict, b: dict, skip_objects=()):
    assert a.keys() == b.keys()
    for k in a:
        if k.split("/")[1] not in skip_objects:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_nanoaod_rntuple_gives_the_datasets_of_the_ttree(real):
    """nano_dy_rntuple.root holds the 40 events of nano_dy.root as an RNTuple."""
    assert_same_datasets(read_all(real["nano_rntuple"]), read_all(real["nano"]))
    ttree, rntuple = read_metadata(real["nano"]), read_metadata(real["nano_rntuple"])
    assert (ttree["input_tree"], rntuple["input_tree"]) == ("TTree Events", "RNTuple Events")
    for key in ("missing_features", "branch_sources", "met_definition"):
        assert rntuple[key] == ttree[key], key


def write_physlite_as_rntuple(path) -> Path:
    """The branches the converter reads from the Run 2 PHYSLITE TTree, written with uproot as an RNTuple
    `EventData` the way Athena 25 spells its fields (`<Container>AuxDyn:<var>`, ElementLinks as records)."""
    tree = uproot.open(RUN2)["CollectionTree"]
    columns = sorted(set(physlite.PhysliteReader(tree, "ttree", {}).columns.values()))
    arrays = tree.arrays(columns, library="ak")
    fields: dict = {}
    for c in columns:
        name = physlite.spelled(c.split("/")[0], "rntuple")
        if "/" in c:  # a split ElementLink: m_persKey / m_persIndex
            fields.setdefault(name, {})[c.rsplit(".", 1)[1]] = arrays[c]
        else:
            fields[name] = ak.without_parameters(arrays[c])
    with uproot.recreate(path) as f:
        f.mkrntuple("EventData", ak.zip({k: ak.zip(v) if isinstance(v, dict) else v for k, v in fields.items()},
                                        depth_limit=1))
    return Path(path)


def test_physlite_ttree_and_its_rntuple_copy_convert_alike(real, tmp_path):
    copy = write_physlite_as_rntuple(tmp_path / "run2_as_rntuple.root")
    assert type(uproot.open(copy)["EventData"]).__name__.endswith("RNTuple")
    r = convert(copy, "--out-dir", tmp_path / "h5", "--step", 37)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "h5" / "run2_as_rntuple.h5"
    assert_same_datasets(read_all(out), read_all(real["run2"]))
    assert read_metadata(out)["input_tree"] == "RNTuple EventData"


OBJECT_OF = {prefix: obj for obj, table in nanoaod.COLLECTIONS.items() for prefix in table}
REDUCED = {"no_isotrack": ("IsoTrack",), "no_tau_photon": ("Tau", "Photon"),
           "muons_only": ("Electron", "Tau", "Photon", "Jet", "IsoTrack")}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """nano_dy's events in other NanoAOD layouts (tests/nano_layouts.py), converted in one run."""
    src = tmp_path_factory.mktemp("layouts")
    for name, drop in REDUCED.items():
        nano_layouts.reduced(src / f"{name}.root", drop=drop)
    nano_layouts.v15(src / "v15.root")
    collections, flat = nano_layouts.read_nano()
    nano_layouts.write_nano(src / "puppi_only.root", collections, {k: v for k, v in flat.items() if not k.startswith("MET_")})
    nano_layouts.scouting(src / "scouting.root")
    nano_layouts.scouting(src / "scouting_no_charge.root", electron_charge=False)
    r = convert(src, "--out-dir", src / "h5", "--step", 37)
    assert r.returncode == 0, r.stderr
    return {"src": src, "h5": src / "h5", "stderr": r.stderr}


@pytest.mark.parametrize("name", REDUCED)
def test_nanoaod_without_some_collections(real, layouts, name):
    """Older or reduced NanoAOD without IsoTrack, Tau, Photon ...: those objects convert as zero objects,
    are named in missing_features and in a warning; everything else is as in the full file."""
    absent = sorted(OBJECT_OF[c] for c in REDUCED[name])
    out = layouts["h5"] / f"{name}.h5"
    d, meta = read_all(out), read_metadata(out)
    assert [m for m in meta["missing_features"] if m.endswith(": all")] == [f"{obj}: all" for obj in absent]
    assert f"warning: {layouts['src'] / name}.root: no {', '.join(absent)} in this file, written as zero objects" \
        in layouts["stderr"]
    for obj in absent:
        assert (d[f"common/{obj}/n"] == 0).all() and not d[f"common/{obj}/mask"].any()
        assert all((d[k] == 0).all() for k in d if k.split("/")[1] == obj)
    derived = ["jet_constituents"] if {"jets", "tracks"} & set(absent) else []  # tracks within dR of the jets
    assert_same_datasets(d, read_all(real["nano"]), skip_objects=absent + derived)
    if derived:
        assert not d["common/jet_constituents/n"].any()


def test_nanoaod_met_by_version(real, layouts):
    """PF MET is PFMET_* from NanoAOD v15 on and MET_* before; PUPPI MET only when neither exists.
    met_definition names the branches read."""
    full = read_all(real["nano"])
    assert read_metadata(real["nano"])["met_definition"].startswith("CMS NanoAOD MET_pt, MET_phi, MET_sumEt: type-1")
    v15 = layouts["h5"] / "v15.h5"
    assert_same_datasets(read_all(v15), full)
    assert read_metadata(v15)["met_definition"].startswith("CMS NanoAOD PFMET_pt, PFMET_phi, PFMET_sumEt: type-1")
    puppi = layouts["h5"] / "puppi_only.h5"
    meta, d = read_metadata(puppi), read_all(puppi)
    assert meta["met_definition"].startswith("CMS NanoAOD PuppiMET_pt, PuppiMET_phi, PuppiMET_sumEt: PUPPI")
    stored = uproot.open(NANO)["Events"].arrays(["PuppiMET_pt", "PuppiMET_sumEt"], library="np")
    np.testing.assert_array_equal(d["common/met/pt"], stored["PuppiMET_pt"])
    np.testing.assert_array_equal(d["common/met/sumet"], stored["PuppiMET_sumEt"])
    assert not np.array_equal(d["common/met/pt"], full["common/met/pt"])


def test_scouting_nanoaod_maps_onto_the_common_layout(real, layouts):
    """nano_dy's objects under the Run 3 scouting names come out as from the standard collections;
    track d0 / z0 are recomputed from reference points 3 cm along each track."""
    full = read_all(real["nano"])
    out = layouts["h5"] / "scouting.h5"
    d, meta = read_all(out), read_metadata(out)
    kinematics = {"electrons": ("charge",), "muons": ("charge",), "photons": (), "jets": ("mass",), "tracks": ()}
    for obj, extra in kinematics.items():
        for feat in ("n", "mask", "pt", "eta", "phi", *extra):
            np.testing.assert_array_equal(d[f"common/{obj}/{feat}"], full[f"common/{obj}/{feat}"], err_msg=f"{obj}/{feat}")
    for feat in ("d0", "z0"):
        np.testing.assert_allclose(d[f"common/tracks/{feat}"], full[f"common/tracks/{feat}"], atol=2e-3, err_msg=feat)
    for key in ("common/met/pt", "common/met/phi", "common/event/pvx", "common/event/pvy", "common/event/pvz",
                "common/event/weight", "common/event/mu", "cms/event/event"):
        np.testing.assert_array_equal(d[key], full[key], err_msg=key)
    assert np.isnan(d["common/met/sumet"]).all() and (d["common/taus/n"] == 0).all()
    assert meta["met_definition"].startswith("CMS NanoAOD ScoutingMET_pt, ScoutingMET_phi: HLT scouting")
    assert meta["branch_sources"]["muons/pt"] == "ScoutingMuonVtx_pt"  # the vertex-constrained muons, not NoVtx
    assert meta["branch_sources"]["electrons/charge"] == "ScoutingElectron_bestTrack_charge"
    for path in ("taus: all", "common/met/sumet", "common/muons/trk_iso03", "common/jets/n_trk"):
        assert path in meta["missing_features"], path
    assert not any(p.startswith("common/tracks/") for p in meta["missing_features"])
    # without the electron charge the scouting electrons cannot be used: zero electrons, and the warning says why
    meta = read_metadata(layouts["h5"] / "scouting_no_charge.h5")
    assert "electrons: all" in meta["missing_features"]
    assert "ScoutingElectron lacks ScoutingElectron_bestTrack_charge" in layouts["stderr"]


# ------------------------------------------------------------------------------------------------
# physics helpers
# ------------------------------------------------------------------------------------------------
def test_track_isolation_definition():
    """Own track removed, pT floor, |z0 sin theta| cut, cone edge and phi wrap-around."""
    obj = {"eta": ak.Array([[0.0], [0.0]]), "phi": ak.Array([[3.1], [0.0]]), "pt": ak.Array([[10.0], [20.0]])}
    #            own     in cone   too soft  far in z0  outside   across phi = pi
    eta = ak.Array([[0.0, 0.1, 0.1, 0.1, 0.0, 0.0], []])
    phi = ak.Array([[3.1, 3.1, 3.1, 3.1, 2.7, -3.1], []])
    pt = ak.Array([[10.0, 2.0, 0.4, 3.0, 5.0, 1.0], []])
    z0 = ak.Array([[0.0, 1.0, 0.0, 10.0, 0.0, -2.0], []])
    theta = physics.theta_from_eta(eta)
    iso = physics.track_isolation(obj["eta"], obj["phi"], obj["pt"], eta, phi, pt, z0, theta, self_dr=0.01)
    assert iso.tolist()[0][0] == pytest.approx((2.0 + 1.0) / 10.0)
    assert iso.tolist()[1] == [0.0]
    with_self = physics.track_isolation(obj["eta"], obj["phi"], obj["pt"], eta, phi, pt, z0, theta)
    assert with_self.tolist()[0][0] == pytest.approx((10.0 + 2.0 + 1.0) / 10.0)


def test_flat_numpy_helpers():
    """The flat (offsets, values) helpers the converter runs on: sliced input, pT order with ties, cuts,
    truncation, out-of-range links."""
    full = ak.Array([[3.0, 1.0, 3.0, 2.0], [], [5.0, np.nan, 0.5], [7.0]])
    off, v = physics.flat(full[1:])  # offsets of a slice do not start at 0
    assert off.tolist() == [0, 0, 3, 4] and np.array_equal(v, [5.0, np.nan, 0.5, 7.0], equal_nan=True)
    off, pt = physics.flat(full)
    index, mask, n_kept = physics.padded_index(off, pt, pt > 0.9, 2)
    slots = physics.take_padded(np.arange(len(pt)), index, mask, np.int64)
    assert slots.tolist() == [[0, 2], [0, 0], [4, 0], [7, 0]]  # equal pT keep their stored order; NaN and 0.5 cut
    assert n_kept.tolist() == [4, 0, 1, 1] and mask.sum(axis=1).tolist() == [2, 0, 1, 1]
    assert physics.first_index_where(off, pt > 4).tolist() == [-1, -1, 0, 0]
    np.testing.assert_array_equal(physics.pick_per_event(off, pt, np.array([3, 0, 2, 1])), [2.0, np.nan, 0.5, np.nan])
    source, ok = physics.gather_index(off, np.array([0, 2, 2, 3, 4]), np.array([1, -1, 5, 0]))
    assert ok.tolist() == [True, False, False, True] and pt[source[ok]].tolist() == [1.0, 7.0]
    assert physics.per_event_sum(off, pt, pt > 1.5).tolist() == [8.0, 0.0, 5.0, 7.0]


def test_delta_phi_wraps():
    assert physics.delta_phi(np.float64(3.1), np.float64(-3.1)) == pytest.approx(6.2 - 2 * np.pi)
    assert abs(physics.delta_phi(np.array([np.pi]), np.array([-np.pi]))[0]) < 1e-12


# ------------------------------------------------------------------------------------------------
# synthetic PHYSLITE-like files (the way step0 writes them: uproot-split ElementLinks, no DFCommon flags)
# ------------------------------------------------------------------------------------------------
N_SYN = 40


def write_physlite_like(path, drop=(), metadata=True):
    rng = np.random.default_rng(7)
    n = N_SYN
    jag = lambda counts, values: ak.unflatten(np.asarray(values), np.asarray(counts))  # noqa: E731
    reg = lambda values: ak.from_regular(ak.Array(values))  # (n, k) numpy -> jagged, as PHYSLITE vectors  # noqa: E731
    n_mu, n_jet = rng.integers(0, 4, n), rng.integers(1, 6, n)
    mu_pt = jag(n_mu, np.repeat(60e3, n_mu.sum()) - rng.uniform(0, 50e3, n_mu.sum()))
    mu_pt = mu_pt[ak.argsort(mu_pt, ascending=False)]
    mu_bits = jag(n_mu, rng.integers(0, 16, n_mu.sum()).astype(np.uint8))
    jet_pt = jag(n_jet, rng.uniform(25e3, 300e3, n_jet.sum()))
    jet_pt = jet_pt[ak.argsort(jet_pt, ascending=False)]
    # b-tagging container in reverse jet order: only the link puts the scores on the right jet
    btag_idx = ak.local_index(jet_pt)[:, ::-1]
    pb_of_jet = 1.0 / (1.0 + jet_pt / 1e3)
    pb = pb_of_jet[:, ::-1]
    # one electron per event at (0.5, 1.0), 40 GeV; tracks: own, in cone (5 GeV), far in z0, too soft
    pvz = rng.uniform(-50, 50, n)
    theta = float(physics.theta_from_eta(0.5))
    trk = {"phi": [1.0, 1.1, 1.2, 1.05], "pt": [40e3, 5e3, 5e3, 0.3e3], "dz": [0.0, 1.0, 50.0, 0.0]}
    ones = np.ones((n, 1))
    branches = {
        "AnalysisElectronsAuxDyn.pt": jag(np.ones(n, int), np.full(n, 40e3, np.float32)),
        "AnalysisElectronsAuxDyn.eta": jag(np.ones(n, int), np.full(n, 0.5, np.float32)),
        "AnalysisElectronsAuxDyn.phi": jag(np.ones(n, int), np.full(n, 1.0, np.float32)),
        "AnalysisElectronsAuxDyn.charge": jag(np.ones(n, int), np.full(n, -1.0, np.float32)),
        "AnalysisMuonsAuxDyn.pt": ak.values_astype(mu_pt, np.float32),
        "AnalysisMuonsAuxDyn.eta": ak.values_astype(mu_pt * 0 + 1.5, np.float32),
        "AnalysisMuonsAuxDyn.phi": ak.values_astype(mu_pt * 0 - 2.0, np.float32),
        "AnalysisMuonsAuxDyn.charge": ak.values_astype(mu_pt * 0 + 1, np.float32),
        "AnalysisMuonsAuxDyn.quality": mu_bits,
        "AnalysisTauJetsAuxDyn.pt": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisTauJetsAuxDyn.eta": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisTauJetsAuxDyn.phi": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisTauJetsAuxDyn.charge": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisPhotonsAuxDyn.pt": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisPhotonsAuxDyn.eta": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisPhotonsAuxDyn.phi": jag(np.zeros(n, int), np.zeros(0, np.float32)),
        "AnalysisJetsAuxDyn.pt": ak.values_astype(jet_pt, np.float32),
        "AnalysisJetsAuxDyn.eta": ak.values_astype(jet_pt * 0 - 1.0, np.float32),
        "AnalysisJetsAuxDyn.phi": ak.values_astype(jet_pt * 0 + 2.5, np.float32),
        "AnalysisJetsAuxDyn.m": ak.values_astype(jet_pt * 0.1, np.float32),
        "AnalysisJetsAuxDyn.btaggingLink": ak.zip({"m_persKey": ak.values_astype(btag_idx * 0 + 12345, np.uint32),
                                                   "m_persIndex": ak.values_astype(btag_idx, np.uint32)}),
        "BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pb": ak.values_astype(pb, np.float32),
        "BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pc": ak.values_astype((1 - pb) / 2, np.float32),
        "BTagging_AntiKt4EMPFlowAuxDyn.GN2v01_pu": ak.values_astype((1 - pb) / 2, np.float32),
        "InDetTrackParticlesAuxDyn.phi": reg((ones * trk["phi"]).astype(np.float32)),
        "InDetTrackParticlesAuxDyn.theta": reg(np.full((n, 4), theta, np.float32)),
        "InDetTrackParticlesAuxDyn.qOverP": reg((ones * (np.sin(theta) / np.array(trk["pt"]))).astype(np.float32)),
        "InDetTrackParticlesAuxDyn.d0": reg(np.zeros((n, 4), np.float32)),
        "InDetTrackParticlesAuxDyn.z0": reg((pvz[:, None] + trk["dz"]).astype(np.float32)),
        "PrimaryVerticesAuxDyn.x": reg(np.zeros((n, 2), np.float32)),
        "PrimaryVerticesAuxDyn.y": reg(np.zeros((n, 2), np.float32)),
        "PrimaryVerticesAuxDyn.z": reg(np.stack([pvz, pvz + 20], axis=1).astype(np.float32)),
        "PrimaryVerticesAuxDyn.vertexType": reg(np.tile(np.array([1, 3], np.int16), (n, 1))),
        "MET_Core_AnalysisMETAuxDyn.mpx": reg(np.tile(np.array([0.0, 0.0], np.float32), (n, 1))),
        "MET_Core_AnalysisMETAuxDyn.mpy": reg(np.tile(np.array([0.0, 0.0], np.float32), (n, 1))),
        "MET_Core_AnalysisMETAuxDyn.sumet": reg(np.tile(np.array([0.0, 0.0], np.float32), (n, 1))),
        "MET_Core_AnalysisMETAuxDyn.source": reg(np.tile(np.array([69664, 81952], np.uint64), (n, 1))),
        "EventInfoAuxDyn.mcChannelNumber": np.full(n, 345060, np.uint32),
        "EventInfoAuxDyn.eventNumber": np.arange(n, dtype=np.uint64),
        "EventInfoAuxDyn.runNumber": np.full(n, 410000, np.uint32),
        "EventInfoAuxDyn.eventTypeBitmask": np.ones(n, np.uint32),
        "EventInfoAuxDyn.mcEventWeights": reg(np.tile(np.array([2.0, 1.0], np.float32), (n, 1))),
    }
    branches = {k: v for k, v in branches.items() if k not in drop}
    with uproot.recreate(path) as f:
        f.mktree("CollectionTree", {k: (v.type.content if isinstance(v, ak.Array) else v.dtype) for k, v in branches.items()})
        f["CollectionTree"].extend(branches)
        if metadata:
            f.mktree("GeneratorMetaData", {"process": "string", "dsid": np.int64, "cross_section_pb": np.float64,
                                           "sum_weights": np.float64})
            f["GeneratorMetaData"].extend({"process": np.array(["hzz4l"]), "dsid": np.array([345060]),
                                           "cross_section_pb": np.array([0.0131]), "sum_weights": np.array([80.0])})
    return {"mu_pt": mu_pt, "mu_bits": mu_bits, "jet_pt": jet_pt}


def test_synthetic_step0_style_file(tmp_path):
    truth = write_physlite_like(tmp_path / "syn.root")
    keys = set(uproot.open(tmp_path / "syn.root")["CollectionTree"].keys())
    assert "AnalysisJetsAuxDyn.btaggingLink_m_persIndex" in keys  # what uproot writes for an ElementLink record
    r = convert(tmp_path / "syn.root", "--out-dir", tmp_path / "h5")
    assert r.returncode == 0, r.stderr
    d, meta = read_all(tmp_path / "h5" / "syn.h5"), read_metadata(tmp_path / "h5" / "syn.h5")
    # b-tag through the split link: the score of each jet is 1/(1+pT) by construction
    j = d["common/jets/mask"]
    np.testing.assert_allclose(d["atlas/jets/GN2_pb"][j], 1 / (1 + d["common/jets/pt"][j]), rtol=1e-5)
    # muon quality bits: quality = bits & 3, passIDCuts = bit 8 (no DFCommon flag in the file)
    mu = d["common/muons/mask"]
    bits = ak.to_numpy(ak.flatten(truth["mu_bits"][truth["mu_pt"] > 5e3])).astype(int)
    np.testing.assert_array_equal(d["atlas/muons/quality"][mu], bits & 3)
    np.testing.assert_array_equal(d["atlas/muons/passIDCuts"][mu], (bits & 8) > 0)
    # trk_iso03: own track removed, 5 GeV in cone counted, far-z0 and soft tracks not: 5/40
    np.testing.assert_allclose(d["common/electrons/trk_iso03"][:, 0], 5 / 40, rtol=1e-4)
    np.testing.assert_allclose(d["common/electrons/pt"][:, 0], 40.0)
    # z0 w.r.t. the vertexType-1 vertex; PV position stored
    np.testing.assert_allclose(np.sort(d["common/tracks/z0"][:, :3], axis=1), np.tile([0.0, 1.0, 50.0], (N_SYN, 1)), atol=1e-3)
    # absent non-kinematic features: listed, NaN / MISSING_INT on real objects
    for path in ("atlas/electrons/LHLoose", "atlas/electrons/topoetcone20", "atlas/jets/DL1d_pb", "common/jets/n_trk",
                 "common/event/mu", "atlas/muons/muonType"):
        assert path in meta["missing_features"], path
    assert (d["atlas/electrons/LHLoose"][:, 0] == MISSING_INT).all()
    assert np.isnan(d["atlas/electrons/topoetcone20"][:, 0]).all() and np.isnan(d["common/event/mu"]).all()
    assert "absent in this file" in r.stderr and r.stderr.count("warning:") == 1
    # generator metadata tree and weights
    assert meta["process"] == "hzz4l" and meta["dsid"] == 345060
    assert meta["cross_section_pb"] == pytest.approx(0.0131) and meta["sum_weights"] == pytest.approx(80.0)
    assert (d["common/event/weight"] == 2.0).all()
    # MET: soft terms are zero here, so MET is minus the vector sum of the selected objects
    px = 40 * np.cos(1.0) + np.where(mu, d["common/muons/pt"], 0).sum(1) * np.cos(-2.0) + \
        np.where(j, d["common/jets/pt"], 0).sum(1) * np.cos(2.5)
    py = 40 * np.sin(1.0) + np.where(mu, d["common/muons/pt"], 0).sum(1) * np.sin(-2.0) + \
        np.where(j, d["common/jets/pt"], 0).sum(1) * np.sin(2.5)
    np.testing.assert_allclose(d["common/met/pt"], np.hypot(px, py), rtol=1e-4)


def test_metadata_flags_override_and_missing_kinematic_branch(tmp_path):
    write_physlite_like(tmp_path / "a.root", metadata=False)
    write_physlite_like(tmp_path / "b.root", drop=("AnalysisMuonsAuxDyn.eta",))
    r = convert(tmp_path / "a.root", tmp_path / "b.root", "--out-dir", tmp_path / "h5", "--process", "zz4l",
                "--cross-section", "1.5")
    assert r.returncode == 1
    assert "error: " + str(tmp_path / "b.root") + ": missing kinematic branch AnalysisMuonsAuxDyn.eta" in r.stderr
    assert "Traceback" not in r.stderr
    meta = read_metadata(tmp_path / "h5" / "a.h5")
    assert meta["process"] == "zz4l" and meta["cross_section_pb"] == 1.5 and meta["dsid"] == 345060
    assert meta["sum_weights"] == pytest.approx(2.0 * N_SYN)  # no generator tree: sum of converted weights
    assert sorted(os.listdir(tmp_path / "h5")) == ["a.h5"]


# ------------------------------------------------------------------------------------------------
# bad inputs, reruns, shards, workers
# ------------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_each_and_others_still_convert(tmp_path):
    (tmp_path / "text.root").write_text("this is not a ROOT file\n")
    (tmp_path / "cut.root").write_bytes(RUN2.read_bytes()[: RUN2.stat().st_size // 2])
    with uproot.recreate(tmp_path / "other.root") as f:
        f.mktree("Nominal", {"x": np.float32})
        f["Nominal"].extend({"x": np.zeros(3, np.float32)})
    bad = [tmp_path / "missing.root", tmp_path / "text.root", tmp_path / "cut.root", tmp_path / "other.root", NANO_EMPTY]
    out = tmp_path / "h5"
    r = convert(*bad, NANO, "--out-dir", out)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    for path in bad:
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"error: {path}: ")]
        assert len(lines) == 1, (path, r.stderr)
    assert "file not found" in r.stderr and "no events" in r.stderr and "no known tree" in r.stderr
    assert sorted(os.listdir(out)) == ["nano_dy.h5"]  # no partial or temporary file left


def test_rerun_skips_and_overwrite_redoes(tmp_path):
    out = tmp_path / "h5"
    assert convert(NANO, "--out-dir", out).returncode == 0
    first = (out / "nano_dy.h5").stat().st_mtime_ns
    r = convert(NANO, "--out-dir", out)
    assert r.returncode == 0 and "skip" in r.stderr and (out / "nano_dy.h5").stat().st_mtime_ns == first
    r = convert(NANO, "--out-dir", out, "--overwrite", "--max-objects", "jets=3")
    assert r.returncode == 0 and read_metadata(out / "nano_dy.h5")["max_objects"]["jets"] == 3
    assert read_all(out / "nano_dy.h5")["common/jets/pt"].shape == (40, 3)


def test_shards_together_equal_one_run_and_workers_agree(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in (RUN2, NANO):
        shutil.copy(p, src / p.name)
    write_physlite_like(src / "syn.root")
    outs = []
    for k in (1, 2):
        r = convert(src, "--out-dir", tmp_path / "shards", "--shard", f"{k}/2")
        assert r.returncode == 0, r.stderr
        outs.append(set(os.listdir(tmp_path / "shards")))
    assert outs[0] and outs[0] < outs[1]
    r = convert(src, "--out-dir", tmp_path / "all", "--workers", "2", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert set(os.listdir(tmp_path / "all")) == outs[1] == {"PHYSLITE_example.h5", "nano_dy.h5", "syn.h5"}
    for name in outs[1]:
        a, b = read_all(tmp_path / "all" / name), read_all(tmp_path / "shards" / name)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}:{k}")


def test_bad_usage_exits_2(tmp_path):
    assert convert(NANO, "--out-dir", tmp_path, "--shard", "3/2").returncode == 2
    r = convert(NANO, "--out-dir", tmp_path, "--pt-cuts", "gluons=3")
    assert r.returncode == 2 and r.stderr.startswith("error: --pt-cuts")
    assert convert(NANO, "--out-dir", tmp_path, "--experiment", "lhcb").returncode == 2


def test_experiment_override_refuses_the_other_format(tmp_path):
    r = convert(NANO, "--out-dir", tmp_path, "--experiment", "atlas")
    assert r.returncode == 1 and "no known tree (CollectionTree, EventData)" in r.stderr


def test_finish_chunk_pads_and_counts_truncation():
    jagged = {"pt": ak.Array([[5.0, 50.0, 30.0, 1.0], []])}
    out = {}
    for obj in LIST_OBJECTS:
        for f in features_for(obj, "cms"):
            out[f"{f.group}/{obj}/{f.name}"] = ak.values_astype(jagged["pt"] * 0 + 1, f.dtype) if f.name != "pt" else jagged["pt"]
    for obj in ("met", "event"):
        for f in features_for(obj, "cms"):
            out[f"{f.group}/{obj}/{f.name}"] = np.zeros(2)
    truncated = {o: 0 for o in LIST_OBJECTS}
    cuts, maxes = {o: 2.0 for o in LIST_OBJECTS}, {o: 2 for o in LIST_OBJECTS}
    arrays = finish_chunk(out, "cms", cuts, maxes, truncated)
    np.testing.assert_array_equal(arrays["common/jets/pt"], [[50.0, 30.0], [0.0, 0.0]])
    np.testing.assert_array_equal(arrays["common/jets/n"], [2, 0])
    assert truncated["jets"] == 1  # the 5 GeV jet passed the cut but did not fit
