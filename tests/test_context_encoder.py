"""step2 fit --encoder transformer: a context-aware encoder (each object's code also sees the leading
objects of its type in its event) fitted, saved, loaded and applied on synthetic step1 files, and
the mlp encoder left untouched by the context."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from finetune_fixtures import call_main, make_h5

import step2_apply
import step2_fit
from common import token_parquet
from common import tokenizer as T
from common import tokenizer_scan as S
from common.object_stream import event_minibatches
from common.schema import OBJECTS, SEQUENCE_OBJECTS, TYPE_IDS

torch.set_num_threads(1)
FIT = ["--steps", "40", "--warmup-steps", "10", "--batch-size", "64", "--codebook-size", "16", "--levels", "2",
       "--eval-objects", "3000", "--closure-events", "0", "--threads", "1", "--workers", "1", "--no-plots"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Every type fitted with the transformer encoder, and jets once more with the mlp encoder."""
    root = tmp_path_factory.mktemp("ctx")
    for proc, seed in (("ttbar", 1), ("hzz4l", 2)):  # ttbar: 3+ jets an event; hzz4l: four leptons
        make_h5(root / "h5" / f"{proc}.h5", proc, 1000, seed=seed)
    assert call_main(step2_fit.main, "--h5", root / "h5", "--out-dir", root / "tok", "--encoder", "transformer", *FIT) == 0
    assert call_main(step2_fit.main, "--h5", root / "h5", "--out-dir", root / "mlp", "--objects", "jets", *FIT) == 0
    return root


def eval_sample(tok_dir, obj="jets"):
    """The fit's held-out sample: (tokenizer, features, each object's event, the fit's codes)."""
    tok = T.load_tokenizer(tok_dir / f"{obj}.pt")
    with np.load(tok_dir / f"{obj}.eval.npz") as z:
        feats = {k: z[f"orig/{k}"] for k in tok.features}
        events = z["events"] if "events" in z.files else None
        codes = z["codes"]
    return tok, feats, events, codes


def place_in_event(events):
    first = np.r_[True, events[1:] != events[:-1]]
    return np.arange(len(events)) - np.flatnonzero(first)[np.cumsum(first) - 1]


def test_settings_record_the_encoder_and_a_reload_gives_the_fit_codes(fitted, monkeypatch):
    tok, feats, events, codes = eval_sample(fitted / "tok")
    assert tok.settings["encoder"] == "transformer" and tok.context
    assert json.loads((fitted / "tok" / "jets.json").read_text())["settings"]["encoder"] == "transformer"
    state = torch.load(fitted / "tok" / "jets.pt", weights_only=True)
    assert any(k.startswith("model.encoder.attention.") for k in state)
    assert events is not None and len(events) == len(codes) > 300
    assert np.array_equal(tok.encode(feats, events), codes)  # saved in the fit, reloaded here: the same codes
    monkeypatch.setattr(T, "ENCODE_BATCH", 13)  # batches cut between events only: the codes do not move
    monkeypatch.setattr(T, "ENCODER_BATCH", 5)
    assert np.array_equal(tok.encode(feats, events), codes)
    with pytest.raises(ValueError, match="event"):
        tok.encode(feats)
    mlp = T.load_tokenizer(fitted / "mlp" / "jets.pt")  # no 'encoder' key: an mlp checkpoint
    assert "encoder" not in mlp.settings and not mlp.context


@pytest.mark.parametrize("kind", ["tok", "mlp"])
def test_codes_see_the_other_objects_of_the_event_only_with_context(fitted, kind):
    tok, feats, events, _ = eval_sample(fitted / kind)
    events = events if events is not None else np.load(fitted / "tok" / "jets.eval.npz")["events"]
    pos = place_in_event(events)
    changed = {k: v.copy() for k, v in feats.items()}
    changed["pt"][pos == 1] *= 3  # the second jet of every event with two or more
    before, after = tok.encode(feats, events), tok.encode(changed, events)
    touched = np.isin(events, events[pos == 1])
    leading = (before != after).any(1)[(pos == 0) & touched]
    assert touched.sum() > 200
    assert not (before != after)[~touched].any()  # other events never move
    if kind == "tok":
        assert leading.mean() > 0.05, leading.mean()  # the leading jet's code carries its event's context
    else:
        assert not leading.any()


