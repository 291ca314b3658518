"""The pair-kinematics attention bias (common/pair_kinematics.py, step3 --pair-bias): kinematics decoded
from real token files agree with the tokenizers' decode and common.physics, a [MASK]ed object has none,
the float attention mask is the plain model's when the bias is zero, step3 --pair-bias then step4 on
its backbone, and the bad inputs."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import step2_apply
import step2_fit
import step3_pretrain
import step4_finetune
from common import token_parquet
from common import training as T
from common.event_data import code_ranges, mask_objects
from common.pair_kinematics import KINEMATICS, KinematicsDecoder, PairBias, overlap_targets, pair_features
from common.physics import LEPTON_MASS, delta_r, invariant_mass, p4
from common.schema import MASK, TYPE_IDS
from common.tokenizer import load_tokenizer
from common.transformer import EventTransformer, ModelConfig, OverlapPointer, load_backbone
from finetune_fixtures import call_main, make_sample
from test_tokenize import write_synthetic_h5

torch.set_num_threads(1)
FIT = ["--steps", "40", "--warmup-steps", "10", "--batch-size", "128", "--levels", "2", "--codebook-size", "16",
       "--preprocess-events", "400", "--eval-objects", "500", "--closure-events", "0", "--no-plots",
       "--threads", "1", "--workers", "1", "--seed", "2"]
MODEL = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--threads", "1", "--no-plots"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Two synthetic step1 files, tokenizers fitted on them and their token files (step2 fit + apply)."""
    d = tmp_path_factory.mktemp("pair")
    h5 = [write_synthetic_h5(d / "h5" / "ttbar.h5", 500, seed=1),
          write_synthetic_h5(d / "h5" / "dy.h5", 500, seed=2, process="dy", dsid=700320)]
    assert call_main(step2_fit.main, "--h5", *h5, "--out-dir", d / "tok", *FIT) == 0
    assert call_main(step2_apply.main, "--h5", *h5, "--tokenizers", d / "tok", "--out-dir", d / "tokens",
                     "--cap", "tracks=6", "--max-length", "48", "--threads", "1") == 0
    return d


@pytest.fixture(scope="module")
def backbone(tokens):
    """A tiny step3 --pair-bias 8 run on the token files: its backbone.pt."""
    pre = tokens / "pre"
    assert call_main(step3_pretrain.main, "--parquet", tokens / "tokens", "--out-dir", pre, "--pair-bias", "8",
                     "--objective", "latent", "--epochs", "1", "--max-steps", "3", "--batch-size", "32", *MODEL) == 0
    return pre / "backbone.pt"


def batch_of(d, n=200):
    path = d / "tokens" / "ttbar.parquet"
    vocab = token_parquet.read_vocab(path)
    return vocab, token_parquet.batch_to_numpy(pq.read_table(path).slice(0, n), vocab["levels"])


