"""Pretraining throughput (step3): events/s and tokens/s of a full training epoch run as a child
process (its peak memory from ru_maxrss), against a reference measured in this process: the same
model's forward-only pass over the same batches.

  python bench/bench_pretrain.py                                   # synthetic sample, 4 x 5000 events
  python bench/bench_pretrain.py --parquet runs/default/tokens/*.parquet
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common.event_data import SequenceStream, open_sequences  # noqa: E402
from common.token_parquet import SPLITS  # noqa: E402
from common.transformer import EventTransformer, ModelConfig  # noqa: E402

EVENTS_PER_PROCESS = 5000
BATCH_SIZE = 128


def synthetic(out: Path, n: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from finetune_fixtures import make_sample
    return [str(p) for p in make_sample(out, n=n)["parquet"].values()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parquet", nargs="*", default=None)
    p.add_argument("--events", type=int, default=EVENTS_PER_PROCESS, help="per process, synthetic sample")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread for both measurements, so the ratio compares like with like
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.parquet or synthetic(Path(tmp), args.events)
        vocab, paths, _ = open_sequences(paths)
        stream = SequenceStream(paths, vocab["levels"], args.batch_size, split=SPLITS["train"])
        n_train = stream.count()
        tokens = sum(int(b["attention_mask"].sum()) for b in stream.batches())

        # 1. step3 itself, one epoch, in a child process
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "step3_pretrain.py"), "--parquet", *paths, "--out-dir",
                            f"{tmp}/pre", "--epochs", "1", "--batch-size", str(args.batch_size), "--no-plots",
                            "--device", args.device], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        hist = json.loads(Path(f"{tmp}/pre/metrics.json").read_text())["history"][0]
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        train_eps = hist["events_per_s"]

        # 2. reference: the same (default-size) model, forward only, same batches, this process
        model = EventTransformer(ModelConfig.from_vocab(vocab)).to(args.device).eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in stream.batches():
                model(*(torch.from_numpy(b[k]).to(args.device) for k in ("input_ids", "token_type_ids", "attention_mask")))
        fwd_eps = n_train / (time.perf_counter() - t0)
    mean_len = tokens / n_train
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {n_train} train events, mean length {mean_len:.1f}")
    print("| measurement | events/s | tokens/s | peak RSS (MB) |")
    print("|---|---|---|---|")
    print(f"| step3 train epoch (fwd+bwd, masking, streaming) | {train_eps:.0f} | {train_eps * mean_len:.0f} | {peak_mb:.0f} |")
    print(f"| reference: same model forward only | {fwd_eps:.0f} | {fwd_eps * mean_len:.0f} | - |")
    print(f"ratio train / forward-only: {train_eps / fwd_eps:.2f}; child wall time {wall:.1f} s (incl. start-up, validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
