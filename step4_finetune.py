"""Step 4: signal-vs-background classifiers on the token sequences, honest baselines, metrics.json.

Arms (all evaluated on the same test split, the one pretraining never saw):
  scratch        the event transformer + [CLS] head, randomly initialised
  finetune       the same, initialised from step3's backbone (--init)
  frozen         a linear probe on the frozen backbone
  continuous     the same transformer fed normalised continuous features from the HDF5 (what tokenization costs)
  counts_gbdt    gradient boosting on object multiplicities and sequence length ("event shape" leakage)
  standard_gbdt  gradient boosting on the physicists' high-level variables (m4l, Z masses, ...)
Protocols: --seeds (mean and spread), --label-fractions (data efficiency), --test-background
(generalisation to backgrounds not trained on).

  python step4_finetune.py --parquet runs/x/tokens/*.parquet --signal hzz4l --background zz4l,ttbar,dy \
      --init runs/x/pretrain/backbone.pt --h5-dir runs/x/h5 --out-dir runs/x/finetune
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from common import distributed as D
from common import highlevel
from common.classifier_metrics import binary_metrics, summarize_seeds
from common.continuous_inputs import ContinuousFeatures
from common.event_data import SequenceStream, open_sequences
from common.runtime import EXIT_OK, EXIT_SOME_FAILED, die, expand_inputs, provenance, seed_everything, write_json
from common.schema import TOKENIZED_OBJECTS
from common.token_parquet import PROVENANCE_KEY, SPLITS, recorded_tokenizers
from common.transformer import (EventClassifier, EventTransformer, ModelConfig, check_vocab,
                                load_backbone, save_module)

# --- defaults (the run_all setting: a few minutes on 2 CPU cores for ~4 x 5000 events) -----------------
OUT_DIR = "runs/finetune"
ARMS = "scratch,finetune,frozen,continuous,counts_gbdt,standard_gbdt"
D_MODEL, N_HEADS, N_LAYERS, D_FF, DROPOUT = 64, 4, 2, 256, 0.1  # scratch without --init
EPOCHS = 6
PATIENCE = 2  # epochs without a better validation AUC before stopping
BATCH_SIZE = 128
LR = 1e-3  # head, and the whole model for scratch / continuous
BACKBONE_LR = 3e-4  # the pretrained backbone in finetune mode
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0
SHUFFLE_BUFFER = 16384
GBDT_TREES, GBDT_LEAVES, GBDT_LR = 400, 15, 0.05
BOOTSTRAP = 200  # resamples of the test set for each AUC's 95% interval
SEED = 1
DEVICE = "auto"
THREADS = 0  # 0: all cores (1.1-1.4x faster, quiet 2-core box); 1 if others share the cores (all: 5-20x slower)
NET_ARMS = ("scratch", "finetune", "frozen", "continuous")
GBDT_ARMS = ("counts_gbdt", "standard_gbdt")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parquet", nargs="+", required=True, help="step2 token Parquet files (or directories)")
    p.add_argument("--signal", "--signal-process", dest="signal", required=True,
                   help="process names or dataset ids, comma separated (under torchrun spell it --signal-process: "
                        "torchrun's own parser takes --signal as an abbreviation of its --signals-to-handle)")
    p.add_argument("--background", required=True, help="process names or dataset ids, comma separated")
    p.add_argument("--test-background", default="", help="backgrounds only tested on (generalisation protocol)")
    p.add_argument("--init", default=None, help="step3 backbone.pt (needed by finetune and frozen)")
    p.add_argument("--arms", default=ARMS)
    p.add_argument("--h5-dir", default=None, help="step1 HDF5 folder (default: the inputs recorded in the Parquet)")
    p.add_argument("--tokenizers", default=None, help="step2 tokenizer folder (default: recorded in the Parquet)")
    p.add_argument("--out-dir", default=OUT_DIR)
    p.add_argument("--seeds", default="", help="repeat the trainings with these seeds (default: --seed)")
    p.add_argument("--label-fractions", default="", help="e.g. 0.01,0.1,1: the data-efficiency protocol")
    p.add_argument("--d-model", type=int, default=D_MODEL)
    p.add_argument("--n-heads", type=int, default=N_HEADS)
    p.add_argument("--n-layers", type=int, default=N_LAYERS)
    p.add_argument("--d-ff", type=int, default=D_FF)
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--patience", type=int, default=PATIENCE)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--backbone-lr", type=float, default=BACKBONE_LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--grad-clip", type=float, default=GRAD_CLIP)
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER)
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (quick runs)")
    p.add_argument("--gbdt-trees", type=int, default=GBDT_TREES, help="most boosting rounds of the GBDT baselines")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="test-set resamples for the AUC intervals")
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch and LightGBM CPU threads (0: all cores; 1 on a busy shared machine)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.arm_list = csv_list(args.arms)
    bad = [a for a in args.arm_list if a not in NET_ARMS + GBDT_ARMS]
    if bad:
        p.error(f"unknown arm(s) {', '.join(bad)}; choose from {', '.join(NET_ARMS + GBDT_ARMS)}")
    if {"finetune", "frozen"} & set(args.arm_list) and not args.init:
        args.arm_list = [a for a in args.arm_list if a not in ("finetune", "frozen")]
        print("note: no --init backbone: the finetune and frozen arms are skipped", file=sys.stderr)
    try:
        args.seed_list = [int(s) for s in csv_list(args.seeds)] or [args.seed]
        args.fractions = [float(f) for f in csv_list(args.label_fractions)]
    except ValueError as exc:
        p.error(f"--seeds / --label-fractions: {exc}")
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error("--label-fractions must lie in (0, 1]")
    if args.gbdt_trees < 1 or args.bootstrap < 1:
        p.error("--gbdt-trees and --bootstrap must be at least 1")
    return args


# --- the task: which events are signal, background, test-only background ---------------------------

def resolve(names: list[str], totals: dict, role: str) -> list[str]:
    """Process names or dataset ids -> process names present in the data; unknown is an error."""
    out = []
    for name in names:
        hits = [p for p, t in totals.items() if p == name or str(t["dsid"]) == name]
        if not hits:
            present = ", ".join(f"{p} ({t['dsid']})" for p, t in sorted(totals.items()))
            raise ValueError(f"{role} '{name}' matches no events (present: {present})")
        out += hits
    return sorted(set(out))


def class_weights(batch: dict, signal: list[str], norm: dict) -> tuple[np.ndarray, np.ndarray]:
    """Labels and training weights: |event weight| scaled so signal and background weigh the same."""
    y = np.isin(batch["process"], signal).astype(np.int64)
    w = np.abs(batch["weight"].astype(np.float64)) * np.where(y == 1, norm["signal"], norm["background"])
    return y, w


# --- neural arms -----------------------------------------------------------------------------------------

def to_torch(batch, device, feats=None):
    t = [torch.from_numpy(np.ascontiguousarray(batch[k])).to(device) for k in ("input_ids", "token_type_ids", "attention_mask")]
    return t + [torch.from_numpy(feats(batch)).to(device) if feats else None]


@torch.no_grad()
def score(model, stream, device, amp, feats=None, desc="score") -> dict[str, np.ndarray]:
    """Signal probability of every event of a stream, with process and weight."""
    model.eval()
    out = {"score": [], "process": [], "weight": []}
    for batch in tqdm(stream.batches(0), desc=desc, leave=False, file=sys.stderr):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(*to_torch(batch, device, feats))
        out["score"].append(torch.softmax(logits.float(), -1)[:, 1].cpu().numpy())
        out["process"].append(batch["process"])
        out["weight"].append(batch["weight"])
    return {k: np.concatenate(v) for k, v in out.items()}


def weighted_auc(s: dict, signal: list[str]) -> float:
    y = np.isin(s["process"], signal)
    return float(roc_auc_score(y, s["score"], sample_weight=np.abs(s["weight"]))) if 0 < y.sum() < len(y) else float("nan")


def build_model(arm: str, args, cfg: ModelConfig, backbone_path: str | None, cont: ContinuousFeatures | None):
    if arm in ("finetune", "frozen"):
        backbone, _ = load_backbone(backbone_path)
    elif arm == "continuous":
        backbone = EventTransformer(replace(cfg, continuous_dims=cont.continuous_dims(), code_dim=0))
    else:
        backbone = EventTransformer(cfg)
        if cfg.code_dim:  # scratch: the pretrained backbone's architecture, code geometry included
            backbone.set_code_vectors(load_backbone(backbone_path)[0].code_vectors.numpy())
    model = EventClassifier(backbone, linear_probe=arm == "frozen")
    if arm == "frozen":
        backbone.requires_grad_(False)
    return model


def train_net(arm, args, cfg, streams, signal, norm, dist, seed, cont=None, desc=""):
    """Train one neural arm; early stopping on the validation AUC. Returns (best model, history)."""
    torch.manual_seed(seed)
    model = build_model(arm, args, cfg, args.init, cont).to(dist.device)
    amp = args.amp == "on" or (args.amp == "auto" and dist.device.type == "cuda")
    groups = [{"params": [p for p in model.head.parameters()], "lr": args.lr}]
    if arm != "frozen":
        groups.append({"params": list(model.backbone.parameters()), "lr": args.backbone_lr if arm == "finetune" else args.lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    n_train = streams["train_count"]
    steps = streams["train"].steps_per_epoch(n_train)
    steps = min(steps, args.max_steps) if args.max_steps else steps
    if steps == 0:
        raise ValueError(f"{n_train} labelled train events give no full batch of {args.batch_size} per rank")
    total, warm = steps * args.epochs, max(1, int(WARMUP_FRACTION * steps * args.epochs))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm)))))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    feats = cont.features if cont else None
    best, best_auc, history, bad_epochs = None, -1.0, [], 0
    for epoch in range(args.epochs):
        t0, loss_sum, n_seen = time.perf_counter(), 0.0, 0
        ddp.train()
        if arm == "frozen":
            model.backbone.eval()  # a probe: no dropout in the frozen features
        for batch in tqdm(streams["train"].batches(epoch, max_steps=steps), total=steps, desc=f"{desc} epoch {epoch}",
                          leave=False, disable=not dist.main, file=sys.stderr):
            y, w = class_weights(batch, signal, norm)
            y, w = torch.from_numpy(y).to(dist.device), torch.from_numpy(w).float().to(dist.device)
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = ddp(*to_torch(batch, dist.device, feats))
            loss = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum() / w.sum().clamp(min=1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
            loss_sum, n_seen = loss_sum + loss.item() * len(y), n_seen + len(y)
        val_auc = weighted_auc(score(model, streams["val"], dist.device, amp, feats, desc="val"), signal)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(n_seen, 1), "val_auc": val_auc,
                        "seconds": round(time.perf_counter() - t0, 2)})
        if val_auc > best_auc:
            best, best_auc, bad_epochs = copy.deepcopy(model.state_dict()), val_auc, 0
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                break
    model.load_state_dict(best)
    return model, history


# --- gradient-boosted baselines ----------------------------------------------------------------------

def count_features(batch: dict, vocab: dict) -> np.ndarray:
    """Object multiplicities per type and the sequence length: all the 'event shape' a sequence leaks."""
    types = batch["token_type_ids"] * (batch["attention_mask"] > 0)
    cols = [(types == vocab["type_ids"][o]).sum(1) for o in TOKENIZED_OBJECTS if o in vocab["ranges"]]
    return np.stack(cols + [batch["attention_mask"].sum(1)], 1).astype(np.float32)


COUNT_NAMES = lambda vocab: [f"n_{o}" for o in TOKENIZED_OBJECTS if o in vocab["ranges"]] + ["length"]


def collect(stream: SequenceStream, fn) -> dict[str, np.ndarray]:
    out = {"x": [], "process": [], "weight": [], "source_file": [], "event_index": []}
    for batch in stream.batches(0):
        out["x"].append(fn(batch))
        for k in ("process", "weight", "source_file", "event_index"):
            out[k].append(batch[k])
    return {k: np.concatenate(v) for k, v in out.items()}


def highlevel_of(data: dict, h5_files: dict) -> np.ndarray:
    """The standard variables for the events of `data` (rows of their source HDF5 files)."""
    x = np.full((len(data["event_index"]), len(highlevel.NAMES)), np.nan, np.float32)
    for name in np.unique(data["source_file"]):
        if name not in h5_files:
            raise ValueError(f"no HDF5 file for source_file {name} (use --h5-dir)")
        rows = data["source_file"] == name
        x[rows] = highlevel.for_rows(h5_files[name], data["event_index"][rows])
    return x


def train_gbdt(train: dict, val: dict, signal: list[str], norm: dict, seed: int, trees: int = GBDT_TREES, threads: int = 0):
    y, w = class_weights({"process": train["process"], "weight": train["weight"]}, signal, norm)
    yv, wv = class_weights({"process": val["process"], "weight": val["weight"]}, signal, norm)
    model = lgb.LGBMClassifier(n_estimators=trees, num_leaves=GBDT_LEAVES, learning_rate=GBDT_LR,
                               random_state=seed, n_jobs=threads or -1, verbose=-1, subsample=0.8, subsample_freq=1)
    model.fit(train["x"], y, sample_weight=w, eval_X=(val["x"],), eval_y=(yv,), eval_sample_weight=[wv],
              eval_metric="auc", callbacks=[lgb.early_stopping(30, verbose=False)])
    return model


# --- evaluation ----------------------------------------------------------------------------------------

def evaluate(s: dict, signal: list[str], background: list[str], test_background: list[str], seed: int,
             n_bootstrap: int = BOOTSTRAP) -> tuple[dict, dict]:
    """Metrics against the trained backgrounds, and against each test-only background."""
    def subset(bkgs):
        keep = np.isin(s["process"], signal + bkgs)
        return binary_metrics(np.isin(s["process"][keep], signal), s["score"][keep], s["weight"][keep],
                              n_bootstrap=n_bootstrap, seed=seed)
    return subset(background), {b: subset([b]) for b in background + test_background}


def h5_locations(paths: list[str], h5_dir: str | None) -> dict[str, str]:
    """source_file name -> HDF5 path: --h5-dir, else the inputs recorded in the Parquet provenance."""
    out = {}
    for path in paths:
        names = set(pq.read_table(path, columns=["source_file"]).column("source_file").unique().to_pylist())
        prov = json.loads((pq.read_schema(path).metadata or {}).get(PROVENANCE_KEY, b"{}"))
        recorded = {Path(p).name: p for p in prov.get("inputs", [])}
        for n in names:
            cand = Path(h5_dir) / n if h5_dir else Path(recorded.get(n, n))
            if not cand.exists():
                raise ValueError(f"{path}: source HDF5 {n} not found at {cand} (use --h5-dir)")
            out[n] = str(cand)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    if (out / "metrics.json").exists() and not args.overwrite:
        print(f"{out / 'metrics.json'} exists, skipping (use --overwrite to redo)")
        return EXIT_OK
    vocab, paths, errors = open_sequences(expand_inputs(args.parquet))
    cfg = ModelConfig.from_vocab(vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                                 d_ff=args.d_ff, dropout=args.dropout) if vocab else None
    if args.init and paths:
        try:
            _, sidecar = load_backbone(args.init)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            die(f"{args.init}: cannot load the backbone: {str(exc).splitlines()[0]}")
        for path in list(paths):
            try:
                check_vocab(sidecar, json.loads(pq.read_schema(path).metadata[b"vocab"]), path)
            except ValueError as exc:
                errors.append(f"error: {exc}")
                paths.remove(path)
        cfg = ModelConfig(**{**sidecar["config"], "continuous_dims": {}})  # scratch: the backbone's architecture
    for line in errors:
        print(line, file=sys.stderr)
    if not paths:
        die("no usable Parquet input", EXIT_SOME_FAILED)
    dist = D.setup(args.device)

    # The task and its splits.
    all_stream = SequenceStream(paths, vocab["levels"], args.batch_size)
    totals = all_stream.totals()
    try:
        signal = resolve(csv_list(args.signal), totals, "signal")
        background = resolve(csv_list(args.background), totals, "background")
        test_bkg = [b for b in resolve(csv_list(args.test_background), totals, "test background") if b not in background]
    except ValueError as exc:
        die(str(exc))
    if set(signal) & set(background):
        die(f"process(es) {', '.join(sorted(set(signal) & set(background)))} are both signal and background")
    make = lambda split, procs, shuffle, fraction=1.0, shard=True: SequenceStream(
        paths, vocab["levels"], args.batch_size, split=SPLITS[split], processes=procs, fraction=fraction,
        fraction_seed=args.seed, shuffle_buffer=args.shuffle_buffer if shuffle else 0, seed=args.seed,
        rank=dist.rank if shard else 0, world=dist.world if shard else 1)
    split_totals = {}
    for split, procs in (("train", signal + background), ("val", signal + background), ("test", signal + background + test_bkg)):
        t = make(split, procs, False).totals()
        split_totals[split] = t
        for role, names in (("signal", signal), ("background", background)):
            if not any(t.get(p, {}).get("events", 0) for p in names):
                die(f"{', '.join(paths)}: the {split} split holds no {role} events ({', '.join(names)})", EXIT_SOME_FAILED)
    sw = lambda names: sum(split_totals["train"].get(p, {}).get("sum_weights", 0.0) for p in names)
    n_lab = sum(v["events"] for v in split_totals["train"].values())
    norm = {"signal": 0.5 * n_lab / sw(signal), "background": 0.5 * n_lab / sw(background)}  # mean weight ~1
    val_stream, test_stream = make("val", signal + background, False, shard=False), make("test", signal + background + test_bkg, False, shard=False)
    if dist.main:
        print(f"signal {signal} vs background {background}" + (f", test-only {test_bkg}" if test_bkg else "")
              + f"; events train {n_lab}, val {sum(v['events'] for v in split_totals['val'].values())}, "
                f"test {sum(v['events'] for v in split_totals['test'].values())}")

    def streams_for(fraction):
        train = make("train", signal + background, True, fraction)
        return {"train": train, "train_count": train.count() if fraction < 1 else n_lab, "val": val_stream}

    cont = None
    if "continuous" in args.arm_list or "standard_gbdt" in args.arm_list:
        try:
            h5_files = h5_locations(paths, args.h5_dir)
            if "continuous" in args.arm_list:
                cont = ContinuousFeatures(h5_files, vocab, args.tokenizers or recorded_tokenizers(paths[0]))
        except (OSError, ValueError, KeyError) as exc:
            die(f"HDF5 inputs for the continuous / standard baselines: {str(exc).splitlines()[0]}", EXIT_SOME_FAILED)

    # Main arms, repeated over seeds.
    results, generalisation, training, test_scores = {}, {}, {}, {}
    amp = args.amp == "on" or (args.amp == "auto" and dist.device.type == "cuda")
    for arm in args.arm_list:
        per_seed = []
        for seed in args.seed_list:
            t0 = time.perf_counter()
            if arm in NET_ARMS:
                model, history = train_net(arm, args, cfg, streams_for(1.0), signal, norm, dist, seed,
                                           cont if arm == "continuous" else None, desc=f"{arm} seed {seed}")
                s = score(model, test_stream, dist.device, amp, cont.features if arm == "continuous" else None, desc=f"{arm} test")
            else:
                fn = (lambda b: count_features(b, vocab)) if arm == "counts_gbdt" else (lambda b: np.zeros((len(b["weight"]), 0)))
                data = {sp: collect(st, fn) for sp, st in (("train", make("train", signal + background, False, shard=False)),
                                                          ("val", val_stream), ("test", test_stream))}
                if arm == "standard_gbdt":
                    for d in data.values():
                        d["x"] = highlevel_of(d, h5_files)
                model = train_gbdt(data["train"], data["val"], signal, norm, seed, args.gbdt_trees, args.threads)
                s = {"score": model.predict_proba(data["test"]["x"])[:, 1], "process": data["test"]["process"],
                     "weight": data["test"]["weight"]}
                history = [{"best_iteration": int(model.best_iteration_ or args.gbdt_trees),
                            "val_auc": float(model.best_score_["valid_0"]["auc"])}]
                names = COUNT_NAMES(vocab) if arm == "counts_gbdt" else list(highlevel.NAMES)
                history[0]["feature_importance"] = dict(zip(names, model.feature_importances_.tolist()))
            main_m, gen_m = evaluate(s, signal, background, test_bkg, seed, args.bootstrap)
            main_m["train_seconds"] = round(time.perf_counter() - t0, 2)
            per_seed.append({"seed": seed, **main_m})
            if seed == args.seed_list[0]:
                training[arm], generalisation[arm], test_scores[arm] = history, gen_m, s
                if arm in NET_ARMS and dist.main:
                    save_module(out / f"{arm}.pt", model, {"arm": arm, "config": asdict(model.backbone.cfg),
                                                          "history": history, "signal": signal, "background": background})
            if dist.main:
                print(f"{arm} seed {seed}: test AUC {main_m['auc']:.4f} [{main_m['auc_ci95'][0]:.4f}, "
                      f"{main_m['auc_ci95'][1]:.4f}], rejection@50% {main_m['rejection_at_50']:.1f}")
        results[arm] = {**{k: v for k, v in per_seed[0].items() if k != "seed"}, "seeds": summarize_seeds(per_seed),
                        "per_seed": [{k: v for k, v in m.items() if k != "roc"} for m in per_seed]}

    # Data efficiency: AUC against the number of labelled events, for the transformer arms.
    efficiency = {}
    for fraction in args.fractions:
        streams = streams_for(fraction)
        for arm in [a for a in ("scratch", "finetune", "frozen") if a in args.arm_list]:
            if fraction >= 1:  # all labels: the main arm's first seed is this point already
                m = results[arm]["per_seed"][0]
            else:
                model, _ = train_net(arm, args, cfg, streams, signal, norm, dist, args.seed_list[0], desc=f"{arm} f={fraction}")
                m, _ = evaluate(score(model, test_stream, dist.device, amp, desc=f"{arm} test"), signal, background, [],
                                args.seed_list[0], args.bootstrap)
            efficiency.setdefault(arm, []).append({"fraction": fraction, "n_labelled": streams["train_count"],
                                                   "auc": m["auc"], "auc_ci95": m["auc_ci95"],
                                                   "rejection_at_50": m["rejection_at_50"]})
            if dist.main:
                print(f"data efficiency {arm} fraction {fraction} ({streams['train_count']} labelled): AUC {m['auc']:.4f}")

    if dist.main:
        metrics = {
            "task": {"signal": signal, "background": background, "test_background": test_bkg,
                     "events": split_totals, "class_weight_norm": norm, "seeds": args.seed_list},
            "arms": results, "training": training,
            "generalisation": {"trained_on": background, "tested_on": background + test_bkg, "arms": generalisation},
            "data_efficiency": efficiency,
            "continuous_normalisation": cont.mode if cont else None,
            "provenance": provenance("step4_finetune.py", args, paths),
        }
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out / "test_scores.npz", process=test_scores[args.arm_list[0]]["process"].astype(str),
                            weight=test_scores[args.arm_list[0]]["weight"],
                            **{f"score_{a}": s["score"] for a, s in test_scores.items()})
        write_json(out / "metrics.json", metrics)
        if not args.no_plots:
            from plotting.plot_classifier import plot_all
            plot_all(out / "metrics.json", out / "plots")
        print(f"wrote {out / 'metrics.json'}")
    D.teardown(dist)
    return EXIT_SOME_FAILED if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
