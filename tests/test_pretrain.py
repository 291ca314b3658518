"""step3_pretrain: masking, streaming splits and DDP sharding, an end-to-end pretraining that must
beat the frequency baseline, resume, torchrun DDP on 2 gloo processes, and bad inputs.

The pretraining run is the session-wide one of finetune_fixtures (test_finetune.py fine-tunes its
backbone); the other runs call step3's main(argv) in-process, except torchrun (real processes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_fixtures import SHARED_EVENTS, call_main, make_vocab, shared_sample  # noqa: E402

import step3_pretrain  # noqa: E402

from common.event_data import SequenceStream, code_ranges, mask_objects  # noqa: E402
from common.schema import MASK  # noqa: E402
from common.token_parquet import SPLITS, batch_to_numpy, legal_id_mask, split_of  # noqa: E402
from common import highlevel  # noqa: E402
from common.training import to_device  # noqa: E402
from common.transformer import EventClassifier, TypedRegressionHead, load_backbone, pool, vocab_checksum  # noqa: E402

# The synthetic sample has no step2 tokenizers behind it, hence no code geometry and no pair bias.
SMALL = ["--objective", "tokens", "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--batch-size", "64", "--threads", "1",
         "--no-plots", "--no-code-geometry", "--pair-bias", "0"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(capsys, *args):
    """step3's main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = call_main(step3_pretrain.main, *args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return shared_sample(tmp_path_factory)


def _batch(sample):
    table = pq.read_table(sample["parquet"]["hzz4l"])
    return batch_to_numpy(table, sample["vocab"]["levels"])


def test_masking_whole_objects_80_10_10_with_legal_random_codes(sample):
    vocab, b = sample["vocab"], _batch(sample)
    ids, types, attn = np.tile(b["input_ids"], (10, 1, 1)), np.tile(b["token_type_ids"], (10, 1)), np.tile(b["attention_mask"], (10, 1))
    new, labels, chosen = mask_objects(ids, types, attn, code_ranges(vocab), np.random.default_rng(0), 0.15)
    objects = np.isin(types, [vocab["type_ids"][o] for o in vocab["ranges"]]) & (attn > 0)
    assert not chosen[~objects].any(), "only object positions are masked (never CLS/SEP/event/padding)"
    assert abs(chosen.sum() / objects.sum() - 0.15) < 0.01
    masked = (new[chosen] == MASK).all(-1)
    kept = (new[chosen] == ids[chosen]).all(-1)
    randomised = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02 and 0.07 < randomised.mean() + kept.mean() / 2 < 0.16
    legal = legal_id_mask(vocab)
    t = np.repeat(types[chosen][:, None], vocab["levels"], 1)
    lvl = np.broadcast_to(np.arange(vocab["levels"]), t.shape)
    assert legal[t[randomised], lvl[randomised], new[chosen][randomised]].all(), "random codes are legal for the type"
    assert (labels[chosen] == ids[chosen]).all() and (labels[~chosen] == -100).all()
    assert (new[~chosen] == ids[~chosen]).all()


def test_masking_rate_per_object_type(sample):
    vocab, b = sample["vocab"], _batch(sample)
    ids, types, attn = (np.tile(b[k], (20,) + (1,) * (b[k].ndim - 1)) for k in ("input_ids", "token_type_ids", "attention_mask"))
    t = vocab["type_ids"]
    rates = np.full(max(t.values()) + 1, 0.1)
    rates[t["jets"]] = 0.6
    chosen = mask_objects(ids, types, attn, code_ranges(vocab), np.random.default_rng(0), rates)[2]
    for obj, want in (("jets", 0.6), ("tracks", 0.1)):
        of_type = (types == t[obj]) & (attn > 0)
        assert of_type.sum() > 500 and abs(chosen[of_type].mean() - want) < 0.03, obj