def test_decoded_kinematics_are_the_tokenizers_decode_and_pair_features_the_physics(tokens):
    vocab, b = batch_of(tokens)
    ids, types = b["input_ids"], b["token_type_ids"]
    kin = KinematicsDecoder(vocab, tokens / "tok")(ids, types)
    assert kin.shape == types.shape + (4,) and kin.dtype == np.float32
    objects = np.isin(types, [TYPE_IDS[o] for o in vocab["ranges"]]) & (b["attention_mask"] > 0)
    assert not kin[~objects].any() and (kin[objects][:, 0] > 0).all(), "zeros exactly where no object stands"
    for obj, ranges in vocab["ranges"].items():
        sel = types == TYPE_IDS[obj]
        start = np.array([r[0] for r in ranges])
        ref = load_tokenizer(tokens / "tok" / f"{obj}.pt").decode(ids[sel][:, : len(start)] - start)
        got = dict(zip(KINEMATICS, kin[sel].T))
        assert np.allclose(got["pt"], np.maximum(ref["pt"], 0), rtol=1e-5) and np.allclose(got["phi"], ref["phi"], atol=1e-5)
        assert np.allclose(got["eta"], ref["eta"] if "eta" in ref else 0.0, atol=1e-5), obj  # MET: transverse
        assert np.allclose(got["mass"], np.maximum(ref["mass"], 0) if "mass" in ref else LEPTON_MASS.get(obj, 0.0),
                           rtol=1e-5, atol=1e-6), obj
    assert (types == TYPE_IDS["jets"]).sum() > 100 and np.ptp(kin[types == TYPE_IDS["jets"]][:, 3]) > 1.0

    feats, valid = pair_features(torch.from_numpy(kin))
    feats, valid = feats.numpy().astype(np.float64), valid.numpy()
    e, i, j = np.nonzero(valid)
    assert np.array_equal(valid, objects[:, :, None] & objects[:, None, :] & ~np.eye(types.shape[1], dtype=bool)[None])
    assert len(e) > 1000 and not feats[~valid].any()
    k = kin.astype(np.float64)
    pi, pj = (p4(*k[e, x].T) for x in (i, j))
    m2 = invariant_mass(pi + pj) ** 2
    assert np.allclose(np.exp(feats[e, i, j, 3]), np.maximum(m2, 1e-8), rtol=1e-4, atol=1e-4), "ln m^2 of the pair"
    dr = delta_r(k[e, i, 1], k[e, i, 2], k[e, j, 1], k[e, j, 2])
    pt_min, pt_sum = np.minimum(k[e, i, 0], k[e, j, 0]), k[e, i, 0] + k[e, j, 0]
    assert np.allclose(np.exp(feats[e, i, j, 0]), np.maximum(dr, 1e-8), rtol=1e-5)
    assert np.allclose(np.exp(feats[e, i, j, 1]), np.maximum(pt_min * dr, 1e-8), rtol=1e-5)
    assert np.allclose(np.exp(feats[e, i, j, 2]), pt_min / pt_sum, rtol=1e-5)
    assert np.allclose(feats, feats.transpose(0, 2, 1, 3)), "symmetric in the pair"


def test_masked_objects_have_no_kinematics_and_no_pair_features(tokens):
    vocab, b = batch_of(tokens)
    decode = KinematicsDecoder(vocab, tokens / "tok")
    ids, labels, chosen = mask_objects(b["input_ids"], b["token_type_ids"], b["attention_mask"], code_ranges(vocab),
                                       np.random.default_rng(0), 0.5)
    kin = decode(ids, b["token_type_ids"])
    masked = chosen & (ids[..., 0] == MASK)
    replaced = chosen & ~masked & (ids != b["input_ids"]).any(-1)
    assert masked.sum() > 100 and replaced.sum() > 5
    assert not kin[masked].any(), "a [MASK]ed object decodes to nothing"
    unchanged = ~masked & ~replaced
    assert np.array_equal(kin[unchanged], decode(b["input_ids"], b["token_type_ids"])[unchanged])
    assert (kin[replaced][:, 0] > 0).all(), "a random replacement decodes to its random object"
    feats, valid = pair_features(torch.from_numpy(kin))
    rows = torch.from_numpy(masked)
    assert not valid[rows].any() and not valid.transpose(1, 2)[rows].any() and not feats[rows].any()
    padding = torch.from_numpy(b["attention_mask"] == 0)
    length = masked.shape[1]
    bias = PairBias(8, 2)(torch.from_numpy(kin), padding).view(len(kin), 2, length, length)
    e, p = np.nonzero(masked)
    assert torch.equal(bias[e, :, p], torch.zeros(len(e), 2, 1).masked_fill(padding[e, None], float("-inf"))), \
        "its row: 0, -inf at padded keys"
    assert not bias[e, :, :, p].any(), "its column: 0"


def test_step3_decodes_the_masked_ids(tokens, tmp_path, monkeypatch):
    seen = []

    def recording(*args):
        decode = KinematicsDecoder(*args[:2])
        return lambda ids, types: seen.append(ids) or decode(ids, types)
    monkeypatch.setattr(step3_pretrain, "open_kinematics", recording)
    assert call_main(step3_pretrain.main, "--parquet", tokens / "tokens", "--out-dir", tmp_path / "pre", "--pair-bias", "8",
                     "--objective", "latent", "--epochs", "1", "--max-steps", "2", "--batch-size", "32", *MODEL) == 0
    assert len(seen) >= 2 and all((ids == MASK).any() for ids in seen), "the kinematics come from the masked ids"


