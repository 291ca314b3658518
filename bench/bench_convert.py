"""Benchmark of step1_convert.py: conversion events/s against a bare uproot read of the same branches
of the same file (ratio; goal >= 0.5), and peak memory when the input is 10x larger.

    python bench/bench_convert.py [--input tests/data/physlite/PHYSLITE_example.root] [--copies 20] [--step 2000]

The input's converted branches are rewritten `copies` and 10 x `copies` times into temporary
PHYSLITE-like TTrees (links as records, as uproot writes them; vector<vector> branches cannot be written
by uproot: GhostTrack goes in step0's split spelling (common/physlite_writer.py), the others are dropped). Every measurement runs in its own child process, which reports its time
and its peak RSS (ru_maxrss); interpreter start-up and imports are not timed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import physlite  # noqa: E402

INPUT = ROOT / "tests/data/physlite/PHYSLITE_example.root"
COPIES = 20
STEP = 2000

CHILD_READ = """
import json, resource, sys, time, uproot
path, cols, step = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tree = uproot.open(path)["CollectionTree"]
t0, n = time.perf_counter(), 0
for chunk in tree.iterate(cols, step_size=step, library="ak"):
    n += len(chunk)
print(json.dumps({"events": n, "seconds": time.perf_counter() - t0,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
CHILD_CONVERT = """
import json, resource, sys, time
import step1_convert
path, out, step = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
code = step1_convert.main([path, "--out-dir", out, "--step", step, "--overwrite"])  # defaults; provenance ~20 ms
assert code == 0, code
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def replicate(src: Path, dst: Path, copies: int) -> tuple[int, list[str]]:
    """Rewrite the columns the converter reads, `copies` times; returns (events, columns)."""
    tree = uproot.open(src)["CollectionTree"]
    reader = physlite.PhysliteReader(tree, "ttree", {})
    cols = sorted(set(reader.columns.values()))
    arrays = tree.arrays(cols, library="ak")
    out = {}
    for col in cols:
        a = arrays[col]
        if col.endswith("GhostTrack"):  # per event the links of all its jets, per jet their number
            out.update({f"{col}_m_persKey": ak.flatten(a.m_persKey, axis=2), f"{col}_m_persIndex": ak.flatten(a.m_persIndex, axis=2),
                        f"{col}_n": ak.values_astype(ak.num(a, axis=2), np.uint32)})
            continue
        if a.ndim > 2:
            continue  # vector<vector<...>>: not writable by uproot
        name = col.split("/")[0]
        if "/" in col:  # a split ElementLink subbranch -> a record, written as <link>_m_persKey/_m_persIndex
            out[name] = ak.zip({"m_persKey": ak.values_astype(a * 0 + 1, np.uint32), "m_persIndex": a})
        else:
            out[name] = a
    with uproot.recreate(dst) as f:
        f.mktree("CollectionTree", {k: (v.type.content if v.ndim > 1 else v.type.content) for k, v in out.items()})
        for _ in range(copies):
            f["CollectionTree"].extend(out)
    written = uproot.open(dst)["CollectionTree"]
    reader = physlite.PhysliteReader(written, "ttree", {})
    return int(written.num_entries), sorted(set(reader.columns.values()))


def child(code: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    if r.returncode != 0:
        raise SystemExit(f"child failed: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", default=str(INPUT))
    p.add_argument("--copies", type=int, default=COPIES)
    p.add_argument("--step", type=int, default=STEP)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, copies in (("1x", args.copies), ("10x", 10 * args.copies)):
            path = Path(tmp) / f"bench_{label}.root"
            n, cols = replicate(Path(args.input), path, copies)
            read = child(CHILD_READ, path, json.dumps(cols), args.step)
            conv = child(CHILD_CONVERT, path, Path(tmp) / "h5", args.step)
            rows.append((label, n, len(cols), n / read["seconds"], n / conv["seconds"], read["peak_mib"], conv["peak_mib"]))
    print(f"{'input':6s} {'events':>8s} {'branches':>8s} {'read ev/s':>10s} {'convert ev/s':>12s} {'ratio':>6s} "
          f"{'read MiB':>9s} {'convert MiB':>11s}")
    for label, n, nc, r, c, rm, cm in rows:
        print(f"{label:6s} {n:8d} {nc:8d} {r:10.0f} {c:12.0f} {c / r:6.2f} {rm:9.0f} {cm:11.0f}")
    print(f"peak memory of the conversion, 10x / 1x input: {rows[1][6] / rows[0][6]:.2f} (flat means ~1)")


if __name__ == "__main__":
    main()
