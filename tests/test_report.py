"""plotting/report.py: one self-contained HTML page from a run folder, robust to missing parts,
and rendered by a real browser (headless Chromium, skipped when absent)."""
from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.h5io import H5EventWriter  # noqa: E402
from common.schema import OBJECTS, features_for  # noqa: E402

REPORT = ROOT / "plotting" / "report.py"
PROCESSES = {"hzz4l": (345060, 0.0133, 4), "dy": (700322, 2100.0, 2)}  # dsid, cross-section, leptons/event


def write_h5(path: Path, process: str, n: int, seed: int) -> None:
    """A small step1-shaped file: every dataset of common/schema.py, with a known multiplicity."""
    rng = np.random.default_rng(seed)
    dsid, xs, n_lep = PROCESSES[process]
    arrays = {}
    for obj, ot in OBJECTS.items():
        width = () if ot.per_event else (4,)
        if not ot.per_event:
            k = np.full(n, n_lep if obj in ("electrons", "muons") else 1, dtype=np.int32)
            k[: n // 4] = 0  # a quarter of the events have none
            arrays[f"common/{obj}/n"] = k
            arrays[f"common/{obj}/mask"] = np.arange(4)[None, :] < k[:, None]
        for f in features_for(obj, "atlas"):
            arrays[f"{f.group}/{obj}/{f.name}"] = rng.random((n,) + width).astype(f.dtype)
    with H5EventWriter(path) as w:
        w.append(arrays)
        w.close({"experiment": "atlas", "process": process, "dsid": dsid, "cross_section_pb": xs,
                 "sum_weights": float(n), "git_hash": "abc123def456", "input_file": f"{process}.root",
                 "missing_features": ["atlas/taus/NNDecayMode"] if process == "dy" else [],
                 "met_definition": "core soft terms + hard objects (approximation)",
                 "pt_cuts": {"jets": 20.0}, "max_objects": {"jets": 4}})


def png_bytes(seed: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.hist(np.random.default_rng(seed).normal(size=500), bins=20)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def make_run(run: Path) -> Path:
    """A run folder with the files each step writes (h5/, tok/, tokens/, pretrain/, finetune/), in the
    shapes the steps write them (keys taken from real step2/3/4 outputs)."""
    for i, p in enumerate(PROCESSES):
        write_h5(run / "h5" / f"{p}.h5", p, 400, i)
    prov = {"script": "step2_tokenize.py fit", "settings": {"codebook_size": "auto", "levels": 2, "seed": 1},
            "inputs": ["h5/hzz4l.h5"], "git_hash": "abc123def456", "python": "3.11"}
    (run / "tok" / "plots" / "jets").mkdir(parents=True)
    feature_q = {"pt": {"kind": "continuous", "n": 900, "bias": 0.4, "resolution": 7.8,
                        "relative": {"bias": 0.0156, "resolution": 0.2243, "n": 900},
                        "relative_binned": [{"lo": 20, "hi": 30, "n": 450, "bias": 0.05, "resolution": 0.1196}]},
                 "phi": {"kind": "angle", "n": 900, "bias": -0.03, "resolution": 0.0712},
                 "GN2_pb": {"kind": "score", "n": 900, "bias": 0.0, "resolution": 0.0408}}
    (run / "tok" / "jets.json").write_text(json.dumps({
        "object": "jets", "features": ["pt", "phi", "GN2_pb"], "features_used": ["pt", "phi", "GN2_pb"],
        "dropped_features": [], "settings": {"levels": 2, "codebook_size": 64, "dim": 8, "n_train_objects": 8809},
        "quality": {"n_objects": 900, "features": feature_q,
                    "codes": [{"level": 0, "used": 40, "dead": 24, "used_fraction": 0.625, "perplexity": 31.5},
                              {"level": 1, "used": 64, "dead": 0, "used_fraction": 1.0, "perplexity": 60.1}],
                    "goals": {"pt_relative_resolution": 0.2243, "pass": {"codes_used_ge_90pct": False,
                                                                         "btag_within_1pct": None}}},
        "provenance": prov}))
    (run / "tok" / "plots" / "jets" / "reco_vs_original.png").write_bytes(png_bytes(1))
    (run / "pretrain").mkdir(parents=True)
    per_type = {"jets": {"acc": 0.3011, "acc_per_level": [0.4, 0.2], "frequency_baseline_acc": 0.07, "loss": 4.3, "n": 436}}
    (run / "pretrain" / "metrics.json").write_text(json.dumps({
        "epochs": 6, "steps_per_epoch": 5, "n_events": {"train": 1422, "val": 278}, "world_size": 1,
        "val": {"acc": 0.4321, "frequency_baseline_acc": 0.0508, "loss": 2.1, "n_masked": 1832, "per_type": per_type,
                "per_level": {"0": {"acc": 0.5, "loss": 2.0, "n": 916}}},
        "train": {"acc": 0.45, "frequency_baseline_acc": 0.0, "loss": 2.0, "n_masked": 4276},
        "provenance": {**prov, "script": "step3_pretrain.py"}}))
    with open(run / "pretrain" / "history.csv", "w", newline="") as f:  # no step plots: the report plots this
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train_loss", "val_loss", "train_acc", "val_acc"])
        w.writerows([[e, 5 * e, 3 - 0.3 * e, 3.1 - 0.25 * e, 0.1 + 0.05 * e, 0.1 + 0.04 * e] for e in range(6)])
    (run / "finetune" / "plots").mkdir(parents=True)

    def arm(auc, lo, hi, rej):
        return {"auc": auc, "auc_ci95": [lo, hi], "rejection_at_30": 2 * rej, "rejection_at_50": rej,
                "n_test": {"signal": 148, "background": 152}, "seeds": {"n_seeds": 1, "auc": {"mean": auc, "std": 0.0}},
                "train_seconds": 3.3, "roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}}

    (run / "finetune" / "metrics.json").write_text(json.dumps({
        "arms": {"finetune": arm(0.912, 0.90, 0.924, 31.0), "scratch": arm(0.874, 0.86, 0.889, 18.0),
                 "standard_gbdt": arm(0.905, 0.89, 0.92, 27.5)},
        "data_efficiency": {"finetune": [{"fraction": 0.1, "n_labelled": 141, "auc": 0.85, "auc_ci95": [0.8, 0.9]},
                                         {"fraction": 1.0, "n_labelled": 1422, "auc": 0.912, "auc_ci95": [0.9, 0.924]}],
                            "scratch": [{"fraction": 0.1, "n_labelled": 141, "auc": 0.71, "auc_ci95": [0.65, 0.77]}]},
        "task": {"signal": ["hzz4l"], "background": ["dy"], "test_background": [],
                 "events": {"test": {"hzz4l": {"events": 148, "sum_weights": 1.0}}}},
        "provenance": {**prov, "script": "step4_finetune.py"}}))
    (run / "finetune" / "plots" / "roc.png").write_bytes(png_bytes(2))
    write_parquet(run / "tokens" / "hzz4l.parquet", prov)
    return run


def write_parquet(path: Path, prov: dict) -> None:
    from common.token_parquet import sequences_table, write_sequences

    ids = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)
    table = sequences_table(ids, np.array([[1, 10, 6], [1, 10, 0]]), np.array([3, 2]), np.array([0, 1]),
                            "hzz4l.h5", "hzz4l", 345060, np.ones(2))
    write_sequences(path, [table], {"levels": 2}, {**prov, "script": "step2_tokenize.py apply"})


def run_report(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    if "--sample-dir" not in extra:  # never the repository's own data/raw
        extra = (*extra, "--sample-dir", str(run / "no_sample"))
    return subprocess.run([sys.executable, str(REPORT), "--run-dir", str(run), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def section(page: str, key: str) -> str:
    m = re.search(rf'<section id="{key}">(.*?)</section>', page, re.S)
    assert m, f"section {key} missing"
    return m.group(1)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    run = make_run(tmp_path_factory.mktemp("run") / "myrun")
    out = run / "report.html"
    res = run_report(run, out, "--sample-dir", str(ROOT / "tests" / "data" / "physlite"))
    assert res.returncode == 0, res.stderr
    return out, out.read_text()


def test_sections_and_values(full_report):
    _, page = full_report
    sample = section(page, "sample")
    assert "hzz4l" in sample and "<td>345060</td>" in sample and "0.0133" in sample and "<td>2100</td>" in sample
    # hzz4l: 3/4 of events with 4 muons -> mean 3.00; dy: 3/4 with 2 -> 1.50; the table must count, not guess
    assert "3.00 (75%)" in sample and "1.50 (75%)" in sample
    assert "PHYSLITE_example.root" in sample and "not a step0 file" in sample  # real ROOT files, no generator tree
    conv = section(page, "conversion")
    assert "atlas/taus/NNDecayMode" in conv and "core soft terms" in conv
    tok = section(page, "tokenizers")
    assert "perplexity" in tok and "31.5" in tok and "0.625" in tok  # codebook usage per level
    assert "0.2243" in tok and "0.0712" in tok and "0.1196" in tok  # resolution table and pT bins
    assert "codes_used_ge_90pct: FAIL" in tok and "jets/reco_vs_original.png" in tok
    pre = section(page, "pretraining")
    assert "0.4321" in pre and "0.0508" in pre and "0.3011" in pre
    assert "data:image/png;base64," in pre  # history.csv plotted (the step made no plots)
    clf = section(page, "classifier")
    assert "0.912 [0.900, 0.924]" in clf and "standard_gbdt" in clf and "bkg rejection at eff_S=0.50" in clf
    assert clf.index("finetune") < clf.index("standard_gbdt") < clf.index("scratch")  # sorted by AUC
    assert "0.710 [0.650, 0.770]" in clf  # data efficiency table
    assert "data:image/png;base64," in clf
    prov = section(page, "provenance")
    assert "abc123def456" in prov and "step4_finetune.py" in prov and "step2_tokenize.py apply" in prov


def test_self_contained_images(full_report):
    _, page = full_report
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) >= 4  # multiplicity, tokenizer plot, history, ROC
    for u in uris:
        assert base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)
    assert "<link " not in page


def test_missing_inputs_say_so(tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    out = tmp_path / "r.html"
    res = run_report(run, out)
    assert res.returncode == 0, res.stderr
    page = out.read_text()
    for key in ("sample", "conversion", "tokenizers", "pretraining", "classifier", "provenance"):
        assert 'class="missing"' in section(page, key)


def test_broken_inputs_do_not_crash(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "finetune" / "metrics.json").write_text("{ not json")
    (run / "h5" / "bad.h5").write_text("not an hdf5 file")
    (run / "tok" / "muons.json").write_text(json.dumps({"object": "muons", "settings": None,
                                                        "quality": {"codes": "garbage", "features": [1, 2]}}))
    (run / "pretrain" / "metrics.json").write_text(json.dumps({"val": {"acc": "n/a", "per_type": [3]}}))
    res = run_report(run, tmp_path / "r.html")
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "r.html").read_text()
    assert "bad.h5" in section(page, "sample") and 'class="missing"' in section(page, "classifier")
    assert "muons" in section(page, "tokenizers")
    assert "could not be built" not in page  # each odd shape handled where it is read, not by the safety net


def test_bad_run_dir_is_usage_error(tmp_path):
    res = run_report(tmp_path / "absent", tmp_path / "r.html")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "absent" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "r.html").exists()


def chromium_screenshot(html_file: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,2000", f"file://{html_file}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed")
def test_renders_in_chromium(full_report, tmp_path):
    from PIL import Image

    html_file, _ = full_report
    png = tmp_path / "shot.png"
    res = chromium_screenshot(html_file.resolve(), png, tmp_path / "profile")
    assert png.exists(), res.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    # a blank or error page has a handful of colours; text, tables and plots give many
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200
    # the embedded plots decoded: some rows well below the header are not plain white
    assert (img[600:] < 250).any(axis=2).mean() > 0.01
