"""step4_finetune: high-level variables, figures of merit, all arms end to end with the protocols,
determinism, torchrun DDP on 2 gloo processes, and bad inputs.

The backbone is the session-wide pretraining of finetune_fixtures (also checked by test_pretrain.py);
step4 runs in-process through main(argv), except torchrun and one reproducibility run (real processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_fixtures import call_main, make_sample, make_vocab, shared_sample  # noqa: E402

import step4_finetune  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import compare_classifiers  # noqa: E402

from common import highlevel  # noqa: E402
from common import training as T  # noqa: E402
from common.classifier_metrics import binary_metrics  # noqa: E402
from common.transformer import load_backbone, load_tensors, save_module  # noqa: E402

SMALL = ["--batch-size", "64", "--steps", "20", "--epochs", "0", "--pair-bias", "0", "--no-code-geometry", "--eval-every", "10", "--patience", "2", "--shuffle-buffer", "2000",
         "--gbdt-trees", "60", "--bootstrap", "20", "--threads", "1", "--workers", "1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def step4(capsys, *args):
    """step4's main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = call_main(step4_finetune.main, *args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return shared_sample(tmp_path_factory)


def test_z_candidates_standard_pairing():
    # Z1 -> mu+mu- back to back (m = 2 pT = 91.2), Z2 -> e+e- (m = 30); pT order mixes the pairs.
    n, m = 2, 4
    c = {f"common/{o}/{v}": np.zeros((n, m), np.float32) for o in ("electrons", "muons") for v in ("pt", "eta", "phi", "charge")}
    c.update({f"common/{o}/mask": np.zeros((n, m), bool) for o in ("electrons", "muons")})
    c["common/muons/pt"][:, :2], c["common/muons/phi"][:, :2], c["common/muons/charge"][:, :2] = 45.594, [0, np.pi], [1, -1]
    c["common/electrons/pt"][:, :2], c["common/electrons/phi"][:, :2], c["common/electrons/charge"][:, :2] = 15.0, [1, 1 + np.pi], [-1, 1]
    c["common/muons/mask"][:, :2] = c["common/electrons/mask"][:, :2] = True
    c["common/electrons/charge"][1, 1] = -1  # second event: the e pair is same-sign, no valid pairing
    c.update({"common/jets/pt": np.array([[60, 40, 10], [0, 0, 0]], np.float32), "common/jets/mask": np.array([[1, 1, 1], [0, 0, 0]], bool),
              "common/jets/eta": np.array([[0, 1, 0], [0, 0, 0]], np.float32), "common/jets/phi": np.array([[0, np.pi, 0], [0, 0, 0]], np.float32),
              "common/jets/mass": np.zeros((n, 3), np.float32),
              "common/met/pt": np.ones(n, np.float32), "common/met/sumet": np.ones(n, np.float32),
              "atlas/jets/GN2_pb": np.array([[0.9, 0.01, 0.9], [0, 0, 0]], np.float32),
              "atlas/jets/GN2_pc": np.full((n, 3), 0.05, np.float32), "atlas/jets/GN2_pu": np.full((n, 3), 0.05, np.float32)})
    x = dict(zip(highlevel.NAMES, highlevel.compute(c).T))
    assert x["mZ1"][0] == pytest.approx(91.19, abs=0.05) and x["mZ2"][0] == pytest.approx(30.0, abs=0.05)
    assert np.isnan(x["mZ1"][1]) and x["n_leptons"][1] == 4
    assert x["m4l"][0] == pytest.approx(91.19 + 30.0, abs=0.1) and x["lep1_pt"][0] == pytest.approx(45.594, abs=1e-3)
    assert x["n_jets"][0] == 2 and x["n_bjets"][0] == 1, "jets above 25 GeV; the 10 GeV b-jet is not counted"
    # the production-mode variables: the two leading jets back to back, 1 apart in eta; no lepton beyond the four
    assert x["m_jj"][0] == pytest.approx(np.sqrt(2 * 60 * 40 * (np.cosh(1) + 1)), rel=1e-4) and x["deta_jj"][0] == pytest.approx(1)
    assert np.isnan(x["m_jj"][1]) and x["jet2_pt"][0] == 40 and x["n_extra_leptons"][0] == 0


