"""Step 2, fit: one tokenizer per object type from step1 HDF5 files.

  python step2_fit.py --h5 data/h5/*.h5 --out-dir runs/tok            # or: step2_tokenize.py fit ...
  python step2_fit.py --h5 data/h5/*.h5 --out-dir runs/tok --preset production [--device cuda]
  torchrun --nproc_per_node N step2_fit.py --h5 data/h5/*.h5 --out-dir runs/tok

For every object type a residual EMA VQ-VAE (common/tokenizer.py; `--quantizer fsq|rfsq`: finite
scalar quantisation, one level or residual levels, instead of the learned codebooks) on the schema's
tokenize=True features present in all inputs (`--mode combined`: one over all object types;
`--granularity group`: one per (object type, feature group of common/schema.TOKEN_GROUPS) over
that group's features, written as <obj>.<group>.pt; apply concatenates their codes).
`--encoder transformer`: each object's encoder also attends over the leading objects of the same
type in its event (common/tokenizer.ContextEncoder); minibatches are then whole events.
Nested levels (`--nested-levels`, default electrons, muons, jets and tracks to 8): after the fit, more
levels are trained on what its levels leave, with the encoder and those levels frozen, so an object's
first codes stay those of the plain fit and the new ones only add detail (for the decoded physics).
Preprocessing is fitted on a bounded sample of events drawn uniformly from all inputs; training
streams minibatches from the HDF5 files (memory does not grow with the number of events); the
quality is measured on held-out events (the `test` split of common/token_parquet.split_of) and
written to <obj>.json; the decoded-physics closure of all tokenizers in --out-dir together (m4l,
mll, mjj, Delta R, MET from decoded against original objects: common/decoded_closure.py) to
closure.json; with --data-mc, data against simulation (the held-out objects split by
common/event/is_simulation: features and code usage, chi2/ndf; common/data_mc.py) to data_mc.json,
data_mc.csv and plots/data_mc/. Under torchrun the model is DistributedDataParallel and the codebook
statistics are all-reduced. The fit runs on the CPU unless --device says otherwise.
"""
from __future__ import annotations

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch and numba load)

import argparse
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import data_mc
from common import distributed as D
from common import runtime
from common.decoded_closure import MAX_EVENTS as CLOSURE_EVENTS, write_closure
from common.object_stream import (combined_stream, common_features, count_objects, describe_file, dropped_features,
                                  event_minibatches, minibatches, preprocessing_sample, stream_objects)
from common.schema import OBJECTS, TOKENIZED_OBJECTS, TRANSFORMS, token_groups
from common.tokenizer import (COMBINED, ENCODERS, FSQ_LEVELS, GRANULARITIES, MAX_LEVELS, QUANTIZERS, Tokenizer,
                              build_specs, combined_specs, fit_preprocessing, quantizer_problem, tokenizer_name)
from common.tokenizer_quality import btag_cuts, evaluate, save_eval_sample
from common.tokenizer_training import (KMEANS_FACTOR, choose_codebook_size, choose_fsq_levels, choose_levels,
                                       nest_levels, ranks_digests, train, weight_pt)

