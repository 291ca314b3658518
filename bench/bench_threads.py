"""Threads on a shared machine. Two workloads, each timed in a fresh child process (OpenMP reads its
settings when it loads):
  train   a step3 training loop: the event transformer with the masked-token head, AdamW, masking of
          object positions, on token Parquet files written by the real writers (tests/finetune_fixtures.py)
  search  the compiled nearest-code search of step2 (common/code_search.py, numba)
with these thread settings:
  default      --threads 0 (the usable CPUs), OMP_WAIT_POLICY=PASSIVE (what env.sh and `import common` set)
  threads=1    --threads 1
  active       --threads 0, OMP_WAIT_POLICY=ACTIVE (idle threads spin)
  before       --threads 0, OMP_WAIT_POLICY unset (libgomp spins a while, then sleeps): the runs before
under a bounded competing load (one 2-thread torch job and one busy Python process, both stopping by
themselves after --load-seconds) and on the machine as it is. Prints the median times and the ratios
to threads=1, and the load average seen.

  python bench/bench_threads.py                  # about 5 minutes on 2 cores
  python bench/bench_threads.py --reps 3 --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"default": (0, "PASSIVE"), "threads=1": (1, "PASSIVE"), "active": (0, "ACTIVE"), "before": (0, None)}
LOAD_SECONDS = 120


# --- children ---------------------------------------------------------------------------------------
def child_train(args) -> float:
    import numpy as np
    import torch

    from common.event_data import SequenceStream, code_ranges, mask_objects, open_sequences
    from common.token_parquet import SPLITS, legal_id_mask
    from common.transformer import EventTransformer, MaskedTokenHead, MaskedTokenModel, ModelConfig

    torch.manual_seed(0)
    vocab, paths, _ = open_sequences([str(p) for p in Path(args.data).glob("*.parquet")])
    stream = SequenceStream(paths, vocab["levels"], 128, split=SPLITS["train"])
    cfg = ModelConfig.from_vocab(vocab)
    model = MaskedTokenModel(EventTransformer(cfg), MaskedTokenHead(cfg, legal_id_mask(vocab)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ranges, rng = code_ranges(vocab), np.random.default_rng(0)
    batches = [b for _, b in zip(range(args.steps + 2), stream.batches())]
    t0 = None
    for i, batch in enumerate(batches):
        if i == 2:  # after the first steps (allocations, thread start-up)
            t0 = time.perf_counter()
        ids, labels, chosen = mask_objects(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                           ranges, rng, 0.15)
        b_chosen = torch.from_numpy(chosen)
        b_labels = torch.from_numpy(labels).long()[b_chosen]
        loss, _ = model(torch.from_numpy(ids).long(), torch.from_numpy(batch["token_type_ids"]).long(),
                        torch.from_numpy(batch["attention_mask"]), b_chosen, b_labels)
        valid = b_labels != -100  # as step3: levels not predicted do not count
        loss = (loss * valid).sum() / valid.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def child_search(args) -> float:
    import numpy as np

    from common.code_search import nearest_codes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 8)).astype(np.float32)
    codebook = rng.normal(size=(4096, 8)).astype(np.float32)
    nearest_codes(x[:1000], codebook)  # compiled (cached on disk after the first run)
    t0 = time.perf_counter()
    for _ in range(max(1, args.steps // 4)):
        nearest_codes(x, codebook)
    return time.perf_counter() - t0


def child(args) -> None:
    import common  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE unless it is set)

    if args.policy == "unset":  # what a run got before: libgomp's default
        os.environ.pop("OMP_WAIT_POLICY", None)
    from common.runtime import set_threads

    n = set_threads(args.threads)
    seconds = {"train": child_train, "search": child_search}[args.child](args)
    print(json.dumps({"seconds": seconds, "threads": n}))


def load(kind: str, seconds: float) -> None:
    """A competing job that stops by itself."""
    end = time.time() + seconds
    if kind == "torch":
        import torch

        torch.set_num_threads(2)
        a = torch.randn(384, 384)
        while time.time() < end:
            a = torch.tanh(a @ a)
    else:
        x = 0
        while time.time() < end:
            x += 1


# --- parent ---------------------------------------------------------------------------------------------
def measure(workload: str, config: str, data: Path, steps: int, loaded: bool, load_seconds: float) -> dict:
    threads, policy = CONFIGS[config]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    loads = []
    if loaded:
        load_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # another user's job
        loads = [subprocess.Popen([sys.executable, __file__, "--load", kind, "--load-seconds", str(load_seconds)],
                                  env={**load_env, "PYTHONPATH": str(ROOT)}) for kind in ("torch", "busy")]
        time.sleep(1.0)
    try:
        r = subprocess.run([sys.executable, __file__, "--child", workload, "--threads", str(threads), "--steps", str(steps),
                            "--data", str(data), "--policy", policy or "unset"], env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        for p in loads:
            p.terminate()
            p.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="training steps timed (search: steps/4 passes)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of each measurement (median reported)")
    p.add_argument("--load-seconds", type=float, default=LOAD_SECONDS, help="the competing jobs stop after this")
    p.add_argument("--workloads", default="train,search")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"some of {', '.join(CONFIGS)}")
    p.add_argument("--child", choices=("train", "search"), help=argparse.SUPPRESS)
    p.add_argument("--load", choices=("torch", "busy"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--policy", default="unset", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.load:
        load(args.load, args.load_seconds)
        return 0
    if args.child:
        child(args)
        return 0

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from common.runtime import usable_cpus
    from finetune_fixtures import make_sample

    workloads, configs = args.workloads.split(","), args.configs.split(",")
    print(f"usable CPUs {usable_cpus()}, os.cpu_count {os.cpu_count()}, load average at start "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    times: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(make_sample(Path(tmp), n=1500)["parquet"]["hzz4l"]).parent
        for rep in range(args.reps):
            for loaded in (True, False):
                for workload in workloads:
                    for config in configs[rep % len(configs):] + configs[: rep % len(configs)]:  # rotated: drifts cancel
                        r = measure(workload, config, data, args.steps, loaded, args.load_seconds)
                        times.setdefault((loaded, workload, config), []).append(r["seconds"])
                        print(f"  {'load' if loaded else 'as is'} {workload:6s} {config:11s} {r['threads']} threads "
                              f"{r['seconds']:7.2f} s  (load average {os.getloadavg()[0]:.2f})", flush=True)
    print(f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ratios = [(a, b) for a, b in (("default", "threads=1"), ("active", "threads=1"), ("before", "threads=1"),
                                  ("default", "before")) if a in configs and b in configs]
    print("\n| machine | workload | " + " | ".join(configs) + "".join(f" | {a} / {b}" for a, b in ratios) + " |")
    print("|---|---|" + "---|" * (len(configs) + len(ratios)))
    for loaded in (True, False):
        for workload in workloads:
            med = {c: statistics.median(times[(loaded, workload, c)]) for c in configs}
            print(f"| {'+ 2-thread torch job + busy process' if loaded else 'as is'} | {workload} | "
                  + " | ".join(f"{med[c]:.2f} s" for c in configs) + "".join(f" | {med[a] / med[b]:.2f}" for a, b in ratios) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
