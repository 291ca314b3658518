"""Pretraining throughput (step3): events/s and tokens/s of a training epoch run as a child
process (its peak memory from ru_maxrss), against a reference measured in this process: the same
model's forward-only pass over the same batches. With --scales 1,10 the corpus grows and the
peak memory of each child is compared with the first (streaming keeps it flat).

  python bench/bench_pretrain.py                                   # synthetic sample, 4 x 5000 events
  python bench/bench_pretrain.py --parquet runs/default/tokens/*.parquet --h5-dir runs/default/h5
  python bench/bench_pretrain.py --scales 1,10 --max-steps 300     # memory as the corpus grows 10x
  python bench/bench_pretrain.py ... --cpu-ranks 2 --batch-size 32   # also step3 --cpu-ranks 2 (run_all's way)
                                                                   # against one process of 2 threads
The step3 epoch and its reference are repeated (--repeats, one after the other) and the
median is printed with the range of the ratio: on a shared machine one pair can be off by 20%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402, F401  (first: the OpenMP wait policy, before torch loads)
import torch  # noqa: E402

from common import training as T  # noqa: E402
from common.event_data import SequenceStream, open_sequences  # noqa: E402
from common.pair_kinematics import open_kinematics  # noqa: E402
from common.token_parquet import SPLITS  # noqa: E402
from common.transformer import EventTransformer, ModelConfig, codebook_table  # noqa: E402

# runs a command and prints its own peak RSS (kB): each child measured alone, not the largest so far
PEAK_OF_CHILD = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
EVENTS_PER_PROCESS = 5000
BATCH_SIZE = 128
REPEATS = 3


def synthetic(out: Path, n: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from finetune_fixtures import make_sample
    return [str(p) for p in make_sample(out, n=n)["parquet"].values()]


def child_epoch(paths, out, args, threads: int = 1, ranks: int = 1) -> tuple[float, float, float]:
    """(train events/s, peak RSS MB of the largest process, wall s) of one step3 epoch in a child process."""
    cmd = [sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", *paths, "--out-dir", str(out), "--epochs", "1",
           "--batch-size", str(args.batch_size), "--no-plots", "--device", args.device]
    cmd += ["--objective", args.objective] if args.objective else []  # none: step3's default
    cmd += ["--cpu-ranks", str(ranks)] if ranks > 1 else ["--threads", str(threads)]
    cmd += ["--h5-dir", args.h5_dir] if args.h5_dir else []
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    cmd += ["--tokenizers", args.tokenizers] if args.tokenizers else ["--no-code-geometry", "--pair-bias", "0"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"step3 failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    hist = json.loads((Path(out) / "metrics.json").read_text())["history"][0]
    return hist["events_per_s"], int(r.stdout.strip().splitlines()[-1]) / 1024, wall


def reference_model(vocab: dict, tokenizers: str | None, device: str):
    """(model, kinematics decoder or None): step3's default architecture for these token files. With their
    tokenizers that includes the code geometry, the coarsest ids only (step3's default --id-levels) and the
    pair-kinematics bias, as in the child's training."""
    if not tokenizers:
        return EventTransformer(ModelConfig.from_vocab(vocab, pair_bias=0, type_rank=T.TYPE_RANK)).to(device), None
    table = codebook_table(vocab, tokenizers)
    cfg = ModelConfig.from_vocab(vocab, pair_bias=T.PAIR_BIAS, code_dim=table.shape[1], type_rank=T.TYPE_RANK)
    model = EventTransformer(replace(cfg, id_levels=T.id_levels(None, cfg)))
    model.set_code_vectors(table)
    return model.to(device), open_kinematics(vocab, tokenizers, "the pair-kinematics bias")


def forward_seconds(model, kinematics, batches, mode: str) -> float:
    """Seconds of the forward passes alone over batches already read, no gradients; the decoding of the
    pair kinematics is counted, as the model cannot run without it."""
    model.train(mode == "train")

    def forward(raw, b):
        kin = None if kinematics is None else torch.from_numpy(
            kinematics(raw["input_ids"], raw["token_type_ids"])).to(b[0].device)
        model(*b, kinematics=kin)

    device = batches[0][1][0].device
    amp = T.use_amp("auto", device)  # as step3 trains there: bf16 autocast on a GPU
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        forward(*batches[0])  # warm-up: a GPU's first call loads its kernels
        synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # GPU work is asynchronous
        synchronize()
        t0 = time.perf_counter()
        for raw, b in batches:
            forward(raw, b)
        synchronize()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parquet", nargs="*", default=None)
    p.add_argument("--h5-dir", default=None, help="step1 HDF5 of --parquet (the features objective)")
    p.add_argument("--tokenizers", default=None, help="step2 tokenizers of --parquet (code geometry)")
    p.add_argument("--objective", default=None,
                   help="default: step3's own with --tokenizers, else features,event (no codebooks to regress)")
    p.add_argument("--events", type=int, default=EVENTS_PER_PROCESS, help="per process, synthetic sample")
    p.add_argument("--scales", default="1", help="synthetic corpus sizes in units of --events, e.g. 1,10")
    p.add_argument("--max-steps", type=int, default=None, help="cap on the child's training steps")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=REPEATS, help="pairs of (step3 epoch, reference) per corpus")
    p.add_argument("--cpu-ranks", type=int, default=1,
                   help="also time step3 --cpu-ranks N against one process with N threads")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if not (args.objective or args.tokenizers):
        args.objective = "features,event"
    torch.set_num_threads(1)  # one thread for both measurements, so the ratio compares like with like
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, scale in enumerate(int(s) for s in args.scales.split(",")):
            paths = args.parquet or synthetic(Path(tmp) / f"x{scale}", args.events * scale)
            vocab, paths, errors = open_sequences(paths)
            if errors:  # as step3 would: one line per file, no traceback
                sys.exit("\n".join(errors))
            stream = SequenceStream(paths, vocab["levels"], args.batch_size, split=SPLITS["train"])
            batches = list(stream.batches(max_steps=args.max_steps))  # the epoch the child trains on
            n_train = sum(len(b["length"]) for b in batches)
            tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            # reference: the same model, forward only, the same batches, this process; in eval mode (no dropout;
            # torch's fused inference kernel where there is no pair bias) and in train mode (a training step's kernels)
            model, kinematics = reference_model(vocab, args.tokenizers, args.device)
            on_device = [(b, T.to_device(b, args.device)) for b in batches]
            runs = []  # (train events/s, {mode: forward events/s}, peak MB)
            for r in range(args.repeats):
                train_eps, peak_mb, _ = child_epoch(paths, Path(tmp) / f"pre{k}_{r}", args)
                fwd = {mode: n_train / forward_seconds(model, kinematics, on_device, mode) for mode in ("eval", "train")}
                runs.append((train_eps, fwd, peak_mb))
            rows.append((scale, n_train, tokens / n_train, runs))
        if args.cpu_ranks > 1:  # on the last corpus: N ranks of one thread against one process of N threads
            one = child_epoch(paths, Path(tmp) / "one", args, threads=args.cpu_ranks)
            ranks = child_epoch(paths, Path(tmp) / "ranks", args, ranks=args.cpu_ranks)
    print(f"device {args.device}, 1 torch thread, objective {args.objective or 'that of step3'}, batch {args.batch_size}, "
          f"pair bias {T.PAIR_BIAS if args.tokenizers else 0}")
    print(f"medians of {args.repeats} repeats; the ratio's range over the repeats in brackets")
    print("| corpus | train events read | mean length | step3 train events/s | tokens/s | forward-only events/s, eval "
          "/ train mode | train / forward, eval / train mode | peak RSS (MB) | peak / first |")
    print("|---|---|---|---|---|---|---|---|---|")
    first_peak = statistics.median(peak for *_, peak in rows[0][3])
    for scale, n, length, runs in rows:
        tr = statistics.median(r[0] for r in runs)
        fw = {m: statistics.median(r[1][m] for r in runs) for m in ("eval", "train")}
        ratio = {m: [r[0] / r[1][m] for r in runs] for m in ("eval", "train")}
        span = {m: f"{statistics.median(v):.2f} [{min(v):.2f}, {max(v):.2f}]" for m, v in ratio.items()}
        peak = statistics.median(r[2] for r in runs)
        print(f"| {scale}x | {n} | {length:.1f} | {tr:.0f} | {tr * length:.0f} | {fw['eval']:.0f} / {fw['train']:.0f} | "
              f"{span['eval']} / {span['train']} | {peak:.0f} | {peak / first_peak:.2f} |")
    if args.cpu_ranks > 1:
        n = args.cpu_ranks
        print(f"step3 --cpu-ranks {n}: {ranks[0]:.0f} events/s, epoch {ranks[2]:.1f} s wall with start-up, peak RSS "
              f"{ranks[1]:.0f} MB (the largest process); one process of {n} threads: {one[0]:.0f} events/s, "
              f"{one[2]:.1f} s, {one[1]:.0f} MB; ratio {ranks[0] / one[0]:.2f} (events/s), {one[2] / ranks[2]:.2f} (wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
