"""step2_tokenize: preprocessing round trips, quantizer behaviour, fit/apply end to end on a
synthetic step1 file (written with common.h5io), sequence contract, bad inputs, determinism."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import step2_tokenize as step2
from step_runner import run_script
from common import h5io, sequences, token_parquet, tokenizer_training
from common.pair_kinematics import KinematicsDecoder
from common.schema import MISSING_INT, OBJECTS, SEQUENCE_OBJECTS, TOKENIZED_OBJECTS, TYPE_IDS, features_for
from common.tokenizer import (ResidualEMAQuantizer, build_specs, fit_preprocessing, load_tokenizer, postprocess,
                              preprocess)

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # small tensors: one thread is faster on a shared 2-core machine
MAX_OBJ = {"electrons": 4, "muons": 4, "taus": 3, "photons": 3, "jets": 10, "tracks": 30}
MEAN_N = {"electrons": 1.2, "muons": 1.2, "taus": 0.5, "photons": 0.8, "jets": 4.0, "tracks": 12.0}


# ----------------------------------------------------------------------------------------------
# A synthetic step1 file: every schema dataset of the experiment, realistic-ish distributions
# ----------------------------------------------------------------------------------------------

def _feature_values(f, shape, rng, pt):
    if f.name == "pt":
        return pt
    if f.name == "phi":
        return rng.uniform(-np.pi, np.pi, shape)
    if f.name == "eta":
        return rng.normal(0, 1.4, shape).clip(-2.5, 2.5)
    if f.kind == "flag":
        return (rng.random(shape) < 0.7).astype(np.int8)
    if f.kind == "category":
        cats = np.asarray(f.categories)
        p = np.linspace(2, 1, len(cats)); p /= p.sum()
        return cats[rng.choice(len(cats), size=shape, p=p)].astype(f.dtype)
    if f.kind == "id":
        return np.arange(int(np.prod(shape))).reshape(shape).astype(np.int64)
    if f.name in ("trk_iso03", "ptvarcone30", "ptcone20"):
        return np.where(rng.random(shape) < 0.6, 0.0, rng.exponential(0.1, shape))
    if f.name in ("d0",):
        return rng.standard_t(3, shape) * 0.05
    if f.name in ("z0",):
        return rng.normal(0, 0.3, shape)
    if f.name == "qOverP":
        return np.sign(rng.normal(size=shape)) / np.maximum(pt, 0.5)
    if f.name in ("n_trk", "QG_nTracks", "nDoF"):
        return rng.poisson(np.clip(pt / 5, 1, 30)).astype(float)
    if f.name in ("mass",):
        return pt * rng.uniform(0.05, 0.2, shape)
    if f.name in ("RNNJetScore", "RNNEleScore"):
        return rng.beta(2, 5, shape)
    return rng.gamma(2.0, 1.0, shape) * (10 if f.unit == "GeV" else 1)


def write_synthetic_h5(path, n_events=2000, seed=0, experiment="atlas", process="ttbar", dsid=410470,
                       missing=(), drop=()):
    """A step1-format file: pT-sorted zero-padded objects with mask/n, met, event, metadata.
    `missing` features are NaN/MISSING_INT-filled and listed in missing_features; `drop` datasets are absent."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for obj, max_obj in MAX_OBJ.items():
        n = np.minimum(rng.poisson(MEAN_N[obj], n_events), max_obj).astype(np.int32)
        mask = np.arange(max_obj)[None, :] < n[:, None]
        scale = {"tracks": 3.0, "jets": 40.0}.get(obj, 25.0)
        floor = {"tracks": 0.5, "jets": 20.0}.get(obj, 5.0)
        pt = -np.sort(-(floor + rng.exponential(scale, (n_events, max_obj))), axis=1)
        for f in features_for(obj, experiment):
            if f.kind == "score":
                continue
            v = _feature_values(f, (n_events, max_obj), rng, pt)
            arrays[f"{f.group}/{obj}/{f.name}"] = np.where(mask, v, 0).astype(f.dtype)
        for group, fs in OBJECTS[obj].score_groups().items():  # Dirichlet triplets, b-like and light-like jets
            is_b = rng.random((n_events, max_obj)) < 0.2
            alpha = np.where(is_b[..., None], [6.0, 1.5, 0.5], [0.3, 0.8, 6.0])
            p = rng.gamma(alpha)
            p /= p.sum(-1, keepdims=True)
            for j, f in enumerate(fs):
                arrays[f"{f.group}/{obj}/{f.name}"] = np.where(mask, p[..., j], 0).astype(np.float32)
        arrays[f"common/{obj}/mask"] = mask
        arrays[f"common/{obj}/n"] = n
    arrays["common/met/pt"] = rng.gamma(2.0, 15.0, n_events).astype(np.float32)
    arrays["common/met/phi"] = rng.uniform(-np.pi, np.pi, n_events).astype(np.float32)
    arrays["common/met/sumet"] = (200 + rng.gamma(3.0, 100.0, n_events)).astype(np.float32)
    ev = {"pvx": rng.normal(0, 0.01, n_events), "pvy": rng.normal(0, 0.01, n_events),
          "pvz": rng.normal(0, 35, n_events), "mu": rng.gamma(9, 4, n_events),
          "experiment_id": np.zeros(n_events), "is_simulation": np.ones(n_events), "weight": np.ones(n_events)}
    for f in features_for("event", experiment):
        arrays[f"{f.group}/event/{f.name}"] = (np.asarray(ev[f.name]) if f.name in ev else np.arange(n_events)).astype(f.dtype)
    for key in missing:
        a = arrays[key]
        arrays[key] = np.full_like(a, MISSING_INT) if a.dtype.kind == "i" else np.full_like(a, np.nan)
    for key in drop:
        arrays.pop(key)
    with h5io.H5EventWriter(path, chunk_events=512) as w:
        for lo in range(0, max(n_events, 1), 700):  # n_events 0: every dataset, empty
            w.append({k: v[lo : lo + 700] for k, v in arrays.items()})
        w.close({"experiment": experiment, "input_file": "synthetic", "git_hash": "test", "process": process,
                 "dsid": dsid, "cross_section_pb": 1.0, "sum_weights": float(n_events), "missing_features": list(missing),
                 "max_objects": MAX_OBJ, "pt_cuts": {}, "met_definition": "synthetic"})
    return Path(path)