def test_overlap_targets_point_at_the_visible_objects_within_delta_r():
    masked = torch.tensor([[40.0, 0.5, 3.10, 0.0], [30.0, -1.0, 0.0, 0.0]])
    event = torch.tensor([[50.0, 0.55, -3.13, 5.0],  # 0.07 away across the phi wrap
                          [45.0, 0.52, 3.12, 0.0],  # as near, but not visible (masked itself)
                          [60.0, 0.5, 1.0, 8.0],  # far
                          [20.0, 0.6, 3.2, 3.0]])  # 0.14 away
    kin = event.expand(2, -1, -1)
    visible = torch.tensor([True, False, True, True]).expand(2, -1)
    target = overlap_targets(masked, kin, visible, 0.2)
    assert torch.equal(target[0], torch.tensor([0.5, 0.0, 0.0, 0.5, 0.0])), "uniform over the visible overlaps"
    assert torch.equal(target[1], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])), "nothing near: the null slot"
    assert torch.equal(overlap_targets(masked, kin, visible, 0.1)[0], torch.tensor([1.0, 0, 0, 0, 0]))

    torch.manual_seed(0)
    pointer = OverlapPointer(8)
    states = torch.randn(2, 4, 8)
    chosen = torch.tensor([[False, True, False, False], [True, False, False, True]])
    visible = torch.tensor([[True, False, True, True], [False] * 4])
    read, logits = pointer(states, chosen, visible)
    assert logits.shape == (3, 5) and logits[0, 1] == float("-inf") and torch.isfinite(logits[0, [0, 2, 3, 4]]).all()
    assert torch.equal(read[1:], states[1, [0, 3]]), "with nothing visible the pointer reads nothing"
    # the batched product against one masked object's attention written out: event 0, position 1
    q, k, v = pointer.query(states[0, 1]), pointer.key(states[0]), pointer.value(states[0])
    weights = torch.softmax(torch.cat([(k @ q / 8**0.5).masked_fill(~visible[0], float("-inf")), torch.zeros(1)]), 0)
    assert torch.allclose(logits[0, :4][visible[0]], (k @ q / 8**0.5)[visible[0]], atol=1e-6)
    assert torch.allclose(read[0], states[0, 1] + weights[:4] @ v, atol=1e-6)


