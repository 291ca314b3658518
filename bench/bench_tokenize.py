"""Benchmark of step2 at the production preset's codebooks (dim 8, 4 levels, 4096 codes):

  1. nearest-code search: the quantizer's residual search with the compiled exact search
     (common/code_search.py) and with the torch |C|^2 - 2 x.C^T matmul + argmin, vs
     vector-quantize-pytorch's ResidualVQ in eval mode on the same vectors (skipped cleanly when
     the package is absent);
  2. apply throughput in objects/s: encode + quantise + sequence building + Parquet writing
     (step2_apply.main, in process) on synthetic step1 files, with the compiled search, at
     the production preset (tracks 8192 codes) and with 4096 codes for every type; and on the small
     file with the matmul search too (the reference: the speed-up measured under the same load);
     where torch sees a GPU, also with encoder and search on it;
  3. peak memory (ru_maxrss of a child `step2_apply.py`) as the input grows 10x;
  4. fit throughput (training objects/s of the VQ-VAE at batch 4096);
  5. apply throughput of each quantizer kind of --quantizer (default vq,fsq,rfsq) on the big file,
     every type with the same kind at about the production preset's size: vq 4 levels x 4096 codes,
     rfsq 4 levels x 7x5x5x5x5 = 4375 codes, fsq one level of 8x8x8x5x5x5 = 64000 codes.

  python bench/bench_tokenize.py [--events 5000] [--scale 10] [--threads 2] [--quantizer vq,fsq,rfsq]

The tokenizers here have production shapes but are not trained to convergence (preprocessing
fitted, codebooks from encoded samples; FSQ projections as initialised): the cost of encoding
does not depend on the training.
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import step2_apply  # noqa: E402
import common.tokenizer as tokenizer  # noqa: E402
from common import object_stream, runtime, sequences, token_parquet  # noqa: E402
from common.schema import SEQUENCE_OBJECTS, TOKENIZED_OBJECTS  # noqa: E402
from common.tokenizer import ResidualEMAQuantizer, Tokenizer, build_specs, fit_preprocessing, nearest_code  # noqa: E402
from common.tokenizer_training import KMEANS_FACTOR, init_codebooks, train  # noqa: E402
from test_tokenize import write_synthetic_h5  # noqa: E402

EVENTS = 5000
SCALE = 10
DIM, LEVELS, CODES, CODES_TRACKS = 8, 4, 4096, 8192
KINDS = {"vq": (LEVELS, CODES), "rfsq": (LEVELS, 4096), "fsq": (1, 65536)}  # quantizer kind: levels, size (its rule's)
REPEATS = 3  # apply runs per setting: the median is quoted (a shared virtual machine is noisy)
MEMORY_CHUNK_EVENTS = 1024  # both inputs span many chunks, so the comparison shows the streaming
OUT = ROOT / "bench" / "out" / "tokenize"


def make_tokenizers(h5: Path, out_dir: Path, seed: int, codes_tracks: int, kind: str = "vq") -> None:
    """Production-shaped tokenizers: preprocessing fitted on the file, codebooks = encoded samples
    (vq), or an FSQ kind at KINDS' size."""
    info = object_stream.describe_file(str(h5))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for obj in TOKENIZED_OBJECTS:
        features = object_stream.common_features(obj, [info])
        specs = build_specs(features)
        sample = object_stream.preprocessing_sample(obj, [f.name for f in features], [info], 10**9, rng)
        fit_preprocessing(specs, sample)
        k = codes_tracks if obj == "tracks" else CODES
        settings = {"dim": DIM, "levels": LEVELS, "codebook_size": k, "hidden": 128, "depth": 2, "decay": 0.99,
                    "cosine": False, "dead_fraction": 0.03}
        if kind != "vq":
            levels, size = KINDS[kind]
            fsq = tokenizer.fsq_levels_for(size)
            settings.update(levels=levels, codebook_size=math.prod(fsq), quantizer=kind, fsq_levels=fsq)
        tok = Tokenizer(obj, specs, settings)
        if kind != "vq":
            tok.save(out_dir / f"{obj}.pt", {"bench": True})
            continue
        with torch.no_grad():
            z = tok.model.encoder(torch.from_numpy(tok.preprocess(sample)))
            tok.model.quantizer.codebooks.copy_(sample_codebooks(z, k))
        tok.save(out_dir / f"{obj}.pt", {"bench": True})


def count_objects(h5: Path, vocab: dict) -> int:
    """Objects that apply tokenizes: those in the sequences after the caps and max length its
    vocabulary records (apply encodes no others), plus one MET per event."""
    with h5py.File(h5) as f:
        n = {o: f[f"common/{o}/n"][:] for o in SEQUENCE_OBJECTS}
        n_events = f["common/met/pt"].shape[0]
    kept = sequences.kept_counts(n, vocab["caps"], vocab["max_length"])
    return int(kept.sum()) + n_events