def test_highlevel_rows_of_a_file_in_blocks_and_a_rewritten_file(tmp_path):
    """for_rows computes a file's variables a block (HDF5 chunk) at a time and keeps the blocks: any rows, in any
    order, across blocks, give the variables computed on the whole file; a file rewritten in place is read again."""
    import h5py
    from finetune_fixtures import make_h5
    arrays = {k: v for k, v in make_h5(tmp_path / "src.h5", "hzz4l", 250, 1).items() if k.startswith("common/")}
    path = tmp_path / "chunked.h5"

    def write(met_scale):
        with h5py.File(path, "w") as f:  # chunks of 64 events: four blocks
            for k, v in arrays.items():
                f.create_dataset(k, data=v * met_scale if k == "common/met/pt" else v, chunks=(64,) + v.shape[1:])
    write(1.0)
    whole = highlevel.compute(arrays)
    rows = np.random.default_rng(0).permutation(250)[:180]
    np.testing.assert_array_equal(highlevel.for_rows(path, rows), whole[rows])
    np.testing.assert_array_equal(highlevel.for_rows(path, rows[:7]), whole[rows[:7]])  # from the kept blocks
    write(2.0)
    os.utime(path, ns=(os.stat(path).st_mtime_ns + 10**9,) * 2)  # a rewrite within the clock's resolution
    met = highlevel.NAMES.index("met")
    np.testing.assert_allclose(highlevel.for_rows(path, rows)[:, met], 2 * whole[rows, met], rtol=1e-6)
    with pytest.raises(ValueError, match="outside the file's 250 events"):
        highlevel.for_rows(path, [250])


