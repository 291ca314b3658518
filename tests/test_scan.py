"""step2_scan.py: grid checks, bad input, and a tiny scan end to end on synthetic step1 files
(real fits, real apply, a real scratch classifier; a few steps each)."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from finetune_fixtures import call_main, make_h5

import step2_fit
import step2_scan
from common import tokenizer_quality
from common import tokenizer_scan as S
from common.token_parquet import read_vocab

TINY_FIT = ["--steps", "40", "--warmup-steps", "10", "--batch-size", "64", "--codebook-size", "16", "--levels", "2",
            "--eval-objects", "2000", "--threads", "1", "--workers", "1", "--no-plots"]
TINY_SCAN = ["--objects", "muons", "--fit-steps", "40", "--finetune-steps", "4", "--finetune-eval-every", "2",
             "--no-plots"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """Synthetic task files (signal hzz4l, background zz4l) and a reference tokenizer set fitted on them."""
    root = tmp_path_factory.mktemp("scan")
    for proc in ("hzz4l", "zz4l"):
        make_h5(root / "h5" / f"{proc}.h5", proc, 400, seed=5)
    assert call_main(step2_fit.main, "--h5", root / "h5", "--out-dir", root / "ref", *TINY_FIT) == 0
    return root


def scan(sample, out, *extra):
    return call_main(step2_scan.main, "--h5", sample / "h5", "--reference-tokenizers", sample / "ref", "--out-dir", out,
                     "--signal", "hzz4l", "--background", "zz4l", *TINY_SCAN, *extra)


# --- the grid ---------------------------------------------------------------------------------------------


def test_grid_configurations_ids_and_flags():
    grid = S.check_grid({"codebook_size": [16, 64], "levels": [2, 3], "cosine": [True],
                         "transform": [["jets.pt=log_standard"]]})
    configs = S.configurations(grid, ["jets", "muons"])
    assert len(configs) == 8 and len({c["id"] for c in configs}) == 8
    again = S.configurations(S.check_grid({"levels": [2, 3], "codebook_size": [16, 64], "cosine": [True],
                                           "transform": [["jets.pt=log_standard"]]}), ["jets", "muons"])
    assert [c["id"] for c in again] == [c["id"] for c in configs]  # stable: axis order in the file does not matter
    c = next(c for c in configs if c["object"] == "muons" and c["settings"]["codebook_size"] == 64
             and c["settings"]["levels"] == 3)
    assert c["id"].startswith("muons-K64-L3-cos-")
    assert S.fit_flags(c["settings"]) == ["--codebook-size", "64", "--levels", "3", "--cosine",
                                         "--transform", "jets.pt=log_standard"]
    assert S.parse_axis_flag("decay=0.9,0.99") == ("decay", [0.9, 0.99])
    assert S.bits_per_object(4, 1024) == 40


def test_pareto_front():
    bits = np.array([8, 12, 12, 16, 20, np.nan])
    res = np.array([0.10, 0.05, 0.07, 0.05, 0.01, 0.001])
    assert S.pareto_front(bits, res).tolist() == [True, True, False, False, True, False]


@pytest.mark.parametrize("grid, cause", [
    ({"codebook_sise": [16]}, "unknown axis codebook_sise"),
    ({"levels": [0]}, "axis levels: 0 is not an integer 1..8"),
    ({"codebook_size": [1]}, "axis codebook_size: 1 is not an integer of at least 2"),
    ({"decay": [1.0]}, "axis decay: 1.0 is not a number in (0, 1)"),
    ({"transform": ["jets.pt=nonsense"]}, "axis transform"),
])
def test_bad_grid_is_one_error_line(sample, tmp_path, capsys, grid, cause):
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    assert scan(sample, tmp_path / "out", "--grid", tmp_path / "grid.json") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and cause in err[0], err
    assert not (tmp_path / "out" / "configs").exists()


def test_data_mc_without_data_is_one_error_line(sample, tmp_path, capsys):
    """Task files that are all simulation: --data-mc stops before any configuration is fitted."""
    for src in (sample / "h5").glob("*.h5"):
        shutil.copy(src, tmp_path / src.name)
        with h5py.File(tmp_path / src.name, "r+") as f:
            f["common/event/is_simulation"][...] = 1
    assert call_main(step2_scan.main, "--h5", tmp_path, "--reference-tokenizers", sample / "ref", "--out-dir",
                     tmp_path / "out", "--signal", "hzz4l", "--background", "zz4l", *TINY_SCAN, "--axis", "levels=2",
                     "--data-mc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-mc: no data among the inputs" in err[0], err
    assert not (tmp_path / "out" / "configs").exists()


def test_missing_reference_tokenizers(sample, tmp_path, capsys):
    assert call_main(step2_scan.main, "--h5", sample / "h5", "--reference-tokenizers", tmp_path / "nope",
                     "--out-dir", tmp_path / "out", "--axis", "levels=2", *TINY_SCAN) == 2
    assert "reference tokenizer directory not found" in capsys.readouterr().err
    ref = tmp_path / "ref"
    ref.mkdir()
    for p in (sample / "ref").glob("*.json"):
        (ref / p.name).write_bytes(p.read_bytes())
    for p in (sample / "ref").glob("*.pt"):
        if p.stem != "jets":
            (ref / p.name).write_bytes(p.read_bytes())
    assert call_main(step2_scan.main, "--h5", sample / "h5", "--reference-tokenizers", ref, "--out-dir",
                     tmp_path / "out", "--axis", "levels=2", *TINY_SCAN) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference tokenizers missing: jets.pt" in err[0]


# --- a tiny scan end to end -------------------------------------------------------------------------------


def test_tiny_scan_shards_rerun_and_failure(sample, tmp_path, capsys):
    out = tmp_path / "scan"
    grid = ["--axis", "codebook_size=8,32", "--axis", "levels=2"]
    assert scan(sample, out, *grid, "--shard", "1/2") == 0  # the reference job and one configuration
    assert (out / "reference" / "result.json").exists() and len(pd.read_csv(out / "scan.csv")) == 2
    assert scan(sample, out, *grid, "--shard", "2/2") == 0  # the table gathers every shard's configurations
    table = pd.read_parquet(out / "scan.parquet")
    assert sorted(pd.read_csv(out / "scan.csv")["config"]) == sorted(table["config"])
    reference = table[table["reference"] == True].iloc[0]  # noqa: E712  (NaN in the configurations' rows)
    table = table[table["reference"] != True]  # noqa: E712
    assert sorted(table["codebook_size"]) == [8, 32] and sorted(table["bits_per_object"]) == [6, 10]

    # the reference row: the reference muon tokenizer's quality, judged by the same classifier on the same test events
    ref_quality = json.loads((sample / "ref" / "muons.json").read_text())["quality"]
    assert reference["config"] == "muons-reference"
    assert reference["pt_resolution"] == ref_quality["goals"]["pt_relative_resolution"]
    assert reference["auc_minus_reference"] == 0 and reference["auc_verdict"] == "not distinguishable"
    for d in [out / "reference", *(out / "configs" / c for c in table["config"])]:
        # scratch without a backbone: run_all's architecture, the code geometry and the coarsest ids
        config = json.loads((d / "finetune" / "scratch.json").read_text())["config"]
        assert config["code_dim"] > 0 and config["id_levels"] == 1, d
    for _, r in table.iterrows():
        # paired on the same events: the difference of the two AUCs, inside its own interval
        assert abs(r["auc_minus_reference"] - (r["auc"] - reference["auc"])) < 1e-6
        assert r["auc_minus_reference_ci_lo"] <= r["auc_minus_reference"] <= r["auc_minus_reference_ci_hi"]
        assert r["auc_verdict"] in ("better", "worse", "not distinguishable")
        assert 0 <= r["auc"] <= 1 and r["auc_ci_lo"] <= r["auc"] <= r["auc_ci_hi"]
        assert 0 < r["pt_resolution"] < 10 and r["fit_seconds"] > 0 and r["encode_objects_per_s"] > 0
        assert r["used_L0"] + r["dead_L0"] <= r["codebook_size"] and 1 <= r["perplexity_L0"] <= r["codebook_size"]
        # the task was tokenized by this configuration for muons and by the reference for the others
        d = out / "configs" / r["config"]
        vocab = read_vocab(next((d / "tokens").glob("*.parquet")))
        own = json.loads((d / "tok" / "muons.json").read_text())["sha256"]
        ref = json.loads((sample / "ref" / "jets.json").read_text())["sha256"]
        assert vocab["tokenizers"]["muons"]["sha256"] == own and vocab["tokenizers"]["jets"]["sha256"] == ref
        assert vocab["tokenizers"]["muons"]["codebook_size"] == r["codebook_size"]
        bins = json.loads((d / "tok" / "muons.json").read_text())["quality"]["features"]["pt"]["relative_binned"]
        full = [b for b in bins if b["n"] >= tokenizer_quality.WORST_BIN_MIN_OBJECTS]
        assert r["pt_worst_bin_resolution"] == max(b["resolution"] for b in full)
    capsys.readouterr()

    done = {p: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")}
    blocked = S.configurations(S.check_grid({"codebook_size": [16], "levels": [2]}), ["muons"])[0]["id"]
    (out / "configs" / blocked).mkdir(parents=True)
    (out / "configs" / blocked / "tok").write_text("a file where the tokenizer folder goes")
    assert scan(sample, out, "--axis", "codebook_size=8,16,32", "--axis", "levels=2") == 1
    captured = capsys.readouterr()
    assert captured.out.count("done, skipping") == 3  # a rerun skips the finished configurations and the reference
    assert {p: p.stat().st_mtime_ns for p in out.glob("configs/*/result.json")} == done
    assert f"error: {blocked}: " in captured.err  # the failed one is listed ...
    assert len(pd.read_csv(out / "scan.csv")) == 3  # ... and the table keeps the others (and the reference row)
    (out / "scan.csv").unlink()
    assert scan(sample, out, "--axis", "codebook_size=8,16,32", "--axis", "levels=2", "--table-only") == 0
    assert len(pd.read_csv(out / "scan.csv")) == 3 and not (out / "configs" / blocked / "result.json").exists()


def test_report_ranks_the_scan(sample, tmp_path):
    """A run folder with a scan/ gets a section ranking each object's configurations, best AUC first."""
    import re

    from plotting import report

    assert scan(sample, tmp_path / "scan", "--axis", "codebook_size=8,32", "--axis", "levels=2") == 0
    assert report.main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    m = re.search(r'<section id="scan">(.*?)</section>', page, re.S)
    assert m and "<h3>muons</h3>" in m.group(1)
    table = pd.read_parquet(tmp_path / "scan" / "scan.parquet").sort_values("auc", ascending=False)
    shown = re.findall(r"<tr><td>\d+</td><td>([^<]+)</td>", m.group(1))
    assert shown == list(table["config"])
    assert "muons-reference" in shown  # the reference tokenizer ranks among the configurations

    from plotting.plot_scan import plot_scan
    names = {p.name for p in plot_scan(table, tmp_path / "plots")}
    assert {"auc_vs_bits.png", "auc_minus_reference_vs_bits.png", "pareto_pt_resolution_vs_bits.png"} <= names


def test_unreadable_input_is_listed(sample, tmp_path, capsys):
    """A corrupt HDF5 file among the inputs costs one error line (exit 1), not the scan."""
    h5 = tmp_path / "h5"
    h5.mkdir()
    for p in (sample / "h5").glob("*.h5"):
        (h5 / p.name).write_bytes(p.read_bytes())
    (h5 / "bad.h5").write_text("not an hdf5 file")
    code = call_main(step2_scan.main, "--h5", h5, "--reference-tokenizers", sample / "ref", "--out-dir", tmp_path / "out",
                     "--signal", "hzz4l", "--background", "zz4l", "--axis", "levels=2", *TINY_SCAN, "--table-only")
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "bad.h5" in err[0]
