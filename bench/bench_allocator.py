"""step3 under two memory allocators: glibc's malloc and mimalloc (env.sh's MIMALLOC, which run_all preloads).

With glibc's malloc, the batches that step3's shuffle buffer hands out, allocated between the training
step's own tensors, grow the heap pass after pass, and the steps slow down with it (bench/README.md,
"mimalloc"). Each allocator trains step3 in a fresh child process on a finished
run's tokens (one process, one thread, its defaults otherwise); the RSS of the child is sampled
throughout. Prints each pass's events/s, the resident memory a fifth into the run and at its end, the
peak, and the ratio of the training time to glibc's in the same run.

  source env.sh && python bench/bench_allocator.py --run runs/default          # about 4 minutes on 2 cores
  python bench/bench_allocator.py --run runs/default --epochs 3 --max-steps 200
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def train(run: Path, out: Path, preload: str, args) -> dict:
    """step3 in a child process with LD_PRELOAD=preload ("" for glibc): its history, RSS samples and wall time."""
    cmd = [sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", str(run / "tokens"), "--tokenizers",
           str(run / "tok"), "--h5-dir", str(run / "h5"), "--out-dir", str(out), "--epochs", str(args.epochs),
           "--max-steps", str(args.max_steps), "--seed", "1", "--threads", "1", "--cpu-ranks", "1",
           "--overwrite", "--no-plots"]
    env = {**os.environ, "LD_PRELOAD": preload, "PYTHONPATH": str(ROOT)}
    t0, rss = time.perf_counter(), []
    log = out.with_suffix(".log")  # a file, not a pipe: the progress bars would fill a pipe's buffer
    with open(log, "w") as f:
        child = psutil.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        while child.poll() is None:
            try:
                rss.append(child.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.5)
    if child.returncode:
        sys.exit(f"step3 failed ({preload or 'glibc'}, exit {child.returncode}): {log.read_text().strip()[-500:]}")
    history = json.loads((out / "metrics.json").read_text())["history"]
    return {"history": history, "rss": rss, "wall": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="a finished run_all run (its tokens/, tok/ and h5/)")
    p.add_argument("--epochs", type=int, default=6, help="step3 passes (run_all's 6)")
    p.add_argument("--max-steps", type=int, default=0, help="optimiser steps per pass (0: the whole train split)")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "tokens").is_dir():
        sys.exit(f"{run}: no tokens/ here; run `bash run_all.sh` first, or pass --run")
    mimalloc = os.environ.get("MIMALLOC")
    if not mimalloc:
        sys.exit("MIMALLOC is not set: on Linux, `source env.sh` first")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, preload in (("glibc", ""), ("mimalloc", mimalloc)):
            results[name] = train(run, Path(tmp) / name, preload, args)
    print(f"step3 on {run}, {args.epochs} passes, one process of one thread")
    print(f"{'allocator':<10} {'events/s per pass':<48} {'training s':>10} {'RSS MB at 20% of the run -> end (peak)':>40}")
    ref = sum(h["seconds"] for h in results["glibc"]["history"])
    for name, r in results.items():
        speeds = " ".join(f"{h['events_per_s']:.0f}" for h in r["history"])
        seconds = sum(h["seconds"] for h in r["history"])
        first = r["rss"][len(r["rss"]) // 5] if r["rss"] else float("nan")
        last = r["rss"][-1] if r["rss"] else float("nan")
        peak = max(r["rss"], default=float("nan"))
        print(f"{name:<10} {speeds:<48} {seconds:>10.1f} {first:>22.0f} -> {last:.0f} ({peak:.0f})"
              f"   x{ref / seconds:.2f} glibc's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
