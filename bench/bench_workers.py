"""Trainings side by side (`--workers`) against one at a time, on a finished run's outputs.

  step4   the same trainings (--arms x --seeds, --steps each) with --workers 1 (one training at a
          time on all usable threads: the reference) and --workers N (N trainings at once, one
          thread each)
  fit     step2 fit of every object type with --workers 1 and --workers N (one thread per fit)

Each configuration runs as a child process; the bench prints wall time, trainings (or fits) per
minute, the peak memory of the process tree, the ratio to the reference, and the results of
both (the step4 reference trains on all threads, the workers on one each: floating-point sums
in another order, so the AUCs agree only within the training's own noise; the fits run on one
thread in both, so their files must be identical).

  python bench/bench_workers.py --run-dir runs/default                 # about 8 minutes on 2 cores
  python bench/bench_workers.py --run-dir runs/default --only step4 --steps 100 --seeds 1,2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.runtime import usable_cpus  # noqa: E402


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its children, in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident memory of the process tree in bytes) of one child command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, ps = [0], psutil.Process(proc.pid)

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[:2])} failed:\n{err[-2000:]}")
    return time.perf_counter() - t0, peak[0]


def step4_cmd(run: Path, out: Path, workers: int, args) -> list[str]:
    tasks = [str(run / "tokens" / f"{p}.parquet") for p in ("hzz4l", "zz4l", "ttbar", "dy")]
    return [sys.executable, "step4_finetune.py", "--parquet", *tasks, "--signal", "hzz4l", "--background",
            "zz4l,ttbar,dy", "--init", str(run / "pretrain" / "backbone.pt"), "--arms", args.arms, "--seeds", args.seeds,
            "--steps", str(args.steps), "--eval-every", str(args.steps), "--out-dir", str(out), "--no-plots",
            "--workers", str(workers), "--threads", "0" if workers == 1 else "1"]


def step4_result(out: Path) -> dict:
    arms = json.loads((out / "metrics.json").read_text())["arms"]
    return {a: [s["auc"] for s in v["per_seed"]] for a, v in arms.items()}


def fit_cmd(run: Path, out: Path, workers: int, args) -> list[str]:
    return [sys.executable, "step2_fit.py", "--h5", str(run / "h5"), "--out-dir", str(out), "--steps", str(args.fit_steps),
            "--no-plots", "--workers", str(workers), "--threads", "1"]


def fit_result(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in sorted(out.glob("*.pt"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/default", help="a finished run_all output folder")
    p.add_argument("--only", choices=("step4", "fit"), default=None)
    p.add_argument("--workers", type=int, default=0, help="0: the usable CPUs")
    p.add_argument("--arms", default="scratch,finetune")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--fit-steps", type=int, default=800)
    args = p.parse_args()
    run, workers = Path(args.run_dir).resolve(), args.workers or usable_cpus()
    n_jobs = {"step4": len(args.arms.split(",")) * len(args.seeds.split(",")), "fit": None}
    benches = {"step4": (step4_cmd, step4_result), "fit": (fit_cmd, fit_result)}
    print(f"usable CPUs {usable_cpus()}, workers {workers}, load average {psutil.getloadavg()[0]:.1f} at start")
    for name, (cmd, result) in benches.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            rows = {}
            for w in (1, workers):
                out = Path(tmp) / f"w{w}"
                wall, peak = timed(cmd(run, out, w, args))
                rows[w] = (wall, peak, result(out))
            jobs = n_jobs[name] or len(rows[1][2])
            for w, (wall, peak, _) in rows.items():
                print(f"{name:5s} workers {w}: {wall:7.1f} s wall, {60 * jobs / wall:5.2f} {'trainings' if n_jobs[name] else 'fits'}"
                      f"/min, peak memory {peak / 2**20:6.0f} MiB, speed-up {rows[1][0] / wall:4.2f}x")
            print(f"{name:5s} results, one at a time: {rows[1][2]}\n{name:5s} results, side by side: {rows[workers][2]}")
    print(f"load average {psutil.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