def test_schedule_holds_a_group_then_warms_it_up():
    """--head-first: the backbone's lr is 0 while the head trains alone, then warms up and decays
    over the steps left; without a hold every group follows the plain warm-up + cosine."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0} for _ in range(2)]
    opt = torch.optim.AdamW(groups)
    sched = T.warmup_cosine(opt, 100, 0.1, hold=[0, 40])
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    head, backbone = np.array(lrs).T
    assert head[9] == 1.0 and head[0] == pytest.approx(0.1) and head[-1] < 0.01
    assert (backbone[:40] == 0).all() and backbone[40] == pytest.approx(1 / 6) and backbone[45] == 1.0
    assert np.all(np.diff(backbone[46:]) <= 0) and backbone[-1] < 0.01


def test_binary_metrics():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(2000), np.zeros(2000)]
    m = binary_metrics(y, y + rng.normal(0, 0.01, 4000))
    assert m["auc"] == pytest.approx(1.0) and m["rejection_at_50"] > 1000
    m = binary_metrics(y, rng.random(4000))
    assert 0.45 < m["auc"] < 0.55 and m["auc_ci95"][0] < 0.5 < m["auc_ci95"][1] or abs(m["auc"] - 0.5) < 0.03
    assert m["rejection_at_50"] == pytest.approx(2.0, rel=0.15) and m["n_test"] == {"signal": 2000, "background": 2000}


def test_all_arms_protocols_and_plots(sample, tmp_path, capsys):
    out = tmp_path / "ft"
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--signal", "hzz4l",
                         "--background", "zz4l,410470", "--test-background", "dy", "--init", sample["init"],
                         "--h5-dir", sample["root"] / "h5", "--out-dir", out, "--label-fractions", "0.2,1", "--seeds", "1,2",
                         *SMALL)
    assert code == 0, err[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"]["background"] == ["ttbar", "zz4l"], "dataset ids resolve to process names"
    assert set(m["arms"]) == {"scratch", "finetune", "frozen", "continuous", "counts_gbdt", "standard_gbdt"}
    for arm, a in m["arms"].items():
        assert a["auc_ci95"][0] <= a["auc"] <= a["auc_ci95"][1], arm
        assert a["seeds"]["n_seeds"] == 2 and a["n_test"]["signal"] > 50 and len(a["roc"]["fpr"]) > 10
        assert a["rejection_at_30"] >= a["rejection_at_50"] >= 1
    # the standard physics variables separate hzz4l from zz4l+ttbar (harder lepton pT, no b-jets)
    assert m["arms"]["standard_gbdt"]["auc"] > 0.8 and m["arms"]["scratch"]["auc"] > 0.6
    assert m["arms"]["continuous"]["auc"] > 0.6
    assert m["training"]["standard_gbdt"][0]["best_iteration"] <= 60, "--gbdt-trees caps the boosting rounds"
    gen = m["generalisation"]["arms"]["scratch"]
    assert set(gen) == {"ttbar", "zz4l", "dy"} and len(gen["dy"]["auc_per_seed"]) == 2
    eff = m["data_efficiency"]["finetune"]
    assert [e["fraction"] for e in eff] == [0.2, 1.0] and eff[0]["n_labelled"] < eff[1]["n_labelled"]
    assert 0.1 < eff[0]["n_labelled"] / eff[1]["n_labelled"] < 0.3
    assert [s["seed"] for s in eff[0]["per_seed"]] == [1, 2] and eff[0]["auc_std"] > 0
    # the validation AUC of the kept network, to choose settings on: the best of the recorded evaluations
    assert eff[1]["per_seed"][0]["val_auc"] == max(h["val_auc"] for h in m["training"]["finetune"])
    assert all("val_auc" not in s for p in m["data_efficiency"]["frozen"] for s in p["per_seed"])
    assert eff[1]["auc"] == pytest.approx(m["arms"]["finetune"]["seeds"]["auc"]["mean"])
    assert set(m["data_efficiency"]) == set(m["arms"]), "every arm at every label fraction"
    for fraction in ("0.2", "1.0"):  # paired test-set intervals of the pretraining verdicts
        v = m["pretraining_verdict"][fraction]["finetune_minus_scratch"]
        assert v["ci95"][0] <= v["delta_auc"] <= v["ci95"][1] and v["seeds"] == [1, 2]
        assert v["verdict"] in ("better", "worse", "not distinguishable")
    net = m["training"]["finetune"]
    assert net[0]["step"] == 10 and net[-1]["step"] <= 20, "validation every --eval-every steps, --steps in all"
    scores = np.load(out / "test_scores.npz", allow_pickle=False)
    assert len(scores["score_scratch"]) == len(scores["score_standard_gbdt"]) == len(scores["process"])
    assert {"hzz4l", "zz4l", "ttbar", "dy"} == set(scores["process"]), "test set: signal, backgrounds, test-only dy"
    assert (scores["label"][scores["process"] == "dy"] == -1).all() and (scores["label"][scores["process"] == "hzz4l"] == 1).all()
    assert np.array_equal(scores["score_finetune"], scores["score_finetune_1_seed1"])
    # two runs compared pair by pair (bench/compare_classifiers.py): a copy whose fine-tuned scores are scratch's
    # differs from this run by step4's own fine-tuned - scratch verdict
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "test_scores.npz", **{k: scores[k.replace("finetune", "scratch")] for k in scores.files})
    rows = compare_classifiers.compare(out, other, ["finetune"], 50, 0)
    assert {(r["fraction"], tuple(r["seeds"])) for r in rows} == {(0.2, (1, 2)), (1.0, (1, 2))}
    for r in rows:
        assert r["delta_auc"] == pytest.approx(m["pretraining_verdict"][str(r["fraction"])]["finetune_minus_scratch"]["delta_auc"])
    np.savez(other / "test_scores.npz", **{k: scores[k][::-1] for k in scores.files})
    with pytest.raises(SystemExit) as exit_info:
        compare_classifiers.compare(out, other, None, 50, 0)
    assert exit_info.value.code == 2 and "not the same test events" in capsys.readouterr().err
    for png in ("roc", "score_distributions", "training_curves", "data_efficiency", "generalisation"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 5000


def test_large_label_sets_train_for_epochs_not_only_steps(sample, tmp_path, capsys):
    """A network training takes max(--steps, --epochs passes over its labelled events), recorded per fraction."""
    out = tmp_path / "ep"
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l",
                         "--arms", "scratch", "--label-fractions", "0.1,1", "--out-dir", out, "--no-plots", *SMALL,
                         "--steps", "6", "--epochs", "2", "--eval-every", "1000")
    assert code == 0, err[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    small, full = m["data_efficiency"]["scratch"]
    assert small["optimiser_steps"] == 6, "few labels: --steps"
    assert full["optimiser_steps"] == 2 * -(-full["n_labelled"] // 64) > 6, "many labels: two passes"
    assert m["training"]["scratch"][-1]["step"] == full["optimiser_steps"], "the full-label training ran them all"


def test_seeded_runs_are_reproducible(sample, tmp_path, capsys):
    """The same seed gives the same AUCs: one run in-process with its trainings in two worker processes,
    one in a fresh process with another hash seed and no workers (so neither global state left by
    earlier tests, nor set/dict order, nor the process a training ran in can change a result)."""
    args = ["--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l", "--arms",
            "scratch,counts_gbdt", "--no-plots", "--d-model", "32", "--n-heads", "2", "--steps", "5", "--epochs", "0", "--pair-bias", "0", "--no-code-geometry", "--batch-size",
            "64", "--seed", "5", "--gbdt-trees", "60", "--bootstrap", "20", "--threads", "1"]
    code, _, err = step4(capsys, *args, "--workers", "2", "--out-dir", tmp_path / "o0")
    assert code == 0, err[-2000:]
    r = subprocess.run([sys.executable, str(ROOT / "step4_finetune.py"), *map(str, args), "--out-dir", str(tmp_path / "o1")],
                       capture_output=True, text=True, env={**ENV, "PYTHONHASHSEED": "12345"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    aucs = [{a: v["auc"] for a, v in json.loads((tmp_path / f"o{k}" / "metrics.json").read_text())["arms"].items()}
            for k in range(2)]
    assert aucs[0] == aucs[1]
    other = ["--seed", "6", "--arms", "scratch", "--workers", "1", "--out-dir", tmp_path / "o2"]
    code, _, err = step4(capsys, *args, *other)
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["arms"]["scratch"]["auc"] != aucs[0]["scratch"], \
        "the seed reaches the training"


def test_torchrun_ddp_two_gloo_processes(sample, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "step4_finetune.py"), "--parquet", *map(str, sample["parquet"].values()), "--signal-process", "hzz4l",
           "--background", "ttbar", "--init", str(sample["init"]), "--arms", "finetune", "--device", "cpu",
           "--out-dir", str(tmp_path / "ddp"), "--no-plots", "--steps", "10", "--epochs", "0", "--batch-size", "32",
           "--bootstrap", "20", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["arms"]["finetune"]["auc"] > 0.6


def test_bad_inputs_one_line_errors(sample, tmp_path, capsys):
    pqs = list(sample["parquet"].values())
    base = ["--out-dir", tmp_path / "o", "--arms", "scratch", "--no-plots", "--threads", "1", "--steps", "2", "--epochs", "0", "--no-code-geometry", "--pair-bias", "0"]
    code, _, err = step4(capsys, "--parquet", *pqs, "--signal", "higgs", "--background", "zz4l", *base)
    assert code == 2 and "signal 'higgs' matches no events" in err
    # scratch without a backbone reads the codebook vectors of the tokens' tokenizers: these synthetic tokens have none
    code, _, err = step4(capsys, "--parquet", *pqs, "--signal", "hzz4l", "--background", "zz4l",
                         *(a for a in base if a != "--no-code-geometry"))
    assert code == 2 and "code geometry (or run with --no-code-geometry) needs the step2 tokenizers" in err
    assert len(err.strip().splitlines()) == 1, err
    code, _, err = step4(capsys, "--parquet", *pqs, "--signal", "hzz4l", "--background", "zz4l", "--id-levels", "1", *base)
    assert code == 2 and "--id-levels needs object-granularity tokens and the code geometry" in err
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(pqs[0]).drop(["token_type_ids"]), bad)
    code, _, err = step4(capsys, "--parquet", bad, "--signal", "hzz4l", "--background", "zz4l", *base)
    assert code == 1 and f"{bad}: " in err and "lacks the column(s) token_type_ids" in err
    other = make_sample(tmp_path / "other", n=100, processes=("hzz4l", "zz4l"), vocab=make_vocab(tokenizer_tag="refit"))
    code, _, err = step4(capsys, "--parquet", *other["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l",
                         "--init", sample["init"], *base[:-2], "--arms", "finetune")
    assert code == 1 and f"{sample['init']}: the backbone was pretrained on another token vocabulary" in err
    assert len(err.strip().splitlines()) == 1, "the backbone is named, not every Parquet file"
    tiny = make_sample(tmp_path / "tiny", n=3, processes=("hzz4l", "zz4l"))  # too few events to fill every split
    code, _, err = step4(capsys, "--parquet", *tiny["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l", *base)
    assert code == 1 and "split holds no" in err and len(err.strip().splitlines()) == 1
    code, _, err = step4(capsys, "--parquet", *pqs, "--signal", "hzz4l", "--background", "zz4l", "--bootstrap", "0", *base)
    assert code == 2 and "--bootstrap, --steps, --eval-every and --patience must be at least 1" in err
    code, _, err = step4(capsys, "--parquet", *pqs, "--signal", "hzz4l", "--background", "zz4l", "--head-first", "1", *base)
    assert code == 2 and "--head-first 1.0 must lie in [0, 1)" in err
    assert not (tmp_path / "o").exists(), "no output from a failed run"


def test_protocol_entries_that_cannot_be_computed_leave_the_rest(sample, tmp_path, capsys):
    """A label fraction that leaves no signal event, and a test-only background without test events, are
    reported as not computable; the main task's metrics are still written."""
    from common.token_parquet import batch_to_numpy, sequences_table, split_of, write_sequences

    # wz: dy's sequences renamed, as a background whose events all fall in the train split (no test events)
    idx = np.flatnonzero(split_of("train_only.h5", np.arange(5000)) == 0)[:40]
    b = batch_to_numpy(pq.read_table(sample["parquet"]["dy"]).slice(0, 40), sample["vocab"]["levels"])
    t = sequences_table(b["input_ids"], b["token_type_ids"], b["length"], idx, "train_only.h5", "wz", 361601, np.ones(40))
    write_sequences(tmp_path / "wz.parquet", [t], sample["vocab"], {})
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), tmp_path / "wz.parquet", "--signal", "hzz4l",
                         "--background", "zz4l", "--test-background", "wz", "--arms", "scratch,counts_gbdt",
                         "--label-fractions", "0.0005,1", "--fraction-arms", "scratch", "--out-dir", tmp_path / "o",
                         "--no-plots", *SMALL)
    assert code == 0, err[-2000:]
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["arms"]["scratch"]["auc"] > 0.6, "the main task is still measured"
    assert [p["fraction"] for p in m["data_efficiency"]["counts_gbdt"]] == [1.0], "--fraction-arms: scratch only below 1"
    tiny = [p for p in m["data_efficiency"]["scratch"] if p["fraction"] == 0.0005][0]
    assert "not computable" in tiny["error"] and "no signal" in tiny["error"]
    assert "not computable" in m["generalisation"]["arms"]["scratch"]["wz"]["error"]


