"""Time per training step of the model variants against the flat model, on a finished
`VARIANTS="flat group constituent group+constituent" bash run_all.sh` run.

For every variant, on the run's own token files (tokens/ or tokens_group/) and HDF5 files:
  step3   --epochs 1 --max-steps N: the training seconds of the epoch (pretraining.history), per step
  step4   --arms scratch --steps N --eval-every N: seconds to the first record (N steps and one
          validation pass), per step

Each run is a child process on one thread with the run_all model and batch; the variants are
interleaved and repeated (`--repeats`) so a busy machine slows them alike. Printed: seconds per
step, events per second, the ratio to the flat model of the same repeat, and the peak memory of
the child.

  python bench/bench_variants.py --run-dir runs/study --steps 40 --repeats 2   # about 10 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_workers import timed  # noqa: E402

# variant -> (tokenizer folder, token folder, model flags), as run_all lays them out
VARIANTS = {"flat": ("tok", "tokens", []), "group": ("tok_group", "tokens_group", []),
            "constituent": ("tok", "tokens", ["--constituents"]),
            "group+constituent": ("tok_group", "tokens_group", ["--constituents"])}
TASK = ["--signal", "hzz4l", "--background", "zz4l,ttbar,dy"]
TASK_PROCESSES = ("hzz4l", "zz4l", "ttbar", "dy")
BATCH = 128  # step3's default batch; step4's is the same


def step3_cmd(run: Path, variant: str, out: Path, steps: int) -> list[str]:
    tok, tokens, flags = VARIANTS[variant]
    return [sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", *map(str, sorted((run / tokens).glob("*.parquet"))),
            "--tokenizers", str(run / tok), "--h5-dir", str(run / "h5"), "--out-dir", str(out), "--epochs", "1",
            "--max-steps", str(steps), "--threads", "1", "--no-plots", "--overwrite", *flags]


def step4_cmd(run: Path, variant: str, out: Path, steps: int) -> list[str]:
    tok, tokens, flags = VARIANTS[variant]
    return [sys.executable, str(ROOT / "step4_finetune.py"), "--parquet", *(str(run / tokens / f"{p}.parquet") for p in TASK_PROCESSES),
            *TASK, "--arms", "scratch", "--tokenizers", str(run / tok), "--h5-dir", str(run / "h5"), "--out-dir", str(out),
            "--steps", str(steps), "--eval-every", str(steps), "--threads", "1", "--workers", "1", "--no-plots",
            "--overwrite", *flags]


def seconds_per_step(step: str, out: Path, steps: int) -> float:
    m = json.loads((out / "metrics.json").read_text())
    if step == "step3":
        return m["history"][0]["seconds"] / m["steps_per_epoch"]
    return m["training"]["scratch"][0]["seconds"] / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a run_all RUN folder with the VARIANTS outputs")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    variants = [v for v in args.variants.split(",") if (run / VARIANTS[v][1]).is_dir()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            ref = {}
            for step, cmd in (("step3", step3_cmd), ("step4", step4_cmd)):
                for v in variants:
                    out = Path(tmp) / f"{step}_{v.replace('+', '_')}"
                    _, peak = timed(cmd(run, v, out, args.steps))
                    s = seconds_per_step(step, out, args.steps)
                    ref.setdefault(step, s)  # flat comes first
                    rows.append((rep, step, v, s, ref[step], peak))
                    print(f"repeat {rep} {step} {v:18s} {s:.3f} s/step  {BATCH / s:7.1f} events/s  "
                          f"x{s / ref[step]:.2f} of flat  peak {peak / 2**20:.0f} MiB", flush=True)
    print("\nratio to flat (mean over repeats):")
    for step in ("step3", "step4"):
        for v in variants:
            r = [s / f for _, st, vv, s, f, _ in rows if st == step and vv == v]
            print(f"  {step} {v:18s} x{sum(r) / len(r):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