def test_stream_splits_and_rank_shards(sample):
    paths = [str(p) for p in sample["parquet"].values()]
    seen = {}
    for name, split in SPLITS.items():
        ev = [(f, i) for b in SequenceStream(paths, 2, 50, split=split).batches()
              for f, i in zip(b["source_file"], b["event_index"])]
        seen[name] = set(ev)
        for f in set(x[0] for x in ev):
            idx = np.array([i for g, i in ev if g == f])
            assert (split_of(f, idx) == split).all()
    assert not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    assert sum(len(s) for s in seen.values()) == 4 * SHARED_EVENTS
    shards = [SequenceStream(paths, 2, 32, split=0, shuffle_buffer=500, seed=7, rank=r, world=2) for r in (0, 1)]
    ev = [[(f, i) for b in s.batches(3) for f, i in zip(b["source_file"], b["event_index"])] for s in shards]
    assert not set(ev[0]) & set(ev[1]) and set(ev[0]) | set(ev[1]) == seen["train"], "ranks split the epoch"
    again = [(f, i) for b in shards[0].batches(3) for f, i in zip(b["source_file"], b["event_index"])]
    other = [(f, i) for b in shards[0].batches(4) for f, i in zip(b["source_file"], b["event_index"])]
    assert again == ev[0] and other != ev[0], "shuffling is seeded per epoch"
    # a buffer smaller than the corpus: the batches hold all 4 processes (reading the files in turn: 3 batches of 56)
    big = SequenceStream(paths, 2, 50, split=0, shuffle_buffer=1600, seed=7)
    batches = list(big.batches())
    assert sorted((f, i) for b in batches for f, i in zip(b["source_file"], b["event_index"])) == sorted(seen["train"])
    mixed = [len(set(b["process"])) for b in batches]
    assert min(mixed[:-1]) >= 3 and mixed.count(4) >= 0.9 * len(mixed), mixed


def test_pretraining_beats_no_context_baselines_and_resumes(sample, tmp_path, capsys):
    pre = sample["pretrain"]  # features + tokens + event, 5 epochs, lr 3e-3, mask 0.3, no dropout: finetune_fixtures.PRETRAIN_ARGS
    m = json.loads((pre / "metrics.json").read_text())
    n_train = sum(int((split_of(Path(p).with_suffix(".h5").name, np.arange(SHARED_EVENTS)) == 0).sum())
                  for p in sample["parquet"].values())
    assert m["n_events"]["train"] == n_train, "pretraining reads the train split only"
    val = m["val"]["tokens"]
    assert val["n_masked"] > 500
    assert val["acc"] > val["frequency_baseline_acc"] + 0.03, (val["acc"], val["frequency_baseline_acc"])
    assert set(val["per_level"]) == {"0", "1"} and {"electrons", "muons", "jets"} <= set(val["per_type"])
    # the fixture's objects share their event's rapidity and azimuth axis: the features are predictable from context
    gain = m["context_gain"]
    assert m["objectives"] == ["features", "tokens", "event"] and {"electrons", "muons", "jets", "met"} <= set(gain)
    assert min(gain[o]["gain"] for o in ("electrons", "muons", "jets")) > 0.03, gain  # eta, phi: 3 of ~9 features
    assert m["val"]["features"]["context_gain"] > 0.05
    # per process: the same masked objects, so a type's gain is their mix and lies between their extremes
    by_process = m["context_gain_by_process"]
    assert set(by_process) == set(sample["parquet"])
    for obj, v in gain.items():
        parts = [p[obj] for p in by_process.values() if obj in p]
        assert sum(x["n"] for x in parts) == v["n"] and sum(x["n_events"] for x in parts) == v["n_events"]
        assert min(x["gain"] for x in parts) - 1e-12 <= v["gain"] <= max(x["gain"] for x in parts) + 1e-12, (obj, parts)
    # the event representation learns the event's observables (hzz4l's harder leptons, ttbar's jets, ...)
    # each validation event is masked VAL_MASKS times, and its copies make one unit of the intervals
    event = m["val"]["event"]["per_type"]["event"]
    assert event["n"] == step3_pretrain.VAL_MASKS * m["n_events"]["val"] and event["n_events"] == m["n_events"]["val"]
    assert m["val"]["event"]["context_gain"] > 0.2
    model, side = load_backbone(pre / "backbone.pt")  # weights_only=True inside
    assert side["vocab_checksum"] == vocab_checksum(sample["vocab"]) and side["config"]["d_model"] == 32
    assert side["config"]["id_levels"] == 0, "without the code geometry every level's ids are embedded"
    assert side["objectives"] == ["features", "tokens", "event"] and side["representation"] == "mean"
    # the event objective's head ships with the backbone; a classifier may read its prediction beside the state
    assert side["config"]["observables"] == len(highlevel.NAMES) and model.observables is not None
    plain = EventClassifier(load_backbone(pre / "backbone.pt")[0])  # by default it drops the head
    assert plain.backbone.observables is None and plain.head.net[0].in_features == 32
    clf = EventClassifier(model.eval(), observables=True)
    batch = next(SequenceStream([sample["parquet"]["dy"]], sample["vocab"]["levels"], 4).batches(0))
    ids, types, mask = to_device(batch, torch.device("cpu"))
    with torch.no_grad():
        rep, pooled = clf.embed(ids, types, mask), pool(model(ids, types, mask), types, mask)
    assert rep.shape == (4, 32 + len(highlevel.NAMES)) and torch.allclose(rep[:, :32], pooled)
    assert torch.allclose(rep[:, 32:], model.observables(pooled))
    assert (pre / "history.csv").read_text().count("\n") == 6
    # a finished run is skipped; --resume continues from the checkpoint to more epochs (on a copy)
    out = tmp_path / "pre"
    shutil.copytree(pre, out)
    code, stdout, _ = run(capsys, "--parquet", *sample["parquet"].values(), "--out-dir", out, *SMALL)
    assert code == 0 and "skipping" in stdout
    code, stdout, err = run(capsys, "--parquet", *sample["parquet"].values(), "--out-dir", out, "--epochs", "6",
                            "--resume", "--lr", "3e-3", "--mask-prob", "0.3", "--max-steps", "4", "--balance-types", *SMALL,
                            "--objective", "features,tokens,event")
    assert code == 0 and "resuming after epoch 4" in stdout, err[-1500:]
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [0, 1, 2, 3, 4, 5]
    # a checkpoint of another model (here: without the event objective's head) is refused in one line
    code, _, err = run(capsys, "--parquet", *sample["parquet"].values(), "--out-dir", out, "--epochs", "7", "--resume",
                       *SMALL, "--objective", "features,tokens")
    assert code == 1 and "does not fit this model" in err and len(err.strip().splitlines()) == 1, err[-1500:]
    # --no-typed-head (one shared output layer): its own run trains; the typed head's checkpoint does not fit it
    code, _, err = run(capsys, "--parquet", *sample["parquet"].values(), "--out-dir", tmp_path / "shared", "--epochs", "1",
                       "--max-steps", "4", "--no-typed-head", *SMALL, "--objective", "features,tokens,event")
    assert code == 0, err[-1500:]
    assert {"electrons", "muons", "jets"} <= set(json.loads((tmp_path / "shared/metrics.json").read_text())["context_gain"])
    code, _, err = run(capsys, "--parquet", *sample["parquet"].values(), "--out-dir", out, "--epochs", "7", "--resume",
                       "--no-typed-head", *SMALL, "--objective", "features,tokens,event")
    assert code == 1 and "does not fit this model" in err and len(err.strip().splitlines()) == 1, err[-1500:]