def run_step(*args) -> subprocess.CompletedProcess:
    return run_script("step2_tokenize.py", *args)


QUICK = ["--steps", "120", "--warmup-steps", "30", "--batch-size", "256", "--levels", "2", "--no-plots",
         "--preprocess-events", "2000", "--discrete-weight", "20", "--eval-objects", "5000", "--nested-levels", "none"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    h5 = [write_synthetic_h5(d / "ttbar.h5", 2500, seed=1), write_synthetic_h5(d / "dy.h5", 800, seed=2, process="dy", dsid=700320)]
    r = run_step("fit", "--h5", *h5, "--out-dir", d / "tok", *QUICK, "--seed", "3", "--workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    return d, h5


# ----------------------------------------------------------------------------------------------
# Preprocessing and quantizer units
# ----------------------------------------------------------------------------------------------

def test_preprocessing_round_trip_by_kind():
    """Decoding the preprocessed input itself (a perfect decoder) gives the physical values back."""
    rng = np.random.default_rng(0)
    feats = list(OBJECTS["jets"].token_features) + [OBJECTS["electrons"].feature("charge")]
    n = 20000
    p = rng.dirichlet([1, 1, 3], n)
    data = {"pt": 20 + rng.exponential(40, n), "eta": rng.normal(0, 1.5, n), "phi": rng.uniform(-np.pi, np.pi, n),
            "mass": rng.gamma(2, 5, n), "n_trk": rng.poisson(8, n).astype(float), "charge": rng.choice([-1, 1], n),
            "DL1d_pb": p[:, 0], "DL1d_pc": p[:, 1], "DL1d_pu": p[:, 2], "GN2_pb": p[:, 0], "GN2_pc": p[:, 1],
            "GN2_pu": p[:, 2], "QG_nTracks": rng.poisson(10, n).astype(float), "QG_tracksWidth": rng.gamma(2, 0.05, n),
            "QG_tracksC1": rng.gamma(3, 0.1, n)}
    specs = build_specs(feats)
    fit_preprocessing(specs, data)
    d_in = sum(s["n_in"] for s in specs)
    x = preprocess(specs, data, d_in)
    assert np.isfinite(x).all() and abs(x[:, specs[0]["in"][0]].std() - 1) < 0.05  # quantile -> normal
    # Build the decoder output a perfect model would give, from the input blocks.
    out = np.zeros((n, sum(s["n_out"] for s in specs)), np.float32)
    for s in specs:
        (a, b), (c, d) = s["in"], s["out"]
        if s["kind"] == "score":
            lr = x[:, a:b] * np.asarray(s["std"]) + np.asarray(s["mean"])
            out[:, c:d] = np.concatenate([lr, np.zeros((n, 1))], 1)
        elif s["kind"] == "flag":
            out[:, c] = x[:, a] * 5
        else:
            out[:, c:d] = x[:, a:b]
    back = postprocess(specs, out)
    np.testing.assert_allclose(back["pt"], data["pt"], rtol=0.02)  # the tails too: the table spans +-5 sigma
    np.testing.assert_allclose(back["phi"], data["phi"], atol=1e-5)
    np.testing.assert_allclose(back["mass"], data["mass"], rtol=0.05, atol=0.2)
    assert np.array_equal(back["charge"], data["charge"])
    np.testing.assert_allclose(back["DL1d_pb"], data["DL1d_pb"], atol=1e-4)
    s = back["GN2_pb"] + back["GN2_pc"] + back["GN2_pu"]
    np.testing.assert_allclose(s, 1, atol=1e-5)  # softmax out: on the simplex


def test_quantizer_kmeans_init_and_dead_code_reset():
    torch.manual_seed(0)
    q = ResidualEMAQuantizer(levels=2, size=64, dim=4, decay=0.9)
    z = torch.randn(4000, 4)
    q.kmeans_init(z[:1000], iters=10)
    assert bool(q.initialised)
    _, codes, _ = q.quantize(z)
    assert len(torch.unique(codes[:, 0])) >= 60  # k-means on a 15x buffer: (almost) all codes in use
    # kill 10 codes by moving them far away; a reset window must bring them back
    q.codebooks[0, :10] = 100.0
    q.ema_sum[0, :10] = 100.0 * q.ema_count[0, :10, None]  # the EMA state agrees: they stay far away
    q.train()
    for _ in range(20):
        q(z)
    _, _, residuals = q.quantize(z)
    n_reset = q.reset_dead_codes(residuals)
    assert int(n_reset[0]) >= 10
    _, codes, _ = q.quantize(z)
    assert len(torch.unique(codes[:, 0])) >= 60
    # residual levels reduce the error
    total1 = q.codebooks[0][codes[:, 0]]
    total2 = total1 + q.codebooks[1][codes[:, 1]]
    assert ((z - total2) ** 2).mean() < ((z - total1) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------

def test_fit_writes_loadable_checkpoints_with_quality(fitted):
    d, _ = fitted
    for obj in TOKENIZED_OBJECTS:
        side = json.loads((d / "tok" / f"{obj}.json").read_text())
        tok = load_tokenizer(d / "tok" / f"{obj}.pt")  # weights_only=True inside
        assert tok.levels == 2 and tok.features == side["features"]
        q = side["quality"]
        assert q["n_objects"] > 100 and len(q["codes"]) == 2
        assert side["provenance"]["settings"]["seed"] == 3
        for level in q["codes"]:
            assert 0 < level["used"] <= tok.codebook_size and level["perplexity"] > 1
    side = json.loads((d / "tok" / "jets.json").read_text())
    assert set(side["btag_working_points"]) == {"DL1d", "GN2"} if "btag_working_points" in side else True
    wps = side["quality"]["btag_working_points"]["GN2"]
    assert len(wps) == 4 and all(0 <= wp["eff_before"] <= 1 for wp in wps)
    # the held-out fraction passing the cut made at the 20% point of the fit sample is near 20%
    assert abs(wps[2]["eff_before"] - 0.20) < 0.05
    # charge and flags come back well even with a short fit (independent random flags: the hard case)
    el = json.loads((d / "tok" / "electrons.json").read_text())["quality"]["features"]
    assert el["charge"]["exact_match"] > 0.95 and el["LHTight"]["exact_match"] > 0.9


def test_fit_on_gpu_or_a_clear_error(tmp_path, fitted):
    d, h5 = fitted
    r = run_step("fit", "--h5", *h5, "--out-dir", tmp_path, "--objects", "electrons", *QUICK, "--seed", "3",
                 "--device", "cuda")
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "--device cuda" in r.stderr and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_tokenizer(tmp_path / "electrons.pt")  # a GPU fit loads on the CPU
    side = json.loads((tmp_path / "electrons.json").read_text())
    cpu = json.loads((d / "tok" / "electrons.json").read_text())["quality"]["features"]
    assert tok.model.quantizer.codebooks.device.type == "cpu" and side["provenance"]["settings"]["device"] == "cuda:0"
    # not bitwise the CPU fit (GPU sums), but as good
    q = side["quality"]["features"]
    assert q["charge"]["exact_match"] > 0.95 and q["pt"]["relative"]["resolution"] < 1.5 * cpu["pt"]["relative"]["resolution"]


def test_tokenizer_api_encode_decode_physical(fitted):
    d, h5 = fitted
    tok = load_tokenizer(d / "tok" / "jets.pt")
    with h5py.File(h5[0]) as f:
        mask = f["common/jets/mask"][:500]
        feats = {n: f[f"{g.group}/jets/{n}"][:500][mask] for n in tok.features for g in [OBJECTS["jets"].feature(n)]}
    x = tok.preprocess(feats)
    assert x.shape == (mask.sum(), tok.d_in) and x.dtype == np.float32
    codes = tok.encode(feats)
    assert codes.shape == (mask.sum(), 2) and codes.min() >= 0 and codes.max() < tok.codebook_size
    reco = tok.decode(codes)
    assert set(reco) == set(tok.features)
    assert np.all((reco["GN2_pb"] >= 0) & (reco["GN2_pb"] <= 1))
    r = np.corrcoef(np.log(reco["pt"]), np.log(feats["pt"]))[0, 1]
    assert r > 0.9, r  # pT is learned, in GeV


def test_fit_is_deterministic_with_seed(tmp_path, fitted):
    """A refit in the main process gives the codebooks the fixture's fit made in a worker process."""
    d, h5 = fitted
    r = run_step("fit", "--h5", *h5, "--out-dir", tmp_path, *QUICK, "--seed", "3", "--objects", "met", "--workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(d / "tok" / "met.pt", weights_only=True)
    b = torch.load(tmp_path / "met.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])), "every weight, not only the codebooks"


def test_fit_skips_missing_features_and_apply_rejects_mismatch(tmp_path, fitted):
    d, _ = fitted
    miss = write_synthetic_h5(tmp_path / "miss.h5", 1200, seed=5,
                              missing=("atlas/jets/GN2_pb", "atlas/jets/GN2_pc", "atlas/jets/GN2_pu"))
    r = run_step("fit", "--h5", miss, "--out-dir", tmp_path / "tok", *QUICK, "--objects", "jets", "--steps", "40",
                 "--warmup-steps", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    side = json.loads((tmp_path / "tok" / "jets.json").read_text())
    assert not any(f.startswith("GN2") for f in side["features"]) and "GN2_pb" in side["dropped_features"]
    # the full tokenizers need GN2: apply must refuse this file with one line, and still do the good one
    good = write_synthetic_h5(tmp_path / "good.h5", 300, seed=6)
    r = run_step("apply", "--h5", miss, good, "--tokenizers", d / "tok", "--out-dir", tmp_path / "out")
    assert r.returncode == 1
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert err and "miss.h5" in err[0] and "GN2_pb" in err[0] and "Traceback" not in r.stderr
    assert (tmp_path / "out" / "good.parquet").exists() and not (tmp_path / "out" / "miss.parquet").exists()


def test_bad_usage_and_bad_file(tmp_path, fitted):
    d, _ = fitted
    r = run_step("fit", "--h5", d / "ttbar.h5", "--out-dir", tmp_path, "--objects", "gluons")
    assert r.returncode == 2 and "gluons" in r.stderr and "Traceback" not in r.stderr
    r = run_step("fit", "--h5", d / "ttbar.h5", "--out-dir", tmp_path, "--levels", "9")
    assert r.returncode == 2 and "--levels" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    r = run_step("apply", "--h5", bad, "--tokenizers", d / "tok", "--out-dir", tmp_path / "o")
    assert r.returncode == 1 and "bad.h5" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SystemExit) as exit_:  # --cap: the one per-object syntax, unknown types refused
        step2.main(["apply", "--h5", str(bad), "--tokenizers", str(d / "tok"), "--out-dir", str(tmp_path / "o"),
                    "--cap", "tracks=5,gluons=3"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("beside_a_good_file", [False, True])
def test_fit_names_an_empty_file_and_fits_the_others(tmp_path, fitted, beside_a_good_file):
    _, h5 = fitted
    empty = write_synthetic_h5(tmp_path / "empty.h5", 0)
    inputs = [empty, h5[1]] if beside_a_good_file else [empty]
    r = run_step("fit", "--h5", *inputs, "--out-dir", tmp_path / "tok", *QUICK, "--objects", "met")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [f"error: {empty}: no events to fit on"]
    assert (tmp_path / "tok" / "met.pt").exists() == beside_a_good_file
    if beside_a_good_file:
        side = json.loads((tmp_path / "tok" / "met.json").read_text())
        assert side["provenance"]["inputs"] == [str(h5[1])] and side["quality"]["n_objects"] > 100


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_keys(path):
    torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("damage,cause", [(_random_bytes, "UnpicklingError"), (_truncated, "RuntimeError: PytorchStreamReader"),
                                          (_wrong_keys, "KeyError: 'specs_json'")])
def test_apply_names_a_broken_tokenizer_in_one_line(tmp_path, fitted, capsys, damage, cause):
    d, h5 = fitted
    tok = tmp_path / "tok"
    shutil.copytree(d / "tok", tok)
    damage(tok / "jets.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        step2.main(["apply", "--h5", str(h5[1]), "--tokenizers", str(tok), "--out-dir", str(tmp_path / "out"), "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {tok / 'jets.pt'}: not a readable step2 tokenizer (") and cause in err[0], err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# apply: the Parquet contract
# ----------------------------------------------------------------------------------------------

def test_apply_sequences_contract(tmp_path, fitted):
    d, h5 = fitted
    r = run_step("apply", "--h5", h5[0], "--tokenizers", d / "tok", "--out-dir", tmp_path, "--cap", "tracks=5",
                 "--max-length", "40", "--chunk-events", "700")
    assert r.returncode == 0, r.stderr[-2000:]
    path = tmp_path / "ttbar.parquet"
    token_parquet.check_columns(path)
    vocab = token_parquet.read_vocab(path)
    table = pq.read_table(path)
    b = token_parquet.batch_to_numpy(table, vocab["levels"])
    ids, types, lengths = b["input_ids"], b["token_type_ids"], b["length"]
    assert np.array_equal(b["event_index"], np.arange(2500))  # event_index maps to the HDF5 rows
    # every id is legal for its type and level
    legal = token_parquet.legal_id_mask(vocab)
    pos = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    for level in range(vocab["levels"]):
        assert legal[types[pos], level, ids[..., level][pos]].all()
    # special positions: CLS first, SEP between types, PAD beyond level 0
    sep = (types == TYPE_IDS["SEP"]) & pos
    assert (ids[sep][:, 0] == 2).all() and (ids[sep][:, 1:] == 0).all() and (ids[:, :2, 1:] == 0).all()
    # layout: CLS, EVENT, ..., MET last, one SEP per sequence object
    assert (ids[:, 0, 0] == 1).all() and (types[:, 1] == TYPE_IDS["event"]).all()
    assert (types[np.arange(len(ids)), lengths - 1] == TYPE_IDS["met"]).all()
    assert (((types == TYPE_IDS["SEP"]) & pos).sum(1) == len(SEQUENCE_OBJECTS)).all()
    assert lengths.max() <= 40
    with h5py.File(h5[0]) as f:
        n = {o: f[f"common/{o}/n"][:] for o in SEQUENCE_OBJECTS}
        mu = f["common/event/mu"][:]
        feats = {o: {nm: f[f"{OBJECTS[o].feature(nm).group}/{o}/{nm}"][:][f[f"common/{o}/mask"][:]]
                     for nm in load_tokenizer(d / "tok" / f"{o}.pt").features} for o in ("jets", "tracks")}
    kept = sequences.kept_counts(n, vocab["caps"], 40)
    for i, o in enumerate(SEQUENCE_OBJECTS):  # counts per type match the HDF5 after caps/max length
        assert np.array_equal(((types == TYPE_IDS[o]) & pos).sum(1), kept[:, i])
    stats = vocab["truncation"]["by_type"]
    assert stats["tracks"]["dropped_by_cap"] == int((n["tracks"] - np.minimum(n["tracks"], 5)).sum()) > 0
    assert vocab["truncation"]["events_truncated"] > 0
    assert np.array_equal(ids[:, 1, 0], sequences.mu_tokens(mu, vocab))
    # the tokens are exactly the tokenizer's codes of the leading objects, in pT order: all jets,
    # and the first tracks of events that lost tracks (apply encodes only the objects it keeps)
    for o in ("jets", "tracks"):
        tok = load_tokenizer(d / "tok" / f"{o}.pt")
        codes = tok.encode(feats[o])
        first = np.concatenate([[0], np.cumsum(n[o])[:-1]])
        k = kept[:, SEQUENCE_OBJECTS.index(o)]
        ev = np.nonzero((k == n[o] if o == "jets" else k < n[o]) & (k > 0))[0]
        assert len(ev) >= 5
        for e in ev[:5]:
            got = ids[e][types[e] == TYPE_IDS[o]]
            want = codes[first[e] : first[e] + k[e]] + np.array([r[0] for r in vocab["ranges"][o]])
            assert np.array_equal(got[:, : tok.levels], want)
    # the split column contract: deterministic, the same as token_parquet.split_of
    assert set(np.unique(token_parquet.split_of("ttbar.h5", b["event_index"]))) == {0, 1, 2}


def test_apply_shards_equal_unsharded_and_rerun_skips(tmp_path, fitted):
    d, h5 = fitted
    full, sh = tmp_path / "full", tmp_path / "sh"
    base = ["apply", "--h5", *map(str, h5), "--tokenizers", str(d / "tok"), "--threads", "1"]  # in process
    assert step2.main(base + ["--out-dir", str(full)]) == 0
    for k in (1, 2):
        assert step2.main(base + ["--out-dir", str(sh), "--shard", f"{k}/2"]) == 0
    for name in ("ttbar.parquet", "dy.parquet"):
        a, b = pq.read_table(full / name), pq.read_table(sh / name)
        assert a.equals(b)
    before = (full / "dy.parquet").stat().st_mtime_ns
    assert step2.main(base + ["--out-dir", str(full)]) == 0
    assert (full / "dy.parquet").stat().st_mtime_ns == before  # finished outputs are skipped


def test_apply_on_gpu_gives_the_cpu_codes_or_a_clear_error(tmp_path, fitted):
    d, h5 = fitted
    base = ["apply", "--h5", str(h5[1]), "--tokenizers", str(d / "tok"), "--threads", "1"]
    assert step2.main(base + ["--out-dir", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    r = run_step(*base, "--out-dir", tmp_path / "gpu", "--device", "cuda")
    if not torch.cuda.is_available():
        assert r.returncode == 2 and "--device cuda" in r.stderr and "Traceback" not in r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    paths = [tmp_path / x / "dy.parquet" for x in ("cpu", "gpu")]
    a, b = (token_parquet.batch_to_numpy(pq.read_table(p), token_parquet.read_vocab(p)["levels"])["input_ids"] for p in paths)
    assert a.shape == b.shape and np.mean(a == b) > 0.999  # float rounding may flip exact near-ties


def test_auto_levels_keep_the_bits_of_small_codebooks():
    choose_levels = tokenizer_training.choose_levels
    levels = {k: choose_levels("auto", k) for k in (64, 128, 256, 4096)}
    assert levels == {64: 6, 128: 5, 256: 4, 4096: 4}
    assert all(l * math.log2(k) >= tokenizer_training.AUTO_BITS for k, l in levels.items())
    assert choose_levels("auto", 2) == 8  # capped at the quantizer's 8 levels
    assert choose_levels("2", 64) == 2  # an explicit --levels is kept


def test_nested_levels_keep_the_first_codes_and_add_detail(tmp_path, fitted):
    """--nested-levels: the first levels' codes are those of the plain fit with the same seed, the added levels
    lower the held-out reconstruction error, and the settings record both."""
    d, h5 = fitted
    common_flags = ["--h5", *h5, "--objects", "jets", *QUICK, "--seed", "3", "--workers", "1", "--closure-events", "0"]
    assert run_step("fit", *common_flags, "--out-dir", tmp_path / "plain", "--nested-levels", "none").returncode == 0
    r = run_step("fit", *common_flags, "--out-dir", tmp_path / "nested", "--nested-levels", "jets=4", "--nested-steps", "120")
    assert r.returncode == 0, r.stderr[-2000:]
    plain, nested = (load_tokenizer(tmp_path / k / "jets.pt") for k in ("plain", "nested"))
    assert (plain.levels, nested.levels, nested.settings["nested_from_levels"]) == (2, 4, 2)
    sample = np.load(tmp_path / "plain" / "jets.eval.npz")
    feats = {k[len("orig/"):]: sample[k] for k in sample.files if k.startswith("orig/")}
    codes_plain, reco_plain = plain.reconstruct(feats)
    codes_nested, reco_nested = nested.reconstruct(feats)
    assert np.array_equal(codes_nested[:, :2], codes_plain)
    error = lambda reco: np.median(np.abs(reco["pt"] / feats["pt"] - 1))  # noqa: E731
    assert error(reco_nested) < 0.8 * error(reco_plain)
    for bad in (["--nested-levels", "jets=x"], ["--nested-levels", "gluons=8"],
                ["--nested-levels", "jets=8", "--quantizer", "fsq"]):
        r = run_step("fit", "--h5", *h5, "--out-dir", tmp_path / "bad", *bad)
        assert r.returncode == 2 and "--nested-levels" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_preset_sets_defaults_and_given_flags_win(tmp_path, fitted):
    """--preset production replaces the defaults and the flags given still win, read back from what the fit wrote."""
    _, h5 = fitted
    out = tmp_path / "tok"
    assert step2.main(["fit", "--h5", str(h5[1]), "--out-dir", str(out), "--preset", "production", "--objects", "met",
                       "--steps", "2", "--warmup-steps", "1", "--codebook-size", "16", "--no-plots",
                       "--preprocess-events", "500", "--eval-objects", "500"]) == 0
    side = json.loads((out / "met.json").read_text())
    flags, fitted_with = side["provenance"]["settings"], side["settings"]
    assert (flags["dim"], flags["levels"], flags["codebook_size_tracks"], flags["batch_size"]) == (8, 4, 8192, 8192)
    assert (fitted_with["dim"], fitted_with["levels"], fitted_with["batch_size"]) == (8, 4, 8192)  # the preset's
    assert (fitted_with["steps"], fitted_with["warmup_steps"], fitted_with["codebook_size"]) == (2, 1, 16)  # the flags'


def test_vocab_ranges_disjoint():
    toks = {o: {"sha256": "x", "features": [], "levels": 4 if o != "met" else 2, "codebook_size": 100 + i}
            for i, o in enumerate(TOKENIZED_OBJECTS)}
    v = sequences.build_vocab(toks, sequences.DEFAULT_CAPS, 64)
    spans = [(s, s + c) for r in v["ranges"].values() for s, c in r]
    spans.append((v["event_tokens"]["offset"], v["event_tokens"]["offset"] + v["event_tokens"]["size"]))
    spans.sort()
    assert spans[0][0] == 4 and spans[-1][1] == v["vocab_size"]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
    legal = token_parquet.legal_id_mask(v)
    assert legal[TYPE_IDS["met"], 3, 0] and not legal[TYPE_IDS["met"], 3, 5]  # met: 2 levels, PAD beyond


def test_combined_mode_fit_and_apply(tmp_path, fitted):
    """--mode combined: one tokenizer over all objects (type as input); every type shares its ranges."""
    _, h5 = fitted
    r = run_step("fit", "--mode", "combined", "--h5", h5[1], "--out-dir", tmp_path / "tok", *QUICK,
                 "--steps", "40", "--warmup-steps", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    side = json.loads((tmp_path / "tok" / "combined.json").read_text())
    assert "type" in side["features"] and "jets/GN2_pb" in side["features"] and "met/sumet" in side["features"]
    assert {"electrons/charge", "tracks/d0"} <= set(side["quality"]["features"])
    assert {"m4l", "mjj", "met"} <= set(json.loads((tmp_path / "tok" / "closure.json").read_text())["quantities"])
    r = run_step("apply", "--h5", h5[1], "--tokenizers", tmp_path / "tok", "--out-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    vocab = token_parquet.read_vocab(tmp_path / "out" / "dy.parquet")
    assert vocab["mode"] == "combined" and vocab["ranges"]["jets"] == vocab["ranges"]["electrons"]
    b = token_parquet.batch_to_numpy(pq.read_table(tmp_path / "out" / "dy.parquet"), vocab["levels"])
    legal = token_parquet.legal_id_mask(vocab)
    pos = np.arange(b["input_ids"].shape[1])[None, :] < b["length"][:, None]
    for level in range(vocab["levels"]):
        assert legal[b["token_type_ids"][pos], level, b["input_ids"][..., level][pos]].all()
    # the pair-kinematics bias decodes the combined tokens with the one tokenizer, each type its own outputs
    kin = KinematicsDecoder(vocab, tmp_path / "tok")(b["input_ids"], b["token_type_ids"])
    jets = (b["token_type_ids"] == TYPE_IDS["jets"]) & pos
    start = np.array([r[0] for r in vocab["ranges"]["jets"]])
    ref = load_tokenizer(tmp_path / "tok" / "combined.pt").decode(b["input_ids"][jets][:, : len(start)] - start)
    assert jets.sum() > 20 and np.allclose(kin[jets][:, 0], np.maximum(ref["jets/pt"], 0), rtol=1e-5)
    assert np.allclose(kin[jets][:, 1], ref["jets/eta"], atol=1e-5)
