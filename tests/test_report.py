"""plotting/report.py on a small real run: a Pythia8 signal sample (step0) and a real ATLAS PHYSLITE
file as the background, converted by step1, tokenized by step2, pretrained by step3 and classified
by step4, every step through its own main(argv). The page must show the numbers those steps wrote
(so a change of a step's output keys fails here), say which parts are missing, survive broken
parts, and render in a real browser (headless Chromium, skipped when absent)."""
from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import uproot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from finetune_fixtures import call_main  # noqa: E402

from common import h5io  # noqa: E402
from common.runtime import git_hash, set_threads  # noqa: E402
from common.schema import TOKENIZED_OBJECTS  # noqa: E402

SIGNAL_EVENTS = 60
BACKGROUND_FILE = ROOT / "tests/data/physlite/PHYSLITE_example.root"  # real ATLAS MC: Z+jets (700322), 100 events
FIT = ["--steps", "40", "--warmup-steps", "5", "--batch-size", "64", "--levels", "2", "--codebook-size", "16",
       "--hidden", "16", "--threads", "1", "--workers", "1", "--no-plots"]  # one process: spawning workers costs more than these fits
PRETRAIN = ["--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
            "--n-layers", "1", "--d-ff", "32", "--threads", "1", "--device", "cpu", "--no-plots"]  # the report draws them
FINETUNE = ["--arms", "scratch,finetune,counts_gbdt,standard_gbdt", "--label-fractions", "0.5,1", "--steps", "3", "--epochs", "0",
            "--eval-every", "3", "--batch-size", "16", "--gbdt-trees", "10", "--bootstrap", "20", "--threads", "1",
            "--device", "cpu"]