def test_the_same_seed_repeats_whatever_the_order_the_files_are_named_in(sample, tmp_path, capsys):
    files = list(sample["parquet"].values())
    runs = []
    for name, order in (("given", files), ("reversed", files[::-1])):
        code, _, err = run(capsys, "--parquet", *order, "--out-dir", tmp_path / name, "--epochs", "1", "--max-steps", "6",
                           *SMALL, "--objective", "features,tokens")
        assert code == 0, err[-1500:]
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text())["history"][0])
    assert runs[0]["train_loss"] == runs[1]["train_loss"] and runs[0]["val_loss"] == runs[1]["val_loss"], runs
    # and another seed is another run
    code, _, err = run(capsys, "--parquet", *files, "--out-dir", tmp_path / "seed2", "--epochs", "1", "--max-steps", "6",
                       *SMALL, "--objective", "features,tokens", "--seed", "2")
    assert code == 0 and json.loads((tmp_path / "seed2/metrics.json").read_text())["history"][0]["train_loss"] != runs[0]["train_loss"]


def test_torchrun_ddp_two_gloo_processes(sample, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "step3_pretrain.py"), "--parquet", *map(str, sample["parquet"].values()), "--out-dir", str(out),
           "--epochs", "1", "--device", "cpu", *SMALL]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    n = SequenceStream([str(p) for p in sample["parquet"].values()], 2, 64, split=0).count()
    assert m["steps_per_epoch"] == -(-n // 32) // 2, "each rank reads 32 of every step's 64 events"
    assert abs(m["steps_per_epoch"] - -(-n // 64)) <= 1, "as many optimiser steps as one process of batch 64"
    # step3's own launcher (what run_all uses on CPU): the same two-rank training, loss for loss
    out2 = tmp_path / "ranks"
    r = subprocess.run([sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", *map(str, sample["parquet"].values()),
                        "--out-dir", str(out2), "--epochs", "1", "--device", "cpu", *SMALL, "--cpu-ranks", "2"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m2 = json.loads((out2 / "metrics.json").read_text())
    losses = lambda metrics: [(h["train_loss"], h["val_loss"]) for h in metrics["history"]]  # noqa: E731
    assert m2["world_size"] == 2 and losses(m2) == losses(m)
    bad = subprocess.run([sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", str(tmp_path / "missing.parquet"),
                          "--out-dir", str(tmp_path / "bad"), *SMALL, "--cpu-ranks", "2"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    assert bad.stderr.count("error: no usable Parquet input") == 1, "one rank's error lines, not every rank's"
    # a bad file beside a good one: the ranks train on the good one and leave with exit 1 (D.finish)
    mixed = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(sample["parquet"]["dy"]).drop(["input_ids"]), mixed)
    r = subprocess.run([sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", str(mixed), str(sample["parquet"]["dy"]),
                        "--out-dir", str(tmp_path / "mixed"), "--epochs", "1", "--max-steps", "2", "--device", "cpu", *SMALL,
                        "--cpu-ranks", "2"], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1 and (tmp_path / "mixed" / "backbone.pt").exists() and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "lacks the column(s) input_ids" in r.stderr and "wrote" in r.stdout


def test_bad_inputs_one_line_errors(sample, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(sample["parquet"]["dy"]).drop(["input_ids"]), bad)
    # through the real command line (the one subprocess here): exit 1, one line naming the file, no traceback
    r = subprocess.run([sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", str(bad), "--out-dir",
                        str(tmp_path / "o1"), *SMALL], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and f"{bad}: " in r.stderr and "lacks the column(s) input_ids" in r.stderr
    assert "Traceback" not in r.stderr
    # one good and one bad file: the good one is still used, exit 1 lists the failure
    code, _, err = run(capsys, "--parquet", bad, sample["parquet"]["dy"], "--out-dir", tmp_path / "o2", "--epochs", "1",
                       "--max-steps", "2", *SMALL)
    assert code == 1 and (tmp_path / "o2" / "backbone.pt").exists() and "lacks the column(s) input_ids" in err
    # a file whose events all fall in the test split: nothing to pretrain on
    from common.token_parquet import sequences_table, write_sequences
    idx = np.flatnonzero(split_of("only_test.h5", np.arange(20000)) == 2)[:50]
    ids = np.ones((50, 3, 2), np.int32)
    table = sequences_table(ids, np.ones((50, 3), np.int8), np.full(50, 3), idx, "only_test.h5", "dy", 1, np.ones(50))
    write_sequences(tmp_path / "test_only.parquet", [table], make_vocab(), {})
    code, _, err = run(capsys, "--parquet", tmp_path / "test_only.parquet", "--out-dir", tmp_path / "o3", *SMALL)
    assert code != 0 and "split holds no events" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--parquet", sample["parquet"]["dy"], "--out-dir", tmp_path / "o6", *SMALL, "--batch-size", "0")
    assert code == 2 and "--batch-size 0: events per step must be a positive multiple of the 1 rank(s)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o6").exists()
    code, _, err = run(capsys, "--parquet", bad, "--mask-prob", "1.5")
    assert code == 2 and "--mask-prob must be in (0, 1)" in err
    code, _, err = run(capsys, "--parquet", bad, "--val-masks", "0")
    assert code == 2 and "--val-masks must be >= 1" in err
    for value, says in (("taus=1.5", "taus=1.5: rates must be in (0, 1)"), ("gluons=0.5", "got 'gluons=0.5'"),
                        ("taus", "expected OBJECT=VALUE")):
        code, _, err = run(capsys, "--parquet", bad, "--type-mask-prob", value)
        assert code == 2 and says in err, value
    code, _, err = run(capsys, "--parquet", sample["parquet"]["dy"], "--out-dir", tmp_path / "o5", "--id-levels", "1", *SMALL)
    assert code == 2 and "--id-levels needs object-granularity tokens and the code geometry" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o5").exists()
    code, _, err = run(capsys, "--parquet", bad, "--objective", "features,colour")
    assert code == 2 and "choose one or more of features, latent, tokens, event" in err
    # the latent objective needs the step2 tokenizers, which the synthetic sample has none of
    code, _, err = run(capsys, "--parquet", *sample["parquet"].values(), "--out-dir", tmp_path / "o4", *SMALL,
                       "--objective", "latent")
    assert code == 2 and "--objective latent needs the step2 tokenizers" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o4").exists()


def test_code_geometry_embeds_the_quantised_latent_and_hides_masked_objects():
    from common.schema import MASK
    from common.transformer import EventTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=40, levels=2, n_types=12, max_length=8, d_model=16, n_heads=2, d_ff=32,
                      dropout=0.0, code_dim=3)
    model = EventTransformer(cfg).eval()
    table = torch.zeros(40, 3)
    table[10:20] = torch.randn(10, 3)
    model.set_code_vectors(table.numpy())
    types = torch.tensor([[1, 6, 6]])
    ids = torch.tensor([[[1, 0], [10, 15], [11, 15]]])  # [CLS], two jets that differ in their level-0 code
    x = model.embed(ids, types)
    without = EventTransformer(ModelConfig(**{**cfg.__dict__, "code_dim": 0})).eval()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if k not in ("code_vectors", "code_proj")})
    delta = x - without.embed(ids, types)
    latent = table[ids].sum(-2)  # the sum of an object's codebook vectors
    assert torch.allclose(delta.abs().sum(-1) > 1e-6, latent.abs().sum(-1) > 0)  # only where there is a latent
    masked = ids.clone()
    masked[0, 1] = torch.tensor([MASK, MASK])
    assert torch.allclose(model.embed(masked, types)[0, 1], without.embed(masked, types)[0, 1])  # nothing leaks


def test_a_backbone_with_the_observables_head_leaves_the_callers_random_stream_as_it_was():
    # step4 builds and loads backbones between its seeding and its classifier heads' initialisation
    from common.transformer import EventTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=40, levels=2, n_types=12, max_length=8, d_model=16, n_heads=2, d_ff=32)
    torch.manual_seed(0)
    plain = EventTransformer(cfg)
    after_plain = torch.rand(3)
    torch.manual_seed(0)
    with_head = EventTransformer(ModelConfig(**{**cfg.__dict__, "observables": 5}))
    assert torch.equal(torch.rand(3), after_plain) and with_head.observables is not None
    assert torch.equal(with_head.code_emb.weight, plain.code_emb.weight)


def test_rank_in_type_counts_the_earlier_objects_of_the_same_type_and_old_backbones_load_without_it():
    from dataclasses import asdict
    from common.schema import TYPE_IDS
    from common.transformer import EventTransformer, ModelConfig, rank_in_type
    seq = ["CLS", "event", "electrons", "electrons", "SEP", "jets", "tracks", "jets", "jets", "SEP", "PAD", "PAD"]
    types = torch.tensor([[TYPE_IDS[n] for n in seq]])
    assert rank_in_type(types, max(TYPE_IDS.values()) + 1).tolist()[0][:9] == [0, 0, 0, 1, 0, 0, 0, 1, 2]
    cfg = ModelConfig(vocab_size=40, levels=2, n_types=13, max_length=12, d_model=16, n_heads=2, d_ff=32, dropout=0.0,
                      type_rank=True)
    model = EventTransformer(cfg).eval()
    old = {k: v for k, v in asdict(cfg).items() if k != "type_rank"}  # a sidecar written before the rank embedding
    plain = EventTransformer(ModelConfig(**old)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "rank_emb.weight"})  # loads, strict
    ids, mask = torch.randint(4, 40, (1, 12, 2)), (types != TYPE_IDS["PAD"]).long()
    with torch.no_grad():
        assert not torch.allclose(model(ids, types, mask), plain(ids, types, mask))
        model.rank_emb.weight.zero_()  # the rank embedding is the only difference
        assert torch.allclose(model(ids, types, mask), plain(ids, types, mask), atol=1e-6)


def test_id_levels_embed_the_coarse_ids_and_the_fine_levels_through_their_code_vectors():
    from common.transformer import EventTransformer, ModelConfig

    cfg = ModelConfig(vocab_size=40, levels=2, n_types=12, max_length=8, d_model=16, n_heads=2, d_ff=32,
                      dropout=0.0, code_dim=3, id_levels=1)
    model = EventTransformer(cfg).eval()
    types = torch.tensor([[6]])
    a, b = torch.tensor([[[10, 20]]]), torch.tensor([[[10, 21]]])  # one jet, two codes at the fine level
    table = torch.zeros(40, 3)
    model.set_code_vectors(table.numpy())
    assert torch.allclose(model.embed(a, types), model.embed(b, types))  # the fine id's own embedding is not read
    table[21] = torch.tensor([1.0, -2.0, 0.5])
    model.set_code_vectors(table.numpy())
    assert not torch.allclose(model.embed(a, types), model.embed(b, types))  # ... its codebook vector is
    every = EventTransformer(ModelConfig(**{**cfg.__dict__, "id_levels": 0})).eval()
    every.load_state_dict(model.state_dict())
    assert not torch.allclose(every.embed(a, types), model.embed(a, types))
    with pytest.raises(ValueError, match="needs the code geometry"):
        EventTransformer(ModelConfig(**{**cfg.__dict__, "code_dim": 0}))


def test_id_levels_keep_no_rows_for_the_fine_ids_and_leave_every_output_and_initial_value_as_it_was():
    from common.transformer import EventTransformer, ModelConfig

    # per level the id range of each type: jets 10-14 then 20-24, taus 15-19 then 25-29; ids 4-9 stand for the event tokens
    levels = [[[10, 5], [15, 5]], [[20, 5], [25, 5]]]
    cfg = ModelConfig(vocab_size=30, levels=2, n_types=12, max_length=8, d_model=16, n_heads=2, d_ff=32,
                      dropout=0.0, code_dim=3, id_levels=1, level_ranges=levels)
    assert cfg.embedded_ids().tolist() == list(range(20))
    torch.manual_seed(0)
    full = EventTransformer(ModelConfig(**{**cfg.__dict__, "level_ranges": []})).eval()  # a backbone saved before
    after_full = torch.rand(3)
    torch.manual_seed(0)
    compact = EventTransformer(cfg).eval()
    assert torch.equal(torch.rand(3), after_full), "cutting the table draws no other random numbers"
    assert compact.code_emb.weight.shape == (20, 16) and full.code_emb.weight.shape == (30, 16)
    assert torch.equal(compact.code_emb.weight, full.code_emb.weight[:20])
    table = torch.randn(30, 3).numpy()
    full.set_code_vectors(table), compact.set_code_vectors(table)
    types = torch.tensor([[1, 6, 6, 11, 2, 0]])
    ids = torch.tensor([[[1, 1], [12, 22], [3, 3], [16, 27], [2, 2], [0, 0]]])
    mask = (types != 0).long()
    with torch.no_grad():
        assert torch.equal(compact(ids, types, mask), full(ids, types, mask))
    # a backbone written in the compact form loads back into it, strictly
    EventTransformer(cfg).load_state_dict(compact.state_dict())
    assert EventTransformer(ModelConfig(**{**cfg.__dict__, "id_levels": 0})).code_emb.weight.shape[0] == 30


def test_dropout_drops_at_its_rate_keeps_the_expectation_and_repeats_with_the_seed():
    from torch import nn
    from common.transformer import Dropout, EventTransformer, ModelConfig

    drop, x = Dropout(0.1), torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 5 * (0.1 * 0.9 / x.numel()) ** 0.5, dropped
    assert abs(y.mean().item() - 1.0) < 2e-3 and torch.allclose(y[y > 0], torch.tensor(1 / (1 - 3277 / 32768)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach()), "the gradient passes where the mask keeps"
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    model = EventTransformer(ModelConfig(vocab_size=40, levels=2, n_types=12, max_length=8))
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Dropout)}
    assert kinds == {Dropout}, "the encoder layers' dropouts too"


def test_encoder_layer_written_out_attention_is_torchs_and_drops_its_weights():
    """On CPU in training the self-attention is EncoderLayer's own: without dropout it must give torch's attention
    (the pair-bias mask and the padding mask), with dropout it must drop attention weights, repeat with the seed and
    pass gradients to the projections."""
    from common.transformer import EncoderLayer, cheap_dropouts

    torch.manual_seed(0)
    layer = cheap_dropouts(EncoderLayer(16, 4, 32, 0.1, activation="gelu", batch_first=True, norm_first=True))
    x = torch.randn(5, 9, 16)
    pad = torch.zeros(5, 9, dtype=torch.bool)
    pad[:, 6:] = True
    bias = torch.randn(20, 9, 9).masked_fill(pad.repeat_interleave(4, 0)[:, None, :], float("-inf"))
    torch_own = {k: layer.eval()(x, **m) for k, m in (("bias", {"src_mask": bias}), ("pad", {"src_key_padding_mask": pad}))}
    for m in layer.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 1e-9  # rounds to no dropped element, yet takes the training path
    layer.self_attn.dropout = 1e-9
    layer.train()
    assert torch.allclose(layer(x, src_mask=bias), torch_own["bias"], atol=1e-5)
    assert torch.allclose(layer(x, src_key_padding_mask=pad), torch_own["pad"], atol=1e-5)

    layer.self_attn.dropout = 0.5  # only the attention weights dropped
    torch.manual_seed(1)
    y = layer(x, src_mask=bias)
    assert (y - torch_own["bias"]).abs().max() > 1e-2, "the attention weights were not dropped"
    torch.manual_seed(1)
    assert torch.equal(layer(x, src_mask=bias), y)
    y.sum().backward()
    assert layer.self_attn.in_proj_weight.grad.abs().sum() > 0 and layer.self_attn.out_proj.weight.grad.abs().sum() > 0


def test_damaged_inputs_skip_the_file_and_keep_the_run(sample, tmp_path, capsys):
    """A Parquet file with a corrupted data page (its footer still reads) is skipped where it is found and
    listed in metrics.json; a file of another vocabulary given first loses to the majority; a checkpoint
    holding pickled objects is refused in one line."""
    import argparse

    good = [str(p) for p in sample["parquet"].values()]
    broken = tmp_path / "broken.parquet"
    table = pq.read_table(good[0])
    pq.write_table(table.replace_schema_metadata(pq.read_schema(good[0]).metadata), broken, row_group_size=50,
                   compression="zstd")
    data = bytearray(broken.read_bytes())
    start = len(data) // 2
    data[start:start + 3000] = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    broken.write_bytes(bytes(data))
    odd = make_vocab(tokenizer_tag="refit")
    from finetune_fixtures import make_sample
    other = make_sample(tmp_path / "other", n=60, processes=("dy",), vocab=odd, name_suffix="_odd")["parquet"]["dy"]
    out = tmp_path / "o"
    code, stdout, err = run(capsys, "--parquet", other, broken, *good[1:], "--out-dir", out, "--epochs", "1",
                            "--max-steps", "3", *SMALL)
    assert code == 1 and "Traceback" not in err, err[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "backbone.pt").exists() and m["val"]["tokens"]["n_masked"] > 100
    assert any(str(broken) in e and "unreadable data" in e for e in m["input_errors"]), m["input_errors"]
    assert any(str(other) in e and "differs from the one of" in e for e in m["input_errors"]), "the odd file is named"
    # a pickled object where a tensor-only checkpoint belongs (--resume)
    torch.save({"model": argparse.Namespace(a=1)}, out / "checkpoint.pt")
    code, _, err = run(capsys, "--parquet", *good, "--out-dir", out, "--resume", "--epochs", "2", *SMALL)
    assert code == 1 and "refusing to unpickle" in err and len(err.strip().splitlines()) == 1, err


def test_balanced_regression_loss_weighs_every_type_alike():
    """--balance-types: the mean of each type's MSE, so 4 easy tracks do not outvote 1 hard electron;
    the statistics (context gain) are the same either way."""
    from common.training import RegressionStats
    types = torch.tensor([0, 0, 0, 0, 2])
    pred = torch.zeros(5, 2)
    z = torch.tensor([[1.0, 9.0]] * 4 + [[3.0, 3.0]])
    valid = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 1.0]])  # the 9s are not valid columns
    events = torch.tensor([0, 0, 1, 1, 1])
    plain, balanced = RegressionStats(3, "cpu"), RegressionStats(3, "cpu")
    assert plain.add(types, pred, z, valid, events).item() == pytest.approx((4 * 1 + 2 * 9) / 6)
    assert balanced.add(types, pred, z, valid, events, balanced=True).item() == pytest.approx((1 + 9) / 2)
    assert torch.equal(plain.sums, balanced.sums)