def test_apply_writes_valid_tokens_whatever_the_caps(fitted, tmp_path):
    h5 = fitted / "h5" / "ttbar.h5"
    for out, cap in (("all", "jets=20"), ("one", "jets=1")):
        assert call_main(step2_apply.main, "--h5", h5, "--tokenizers", fitted / "tok", "--out-dir", tmp_path / out,
                         "--cap", cap, "--threads", "1", "--device", "cpu") == 0
    tables = {}
    for out in ("all", "one"):
        path = tmp_path / out / "ttbar.parquet"
        token_parquet.check_columns(path)
        vocab = token_parquet.read_vocab(path)
        b = token_parquet.batch_to_numpy(pq.read_table(path), vocab["levels"])
        pos = np.arange(b["input_ids"].shape[1])[None, :] < b["length"][:, None]
        legal = token_parquet.legal_id_mask(vocab)
        for level in range(vocab["levels"]):
            assert legal[b["token_type_ids"][pos], level, b["input_ids"][..., level][pos]].all()
        assert (((b["token_type_ids"] == TYPE_IDS["SEP"]) & pos).sum(1) == len(SEQUENCE_OBJECTS)).all()
        tables[out] = b
    # the leading jet's tokens do not depend on the cap: its context is the event's stored jets
    lead = {out: (b["token_type_ids"] == TYPE_IDS["jets"]).argmax(1) for out, b in tables.items()}
    has = (tables["one"]["token_type_ids"] == TYPE_IDS["jets"]).any(1)
    assert has.sum() > 300
    rows = np.nonzero(has)[0]
    assert np.array_equal(tables["all"]["input_ids"][rows, lead["all"][rows]],
                          tables["one"]["input_ids"][rows, lead["one"][rows]])


@pytest.mark.parametrize("cache_bytes", [None, 1000])  # in memory after the first pass, or streamed every pass
def test_minibatches_of_whole_events(cache_bytes):
    """Chunks of events with 0-5 objects, pt = a unique object id: every batch holds whole events
    (cut between events near the batch size), the passes cover the objects, in a new order each."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 6, 1500)
    event_of = np.repeat(np.arange(len(counts)), counts)  # each object's event
    specs = T.build_specs([OBJECTS["jets"].feature("pt")])
    T.fit_preprocessing(specs, {"pt": np.arange(1, len(event_of) + 1, dtype=float)})
    to_id = dict(zip(T.preprocess(specs, {"pt": np.arange(1, len(event_of) + 1, dtype=float)}, 1)[:, 0].tolist(),
                     range(len(event_of))))

    def stream():
        for lo in range(0, len(counts), 400):  # chunks of 400 events, numbered over the stream
            rows = (event_of >= lo) & (event_of < lo + 400)
            yield {"pt": np.flatnonzero(rows) + 1.0, T.EVENT_KEY: event_of[rows]}

    gen = event_minibatches(stream, specs, 1, 64, np.random.default_rng(1), cache_bytes=cache_bytes)
    passes = []
    for _ in range(3):
        seen = []
        while sum(len(b[0]) for b in seen) < len(event_of) - 2 * 64:  # a pass, less what the carry may hold
            seen.append(next(gen))
        passes.append(seen)
        for x, ev in seen:
            ids = np.array([to_id[v] for v in x[:, 0].tolist()])
            assert abs(len(x) - 64) <= counts.max() and len(ids) == len(ev)  # cut between events
            events = event_of[ids]
            assert np.array_equal(np.r_[True, events[1:] != events[:-1]], np.r_[True, ev.numpy()[1:] != ev.numpy()[:-1]])
            assert np.array_equal(np.bincount(events, minlength=len(counts))[np.unique(events)], counts[np.unique(events)])
    order = [np.concatenate([b[0][:, 0].numpy() for b in seen]) for seen in passes]
    assert len(np.unique(np.concatenate(order))) >= 0.97 * len(event_of)  # every pass leaves out a rest at most
    assert not np.array_equal(order[1][:200], order[2][:200])  # a new order of the events each pass


def test_bad_usage_is_one_line_and_exit_2(fitted, tmp_path, capsys):
    code = call_main(step2_fit.main, "--h5", fitted / "h5", "--out-dir", tmp_path, "--encoder", "transformer",
                     "--mode", "combined", *FIT)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "--encoder transformer" in err[0]
    assert call_main(step2_fit.main, "--h5", fitted / "h5", "--out-dir", tmp_path, "--encoder", "cnn") == 2
    assert "--encoder" in capsys.readouterr().err and not list(tmp_path.iterdir())
    grid = S.check_grid({"encoder": ["mlp", "transformer"]})
    configs = S.configurations(grid, ["jets"])
    assert [S.fit_flags(c["settings"]) for c in configs] == [["--encoder", "mlp"], ["--encoder", "transformer"]]
    with pytest.raises(ValueError, match="axis encoder"):
        S.check_grid({"encoder": ["cnn"]})
