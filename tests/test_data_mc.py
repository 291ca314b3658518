"""step2_fit --data-mc (common/data_mc.py): data against simulation on held-out objects. (step2_scan
--data-mc calls the same check and comparison; a scan's end to end run is too slow for this file.)

The test files hold no collision data, so data is stood in for honestly: a real Pythia Drell-Yan
sample (step0) converted by step1 is the simulation, and a copy of the converted file with
common/event/is_simulation set to 0 is the "data". The copy's held-out events are another 15% of
the same events (the split hashes the file name), so both sides come from one distribution and
chi2/ndf must be about 1. A second copy with every pT scaled by 1.2 must be far from it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import step1_convert
import step2_fit
from common.data_mc import SIMULATION_KEY, bin_sums, chi2_two_sample, compared
from plotting import plot_data_mc, report
from session_cache import generated

torch.set_num_threads(1)
PT_SCALE = 1.2
FIT = ["--objects", "tracks,jets", "--steps", "60", "--warmup-steps", "15", "--levels", "2", "--codebook-size", "128",
       "--closure-events", "0", "--workers", "1", "--threads", "1"]


def as_data(src: Path, dst: Path, pt_scale: float = 1.0) -> Path:
    """A copy of a step1 file flagged as data (is_simulation 0), its objects' pT scaled by pt_scale."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f[SIMULATION_KEY][...] = 0
        for obj in ("electrons", "muons", "jets", "tracks"):
            f[f"common/{obj}/pt"][...] = f[f"common/{obj}/pt"][...] * pt_scale
    return dst


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("data_mc")
    dy = generated(tmp_path_factory, "dy")  # 600 events: about 2 500 held-out tracks and 100 held-out jets per side
    assert step1_convert.main([str(dy), "--out-dir", str(d / "h5"), "--workers", "1"]) == 0
    mc = d / "h5" / "dy.h5"
    return {"dir": d, "mc": mc, "data": as_data(mc, d / "data_dy.h5"),
            "shifted": as_data(mc, d / "data_dy_pt_scaled.h5", PT_SCALE)}


def fit(h5s: list[Path], out: Path, *extra: str) -> dict:
    assert step2_fit.main(["--h5", *map(str, h5s), "--out-dir", str(out), *FIT, "--data-mc", *extra]) == 0
    return json.loads((out / "data_mc.json").read_text())


def rows_of(result: dict) -> dict[tuple, dict]:
    return {(r["object"], r["name"]): r for r in result["rows"]}


@pytest.fixture(scope="module")
def same(inputs):
    run = inputs["dir"] / "run_same"
    result = fit([inputs["mc"], inputs["data"]], run / "tok", "--no-plots")  # the fit's own plots take long here
    assert plot_data_mc.main([str(run / "tok")]) == 0
    return run, result


def clustered(rng, events: int, per_event: int, p: np.ndarray) -> dict:
    """bin_sums of events whose objects all fall into one bin (drawn with probabilities p)."""
    index = np.repeat(rng.choice(len(p), size=events, p=p), per_event)
    return bin_sums(index, np.repeat(np.arange(events), per_event), len(p))


