"""Jet constituents and track hit summaries (step1, common/jet_constituents.py): the real PHYSLITE files
(GhostTrack links, TTree and RNTuple), CMS PFNano (PF candidate association), NanoAOD without candidates
(dR < 0.4 tracks), the built-in ttbar sample (step0 writes GhostTrack links), and bad input. Expected
constituents are recomputed here from the raw branches with uproot and awkward."""
from __future__ import annotations

import sys
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pytest
import uproot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import step1_convert  # noqa: E402
from common.h5io import read_metadata  # noqa: E402
from common.physlite import link_index  # noqa: E402
from common.schema import HIT_SUMMARIES, MAX_CONSTITUENTS, OBJECTS  # noqa: E402
from session_cache import generated  # noqa: E402

DATA = ROOT / "tests" / "data"
RUN2 = DATA / "physlite" / "PHYSLITE_example.root"
RNTUPLE = DATA / "physlite" / "physlite_r25_rntuple.root"
PFNANO = DATA / "nanoaod" / "pfnano.root"
NANO = DATA / "nanoaod" / "nano_dy.root"
JET_PT_CUT, MAX_JETS = 20.0, 15  # step1's defaults


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("h5")
    assert step1_convert.main([str(p) for p in (RUN2, RNTUPLE, PFNANO, NANO)] + ["--out-dir", str(out), "--step", "37"]) == 0
    return {"run2": out / "PHYSLITE_example.h5", "rntuple": out / "physlite_r25_rntuple.h5",
            "pfnano": out / "pfnano.h5", "nano": out / "nano_dy.h5"}


@pytest.fixture(scope="module")
def ttbar(tmp_path_factory):
    d = tmp_path_factory.mktemp("ttbar")
    assert step1_convert.main([str(generated(tmp_path_factory, "ttbar")), "--out-dir", str(d)]) == 0
    return d / "ttbar.h5"


def stored(path, *names):
    with h5py.File(path, "r") as f:
        return [f[n][:] for n in names]


def stored_jet_order(jet_pt):
    """Per event, the raw jet indices of the stored jets: pT > cut, pT-descending, the first MAX_JETS."""
    order = ak.argsort(jet_pt, axis=1, ascending=False, stable=True)
    return order[jet_pt[order] > JET_PT_CUT][:, :MAX_JETS]


def padded(per_jet) -> np.ndarray:
    """(events, jets, constituents) awkward -> (events, MAX_JETS, MAX_CONSTITUENTS) numpy, zero padded."""
    regular = ak.pad_none(ak.pad_none(per_jet, MAX_CONSTITUENTS, axis=2, clip=True), MAX_JETS, axis=1, clip=True)
    return np.ma.filled(ak.to_numpy(regular), 0)


@pytest.mark.parametrize("which, path, tree, sep", [("run2", RUN2, "CollectionTree", "."),
                                                    ("rntuple", RNTUPLE, "EventData", ":")])