def test_backbone_representation_must_match_pooling(sample, tmp_path, capsys):
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l",
                         "--init", sample["init"], "--arms", "finetune", "--pooling", "cls", "--out-dir", tmp_path / "o",
                         *SMALL)
    assert code == 2 and f"{sample['init']}: the backbone was pretrained for the 'mean' event representation" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_observables_are_read_beside_the_pooled_state_only_when_asked(sample, tmp_path, capsys):
    args = ["--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l", "--init", sample["init"],
            "--arms", "scratch,finetune,frozen", "--label-fractions", "1", "--no-plots", *SMALL]
    code, _, err = step4(capsys, *args, "--observables", "--out-dir", tmp_path / "obs")
    assert code == 0, err[-1500:]
    width = {a: load_tensors(tmp_path / "obs" / f"{a}.pt")["head.net.0.weight"].shape[1] for a in ("scratch", "finetune")}
    assert width == {"scratch": 32 + len(highlevel.NAMES), "finetune": 32 + len(highlevel.NAMES)}
    assert "backbone.observables.net.0.weight" in load_tensors(tmp_path / "obs" / "scratch.pt")  # the same head, untrained
    code, _, _ = step4(capsys, *args, "--out-dir", tmp_path / "plain")
    assert code == 0 and load_tensors(tmp_path / "plain" / "finetune.pt")["head.net.0.weight"].shape[1] == 32
    assert not any("observables" in k for k in load_tensors(tmp_path / "plain" / "finetune.pt"))
    probe = lambda d: json.loads((d / "metrics.json").read_text())["arms"]["frozen"]["auc"]  # noqa: E731
    assert probe(tmp_path / "obs") != probe(tmp_path / "plain")
    no_init = [a for a in args if a not in ("--init", sample["init"])]
    code, _, err = step4(capsys, *no_init, "--observables", "--out-dir", tmp_path / "o2")
    assert code == 2 and "--observables reads the head of a pretrained backbone: give --init" in err
    # a backbone pretrained without the event objective has no head to read: one line, nothing written
    backbone, side = load_backbone(sample["init"])
    backbone.set_observables_head(0)
    headless = save_module(tmp_path / "headless.pt", backbone, {**side, "config": asdict(backbone.cfg)})
    with_headless = [str(headless) if a == sample["init"] else a for a in args]
    code, _, err = step4(capsys, *with_headless, "--observables", "--out-dir", tmp_path / "o3")
    assert code == 2 and "has no observables head (pretrain it with the event objective)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o3").exists()


