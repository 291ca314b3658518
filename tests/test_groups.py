"""Feature-group sub-tokens (step2 --granularity group) end to end: the schema's groups, group fit +
apply on synthetic step1 files, the sub-token model in step3 and step4, GroupAttentionLayer, and
the bad inputs (a group tokenizer missing, a granularity mismatch, --group-attention not dividing
--d-model)."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import step2_apply
import step2_fit
import step3_pretrain
import step4_finetune
from common import sequences, token_parquet
from common.pair_kinematics import KinematicsDecoder
from common.schema import OBJECTS, SEQUENCE_OBJECTS, TOKEN_GROUPS, TOKENIZED_OBJECTS, TYPE_IDS, token_groups
from common.tokenizer import load_grouped, load_tokenizer
from common.transformer import EventTransformer, GroupAttentionLayer, ModelConfig, codebook_table, vocab_checksum
from finetune_fixtures import call_main, make_sample
from test_tokenize import write_synthetic_h5

torch.set_num_threads(1)
FIT = ["--steps", "40", "--warmup-steps", "10", "--batch-size", "128", "--levels", "2", "--codebook-size", "16",
       "--preprocess-events", "400", "--eval-objects", "500", "--closure-events", "300", "--no-plots",
       "--threads", "1", "--workers", "1", "--seed", "2"]
MODEL = ["--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--threads", "1", "--no-plots"]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """Two synthetic step1 files, their group tokenizers and group token files, and one step3 run
    on them with every objective and attention pooling."""
    d = tmp_path_factory.mktemp("groups")
    h5 = [write_synthetic_h5(d / "h5" / "ttbar.h5", 700, seed=1),
          write_synthetic_h5(d / "h5" / "dy.h5", 700, seed=2, process="dy", dsid=700320)]
    assert call_main(step2_fit.main, "--h5", *h5, "--out-dir", d / "tok", "--granularity", "group", *FIT) == 0
    assert call_main(step2_apply.main, "--h5", *h5, "--tokenizers", d / "tok", "--out-dir", d / "tokens",
                     "--cap", "tracks=6", "--max-length", "48", "--threads", "1") == 0
    assert call_main(step3_pretrain.main, "--parquet", d / "tokens", "--out-dir", d / "pre", "--epochs", "1",
                     "--max-steps", "4", "--batch-size", "64", "--objective", "latent,event,features,tokens",
                     "--group-pooling", "attention", *MODEL) == 0
    return d, h5


def test_schema_groups_cover_every_tokenized_feature_once():
    for obj in TOKENIZED_OBJECTS:
        groups = token_groups(obj)
        assert set(groups) <= set(TOKEN_GROUPS) and "kinematics" in groups
        members = [f for feats in groups.values() for f in feats]
        assert sorted(f.name + f.group for f in members) == sorted(f.name + f.group for f in OBJECTS[obj].token_features)
        assert all(f.token_group == g for g, feats in groups.items() for f in feats)


def test_group_fit_writes_one_tokenizer_per_group_and_the_closure(grouped):
    d, _ = grouped
    tok = d / "tok"
    for obj in TOKENIZED_OBJECTS:
        want = list(token_groups(obj))  # the synthetic files hold every atlas feature
        assert [p.name for p in sorted(tok.glob(f"{obj}.*.pt"))] == sorted(f"{obj}.{g}.pt" for g in want)
        for g in want:
            side = json.loads((tok / f"{obj}.{g}.json").read_text())
            assert side["settings"]["group"] == g and side["settings"]["object_groups"] == want
            assert {OBJECTS[obj].feature(n).token_group for n in side["features"]} == {g}
            assert (tok / f"{obj}.{g}.eval.npz").exists()
        assert not (tok / f"{obj}.pt").exists()
    closure = json.loads((tok / "closure.json").read_text())  # decoded physics from the kinematics groups
    assert closure["tokenizers"]["jets"]["path"] == "jets.kinematics.pt" and closure["quantities"]["mjj"]["n"] > 0


def test_group_apply_slots_hold_each_groups_codes(grouped):
    d, h5 = grouped
    path = d / "tokens" / "ttbar.parquet"
    vocab = token_parquet.read_vocab(path)
    assert vocab["granularity"] == "group"
    layouts = {o: load_grouped(d / "tok", o).layout for o in TOKENIZED_OBJECTS}
    assert vocab["groups"] == layouts and vocab["levels"] == max(sum(n for _, n in lay) for lay in layouts.values())
    assert set(vocab["tokenizers"]) == {f"{o}.{g}" for o, lay in layouts.items() for g, _ in lay}
    spans = sorted(tuple(r) for o, rs in vocab["ranges"].items() for r in rs)  # one id range per (object, slot), disjoint
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][0] + spans[-1][1] == vocab["vocab_size"]
    assert all(len(vocab["ranges"][o]) == sum(n for _, n in lay) for o, lay in layouts.items())
    b = token_parquet.batch_to_numpy(pq.read_table(path), vocab["levels"])
    ids, types, lengths = b["input_ids"], b["token_type_ids"], b["length"]
    pos = np.arange(ids.shape[1])[None] < lengths[:, None]
    legal = token_parquet.legal_id_mask(vocab)
    for slot in range(vocab["levels"]):
        assert legal[types[pos], slot, ids[..., slot][pos]].all()
    with h5py.File(h5[0]) as f:  # one position per kept object, as in granularity object
        n = {o: f[f"common/{o}/n"][:] for o in SEQUENCE_OBJECTS}
        jets = {nm: f[f"{OBJECTS['jets'].feature(nm).group}/jets/{nm}"][:][f["common/jets/mask"][:]]
                for nm in load_grouped(d / "tok", "jets").features}
    kept = sequences.kept_counts(n, vocab["caps"], vocab["max_length"])
    for i, o in enumerate(SEQUENCE_OBJECTS):
        assert np.array_equal(((types == TYPE_IDS[o]) & pos).sum(1), kept[:, i])
    # a jet's slots: the kinematics codes, then substructure, then b-tagging, each from its own tokenizer
    codes = np.concatenate([load_tokenizer(d / "tok" / f"jets.{g}.pt").encode(jets) for g, _ in layouts["jets"]], 1)
    first = np.concatenate([[0], np.cumsum(n["jets"])[:-1]])
    ev = np.nonzero((kept[:, SEQUENCE_OBJECTS.index("jets")] == n["jets"]) & (n["jets"] > 0))[0][:5]
    offsets = np.array([r[0] for r in vocab["ranges"]["jets"]])
    for e in ev:
        got = ids[e][types[e] == TYPE_IDS["jets"]]
        assert np.array_equal(got[:, : codes.shape[1]], codes[first[e] : first[e] + n["jets"][e]] + offsets)


def test_object_vocabulary_checksum_ignores_the_granularity_keys(grouped):
    d, _ = grouped
    vocab = token_parquet.read_vocab(d / "tokens" / "ttbar.parquet")
    flat = {k: v for k, v in vocab.items() if k not in ("granularity", "groups")}
    assert vocab_checksum({**flat, "granularity": "object"}) == vocab_checksum(flat)  # object files keep their checksum
    assert vocab_checksum(vocab) != vocab_checksum({**vocab, "groups": {**vocab["groups"], "met": []}})


def test_pair_kinematics_decode_each_objects_kinematics_group(grouped):
    d, _ = grouped
    path = d / "tokens" / "ttbar.parquet"
    vocab = token_parquet.read_vocab(path)
    b = token_parquet.batch_to_numpy(pq.read_table(path).slice(0, 200), vocab["levels"])
    kin = KinematicsDecoder(vocab, d / "tok")(b["input_ids"], b["token_type_ids"])
    for obj, layout in vocab["groups"].items():
        names = [g for g, _ in layout]
        first, n = sum(k for _, k in layout[: names.index("kinematics")]), dict(layout)["kinematics"]
        start = np.array([r[0] for r in vocab["ranges"][obj][first : first + n]])
        sel = b["token_type_ids"] == TYPE_IDS[obj]
        ref = load_tokenizer(d / "tok" / f"{obj}.kinematics.pt").decode(b["input_ids"][sel][:, first : first + n] - start)
        assert np.allclose(kin[sel][:, 0], np.maximum(ref["pt"], 0), rtol=1e-5), obj
        assert np.allclose(kin[sel][:, 2], ref["phi"], atol=1e-5), obj


def test_latent_target_is_the_concatenation_of_the_groups_latents(grouped):
    d, _ = grouped
    vocab = token_parquet.read_vocab(d / "tokens" / "ttbar.parquet")
    table = codebook_table(vocab, d / "tok")
    b = token_parquet.batch_to_numpy(pq.read_table(d / "tokens" / "ttbar.parquet").slice(0, 50), vocab["levels"])
    e, p = np.argwhere(b["token_type_ids"] == TYPE_IDS["jets"])[0]
    ids, slot, parts = b["input_ids"][e, p], 0, []
    for g, n_levels in vocab["groups"]["jets"]:
        books = load_tokenizer(d / "tok" / f"jets.{g}.pt").model.quantizer.codebooks.numpy()
        parts.append(sum(books[l, ids[slot + l] - vocab["ranges"]["jets"][slot + l][0]] for l in range(n_levels)))
        slot += n_levels
    want = np.concatenate(parts)
    assert np.allclose(table[ids].sum(0)[: len(want)], want, atol=1e-6) and not table[ids].sum(0)[len(want):].any()


def test_pretrain_records_the_group_model(grouped):
    d, _ = grouped
    metrics = json.loads((d / "pre" / "metrics.json").read_text())
    assert metrics["model"] == {"granularity": "group", "group_pooling": "attention", "group_attention": 0, "constituent_dim": 0,
                                "pair_bias": 32, "type_rank": True}, \
        "the default model: a pair bias from the kinematics group, the rank embedding"
    config = json.loads((d / "pre" / "backbone.json").read_text())["config"]
    assert config["granularity"] == "group" and config["slot_groups"][str(TYPE_IDS["jets"])] == [0, 0, 1, 1, 2, 2]
    assert config["id_levels"] == 0, "group tokens: every level's ids, whatever the object default"
    assert all(np.isfinite(metrics["val"][o]["loss" if o == "tokens" else "mse"]) for o in ("latent", "event", "features", "tokens"))


def test_finetune_scratch_finetune_and_continuous_in_group_mode(grouped, tmp_path):
    d, _ = grouped
    code = call_main(step4_finetune.main, "--parquet", d / "tokens", "--signal", "ttbar", "--background", "dy",
                     "--init", d / "pre" / "backbone.pt", "--arms", "scratch,finetune,continuous", "--steps", "12", "--epochs", "0",
                     "--eval-every", "6", "--batch-size", "32", "--bootstrap", "10", "--workers", "1",
                     "--out-dir", tmp_path, *MODEL)
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["granularity"] == "group" and metrics["model"]["group_pooling"] == "attention"
    for arm in ("scratch", "finetune", "continuous"):  # continuous: the group tokenizers' preprocessing, side by side
        assert 0 <= metrics["arms"][arm]["auc"] <= 1
    assert metrics["continuous_normalisation"].startswith("group tokenizer preprocessing")


def test_sub_token_model_pools_one_vector_per_object_and_group_attention_changes_it():
    vocab = make_sample.__globals__["make_vocab"]()
    vocab.update(granularity="group", groups={o: [["kinematics", 1], ["id", 1]] for o in vocab["ranges"]})
    torch.manual_seed(0)
    cfg = ModelConfig.from_vocab(vocab, d_model=16, n_heads=2, d_ff=32, dropout=0.0)
    assert cfg.slot_groups[str(TYPE_IDS["jets"])] == [0, 1]
    model = EventTransformer(cfg).eval()
    ids = torch.tensor([[[1, 0], [vocab["ranges"]["jets"][0][0] + 3, vocab["ranges"]["jets"][1][0] + 5], [2, 0]]])
    types = torch.tensor([[TYPE_IDS["CLS"], TYPE_IDS["jets"], TYPE_IDS["SEP"]]])
    out = model(ids, types, torch.ones(1, 3, dtype=torch.int8))
    assert out.shape == (1, 3, 16) and torch.isfinite(out).all()
    changed = ids.clone()
    changed[0, 1, 1] += 1  # the id sub-token of the jet
    assert not torch.allclose(model(changed, types, torch.ones(1, 3, dtype=torch.int8))[0, 1], out[0, 1])
    layer = GroupAttentionLayer(16, 4).eval()
    x = torch.randn(2, 5, 16)
    y = layer(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    with pytest.raises(ValueError):
        GroupAttentionLayer(16, 3)


def test_apply_names_a_missing_group_tokenizer(grouped, tmp_path, capsys):
    d, h5 = grouped
    tok = tmp_path / "tok"
    shutil.copytree(d / "tok", tok)
    (tok / "jets.btag.pt").unlink()
    code = call_main(step2_apply.main, "--h5", h5[1], "--tokenizers", tok, "--out-dir", tmp_path / "out", "--threads", "1")
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
    assert code != 0 and len(lines) == 1 and str(tok) in lines[0] and "jets.btag.pt" in lines[0]
    assert not (tmp_path / "out" / "dy.parquet").exists()


def test_granularity_mismatch_and_bad_group_attention(grouped, tmp_path, capsys):
    d, _ = grouped
    flat = make_sample(tmp_path, n=150, processes=("hzz4l", "zz4l"))  # object-granularity token files
    init = d / "pre" / "backbone.pt"
    code = call_main(step4_finetune.main, "--parquet", *flat["parquet"].values(), "--signal", "hzz4l",
                     "--background", "zz4l", "--init", init, "--arms", "finetune", "--out-dir", tmp_path / "ft", *MODEL)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error")]
    assert code != 0 and len(lines) == 1
    assert str(init) in lines[0] and "group-granularity" in lines[0] and "object-granularity" in lines[0]
    for main, extra in ((step3_pretrain.main, ["--out-dir", tmp_path / "p"]),
                        (step4_finetune.main, ["--signal", "hzz4l", "--background", "zz4l", "--out-dir", tmp_path / "f"])):
        assert call_main(main, "--parquet", flat["parquet"]["hzz4l"], "--group-attention", "3", *extra, *MODEL) == 2
        assert "--group-attention 3 must divide --d-model 32" in capsys.readouterr().err