def test_physlite_constituents_are_the_valid_ghost_track_links(converted, which, path, tree, sep):
    t = uproot.open(path)[tree]
    jet_pt = t[f"AnalysisJetsAuxDyn{sep}pt"].array() / 1000
    links = t[f"AnalysisJetsAuxDyn{sep}GhostTrack"].array()
    theta = t[f"InDetTrackParticlesAuxDyn{sep}theta"].array()
    trk = {"pt": np.sin(theta) / abs(t[f"InDetTrackParticlesAuxDyn{sep}qOverP"].array()) / 1000,
           "eta": -np.log(np.tan(theta / 2)), "phi": t[f"InDetTrackParticlesAuxDyn{sep}phi"].array()}
    valid = (links.m_persKey != 0) & (links.m_persIndex < ak.num(theta)[:, None, None])
    index = ak.values_astype(links.m_persIndex[valid], np.int64)
    first = np.cumsum(ak.to_numpy(ak.num(theta))) - ak.to_numpy(ak.num(theta))
    flat_index = ak.to_numpy(ak.flatten(index + first, axis=None))  # into the flattened tracks
    per_jet = {k: ak.unflatten(ak.unflatten(ak.to_numpy(ak.flatten(v))[flat_index], ak.flatten(ak.num(index, axis=2))),
                               ak.num(index, axis=1)) for k, v in trk.items()}  # (events, jets, links)
    keep = stored_jet_order(jet_pt)
    by_pt = ak.argsort(per_jet["pt"], axis=2, ascending=False, stable=True)
    expected = {k: padded(v[by_pt][keep]) for k, v in per_jet.items()}

    pt, eta, phi, mask, n, jets_mask = stored(converted[which], *(f"common/jet_constituents/{v}" for v in
                                                                 ("pt", "eta", "phi", "mask", "n")), "common/jets/mask")
    assert pt.shape == (100, MAX_JETS, MAX_CONSTITUENTS) and mask.dtype == bool and n.dtype == np.int16
    np.testing.assert_array_equal(n, mask.sum(axis=2))
    assert not n[~jets_mask].any()  # no constituents in an empty jet slot
    np.testing.assert_array_equal(mask, expected["pt"] > 0)
    for name, got in (("pt", pt), ("eta", eta), ("phi", phi)):
        np.testing.assert_allclose(got, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    meta = read_metadata(converted[which])["jet_constituents"]
    assert meta["method"] == "ghost_track_links" and meta["max_constituents"] == MAX_CONSTITUENTS
    assert meta["links_total"] == int(ak.sum(ak.num(links, axis=2))) and meta["links_valid"] == int(ak.sum(valid))
    assert 0.1 < meta["valid_fraction"] < 0.3  # PHYSLITE thins its tracks, keeps the links


def test_a_null_key_invalidates_a_link_in_every_spelling():
    """Records (a real file's GhostTrack), a split key column (B/B.m_persKey, step0's B_m_persKey)."""
    index, key = ak.Array([[0, 3], [1]]), ak.Array([[0, 490246363], [490246363]])
    expected = [[-1, 3], [1]]
    assert link_index(ak.zip({"m_persKey": key, "m_persIndex": index})).tolist() == expected
    assert link_index(index, key).tolist() == expected


def test_pfnano_constituents_are_the_associated_pf_candidates(converted):
    e = uproot.open(PFNANO)["Events"]
    a = e.arrays(["Jet_pt", "JetPFCands_jetIdx", "JetPFCands_pFCandsIdx", "PFCands_pt", "PFCands_charge"])
    keep = ak.to_list(stored_jet_order(a.Jet_pt))
    jet_idx, cand_idx = ak.to_list(a.JetPFCands_jetIdx), ak.to_list(a.JetPFCands_pFCandsIdx)
    cand_pt = ak.to_list(a.PFCands_pt)
    expected = np.zeros((len(keep), MAX_JETS, MAX_CONSTITUENTS), np.float32)
    for ev, jets in enumerate(keep):  # 10 events: a plain loop is the clearest independent computation
        for slot, j in enumerate(jets):
            pts = sorted((cand_pt[ev][c] for jj, c in zip(jet_idx[ev], cand_idx[ev]) if jj == j), reverse=True)
            expected[ev, slot, : min(len(pts), MAX_CONSTITUENTS)] = pts[:MAX_CONSTITUENTS]
    pt, charge, d0, mask = stored(converted["pfnano"], *(f"common/jet_constituents/{v}" for v in ("pt", "charge", "d0", "mask")))
    np.testing.assert_allclose(pt, expected, rtol=1e-6)
    assert set(np.unique(charge[mask])) == {-1, 0, 1}  # charged and neutral candidates
    assert np.isnan(d0[mask & (charge == 0)]).all() and np.isfinite(d0[mask & (charge != 0)]).all()
    assert read_metadata(converted["pfnano"])["jet_constituents"] == {"method": "pfnano_association",
                                                                      "max_constituents": MAX_CONSTITUENTS}


def test_nanoaod_without_candidates_takes_tracks_within_dr(converted):
    jet_eta, jet_phi, jets_mask, eta, phi, mask = stored(
        converted["nano"], "common/jets/eta", "common/jets/phi", "common/jets/mask",
        "common/jet_constituents/eta", "common/jet_constituents/phi", "common/jet_constituents/mask")
    dphi = np.angle(np.exp(1j * (phi - jet_phi[..., None])))
    dr = np.hypot(eta - jet_eta[..., None], dphi)
    assert mask.any() and (dr[mask] < 0.4).all() and not mask[~jets_mask].any()
    # independently: every IsoTrack whose nearest jet (pT > cut) axis lies within 0.4
    e = uproot.open(NANO)["Events"].arrays(["Jet_pt", "Jet_eta", "Jet_phi", "IsoTrack_eta", "IsoTrack_phi"])
    pairs = ak.cartesian({"t": ak.zip({"eta": e.IsoTrack_eta, "phi": e.IsoTrack_phi}),
                          "j": ak.zip({"eta": e.Jet_eta, "phi": e.Jet_phi})[e.Jet_pt > JET_PT_CUT]}, nested=True)
    d = np.hypot(pairs.t.eta - pairs.j.eta, np.angle(np.exp(1j * (pairs.t.phi - pairs.j.phi))))
    assert int(mask.sum()) == int(ak.sum(ak.min(d, axis=2) < 0.4))
    meta = read_metadata(converted["nano"])
    assert meta["jet_constituents"] == {"method": "delta_r", "delta_r": 0.4, "max_constituents": MAX_CONSTITUENTS}
    assert "common/jet_constituents/charge" in meta["missing_features"]  # IsoTrack stores no charge


def test_physlite_tracks_carry_hit_summaries(converted):
    names = [f.name for f in HIT_SUMMARIES]
    assert {"numberOfPixelHits", "numberOfSCTHits", "numberOfInnermostPixelLayerHits"} <= {
        f.name for f in OBJECTS["tracks"].token_features}
    for which in ("run2", "rntuple"):
        assert not [m for m in read_metadata(converted[which])["missing_features"] if m.split("/")[-1] in names]
        values = dict(zip(names, stored(converted[which], *(f"atlas/tracks/{n}" for n in names))))
        trk_mask, c_mask, c_pix = stored(converted[which], "common/tracks/mask", "common/jet_constituents/mask",
                                          "atlas/jet_constituents/numberOfPixelHits")
        for name, v in values.items():
            v = v[trk_mask]
            assert (v >= 0).all() and (v == np.round(v)).all(), name
        assert 2 < values["numberOfPixelHits"][trk_mask].mean() < 7 and 6 < values["numberOfSCTHits"][trk_mask].mean() < 12
        assert 2 < c_pix[c_mask].mean() < 7
    nano_missing = read_metadata(converted["nano"])["missing_features"]
    assert not [m for m in nano_missing if "numberOf" in m]  # CMS files hold no ATLAS features at all


def test_links_requested_on_a_file_without_links_fails_that_file_only(tmp_path, capsys):
    code = step1_convert.main([str(NANO), str(RUN2), "--out-dir", str(tmp_path), "--constituents", "links"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines[0] == (f"error: {NANO}: --constituents links: the file has no "
                        "AnalysisJetsAuxDyn.GhostTrack links (ATLAS PHYSLITE)")
    assert "Traceback" not in err and not (tmp_path / "nano_dy.h5").exists()
    assert read_metadata(tmp_path / "PHYSLITE_example.h5")["jet_constituents"]["method"] == "ghost_track_links"


def test_delta_r_and_none_on_request(tmp_path):
    assert step1_convert.main([str(RUN2), "--out-dir", str(tmp_path / "dr"), "--constituents", "delta_r"]) == 0
    meta = read_metadata(tmp_path / "dr" / "PHYSLITE_example.h5")["jet_constituents"]
    assert meta == {"method": "delta_r", "delta_r": 0.4, "max_constituents": MAX_CONSTITUENTS}
    assert step1_convert.main([str(RUN2), "--out-dir", str(tmp_path / "none"), "--constituents", "none"]) == 0
    with h5py.File(tmp_path / "none" / "PHYSLITE_example.h5") as f:
        assert "jet_constituents" not in f["common"]


def test_chunking_does_not_change_the_constituents(converted, tmp_path):
    assert step1_convert.main([str(RNTUPLE), "--out-dir", str(tmp_path), "--step", "1000"]) == 0
    names = ["common/jet_constituents/pt", "common/jet_constituents/z0", "common/jet_constituents/charge",
             "atlas/jet_constituents/numberOfSCTHits", "common/jet_constituents/n"]
    for a, b in zip(stored(converted["rntuple"], *names), stored(tmp_path / "physlite_r25_rntuple.h5", *names)):
        np.testing.assert_array_equal(a, b)


def test_builtin_ttbar_jets_have_ghost_track_constituents(ttbar):
    meta = read_metadata(ttbar)
    assert meta["jet_constituents"]["method"] == "ghost_track_links" and meta["jet_constituents"]["valid_fraction"] == 1.0
    assert meta["missing_features"] == []
    jet_pt, jets_mask, n, eta, phi, jet_eta, jet_phi, mask = stored(
        ttbar, "common/jets/pt", "common/jets/mask", "common/jet_constituents/n", "common/jet_constituents/eta",
        "common/jet_constituents/phi", "common/jets/eta", "common/jets/phi", "common/jet_constituents/mask")
    assert n[jets_mask & (jet_pt > 25)].mean() >= 5
    dr = np.hypot(eta - jet_eta[..., None], np.angle(np.exp(1j * (phi - jet_phi[..., None]))))
    assert np.mean(dr[mask] < 0.5) > 0.99  # ghosts of anti-kt R = 0.4 jets
    # hit summaries follow the detector: no TRT beyond |eta| 2.0, an IBL hit on most tracks
    t_eta, t_mask, trt, ibl = stored(ttbar, "common/tracks/eta", "common/tracks/mask", "atlas/tracks/numberOfTRTHits",
                                     "atlas/tracks/numberOfInnermostPixelLayerHits")
    forward, central = t_mask & (np.abs(t_eta) > 2.05), t_mask & (np.abs(t_eta) < 0.6)
    assert trt[forward].max() == 0 and trt[central].mean() > 25 and 0.85 < ibl[t_mask].mean() <= 1