def build_run(base: Path) -> tuple[Path, Path]:
    """(run folder, sample folder) of the whole chain on SIGNAL_EVENTS hzz4l events and the real file."""
    import step1_convert
    import step2_tokenize
    import step3_pretrain
    import step4_finetune

    raw, run = base / "raw", base / "run"
    raw.mkdir(parents=True)
    res = subprocess.run([sys.executable, str(ROOT / "step0_generate.py"), "--process", "hzz4l", "--events",
                          str(SIGNAL_EVENTS), "--seed", "1", "--block", str(SIGNAL_EVENTS), "--out", str(raw / "hzz4l.root")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    shutil.copy(BACKGROUND_FILE, raw / "dy.root")
    set_threads(1)  # the steps run in this process: one torch and one numba thread, as their --threads 1
    h5 = [run / "h5" / "hzz4l.h5", run / "h5" / "dy.h5"]
    tokens = [run / "tokens" / "hzz4l.parquet", run / "tokens" / "dy.parquet"]
    steps = [
        (step1_convert.main, [raw / "hzz4l.root", "--out-dir", run / "h5"]),
        (step1_convert.main, [raw / "dy.root", "--process", "dy", "--out-dir", run / "h5"]),
        (step2_tokenize.main, ["fit", "--h5", *h5, "--out-dir", run / "tok", *FIT]),
        (step2_tokenize.main, ["apply", "--h5", *h5, "--tokenizers", run / "tok", "--out-dir", run / "tokens",
                               "--threads", "1", "--device", "cpu"]),
        (step3_pretrain.main, ["--parquet", *tokens, "--out-dir", run / "pretrain", *PRETRAIN]),
        (step4_finetune.main, ["--parquet", *tokens, "--signal", "hzz4l", "--background", "dy", "--init",
                               run / "pretrain" / "backbone.pt", "--out-dir", run / "finetune", *FINETUNE]),
    ]
    for main, argv in steps:
        assert call_main(main, *argv) == 0, f"{main.__module__} {argv[:2]} failed"
    return run, raw


def report(run: Path, out: Path, sample_dir: Path | None = None) -> int:
    """report.py's main in-process; without a sample folder, never the repository's own data/raw."""
    from plotting import report as r

    return call_main(r.main, "--run-dir", run, "--out", out, "--sample-dir", sample_dir or run / "no_sample")


def section(page: str, key: str) -> str:
    m = re.search(rf'<section id="{key}">(.*?)</section>', page, re.S)
    assert m, f"section {key} missing"
    return m.group(1)


def shown(v) -> str:
    """A number as the report prints it."""
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3g}" if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3) else f"{v:.4g}"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> dict:
    run, raw = build_run(tmp_path_factory.mktemp("report"))
    out = run / "report.html"
    assert report(run, out, raw) == 0
    return {"run": run, "raw": raw, "out": out, "page": out.read_text()}


def test_sample_and_conversion_from_step0_and_step1(real_run):
    run, page = real_run["run"], real_run["page"]
    sample, conv = section(page, "sample"), section(page, "conversion")
    for name in ("hzz4l", "dy"):
        meta = h5io.read_metadata(run / "h5" / f"{name}.h5")
        assert f"<td>{meta['dsid']}</td>" in sample and f"<td>{meta['n_events']}</td>" in sample
        with h5py.File(run / "h5" / f"{name}.h5") as f:  # the multiplicity table counts the n datasets
            for obj in ("muons", "jets"):
                n = f[f"common/{obj}/n"][:]
                assert f"{np.minimum(n, 12).mean():.2f} ({(n > 0).mean():.0%})" in sample, (name, obj)
        assert f"<td>{len(meta['missing_features'])}</td>" in conv
        assert f"{meta['truncated_objects']['tracks']:,}" in conv
    assert html.escape(meta["met_definition"]) in conv
    assert "<td>hzz4l</td><td>signal</td>" in sample and "<td>dy</td><td>background</td>" in sample
    with uproot.open(real_run["raw"] / "hzz4l.root") as f:  # step0's generator metadata tree, listed with the file
        gen = f["GeneratorMetaData"].arrays(library="np")
    assert str(gen["description"][0]) in html.unescape(sample) and f"{shown(float(gen['cross_section_pb'][0]))} ±" in sample
    assert "dy.root" in sample and "not a step0 file" in sample  # the real PHYSLITE file has no such tree


def test_tokenizers_from_step2_sidecars(real_run):
    tok = section(real_run["page"], "tokenizers")
    for obj in TOKENIZED_OBJECTS:
        side = json.loads((real_run["run"] / "tok" / f"{obj}.json").read_text())
        q = side["quality"]
        assert f'id="tok-{obj}"' in tok
        for level in q["codes"]:
            assert f"<td>{shown(level['perplexity'])}</td>" in tok, (obj, level)
        for goal, ok in q["goals"]["pass"].items():
            if ok is not None:
                assert f"{goal}: {'pass' if ok else 'FAIL'}" in tok
    pt = json.loads((real_run["run"] / "tok" / "jets.json").read_text())["quality"]["features"]["pt"]
    assert f"<td>{shown(pt['relative']['resolution'])}</td>" in tok
    assert all(f"<td>{shown(b['resolution'])}</td>" in tok for b in pt["relative_binned"])
    closure = json.loads((real_run["run"] / "tok" / "closure.json").read_text())  # step2 fit's decoded-physics closure
    assert 'id="tok-closure"' in tok and f"<td>{shown(closure['quantities']['met']['resolution'])}</td>" in tok


def test_pretraining_from_step3_metrics(real_run):
    pre = section(real_run["page"], "pretraining")
    m = json.loads((real_run["run"] / "pretrain" / "metrics.json").read_text())
    assert f"objective {' + '.join(m['objectives'])}" in pre and m["objectives"] == ["latent", "event", "overlap"]
    jets = m["val"]["overlap"]["per_type"]["jets"]  # the overlap pointer per type, against its null baseline
    assert "the overlap pointer per object type" in pre and (
        f"<td>jets</td><td>{shown(jets['n'])}</td><td>{shown(jets['overlapped'])}</td><td>{shown(jets['acc'])}</td>"
        f"<td>{shown(jets['null_baseline_acc'])}</td>") in pre
    for split in ("train", "val"):
        assert f"<td>{split}</td><td>{shown(m[split]['loss'])}</td>" in pre
    for obj, v in m["context_gain"].items():
        lo, hi = v["gain_ci95"]
        assert lo < v["gain"] < hi or np.isnan([lo, hi]).all(), (obj, v)  # no interval from one event
        assert (f"<td>{obj}</td><td>{shown(v['mse'])}</td><td>{shown(v['baseline_mse'])}</td><td>{shown(v['gain'])}</td>"
                f"<td>[{lo:.3f}, {hi:.3f}]</td>") in pre
    for process, per_type in m["context_gain_by_process"].items():  # rows of processes, a column per type
        jets = per_type["jets"]
        assert f"<td>{process}</td>" in pre and "<td>{:.3f} [{:.3f}, {:.3f}] ({})</td>".format(
            jets["gain"], *jets["gain_ci95"], jets["n"]) in pre
    # step3 ran with --no-plots: the report draws its plots from metrics.json
    assert "training_curves.png (drawn by the report)" in pre and "data:image/png;base64," in pre


def test_classifier_from_step4_metrics(real_run):
    clf = section(real_run["page"], "classifier")
    m = json.loads((real_run["run"] / "finetune" / "metrics.json").read_text())
    arms = sorted(m["arms"], key=lambda a: -m["arms"][a]["auc"])
    for arm in arms:
        a = m["arms"][arm]
        lo, hi = a["auc_ci95"]
        assert f"<td>{arm}</td><td>{a['auc']:.3f} [{lo:.3f}, {hi:.3f}]</td>" in clf
    positions = [clf.index(f"<td>{arm}</td>") for arm in arms]
    assert positions == sorted(positions)  # sorted by AUC
    for arm, points in m["data_efficiency"].items():
        for p in points:
            assert f"{p['auc']:.3f} ± {p['auc_std']:.3f} (1 seed)" in clf and f"<td>{p['n_labelled']:,}</td>" in clf
    for fraction, pairs in m["pretraining_verdict"].items():
        v = pairs["finetune_minus_scratch"]
        assert f"<td>{fraction}</td><td>finetune - scratch</td><td>{shown(v['delta_auc'])}</td>" in clf
    summary = section(real_run["page"], "summary")
    assert all(f"<td>{arm}</td>" in summary for arm in arms) and "Does pretraining pay off?" in summary
    assert "bkg rejection at eff_S=0.50" in clf and "finetune/plots/roc.png" in clf


def test_provenance_of_every_step(real_run):
    prov = section(real_run["page"], "provenance")
    for script in ("step0_generate.py", "step1_convert.py", "step2_fit.py", "step2_apply.py",
                   "step3_pretrain.py", "step4_finetune.py"):
        assert f"<td>{script}</td>" in prov, script
    assert git_hash() in prov


def test_self_contained_images(real_run):
    page = real_run["page"]
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) >= 4  # multiplicity, the pretraining plots, step4's plots
    for u in uris:
        assert base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing fetched from elsewhere
    assert "<link " not in page