def sample_codebooks(z: torch.Tensor, k: int) -> torch.Tensor:
    """Codebooks level by level from this level's residuals: codes at the scale of each level's
    residuals, as data-initialised k-means/EMA training leaves them."""
    cbs, r = [], z
    for _ in range(LEVELS):
        cb = r[torch.randint(len(r), (k,))] + 0.01 * r.std(0) * torch.randn(k, DIM)
        cbs.append(cb)
        r = r - cb[nearest_code(r, cb, (cb * cb).sum(1))]
    return torch.stack(cbs)


def bench_search(threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    n = 100_000
    z = torch.randn(n, DIM)
    q = ResidualEMAQuantizer(LEVELS, CODES, DIM)
    q.codebooks.copy_(sample_codebooks(z[:50_000], CODES))
    rate, codes = {}, {}
    with torch.inference_mode():
        for compiled in (False, True):
            tokenizer.COMPILED_SEARCH_ON_CPU = compiled
            q.quantize(z[:100])  # the first compiled call loads numba's cache
            t = time.perf_counter()
            codes[compiled] = q.quantize(z)[1]
            rate[compiled] = n / (time.perf_counter() - t)
    agree = float((codes[True] == codes[False]).all(1).float().mean())
    res = {"ours_objects_per_s": rate[True], "matmul_objects_per_s": rate[False], "agree": agree}
    try:
        from vector_quantize_pytorch import ResidualVQ
    except ImportError:
        print("[bench] vector-quantize-pytorch not installed: reference skipped")
        return res
    rvq = ResidualVQ(dim=DIM, num_quantizers=LEVELS, codebook_size=CODES).eval()
    m = 20_000  # it is slow: a smaller sample gives the same rate
    with torch.inference_mode():
        rvq(z[:1000].unsqueeze(0))
        t = time.perf_counter()
        for i in range(0, m, 5000):
            rvq(z[i : i + 5000].unsqueeze(0))
        ref = m / (time.perf_counter() - t)
    res.update(reference_objects_per_s=ref, ratio=rate[True] / ref)
    return res


def bench_apply(h5: Path, tok_dir: Path, out_dir: Path, threads: int, compiled: bool = True, repeats: int = 1,
                device: str = "cpu") -> dict:
    """Median over `repeats` runs of step2_apply.main, in process."""
    tokenizer.COMPILED_SEARCH_ON_CPU = compiled
    argv = ["--h5", str(h5), "--tokenizers", str(tok_dir), "--out-dir", str(out_dir), "--overwrite",
            "--threads", str(threads), "--device", device]
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        if step2_apply.main(argv) != 0:
            raise RuntimeError(f"step2_apply.py {' '.join(argv)} failed")
        seconds.append(time.perf_counter() - t)
    n = count_objects(h5, token_parquet.read_vocab(out_dir / f"{h5.stem}.parquet"))
    rates = sorted(n / dt for dt in seconds)
    return {"objects": n, "seconds": float(np.median(seconds)), "objects_per_s": float(np.median(rates)),
            "range": (rates[0], rates[-1])}


def child_peak_rss_mb(h5: Path, tok_dir: Path, out_dir: Path, threads: int) -> float:
    """Peak RSS of a fresh `step2_apply.py` process (ru_maxrss of the waited child), with
    chunks smaller than both inputs: memory must not follow the number of events."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", code, sys.executable, str(ROOT / "step2_apply.py"), "--h5", str(h5),
           "--tokenizers", str(tok_dir), "--out-dir", str(out_dir), "--overwrite", "--threads", str(threads),
           "--chunk-events", str(MEMORY_CHUNK_EVENTS)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def bench_fit(h5: Path, threads: int, steps: int = 40) -> dict:
    """Training objects/s of the jets VQ-VAE at batch 4096, 4096 codes (after the k-means init)."""
    torch.set_num_threads(threads)
    info = object_stream.describe_file(str(h5))
    batch_size = 4096
    features = object_stream.common_features("jets", [info])
    names = [f.name for f in features]
    specs = build_specs(features)
    rng = np.random.default_rng(1)
    fit_preprocessing(specs, object_stream.preprocessing_sample("jets", names, [info], 10**9, rng))
    tok = Tokenizer("jets", specs, {"dim": DIM, "levels": LEVELS, "codebook_size": CODES, "hidden": 128, "depth": 2,
                                    "decay": 0.99, "cosine": False, "dead_fraction": 0.03})
    tok.model.train()
    stream = lambda: object_stream.stream_objects("jets", names, [info], split="train", rng=rng)  # noqa: E731
    batches = object_stream.minibatches(stream, specs, tok.d_in, batch_size, rng)
    t = time.perf_counter()
    init_codebooks(tok.model, batches, CODES * KMEANS_FACTOR, 1)
    t_init = time.perf_counter() - t
    hist = train(tok.model, specs, batches, steps=steps, warmup_steps=0, batch_size=batch_size, lr=1e-3,
                 commit_weight=0.25, discrete_weight=10.0, seed=1, label="bench-jets")
    return {"kmeans_init_seconds": t_init, "train_objects_per_s": hist[-1]["objects_per_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=EVENTS)
    p.add_argument("--scale", type=int, default=SCALE)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--quantizer", default="vq,fsq,rfsq", help="quantizer kinds whose apply speed is compared ('': none)")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    small, big = OUT / "small.h5", OUT / "big.h5"
    if not small.exists():
        write_synthetic_h5(small, args.events, seed=11)
    if not big.exists():
        write_synthetic_h5(big, args.events * args.scale, seed=12)
    tok_dir, tok4096 = OUT / "tok", OUT / "tok4096"
    make_tokenizers(small, tok_dir, 1, CODES_TRACKS)  # cheap; always current with this script
    make_tokenizers(small, tok4096, 1, CODES)

    s = bench_search(args.threads)
    print(f"[bench] load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    line = (f"[bench] nearest-code search, {LEVELS} levels x {CODES} codes, dim {DIM}: compiled {s['ours_objects_per_s']:,.0f} obj/s "
            f"(same codes as the matmul on {s['agree']:.6f} of vectors); "
            f"matmul {s['matmul_objects_per_s']:,.0f} obj/s")
    if "reference_objects_per_s" in s:
        line += f"; vector-quantize-pytorch ResidualVQ (eval) {s['reference_objects_per_s']:,.0f} obj/s; ratio {s['ratio']:.1f}x"
    print(line)
    ref = bench_apply(small, tok_dir, OUT / "tokens", args.threads, compiled=False)
    print(f"[bench] apply small, matmul search (reference): {ref['objects']:,} objects in {ref['seconds']:.1f} s -> "
          f"{ref['objects_per_s']:,.0f} obj/s")
    runtime.bound_heap_growth()  # as the step2 scripts do (after the reference: it slows the matmul's temporaries)
    runs = (("small", small, tok_dir, f"tracks {CODES_TRACKS} codes"), ("big", big, tok_dir, f"tracks {CODES_TRACKS} codes"),
            ("big", big, tok4096, f"all types {CODES} codes"))
    for name, h5, toks, setting in runs:
        a = bench_apply(h5, toks, OUT / "tokens", args.threads, repeats=REPEATS)
        print(f"[bench] apply {name} ({setting}): {a['objects']:,} objects in {a['seconds']:.1f} s -> "
              f"{a['objects_per_s']:,.0f} obj/s, median of {REPEATS} (range {a['range'][0]:,.0f}-{a['range'][1]:,.0f}; "
              f"encode+quantise+sequences+Parquet; goal 200,000)"
              + (f"; {a['objects_per_s'] / ref['objects_per_s']:.1f}x the matmul search" if name == "small" else ""))
    if torch.cuda.is_available():  # a GPU node: the same apply with encoder and matmul search on the GPU
        a = bench_apply(big, tok4096, OUT / "tokens", args.threads, repeats=REPEATS, device="cuda")
        print(f"[bench] apply big on {torch.cuda.get_device_name()} (all types {CODES} codes): {a['objects']:,} objects "
              f"in {a['seconds']:.1f} s -> {a['objects_per_s']:,.0f} obj/s, median of {REPEATS}")
    for kind in [k for k in args.quantizer.split(",") if k]:  # the quantizer kinds side by side
        toks = tok4096 if kind == "vq" else OUT / f"tok_{kind}"
        if kind != "vq":
            make_tokenizers(small, toks, 1, CODES, kind)
        a = bench_apply(big, toks, OUT / "tokens", args.threads, repeats=REPEATS)
        levels, size = KINDS[kind]
        codes = size if kind == "vq" else math.prod(tokenizer.fsq_levels_for(size))
        print(f"[bench] apply big, quantizer {kind} ({levels} level(s) x {codes} codes, every type): {a['objects']:,} "
              f"objects in {a['seconds']:.1f} s -> {a['objects_per_s']:,.0f} obj/s, median of {REPEATS}")
    print(f"[bench] load average at end {os.getloadavg()[0]:.2f}")
    rss = {name: child_peak_rss_mb(h5, tok_dir, OUT / "tokens", args.threads) for name, h5 in (("small", small), ("big", big))}
    print(f"[bench] apply peak RSS (--chunk-events {MEMORY_CHUNK_EVENTS}): {rss['small']:.0f} MB ({args.events} events) -> {rss['big']:.0f} MB "
          f"({args.events * args.scale} events), ratio {rss['big'] / rss['small']:.2f} for {args.scale}x input")
    if not args.skip_fit:
        f = bench_fit(big, 1)
        print(f"[bench] fit jets (batch 4096, {CODES} codes, {LEVELS} levels, 1 thread): {f['train_objects_per_s']:,.0f} "
              f"objects/s; k-means init on {CODES * KMEANS_FACTOR:,} vectors {f['kmeans_init_seconds']:.1f} s")
    print(f"[bench] self-peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
