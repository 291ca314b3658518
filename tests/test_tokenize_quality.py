"""step2_tokenize fit, training side: the pT loss weight (wired into the loss, recorded, and it
buys pT resolution), and the minibatch stream (an in-memory pass covers every object once,
a set over the cache bound keeps streaming)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.object_stream import minibatches
from common.schema import OBJECTS
from common.tokenizer import build_specs, fit_preprocessing, preprocess, reconstruction_loss
from common.tokenizer_training import weight_pt
from test_tokenize import run_step, write_synthetic_h5

torch.set_num_threads(1)


def _jet_specs(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    feats = [f for f in OBJECTS["jets"].token_features if f.group == "common"]
    specs = build_specs(feats)
    sample = {"pt": 20 + rng.exponential(40, n), "eta": rng.normal(0, 1.4, n), "phi": rng.uniform(-3, 3, n),
              "mass": rng.gamma(2, 5, n), "n_trk": rng.poisson(8, n).astype(float)}
    fit_preprocessing(specs, sample)
    return specs, sample


def test_pt_weight_scales_only_the_pt_term():
    specs, sample = _jet_specs()
    d_in = sum(s["n_in"] for s in specs)
    x = torch.from_numpy(preprocess(specs, sample, d_in))
    out = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    base, _ = reconstruction_loss(specs, out, x)
    weight_pt(specs, 10.0)
    weighted, _ = reconstruction_loss(specs, out, x)
    pt = next(s for s in specs if s["names"] == ["pt"])
    assert pt["loss_weight"] == 10.0 and all("loss_weight" not in s for s in specs if s is not pt)
    a = pt["in"][0]
    pt_mse = float(((out[:, a] - x[:, a]) ** 2).mean())
    assert abs(float(weighted - base) - 9.0 * pt_mse) < 1e-4 * float(base)


def _stream_factory(n_chunks=5, per_chunk=700, calls=None):
    """Chunks of objects whose pt is a unique id (the quantile transform is monotonic: ids stay distinct)."""
    def factory():
        calls.append(1)
        for c in range(n_chunks):
            ids = np.arange(c * per_chunk, (c + 1) * per_chunk, dtype=float) + 1
            yield {"pt": ids}
    return factory


def test_minibatches_cache_covers_each_object_once_per_pass():
    specs = build_specs([OBJECTS["jets"].feature("pt")])
    fit_preprocessing(specs, {"pt": np.arange(1, 3501, dtype=float)})
    calls = []
    gen = minibatches(_stream_factory(calls=calls), specs, 1, 256, np.random.default_rng(0))
    first = [next(gen) for _ in range(13)]  # the streamed pass: 3500 // 256 full batches + carry
    passes = [[next(gen) for _ in range(3500 // 256)] for _ in range(3)]
    assert len(calls) == 1, "a cached set must not be re-read from the files"
    for batches in passes:
        v = torch.cat(batches)[:, 0].numpy()
        assert len(v) == 13 * 256 and len(np.unique(v)) == len(v)  # a permutation: no object twice in a pass
    assert not torch.equal(passes[0][0], passes[1][0])  # reshuffled every pass
    assert all(len(b) == 256 for b in first)


def test_minibatches_over_the_bound_keep_streaming():
    specs = build_specs([OBJECTS["jets"].feature("pt")])
    fit_preprocessing(specs, {"pt": np.arange(1, 3501, dtype=float)})
    calls = []
    gen = minibatches(_stream_factory(calls=calls), specs, 1, 256, np.random.default_rng(0), cache_bytes=1000)
    for _ in range(3 * 14):
        next(gen)
    assert len(calls) >= 3


def _pt_resolution(out_dir: Path) -> tuple[float, dict]:
    meta = json.loads((out_dir / "jets.json").read_text())
    return meta["quality"]["features"]["pt"]["relative"]["resolution"], meta


def test_pt_weight_buys_pt_resolution(tmp_path):
    h5 = write_synthetic_h5(tmp_path / "ttbar.h5", 3000, seed=5)
    common = ["fit", "--h5", h5, "--objects", "jets", "--steps", "300", "--warmup-steps", "50", "--batch-size", "512",
              "--codebook-size", "32", "--no-plots", "--seed", "2"]
    res = {}
    for w in (1, 10):
        r = run_step(*common, "--out-dir", tmp_path / f"w{w}", "--pt-weight", w)
        assert r.returncode == 0, r.stderr[-2000:]
        res[w], meta = _pt_resolution(tmp_path / f"w{w}")
        assert meta["settings"]["pt_weight"] == w
        assert next(s for s in meta["specs"] if s["names"] == ["pt"])["loss_weight"] == w
    assert res[10] < 0.8 * res[1], res


def test_worst_pt_bin_and_its_goal():
    """The worst bin is looked for among bins with >= 50 objects, and fails the goal where the average passes."""
    from common.tokenizer_quality import feature_quality, goals

    rng = np.random.default_rng(0)
    o = np.concatenate([rng.uniform(30, 50, 5000), rng.uniform(150, 250, 200), rng.uniform(500, 900, 40)])
    smear = np.concatenate([np.full(5000, 0.005), np.full(200, 0.05), np.full(40, 0.5)])
    r = o * (1 + rng.normal(0, 1, len(o)) * smear - np.where(o > 500, 0.3, 0) - np.where((o > 150) & (o < 250), 0.02, 0))
    q = feature_quality("continuous", "pt", o, r)
    worst = q["worst_bin"]
    assert (worst["resolution"]["lo"], worst["bias"]["lo"]) == (150, 150)  # the 40 objects above 500 GeV are too few
    assert 0.04 < worst["resolution"]["resolution"] < 0.06 and -0.025 < worst["bias"]["bias"] < -0.015
    assert q["relative"]["resolution"] < 0.02  # the average hides it
    g = goals({"features": {"pt": q}, "codes": [{"used_fraction": 1.0}], "btag_working_points": {}})
    assert g["pt_worst_bin_resolution"] == worst["resolution"]["resolution"]
    assert g["pass"]["pt_worst_bin_resolution_le_3pct_bias_le_1pct"] is False and g["pass"]["pt_resolution_le_2pct"] is True
