"""Step 2, scan: a grid of tokenizer settings, each configuration fitted and judged downstream.

  python step2_scan.py --grid scans/starter.json --h5 runs/default/h5 \
      --reference-tokenizers runs/default/tok --out-dir runs/default/scan [--shard K/N]

The grid ({axis: [values]}, common/tokenizer_scan.AXES: codebook_size, levels, nested_levels, dim,
hidden, depth, cosine, decay, commit_weight, pt_weight, transform, encoder, quantizer, fsq_levels) is
given as a JSON file and/or --axis flags (no nested levels unless the grid has them);
every object type of --objects is scanned over all of its points. Each configuration is one
independent job in <out>/configs/<id>/:
  1. tok/: the reference tokenizers (.pt, .json) of the other object types, and step2_fit of this
     one on --h5 with that configuration (fit wall time; the held-out quality of its <obj>.json:
     per-feature resolution and bias, the worst pT bin, codes used / dead / perplexity per level;
     closure.json's figures as closure_* columns where the fit writes one);
  2. tokens/: step2_apply of the task's HDF5 files (those of --signal and --background) with tok/
     (apply_events_per_s: whole events, every object type, reading and writing included);
  3. finetune/: step4_finetune's scratch arm (run_all's architecture, code geometry included), fixed
     seed: the downstream test AUC;
  4. result.json, written last: a rerun skips configurations that have it.
One more job, <out>/reference/, tokenizes the task with the reference tokenizers alone and trains the
same classifier: every configuration's AUC is compared with it on the same test events (auc_minus_reference
with its paired 95% interval, and a verdict), and each scanned object gets a row for its reference
tokenizer, so the ranking shows what beats the default.
With --data-mc (the inputs must hold data and simulation: common/event/is_simulation 0 and 1),
each configuration's fitted tokenizer is compared, data against simulation, on held-out objects
(common/data_mc.py: tok/data_mc.json, .csv and, unless --no-plots, tok/plots/data_mc/), and its
largest chi2/ndf of the features and of the code usage are columns of the table.
encode_objects_per_s is this object's encode alone, on its held-out sample, on --threads threads.
A configuration that fails is listed with one error line and the others go on (exit 1).
The table of every finished configuration (all shards) is <out>/scan.csv and scan.parquet:
  pandas.read_parquet("runs/default/scan/scan.parquet")
with the plots of plotting/plot_scan.py in <out>/plots.
"""
from __future__ import annotations

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch and numba load)

import argparse
import json
import shutil
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd

import step2_apply
import step2_fit
import step4_finetune
from common import data_mc, runtime
from common import tokenizer_scan as S
from common.object_stream import describe_file
from common.schema import TOKENIZED_OBJECTS
from common.tokenizer import load_tokenizer

OBJECTS = "jets,muons"
SIGNAL, BACKGROUND = "hzz4l", "zz4l,ttbar,dy"  # run_all's task
CAP = "tracks=10"  # run_all's sequences (TRACKS_IN_SEQUENCE)
FIT_STEPS = step2_fit.STEPS  # with step2_fit's warmup, at most a quarter of them (a short test scan)
FINETUNE_STEPS = 150  # the scratch classifier's steps at least; step4 --epochs (6 passes: 792 steps on run_all's task) rules
FINETUNE_EVAL_EVERY = 50
SEED = 1
THREADS = 1  # per step: the scan's shards are the parallelism
REFERENCE = {"object": "(reference)", "settings": {}, "id": "reference"}  # the job that judges the reference tokenizers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default=None, help="JSON file {axis: [values]}")
    p.add_argument("--axis", action="append", default=[], metavar="AXIS=V1,V2",
                   help=f"an axis of the grid (adds to or replaces --grid's); axes: {', '.join(S.AXES)}")
    p.add_argument("--objects", default=OBJECTS, help="comma list of the object types scanned")
    p.add_argument("--h5", nargs="+", required=True, help="step1 HDF5 files (or directories): fit inputs and task")
    p.add_argument("--reference-tokenizers", required=True, help="step2 fit folder: the other object types' tokenizers")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--shard", default=None, help="K/N: this job's share of the configurations")
    p.add_argument("--signal", default=SIGNAL)
    p.add_argument("--background", default=BACKGROUND)
    p.add_argument("--cap", default=CAP, help="step2_apply --cap of the task sequences")
    p.add_argument("--fit-steps", type=int, default=FIT_STEPS, help="step2_fit --steps of every configuration")
    p.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS, help="step4 --steps of the scratch classifier")
    p.add_argument("--finetune-eval-every", type=int, default=FINETUNE_EVAL_EVERY)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=THREADS, help="threads of each step (0: the usable CPUs)")
    p.add_argument("--data-mc", action="store_true",
                   help="compare data with simulation for each configuration (common/data_mc.py)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: gather the finished configurations into the table and plots")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def step(name: str, main, argv: list) -> float:
    """A step's main(argv) in this process, its chatter to stderr; the wall seconds. A step that
    fails raises InputError naming it (its own error lines are already printed)."""
    t0 = time.perf_counter()
    try:
        with redirect_stdout(sys.stderr):
            code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    if code:
        raise runtime.InputError(f"{name} exited with code {code}")
    return time.perf_counter() - t0


