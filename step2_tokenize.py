"""Step 2: object tokenizers (fit) and event token sequences (apply).

  python step2_tokenize.py fit   --h5 data/h5/*.h5 --out-dir runs/tok            # one tokenizer per object
  python step2_tokenize.py fit   --h5 data/h5/*.h5 --out-dir runs/tok --preset production [--device cuda]
  python step2_tokenize.py apply --h5 data/h5/*.h5 --tokenizers runs/tok --out-dir data/tokens [--shard K/N]

fit: for every object type a residual EMA VQ-VAE (common/tokenizer.py) on the schema's
tokenize=True features present in all inputs. Preprocessing is fitted on a bounded sample of
events drawn uniformly from all inputs; training streams minibatches from the HDF5 files
(memory does not grow with the number of events); the quality is measured on held-out events
(the `test` split of common/token_parquet.split_of) and written to <obj>.json.
Under torchrun the model is DistributedDataParallel and the codebook statistics are all-reduced.
The fit runs on the CPU unless --device says otherwise; apply uses a GPU when there is one.

apply: one Parquet per HDF5 (common/token_parquet.py) with the sequences of common/sequences.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common import distributed as D
from common import h5io, runtime, sequences, token_parquet
from common.schema import OBJECTS, SEQUENCE_OBJECTS, TOKENIZED_OBJECTS, TYPE_IDS
from common.tokenizer import (COMBINED, TYPE_FEATURE, Tokenizer, VQAutoencoder, build_specs, combined_specs,
                              fit_preprocessing, load_tokenizer, perplexity, preprocess, reconstruction_loss,
                              usable_features)

# --- fit defaults (quick: the run_all sample); `--preset production` is the seeds' setting ---
DIM = 8
LEVELS = "auto"  # auto: AUTO_MIN_LEVELS, more where few objects cap the codebook (AUTO_BITS per object)
AUTO_MIN_LEVELS = 4
AUTO_BITS = 32  # levels x log2(codes): taus (64 codes) get 6 levels, pT 2.3-2.7% -> 1.5-1.6%
CODEBOOK_SIZE = "auto"  # auto: a power of two near (training objects / AUTO_OBJECTS_PER_CODE)
AUTO_OBJECTS_PER_CODE = 32  # 64 left e, mu, jet pT at 2.3-2.4%, 128 at 4-8%: each doubling buys ~30%
AUTO_MIN_CODES, AUTO_MAX_CODES = 64, 2048  # 16 tau codes could not hold pT; 4096 track codes cost 2x fit time
HIDDEN = 128
DEPTH = 2
DECAY = 0.99
DEAD_FRACTION = 0.1  # a code is dead with fewer hits than this x the mean hits per code in a window
#                      (0.03 left rare codes alive: 90% of muon codes used on held-out events, 0.1: 94%)
RESET_WINDOW_HITS = 32  # reset window: mean hits per code it must hold (so "dead" is not noise)
BATCH_SIZE = 256  # with STEPS: the objects of 800 steps x 1024, with 4x the codebook updates
#                   (run_all sample, pT resolution: e, mu, photons, jets, tracks 1.2-1.9% -> 0.8-1.6%, taus 3.5% -> 2.3%)
STEPS = 3200
WARMUP_STEPS = 100  # plain autoencoder steps before k-means initialises the codebooks
LR = 3e-3
COMMIT_WEIGHT = 0.25
DISCRETE_WEIGHT = 10.0  # loss weight of flags and categories: they must come back exactly
PT_WEIGHT = 10.0  # loss weight of pT (and MET sumet): the code bits go to pT (30 broke b-tag and tau phi)
KMEANS_FACTOR = 10  # k-means buffer: at least this x codebook size vectors
KMEANS_ITERS = 15
PREPROCESS_EVENTS = 200_000  # bound of the preprocessing sample
EVAL_OBJECTS = 200_000  # bound of the held-out quality sample
CHUNK_EVENTS = 8192
SEED = 1
CACHE_BYTES = 256 << 20  # a preprocessed training set up to this size is kept in memory after the first pass
FIT_THREADS = 1  # the MLPs are small: one thread per process beats two contending ones
FIT_DEVICE = "cpu"  # cuda: for the production preset's long fits (GPU sums are not bitwise reproducible)
PRESETS = {
    "production": {"dim": 8, "levels": 4, "codebook_size": "4096", "codebook_size_tracks": 8192,
                   "batch_size": 8192, "steps": 20000, "warmup_steps": 1000},
}
# --- apply defaults ---
MAX_LENGTH = 128
APPLY_CHUNK_EVENTS = 8192
APPLY_DEVICE = "auto"  # auto: a GPU when there is one (matmul search), else the compiled CPU search

PT_BINS = (0, 10, 20, 30, 50, 75, 100, 150, 250, 500, np.inf)  # GeV, truth-pT bins of the resolution
BTAG_FC = {"DL1d": 0.018, "GN2": 0.2}  # charm fraction of the b-tag discriminant
BTAG_PASS_FRACTIONS = (0.05, 0.10, 0.20, 0.40)  # fixed cuts: where these fractions of fit jets pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help="fit one tokenizer per object type")
    f.add_argument("--h5", nargs="+", required=True, help="step1 HDF5 files (or directories)")
    f.add_argument("--out-dir", required=True)
    f.add_argument("--objects", default=",".join(TOKENIZED_OBJECTS), help="comma list of object types")
    f.add_argument("--mode", choices=("per-object", "combined"), default="per-object")
    f.add_argument("--preset", choices=tuple(PRESETS), default=None, help="production: dim 8, 4 levels, 4096 codes (8192 tracks)")
    f.add_argument("--dim", type=int, default=DIM)
    f.add_argument("--levels", default=LEVELS, help="1-8 or 'auto'")
    f.add_argument("--codebook-size", default=CODEBOOK_SIZE, help="int or 'auto'")
    f.add_argument("--hidden", type=int, default=HIDDEN)
    f.add_argument("--depth", type=int, default=DEPTH)
    f.add_argument("--decay", type=float, default=DECAY, help="EMA decay of the codebooks")
    f.add_argument("--cosine", action="store_true", help="cosine-similarity code search")
    f.add_argument("--dead-fraction", type=float, default=DEAD_FRACTION)
    f.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    f.add_argument("--steps", type=int, default=STEPS)
    f.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS)
    f.add_argument("--lr", type=float, default=LR)
    f.add_argument("--commit-weight", type=float, default=COMMIT_WEIGHT)
    f.add_argument("--discrete-weight", type=float, default=DISCRETE_WEIGHT, help="loss weight of flags/categories")
    f.add_argument("--pt-weight", type=float, default=PT_WEIGHT, help="loss weight of pT (and MET sumet)")
    f.add_argument("--transform", action="append", default=[], metavar="OBJ.FEATURE=T",
                   help="override a continuous feature's transform (quantile, log_standard, standard)")
    f.add_argument("--preprocess-events", type=int, default=PREPROCESS_EVENTS)
    f.add_argument("--eval-objects", type=int, default=EVAL_OBJECTS)
    f.add_argument("--seed", type=int, default=SEED)
    f.add_argument("--threads", type=int, default=FIT_THREADS, help="torch threads per process")
    f.add_argument("--device", default=FIT_DEVICE, help="cpu | cuda | auto (one GPU per torchrun rank)")
    f.add_argument("--no-plots", action="store_true")
    f.add_argument("--overwrite", action="store_true")
    a = sub.add_parser("apply", help="HDF5 -> Parquet event token sequences")
    a.add_argument("--h5", nargs="+", required=True)
    a.add_argument("--tokenizers", required=True, help="directory written by fit")
    a.add_argument("--out-dir", required=True)
    a.add_argument("--max-length", type=int, default=MAX_LENGTH)
    a.add_argument("--cap", action="append", default=[], metavar="OBJ=N", help="per-type cap, e.g. tracks=50")
    a.add_argument("--chunk-events", type=int, default=APPLY_CHUNK_EVENTS)
    a.add_argument("--shard", default=None, help="K/N: this job's share of the inputs")
    a.add_argument("--seed", type=int, default=SEED)
    a.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    a.add_argument("--device", default=APPLY_DEVICE, help="auto | cpu | cuda: where encoding and code search run")
    a.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.command == "fit" and args.preset:  # the preset replaces the defaults; flags given still win
        f.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


# ==============================================================================================
# Inputs
# ==============================================================================================


def describe_file(path: str) -> dict:
    """Experiment, missing features, datasets and event count of a step1 file (one clear error)."""
    try:
        meta = h5io.read_metadata(path)
        with h5py.File(path, "r") as f:
            present = set()
            f.visit(lambda name: present.add(name) if isinstance(f[name], h5py.Dataset) else None)
    except (OSError, ValueError) as exc:
        raise runtime.InputError(f"cannot read as a step1 HDF5 file ({exc})") from None
    missing = meta.get("missing_features") or []
    if isinstance(missing, str):
        missing = [m for m in missing.replace(",", " ").split() if m]
    return {"path": path, "meta": meta, "experiment": str(meta.get("experiment", "atlas")).lower(),
            "present": present, "missing": set(missing), "n_events": int(meta.get("n_events", 0))}


def heldout(path: str, first: int, n: int) -> np.ndarray:
    """Events of the `test` split: never used to fit, only to measure the quality."""
    return token_parquet.split_of(Path(path).name, np.arange(first, first + n)) == token_parquet.SPLITS["test"]


def object_keys(obj: str, features: list[str], info: dict) -> dict[str, str]:
    """{feature name: dataset path} for `obj` in this file (+ mask for list objects)."""
    keys = {}
    for f in OBJECTS[obj].features:
        if f.name in features and f.group in ("common", info["experiment"]):
            keys[f.name] = f"{f.group}/{obj}/{f.name}"
    if not OBJECTS[obj].per_event:
        keys["__mask__"] = f"common/{obj}/mask"
    return keys


def flatten_objects(obj: str, keys: dict[str, str], arrays: dict[str, np.ndarray], events: np.ndarray,
                    mask: np.ndarray | None = None) -> dict:
    """Chunk arrays -> {feature: 1-D over the stored objects of the selected events} (row-major);
    `mask` (events x slots) selects fewer objects than the stored ones."""
    if OBJECTS[obj].per_event:
        return {name: arrays[k][events] for name, k in keys.items()}
    mask = arrays[keys["__mask__"]][events].astype(bool) if mask is None else mask
    return {name: arrays[k][events][mask] for name, k in keys.items() if name != "__mask__"}


def stream_objects(obj: str, features: list[str], infos: list[dict], *, split: str, rng: np.random.Generator | None,
                   rank: int = 0, world: int = 1, max_events: int | None = None):
    """Yield object feature dicts chunk by chunk. split: 'train' (not held out) or 'test'.
    With rng the chunks come in random order (a new order each pass); ranks take every world-th."""
    chunks = [(i, lo) for i, info in enumerate(infos) for lo in range(0, info["n_events"], CHUNK_EVENTS)]
    if rng is not None:
        chunks = [chunks[j] for j in rng.permutation(len(chunks))]
    by_event = len(chunks) < world  # too few chunks to share out: every rank takes every world-th event
    chunks = chunks if by_event else chunks[rank::world]
    seen = 0
    for i, lo in chunks:
        info = infos[i]
        keys = object_keys(obj, features, info)
        _, arrays = next(h5io.iter_chunks(info["path"], list(keys.values()), step=CHUNK_EVENTS, start=lo,
                                          stop=min(lo + CHUNK_EVENTS, info["n_events"])))
        test = heldout(info["path"], lo, len(next(iter(arrays.values()))))
        events = np.nonzero(test if split == "test" else ~test)[0]
        if by_event:
            events = events[rank::world]
        if max_events is not None:
            events = events[: max(0, max_events - seen)]
            if not len(events):
                return
        seen += len(events)
        yield flatten_objects(obj, keys, arrays, events)


def preprocessing_sample(obj, features, infos, n_events, rng) -> dict[str, np.ndarray]:
    """A bounded sample: whole chunks are too coarse for small inputs, so draw random event
    blocks of 256 uniformly over all files until `n_events` training events are reached."""
    block = 256
    blocks = [(i, lo) for i, info in enumerate(infos) for lo in range(0, info["n_events"], block)]
    order = rng.permutation(len(blocks))
    parts, taken = [], 0
    for j in order:
        if taken >= n_events:
            break
        i, lo = blocks[j]
        info = infos[i]
        keys = object_keys(obj, features, info)
        hi = min(lo + block, info["n_events"])
        _, arrays = next(h5io.iter_chunks(info["path"], list(keys.values()), step=block, start=lo, stop=hi))
        events = np.nonzero(~heldout(info["path"], lo, hi - lo))[0]
        taken += len(events)
        parts.append(flatten_objects(obj, keys, arrays, events))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def combined_stream(objs, features, infos, split, rng, rank=0, world=1, max_events=None):
    """The combined tokenizer's objects: every type's features as '<obj>/<name>' plus the type id."""
    streams = {o: stream_objects(o, features[o], infos, split=split, rng=rng, rank=rank, world=world,
                                 max_events=max_events) for o in objs}
    while streams:
        for o in list(streams):
            try:
                part = next(streams[o])
            except StopIteration:
                del streams[o]
                continue
            n = len(next(iter(part.values())))
            yield {**{f"{o}/{k}": v for k, v in part.items()}, TYPE_FEATURE: np.full(n, TYPE_IDS[o])}


# ==============================================================================================
# fit
# ==============================================================================================


def count_objects(obj: str, infos: list[dict]) -> tuple[int, int]:
    """(training objects, held-out objects) from the stored counts `n` (cheap)."""
    train = test = 0
    for info in infos:
        with h5py.File(info["path"], "r") as f:
            n = np.ones(info["n_events"], np.int64) if OBJECTS[obj].per_event else f[f"common/{obj}/n"][:]
        t = heldout(info["path"], 0, len(n))
        train, test = train + int(n[~t].sum()), test + int(n[t].sum())
    return train, test


def choose_codebook_size(args, obj: str, n_train: int) -> int:
    if obj == "tracks" and getattr(args, "codebook_size_tracks", None):
        return int(args.codebook_size_tracks)
    if str(args.codebook_size) != "auto":
        return int(args.codebook_size)
    k = 2 ** int(math.floor(math.log2(max(n_train / AUTO_OBJECTS_PER_CODE, 1))))
    return int(min(max(k, AUTO_MIN_CODES), AUTO_MAX_CODES))


def choose_levels(args, codebook_size: int) -> int:
    """A codebook that few objects keep small gets more levels, so each object keeps its bits
    (a level's codes must all be hit by held-out objects; more levels ask no more of them)."""
    if str(args.levels) != "auto":
        return int(args.levels)
    return min(8, max(AUTO_MIN_LEVELS, math.ceil(AUTO_BITS / math.log2(max(codebook_size, 2)))))


def minibatches(stream_factory, specs, d_in, batch_size, rng, cache_bytes=None):
    """Endless shuffled minibatches of preprocessed objects. The first pass streams chunk by chunk;
    a training set that fits in `cache_bytes` is kept (preprocessed) and later passes reshuffle it
    in memory: re-reading the HDF5 files every pass was half the fit time of a small set. A larger
    set streams on every pass, so memory holds one chunk (plus at most `cache_bytes`)."""
    cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
    carry = np.zeros((0, d_in), np.float32)
    cache, cached = [], 0
    while True:
        produced = False
        for feats in stream_factory():
            x = preprocess(specs, feats, d_in)
            if cache is not None:
                cache.append(x)
                cached += x.nbytes
                cache = cache if cached <= cache_bytes else None
            x = np.concatenate([carry, x])
            x = x[rng.permutation(len(x))]
            n_full = len(x) // batch_size
            for b in range(n_full):
                produced = True
                yield torch.from_numpy(x[b * batch_size : (b + 1) * batch_size])
            carry = x[n_full * batch_size :]
        if cache is not None:
            break
        if not produced:
            if not len(carry):
                raise ValueError("no training objects in the inputs")
            yield torch.from_numpy(carry)  # fewer objects than one batch: use what there is
    x = np.concatenate(cache) if cache else np.zeros((0, d_in), np.float32)
    if not len(x):
        raise ValueError("no training objects in the inputs")
    while True:  # in memory: a new permutation per pass, full batches (or the whole set if smaller)
        perm = rng.permutation(len(x))
        for b in range(max(1, len(x) // batch_size)):
            yield torch.from_numpy(x[perm[b * batch_size : (b + 1) * batch_size]])


def train(model: VQAutoencoder, specs, batches, args, ddp_model, label: str) -> list[dict]:
    """Warm-up as a plain autoencoder, k-means init of the codebooks, then VQ training with EMA
    codebooks and dead-code resets (none in the last 10% so the codebooks settle)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    q = model.quantizer
    reset_every = max(1, math.ceil(RESET_WINDOW_HITS * q.size / args.batch_size))
    history, t0 = [], time.time()
    bar = tqdm(range(args.steps), desc=f"fit {label}", disable=args.rank != 0, mininterval=1.0)
    for step in bar:
        if step == args.warmup_steps or (step == 0 and args.warmup_steps <= 0):
            init_codebooks(model, batches, q.size * KMEANS_FACTOR, args.seed)
        quantize = bool(q.initialised)
        x = next(batches)
        out, codes, commit = ddp_model(x, quantize=quantize)
        recon, parts = reconstruction_loss(specs, out, x, args.discrete_weight)
        loss = recon + args.commit_weight * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if quantize and step % reset_every == reset_every - 1 and step < 0.9 * args.steps:
            with torch.no_grad():
                _, _, residuals = q.quantize(model.encoder(x))
            q.reset_dead_codes(residuals)
        if step % 50 == 0 or step == args.steps - 1:
            history.append({"step": step, "loss": loss.item(), "recon": recon.item(), "commit": commit.item(),
                            "quantized": quantize, **{f"loss_{k}": v for k, v in parts.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    history.append({"seconds": time.time() - t0, "objects_per_s": args.steps * args.batch_size / (time.time() - t0)})
    return history


@torch.no_grad()
def init_codebooks(model: VQAutoencoder, batches, n_vectors: int, seed: int) -> None:
    """k-means on >= n_vectors encoder outputs streamed from the data (not the first batch)."""
    buf, have = [], 0
    while have < n_vectors:
        z = model.encoder(next(batches))
        buf.append(z)
        have += len(z)
    g = torch.Generator().manual_seed(seed)
    model.quantizer.kmeans_init(torch.cat(buf), KMEANS_ITERS, g)


def codebook_digest(model: VQAutoencoder) -> str:
    import hashlib

    return hashlib.sha256(model.quantizer.codebooks.cpu().contiguous().numpy().tobytes()).hexdigest()


def ranks_digests(model: VQAutoencoder, world: int) -> list[str]:
    """Every rank's codebook checksum (gathered as tensors): the DDP synchronisation check."""
    digest = codebook_digest(model)
    if world == 1:
        return [digest]
    import torch.distributed as dist

    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=model.quantizer.codebooks.device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [bytes(t.tolist()).hex() for t in out]


# --- quality ------------------------------------------------------------------------------------


def robust(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"n": 0}
    q16, q50, q84 = np.quantile(x, [0.16, 0.5, 0.84])
    return {"n": int(len(x)), "bias": float(q50), "mean_bias": float(np.mean(x)), "resolution": float((q84 - q16) / 2)}


def btag_cuts(sample: dict[str, np.ndarray], specs: list[dict]) -> dict:
    cuts = {}
    for s in specs:
        if s["kind"] != "score":
            continue
        tagger = s["names"][0].rsplit("_", 1)[0]
        d = btag_discriminant(*(sample[n] for n in s["names"]), BTAG_FC.get(tagger.split("/")[-1], 0.1))
        cuts[tagger] = [float(np.quantile(d, 1 - f)) for f in BTAG_PASS_FRACTIONS]
    return cuts


def btag_discriminant(pb, pc, pu, fc):
    eps = 1e-6
    return np.log((np.asarray(pb) + eps) / (fc * np.asarray(pc) + (1 - fc) * np.asarray(pu) + eps))


def quality(tok: Tokenizer, orig: dict, reco: dict, codes: np.ndarray, cuts: dict, specs: list[dict]) -> dict:
    """Held-out quality: per-feature bias and robust resolution, exact-match rates, b-tag
    working-point efficiencies before/after, code usage and perplexity per level, goals."""
    feats, out = {}, {"n_objects": int(len(codes))}
    for s in specs:
        for name in s["names"]:
            if name == TYPE_FEATURE:
                continue
            o, r = np.asarray(orig[name], np.float64), np.asarray(reco[name], np.float64)
            if s["kind"] in ("flag", "category"):
                feats[name] = {"kind": s["kind"], "exact_match": float(np.mean(o == r))}
                continue
            diff = np.angle(np.exp(1j * (r - o))) if s["kind"] == "angle" else r - o
            entry = {"kind": s["kind"], **robust(diff[np.isfinite(diff)])}
            if name.split("/")[-1] in ("pt", "sumet", "mass") and s["kind"] == "continuous":
                ok = np.isfinite(o) & (o > 0)
                rel = r[ok] / o[ok] - 1
                entry["relative"] = robust(rel)
                idx = np.digitize(o[ok], PT_BINS) - 1
                entry["relative_binned"] = [{"lo": PT_BINS[b], "hi": PT_BINS[b + 1], **robust(rel[idx == b])}
                                            for b in range(len(PT_BINS) - 1) if (idx == b).sum() >= 20]
            feats[name] = entry
    out["features"] = feats
    btag = {}
    for s in specs:
        if s["kind"] != "score":
            continue
        tagger = s["names"][0].rsplit("_", 1)[0]
        fc = BTAG_FC.get(tagger.split("/")[-1], 0.1)
        d_o = btag_discriminant(*(orig[n] for n in s["names"]), fc)
        d_r = btag_discriminant(*(reco[n] for n in s["names"]), fc)
        btag[tagger] = [{"cut": c, "pass_fraction_fit": f, "eff_before": float(np.mean(d_o > c)),
                         "eff_after": float(np.mean(d_r > c)), "abs_diff": float(abs(np.mean(d_r > c) - np.mean(d_o > c)))}
                        for c, f in zip(cuts.get(tagger, []), BTAG_PASS_FRACTIONS)]
    out["btag_working_points"] = btag
    levels = []
    for l in range(codes.shape[1]):
        counts = np.bincount(codes[:, l], minlength=tok.codebook_size)
        levels.append({"level": l, "used": int((counts > 0).sum()), "dead": int((counts == 0).sum()),
                       "used_fraction": float((counts > 0).mean()), "perplexity": perplexity(counts)})
    out["codes"] = levels
    out["goals"] = goals(out)
    return out


def goals(q: dict) -> dict:
    """The issue's goals, evaluated on the held-out numbers above."""
    exact = [v["exact_match"] for k, v in q["features"].items() if v["kind"] in ("flag",) or k.endswith("charge")]
    btag = [wp["abs_diff"] for wps in q["btag_working_points"].values() for wp in wps]
    pt = [v["relative"]["resolution"] for k, v in q["features"].items() if k.split("/")[-1] == "pt" and "relative" in v]
    g = {"min_used_fraction": min(l["used_fraction"] for l in q["codes"]),
         "min_flag_charge_exact_match": min(exact) if exact else None,
         "max_btag_abs_diff": max(btag) if btag else None,
         "pt_relative_resolution": max(pt) if pt else None}
    g["pass"] = {"codes_used_ge_90pct": g["min_used_fraction"] >= 0.9,
                 "flags_charge_exact_ge_99.5pct": None if not exact else g["min_flag_charge_exact_match"] >= 0.995,
                 "btag_within_1pct": None if not btag else g["max_btag_abs_diff"] <= 0.01,
                 "pt_resolution_le_2pct": None if not pt else g["pt_relative_resolution"] <= 0.02}
    return g


def evaluate(tok: Tokenizer, stream, max_objects: int, cuts: dict):
    """Reconstruct up to max_objects held-out objects. The combined tokenizer's stream mixes
    object types (different feature names): each type is reconstructed and measured on its own,
    then the per-feature entries (prefixed '<obj>/') are merged and the codes pooled."""
    groups: dict[tuple, list] = {}
    n = 0
    for feats in stream:
        groups.setdefault(tuple(sorted(feats)), []).append(feats)
        n += len(next(iter(feats.values())))
        if n >= max_objects:
            break
    if not groups:
        raise ValueError("no held-out objects to evaluate on")
    orig, reco, codes, qs = {}, {}, [], []
    for keys, parts in groups.items():
        o = {k: np.concatenate([p[k] for p in parts])[:max_objects] for k in keys}
        c, r = tok.reconstruct(o)
        specs = [sp for sp in tok.specs if all(nm in o for nm in sp["names"])]
        qs.append(quality(tok, o, r, c, cuts, specs))
        keep = [k for k in o if k != TYPE_FEATURE]  # combined: the decoder also outputs other types' blocks
        orig.update({k: o[k] for k in keep})
        reco.update({k: r[k] for k in keep})
        codes.append(c)
    codes = np.concatenate(codes)
    q = quality(tok, {}, {}, codes, cuts, [])
    q["features"] = {k: v for qq in qs for k, v in qq["features"].items()}
    q["btag_working_points"] = {k: v for qq in qs for k, v in qq["btag_working_points"].items()}
    q["goals"] = goals(q)
    return orig, reco, codes, q


def fit_one(obj: str, infos: list[dict], args, objs_for_combined=None) -> dict:
    """Fit, evaluate and save the tokenizer of one object type (or the combined one)."""
    out_dir = Path(args.out_dir)
    ckpt = out_dir / f"{obj}.pt"
    if ckpt.exists() and not args.overwrite:
        print(f"[fit] {ckpt} exists, skipping (use --overwrite)", file=sys.stderr)
        return {"object": obj, "skipped": True}
    rng = np.random.default_rng(args.seed)
    runtime.seed_everything(args.seed)
    if obj == COMBINED:
        features = {o: common_features(o, infos, args) for o in objs_for_combined}
        specs = combined_specs({o: [OBJECTS[o].feature(n, g) for n, g in fs] for o, fs in features.items()})
        names = {o: [n for n, _ in fs] for o, fs in features.items()}
        sample = {}
        for o in objs_for_combined:
            part = preprocessing_sample(o, names[o], infos, args.preprocess_events, rng)
            sample.update({f"{o}/{k}": v for k, v in part.items()})
        n_train = sum(count_objects(o, infos)[0] for o in objs_for_combined)
        train_stream = lambda: combined_stream(objs_for_combined, names, infos, "train", rng, args.rank, args.world)
        test_stream = combined_stream(objs_for_combined, names, infos, "test", None)
    else:
        fs = common_features(obj, infos, args)
        specs = build_specs([OBJECTS[obj].feature(n, g) for n, g in fs])
        names = [n for n, _ in fs]
        sample = preprocessing_sample(obj, names, infos, args.preprocess_events, rng)
        n_train = count_objects(obj, infos)[0]
        train_stream = lambda: stream_objects(obj, names, infos, split="train", rng=rng, rank=args.rank, world=args.world)
        test_stream = stream_objects(obj, names, infos, split="test", rng=None)
    if not specs:
        raise runtime.InputError(f"{obj}: no tokenizable features present in all inputs")
    fit_preprocessing(specs, sample)
    weight_pt(specs, args.pt_weight)
    codebook_size = choose_codebook_size(args, obj, n_train)
    settings = {"dim": args.dim, "levels": choose_levels(args, codebook_size), "codebook_size": codebook_size,
                "hidden": args.hidden, "depth": args.depth, "decay": args.decay, "cosine": bool(args.cosine),
                "dead_fraction": args.dead_fraction, "batch_size": args.batch_size, "steps": args.steps,
                "warmup_steps": args.warmup_steps, "lr": args.lr, "commit_weight": args.commit_weight, "discrete_weight": args.discrete_weight, "pt_weight": args.pt_weight,
                "kmeans_buffer": KMEANS_FACTOR, "seed": args.seed, "mode": args.mode, "n_train_objects": n_train}
    tok = Tokenizer(obj, specs, settings)
    device = torch.device(args.device)
    model = tok.model.to(device)
    model.train()
    ddp_model = model
    if args.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    batches = (x.to(device) for x in minibatches(train_stream, specs, tok.d_in, args.batch_size,
                                                  np.random.default_rng(args.seed + args.rank)))
    history = train(model, specs, batches, args, ddp_model, obj)
    model.eval()
    digests = ranks_digests(model, args.world)
    model.cpu()  # evaluated and saved on the CPU, where apply and the plots load it
    if args.rank != 0:
        return {"object": obj}
    cuts = btag_cuts(sample, specs)
    orig, reco, codes, q = evaluate(tok, test_stream, args.eval_objects, cuts)
    sidecar = {"quality": q, "btag_cuts": cuts, "history": history,
               "ddp": {"world_size": args.world, "codebook_sha256_per_rank": digests,
                       "identical": len(set(digests)) == 1},
               "features_used": names,
               "dropped_features": dropped_features(obj, infos) if obj != COMBINED else {},
               "provenance": runtime.provenance("step2_tokenize.py fit", args, [i["path"] for i in infos])}
    sha = tok.save(ckpt, sidecar)
    save_eval_sample(out_dir / f"{obj}.eval.npz", orig, reco, codes)
    return {"object": obj, "sha256": sha, "goals": q["goals"], "settings": settings}


def weight_pt(specs: list[dict], weight: float) -> None:
    """pT (and MET sumet) get a larger reconstruction weight: the bits of the codes go where analyses need them."""
    for s in specs:
        if s["kind"] == "continuous" and s["names"][0].split("/")[-1] in ("pt", "sumet"):
            s["loss_weight"] = float(weight)


def common_features(obj: str, infos: list[dict], args) -> list[tuple[str, str]]:
    """Tokenize=True features present in every input (dataset present and not in missing_features),
    with --transform overrides applied in the schema order."""
    sets = [{(f.name, f.group) for f in usable_features(obj, i["experiment"], i["present"], i["missing"])} for i in infos]
    keep = set.intersection(*sets) if sets else set()
    out = [(f.name, f.group) for f in OBJECTS[obj].features if (f.name, f.group) in keep]
    return out


def dropped_features(obj: str, infos: list[dict]) -> list[str]:
    wanted = [f.name for f in OBJECTS[obj].token_features if f.group in ("common", infos[0]["experiment"])]
    kept = {n for n, _ in common_features(obj, infos, None)}
    return [n for n in wanted if n not in kept]


def save_eval_sample(path: Path, orig: dict, reco: dict, codes: np.ndarray, n_max: int = 50_000) -> None:
    """Held-out originals, reconstructions and codes for the diagnostics (plain arrays only)."""
    arrays = {f"orig/{k}": np.asarray(v)[:n_max] for k, v in orig.items()}
    arrays.update({f"reco/{k}": np.asarray(v)[:n_max] for k, v in reco.items()})
    arrays["codes"] = codes[:n_max]
    with runtime.atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def apply_transform_overrides(overrides: list[str]) -> None:
    """--transform jets.pt=log_standard: replace the schema Feature for this run (recorded in specs)."""
    from dataclasses import replace

    from common.schema import TRANSFORMS

    for text in overrides:
        try:
            key, transform = text.split("=")
            obj, name = key.split(".")
            f = OBJECTS[obj].feature(name)
        except (ValueError, KeyError):
            runtime.die(f"--transform {text!r}: expected OBJ.FEATURE=TRANSFORM with a schema feature")
        if f.kind != "continuous" or transform not in TRANSFORMS:
            runtime.die(f"--transform {text!r}: only continuous features, transform one of {TRANSFORMS}")
        o = OBJECTS[obj]
        new = tuple(replace(g, transform=transform) if g is f else g for g in o.features)
        object.__setattr__(o, "features", new)


def setup_distributed(args) -> None:
    d = D.setup(args.device)  # ranks talk over gloo on the CPU, nccl on GPUs
    args.world, args.rank, args.device = d.world, d.rank, str(d.device)  # the device as resolved, recorded
    torch.set_num_threads(max(1, args.threads))


def run_fit(args) -> int:
    setup_distributed(args)
    objs = [o.strip() for o in args.objects.split(",") if o.strip()]
    bad = [o for o in objs if o not in TOKENIZED_OBJECTS]
    if bad:
        runtime.die(f"--objects: unknown object type(s) {', '.join(bad)}; choose from {', '.join(TOKENIZED_OBJECTS)}")
    if str(args.levels) != "auto" and not (str(args.levels).isdigit() and 1 <= int(args.levels) <= 8):
        runtime.die(f"--levels must be 1..8 or auto, got {args.levels}")
    apply_transform_overrides(args.transform)
    paths = runtime.expand_inputs(args.h5)
    if not paths:
        runtime.die("no input files")
    infos, errors = runtime.process_inputs(paths, describe_file)
    if not infos:
        return runtime.exit_code(errors)
    targets = [COMBINED] if args.mode == "combined" else objs
    results = []
    for obj in targets:
        try:
            results.append(fit_one(obj, infos, args, objs_for_combined=objs))
        except (runtime.InputError, ValueError, KeyError) as exc:
            line = runtime.error_line(obj, exc)
            print(line, file=sys.stderr)
            errors.append(line)
    if args.rank == 0:
        for r in results:
            if "goals" in r:
                print(f"[fit] {r['object']}: codes={r['settings']['codebook_size']} levels={r['settings']['levels']} goals={r['goals']['pass']}")
        if not args.no_plots and any("sha256" in r for r in results):
            from plotting.plot_tokenizer import plot_dir

            plot_dir(args.out_dir, [r["object"] for r in results if "sha256" in r])
    if args.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return runtime.exit_code(errors)


# ==============================================================================================
# apply
# ==============================================================================================


def load_tokenizers(tok_dir: str) -> tuple[dict[str, Tokenizer], bool]:
    d = Path(tok_dir)
    if (d / f"{COMBINED}.pt").exists():
        tok = load_tokenizer(d / f"{COMBINED}.pt")
        return {o: tok for o in TOKENIZED_OBJECTS}, True
    missing = [o for o in TOKENIZED_OBJECTS if not (d / f"{o}.pt").exists()]
    if missing:
        runtime.die(f"{tok_dir}: no tokenizer for {', '.join(missing)} (run step2_tokenize.py fit)")
    return {o: load_tokenizer(d / f"{o}.pt") for o in TOKENIZED_OBJECTS}, False


def required_features(tok: Tokenizer, obj: str, combined: bool) -> list[str]:
    if combined:
        return [n.split("/", 1)[1] for n in tok.features if n.startswith(f"{obj}/")]
    return tok.features


def check_contract(info: dict, toks: dict[str, Tokenizer], combined: bool) -> None:
    """The file must hold every feature each tokenizer was fitted on (one clear error if not)."""
    problems = []
    for obj, tok in toks.items():
        keys = object_keys(obj, required_features(tok, obj, combined), info)
        names = set(required_features(tok, obj, combined))
        absent = sorted(names - set(keys))
        bad = [n for n, k in keys.items() if n != "__mask__" and (k not in info["present"] or k in info["missing"])]
        if "__mask__" in keys and keys["__mask__"] not in info["present"]:
            bad.append("mask")
        if absent or bad:
            problems.append(f"{obj}: {', '.join(absent + sorted(bad))}")
    if problems:
        raise runtime.InputError("features do not match the tokenizers (missing or NaN-filled): " + "; ".join(problems))


def encode_chunk(obj: str, tok: Tokenizer, feats: dict, combined: bool) -> np.ndarray:
    if combined:
        n = len(next(iter(feats.values()))) if feats else 0
        feats = {**{f"{obj}/{k}": v for k, v in feats.items()}, TYPE_FEATURE: np.full(n, TYPE_IDS[obj])}
    if not len(next(iter(feats.values()))):
        return np.zeros((0, tok.levels), np.int32)
    return tok.encode(feats)


def apply_one(path: str, toks, combined, vocab_base, args) -> str:
    out = Path(args.out_dir) / f"{Path(path).stem}.parquet"
    if out.exists() and not args.overwrite:
        return f"skipped {out}"
    info = describe_file(path)
    check_contract(info, toks, combined)
    meta = info["meta"]
    with h5py.File(path, "r") as f:  # a cheap pre-pass over the counts: exact truncation numbers
        counts = {o: f[f"common/{o}/n"][:] for o in SEQUENCE_OBJECTS}
    vocab = {**vocab_base, "truncation": sequences.truncation_stats(counts, vocab_base["caps"], vocab_base["max_length"])}
    keys = {o: object_keys(o, required_features(toks[o], o, combined), info) for o in TOKENIZED_OBJECTS}
    all_keys = sorted({k for ks in keys.values() for k in ks.values()} | {"common/event/mu", "common/event/weight"})

    def tables():
        bar = tqdm(total=info["n_events"], desc=f"apply {Path(path).name}", unit="ev", mininterval=1.0)
        for lo, arrays in runtime.read_ahead(h5io.iter_chunks(path, all_keys, step=args.chunk_events)):
            n = len(arrays["common/event/mu"])
            events = np.arange(n)
            stored = {o: arrays[keys[o]["__mask__"]].astype(bool) for o in SEQUENCE_OBJECTS}
            masks = sequences.kept_masks(stored, vocab["caps"], vocab["max_length"])  # truncated: not encoded
            codes = {o: encode_chunk(o, toks[o], flatten_objects(o, keys[o], arrays, events, masks[o]), combined)
                     for o in SEQUENCE_OBJECTS}
            met = encode_chunk("met", toks["met"], flatten_objects("met", keys["met"], arrays, events), combined)
            ids, types, lengths = sequences.build_sequences(masks, codes, met, arrays["common/event/mu"], vocab)
            bar.update(n)
            yield token_parquet.sequences_table(ids, types, lengths, np.arange(lo, lo + n), path,
                                                str(meta.get("process", "")), int(meta.get("dsid", 0) or 0),
                                                arrays["common/event/weight"])
        bar.close()

    prov = runtime.provenance("step2_tokenize.py apply", args, [path])
    token_parquet.write_sequences(out, runtime.read_ahead(tables()), vocab, prov)  # computing overlaps writing
    return str(out)


def parse_caps(items: list[str]) -> dict[str, int]:
    caps = dict(sequences.DEFAULT_CAPS)
    for text in items:
        try:
            obj, n = text.split("=")
            if obj not in caps:
                raise ValueError
            caps[obj] = int(n)
        except ValueError:
            runtime.die(f"--cap {text!r}: expected OBJ=N with OBJ one of {', '.join(SEQUENCE_OBJECTS)}")
    return caps


def run_apply(args) -> int:
    runtime.seed_everything(args.seed)
    torch.set_num_threads(max(1, args.threads))
    if not Path(args.tokenizers).is_dir():
        runtime.die(f"{args.tokenizers}: tokenizer directory not found")
    try:
        shard_paths = runtime.select_shard(runtime.expand_inputs(args.h5), args.shard)
    except ValueError as exc:
        runtime.die(str(exc))
    caps = parse_caps(args.cap)
    toks, combined = load_tokenizers(args.tokenizers)
    device = D.setup(args.device).device
    for tok in set(toks.values()):
        tok.model.to(device)
    meta = {o: {"sha256": t.sha256, "features": t.features, "levels": t.levels, "codebook_size": t.codebook_size,
                "file": Path(t.path).name} for o, t in toks.items()}
    try:
        vocab_base = sequences.build_vocab(meta, caps, args.max_length, combined=combined)
    except ValueError as exc:
        runtime.die(f"--max-length: {exc}")
    results, errors = runtime.process_inputs(shard_paths, lambda p: apply_one(p, toks, combined, vocab_base, args))
    for r in results:
        print(f"[apply] {r}")
    return runtime.exit_code(errors)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.bound_heap_growth()  # memory flat over many chunks
    return run_fit(args) if args.command == "fit" else run_apply(args)


if __name__ == "__main__":
    sys.exit(main())