def test_step3_overlap_objective_on_real_tokens(tokens, tmp_path, capsys):
    vocab, b = batch_of(tokens)
    decode = KinematicsDecoder(vocab, tokens / "tok")
    assert decode.transverse == {TYPE_IDS["met"]}
    ids, _, chosen = mask_objects(b["input_ids"], b["token_type_ids"], b["attention_mask"], code_ranges(vocab),
                                  np.random.default_rng(1), 0.3)
    types = b["token_type_ids"]
    kin, truth = step3_pretrain.decode_kinematics(decode, ids, b, chosen)
    assert torch.allclose(kin, torch.from_numpy(decode(ids, types)), atol=1e-5), "one call decodes as two would"
    own = torch.from_numpy(decode(b["input_ids"], types))
    assert torch.allclose(truth[torch.from_numpy(chosen)], own[torch.from_numpy(chosen)]) and not truth[~torch.from_numpy(chosen)].any()
    visible, target = step3_pretrain.overlap_inputs(types, chosen, kin, truth, decode.transverse, 0.4)
    assert not visible[torch.from_numpy(chosen | (types == TYPE_IDS["met"]))].any()
    assert torch.equal(visible, (kin[..., 0] > 0) & ~torch.from_numpy(chosen | (types == TYPE_IDS["met"])))
    assert target.shape == (chosen.sum(), ids.shape[1] + 1) and torch.allclose(target.sum(1), torch.ones(len(target)))
    met_rows = torch.from_numpy(types[chosen] == TYPE_IDS["met"])
    assert met_rows.any() and (target[met_rows, -1] == 1).all(), "MET has no eta: it points at nothing"
    jets = torch.from_numpy(types[chosen] == TYPE_IDS["jets"])
    assert 0 < (target[jets, -1] < 1).float().mean() < 1, "some masked jets overlap a visible object, some do not"
    # each masked object's target comes from its own, unmasked kinematics
    truth = own[torch.from_numpy(chosen)]
    rows = torch.nonzero(torch.from_numpy(chosen))[:, 0]
    d = torch.hypot(truth[:, None, 1] - kin[rows][..., 1],
                    torch.remainder(truth[:, None, 2] - kin[rows][..., 2] + np.pi, 2 * np.pi) - np.pi)
    assert torch.equal(target[:, :-1] > 0, (d < 0.4) & visible[rows] & ~met_rows[:, None])

    out = tmp_path / "pre"
    code = call_main(step3_pretrain.main, "--parquet", tokens / "tokens", "--out-dir", out, "--objective", "overlap,latent",
                     "--epochs", "1", "--max-steps", "3", "--batch-size", "32", *MODEL)
    assert code == 0, capsys.readouterr().err[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["objectives"] == ["latent", "overlap"], "the first objective is the one whose context gain counts"
    ov = m["val"]["overlap"]
    assert ov["n_masked"] == m["val"]["latent"]["n_masked"] and 0 <= ov["acc"] <= 1 and ov["null_baseline_acc"] == 1 - ov["overlapped"]
    assert ov["per_type"]["met"]["overlapped"] == 0 and 0 < ov["per_type"]["jets"]["overlapped"] < 1
    assert m["history"][-1]["val_overlap_acc"] == ov["acc"] and set(m["context_gain"]) >= {"jets", "met"}
    assert np.isclose(m["val"]["loss"], m["val"]["latent"]["mse"] + step3_pretrain.OVERLAP_WEIGHT * ov["loss"])


def test_zero_bias_is_the_plain_attention_and_a_missing_input_is_refused():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, levels=2, n_types=12, max_length=8, d_model=16, n_heads=2, d_ff=32, dropout=0.0,
                      pair_bias=8)
    model = EventTransformer(cfg).eval()
    plain = EventTransformer(ModelConfig(**{**cfg.__dict__, "pair_bias": 0})).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pair_bias")})
    ids = torch.tensor([[[1, 0], [10, 15], [11, 15], [12, 16], [0, 0]]] * 2)
    types, attn = torch.tensor([[1, 6, 6, 6, 0]] * 2), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    kin = torch.tensor([[[0, 0, 0, 0], [50, 0.5, 0.1, 10], [30, -1, 2, 5], [20, 1, -2, 3], [0, 0, 0, 0]]] * 2)
    with torch.no_grad():
        assert not torch.allclose(model(ids, types, attn, kinematics=kin)[attn > 0], plain(ids, types, attn)[attn > 0])
        torch.nn.init.zeros_(model.pair_bias.mlp[-1].weight)
        torch.nn.init.zeros_(model.pair_bias.mlp[-1].bias)
        assert torch.allclose(model(ids, types, attn, kinematics=kin)[attn > 0], plain(ids, types, attn)[attn > 0], atol=1e-6)
    with pytest.raises(ValueError, match="decoded kinematics"):
        model(ids, types, attn)


