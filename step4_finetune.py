"""Step 4: signal-vs-background or multi-class classifiers on the token sequences, honest baselines, metrics.json.

Arms (all evaluated on the same test split, the one pretraining never saw):
  scratch        the event transformer + classifier head, randomly initialised
  finetune       the same, initialised from step3's backbone (--init)
  frozen         a logistic-regression probe on the frozen backbone's event representation
  continuous     the same transformer fed normalised continuous features from the HDF5 (what tokenization costs)
  counts_gbdt    gradient boosting on object multiplicities and sequence length ("event shape" leakage)
  standard_gbdt  gradient boosting on the physicists' high-level variables (m4l, Z masses, ...)
The networks read the event representation pretraining trains: the mean of the object states
(--pooling); with --observables also, beside it, the event observables that the backbone's head from
step3's event objective predicts from it (scratch gets the same head, untrained): the frozen probe
gains, generalisation to unseen backgrounds loses (bench/README.md, "The observables head").
Every network trains for the same number of optimiser steps at every label fraction, with early
stopping on the validation AUC (the whole validation split, for every arm).

Tasks: binary (--signal vs --background; label 1 is signal) or multi-class (--classes
"ggF=hzz4l;VBF=vbfh4l;VH=whh4l,zhh4l": a softmax head over n classes, metrics per class one vs the
rest, the macro AUC (their mean) as the headline AUC, accuracy and the confusion matrix).
Event weights (--weighting, common/classifier_task.py): `events` weighs each event by its generator
weight; `xsec` by generator weight x cross-section / sum of weights of its process (step1 /metadata),
the physical mixture. Every metric uses these weights with their sign (negative NLO weights subtract,
as they should); the loss uses their absolute values (a negative weight in a cross-entropy would reward
misclassifying its event without bound) scaled so every class weighs the same.

Protocols: --seeds (every arm repeated; mean, spread, and each test AUC with a bootstrap
interval), --label-fractions (data efficiency: every arm at each fraction of the train labels,
with the paired test-set interval of finetune - scratch and frozen - counts_gbdt, on the macro AUC
for classes), and
--test-background (generalisation to backgrounds not trained on). A protocol entry that cannot
be computed (a class without events at a fraction, say) is reported as such; the rest is written.

  python step4_finetune.py --parquet runs/x/tokens/*.parquet --signal hzz4l --background zz4l,ttbar,dy \
      --init runs/x/pretrain/backbone.pt --h5-dir runs/x/h5 --out-dir runs/x/finetune
"""
from __future__ import annotations

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch, numba or lightgbm load)

import argparse
import copy
import multiprocessing
import sys
import time
from dataclasses import asdict, replace
from concurrent.futures import ProcessPoolExecutor
from itertools import count
from pathlib import Path

import lightgbm as lgb
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from common import distributed as D
from common import highlevel
from common import training as T
from common.classifier_metrics import (auc_rows, binary_metrics, multiclass_metrics, paired_auc_difference, summarize_seeds,
                                       verdict)
from common.classifier_task import (WEIGHTINGS, binary_task, csv_list, multiclass_task, parse_classes, resolve,
                                    xsec_scale)
from common.continuous_inputs import ContinuousFeatures, h5_locations
from common.event_data import SequenceStream, fraction_keep, open_sequences
from common.constituent_model import open_reader
from common.pair_kinematics import open_kinematics
from common.runtime import (EXIT_OK, EXIT_SOME_FAILED, die, first_line, input_files, output_dir, provenance,
                            seed_everything, set_threads, usable_cpus, write_json)
from common.schema import TOKENIZED_OBJECTS
from common.token_parquet import SPLITS, read_vocab, recorded_tokenizers
from common.transformer import (EventClassifier, EventTransformer, ModelConfig, check_vocab, codebook_table, granularity,
                                load_backbone, save_module)

