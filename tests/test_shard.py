"""--shard K/N of step1_convert.py and step2_tokenize.py apply: N batch jobs together write exactly
the outputs of one unsharded run (same file set, identical datasets / identical Parquet tables)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from step_runner import run_script

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
N_SHARDS = 3  # step1: 5 files -> 2, 2, 1
N_SHARDS_STEP2 = 2  # step2: 3 files -> 2, 1
# several real files under different names, so the shards get different, uneven file lists
INPUTS = {"a_physlite.root": "physlite/PHYSLITE_example.root", "b_physlite.root": "physlite/PHYSLITE_example.root",
          "c_nano.root": "nanoaod/nano_dy.root", "d_nano.root": "nanoaod/nano_dy.root",
          "e_physlite.root": "physlite/PHYSLITE_example.root"}
# what legitimately differs between a shard job and the unsharded job: its settings and its input list
SETTINGS_KEYS = ("shard", "out_dir", "workers", "inputs", "h5")
TINY_FIT = ["--levels", "2", "--codebook-size", "16", "--dim", "4", "--steps", "30", "--warmup-steps", "10", "--batch-size", "128",
            "--preprocess-events", "500", "--eval-objects", "500", "--no-plots", "--workers", "1"]

pytestmark = pytest.mark.skipif(not (ROOT / "step1_convert.py").exists() or not (ROOT / "step2_tokenize.py").exists(),
                                reason="step1_convert.py / step2_tokenize.py not present")


def run(*args: str, ok=(0,)) -> subprocess.CompletedProcess:
    res = run_script(*args)
    assert res.returncode in ok, f"{args[:2]} rc={res.returncode}\n{res.stderr[-3000:]}"
    return res


def strip_settings(meta: dict) -> dict:
    """Metadata without the settings that name the shard or the output folder."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, (bytes, str)):
            try:
                v = json.loads(v)
            except (ValueError, TypeError):
                pass
        if isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if kk not in SETTINGS_KEYS}
            if isinstance(v.get("settings"), dict):
                v["settings"] = {kk: vv for kk, vv in v["settings"].items() if kk not in SETTINGS_KEYS}
        out[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def h5_content(path: Path) -> tuple[dict, dict]:
    datasets, meta = {}, {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        meta = dict(f["metadata"].attrs) if "metadata" in f else {}
    return datasets, strip_settings(meta)


def assert_same_h5(a: Path, b: Path) -> None:
    da, ma = h5_content(a)
    db, mb = h5_content(b)
    assert sorted(da) == sorted(db), f"{a.name}: dataset lists differ"
    for k in da:
        assert da[k].dtype == db[k].dtype and da[k].shape == db[k].shape, f"{a.name}:{k}"
        assert np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f"), f"{a.name}:{k} values differ"
    assert json.dumps(ma, sort_keys=True, default=str) == json.dumps(mb, sort_keys=True, default=str), \
        f"{a.name}: metadata differs"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    for name, src in INPUTS.items():
        shutil.copy(DATA / src, d / name)
    return d


@pytest.fixture(scope="module")
def step1_runs(inputs, tmp_path_factory) -> tuple[Path, list[Path]]:
    """One unsharded step1 run, and N shard jobs each writing into its own folder."""
    whole, sharded = tmp_path_factory.mktemp("h5_whole"), tmp_path_factory.mktemp("h5_sharded")
    files = [str(p) for p in sorted(inputs.glob("*.root"))]
    run("step1_convert.py", *files, "--out-dir", str(whole), "--seed", "1")
    shards = [sharded / f"shard{k}" for k in range(1, N_SHARDS + 1)]
    for k, out in enumerate(shards, 1):
        run("step1_convert.py", *files, "--out-dir", str(out), "--seed", "1", "--shard", f"{k}/{N_SHARDS}")
    return whole, shards


def test_step1_shards_equal_one_run(step1_runs):
    whole, shards = step1_runs
    names = sorted(p.name for p in whole.glob("*.h5"))
    assert names == sorted(Path(n).with_suffix(".h5").name for n in INPUTS)
    per_shard = [sorted(p.name for p in d.glob("*.h5")) for d in shards]
    union = [n for files in per_shard for n in files]
    assert sorted(union) == names, f"shards wrote {per_shard}"  # every file once: disjoint and complete
    assert all(per_shard), "a shard got no file although there are more files than shards"
    for d, files in zip(shards, per_shard):
        for name in files:
            assert_same_h5(whole / name, d / name)


def test_bad_shard_is_usage_error(inputs, tmp_path):
    for bad in ("4/3", "x/2"):
        res = run("step1_convert.py", str(next(inputs.glob("*.root"))), "--out-dir", str(tmp_path), "--shard", bad,
                  ok=(2,))
        assert "shard" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def tokenizers(step1_runs, tmp_path_factory) -> Path:
    whole, _ = step1_runs
    tok = tmp_path_factory.mktemp("tok")
    h5 = [str(p) for p in sorted(whole.glob("*.h5")) if "nano" not in p.name]  # one experiment's files
    run("step2_tokenize.py", "fit", "--h5", *h5, "--out-dir", str(tok), "--seed", "1", *TINY_FIT)
    return tok


def parquet_content(path: Path):
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    vocab = json.loads(meta[b"vocab"])
    prov = strip_settings({"p": meta.get(b"provenance", b"{}").decode()})["p"]
    return table.replace_schema_metadata(None), vocab, prov


def test_step2_apply_shards_equal_one_run(step1_runs, tokenizers, tmp_path):
    whole_h5, _ = step1_runs
    h5 = [str(p) for p in sorted(whole_h5.glob("*.h5")) if "nano" not in p.name]
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    common = ["--tokenizers", str(tokenizers), "--seed", "1"]
    run("step2_tokenize.py", "apply", "--h5", *h5, "--out-dir", str(whole), *common)
    for k in range(1, N_SHARDS_STEP2 + 1):  # every job writes into the same folder, as batch jobs would
        run("step2_tokenize.py", "apply", "--h5", *h5, "--out-dir", str(sharded), "--shard", f"{k}/{N_SHARDS_STEP2}",
            *common)
    names = sorted(p.name for p in whole.glob("*.parquet"))
    assert len(names) == len(h5)
    assert sorted(p.name for p in sharded.glob("*.parquet")) == names
    for name in names:
        ta, va, pa_ = parquet_content(whole / name)
        tb, vb, pb = parquet_content(sharded / name)
        assert ta.num_rows > 0
        assert ta.equals(tb), f"{name}: token tables differ"
        assert va == vb, f"{name}: vocabularies differ"
        assert pa_ == pb, f"{name}: provenance differs beyond the shard setting"
