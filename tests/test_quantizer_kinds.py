"""step2 quantizer kinds (vq, fsq, rfsq) on a real sample: the ATLAS PHYSLITE test file through
step1, tokenizers of each kind fitted on it, checkpoints that round trip, codes and code vectors
that decode to the model's output, apply and the vocabulary with FSQ codebooks, the bad settings."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from finetune_fixtures import call_main  # noqa: E402

import step1_convert  # noqa: E402
import step2_fit  # noqa: E402
import step2_apply  # noqa: E402
import step2_scan  # noqa: E402
from common import token_parquet, tokenizer_scan  # noqa: E402
from common.runtime import set_threads  # noqa: E402
from common.schema import TOKENIZED_OBJECTS  # noqa: E402
from common.tokenizer import FSQ_LEVELS, fsq_levels_for, load_tokenizer  # noqa: E402
from common.tokenizer_training import choose_fsq_levels  # noqa: E402
from common.transformer import codebook_table  # noqa: E402
from plotting.report import summary_tokenizers  # noqa: E402

REAL_FILE = ROOT / "tests/data/physlite/PHYSLITE_example.root"  # real ATLAS MC, 100 events, ~880 jets
TINY = ["--steps", "60", "--warmup-steps", "10", "--batch-size", "64", "--hidden", "16", "--preprocess-events", "500",
        "--eval-objects", "2000", "--closure-events", "0", "--threads", "1", "--workers", "1", "--no-plots", "--seed", "2"]
KINDS = {"vq": ["--levels", "2", "--codebook-size", "16", "--nested-levels", "none"],
         "fsq": ["--codebook-size", "256"],  # the rule: 8x6x5 = 240 codes
         "rfsq": ["--levels", "2", "--fsq-levels", "4,4,3"]}  # explicit levels: 48 codes per level
SIZES = {"vq": (2, 16), "fsq": (1, 240), "rfsq": (2, 48)}  # (levels, codes per level)
FSQ_OBJECTS = "jets,muons"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """The real file through step1; a vq tokenizer of every type, and per FSQ kind a folder with its
    jets and muons tokenizers beside the vq ones of the other types (as a scan configuration has)."""
    set_threads(1)
    d = tmp_path_factory.mktemp("kinds")
    shutil.copy(REAL_FILE, d / "dy.root")
    assert call_main(step1_convert.main, d / "dy.root", "--process", "dy", "--out-dir", d / "h5") == 0
    h5 = d / "h5" / "dy.h5"
    dirs = {"vq": d / "vq"}
    assert call_main(step2_fit.main, "--h5", h5, "--out-dir", dirs["vq"], *KINDS["vq"], *TINY) == 0
    for kind in ("fsq", "rfsq"):
        dirs[kind] = d / kind
        shutil.copytree(dirs["vq"], dirs[kind])
        assert call_main(step2_fit.main, "--h5", h5, "--out-dir", dirs[kind], "--objects", FSQ_OBJECTS, "--quantizer", kind,
                         "--overwrite", *KINDS[kind], *TINY) == 0
    return {"h5": h5, "dirs": dirs}


def eval_sample(tok_dir: Path, obj: str) -> tuple[dict, np.ndarray]:
    """The held-out features and the codes the fit's in-memory tokenizer gave them (<obj>.eval.npz)."""
    with np.load(tok_dir / f"{obj}.eval.npz") as z:
        return {k[5:]: z[k] for k in z.files if k.startswith("orig/")}, z["codes"]


@pytest.mark.parametrize("kind", ["vq", "fsq", "rfsq"])
def test_fit_records_kind_codes_and_quality(sample, kind):
    levels, size = SIZES[kind]
    side = json.loads((sample["dirs"][kind] / "jets.json").read_text())
    s = side["settings"]
    assert (s["levels"], s["codebook_size"]) == (levels, size)
    if kind == "vq":  # a default-kind fit writes no quantizer keys: its files stay those of before the kinds
        assert "quantizer" not in s and "fsq_levels" not in s
    else:
        assert s["quantizer"] == kind and math.prod(s["fsq_levels"]) == size
        assert all(h["commit"] == 0.0 for h in side["history"] if "commit" in h)  # no commitment loss
    codes = side["quality"]["codes"]
    assert len(codes) == levels
    for c in codes:  # usage per level, counted over the implicit codebook for FSQ
        assert c["used"] + c["dead"] == size and 1 < c["perplexity"] <= c["used"]
    assert side["quality"]["features"]["pt"]["relative"]["resolution"] < 1.0  # trained, not noise
    tok = load_tokenizer(sample["dirs"][kind] / "jets.pt")
    assert (tok.quantizer_kind, tok.levels, tok.codebook_size) == (s.get("quantizer", "vq"), levels, size)
    shown = "vq" if kind == "vq" else f'{kind} ({"x".join(map(str, s["fsq_levels"]))})'
    assert f"<td>jets</td><td>{shown}</td><td>mlp</td>" in summary_tokenizers({"jets": side}, ["jets"])  # the report


