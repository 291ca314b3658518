"""Scale benchmark of the tokenization path: HDF5 -> Parquet (step2 apply) -> pretraining batches.

A base step1 HDF5 file is replicated 1x, 10x, 100x (chunk by chunk, fresh event ids), then for
each size, in a fresh child process each:
  * `step2_tokenize.py apply` turns it into Parquet;
  * the pretraining input pipeline (common.event_data.SequenceStream + whole-object masking, as
    step3 uses it) walks every batch of the Parquet file.
Printed per size: events, wall time, throughput (events/s) and the child's peak RSS (os.wait4
rusage of that child alone), plus the ratios against the 1x run of the same invocation
(the reference): flat memory means a peak-RSS ratio near 1 while the input grows 100x.

    python bench/bench_scale.py --base runs/default/h5/hzz4l.h5 --tokenizers runs/default/tok \
        --base-events 2000 --factors 1,10,100
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from common import h5io  # noqa: E402

BASE = "runs/default/h5/hzz4l.h5"
TOKENIZERS = "runs/default/tok"
BASE_EVENTS = 2000  # rows of the base file used as the 1x input
FACTORS = "1,10,100"
BATCH_SIZE = 256  # pretraining batch size
# Memory is bounded by the chunk / buffer sizes, so they are set below the 10x size: then 10x and
# 100x both hold full chunks and flat memory shows as equal peaks (the steps' defaults are larger).
APPLY_CHUNK_EVENTS = 1024  # step2 apply --chunk-events
SHUFFLE_BUFFER = 2048  # events shuffled together by the batch stream
MASK_PROB = 0.15
CHUNK_EVENTS = 4096  # rows copied at once while replicating
SEED = 1
ID_KEYS = ("atlas/event/event_number", "cms/event/event")  # event ids made fresh in every copy


# --- replicate the base HDF5 --------------------------------------------------------------------

def replicate(base: Path, out: Path, factor: int, base_events: int) -> int:
    """Write `factor` copies of the first `base_events` rows of `base` into `out`, chunk by chunk;
    copy c gets event ids c * n + (0..n-1), so no two events share an id."""
    meta = h5io.read_metadata(base)
    with h5py.File(base, "r") as f:
        keys = []
        f.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset) else None)
        n = min(base_events, f[keys[0]].shape[0])
    keys = [k for k in keys if not k.startswith("metadata")]
    sum_weights = 0.0
    with h5io.H5EventWriter(out, chunk_events=CHUNK_EVENTS) as writer:
        for copy in range(factor):
            for lo, chunk in h5io.iter_chunks(base, keys, step=CHUNK_EVENTS, stop=n):
                for key in ID_KEYS:
                    if key in chunk:
                        chunk[key] = (copy * n + lo + np.arange(len(chunk[key]))).astype(chunk[key].dtype)
                sum_weights += float(chunk["common/event/weight"].sum(dtype=np.float64)) if "common/event/weight" in chunk else 0.0
                writer.append(chunk)
        meta.pop("n_events", None)
        meta["sum_weights"] = sum_weights
        meta["input_file"] = f"{meta.get('input_file', base.name)} x{factor} (bench replica)"
        writer.close(meta)
    return n * factor


# --- children ---------------------------------------------------------------------------------------

def run_child(cmd: list[str], log: Path) -> dict:
    """Run one child; its own wall time and peak RSS (ru_maxrss of this child and its waited-for children)."""
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc {proc.returncode}): {' | '.join(tail)}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def iterate_batches(parquet: str, seed: int) -> None:
    """Child mode: walk every pretraining batch of one Parquet file (reading, shuffling, padding,
    masking) and print the count and the loop time as JSON."""
    from common.event_data import SequenceStream, code_ranges, mask_objects
    from common.token_parquet import read_vocab

    vocab = read_vocab(parquet)
    stream = SequenceStream([parquet], levels=vocab["levels"], batch_size=BATCH_SIZE,
                            shuffle_buffer=SHUFFLE_BUFFER, seed=seed)
    ranges, rng = code_ranges(vocab), np.random.default_rng(seed)
    t0, events, positions = time.perf_counter(), 0, 0
    for batch in stream.batches(epoch=0):
        ids, labels, chosen = mask_objects(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                           ranges, rng, MASK_PROB)
        events += len(ids)
        positions += int(batch["attention_mask"].sum())
    print(json.dumps({"events": events, "positions": positions, "loop_s": time.perf_counter() - t0}))


def bench_size(base: Path, tokenizers: Path, work: Path, factor: int, base_events: int, seed: int) -> dict:
    h5 = work / f"x{factor}" / f"bench_x{factor}.h5"
    t0 = time.perf_counter()
    n = replicate(base, h5, factor, base_events)
    t_rep = time.perf_counter() - t0
    out_dir = work / f"x{factor}" / "tokens"
    apply = run_child([sys.executable, "step2_tokenize.py", "apply", "--h5", str(h5), "--tokenizers", str(tokenizers),
                       "--out-dir", str(out_dir), "--seed", str(seed), "--overwrite",
                       "--chunk-events", str(APPLY_CHUNK_EVENTS)], work / f"apply_x{factor}.log")
    parquet = sorted(out_dir.glob("*.parquet"))
    if len(parquet) != 1:
        raise RuntimeError(f"step2 apply wrote {len(parquet)} Parquet files in {out_dir}, expected 1")
    log = work / f"batches_x{factor}.log"
    batches = run_child([sys.executable, __file__, "--child-batches", str(parquet[0]), "--seed", str(seed)], log)
    inner = json.loads(log.read_text().strip().splitlines()[-1])
    if inner["events"] != n:
        raise RuntimeError(f"batch stream saw {inner['events']} events, the file holds {n}")
    return {"factor": factor, "events": n, "replicate_s": t_rep, "h5_mib": h5.stat().st_size / 2**20,
            "parquet_mib": parquet[0].stat().st_size / 2**20, "apply": apply,
            "batches": {**batches, "loop_s": inner["loop_s"], "positions": inner["positions"]}}


# --- report -----------------------------------------------------------------------------------------

def print_table(results: list[dict]) -> None:
    ref = results[0]
    print(f"\nreference: the x{ref['factor']} run of this invocation ({ref['events']} events)")
    print(f"{'stage':<22}{'events':>10}{'wall s':>9}{'ev/s':>10}{'ev/s vs ref':>12}{'peak RSS MiB':>14}{'RSS vs ref':>11}")
    for stage, key, tkey in (("step2 apply", "apply", "wall_s"), ("pretrain batches", "batches", "loop_s")):
        for r in results:
            t, rss = r[key][tkey], r[key]["peak_rss_mib"]
            rate, ref_rate = r["events"] / t, ref["events"] / ref[key][tkey]
            print(f"{stage + ' x' + str(r['factor']):<22}{r['events']:>10}{t:>9.1f}{rate:>10.0f}"
                  f"{rate / ref_rate:>12.2f}{rss:>14.0f}{rss / ref[key]['peak_rss_mib']:>11.2f}")
    for a, b in zip(results, results[1:]):  # marginal rate between sizes: the start-up cost cancels
        dt = b["apply"]["wall_s"] - a["apply"]["wall_s"]
        rate = f"{(b['events'] - a['events']) / dt:.0f} events/s" if dt > 0 else "n/a (the smaller run took longer)"
        print(f"step2 apply marginal rate x{a['factor']} -> x{b['factor']}: {rate}")
    print("(pretrain batches: time of the batch loop inside the child; step2 apply: the child's whole wall time, "
          "start-up included)")


def machine() -> str:
    import psutil

    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=BASE, help="a step1 HDF5 file")
    p.add_argument("--tokenizers", default=TOKENIZERS, help="step2 fit output folder")
    p.add_argument("--base-events", type=int, default=BASE_EVENTS)
    p.add_argument("--factors", default=FACTORS, help="comma-separated replication factors; the first is the reference")
    p.add_argument("--work-dir", default="", help="where replicas and Parquet go (default: a temporary folder, removed)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--child-batches", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_batches:
        iterate_batches(args.child_batches, args.seed)
        return 0
    base, tok = Path(args.base), Path(args.tokenizers)
    for path, what in ((base, "base HDF5"), (tok, "tokenizer folder")):
        if not path.exists():
            print(f"error: {path}: {what} not found (run run_all.sh first, or pass --base/--tokenizers)", file=sys.stderr)
            return 2
    factors = [int(x) for x in args.factors.split(",")]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}\nbase: {base} (first {args.base_events} events), tokenizers: {tok}, work: {work}")
    results = []
    try:
        for f in factors:
            r = bench_size(base, tok, work, f, args.base_events, args.seed)
            print(f"x{f}: {r['events']} events, replica {r['h5_mib']:.1f} MiB written in {r['replicate_s']:.1f} s, "
                  f"Parquet {r['parquet_mib']:.1f} MiB; apply {r['apply']['wall_s']:.1f} s, "
                  f"{r['apply']['peak_rss_mib']:.0f} MiB; batches {r['batches']['loop_s']:.1f} s, "
                  f"{r['batches']['peak_rss_mib']:.0f} MiB", flush=True)
            results.append(r)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