def test_eval_mode_reads_the_bias_as_training_does():
    """torch's eval-mode fast path misreads a per-head mask: scoring must see the bias training saw."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, levels=2, n_types=5, max_length=12, dropout=0.0, pair_bias=16)
    model = EventTransformer(cfg)
    torch.nn.init.normal_(model.pair_bias.mlp[-1].weight)
    ids, types = torch.randint(4, 50, (3, 12, 2)), torch.randint(1, 5, (3, 12))
    attn = torch.ones(3, 12, dtype=torch.long)
    attn[0, 8:], attn[1, 5:] = 0, 0  # a different padding per event
    kin = torch.rand(3, 12, 4) * torch.tensor([50.0, 2.0, 3.0, 1.0]) + torch.tensor([1.0, 0.0, 0.0, 0.0])
    trained = model.train()(ids, types, attn, kinematics=kin)
    with torch.no_grad():
        scored = model.eval()(ids, types, attn, kinematics=kin)
    assert torch.allclose(trained[attn > 0], scored[attn > 0], atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # switched off for the call only


def test_pretrain_with_pair_bias_then_finetune(tokens, backbone, tmp_path, capsys):
    model, side = load_backbone(backbone)
    assert side["config"]["pair_bias"] == 8 and model.pair_bias is not None
    # object tokens with the code geometry: by default only the coarsest level's ids are embedded
    assert side["config"]["id_levels"] == T.ID_LEVELS == 1 and side["config"]["code_dim"] > 0
    out = tmp_path / "ft"
    code = call_main(step4_finetune.main, "--parquet", tokens / "tokens", "--signal", "ttbar", "--background", "dy",
                     "--init", backbone, "--arms", "scratch,finetune,frozen,continuous,counts_gbdt",
                     "--out-dir", out, "--steps", "4", "--epochs", "0", "--eval-every", "2", "--batch-size", "32", "--bootstrap", "5",
                     "--workers", "1", *MODEL)
    assert code == 0, capsys.readouterr().err[-2000:]
    arms = json.loads((out / "metrics.json").read_text())["arms"]
    assert all("auc" in arms[a] for a in ("scratch", "finetune", "frozen", "continuous", "counts_gbdt")), arms
    for arm in ("scratch", "finetune", "continuous"):
        assert json.loads((out / f"{arm}.json").read_text())["config"]["pair_bias"] == 8, arm


def test_bad_inputs_one_line_exit_2(tokens, backbone, tmp_path, capsys):
    def run(main, *argv):
        capsys.readouterr()
        code = call_main(main, *argv)
        return code, capsys.readouterr().err

    synthetic = make_sample(tmp_path / "syn", n=80, processes=("dy",))  # records a tokenizer folder that does not exist
    code, err = run(step3_pretrain.main, "--parquet", synthetic["parquet"]["dy"], "--out-dir", tmp_path / "o1",
                    "--pair-bias", "8", "--no-code-geometry", "--objective", "tokens", *MODEL)
    assert code == 2 and "--pair-bias" in err and "tokenizer not found" in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not (tmp_path / "o1").exists()
    (tmp_path / "empty").mkdir()
    code, err = run(step3_pretrain.main, "--parquet", tokens / "tokens", "--out-dir", tmp_path / "o2", "--pair-bias", "8",
                    "--tokenizers", tmp_path / "empty", "--no-code-geometry", "--objective", "tokens", *MODEL)
    assert code == 2 and "--pair-bias" in err and len(err.strip().splitlines()) == 1, err
    code, err = run(step3_pretrain.main, "--parquet", tokens / "tokens", "--out-dir", tmp_path / "o4", "--tokenizers",
                    tmp_path / "empty", "--no-code-geometry", "--pair-bias", "0", "--objective", "tokens,overlap", *MODEL)
    assert code == 2 and "--objective overlap" in err and len(err.strip().splitlines()) == 1, err
    code, err = run(step3_pretrain.main, "--parquet", tokens / "tokens", "--objective", "overlap,event", *MODEL)
    assert code == 2 and "overlap reads into another masked-object objective" in err, err
    code, err = run(step3_pretrain.main, "--parquet", tokens / "tokens", "--pair-bias", "-1", *MODEL)
    assert code == 2 and "--pair-bias must be" in err
    code, err = run(step4_finetune.main, "--parquet", tokens / "tokens", "--signal", "ttbar", "--background", "dy",
                    "--init", backbone, "--tokenizers", tmp_path / "empty", "--out-dir", tmp_path / "o3", *MODEL)
    assert code == 2 and "the pair bias" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o3").exists()
    vocab = token_parquet.read_vocab(tokens / "tokens" / "dy.parquet")
    no_kinematics = {o: [["btag", len(r)]] for o, r in vocab["ranges"].items()}
    with pytest.raises(ValueError, match="no 'kinematics' feature group"):
        KinematicsDecoder({**vocab, "granularity": "group", "groups": no_kinematics}, tokens / "tok")