def test_context_gain_interval_matches_a_bootstrap_over_events():
    """The context gain's 95% interval treats events as the units: objects of one event share an error
    (their context), so the interval must be as wide as resampling whole events makes it, wider than
    objects taken as independent would give. Batches add up like one pass."""
    from common.training import RegressionStats
    rng = np.random.default_rng(7)
    n_events, per_event = 600, 4
    events = np.repeat(np.arange(n_events), per_event)
    types = rng.integers(0, 2, len(events))
    z = rng.normal(size=(len(events), 3))
    shared = np.repeat(rng.normal(size=n_events), per_event)[:, None]  # an error common to the event's objects
    pred = 0.6 * z + 0.8 * shared + 0.3 * rng.normal(size=z.shape)
    stats = RegressionStats(2, "cpu")
    for rows in np.array_split(np.arange(len(events)), 7):  # batches hold whole events, numbered per batch
        first = events[rows][0]
        stats.add(torch.from_numpy(types[rows]), torch.from_numpy(pred[rows]), torch.from_numpy(z[rows]),
                  torch.ones(len(rows), 3, dtype=torch.float64), torch.from_numpy(events[rows] - first))
    out = stats.summary({"type_ids": {"a": 0, "b": 1}})
    model, base = ((pred - z) ** 2).sum(1), (z**2).sum(1)
    for name, sel in (("a", types == 0), ("b", types == 1), (None, np.ones_like(types, bool))):
        m = np.bincount(events, model * sel, n_events)
        b = np.bincount(events, base * sel, n_events)
        draws = rng.integers(0, n_events, (2000, n_events))
        boot = 1 - m[draws].sum(1) / b[draws].sum(1)
        got = out["per_type"][name] if name else out
        lo, hi = got["context_gain_ci95"]
        assert got["context_gain"] == pytest.approx(1 - m.sum() / b.sum())
        assert lo < got["context_gain"] < hi
        assert (hi - lo) / 2 == pytest.approx(1.96 * boot.std(), rel=0.1), name
        naive = 1.96 * np.std(model[sel] - (model[sel].sum() / base[sel].sum()) * base[sel]) * np.sqrt(sel.sum()) / base[sel].sum()
        assert (hi - lo) / 2 > 1.3 * naive, name  # objects as independent units would understate it
    one = RegressionStats(1, "cpu")  # objects of a single event: a gain, but no interval
    one.add(torch.zeros(3, dtype=torch.long), torch.zeros(3, 2), torch.ones(3, 2), torch.ones(3, 2), torch.zeros(3))
    assert one.summary({"type_ids": {"a": 0}})["per_type"]["a"]["context_gain"] == 0.0
    assert np.isnan(one.summary({"type_ids": {"a": 0}})["per_type"]["a"]["context_gain_ci95"]).all()