# --- fit defaults (quick: the run_all sample); `--preset production` is the long fit's setting ---
QUANTIZER = "vq"  # vq: residual EMA VQ; fsq: finite scalar quantisation, one level; rfsq: residual FSQ
DIM = 8
LEVELS = "auto"  # auto: 4, more where few objects cap the codebook (common/tokenizer_training.AUTO_BITS per object)
NESTED_LEVELS = "electrons=8,muons=8,jets=8,tracks=8"  # levels added after the fit, its encoder and levels frozen:
#   the decoded closure (m4l, mll: the leptons' angles; mjj: the jets') and the tracks' worst pT bins need 8, while a
#   model reading an object's first levels still gets the 4-level fit's codes (8 fitted at once say less in their first)
CODEBOOK_SIZE = "auto"  # auto: a power of two near (training objects / 32), 64 to 2048 (common/tokenizer_training.py)
HIDDEN = 128
DEPTH = 2
ENCODER = "mlp"  # transformer: the encoder also sees the event's other objects of the type (per-object mode)
DECAY = 0.99
DEAD_FRACTION = 0.1  # a code is dead with fewer hits than this x the mean hits per code in a window
#                      (0.03 left rare codes alive: 90% of muon codes used on held-out events, 0.1: 94%)
BATCH_SIZE = 256  # with STEPS: the objects of 800 steps x 1024, with 4x the codebook updates
#                   (run_all sample, pT resolution: e, mu, photons, jets, tracks 1.2-1.9% -> 0.8-1.6%, taus 3.5% -> 2.3%)
STEPS = 3200
WARMUP_STEPS = 100  # plain autoencoder steps before k-means initialises the codebooks
LR = 3e-3
COMMIT_WEIGHT = 0.25
DISCRETE_WEIGHT = 10.0  # loss weight of flags and categories: they must come back exactly
PT_WEIGHT = 10.0  # loss weight of pT (and MET sumet): the code bits go to pT (30 broke b-tag and tau phi)
PREPROCESS_EVENTS = 200_000  # bound of the preprocessing sample
EVAL_OBJECTS = 200_000  # bound of the held-out quality sample
SEED = 1
THREADS = 1  # per process (0: the usable CPUs): the MLPs are small, one thread beats two contending ones
WORKERS = 0  # object types fitted side by side, in processes of THREADS threads (0: usable CPUs / THREADS)
DEVICE = "cpu"  # cuda: for the production preset's long fits (GPU sums are not bitwise reproducible)
PRESETS = {
    "production": {"dim": 8, "levels": 4, "codebook_size": "4096", "codebook_size_tracks": 8192,
                   "batch_size": 8192, "steps": 20000, "warmup_steps": 1000},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5", nargs="+", required=True, help="step1 HDF5 files (or directories)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--objects", default=",".join(TOKENIZED_OBJECTS), help="comma list of object types")
    p.add_argument("--mode", choices=("per-object", "combined"), default="per-object")
    p.add_argument("--granularity", choices=GRANULARITIES, default="object",
                   help="group: one tokenizer per (object, feature group), <obj>.<group>.pt (per-object mode only)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="production: dim 8, 4 levels, 4096 codes (8192 tracks)")
    p.add_argument("--quantizer", choices=QUANTIZERS, default=QUANTIZER,
                   help="vq: residual EMA VQ; fsq: FSQ, one level of prod(levels) codes; rfsq: --levels residual FSQ levels")
    p.add_argument("--fsq-levels", default=None, metavar="8,5,5,5",
                   help="FSQ levels per dimension (fsq, rfsq); default from --codebook-size: "
                        + ", ".join(f"{k} -> {'x'.join(map(str, v))}" for k, v in FSQ_LEVELS.items()))
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--levels", default=LEVELS, help=f"1-{MAX_LEVELS} or 'auto' (fsq: 1)")
    p.add_argument("--codebook-size", default=CODEBOOK_SIZE, help="int or 'auto'")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--depth", type=int, default=DEPTH)
    p.add_argument("--encoder", choices=ENCODERS, default=ENCODER,
                   help="transformer: each object's code also sees the leading objects of its type in its event")
    p.add_argument("--nested-levels", default=None, metavar="OBJ=N,...",
                   help=f"after the fit, add levels up to N with the encoder and the fitted levels frozen (vq, per "
                        f"object): 'OBJ=N,...', N for every type, or none (default {NESTED_LEVELS})")
    p.add_argument("--nested-steps", type=int, default=None, help="training steps of the nested levels (default: --steps)")
    p.add_argument("--decay", type=float, default=DECAY, help="EMA decay of the codebooks")
    p.add_argument("--cosine", action="store_true", help="cosine-similarity code search")
    p.add_argument("--dead-fraction", type=float, default=DEAD_FRACTION)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="vq only: plain autoencoder steps")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--commit-weight", type=float, default=COMMIT_WEIGHT)
    p.add_argument("--discrete-weight", type=float, default=DISCRETE_WEIGHT, help="loss weight of flags/categories")
    p.add_argument("--pt-weight", type=float, default=PT_WEIGHT, help="loss weight of pT (and MET sumet)")
    p.add_argument("--transform", action="append", default=[], metavar="OBJ.FEATURE=T",
                   help=f"override a continuous feature's transform ({', '.join(TRANSFORMS)})")
    p.add_argument("--preprocess-events", type=int, default=PREPROCESS_EVENTS)
    p.add_argument("--eval-objects", type=int, default=EVAL_OBJECTS)
    p.add_argument("--closure-events", type=int, default=CLOSURE_EVENTS,
                   help="held-out events of the decoded-physics closure (closure.json; 0: none)")
    p.add_argument("--data-mc", action="store_true",
                   help="compare data (is_simulation 0) with simulation (1) on held-out objects, at most "
                        "--eval-objects per side: data_mc.json/.csv, plots/data_mc/ (both must be among the inputs)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=THREADS, help="threads per process (0: the usable CPUs)")
    p.add_argument("--workers", type=int, default=WORKERS,
                   help="object types fitted at once, each in its own process (0: usable CPUs / threads; "
                        "1 under torchrun or on a GPU)")
    p.add_argument("--device", default=DEVICE, help="cpu | cuda | auto (one GPU per torchrun rank)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(codebook_size_tracks=None, progress=True)  # a preset's own size for tracks; the step bars
    args = p.parse_args(argv)
    if args.preset:  # the preset replaces the defaults; flags given still win
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    return args


def parse_transforms(items: list[str]) -> dict[str, dict[str, str]]:
    """--transform jets.pt=log_standard -> {'jets': {'pt': 'log_standard'}} (checked against the schema)."""
    out: dict[str, dict[str, str]] = {}
    for text in items:
        try:
            key, transform = text.split("=")
            obj, name = key.split(".")
            f = OBJECTS[obj].feature(name)
        except (ValueError, KeyError):
            runtime.die(f"--transform {text!r}: expected OBJ.FEATURE=TRANSFORM with a schema feature")
        if f.kind != "continuous" or transform not in TRANSFORMS:
            runtime.die(f"--transform {text!r}: only continuous features, transform one of {TRANSFORMS}")
        out.setdefault(obj, {})[name] = transform
    return out


def parse_nested_levels(args, objs: list[str]) -> dict[str, int]:
    """--nested-levels -> {object type: levels in all}; the default applies to vq fits of object tokenizers only."""
    text = args.nested_levels
    nestable = args.quantizer == "vq" and args.mode == "per-object" and args.granularity == "object"
    if text is None:
        text = NESTED_LEVELS if nestable else "none"
    if text == "none":
        return {}
    if not nestable:
        runtime.die("--nested-levels needs --quantizer vq, --mode per-object and --granularity object")
    if text.isdigit():
        nested = dict.fromkeys(objs, int(text))
    else:
        nested = runtime.per_object(text, dict.fromkeys(TOKENIZED_OBJECTS), "--nested-levels", int)
        nested = {o: n for o, n in nested.items() if n is not None}
    if bad := [f"{o}={n}" for o, n in nested.items() if not 1 <= n <= MAX_LEVELS]:
        runtime.die(f"--nested-levels: {', '.join(bad)}: levels 1-{MAX_LEVELS}")
    return {o: n for o, n in nested.items() if o in objs}


def check_quantizer(args, objs: list[str]) -> None:
    """--quantizer with --levels, --cosine, --fsq-levels and the codebook sizes asked for: possible,
    or one error line (exit 2). Parses --fsq-levels into a list."""
    if args.fsq_levels is not None:
        try:
            args.fsq_levels = [int(v) for v in args.fsq_levels.split(",")]
        except ValueError:
            runtime.die(f"--fsq-levels {args.fsq_levels!r}: expected integers, e.g. 8,5,5,5")
    tracks = [(args.codebook_size_tracks, " (the preset's size for tracks)")] if args.codebook_size_tracks and "tracks" in objs else []
    for size, which in [(args.codebook_size, ""), *tracks]:
        problem = quantizer_problem(args.quantizer, args.levels, size, args.fsq_levels, args.cosine)
        if problem:
            runtime.die(f"--quantizer {args.quantizer}: {problem}{which}")


def describe_input(path: str) -> dict:
    """describe_file; a file without events is a bad input (nothing to sample or train on)."""
    info = describe_file(path)
    if info["n_events"] == 0:
        raise runtime.InputError("no events to fit on")
    return info


def fit_features(obj: str, infos: list[dict], transforms: dict) -> list:
    """The features every input holds, with the --transform overrides (recorded in the specs)."""
    own = transforms.get(obj, {})
    return [replace(f, transform=own[f.name]) if f.name in own else f for f in common_features(obj, infos)]


def fit_data(obj: str, group: str | None, objs: list[str], infos: list[dict], transforms: dict, rng, args):
    """(specs, feature names, preprocessing sample, training objects, train stream factory, held-out
    stream) of one tokenizer; the combined one takes every type's features as '<obj>/<name>', a group
    one (granularity group) the object's features of that group."""
    if obj == COMBINED:
        features = {o: fit_features(o, infos, transforms) for o in objs}
        specs = combined_specs(features)
        names = {o: [f.name for f in fs] for o, fs in features.items()}
        sample = {}
        for o in objs:
            part = preprocessing_sample(o, names[o], infos, args.preprocess_events, rng)
            sample.update({f"{o}/{k}": v for k, v in part.items()})
        n_train = sum(count_objects(o, infos)[0] for o in objs)
        train_stream = lambda: combined_stream(objs, names, infos, "train", rng, args.rank, args.world)  # noqa: E731
        return specs, names, sample, n_train, train_stream, combined_stream(objs, names, infos, "test", None)
    features = [f for f in fit_features(obj, infos, transforms) if group is None or f.token_group == group]
    specs = build_specs(features)
    if not specs:
        raise runtime.InputError(f"{tokenizer_name(obj, group)}: no tokenizable features present in all inputs")
    names = [f.name for f in features]
    sample = preprocessing_sample(obj, names, infos, args.preprocess_events, rng)
    context = args.encoder != "mlp"  # the streams carry each object's event
    train_stream = lambda: stream_objects(obj, names, infos, split="train", rng=rng, rank=args.rank, world=args.world,  # noqa: E731
                                          context=context)
    test_stream = stream_objects(obj, names, infos, split="test", rng=None, context=context)
    return specs, names, sample, count_objects(obj, infos)[0], train_stream, test_stream


def fit_one(target: tuple, objs: list[str], infos: list[dict], transforms: dict, args) -> dict:
    """Fit, evaluate and save the tokenizer of one target: (object type, None), (object type, feature
    group) in granularity group, or (COMBINED, None), the combined one of `objs`."""
    obj, group = target
    name = tokenizer_name(obj, group)
    out_dir = Path(args.out_dir)
    ckpt = out_dir / f"{name}.pt"
    if ckpt.exists() and not args.overwrite:
        print(f"[fit] {ckpt} exists, skipping (use --overwrite)", file=sys.stderr)
        return {"object": name, "skipped": True}
    rng = np.random.default_rng(args.seed)
    runtime.seed_everything(args.seed)
    specs, names, sample, n_train, train_stream, test_stream = fit_data(obj, group, objs, infos, transforms, rng, args)
    fit_preprocessing(specs, sample)
    weight_pt(specs, args.pt_weight)
    requested = args.codebook_size_tracks if obj == "tracks" and args.codebook_size_tracks else args.codebook_size
    fsq = None if args.quantizer == "vq" else (args.fsq_levels or choose_fsq_levels(requested, n_train))
    codebook_size = choose_codebook_size(requested, n_train) if fsq is None else math.prod(fsq)
    levels = 1 if args.quantizer == "fsq" else choose_levels(args.levels, codebook_size)
    settings = {"dim": args.dim, "levels": levels, "codebook_size": codebook_size,
                "hidden": args.hidden, "depth": args.depth, "decay": args.decay, "cosine": bool(args.cosine),
                "dead_fraction": args.dead_fraction, "batch_size": args.batch_size, "steps": args.steps,
                "warmup_steps": args.warmup_steps, "lr": args.lr, "commit_weight": args.commit_weight,
                "discrete_weight": args.discrete_weight, "pt_weight": args.pt_weight, "kmeans_buffer": KMEANS_FACTOR,
                "seed": args.seed, "mode": args.mode, "n_train_objects": n_train}
    if args.encoder != "mlp":  # absent: mlp (the default fit's checkpoints stay as they were)
        settings["encoder"] = args.encoder
    if fsq is not None:  # absent: a vq (so a default fit writes the files it always wrote)
        settings.update(quantizer=args.quantizer, fsq_levels=fsq)
    if group is not None:  # apply checks that every group fitted for the object is in the folder
        settings.update(granularity="group", group=group, object_groups=list(args.groups[obj]))
    tok = Tokenizer(obj, specs, settings)

    # training: on args.device, every rank on its share of the chunks
    device = torch.device(args.device)
    model = tok.model.to(device)
    model.train()
    batch_rng = np.random.default_rng(args.seed + args.rank)
    if tok.model.context:  # whole events, with each object's event
        batches = ((x.to(device), ev.to(device)) for x, ev in event_minibatches(train_stream, specs, tok.d_in,
                                                                                 args.batch_size, batch_rng))
    else:
        batches = (x.to(device) for x in minibatches(train_stream, specs, tok.d_in, args.batch_size, batch_rng))

    def fit_stage(model, steps: int, warmup_steps: int, label: str) -> list[dict]:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if args.world > 1 else model
        return train(model, specs, batches, steps=steps, warmup_steps=warmup_steps, batch_size=args.batch_size,
                     lr=args.lr, commit_weight=args.commit_weight, discrete_weight=args.discrete_weight, seed=args.seed,
                     ddp_model=ddp_model, label=label, progress=args.rank == 0 and args.progress)

    history = fit_stage(model, args.steps, args.warmup_steps, name)
    if args.nested.get(obj, 0) > levels:  # the finer levels, on the frozen fit
        model = tok.model = nest_levels(model, args.nested[obj])
        tok.settings.update(levels=args.nested[obj], nested_from_levels=levels, nested_steps=args.nested_steps)
        history += [{**h, "nested": True}
                    for h in fit_stage(model, args.nested_steps, 0, f"{name} levels {levels + 1}-{args.nested[obj]}")]
    model.eval()
    digests = ranks_digests(model, args.world)
    model.cpu()  # evaluated and saved on the CPU, where apply and the plots load it
    if args.rank != 0:
        return {"object": name}

    # held-out quality, then the outputs: <name>.pt, <name>.json, <name>.eval.npz (name: <obj> or <obj>.<group>)
    cuts = btag_cuts(sample, specs)
    orig, reco, codes, q, events = evaluate(tok, test_stream, args.eval_objects, cuts)
    sidecar = {"quality": q, "btag_cuts": cuts, "history": history,
               "ddp": {"world_size": args.world, "codebook_sha256_per_rank": digests,
                       "identical": len(set(digests)) == 1},
               "features_used": names,
               "dropped_features": [n for n in dropped_features(obj, infos)
                                    if group is None or OBJECTS[obj].feature(n).token_group == group]
                                   if obj != COMBINED else {},
               "provenance": runtime.provenance("step2_fit.py", args, [i["path"] for i in infos])}
    sha = tok.save(ckpt, sidecar)
    save_eval_sample(out_dir / f"{name}.eval.npz", orig, reco, codes, events=events)
    if not args.no_plots:  # here, so the plots of one type are drawn while the next types train
        from plotting.plot_tokenizer import plot_object

        plot_object(out_dir, name)
    return {"object": name, "sha256": sha, "goals": q["goals"], "settings": tok.settings}


def fit_or_error(target: tuple, objs: list[str], infos: list[dict], transforms: dict, args) -> dict:
    """fit_one, with a bad input reported as {'object', 'error'} so the other types go on."""
    try:
        return fit_one(target, objs, infos, transforms, args)
    except (runtime.InputError, ValueError, KeyError) as exc:
        name = tokenizer_name(*target)
        return {"object": name, "error": runtime.error_line(name, exc)}


def start_worker(args) -> None:
    runtime.set_threads(args.threads)


def fit_all(targets: list[tuple], objs: list[str], infos: list[dict], transforms: dict, args) -> list[dict]:
    """Every tokenizer (target: (object, group or None)), `args.workers` at a time, the most populous
    types first. Each fit seeds itself, so its tokenizer does not depend on the process that fitted it."""
    if args.world > 1 or args.device != "cpu" or args.workers < 2 or len(targets) < 2:
        return [fit_or_error(t, objs, infos, transforms, args) for t in targets]
    order = sorted(targets, key=lambda t: -sum(count_objects(o, infos)[0] for o in (objs if t[0] == COMBINED else [t[0]])))
    with ProcessPoolExecutor(min(args.workers, len(targets)), multiprocessing.get_context("spawn"),
                             start_worker, (args,)) as pool:
        quiet = argparse.Namespace(**{**vars(args), "progress": False})  # one bar here, not one per worker
        pending = {t: pool.submit(fit_or_error, t, objs, infos, transforms, quiet) for t in order}
        done = {t: f.result() for t, f in tqdm(pending.items(), desc=f"fit, {args.workers} tokenizers at a time")}
    return [done[t] for t in targets]


def fit_targets(objs: list[str], infos: list[dict], transforms: dict, args) -> list[tuple]:
    """(object, group) of every tokenizer to fit: one per object, one combined, or one per (object,
    feature group present in all inputs); args.groups records each object's groups (granularity group)."""
    if args.mode == "combined":
        return [(COMBINED, None)]
    if args.granularity == "object":
        return [(obj, None) for obj in objs]
    args.groups = {obj: list(token_groups(obj, tuple(fit_features(obj, infos, transforms)))) for obj in objs}
    return [(obj, g) for obj in objs for g in args.groups[obj]]


def closure(out_dir: str, infos: list[dict], max_events: int) -> list[str]:
    """Write <out-dir>/closure.json (common/decoded_closure.py); its error line, if any."""
    try:
        c = write_closure(out_dir, infos, max_events)
    except (OSError, KeyError, ValueError) as exc:
        line = runtime.error_line("closure", exc)
        print(line, file=sys.stderr)
        return [line]
    if c:
        shown = lambda v, q: f"{v:+.2%}" if q["difference"] == "relative" else f"{v:+.3f}"  # noqa: E731
        figures = ", ".join(f"{k} {shown(q['resolution'], q)[1:]}/{shown(q['bias'], q)}" for k, q in c["quantities"].items() if q.get("n"))
        print(f"[fit] decoded closure on {c['n_events']} held-out events (resolution/bias): {figures}; goals={c['goals']}")
    return []


def setup_distributed(args) -> D.Dist:
    d = D.setup(args.device)  # ranks talk over gloo on the CPU, nccl on GPUs
    args.world, args.rank, args.device = d.world, d.rank, str(d.device)  # the device as resolved, recorded
    runtime.set_threads(args.threads)
    if args.workers == 0:
        args.workers = max(1, runtime.usable_cpus() // (args.threads or runtime.usable_cpus()))
    return d


def main(argv=None) -> int:
    args = parse_args(argv)
    d = setup_distributed(args)
    objs = [o.strip() for o in args.objects.split(",") if o.strip()]
    bad = [o for o in objs if o not in TOKENIZED_OBJECTS]
    if bad:
        runtime.die(f"--objects: unknown object type(s) {', '.join(bad)}; choose from {', '.join(TOKENIZED_OBJECTS)}")
    if args.mode == "combined" and args.granularity == "group":
        runtime.die("--granularity group needs --mode per-object (one tokenizer per object and feature group)")
    if args.mode == "combined" and args.encoder != "mlp":
        runtime.die(f"--encoder {args.encoder} needs --mode per-object (its context is the objects of the same type)")
    if str(args.levels) != "auto" and not (str(args.levels).isdigit() and 1 <= int(args.levels) <= MAX_LEVELS):
        runtime.die(f"--levels must be 1..{MAX_LEVELS} or auto, got {args.levels}")
    check_quantizer(args, objs)
    args.nested = parse_nested_levels(args, objs)
    args.nested_steps = args.nested_steps or args.steps
    transforms = parse_transforms(args.transform)
    paths = runtime.input_files(args.h5)
    if not paths:
        runtime.die("no input files")
    infos, errors = runtime.process_inputs(paths, describe_input)
    if not infos:
        return runtime.exit_code(errors)
    if args.data_mc and (cause := data_mc.missing_side(infos)):
        runtime.die(f"--data-mc: {cause}")

    results = fit_all(fit_targets(objs, infos, transforms, args), objs, infos, transforms, args)
    for r in results:
        if "error" in r:
            print(r["error"], file=sys.stderr)
            errors.append(r["error"])

    if args.rank == 0:
        for r in results:
            if "goals" in r:
                print(f"[fit] {r['object']}: {r['settings'].get('quantizer', 'vq')} codes={r['settings']['codebook_size']} "
                      f"levels={r['settings']['levels']} goals={r['goals']['pass']}")
        fitted = any("sha256" in r for r in results)
        if args.closure_events > 0 and fitted:  # every tokenizer in out-dir, together
            errors += closure(args.out_dir, infos, args.closure_events)
        if not args.no_plots and fitted and (Path(args.out_dir) / "closure.json").exists():
            from plotting.plot_tokenizer import plot_closure

            plot_closure(Path(args.out_dir))
        if args.data_mc and fitted:  # every tokenizer in out-dir
            errors += data_mc.fit_data_mc(args.out_dir, infos, args.eval_objects, plots=not args.no_plots)
    D.barrier(d)  # no rank leaves while rank 0 writes the closure
    return D.finish(d, runtime.exit_code(errors))


if __name__ == "__main__":
    runtime.bound_heap_growth()  # memory flat over many chunks
    sys.exit(main())
