"""The jet-constituent model (common/constituent_model.py): alignment of the HDF5 constituents with the
jet positions of a sequence, hiding of masked jets, and that steps 3 and 4 learn from constituents
what the jet tokens do not carry.

The sample is finetune_fixtures' (synthetic HDF5 + tokens) with constituents added in the step1
layout: hzz4l jets have displaced constituents (|d0| ~ 1 mm), zz4l jets prompt ones; the jet tokens
(log pT, eta) do not see d0, so only a model that reads the constituents can use it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_fixtures import call_main, make_sample  # noqa: E402

import step3_pretrain  # noqa: E402
import step4_finetune  # noqa: E402
from plotting import report  # noqa: E402

from common import constituent_model as JC  # noqa: E402
from common.continuous_inputs import h5_locations  # noqa: E402
from common.event_data import SequenceStream  # noqa: E402
from common.schema import JET_CONSTITUENTS, MAX_CONSTITUENTS, dataset_path  # noqa: E402

N_EVENTS = 800
SMALL = ["--batch-size", "64", "--epochs", "0", "--pair-bias", "0", "--no-code-geometry", "--eval-every", "25", "--patience", "4", "--shuffle-buffer", "2000", "--bootstrap", "20",
         "--threads", "1", "--workers", "1", "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--no-plots"]


def add_constituents(h5: Path, displaced: bool, seed: int) -> None:
    """Constituents of every stored jet in the step1 layout: 2-12 tracks around the jet axis sharing its pT."""
    rng = np.random.default_rng(seed)
    with h5py.File(h5, "r+") as f:
        jet_mask = f["common/jets/mask"][:]
        jpt, jeta, jphi = (f[f"common/jets/{n}"][:] for n in ("pt", "eta", "phi"))
        n_ev, n_jets = jet_mask.shape
        n = np.where(jet_mask, rng.integers(2, 13, jet_mask.shape), 0).astype(np.int16)
        mask = np.arange(MAX_CONSTITUENTS)[None, None] < n[..., None]
        shape = mask.shape
        frac = np.sort(rng.dirichlet(np.ones(MAX_CONSTITUENTS), (n_ev, n_jets)), -1)[..., ::-1]
        values = {"pt": jpt[..., None] * frac * 3, "eta": jeta[..., None] + rng.normal(0, 0.1, shape),
                  "phi": jphi[..., None] + rng.normal(0, 0.1, shape), "charge": rng.choice([-1, 1], shape),
                  "d0": rng.normal(0, 1.0 if displaced else 0.01, shape), "z0": rng.normal(0, 0.1, shape)}
        for name, v in values.items():
            f_ = JET_CONSTITUENTS.feature(name)
            f.create_dataset(dataset_path("jet_constituents", f_), data=np.where(mask, v, 0).astype(f_.dtype))
        f.create_dataset(f"{JC.GROUP}/mask", data=mask)
        f.create_dataset(f"{JC.GROUP}/n", data=n)
        f["metadata"].attrs["jet_constituents"] = json.dumps({"method": "delta_r", "max_constituents": MAX_CONSTITUENTS})


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("constituents")
    s = make_sample(root, n=N_EVENTS, processes=("hzz4l", "zz4l"))
    for i, (proc, h5) in enumerate(s["h5"].items()):
        add_constituents(h5, displaced=proc == "hzz4l", seed=i)
    bare = make_sample(root / "bare", n=200, processes=("hzz4l", "zz4l"))  # no constituents
    return {**s, "root": root, "bare": bare}


def test_batches_put_each_jets_constituents_on_its_jet_position(sample):
    paths = [str(p) for p in sample["parquet"].values()]
    reader = JC.ConstituentReader(h5_locations(paths, None))
    stream = SequenceStream(paths, 2, 50, shuffle_buffer=300, seed=5, constituents=reader)
    batch = next(iter(stream.batches(0)))
    x, mask = batch["constituents"], batch["constituent_mask"]
    assert x.shape[-1] == JC.N_INPUTS and mask.shape == x.shape[:-1]
    is_jet, slot = (t.numpy() for t in JC.jet_slots(torch.from_numpy(batch["token_type_ids"])))
    checked = 0
    for src in np.unique(batch["source_file"]):  # compare with the HDF5, row by row of the shuffled batch
        with h5py.File(sample["h5"][src.removesuffix(".h5")], "r") as f:
            n = f[f"{JC.GROUP}/n"][:]
            cpt = f["common/jet_constituents/pt"][:]
        for b in np.flatnonzero(batch["source_file"] == src):
            row = batch["event_index"][b]
            for p in np.flatnonzero(is_jet[b]):
                k = slot[b, p]
                assert mask[b, k].sum() == n[row, k]
                np.testing.assert_allclose(np.exp(x[b, k, : n[row, k], 0]), cpt[row, k, : n[row, k]], rtol=1e-4)
                checked += 1
    assert checked > 20


def test_hide_removes_only_the_chosen_jets():
    types = torch.tensor([[1, 6, 6, 2, 6], [1, 6, 2, 0, 0]])
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    chosen = torch.tensor([[False, False, True, False, False], [False, True, False, False, False]])
    out = JC.hide(mask, types, chosen)
    assert not out[0, 1].any() and out[0, 0].all() and out[0, 2].all()  # the 2nd jet of event 0
    assert not out[1, 0].any() and out[1, 1:].all()
    assert mask.all(), "hide must not change its input"


def test_constituents_carry_what_the_tokens_miss(sample, tmp_path, capsys):
    """hzz4l vs zz4l: the constituent model reads the displaced tracks, the flat model cannot."""
    parquet = [str(p) for p in sample["parquet"].values()]
    aucs = {}
    for name, extra in (("finetune", []), ("finetune_constituent", ["--constituents"])):  # run_all's folder names
        code = call_main(step4_finetune.main, "--parquet", *parquet, "--signal", "hzz4l", "--background", "zz4l",
                         "--arms", "scratch", "--steps", "250", "--lr", "3e-3", "--out-dir", tmp_path / name, *SMALL, *extra)
        assert code == 0, capsys.readouterr().err
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        aucs[name] = m["arms"]["scratch"]["auc"]
    usage = m["arms"]["scratch"]["constituents"]
    assert 0 < usage["mean_gate"] < 1 and usage["fraction_without_constituents"] < 0.2, usage
    assert aucs["finetune_constituent"] > aucs["finetune"] + 0.05, aucs
    html = report.build_report(tmp_path, None)  # the variants side by side
    section = html[html.index('id="variants"'):]
    assert f"{aucs['finetune_constituent']:.3f}" in section and "of jets without" in section
    assert "data efficiency of every model variant" in section and "data:image/png;base64," in section


def test_pretraining_with_constituents_then_finetune_and_bad_inputs(sample, tmp_path, capsys):
    parquet = [str(p) for p in sample["parquet"].values()]
    pre = tmp_path / "pre"
    code = call_main(step3_pretrain.main, "--parquet", *parquet, "--out-dir", pre, "--constituents", "--no-code-geometry", "--pair-bias", "0",
                     "--objective", "features", "--epochs", "1", "--batch-size", "64", "--threads", "1", "--no-plots",
                     "--d-model", "32", "--n-heads", "2", "--d-ff", "64")
    assert code == 0, capsys.readouterr().err
    usage = json.loads((pre / "metrics.json").read_text())["constituents"]
    # masked jets (15%) are hidden from their constituents; every other jet has some
    assert 0.05 < usage["fraction_without_constituents"] < 0.3 and 0 < usage["mean_gate"] < 1, usage
    assert usage["methods"] == {"hzz4l.h5": "delta_r", "zz4l.h5": "delta_r"}
    assert usage["track_hits"].startswith("hit summaries")
    assert json.loads((pre / "backbone.json").read_text())["config"]["constituent_dim"] > 0
    code = call_main(step4_finetune.main, "--parquet", *parquet, "--signal", "hzz4l", "--background", "zz4l",
                     "--arms", "finetune,frozen", "--init", pre / "backbone.pt", "--steps", "20",
                     "--out-dir", tmp_path / "ft", *SMALL)
    assert code == 0, capsys.readouterr().err
    arms = json.loads((tmp_path / "ft" / "metrics.json").read_text())["arms"]
    assert arms["finetune"]["constituents"]["jets"] > 0 and "auc" in arms["frozen"]

    # files without constituents: the object-only fallback, or one error line without it
    bare = [str(p) for p in sample["bare"]["parquet"].values()]
    capsys.readouterr()
    code = call_main(step4_finetune.main, "--parquet", *bare, "--signal", "hzz4l", "--background", "zz4l",
                     "--arms", "scratch", "--constituents", "--no-constituent-fallback", "--steps", "2",
                     "--out-dir", tmp_path / "bad", *SMALL)
    err = capsys.readouterr().err
    assert code == 1 and "no jet constituents in this HDF5" in err and "Traceback" not in err
    code = call_main(step4_finetune.main, "--parquet", *bare, "--signal", "hzz4l", "--background", "zz4l",
                     "--arms", "scratch", "--constituents", "--steps", "4", "--out-dir", tmp_path / "fallback", *SMALL)
    assert code == 0, capsys.readouterr().err
    usage = json.loads((tmp_path / "fallback" / "metrics.json").read_text())["arms"]["scratch"]["constituents"]
    assert usage["fraction_without_constituents"] == 1.0
    # a flat backbone cannot serve a constituent model
    flat = tmp_path / "flat_pre"
    assert call_main(step3_pretrain.main, "--parquet", *parquet, "--out-dir", flat, "--no-code-geometry", "--pair-bias", "0", "--objective",
                     "features", "--epochs", "1", "--max-steps", "2", "--threads", "1", "--no-plots") == 0
    capsys.readouterr()
    code = call_main(step4_finetune.main, "--parquet", *parquet, "--signal", "hzz4l", "--background", "zz4l",
                     "--arms", "finetune", "--init", flat / "backbone.pt", "--constituents", "--steps", "2",
                     "--out-dir", tmp_path / "mismatch", *SMALL)
    err = capsys.readouterr().err
    assert code == 2 and "has no constituent encoder" in err