def test_target_scale_needs_two_values_above_round_off():
    """A column seen once (one four-lepton event among the scaler's batches) keeps a spread of 1, not
    the float32 round-off of x**2 - x**2, which standardised the other events to 1e4 sigma."""
    from common.training import TargetScaler
    x = np.array([[2.87, 1.0], [0.0, 3.0], [0.0, 5.0]], dtype=np.float32)  # 2.87**2 rounds up in float32
    valid = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    s = TargetScaler(1, 2)
    s.add(np.zeros(3, dtype=np.int64), x, valid)
    s.finish()
    assert s.mean[0] == pytest.approx([2.87, 3.0]) and s.std[0] == pytest.approx([1.0, np.sqrt(8 / 3)])


def test_masked_object_head_has_an_output_layer_per_type():
    """Each type's prediction starts at its no-context mean (0) and its output layer learns from its own objects:
    a rare type is not read through a layer the common ones shaped."""
    head = TypedRegressionHead(8, 3, n_types=4)
    hidden, types = torch.randn(5, 8), torch.tensor([0, 1, 1, 2, 3])
    assert torch.equal(head(hidden, types), torch.zeros(5, 3))
    (head(hidden[3:4], types[3:4]) - 1).pow(2).sum().backward()  # one object, of type 2
    grad = head.weight.grad.abs().sum((1, 2))
    assert grad[2] > 0 and grad[[0, 1, 3]].sum() == 0
    assert head.bias.grad[2].abs().sum() > 0 and head.bias.grad[[0, 1, 3]].abs().sum() == 0
