"""Decoded-physics closure (common/decoded_closure.py): the event quantities and their figures on
synthetic events with known answers (identical objects close exactly; a +1% pT scale is a +1%
mass bias), and closure.json of a real fit (finite figures; only the quantities whose objects
have a tokenizer)."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.decoded_closure import QUANTITIES, closure_figures, event_quantities, write_closure
from common.object_stream import describe_file
from common.physics import Z_MASS
import step2_fit
from test_tokenize import QUICK, write_synthetic_h5

OBJECTS = ("electrons", "muons", "jets", "met")


def _events(n=1000, seed=0) -> dict[str, np.ndarray]:
    """A chunk in the step1 layout: 0-4 electrons and muons (mixed charges), 0-5 jets, MET."""
    rng = np.random.default_rng(seed)
    c = {}
    for obj, slots, mass in (("electrons", 4, False), ("muons", 4, False), ("jets", 5, True)):
        n_obj = rng.integers(0, slots + 1, n)
        mask = np.arange(slots)[None, :] < n_obj[:, None]
        pt = np.where(mask, -np.sort(-rng.uniform(10, 120, (n, slots)), axis=1), 0.0)
        c.update({f"common/{obj}/mask": mask, f"common/{obj}/pt": pt,
                  f"common/{obj}/eta": np.where(mask, rng.uniform(-2.4, 2.4, (n, slots)), 0.0),
                  f"common/{obj}/phi": np.where(mask, rng.uniform(-np.pi, np.pi, (n, slots)), 0.0)})
        if mass:
            c[f"common/{obj}/mass"] = np.where(mask, 0.1 * pt, 0.0)
        else:
            c[f"common/{obj}/charge"] = np.where(mask, rng.choice([-1, 1], (n, slots)), 0)
    c["common/met/pt"] = rng.gamma(2.0, 20.0, n)
    return c


def test_identical_objects_close_exactly():
    q = event_quantities(_events(), OBJECTS)
    assert set(q) == set(QUANTITIES)
    assert all(np.isfinite(q[k]).sum() > 50 for k in QUANTITIES), {k: int(np.isfinite(v).sum()) for k, v in q.items()}
    figures = closure_figures(q, {k: v.copy() for k, v in q.items()})
    for name, f in figures["quantities"].items():
        assert f["n"] == f["n_original"] == f["n_decoded"] > 0
        assert f["bias"] == 0 and f["resolution"] == 0, name
    assert figures["goals"] == {"m4l_resolution_le_1pct_bias_le_0.3pct": True, "mll_resolution_le_1pct_bias_le_0.3pct": True,
                                "mjj_resolution_le_3pct": True, "met_resolution_le_3pct": True}


def test_a_one_percent_pt_scale_is_a_one_percent_mass_bias():
    c = _events(seed=1)
    scaled = dict(c)
    for key in ("common/electrons/pt", "common/muons/pt", "common/jets/pt", "common/jets/mass", "common/met/pt"):
        scaled[key] = c[key] * 1.01
    f = closure_figures(event_quantities(c, OBJECTS), event_quantities(scaled, OBJECTS))["quantities"]
    for name in ("m4l", "mZ1", "mZ2", "mll", "mjj", "met"):
        assert f[name]["bias"] == pytest.approx(0.01, abs=1e-5), name  # lepton masses are negligible at these pTs
        assert f[name]["resolution"] < 1e-5, name
    assert abs(f["dr_ll"]["bias"]) < 1e-9 and abs(f["dr_jj"]["bias"]) < 1e-9  # angles untouched
    # a 2% smear of the jet pTs only: a finite mjj resolution, leptons and MET unchanged
    smeared = dict(c, **{"common/jets/pt": c["common/jets/pt"] * np.random.default_rng(2).normal(1, 0.02, c["common/jets/pt"].shape)})
    f = closure_figures(event_quantities(c, OBJECTS), event_quantities(smeared, OBJECTS))
    assert 0.005 < f["quantities"]["mjj"]["resolution"] < 0.03 and f["quantities"]["m4l"]["resolution"] == 0
    assert f["goals"]["m4l_resolution_le_1pct_bias_le_0.3pct"] is True


def test_z_candidates_follow_the_one_pairing():
    """Two same-flavour opposite-sign pairs: Z1 is the pair nearest the Z mass, m4l their sum."""
    c = _events(n=1, seed=3)
    c["common/electrons/mask"] = np.array([[True, True, False, False]])
    c["common/muons/mask"] = np.array([[True, True, False, False]])
    for obj, (pt, eta) in {"electrons": ((45.6, 45.6), (0.0, 0.0)), "muons": ((30.0, 12.0), (0.5, -0.5))}.items():
        c[f"common/{obj}/pt"] = np.array([[*pt, 0, 0]], float)
        c[f"common/{obj}/eta"] = np.array([[*eta, 0, 0]], float)
        c[f"common/{obj}/phi"] = np.array([[0.0, np.pi, 0, 0]])
        c[f"common/{obj}/charge"] = np.array([[1, -1, 0, 0]])
    q = event_quantities(c, OBJECTS)
    assert q["mZ1"][0] == pytest.approx(91.2, abs=0.01) and q["mZ1"][0] - Z_MASS < 0.1  # back-to-back 45.6 GeV electrons
    assert q["mll"][0] == pytest.approx(q["mZ1"][0], rel=1e-6)  # the two leading leptons are the electrons
    assert q["m4l"][0] > q["mZ1"][0] + q["mZ2"][0] - 1e-6


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("closure")
    h5 = write_synthetic_h5(d / "ttbar.h5", 2000, seed=4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # in process: no second interpreter start
        rc = step2_fit.main(["--h5", str(h5), "--out-dir", str(d / "tok"), "--objects", ",".join(OBJECTS), *QUICK,
                             "--steps", "60", "--warmup-steps", "20", "--threads", "1", "--workers", "1"])
    assert rc == 0
    return d, h5, out.getvalue()


def test_fit_writes_a_finite_closure(fitted):
    d, _, stdout = fitted
    c = json.loads((d / "tok" / "closure.json").read_text())
    assert set(c["quantities"]) == set(QUANTITIES) and 0 < c["n_events"] < 2000 * 0.25  # held-out events only
    for name, q in c["quantities"].items():  # a short fit: finite, not good (the Z candidates: 6 events, noise)
        bound = np.inf if q["n"] < 50 else 1 if q["difference"] == "relative" else np.pi
        assert q["n"] >= 5 and np.isfinite(q["bias"]) and 0 < q["resolution"] < bound, (name, q)
    # the same held-out events as the MET tokenizer's own quality: the same figures
    met = json.loads((d / "tok" / "met.json").read_text())["quality"]["features"]["pt"]["relative"]
    assert c["quantities"]["met"]["n"] == met["n"] and c["quantities"]["met"]["resolution"] == pytest.approx(met["resolution"], rel=1e-4)
    assert set(c["tokenizers"]) == set(OBJECTS) and all(v is None or isinstance(v, bool) for v in c["goals"].values())
    assert "decoded closure on" in stdout
    with np.load(d / "tok" / "closure.npz") as z:
        assert len(z["orig/met"]) == len(z["decoded/met"]) == c["n_events"]


def test_closure_measures_only_the_objects_with_a_tokenizer(fitted, tmp_path):
    d, h5, _ = fitted
    shutil.copy(d / "tok" / "jets.pt", tmp_path / "jets.pt")
    c = write_closure(tmp_path, [describe_file(str(h5))], max_events=100)
    assert set(c["quantities"]) == {"mjj", "dr_jj"} and c["n_events"] == 100
    assert c["goals"]["m4l_resolution_le_1pct_bias_le_0.3pct"] is None and write_closure(tmp_path / "none", []) is None


@pytest.mark.parametrize("tokenizers,code,says", [(False, 2, "no step2 tokenizers"), (True, 1, "cannot read as a step1 HDF5")])
def test_closure_bench_bad_input_is_one_line(tokenizers, code, says, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    if tokenizers:
        (tok / "muons.pt").write_bytes(b"")
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_closure.py"
    r = subprocess.run([sys.executable, str(bench), "--tokenizers", str(tok), "--h5", str(tmp_path / "missing.h5"),
                        "--out", str(tmp_path / "out.json")], capture_output=True, text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and says in lines[0], r.stderr[-1500:]
    assert not (tmp_path / "out.json").exists()


def test_tau_ceiling_bench_bad_input_is_one_line(tmp_path):
    """bench/tau_context_ceiling.py on a folder without a run's tokenizers: one line naming it, exit 2."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "tau_context_ceiling.py"
    r = subprocess.run([sys.executable, str(bench), "--run", str(tmp_path / "no_run")], capture_output=True, text=True,
                       cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no readable taus and jets tokenizers" in lines[0], r.stderr[-1500:]
    assert str(tmp_path / "no_run" / "tok") in lines[0]