def test_missing_inputs_say_so(tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    assert report(run, tmp_path / "r.html") == 0
    page = (tmp_path / "r.html").read_text()
    for key in ("sample", "conversion", "tokenizers", "pretraining", "classifier", "provenance"):
        assert 'class="missing"' in section(page, key)


def test_broken_parts_cost_only_their_sections(real_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(real_run["run"], run)
    (run / "finetune" / "metrics.json").write_text("{ not json")  # read by the classifier and the provenance
    side = json.loads((run / "tok" / "muons.json").read_text())
    del side["quality"]  # a sidecar of another shape
    (run / "tok" / "muons.json").write_text(json.dumps(side))
    (run / "h5" / "bad.h5").write_text("not an hdf5 file")
    raw = tmp_path / "raw"
    shutil.copytree(real_run["raw"], raw)
    (raw / "bad.root").write_text("not a ROOT file")
    assert report(run, tmp_path / "r.html", raw) == 0
    page = (tmp_path / "r.html").read_text()
    for key in ("classifier", "tokenizers", "provenance"):
        assert "could not be built" in section(page, key), key
    sample = section(page, "sample")
    assert "bad.h5" in sample and "<td>hzz4l</td>" in sample  # one unreadable file, the others shown
    assert re.search(r"<td>bad.root</td>.*not a ROOT file", sample) and "<td>hzz4l.root</td>" in sample
    for key in ("sample", "conversion", "pretraining"):
        assert "could not be built" not in section(page, key), key


def test_bad_run_dir_is_usage_error(tmp_path, capsys):
    capsys.readouterr()
    assert report(tmp_path / "absent", tmp_path / "r.html") == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "absent" in err
    assert not (tmp_path / "r.html").exists()


def chromium_screenshot(html_file: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    cmd = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,2000", f"file://{html_file}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed")
def test_renders_in_chromium(real_run, tmp_path):
    from PIL import Image

    png = tmp_path / "shot.png"
    res = chromium_screenshot(real_run["out"].resolve(), png, tmp_path / "profile")
    assert png.exists(), res.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    # a blank or error page has a handful of colours; text, tables and plots give many
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200
    # the embedded plots decoded: some rows well below the header are not plain white
    assert (img[600:] < 250).any(axis=2).mean() > 0.01


def test_multiclass_and_weighting_from_step4(tmp_path):
    """A multi-class step4 run (synthetic fixtures, the GBDT arms) under --weighting xsec: the page names the
    weighting of its numbers, gives every class's AUC and the confusion matrix, and embeds the confusion
    and per-class ROC plots."""
    import step4_finetune
    from finetune_fixtures import make_sample

    xs = {"hzz4l": 0.005, "zz4l": 1.5, "ttbar": 90.0}
    s = make_sample(tmp_path / "s", n=400, processes=tuple(xs), cross_sections=xs)
    run = tmp_path / "run"
    assert call_main(step4_finetune.main, "--parquet", *s["parquet"].values(), "--classes", "H=hzz4l;ZZ=zz4l;top=ttbar",
                     "--arms", "counts_gbdt,standard_gbdt", "--weighting", "xsec", "--h5-dir", tmp_path / "s" / "h5",
                     "--out-dir", run / "finetune_multiclass", "--gbdt-trees", "20", "--bootstrap", "20",
                     "--threads", "1", "--workers", "1") == 0
    assert report(run, run / "report.html") == 0
    page = (run / "report.html").read_text()
    clf, summary = section(page, "classifier"), section(page, "summary")
    m = json.loads((run / "finetune_multiclass" / "metrics.json").read_text())
    assert "<b>weighting:</b> xsec" in clf and "macro AUC (xsec)" in clf and "Multi-class" in summary
    for arm, a in m["arms"].items():
        lo, hi = a["auc_ci95"]
        assert f"<td>{arm}</td><td>{a['auc']:.3f} [{lo:.3f}, {hi:.3f}]</td>" in clf
        for name, c in a["per_class"].items():
            assert f"{c['auc']:.3f} [{c['auc_ci95'][0]:.3f}, {c['auc_ci95'][1]:.3f}]" in clf, (arm, name)
        first = a["confusion"]
        assert f"<td>H</td><td>{first['normalised'][0][0]:.3f} ({first['counts'][0][0]})</td>" in clf
    assert "finetune_multiclass/plots/confusion.png" in clf and "finetune_multiclass/plots/class_roc.png" in clf
    from plotting import report as r
    assert r.process_roles(run) == {"hzz4l": "class H", "zz4l": "class ZZ", "ttbar": "class top"}
    (run / "finetune").mkdir()  # beside a binary task: both roles, and a process neither reads is absent
    (run / "finetune" / "metrics.json").write_text(json.dumps({"task": {"signal": ["hzz4l"], "background": ["zz4l"]}}))
    assert r.process_roles(run) == {"hzz4l": "signal, class H", "zz4l": "background, class ZZ", "ttbar": "class top"}