def fit_warmup(steps: int) -> int:
    return min(step2_fit.WARMUP_STEPS, steps // 4)


def encode_speed(tok_path: Path, eval_path: Path) -> float:
    """Objects per second of the tokenizer's encode on its held-out sample (--threads threads; the
    compiled code search warmed up first; a transformer encoder with the sample's events)."""
    tok = load_tokenizer(tok_path)
    with np.load(eval_path) as z:
        feats = {k: z[f"orig/{k}"] for k in tok.features}
        events = z["events"] if "events" in z.files else None
    n = len(next(iter(feats.values())))
    tok.encode({k: v[:64] for k, v in feats.items()}, None if events is None else events[:64])
    t0 = time.perf_counter()
    tok.encode(feats, events)
    return n / (time.perf_counter() - t0)


def judge(tok_dir: Path, d: Path, task: list[dict], args) -> dict:
    """(D) and the apply speed of (E): the task tokenized with tok_dir into d/tokens, and the scratch
    classifier trained on it in d/finetune (its test scores kept for the paired comparison)."""
    common_flags = ["--seed", args.seed, "--threads", args.threads]
    task_h5 = [info["path"] for info in task]
    apply_seconds = step("step2_apply", step2_apply.main, [
        "--h5", *task_h5, "--tokenizers", tok_dir, "--out-dir", d / "tokens", "--cap", args.cap,
        "--device", "cpu", "--overwrite", *common_flags])
    step("step4_finetune", step4_finetune.main, [
        "--parquet", *(d / "tokens" / f"{Path(p).stem}.parquet" for p in task_h5), "--signal", args.signal,
        "--background", args.background, "--arms", "scratch", "--steps", args.finetune_steps, "--eval-every",
        args.finetune_eval_every, "--workers", 1, "--device", "cpu", "--out-dir", d / "finetune", "--no-plots",
        "--overwrite", *common_flags])
    return {**S.auc_columns(json.loads((d / "finetune" / "metrics.json").read_text())),
            "finetune_steps": args.finetune_steps,
            "apply_events_per_s": sum(info["n_events"] for info in task) / apply_seconds}


def run_reference(task: list[dict], objects: list[str], args) -> dict:
    """The reference tokenizers judged as every configuration is; their encode speed per scanned object."""
    d, ref = Path(args.out_dir) / REFERENCE["id"], Path(args.reference_tokenizers)
    row = judge(ref, d, task, args)
    for obj in objects:
        if (ref / f"{obj}.eval.npz").exists():
            row[f"encode_objects_per_s_{obj}"] = encode_speed(ref / f"{obj}.pt", ref / f"{obj}.eval.npz")
    runtime.write_json(d / "result.json", row)  # last: the reference is done
    return row


def run_config(cfg: dict, h5: list[str], task: list[dict], args) -> dict:
    """Fit, tokenize the task, train the quick classifier; the configuration's row of the table."""
    obj, d = cfg["object"], Path(args.out_dir) / "configs" / cfg["id"]
    tok_dir = d / "tok"  # the reference tokenizers of the other types, and this configuration's fit
    tok_dir.mkdir(parents=True, exist_ok=True)
    for o in TOKENIZED_OBJECTS:
        if o != obj:
            for ext in (".pt", ".json"):
                shutil.copy2(Path(args.reference_tokenizers) / f"{o}{ext}", tok_dir / f"{o}{ext}")
    fit_seconds = step("step2_fit", step2_fit.main, [
        "--h5", *h5, "--out-dir", tok_dir, "--objects", obj, "--steps", args.fit_steps,
        "--warmup-steps", fit_warmup(args.fit_steps), "--workers", 1, "--no-plots", "--overwrite",
        "--nested-levels", "none", *S.fit_flags(cfg["settings"]), "--seed", args.seed, "--threads", args.threads])
    judged = judge(tok_dir, d, task, args)
    sidecar = json.loads((tok_dir / f"{obj}.json").read_text())
    row = {"config": cfg["id"], "object": obj, **{f"axis_{k}": json.dumps(v) if isinstance(v, list) else v
                                                  for k, v in cfg["settings"].items()},
           **S.quality_columns(sidecar), **judged, "fit_seconds": fit_seconds, "fit_steps": args.fit_steps,
           "encode_objects_per_s": encode_speed(tok_dir / f"{obj}.pt", tok_dir / f"{obj}.eval.npz")}
    if args.data_mc:  # the fitted tokenizer only: the reference ones are the same in every configuration
        row.update(data_mc.summary(data_mc.write_data_mc(tok_dir, [describe_file(p) for p in h5], [obj],
                                                         plots=not args.no_plots)))
    closure = next((p for p in (d / "closure.json", tok_dir / "closure.json") if p.exists()), None)
    if closure:  # the decoded-physics closure of this tokenizer set, where the fit writes one
        row.update(S.closure_columns(json.loads(closure.read_text())))
    runtime.write_json(d / "result.json", row)  # last: the configuration is done
    return row


def collect(out: Path, args) -> pd.DataFrame:
    """Every finished configuration under out/configs (whichever shard ran it), one row each; with the
    reference done, a row per scanned object for its reference tokenizer and every row's AUC against
    the reference's on the same test events."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "configs").glob("*/result.json"))]
    ref_dir = out / REFERENCE["id"]
    if not (ref_dir / "result.json").exists():
        return pd.DataFrame(rows)
    judged = json.loads((ref_dir / "result.json").read_text())
    tok = Path(args.reference_tokenizers)
    closure = S.closure_columns(json.loads((tok / "closure.json").read_text())) if (tok / "closure.json").exists() else {}
    for obj in sorted({r["object"] for r in rows}):
        sidecar = json.loads((tok / f"{obj}.json").read_text())
        rows.append({"config": f"{obj}-reference", "object": obj, "reference": True, **S.quality_columns(sidecar),
                     **{k: v for k, v in judged.items() if not k.startswith("encode_objects_per_s")},
                     "fit_steps": sidecar["settings"].get("steps"),
                     "encode_objects_per_s": judged.get(f"encode_objects_per_s_{obj}"), **closure})
    signal = {p.strip() for p in args.signal.split(",") if p.strip()}
    reference_scores = ref_dir / "finetune" / "test_scores.npz"
    for r in rows:
        d = ref_dir if r.get("reference") else out / "configs" / r["config"]
        try:
            r.update(S.paired_auc_columns(d / "finetune" / "test_scores.npz", reference_scores, signal,
                                          step4_finetune.BOOTSTRAP, args.seed))
        except ValueError as exc:  # e.g. a configuration tokenized with another --cap: no paired comparison
            print(f"error: {exc}", file=sys.stderr)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.set_threads(args.threads)
    objects = [o.strip() for o in args.objects.split(",") if o.strip()]
    bad = [o for o in objects if o not in TOKENIZED_OBJECTS]
    if bad or not objects:
        runtime.die(f"--objects: unknown object type(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TOKENIZED_OBJECTS)}")
    if not args.grid and not args.axis:
        runtime.die("no grid: give --grid FILE and/or --axis AXIS=V1,V2")
    if min(args.fit_steps, args.finetune_steps, args.finetune_eval_every) < 1:
        runtime.die("--fit-steps, --finetune-steps and --finetune-eval-every must be at least 1")
    try:
        grid = S.load_grid(args.grid, args.axis)
        S.check_reference(args.reference_tokenizers, objects)
        configs = runtime.select_shard([REFERENCE, *S.configurations(grid, objects)], args.shard)
    except ValueError as exc:
        runtime.die(str(exc))
    infos, errors = runtime.process_inputs(runtime.input_files(args.h5), describe_file)  # an unreadable file: one line
    h5 = [info["path"] for info in infos]
    processes = {p.strip() for p in f"{args.signal},{args.background}".split(",") if p.strip()}
    task = [info for info in infos if str(info["meta"].get("process", "")) in processes]
    if not task:
        runtime.die(f"--h5: no readable HDF5 files of the task's processes ({', '.join(sorted(processes))})")
    if args.data_mc and (cause := data_mc.missing_side(infos)):
        runtime.die(f"--data-mc: {cause}")
    out = runtime.output_dir(args.out_dir)

    def one(cfg: dict) -> None:
        where = out / REFERENCE["id"] if cfg is REFERENCE else out / "configs" / cfg["id"]
        if (where / "result.json").exists():
            print(f"[scan] {cfg['id']}: done, skipping")
            return
        print(f"[scan] {cfg['id']}: {cfg['settings'] or 'the reference tokenizers'}", flush=True)
        if cfg is REFERENCE:
            row = run_reference(task, objects, args)
            print(f"[scan] {cfg['id']}: AUC {row['auc']:.4f}", flush=True)
            return
        row = run_config(cfg, h5, task, args)
        print(f"[scan] {cfg['id']}: pT resolution {row['pt_resolution']:.4f}, AUC {row['auc']:.4f}, "
              f"fit {row['fit_seconds']:.0f} s", flush=True)

    if not args.table_only:
        errors += runtime.process_inputs(configs, one, label=lambda cfg: cfg["id"])[1]  # a failure: one line, the rest go on
    table = collect(out, args)
    if len(table):
        with runtime.atomic_output(out / "scan.csv") as tmp:
            table.to_csv(tmp, index=False)
        with runtime.atomic_output(out / "scan.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        print(f"[scan] {len(table)} configuration(s) in {out / 'scan.csv'} and scan.parquet")
        if not args.no_plots:
            from plotting.plot_scan import plot_scan

            plot_scan(table, out / "plots")
    return runtime.exit_code(errors)


if __name__ == "__main__":
    runtime.bound_heap_growth()
    sys.exit(main())
