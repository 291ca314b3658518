"""Start-up of a step's process: the time from a new interpreter to the first optimiser, each timed in a
fresh child process with PYTHONDONTWRITEBYTECODE=1 (as on many batch and CI machines: a module without a
.pyc is compiled again in every process). Three settings:
  every package  the environment's .pyc files: env.sh byte-compiles every package
  start-up only  .pyc files only for what the steps import at start (env.sh's recipe before; a warmed
                 PYTHONPYCACHEPREFIX): modules imported later, such as torch._dynamo, compile each time
  none           an empty PYTHONPYCACHEPREFIX: every module compiled from source
A step process starts once per run, per worker and per torchrun rank; the test suite starts a few dozen.
Prints the median wall time per step, the ratios to "every package", and the children's peak memory.

  python bench/bench_startup.py            # about a minute on 2 cores
  python bench/bench_startup.py --reps 5
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# step -> what its process does before its first event: import the script, and build an optimiser where
# it trains (torch's optimisers import torch._dynamo on their first construction)
OPTIMISER = "import torch\ntorch.optim.AdamW([torch.zeros(1, requires_grad=True)])"
STEPS = {"step0_generate": "", "step1_convert": "", "step2_fit": OPTIMISER, "step3_pretrain": OPTIMISER,
         "step4_finetune": OPTIMISER}


# env.sh's former warm-up: the packages the steps import at start
START_UP_IMPORTS = ("torch, numba, lightgbm, sklearn.linear_model, sklearn.metrics, scipy.stats, uproot, awkward, h5py, "
                    "pyarrow.parquet, pandas, matplotlib.pyplot, pythia8mc, fastjet, tqdm, psutil")


def start(step: str, env: dict) -> float:
    code = f"import {step}\n{STEPS[step]}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="children per step and setting (the median is shown)")
    args = p.parse_args(argv)
    base = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as empty:
        subprocess.run([sys.executable, "-c", f"import {START_UP_IMPORTS}"], check=True,
                       env={**base, "PYTHONPYCACHEPREFIX": warm, "PYTHONDONTWRITEBYTECODE": ""})
        settings = {"every package": base, "start-up only": {**base, "PYTHONPYCACHEPREFIX": warm},
                    "none": {**base, "PYTHONPYCACHEPREFIX": empty}}
        print(f"{'step':<16}" + "".join(f"{name:>15}" for name in settings) + "  ratios")
        for step in STEPS:
            t = [statistics.median(start(step, env) for _ in range(args.reps)) for env in settings.values()]
            print(f"{step:<16}" + "".join(f"{x:>14.2f}s" for x in t) + f"  {t[1] / t[0]:.2f} {t[2] / t[0]:.2f}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak memory of one child: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