# --- defaults (the run_all setting: a few minutes on 2 CPU cores for ~4 x 5000 events) -----------------
OUT_DIR = "runs/finetune"
ARMS = "scratch,finetune,frozen,continuous,counts_gbdt,standard_gbdt"
POOLING = "mean"  # the representation step3 pretrains; "cls" reads the [CLS] state
OBSERVABLES = False  # True: the networks and the probe also read the backbone's predicted event observables
STEPS = 300  # optimiser steps of every network training at least, whatever the number of labels ...
EPOCHS = 6  # ... and at least this many passes over its labelled events: 300 steps are 2 passes over the 8 432
#             labels of the run_all task, which left every network short; 8 passes gain a little more at 100% of
#             the labels (+0.004 to +0.008 AUC over 5) than run_all's 15 minutes can take (bench/README.md)
EVAL_EVERY = 50  # steps between validation AUCs
PATIENCE = 6  # validation AUCs without improvement before stopping
BATCH_SIZE = 64
LR = 1e-3  # head, and the whole model for scratch / continuous
BACKBONE_LR = 1e-3  # the pretrained backbone in finetune mode (3e-4 left it below scratch: bench/README.md)
HEAD_FIRST = 0.5  # finetune: the fraction of the steps in which the new head trains alone on the frozen backbone before
#                  both train (probe, then fine-tune): +0.02 AUC at 1% and 10% of the labels (bench/README.md)
WARMUP_FRACTION = 0.1
PROBE_C = 1.0  # inverse L2 strength of the frozen probe (on standardised features)
SHUFFLE_BUFFER = 16384
VAL_CACHE_EVENTS = 50_000  # validation splits up to this size stay in memory during a training (1-2 kB per event)
GBDT_TREES, GBDT_LEAVES, GBDT_LR, GBDT_STOP = 400, 15, 0.05, 30
BOOTSTRAP = 200  # resamples of the test set for each AUC's 95% interval
SEED = 1
WORKERS = 0  # trainings run side by side, one thread each (0: one per usable CPU). The models are small:
#              two trainings of one thread do ~1.8x the work of one training of two (bench/README.md)
NET_ARMS = ("scratch", "finetune", "continuous")
ALL_ARMS = NET_ARMS + ("frozen", "counts_gbdt", "standard_gbdt")
PAIRS = (("finetune", "scratch"), ("frozen", "counts_gbdt"))  # the data-efficiency verdicts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parquet", nargs="+", required=True, help="step2 token Parquet files (or directories)")
    p.add_argument("--signal", "--signal-process", dest="signal", default="",
                   help="process names or dataset ids, comma separated (under torchrun spell it --signal-process: "
                        "torchrun's own parser takes --signal as an abbreviation of its --signals-to-handle)")
    p.add_argument("--background", default="", help="process names or dataset ids, comma separated")
    p.add_argument("--test-background", default="", help="backgrounds only tested on (generalisation protocol)")
    p.add_argument("--classes", default="", help="a multi-class task instead of --signal/--background: "
                   "'name=process,process;name=process;...' (names optional), processes or dataset ids")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="events",
                   help="event weights of the metrics and the loss: generator weights (events), or x cross-section "
                        "/ sum of weights of the process from the step1 HDF5 /metadata (xsec)")
    p.add_argument("--init", default=None, help="step3 backbone.pt (needed by finetune and frozen)")
    p.add_argument("--arms", default=ARMS)
    p.add_argument("--pooling", choices=("mean", "cls"), default=POOLING, help="the event representation")
    p.add_argument("--observables", action="store_true", default=OBSERVABLES,
                   help="the networks and the frozen probe also read the event observables the backbone predicts "
                        "(its event-objective head): a better probe, a worse generalisation (bench/README.md)")
    p.add_argument("--h5-dir", default=None, help="step1 HDF5 folder (default: the inputs recorded in the Parquet)")
    p.add_argument("--tokenizers", default=None, help="step2 tokenizer folder (default: recorded in the Parquet)")
    p.add_argument("--out-dir", default=OUT_DIR)
    p.add_argument("--seeds", default="", help="repeat every training with these seeds (default: --seed)")
    p.add_argument("--label-fractions", default="", help="e.g. 0.01,0.1,1: the data-efficiency protocol")
    p.add_argument("--fraction-arms", default="", help="the arms also trained below 100%% of the labels (default: all)")
    T.add_model_args(p)
    p.add_argument("--steps", type=int, default=STEPS, help="optimiser steps of every network training, at least")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help="passes over the labelled events of a network training, at least (the steps are the larger)")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    p.add_argument("--patience", type=int, default=PATIENCE)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--backbone-lr", type=float, default=BACKBONE_LR)
    p.add_argument("--head-first", type=float, default=HEAD_FIRST, metavar="FRACTION",
                   help="finetune: the fraction of --steps in which the new head trains alone on the frozen backbone")
    p.add_argument("--weight-decay", type=float, default=T.WEIGHT_DECAY)
    p.add_argument("--warmup-fraction", type=float, default=WARMUP_FRACTION)
    p.add_argument("--grad-clip", type=float, default=T.GRAD_CLIP)
    p.add_argument("--probe-c", type=float, default=PROBE_C)
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER)
    p.add_argument("--gbdt-trees", type=int, default=GBDT_TREES, help="most boosting rounds of the GBDT baselines")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="test-set resamples for the AUC intervals")
    T.add_runtime_args(p)
    p.add_argument("--workers", type=int, default=WORKERS,
                   help="trainings run at once, each on one thread (0: the usable CPUs; 1 under torchrun or on a GPU)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.classes and (args.signal or args.background or args.test_background):
        p.error("--classes replaces --signal, --background and --test-background")
    if not args.classes and not (args.signal and args.background):
        p.error("give --signal and --background (a binary task), or --classes")
    args.arm_list = csv_list(args.arms)
    bad = [a for a in args.arm_list + csv_list(args.fraction_arms) if a not in ALL_ARMS]
    if bad:
        p.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(ALL_ARMS)}")
    if args.observables and not args.init:
        p.error("--observables reads the head of a pretrained backbone: give --init")
    if {"finetune", "frozen"} & set(args.arm_list) and not args.init:
        args.arm_list = [a for a in args.arm_list if a not in ("finetune", "frozen")]
        print("note: no --init backbone: the finetune and frozen arms are skipped", file=sys.stderr)
    try:
        args.seed_list = [int(s) for s in csv_list(args.seeds)] or [args.seed]
        args.fractions = sorted({1.0, *(float(f) for f in csv_list(args.label_fractions))}, reverse=True)
    except ValueError as exc:
        p.error(f"--seeds / --label-fractions: {exc}")
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error("--label-fractions must lie in (0, 1]")
    if not 0 <= args.head_first < 1:
        p.error(f"--head-first {args.head_first} must lie in [0, 1)")
    if min(args.gbdt_trees, args.bootstrap, args.steps, args.eval_every, args.patience) < 1 or args.epochs < 0:
        p.error("--gbdt-trees, --bootstrap, --steps, --eval-every and --patience must be at least 1, --epochs at least 0")
    T.check_model_args(p, args)
    return args


# --- the task -----------------------------------------------------------------------------------------