def test_dropout_is_step4s_own_whatever_the_backbone_was_pretrained_with(sample, tmp_path, capsys):
    """The shared backbone was pretrained without dropout; step 4 trains both networks at its own --dropout."""
    assert load_backbone(sample["init"])[1]["config"]["dropout"] == 0
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l",
                         "--init", sample["init"], "--arms", "scratch,finetune", "--label-fractions", "1", "--no-plots",
                         *SMALL, "--dropout", "0.3", "--out-dir", tmp_path / "o")
    assert code == 0, err[-1500:]
    for arm in ("scratch", "finetune"):
        assert json.loads((tmp_path / "o" / f"{arm}.json").read_text())["config"]["dropout"] == 0.3, arm
    tuned, _ = load_backbone(sample["init"], dropout=0.3)
    assert {m.p for m in tuned.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert all(torch.equal(a, b) for a, b in zip(load_backbone(sample["init"])[0].state_dict().values(),
                                                   tuned.state_dict().values()))


def test_pickled_backbone_is_refused_in_one_line(sample, tmp_path, capsys):
    import argparse
    import shutil

    import torch

    bad = tmp_path / "backbone.pt"
    torch.save({"weights": argparse.Namespace(a=1)}, bad)
    shutil.copy(Path(sample["init"]).with_suffix(".json"), bad.with_suffix(".json"))
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l",
                         "--init", bad, "--arms", "finetune", "--out-dir", tmp_path / "o", *SMALL)
    assert code == 2 and f"{bad}: cannot load the backbone" in err and "refusing to unpickle" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- event weights and the multi-class task ------------------------------------------------------------