@pytest.mark.parametrize("kind", ["fsq", "rfsq"])
def test_checkpoint_round_trip_gives_identical_codes(sample, kind, tmp_path):
    tok_dir = sample["dirs"][kind]
    feats, fit_codes = eval_sample(tok_dir, "jets")
    tok = load_tokenizer(tok_dir / "jets.pt")  # weights_only=True inside
    codes = tok.encode(feats)
    levels, size = SIZES[kind]
    assert codes.shape == (len(feats["pt"]), levels) and codes.min() >= 0 and codes.max() < size
    assert np.array_equal(codes, fit_codes), "the saved tokenizer encodes as the fitted one did"
    tok.save(tmp_path / "jets.pt", {"copy": True})
    again = load_tokenizer(tmp_path / "jets.pt")
    a, b = tok.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and any("project_in" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(again.encode(feats), codes)


@pytest.mark.parametrize("kind", ["vq", "fsq", "rfsq"])
def test_code_vectors_decode_to_the_model_output(sample, kind):
    """code_vectors summed over levels is the quantised latent: decode(codes) is the model's
    reconstruction, and step3's code table (common.transformer.codebook_table) holds those vectors."""
    tok = load_tokenizer(sample["dirs"][kind] / "jets.pt")
    feats, _ = eval_sample(sample["dirs"][kind], "jets")
    x = torch.from_numpy(tok.preprocess(feats))
    with torch.no_grad():
        zq, codes, _ = tok.model.quantizer.quantize(tok.model.encoder(x))
        table = tok.model.quantizer.code_vectors()
        out = tok.model(x)[0]
    assert table.shape == (SIZES[kind][0], SIZES[kind][1], tok.settings["dim"])
    summed = sum(table[l][codes[:, l]] for l in range(len(table)))
    assert torch.allclose(summed, zq, atol=1e-5)
    assert torch.allclose(tok.model.decoder(summed), out, atol=1e-4)
    reco, direct = tok.decode(codes.numpy()), tok.reconstruct(feats)[1]
    for name in ("pt", "eta", "phi"):
        assert np.allclose(reco[name], direct[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fsq", "rfsq"])
def test_apply_vocabulary_and_code_table_with_fsq(sample, kind, tmp_path):
    tok_dir = sample["dirs"][kind]
    assert call_main(step2_apply.main, "--h5", sample["h5"], "--tokenizers", tok_dir, "--out-dir", tmp_path,
                     "--threads", "1", "--device", "cpu") == 0
    path = tmp_path / "dy.parquet"
    vocab = token_parquet.read_vocab(path)
    levels, size = SIZES[kind]
    assert [count for _, count in vocab["ranges"]["jets"]] == [size] * levels
    assert vocab["tokenizers"]["jets"]["codebook_size"] == size
    ranges = [r for obj in TOKENIZED_OBJECTS for r in vocab["ranges"][obj]]
    assert vocab["vocab_size"] >= max(start + count for start, count in ranges)
    # the jets' ids lie in their ranges and the code table gives back their quantised latents
    ids = np.concatenate([np.asarray(row) for row in pq.read_table(path).column("input_ids").to_pylist()])
    first = vocab["ranges"]["jets"][0][0]
    jets = ids[(ids[:, 0] >= first) & (ids[:, 0] < first + size)][:, :levels]  # rows are as wide as the most levels
    assert len(jets) > 100
    for l, (start, count) in enumerate(vocab["ranges"]["jets"]):
        assert ((jets[:, l] >= start) & (jets[:, l] < start + count)).all()
    table = codebook_table(vocab, tok_dir)
    tok = load_tokenizer(tok_dir / "jets.pt")
    local = jets - np.asarray([start for start, _ in vocab["ranges"]["jets"]])
    with torch.no_grad():
        expected = sum(tok.model.quantizer.code_vectors()[l][torch.from_numpy(local[:, l]).long()] for l in range(levels))
    assert np.allclose(table[jets].sum(1), expected.numpy(), atol=1e-5)


def test_pretrain_latent_objective_on_rfsq_tokens(sample, tmp_path):
    """step3 reads an FSQ tokenizer's code vectors (code geometry, latent targets) and trains."""
    import step3_pretrain

    assert call_main(step2_apply.main, "--h5", sample["h5"], "--tokenizers", sample["dirs"]["rfsq"], "--out-dir",
                     tmp_path / "tokens", "--threads", "1", "--device", "cpu") == 0
    assert call_main(step3_pretrain.main, "--parquet", tmp_path / "tokens" / "dy.parquet", "--out-dir", tmp_path / "pre",
                     "--objective", "latent", "--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--d-model", "16",
                     "--n-heads", "2", "--n-layers", "1", "--d-ff", "32", "--threads", "1", "--device", "cpu",
                     "--no-plots") == 0
    metrics = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert metrics["objectives"] == ["latent"]
    gains = metrics["context_gain"]  # per type: the latent targets came from the code table, baseline MSE > 0
    assert "jets" in gains and all(np.isfinite(g["mse"]) and g["baseline_mse"] > 0 for g in gains.values())


def test_fsq_levels_rule():
    assert fsq_levels_for(1024) == [8, 5, 5, 5] and fsq_levels_for(2**16) == [8, 8, 8, 5, 5, 5]
    assert all(abs(math.log2(math.prod(v)) - math.log2(k)) < 0.1 for k, v in FSQ_LEVELS.items())  # near the size
    assert choose_fsq_levels("auto", 49_000) == [8, 5, 5, 5]  # vq's auto 1024 codes
    assert choose_fsq_levels("auto", 100) == [8, 6, 5]  # below the rule's smallest size: its smallest
    with pytest.raises(ValueError, match="256, 1024, 4096, 16384, 65536"):
        fsq_levels_for(1000)


def test_lazy_import():
    """Neither common.tokenizer nor a vq tokenizer loads vector-quantize-pytorch (seconds of import)."""
    code = ("import sys, common.tokenizer as t; t.make_quantizer('vq', 2, 16, 4); "
            "assert 'vector_quantize_pytorch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


FIT_BAD = [
    (["--quantizer", "fsq", "--levels", "4"], "one level"),
    (["--quantizer", "rfsq", "--codebook-size", "1000"], "256, 1024"),
    (["--quantizer", "rfsq", "--fsq-levels", "8,1,5"], "at least 2 levels"),
    (["--quantizer", "fsq", "--fsq-levels", "8,x"], "expected integers"),
    (["--quantizer", "vq", "--fsq-levels", "8,5,5"], "--quantizer fsq or rfsq"),
    (["--quantizer", "fsq", "--cosine"], "--cosine"),
    (["--quantizer", "pq"], "invalid choice"),
]


@pytest.mark.parametrize("argv,says", FIT_BAD)
def test_fit_bad_quantizer_settings(argv, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        step2_fit.main(["--h5", str(tmp_path / "none.h5"), "--out-dir", str(tmp_path / "tok"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "tok").exists()


SCAN_BAD = [
    (["quantizer=fsq", "levels=1,4"], "one level"),
    (["quantizer=vq,rfsq", "codebook_size=1024,1000"], "codebook size 1000; use one of 256, 1024"),
    (["quantizer=pq"], "one of vq, fsq, rfsq"),
    (["quantizer=fsq", "cosine=true"], "--cosine"),
    (["quantizer=vq", "fsq_levels=3x2"], "--quantizer fsq or rfsq"),
    (["quantizer=rfsq", "fsq_levels=3x1"], "at least 2"),
]


def test_scan_quantizer_axes_become_fit_flags():
    grid = tokenizer_scan.load_grid(None, ["quantizer=rfsq,fsq", "levels=1", "fsq_levels=3x3x2"])
    cfgs = tokenizer_scan.configurations(grid, ["jets"])
    assert [tokenizer_scan.fit_flags(c["settings"]) for c in cfgs] == [
        ["--levels", "1", "--quantizer", q, "--fsq-levels", "3,3,2"] for q in ("rfsq", "fsq")]  # the grid's order
    assert len({c["id"] for c in cfgs}) == 2 and all("fsq3x3x2" in c["id"] for c in cfgs)


@pytest.mark.parametrize("axes,says", SCAN_BAD)
def test_scan_grid_refuses_impossible_points(axes, says, tmp_path, capsys):
    argv = ["--h5", str(tmp_path), "--reference-tokenizers", str(tmp_path), "--out-dir", str(tmp_path / "scan")]
    with pytest.raises(SystemExit) as exit_:
        step2_scan.main(argv + [x for a in axes for x in ("--axis", a)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