def define_task(args, totals: dict):
    """The binary or multi-class task of the flags (common/classifier_task.py); ValueError for a process
    that matches no events, one in two classes, or fewer than two classes."""
    if args.classes:
        task = multiclass_task(parse_classes(args.classes), totals)
    else:
        background = resolve(csv_list(args.background), totals, "background")
        task = binary_task(resolve(csv_list(args.signal), totals, "signal"), background,
                           [b for b in resolve(csv_list(args.test_background), totals, "test background") if b not in background])
    task.weighting = args.weighting
    return task


def task_members(task) -> dict:
    """What a saved classifier records of its task."""
    return {"signal": task.signal, "background": task.background} if task.binary else \
        {"classes": dict(zip(task.names, task.members))}


# --- network arms -----------------------------------------------------------------------------------

def inputs(batch, device, feats=None):
    return [*T.to_device(batch, device), torch.from_numpy(feats(batch)).to(device) if feats else None,
            T.constituent_tensors(batch, device),
            torch.from_numpy(batch["kinematics"]).to(device) if "kinematics" in batch else None]


@torch.no_grad()
def score(model, batches, device, amp, feats=None, desc="score", progress=True) -> dict[str, np.ndarray]:
    """Class probabilities (N, K) of every event of some batches, with process and weight."""
    model.eval()
    out = {"score": [], "process": [], "weight": []}
    for batch in tqdm(batches, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(*inputs(batch, device, feats))
        out["score"].append(torch.softmax(logits.float(), -1).cpu().numpy())
        out["process"].append(batch["process"])
        out["weight"].append(batch["weight"])
    return {k: np.concatenate(v) for k, v in out.items()}


def weighted_auc(s: dict, task) -> float:
    """The validation AUC under the task's weighting (the macro AUC for classes); NaN without every class."""
    y, w = task.labels(s["process"]), task.event_weights(s["process"], s["weight"])
    score = s["score"][:, 1] if task.binary else s["score"]
    return float(auc_rows(y, score, w[None])[0]) if len(np.unique(y)) == len(task.names) else float("nan")


def build_network(arm: str, cfg: ModelConfig, args, cont: ContinuousFeatures | None, n_classes: int,
                  code_table: np.ndarray | None = None) -> EventClassifier:
    """code_table: the codebook vectors of scratch's code geometry without --init (with it: the backbone's)."""
    if arm == "finetune":
        backbone, _ = load_backbone(args.init, dropout=args.dropout)
    elif arm == "continuous":  # features replace the codes: one vector per object, no sub-tokens
        backbone = EventTransformer(replace(cfg, continuous_dims=cont.continuous_dims(), code_dim=0, id_levels=0,
                                            granularity="object", slot_groups={}))
    else:
        backbone = EventTransformer(cfg)
        if cfg.code_dim:  # scratch: the pretrained backbone's architecture, code geometry included. Loaded here,
            # after this network's initial draws and before its head's: loading it once in prepare instead moves the
            # head's initial weights and with them every recorded scratch figure (0.929 -> 0.925 at 100%, seed 1)
            backbone.set_code_vectors(code_table if args.init is None else load_backbone(args.init)[0].code_vectors.numpy())
    return EventClassifier(backbone, args.pooling, n_classes, args.observables)


def forever(stream: SequenceStream):
    """Batches epoch after epoch: the trainings count optimiser steps, not epochs."""
    for epoch in count():
        empty = True
        for batch in stream.batches(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"no labelled training events for this rank (batch {stream.batch_size})")


def training_steps(args, n_events: int, world: int = 1) -> int:
    """Optimiser steps of a network training on n_events labelled events: --steps, or --epochs passes
    over them where that is more (the same for every arm at a label fraction)."""
    return max(args.steps, args.epochs * -(-n_events // (args.batch_size * world)))


def train_network(arm, ctx, fraction, seed, desc=""):
    """One network arm for a fixed number of steps, early-stopped on the validation AUC.
    Returns (test scores, history, model)."""
    args, dist, task = ctx["args"], ctx["dist"], ctx["task"]
    torch.manual_seed(seed)
    cont = ctx["cont"] if arm == "continuous" else None
    streams = ctx["streams"](fraction, cont)  # the continuous arm's batches carry their HDF5 features
    steps = training_steps(args, ctx["n_train"](fraction), dist.world)
    model = build_network(arm, ctx["cfg"], args, cont, len(task.names), ctx["code_table"]).to(dist.device)
    groups = [{"params": list(model.head.parameters()), "lr": args.lr},
              {"params": list(model.backbone.parameters()), "lr": args.backbone_lr if arm == "finetune" else args.lr}]
    opt = T.adamw(groups, weight_decay=args.weight_decay)
    backbone_waits = int(args.head_first * steps) if arm == "finetune" else 0
    sched = T.warmup_cosine(opt, steps, args.warmup_fraction, hold=[0, backbone_waits])
    # the backbone's parameters take no gradient while it waits: DDP must not wait for them
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=backbone_waits > 0) if dist.active else model
    amp, feats = T.use_amp(args.amp, dist.device), (lambda b: b["features"]) if cont else None
    bars = ctx["progress"]
    best, best_auc, history, waited, loss_sum, t0 = None, -1.0, [], 0, 0.0, time.perf_counter()
    batches = forever(streams["train"])
    # a small validation split is read and decoded once, not at every evaluation (0.7 s of 2.2 s at run_all's size)
    val = list(streams["val"].batches(0)) if ctx["n_val"] <= VAL_CACHE_EVENTS else None
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False, disable=not bars, file=sys.stderr):
        ddp.train()
        if backbone_waits:  # the head trains alone on the frozen backbone: no dropout, no backbone gradients
            model.backbone.train(step > backbone_waits).requires_grad_(step > backbone_waits)
        batch = next(batches)
        y, w = task.train_weights(batch["process"], batch["weight"])
        y, w = torch.from_numpy(y).to(dist.device), torch.from_numpy(w).float().to(dist.device)
        with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = ddp(*inputs(batch, dist.device, feats))
        loss = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum() / w.sum().clamp(min=1e-12)
        T.optimiser_step(loss, model, opt, sched, args.grad_clip)
        loss_sum += loss.item()
        if step % args.eval_every and step != steps:
            continue
        val_auc = weighted_auc(score(model, val or streams["val"].batches(0), dist.device, amp, feats, "val", bars), task)
        history.append({"step": step, "train_loss": loss_sum / args.eval_every, "val_auc": val_auc,
                        "seconds": round(time.perf_counter() - t0, 2)})
        loss_sum = 0.0
        if val_auc > best_auc:
            best, best_auc, waited = copy.deepcopy(model.state_dict()), val_auc, 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    model.load_state_dict(best)
    if model.backbone.constituents is not None:
        model.backbone.constituents.reset()  # the usage reported is the test split's
    return score(model, streams["test"].batches(0), dist.device, amp, feats, f"{arm} test", bars), history, model


@torch.no_grad()
def embeddings(model: EventClassifier, stream, device) -> dict[str, np.ndarray]:
    """The frozen backbone's event representation of every event of a stream."""
    model.eval()
    out = {"x": [], "process": [], "weight": []}
    for batch in stream.batches(0):
        out["x"].append(model.embed(*inputs(batch, device)).float().cpu().numpy())
        out["process"].append(batch["process"])
        out["weight"].append(batch["weight"])
    return {k: np.concatenate(v) for k, v in out.items()}


def train_probe(ctx, fraction, seed):
    """The frozen arm: a logistic regression on the standardised event representation.
    Returns (test scores, history, None)."""
    args, task = ctx["args"], ctx["task"]
    if "frozen" not in ctx["cache"]:  # the test representation does not depend on the fraction or seed
        ctx["cache"]["frozen"] = EventClassifier(load_backbone(args.init)[0], args.pooling,
                                                 observables=args.observables).to(ctx["dist"].device)
        ctx["cache"]["frozen_test"] = embeddings(ctx["cache"]["frozen"], ctx["test"], ctx["dist"].device)
    train = embeddings(ctx["cache"]["frozen"], ctx["streams"](fraction)["train"], ctx["dist"].device)
    test = ctx["cache"]["frozen_test"]
    y, w = task.train_weights(train["process"], train["weight"])
    scaler = StandardScaler().fit(train["x"])
    probe = LogisticRegression(C=args.probe_c, max_iter=2000, random_state=seed)
    probe.fit(scaler.transform(train["x"]), y, sample_weight=w)
    s = {"score": probe.predict_proba(scaler.transform(test["x"])), "process": test["process"], "weight": test["weight"]}
    return s, [{"n_train": int(len(y)), "iterations": int(probe.n_iter_[0])}], None


# --- gradient-boosted baselines ----------------------------------------------------------------------

def count_features(batch: dict, vocab: dict) -> np.ndarray:
    """Object multiplicities per type and the sequence length: all the 'event shape' a sequence leaks."""
    types = batch["token_type_ids"] * (batch["attention_mask"] > 0)
    cols = [(types == vocab["type_ids"][o]).sum(1) for o in TOKENIZED_OBJECTS if o in vocab["ranges"]]
    return np.stack(cols + [batch["attention_mask"].sum(1)], 1).astype(np.float32)


def count_names(vocab: dict) -> list[str]:
    return [f"n_{o}" for o in TOKENIZED_OBJECTS if o in vocab["ranges"]] + ["length"]


def collect(stream: SequenceStream, fn) -> dict[str, np.ndarray]:
    out = {"x": [], "process": [], "weight": [], "source_file": [], "event_index": []}
    for batch in stream.batches(0):
        out["x"].append(fn(batch))
        for k in ("process", "weight", "source_file", "event_index"):
            out[k].append(batch[k])
    return {k: np.concatenate(v) for k, v in out.items()}


def gbdt_data(arm: str, ctx) -> dict:
    """Features of every labelled event of the three splits, read once per arm."""
    if arm not in ctx["cache"]:
        vocab = ctx["vocab"]
        fn = (lambda b: count_features(b, vocab)) if arm == "counts_gbdt" else (lambda b: np.zeros((len(b["weight"]), 0)))
        data = {sp: collect(replace(ctx[sp], kinematics=None), fn) for sp in ("train_all", "val", "test")}
        if arm == "standard_gbdt":
            for d in data.values():
                d["x"] = highlevel.for_events(d["source_file"], d["event_index"], ctx["h5_files"])
        ctx["cache"][arm] = data
    return ctx["cache"][arm]


def label_subset(data: dict, fraction: float, seed: int) -> dict:
    """The events of `data` that the label fraction keeps (the same selection as SequenceStream)."""
    keep = np.zeros(len(data["event_index"]), bool)
    for name in np.unique(data["source_file"]):
        rows = data["source_file"] == name
        keep[rows] = fraction_keep(name, data["event_index"][rows], fraction, seed)
    return {k: v[keep] for k, v in data.items()}


def train_gbdt(arm, ctx, fraction, seed):
    """A GBDT baseline, early-stopped on the validation AUC. Returns (test scores, history, model)."""
    args, task = ctx["args"], ctx["task"]
    data = gbdt_data(arm, ctx)
    train = label_subset(data["train_all"], fraction, args.seed)
    y, w = task.train_weights(train["process"], train["weight"])
    yv, wv = task.train_weights(data["val"]["process"], data["val"]["weight"])
    metric = "auc" if task.binary else "multi_logloss"
    model = lgb.LGBMClassifier(n_estimators=args.gbdt_trees, num_leaves=GBDT_LEAVES, learning_rate=GBDT_LR,
                               random_state=seed, n_jobs=torch.get_num_threads(), verbose=-1, subsample=0.8,
                               subsample_freq=1, min_child_samples=min(20, max(2, len(y) // 10)))
    model.fit(train["x"], y, sample_weight=w, eval_X=(data["val"]["x"],), eval_y=(yv,), eval_sample_weight=[wv],
              eval_metric=metric, callbacks=[lgb.early_stopping(GBDT_STOP, verbose=False)])
    test = data["test"]
    s = {"score": model.predict_proba(test["x"]), "process": test["process"], "weight": test["weight"]}
    names = count_names(ctx["vocab"]) if arm == "counts_gbdt" else list(highlevel.NAMES)
    history = [{"best_iteration": int(model.best_iteration_ or args.gbdt_trees),
                f"val_{metric}": float(model.best_score_["valid_0"][metric]),
                "feature_importance": dict(zip(names, model.feature_importances_.tolist()))}]
    return s, history, model


# --- evaluation ----------------------------------------------------------------------------------------

def evaluate(s: dict, task, seed: int, n_bootstrap: int) -> tuple[dict, dict]:
    """Metrics under the task's weighting. Binary: against the trained backgrounds, and against each
    background alone (generalisation; a background without test events is reported as not
    computable). Classes: one vs the rest per class, macro AUC, accuracy, confusion matrix."""
    w = task.event_weights(s["process"], s["weight"])
    if not task.binary:
        y = task.labels(s["process"])
        return {**multiclass_metrics(y, s["score"], w, task.names, n_bootstrap, seed), "weighting": task.weighting}, {}

    def subset(bkgs):
        keep = np.isin(s["process"], task.signal + bkgs)
        return {**binary_metrics(np.isin(s["process"][keep], task.signal), s["score"][keep], w[keep],
                                 n_bootstrap=n_bootstrap, seed=seed), "weighting": task.weighting}
    per_background = {}
    for b in task.background + task.test_background:
        try:
            per_background[b] = subset([b])
        except ValueError as exc:
            per_background[b] = {"error": f"not computable: {exc}"}
    return subset(task.background), per_background


def run_arm(arm, ctx, fraction, seed):
    """(test scores, history, model) of one arm at one label fraction and seed; the scores are the
    class probabilities (N, K), or the signal probability (N,) of a binary task."""
    if arm in NET_ARMS:
        s, history, model = train_network(arm, ctx, fraction, seed, desc=f"{arm} f={fraction} seed {seed}")
    elif arm == "frozen":
        s, history, model = train_probe(ctx, fraction, seed)
    else:
        s, history, model = train_gbdt(arm, ctx, fraction, seed)
    if ctx["task"].binary:
        s["score"] = s["score"][:, 1]
    return s, history, model


def verdicts(scores: dict, task, args) -> dict:
    """Per label fraction, the paired test-set difference of the AUCs (macro AUCs for classes) of
    each pair of arms under the task's weighting (mean over seeds, 95% bootstrap interval over test
    events): 'better' only outside the interval."""
    out = {}
    for fraction, arms in scores.items():
        for a, b in PAIRS:
            if a not in arms or b not in arms:
                continue
            seeds = sorted(set(arms[a]) & set(arms[b]))
            if not seeds:
                continue
            ref = arms[a][seeds[0]]
            y, w = task.labels(ref["process"]), task.event_weights(ref["process"], ref["weight"])
            keep = y >= 0
            d = paired_auc_difference(y[keep], w[keep],
                                      np.stack([arms[a][s]["score"][keep] for s in seeds]),
                                      np.stack([arms[b][s]["score"][keep] for s in seeds]), args.bootstrap, args.seed)
            d["verdict"] = verdict(d["ci95"])
            out.setdefault(str(fraction), {})[f"{a}_minus_{b}"] = {
                **d, "seeds": seeds, "metric": "AUC" if task.binary else "macro AUC", "weighting": task.weighting}
    return out


def score_arrays(scores: dict, task, first_seed: int) -> dict[str, np.ndarray]:
    """test_scores.npz: the test events' process, generator weight, task label (-1: not in the task) and task
    weight; each arm's scores at 100% of the labels and the first seed (score_<arm>, the plots'), and those of every
    label fraction and seed (score_<arm>_<fraction>_seed<seed>), so that two runs on the same test events can be
    compared pair by pair (bench/compare_classifiers.py)."""
    ref = next(s for arms in scores.values() for seeds in arms.values() for s in seeds.values())
    out = {"process": ref["process"].astype(str), "weight": ref["weight"], "label": task.labels(ref["process"]),
           "event_weight": task.event_weights(ref["process"], ref["weight"])}
    out.update({f"score_{a}": s[first_seed]["score"] for a, s in scores.get(1.0, {}).items() if first_seed in s})
    out.update({f"score_{a}_{fraction:g}_seed{seed}": s["score"] for fraction, arms in scores.items()
                for a, seeds in arms.items() for seed, s in seeds.items()})
    return out


def prepare(args, dist) -> dict:
    """Everything a training needs: the sequences, the vocabulary, the task and its splits. Bad
    input ends here, in one line."""
    sidecar = None
    if args.init:
        try:
            _, sidecar = load_backbone(args.init)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            die(f"{args.init}: cannot load the backbone: {first_line(exc)}")
    vocab, paths, errors = open_sequences(input_files(args.parquet), want=sidecar and sidecar.get("vocab_checksum"))
    cfg = ModelConfig.from_vocab(vocab, **T.model_sizes(args)) if vocab else None
    if sidecar and paths:
        theirs, ours = granularity(sidecar.get("vocab") or {}), granularity(vocab)
        if theirs != ours:
            die(f"{args.init}: the backbone was pretrained on {theirs}-granularity tokens, these token files are "
                f"{ours}-granularity (step2 fit --granularity); re-tokenize or re-pretrain", EXIT_SOME_FAILED)
        if sidecar.get("representation", "cls") != args.pooling:
            die(f"{args.init}: the backbone was pretrained for the '{sidecar.get('representation', 'cls')}' event "
                f"representation, not --pooling {args.pooling}")
        try:
            check_vocab(sidecar, read_vocab(paths[0]), args.init)
        except ValueError as exc:
            die(str(exc), EXIT_SOME_FAILED)
        # scratch: the backbone's architecture (its observables head only where the networks read it); the dropout
        # is this step's, as for the fine-tuned backbone: a training setting, not a part of the architecture
        cfg = ModelConfig(**{**sidecar["config"], "dropout": args.dropout, "continuous_dims": {},
                             "observables": sidecar["config"].get("observables", 0) if args.observables else 0})
        if args.observables and not cfg.observables:
            die(f"{args.init}: --observables, but the backbone has no observables head (pretrain it with the event "
                "objective)")
        if args.constituents and not cfg.constituent_dim:
            die(f"{args.init}: --constituents, but the backbone has no constituent encoder (pretrain it with --constituents)")
    if not paths:
        for line in errors:
            print(line, file=sys.stderr)
        die("no usable Parquet input", EXIT_SOME_FAILED)
    code_table = None
    if not sidecar:  # no backbone: the networks get step3's default architecture, code geometry included
        if args.code_geometry and "scratch" in args.arm_list:
            try:
                code_table = codebook_table(vocab, args.tokenizers or recorded_tokenizers(paths[0]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                die(f"code geometry (or run with --no-code-geometry) needs the step2 tokenizers: {first_line(exc)}")
            cfg = replace(cfg, code_dim=code_table.shape[1])
        cfg = replace(cfg, id_levels=T.id_levels(args.id_levels, cfg))
        if problem := T.id_levels_problem(cfg):
            die(problem)

    # The task, its event weights and its splits.
    try:
        task = define_task(args, SequenceStream(paths, vocab["levels"], args.batch_size).totals())
    except ValueError as exc:
        die(str(exc))
    if args.weighting == "xsec":
        try:
            task.scale = xsec_scale(h5_locations(paths, args.h5_dir), task.labelled + task.test_background)
        except ValueError as exc:
            die(first_line(exc), EXIT_SOME_FAILED)
    labelled, test_bkg = task.labelled, task.test_background
    failed = {}  # files whose data pages turn out unreadable: skipped where found, listed in metrics.json
    constituents = open_reader(paths, args.h5_dir, args.constituent_fallback) if cfg.constituent_dim else None
    # a pair bias (the backbone's, or --pair-bias without --init): every network arm's batches carry decoded kinematics
    networks = set(args.arm_list) & {*NET_ARMS, "frozen"}
    kinematics = open_kinematics(vocab, args.tokenizers or recorded_tokenizers(paths[0]),
                                 f"{args.init or '--pair-bias'}: the pair bias") if cfg.pair_bias and networks else None
    make = lambda split, procs, shuffle, fraction=1.0, shard=True, features=None: SequenceStream(  # noqa: E731
        paths, vocab["levels"], args.batch_size, split=SPLITS[split], processes=procs, fraction=fraction,
        fraction_seed=args.seed, shuffle_buffer=args.shuffle_buffer if shuffle else 0, seed=args.seed,
        rank=dist.rank if shard else 0, world=dist.world if shard else 1, features=features, failed=failed,
        constituents=constituents, kinematics=kinematics)
    split_totals = {}
    for split, procs in (("train", labelled), ("val", labelled), ("test", labelled + test_bkg)):
        split_totals[split] = make(split, procs, False).totals()
        for role, names in zip(task.names, task.members):
            if not any(split_totals[split].get(p, {}).get("events", 0) for p in names):
                die(f"{', '.join(paths)}: the {split} split holds no {role} events ({', '.join(names)})", EXIT_SOME_FAILED)
    task.balance(split_totals["train"])
    n_val = sum(t["events"] for t in split_totals["val"].values())
    ctx = {"args": args, "dist": dist, "task": task, "vocab": vocab, "cfg": cfg, "code_table": code_table, "cache": {},
           "cont": None, "n_val": n_val,
           "constituents": constituents,
           "paths": paths, "errors": errors, "failed": failed, "split_totals": split_totals, "progress": dist.main,
           "train_all": make("train", labelled, False, shard=False), "val": make("val", labelled, False, shard=False),
           "test": make("test", labelled + test_bkg, False, shard=False),
           "n_train": lambda fraction: make("train", labelled, False, fraction, shard=False).count(),
           "streams": lambda fraction, features=None: {
               "train": make("train", labelled, True, fraction, features=features),
               "val": make("val", labelled, False, shard=False, features=features),
               "test": make("test", labelled + test_bkg, False, shard=False, features=features)}}
    if "continuous" in args.arm_list or "standard_gbdt" in args.arm_list:
        try:
            ctx["h5_files"] = h5_locations(paths, args.h5_dir)
            if "continuous" in args.arm_list:
                ctx["cont"] = ContinuousFeatures(ctx["h5_files"], vocab, args.tokenizers or recorded_tokenizers(paths[0]))
        except (OSError, ValueError, KeyError) as exc:
            die(f"HDF5 inputs for the continuous / standard baselines: {first_line(exc)}", EXIT_SOME_FAILED)
    return ctx


# --- the trainings: in this process, or side by side in worker processes ------------------------------

def selected_val_auc(history: list[dict]) -> dict:
    """{"val_auc": the validation AUC of the network a training kept} (its best evaluation), or {} for the
    arms not early-stopped on it: what a protocol setting is chosen on, so the test split stays unread."""
    aucs = [h["val_auc"] for h in history if "val_auc" in h]
    return {"val_auc": max(aucs)} if aucs else {}


def run_job(ctx, arm, fraction, seed, save_path=None) -> dict:
    """One arm at one label fraction and seed: its test scores, history and time, or the reason it
    could not be computed. Saves the network to save_path when given."""
    t0 = time.perf_counter()
    try:
        s, history, model = run_arm(arm, ctx, fraction, seed)
    except ValueError as exc:
        return {"error": f"not computable: {first_line(exc)}"}
    if save_path and model is not None:
        save_module(save_path, model, {"arm": arm, "config": asdict(model.backbone.cfg), "pooling": ctx["args"].pooling,
                                       "history": history, **task_members(ctx["task"])})
    usage = getattr(getattr(model, "backbone", None), "constituents", None)
    return {"scores": s, "history": history, "seconds": round(time.perf_counter() - t0, 2),
            "failed": dict(ctx["failed"]),  # unreadable files met in a worker
            **({"constituents": usage.summary()} if usage is not None else {})}


_WORKER_CTX = {}


def start_worker(args) -> None:
    """A worker process: one thread, its own copy of the inputs, no per-training progress bars."""
    set_threads(1)
    seed_everything(args.seed)
    ctx = prepare(args, D.setup(args.device))
    _WORKER_CTX.update(ctx, progress=False)


def worker_job(arm, fraction, seed, save_path):
    return run_job(_WORKER_CTX, arm, fraction, seed, save_path)


def run_jobs(ctx, jobs: list[tuple]) -> dict:
    """{(arm, fraction, seed): run_job result} of every job, `--workers` at a time. The networks
    go first so the cheap baselines fill the gaps; each job seeds itself, so at one thread a result
    does not depend on the process that ran it."""
    args, dist = ctx["args"], ctx["dist"]
    workers = min(args.workers or usable_cpus(), len(jobs))
    if dist.active or dist.device.type != "cpu" or workers < 2:
        return {job[:3]: run_job(ctx, *job) for job in jobs}
    order = sorted(jobs, key=lambda job: job[0] not in NET_ARMS)
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), start_worker, (args,)) as pool:
        pending = {job[:3]: pool.submit(worker_job, *job) for job in order}
        return {key: f.result() for key, f in tqdm(pending.items(), desc=f"trainings, {workers} at a time",
                                                     file=sys.stderr, disable=not dist.main)}


def arms_at(fraction: float, args) -> list[str]:
    """The arms trained at a label fraction: all at 100%, those of --fraction-arms below."""
    below = csv_list(args.fraction_arms)
    return [a for a in args.arm_list if fraction >= 1 or not below or a in below]


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    set_threads(args.threads)
    out = Path(args.out_dir)
    if (out / "metrics.json").exists() and not args.overwrite:
        print(f"{out / 'metrics.json'} exists, skipping (use --overwrite to redo)")
        return EXIT_OK
    dist = D.setup(args.device)
    ctx = prepare(args, dist)
    task, split_totals, errors = ctx["task"], ctx["split_totals"], ctx["errors"]
    test_bkg = task.test_background
    for line in errors:
        print(line, file=sys.stderr)
    if dist.main:
        print("; ".join(f"{n}: {m}" for n, m in zip(task.names, task.members))
              + (f", test-only {test_bkg}" if test_bkg else "") + f" ({args.weighting}-weighted)"
              + f"; events train {sum(v['events'] for v in split_totals['train'].values())}, "
                f"val {sum(v['events'] for v in split_totals['val'].values())}, "
                f"test {sum(v['events'] for v in split_totals['test'].values())}")
        output_dir(out)

    # Every arm at every label fraction and seed; a protocol entry that fails is reported, the rest goes on.
    n_labelled, not_computable, jobs = {}, {}, []
    for fraction in args.fractions:
        n_labelled[fraction] = split_totals["train"] if fraction >= 1 else ctx["streams"](fraction)["train"].totals()
        missing = [role for role, names in zip(task.names, task.members)
                   if not any(n_labelled[fraction].get(p, {}).get("events", 0) for p in names)]
        for arm in arms_at(fraction, args):
            for seed in args.seed_list:
                if missing:
                    not_computable[arm, fraction, seed] = {
                        "error": f"not computable: label fraction {fraction} leaves no {' and no '.join(missing)} training events"}
                    continue
                first = fraction >= 1 and seed == args.seed_list[0] and arm in NET_ARMS and dist.main
                jobs.append((arm, fraction, seed, str(out / f"{arm}.pt") if first else None))
    results = {**not_computable, **run_jobs(ctx, jobs)}

    per_fraction, scores, training, generalisation = {}, {}, {}, {}
    for fraction in args.fractions:
        for arm in arms_at(fraction, args):
            for seed in args.seed_list:
                r = results[arm, fraction, seed]
                entry = per_fraction.setdefault(fraction, {}).setdefault(arm, [])
                if "error" in r:
                    entry.append({"seed": seed, **r})
                    if (arm, fraction, seed) not in not_computable:
                        print(f"error: {arm} at label fraction {fraction}, seed {seed}: {r['error']}", file=sys.stderr)
                    continue
                s = r["scores"]
                main_m, gen_m = evaluate(s, task, seed, args.bootstrap)
                entry.append({"seed": seed, **main_m, "train_seconds": r["seconds"], **selected_val_auc(r["history"]),
                              **({"constituents": r["constituents"]} if "constituents" in r else {})})
                scores.setdefault(fraction, {}).setdefault(arm, {})[seed] = s
                if fraction >= 1:
                    generalisation.setdefault(arm, {})[seed] = gen_m
                    if seed == args.seed_list[0]:
                        training[arm] = r["history"]
                if dist.main:
                    print(f"{arm} fraction {fraction} seed {seed}: test AUC {main_m['auc']:.4f} "
                          f"[{main_m['auc_ci95'][0]:.4f}, {main_m['auc_ci95'][1]:.4f}]")

    for r in results.values():
        ctx["failed"].update(r.get("failed", {}))
    errors += list(ctx["failed"].values())
    if dist.main:
        metrics = {
            "task": {**task.describe(), "events": split_totals, "seeds": args.seed_list, "pooling": args.pooling,
                     "model_selection": f"validation {'AUC' if task.binary else 'macro AUC'} ({args.weighting}-weighted) "
                                        "on the whole validation split, every arm (GBDTs: "
                                        f"{'AUC' if task.binary else 'multi-class log loss'})"},
            "arms": arm_summaries(per_fraction.get(1.0, {})), "training": training,
            "generalisation": {"trained_on": task.background if task.binary else task.labelled,
                               "tested_on": task.background + test_bkg if task.binary else task.labelled,
                               "arms": generalisation_summary(generalisation)},
            "data_efficiency": data_efficiency(per_fraction, n_labelled, args, dist.world),
            "pretraining_verdict": verdicts(scores, task, args),
            "model": T.model_record(ctx["cfg"]),
            "continuous_normalisation": ctx["cont"].mode if ctx["cont"] else None, "input_errors": errors,
            "constituent_inputs": {"methods": ctx["constituents"].methods, "files_without": ctx["constituents"].missing,
                                   "track_hits": ctx["constituents"].track_hits} if ctx["constituents"] else None,
            "provenance": provenance("step4_finetune.py", args, ctx["paths"]),
        }
        out.mkdir(parents=True, exist_ok=True)
        if scores:
            np.savez_compressed(out / "test_scores.npz", **score_arrays(scores, task, args.seed_list[0]))
        write_json(out / "metrics.json", metrics)
        if not args.no_plots:
            from plotting.plot_classifier import plot_all
            plot_all(out / "metrics.json", out / "plots")
        print(f"wrote {out / 'metrics.json'}")
    return D.finish(dist, EXIT_SOME_FAILED if errors else EXIT_OK)


def arm_summaries(per_arm: dict) -> dict:
    """All labels: the first seed's full metrics, the spread over seeds, and every seed's figures."""
    out = {}
    for arm, per_seed in per_arm.items():
        ok = [m for m in per_seed if "error" not in m]
        if not ok:
            out[arm] = {"error": per_seed[0]["error"]}
            continue
        out[arm] = {**{k: v for k, v in ok[0].items() if k != "seed"}, "seeds": summarize_seeds(ok),
                    "per_seed": [{k: v for k, v in m.items() if k != "roc"} for m in per_seed]}
    return out


def data_efficiency(per_fraction: dict, n_labelled: dict, args, world: int) -> dict:
    """Per arm, one point per label fraction: mean and spread of the test AUC (macro AUC for
    classes) over seeds, the first seed's bootstrap interval, every seed's AUC and interval, and
    the optimiser steps of the network trainings."""
    out = {}
    for fraction in sorted(per_fraction):
        events = int(sum(v["events"] for v in n_labelled[fraction].values()))
        for arm, per_seed in per_fraction[fraction].items():
            ok = [m for m in per_seed if "error" not in m]
            point = {"fraction": fraction, "n_labelled": events, "weighting": args.weighting,
                     "per_seed": [{k: m[k] for k in ("seed", "auc", "auc_ci95", "val_auc", "error") if k in m}
                                  for m in per_seed]}
            if arm in NET_ARMS:
                point["optimiser_steps"] = training_steps(args, events, world)  # per rank under torchrun
            if ok:
                aucs = np.array([m["auc"] for m in ok])
                point.update(auc=float(aucs.mean()), auc_std=float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
                             auc_ci95=ok[0]["auc_ci95"])
                for key in ("rejection_at_50", "accuracy"):
                    if key in ok[0]:
                        point[key] = float(np.mean([m[key] for m in ok]))
            else:
                point["error"] = per_seed[0]["error"]
            out.setdefault(arm, []).append(point)
    return out


def generalisation_summary(per_arm: dict) -> dict:
    """Per arm and background: the first seed's metrics, with the AUC of every seed and their mean."""
    out = {}
    for arm, per_seed in per_arm.items():
        first = per_seed[min(per_seed)]
        out[arm] = {}
        for b, m in first.items():
            aucs = [s[b]["auc"] for s in per_seed.values() if "auc" in s[b]]
            out[arm][b] = {**m, "auc_per_seed": aucs, "auc_mean": float(np.mean(aucs)) if aucs else None}
    return out


if __name__ == "__main__":
    sys.exit(main())