def pairwise_auc(y, s, w):
    """The signed-weight AUC by its definition, O(n^2): every (signal, background) pair."""
    gt = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])
    return (w[y][:, None] * w[~y][None, :] * gt).sum() / (w[y].sum() * w[~y].sum())


XSEC = {"hzz4l": 0.005, "zz4l": 1.5, "ttbar": 90.0}


def test_xsec_weighting_with_negative_weights(tmp_path, capsys):
    """--weighting xsec: every event weighs generator weight x sigma / sum of weights, negative weights kept
    with their sign in the metrics; the AUC in metrics.json is the pairwise signed-weight AUC of the saved
    test scores, and it differs from the per-event-count figure (ttbar, the easy background, dominates)."""
    s = make_sample(tmp_path, n=700, processes=tuple(XSEC), negative_fraction=0.2, cross_sections=XSEC)
    out = tmp_path / "xs"
    code, _, err = step4(capsys, "--parquet", *s["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l,ttbar",
                         "--arms", "counts_gbdt,standard_gbdt", "--weighting", "xsec", "--h5-dir", tmp_path / "h5",
                         "--out-dir", out, "--no-plots", *SMALL)
    assert code == 0, err[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    from common.h5io import read_metadata
    for proc, xs in XSEC.items():
        meta = read_metadata(s["h5"][proc])
        assert 0 < meta["sum_weights"] < 700 * 0.7, "the sample has negative generator weights"
        assert m["task"]["process_scale"][proc] == pytest.approx(xs / meta["sum_weights"])
    assert m["task"]["weighting"] == "xsec" and "cross-section" in m["task"]["weighting_definition"]
    scores = np.load(out / "test_scores.npz", allow_pickle=False)
    y = scores["process"] == "hzz4l"
    w = scores["weight"] * np.vectorize(m["task"]["process_scale"].get)(scores["process"])
    for arm in ("counts_gbdt", "standard_gbdt"):
        a = m["arms"][arm]
        assert a["weighting"] == "xsec" and a["n_negative_weights"] > 20
        assert a["auc"] == pytest.approx(pairwise_auc(y, scores[f"score_{arm}"], w), abs=1e-9)
        assert abs(a["auc"] - pairwise_auc(y, scores[f"score_{arm}"], scores["weight"])) > 1e-3, "xsec is not events"
    assert all(p["weighting"] == "xsec" for p in m["data_efficiency"]["counts_gbdt"])


def test_xsec_weighting_needs_cross_sections(sample, tmp_path, capsys):
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--signal", "hzz4l", "--background", "zz4l",
                         "--arms", "counts_gbdt", "--weighting", "xsec", "--h5-dir", sample["root"] / "h5",
                         "--out-dir", tmp_path / "o", *SMALL)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "/h5/" in err and ".h5: no cross-section in /metadata" in err
    assert not (tmp_path / "o").exists()


def test_three_classes_all_protocols(sample, tmp_path, capsys):
    out = tmp_path / "mc"
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--classes", "H=hzz4l;ZZ=zz4l;other=410470,dy",
                         "--arms", "scratch,finetune,frozen,counts_gbdt,standard_gbdt", "--init", sample["init"],
                         "--h5-dir", sample["root"] / "h5", "--out-dir", out, "--label-fractions", "0.3,1",
                         "--seeds", "1,2", *SMALL, "--steps", "10")
    assert code == 0, err[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"]["classes"] == {"H": ["hzz4l"], "ZZ": ["zz4l"], "other": ["dy", "ttbar"]}
    assert m["task"]["kind"] == "multiclass" and m["task"]["weighting"] == "events"
    for arm, a in m["arms"].items():
        assert set(a["per_class"]) == {"H", "ZZ", "other"} and a["weighting"] == "events", arm
        assert a["auc"] == pytest.approx(np.mean([c["auc"] for c in a["per_class"].values()]))
        assert a["auc_ci95"][0] <= a["auc"] <= a["auc_ci95"][1] and 0 < a["accuracy"] <= 1
        assert np.allclose(np.sum(a["confusion"]["normalised"], 1), 1) and np.shape(a["confusion"]["counts"]) == (3, 3)
        assert a["seeds"]["n_seeds"] == 2 and "accuracy" in a["seeds"]
    # leptons and b-jets tell the three classes apart
    gbdt = m["arms"]["standard_gbdt"]
    assert gbdt["per_class"]["other"]["auc"] > 0.9 and gbdt["auc"] > 0.8 and gbdt["accuracy"] > 0.6
    scores = np.load(out / "test_scores.npz", allow_pickle=False)
    assert scores["score_scratch"].shape == (len(scores["process"]), 3)
    assert np.allclose(scores["score_scratch"].sum(1), 1, atol=1e-4), "softmax probabilities of 3 classes"
    eff = m["data_efficiency"]["finetune"]
    assert [e["fraction"] for e in eff] == [0.3, 1.0] and len(eff[0]["per_seed"]) == 2
    v = m["pretraining_verdict"]["0.3"]["finetune_minus_scratch"]
    assert v["ci95"][0] <= v["delta_auc"] <= v["ci95"][1] and v["metric"] == "macro AUC"
    assert json.loads((out / "finetune.json").read_text())["classes"] == m["task"]["classes"]
    for png in ("confusion", "class_roc", "data_efficiency"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 5000


@pytest.mark.parametrize("classes, message", [
    ("H=hzz4l", "at least two classes"),
    ("H=hzz4l;Z=hzz4l,zz4l", "process hzz4l is in two classes"),
    ("H=hzz4l;Z=zjets", "class Z 'zjets' matches no events"),
])
def test_bad_classes_one_line_exit_2(sample, tmp_path, capsys, classes, message):
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), "--classes", classes, "--arms", "counts_gbdt",
                         "--out-dir", tmp_path / "o", *SMALL)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_class_without_events_in_a_split_exit_1(sample, tmp_path, capsys):
    from common.token_parquet import batch_to_numpy, sequences_table, split_of, write_sequences

    # wz: dy's sequences renamed, every event in the train split (none to validate or test on)
    idx = np.flatnonzero(split_of("train_only.h5", np.arange(5000)) == 0)[:40]
    b = batch_to_numpy(pq.read_table(sample["parquet"]["dy"]).slice(0, 40), sample["vocab"]["levels"])
    t = sequences_table(b["input_ids"], b["token_type_ids"], b["length"], idx, "train_only.h5", "wz", 361601, np.ones(40))
    write_sequences(tmp_path / "wz.parquet", [t], sample["vocab"], {})
    code, _, err = step4(capsys, "--parquet", *sample["parquet"].values(), tmp_path / "wz.parquet",
                         "--classes", "H=hzz4l;W=wz", "--arms", "counts_gbdt", "--out-dir", tmp_path / "o", *SMALL)
    assert code == 1 and "split holds no W events (wz)" in err and len(err.strip().splitlines()) == 1, err


def test_run_all_refuses_an_unknown_task_or_class_process_before_any_work(tmp_path):
    env = {**os.environ, "RUN": str(tmp_path / "run"), "SAMPLE_DIR": str(tmp_path / "raw"), "VENV": sys.prefix}
    r = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, timeout=300,
                       env={**env, "TASKS": "binary regression"})
    assert r.returncode == 2 and "unknown task 'regression'" in r.stderr
    r = subprocess.run(["bash", str(ROOT / "run_all.sh")], capture_output=True, text=True, timeout=300,
                       env={**env, "TASKS": "multiclass", "CLASSES": "ggF=hzz4l;VBF=vbfh"})
    assert r.returncode == 2 and "unknown process 'vbfh'" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "raw").exists(), "nothing generated"
