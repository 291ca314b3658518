"""Throughput of step0's generation (common/generation.py, step0's defaults) per core, including the
detector and the writing, against the reference of Pythia itself (pythia.nextBatch), measured in a
child process.

    python bench/bench_generate.py --events 400 --processes hzz4l,ttbar

Prints, per process: events/s (whole step, one worker; wall and per CPU-second of the child,
imports included, which is what a shared machine's load does not distort), Pythia-only events/s, the share of the
time spent inside Pythia, the child's peak memory (ru_maxrss) and Pythia's cross-section.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENTS = 400
PROCESSES = "hzz4l,zz4l,ttbar,dy,vbfh4l,whh4l,zhh4l,tthh4l,wjets,qcd,singletop,wz"  # every step0 process
SEED = 1

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from common.generation import generate
t = time.perf_counter()
totals = generate({proc!r}, {n}, {seed}, Path({out!r}))
wall = time.perf_counter() - t
print(json.dumps({{"wall": wall, "n": totals["n_events"], "t_pythia": totals["t_pythia"], "t_init": totals["t_init"],
                  "t_detector": totals["t_detector"], "t_write": totals["t_write"], "sigma_pb": totals["cross_section_pb"],
                  "cpu": resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=EVENTS)
    ap.add_argument("--processes", default=PROCESSES)
    args = ap.parse_args()
    print(f"{'process':9} {'events':>6} {'ev/s (step0)':>13} {'ev/CPU-s':>9} {'ev/s (Pythia only)':>19} {'Pythia share':>13} "
          f"{'detector ms/ev':>15} {'write ms/ev':>12} {'peak MB':>8} {'sigma pb':>10}")
    with tempfile.TemporaryDirectory() as d:
        for proc in args.processes.split(","):
            code = CHILD.format(root=str(ROOT), proc=proc, n=args.events, seed=SEED, out=str(Path(d) / f"{proc}.root"))
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(f"{proc}: failed: {res.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            n = r["n"]
            print(f"{proc:9} {n:6d} {n / r['wall']:13.1f} {n / r['cpu']:9.1f} {n / r['t_pythia']:19.1f} {r['t_pythia'] / r['wall']:13.0%} "
                  f"{r['t_detector'] / n * 1e3:15.2f} {r['t_write'] / n * 1e3:12.2f} {r['maxrss_mb']:8.0f} {r['sigma_pb']:10.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