def test_chi2_is_one_per_degree_of_freedom_for_one_distribution():
    """The statistic's calibration (sparse bins, unequal sample sizes, objects clustered in events)
    and its power."""
    rng = np.random.default_rng(0)
    p = np.r_[np.full(20, 0.04), np.full(80, 0.2 / 80)]  # 80 bins expecting about 1 entry in the smaller sample
    one = [chi2_two_sample(rng.multinomial(400, p), rng.multinomial(1500, p))["chi2_ndf"] for _ in range(400)]
    assert abs(np.mean(one) - 1) < 0.05
    assert chi2_two_sample(rng.multinomial(400, np.roll(p, 3)), rng.multinomial(1500, p))["chi2_ndf"] > 2
    n = rng.multinomial(1000, p)
    assert chi2_two_sample(n, n)["chi2"] == 0.0
    assert chi2_two_sample(n, 3 * n)["chi2"] == pytest.approx(0.0, abs=1e-9)  # shapes only: unit area
    assert chi2_two_sample([5, 0], [7, 0])["chi2_ndf"] is None  # one filled bin: no degree of freedom
    # one object per event: the design effect is exactly 1 and the test is the plain one
    single = compared({"data": clustered(rng, 300, 1, p), "mc": clustered(rng, 900, 1, p)})
    assert single["design_effect"] == pytest.approx(1.0)
    assert single["chi2"] == pytest.approx(chi2_two_sample(single["data"], single["mc"])["chi2"])
    # five objects of an event in one bin: five times the plain chi2/ndf, about 1 once corrected
    p = np.full(30, 1 / 30)
    five = [compared({"data": clustered(rng, 300, 5, p), "mc": clustered(rng, 600, 5, p)}) for _ in range(200)]
    plain = [chi2_two_sample(f["data"], f["mc"])["chi2_ndf"] for f in five]
    assert abs(np.mean(plain) / 5 - 1) < 0.1 and abs(np.mean([f["chi2_ndf"] for f in five]) - 1) < 0.1


def test_same_events_agree(same):
    run, result = same
    tok = run / "tok"
    rows = rows_of(result)
    names = {o: json.loads((tok / f"{o}.json").read_text())["features_used"] for o in ("tracks", "jets")}
    for obj, features in names.items():
        assert {(obj, f) for f in features} | {(obj, "q0"), (obj, "q1")} <= set(rows)
        for kind in ("features", "codes"):
            assert (tok / "plots" / "data_mc" / f"{obj}_{kind}.png").stat().st_size > 10_000
    assert (tok / "data_mc.csv").read_text().count("\n") == len(result["rows"]) + 1
    tracks = [r for r in result["rows"] if r["object"] == "tracks"]
    assert min(r["n_data"] for r in tracks) > 1500 and min(r["n_mc"] for r in tracks) > 1500
    measured = [r for r in result["rows"] if r["chi2_ndf"] is not None]
    assert 0.7 < np.median([r["chi2_ndf"] for r in measured]) < 1.3
    assert min(r["p_value"] for r in measured) > 1e-4, [(r["object"], r["name"], r["chi2_ndf"]) for r in measured]


def test_shifted_pt_disagrees(inputs):
    result = fit([inputs["mc"], inputs["shifted"]], inputs["dir"] / "tok_shifted", "--no-plots")
    rows = rows_of(result)
    assert rows[("tracks", "pt")]["chi2_ndf"] > 4 and rows[("tracks", "pt")]["p_value"] < 1e-20
    assert rows[("jets", "pt")]["chi2_ndf"] > 3
    assert rows[("tracks", "q0")]["chi2_ndf"] > 2  # the codes see the shift
    assert rows[("tracks", "eta")]["chi2_ndf"] < 2  # what was not shifted still agrees
    assert not (inputs["dir"] / "tok_shifted" / "plots").exists()  # --no-plots


@pytest.mark.parametrize("side", ["data", "mc"])
def test_flag_needs_both_sides(inputs, side, capsys, tmp_path):
    """--data-mc with only simulation (or only data) among the inputs: one line, exit 2, nothing written."""
    h5 = inputs["mc"] if side == "data" else inputs["data"]
    with pytest.raises(SystemExit) as exc:
        step2_fit.main(["--h5", str(h5), "--out-dir", str(tmp_path / "tok"), *FIT, "--data-mc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: --data-mc: no {'data' if side == 'data' else 'simulation'} among the inputs")
    assert not (tmp_path / "tok").exists()


def test_report_shows_table_and_plots(same):
    run, result = same
    section = report.data_mc_section(run)
    assert section in report.section_tokenizers(run)
    assert "tracks, tracks:" in section and report.fmt(rows_of(result)[("tracks", "pt")]["chi2_ndf"]) in section
    assert section.count("data:image/png;base64") == 4  # features and codes of tracks and jets
