"""Step 3: masked-object pretraining of the event transformer on step2's token Parquet files.

Whole object positions are masked (15% of the jets, tracks and MET, 50% of the leptons, taus and
photons; 80% [MASK], 10% a random code legal for the type, 10% kept) and the model predicts, from the
rest of the event, what stood there. Objectives
(--objective, one or several, comma separated; the losses add):
  features  the masked object's normalised features, read from the step1 HDF5 (regression)
  latent    its quantised latent, the sum of its codebook vectors in the step2 tokenizer (regression);
            with group tokens the concatenation of its feature groups' quantised latents
  tokens    its code id at every quantizer level (cross-entropy over the ids legal for the type)
  event     the event's high-level observables (common.highlevel: lepton pTs, m4l, Z masses, MET,
            HT, jet and b-jet counts; from the step1 HDF5, log-scaled), regressed from the event
            representation itself: a label-free event-level signal for the pooled state. Its head is
            saved with the backbone (ModelConfig.observables): step4 --observables reads its prediction
            beside the pooled state
  overlap   which visible objects of the event lie within Delta R 0.2 of the masked one (a tau and the
            jet it was reconstructed from, an electron and its jet, a track and its jet): a pointer over
            them and a null slot (common.transformer.OverlapPointer, cross-entropy weighted by
            --overlap-weight), whose read joins the masked position's state before the other heads. It
            decodes the objects' kinematics with the step2 tokenizers, and accompanies features, latent
            or tokens
Regression targets are standardised per object type, so predicting 0 is the no-context
baseline that knows only the type; the context gain is 1 - MSE / baseline MSE per type, with a 95%
interval that treats the validation events as the independent units (common.training.RegressionStats). For
ids the baseline is the most frequent code of each (type, level).

Only the train and validation splits are read: test events (the shared split hash) are never
pretrained on. AdamW, warm-up + cosine decay, gradient clipping, a checkpoint per epoch
(--resume). CPU, one GPU (bf16 autocast) or many with `torchrun --nproc_per_node N ...`; --batch-size
events make one optimiser step whatever the number of ranks (each reads its share). On CPU, two
ranks of one thread train at run_all's batch 1.63x as fast as one process with both cores
(bench/README.md), which is how run_all runs it.

  python step3_pretrain.py --parquet runs/x/tokens/*.parquet --h5-dir runs/x/h5 --out-dir runs/x/pretrain
Outputs: backbone.pt + backbone.json (config, objective, representation, vocabulary checksum),
metrics.json, history.csv, checkpoint.pt, plots/.
"""
from __future__ import annotations

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch, numba or lightgbm load)

import argparse
import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import distributed as D
from common import constituent_model, highlevel
from common import training as T
from common.continuous_inputs import ContinuousFeatures, h5_locations
from common.event_data import SequenceStream, code_ranges, mask_objects, open_sequences
from common.pair_kinematics import is_object, open_kinematics, overlap_targets
from common.runtime import (EXIT_OK, EXIT_SOME_FAILED, atomic_output, die, first_line, input_files, output_dir,
                            per_object, provenance, seed_everything, set_threads, write_json)
from common.schema import TOKENIZED_OBJECTS
from common.token_parquet import SPLITS, legal_id_mask, recorded_tokenizers
from common.transformer import (EventTransformer, MaskedTokenHead, ModelConfig, PretrainModel, RegressionHead,
                                TypedRegressionHead, backbone_sidecar, codebook_table, load_tensors, save_module)

# --- defaults (the run_all setting: small and quick on 2 CPU cores) ------------------------------------
OUT_DIR = "runs/pretrain"
OBJECTIVE = "latent,event,overlap"  # chosen by measurement: bench/README.md, "Pretraining objectives", "The overlap
#                                    objective"
OBJECTIVES = ("features", "latent", "tokens", "event", "overlap")
OBJECT_OBJECTIVES = ("features", "latent", "tokens")  # those that predict the masked objects themselves
OVERLAP_WEIGHT = 0.3  # the overlap objective's cross-entropy in the loss: 0.3 lifted every type's context gain more
#                       than 1 did (bench/README.md, "The overlap objective")
OVERLAP_DR = 0.2  # "overlaps": within this Delta R; the detector's hadronic taus lie within it of their jet
REPRESENTATION = "mean"  # the event representation fine-tuning reads: the mean of the object states
EPOCHS = 10  # run_all's setting: every object type's context gain passes 0.2 in every seed after 10 passes (the taus'
#              0.19 after 6, 0.20 after 8; bench/README.md, "The overlap objective", "Ten passes")
BATCH_SIZE = 32  # 4x the optimiser steps of 128 for 1.5x the CPU time: +0.021 / +0.003 / +0.012 fine-tuned AUC at
#                  1 / 10 / 100% of run_all's labels (bench/README.md, "Pretraining batch size"). A GPU wants larger
#                  batches: raise it with --lr, or run more --epochs
LR = 2e-3  # at batch 32: every type's context gain up, the classifier level (bench/README.md, "Masking rates")
MASK_PROB = 0.15
TYPE_MASK_PROB = "electrons=0.5,muons=0.5,taus=0.5,photons=0.5"  # these rates instead of MASK_PROB ("none": one
#                  rate for all): the few objects of these types are the ones least learnt from their context, and
#                  masking them more often teaches their predictions more (bench/README.md, "Masking rates")
SHUFFLE_BUFFER = 16384
TYPED_HEAD = True  # the masked-object head has an output layer per object type: every type but the tracks is
#                   predicted better from its context, the fine-tuned AUC level with the shared head's and the frozen
#                   probe's higher (bench/README.md, "An output layer per object type"); --no-typed-head: one shared layer
BALANCE_TYPES = False  # True: every object type weighs alike in the masked-object loss (tracks dominate the plain mean)
VAL_MASKS = 4  # independent mask draws per validation event in the last epoch, whose figures metrics.json keeps: about
#               94% of the objects of a type masked at 50% are scored (half with one draw), and the context gains'
#               intervals narrow (events stay their units). The epochs before draw once, for the curve: a quarter the time
SCALER_EVENTS = 2560  # training events that fix the standardisation of the regression targets
CPU_RANKS = 1  # run_all passes 2 on 2 cores: 1.63x the events/s of one process with both, 1.04-1.15x one thread
#               alone (a second thread costs more than it gives on small batches; the ranks meet at every step:
#               bench/README.md, "Two CPU ranks", "where the second core goes")
SEED = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parquet", nargs="+", required=True, help="step2 token Parquet files (or directories)")
    p.add_argument("--objective", default=OBJECTIVE, help=f"comma separated, of {', '.join(OBJECTIVES)}")
    p.add_argument("--tokenizers", default=None, help="step2 tokenizer folder (default: recorded in the Parquet)")
    p.add_argument("--h5-dir", default=None, help="step1 HDF5 folder, for --objective features "
                                                  "(default: the inputs recorded in the Parquet)")
    p.add_argument("--out-dir", default=OUT_DIR)
    T.add_model_args(p)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="events per optimiser step, shared out over the ranks")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=T.WEIGHT_DECAY)
    p.add_argument("--warmup-fraction", type=float, default=T.WARMUP_FRACTION)
    p.add_argument("--grad-clip", type=float, default=T.GRAD_CLIP)
    p.add_argument("--mask-prob", type=float, default=MASK_PROB,
                   help="masking rate of the object types --type-mask-prob leaves out")
    p.add_argument("--type-mask-prob", default=TYPE_MASK_PROB,
                   help="OBJ=P,...: masking rates of these object types instead of --mask-prob (none: one rate)")
    p.add_argument("--typed-head", action=argparse.BooleanOptionalAction, default=TYPED_HEAD,
                   help="an output layer per object type in the masked-object regression head")
    p.add_argument("--balance-types", action="store_true", default=BALANCE_TYPES,
                   help="masked-object regression loss: the mean of each object type's error, not of all objects")
    p.add_argument("--overlap-weight", type=float, default=OVERLAP_WEIGHT,
                   help="weight of the overlap objective's cross-entropy in the loss")
    p.add_argument("--overlap-dr", type=float, default=OVERLAP_DR,
                   help="overlap objective: a visible object within this Delta R of a masked one overlaps it")
    p.add_argument("--val-masks", type=int, default=VAL_MASKS,
                   help="validation of the last epoch: independent mask draws per event (more objects scored, narrower "
                        "intervals); the epochs before draw once")
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER, help="events held for shuffling")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (quick runs)")
    T.add_runtime_args(p)
    p.add_argument("--cpu-ranks", type=int, default=CPU_RANKS,
                   help="on CPU, run as this many ranks of one process group, each with its share of the CPUs")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--resume", action="store_true", help="continue from out-dir/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.objectives = [o.strip() for o in args.objective.split(",") if o.strip()]
    bad = [o for o in args.objectives if o not in OBJECTIVES]
    if bad or not args.objectives:
        p.error(f"--objective {args.objective!r}: choose one or more of {', '.join(OBJECTIVES)}")
    if "overlap" in args.objectives:
        if not set(OBJECT_OBJECTIVES) & set(args.objectives):
            p.error(f"--objective {args.objective!r}: overlap reads into another masked-object objective's "
                    f"prediction; add one of {', '.join(OBJECT_OBJECTIVES)}")
        args.objectives.sort(key=lambda o: o == "overlap")  # the first objective is the one whose context gain counts
        if not args.overlap_weight > 0 or not args.overlap_dr > 0:
            p.error("--overlap-weight and --overlap-dr must be > 0")
    if not 0 < args.mask_prob < 1:
        p.error("--mask-prob must be in (0, 1)")
    args.type_mask = parse_type_mask(args.type_mask_prob)
    if args.val_masks < 1:
        p.error("--val-masks must be >= 1")
    if args.cpu_ranks < 1:
        p.error("--cpu-ranks must be >= 1")
    T.check_model_args(p, args)
    return args


def parse_type_mask(text: str) -> dict[str, float]:
    """--type-mask-prob -> {object type: masking rate}."""
    if text == "none":
        return {}
    rates = per_object(text, dict.fromkeys(TOKENIZED_OBJECTS), "--type-mask-prob", float)
    rates = {o: r for o, r in rates.items() if r is not None}
    if bad := [f"{o}={r:g}" for o, r in rates.items() if not 0 < r < 1]:
        die(f"--type-mask-prob: {', '.join(bad)}: rates must be in (0, 1)")
    return rates


def mask_rates(args, type_ids: dict[str, int], n_types: int) -> float | np.ndarray:
    """--mask-prob, or a rate per type id where --type-mask-prob names types."""
    if not args.type_mask:
        return args.mask_prob
    rates = np.full(n_types, args.mask_prob)
    for obj, rate in args.type_mask.items():
        rates[type_ids[obj]] = rate
    return rates


# --- the masked-token statistics (objective 'tokens') -------------------------------------------------

class LevelStats:
    """Masked-token loss/accuracy summed per (type, level); reduced over ranks before reading."""

    def __init__(self, n_types: int, q: int, device):
        self.sums = torch.zeros(4, n_types, q, dtype=torch.float64, device=device)  # n, correct, loss, baseline

    def add(self, loss, correct, labels, types, mode=None):
        valid = labels != -100
        q = labels.shape[1]
        idx = (types[:, None] * q + torch.arange(q, device=labels.device)[None]).expand_as(labels)[valid]
        flat = self.sums.view(4, -1)
        flat[0].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
        flat[1].index_add_(0, idx, correct[valid].double())
        flat[2].index_add_(0, idx, loss[valid].detach().double())
        if mode is not None:
            flat[3].index_add_(0, idx, (mode[types[:, None].expand_as(labels), torch.arange(q, device=labels.device)
                                             .expand_as(labels)] == labels)[valid].double())
        return (loss * valid).sum() / valid.sum().clamp(min=1)

    def summary(self, vocab: dict, dist) -> dict:
        n, correct, loss, base = D.all_sum(self.sums, dist).cpu().numpy()
        ratio = lambda a, b: float(a.sum() / b.sum()) if b.sum() else float("nan")  # noqa: E731
        out = {"n_masked": int(n.sum()), "acc": ratio(correct, n), "loss": ratio(loss, n),
               "frequency_baseline_acc": ratio(base, n),
               "per_level": {str(lvl): {"n": int(n[:, lvl].sum()), "acc": ratio(correct[:, lvl], n[:, lvl]),
                                        "loss": ratio(loss[:, lvl], n[:, lvl])} for lvl in range(n.shape[1])},
               "per_type": {}}
        for obj, t in vocab["type_ids"].items():
            if n[t].sum():
                out["per_type"][obj] = {"n": int(n[t].sum()), "acc": ratio(correct[t], n[t]), "loss": ratio(loss[t], n[t]),
                                        "frequency_baseline_acc": ratio(base[t], n[t]),
                                        "acc_per_level": [ratio(correct[t, lvl], n[t, lvl]) for lvl in range(n.shape[1])]}
        return out


class OverlapStats:
    """The overlap pointer per object type: masked objects, those with a visible object that overlaps them, those
    whose most likely slot is right (an overlapping object, or the null slot where none overlaps), and the summed
    cross-entropy; reduced over ranks before reading. The no-context baseline always answers the null slot."""

    def __init__(self, n_types: int, device):
        self.sums = torch.zeros(4, n_types, dtype=torch.float64, device=device)  # n, overlapped, correct, loss

    def add(self, logits, target, types):
        logp = torch.log_softmax(logits.float(), -1)
        ce = -(target * logp.masked_fill(target == 0, 0.0)).sum(-1)  # a masked-out slot is -inf where its target is 0
        correct = target.gather(1, logp.argmax(-1, keepdim=True))[:, 0] > 0
        for k, v in enumerate((torch.ones_like(ce), target[:, -1] == 0, correct, ce.detach())):
            self.sums[k].index_add_(0, types, v.double())
        return ce.mean() if len(ce) else logits.sum() * 0.0  # keeps the graph connected for DDP

    def summary(self, vocab: dict, dist) -> dict:
        n, overlapped, correct, loss = D.all_sum(self.sums, dist).cpu().numpy()
        ratio = lambda a, b: float(a.sum() / b.sum()) if b.sum() else float("nan")  # noqa: E731
        figures = lambda t: {"n": int(n[t].sum()), "overlapped": ratio(overlapped[t], n[t]),  # noqa: E731
                             "acc": ratio(correct[t], n[t]), "null_baseline_acc": 1 - ratio(overlapped[t], n[t]),
                             "loss": ratio(loss[t], n[t])}
        out = figures(slice(None))
        out["n_masked"] = out.pop("n")  # as the other objectives name it
        return {**out, "per_type": {o: figures(t) for o, t in vocab["type_ids"].items() if n[t]}}


def decode_kinematics(decoder, ids: np.ndarray, batch: dict, chosen: np.ndarray | None = None) -> tuple:
    """(kinematics decoded from the masked ids (B, L, 4), and with `chosen` those of the chosen positions' own ids
    (B, L, 4), zero elsewhere; else None). Both come from one decoder call: its cost is mostly per call and per
    object type, and a second call made the overlap objective's epochs 10% slower."""
    types = batch["token_type_ids"]
    if chosen is None:
        return torch.from_numpy(decoder(ids, types)), None
    both = decoder(np.concatenate([ids, batch["input_ids"]]), np.concatenate([types, np.where(chosen, types, -1)]))
    return torch.from_numpy(both[: len(ids)]), torch.from_numpy(both[len(ids) :])


def overlap_inputs(types: np.ndarray, chosen: np.ndarray, kin: torch.Tensor, truth: torch.Tensor, transverse,
                   dr: float) -> tuple:
    """The overlap objective's (visible (B, L), target (M, L + 1)): the positions a masked object may point at
    (decoded objects, neither chosen for masking nor of a `transverse` type), and the ones among them that overlap
    it in its `truth`, its unmasked kinematics. A transverse object (MET) has no eta: it points at nothing."""
    transverse = torch.from_numpy(np.isin(types, list(transverse))).to(kin.device)
    chosen = torch.from_numpy(chosen).to(kin.device)
    visible = is_object(kin) & ~chosen & ~transverse
    rows = torch.nonzero(chosen)[:, 0]
    pointable = visible[rows] & ~transverse[chosen][:, None]
    return visible, overlap_targets(truth[chosen], kin[rows], pointable, dr)


def count_codes(code_counts: np.ndarray, batch: dict) -> None:
    """Frequency baseline: how often each code stands at each (type, level)."""
    keep = batch["attention_mask"] > 0
    t, v = batch["token_type_ids"][keep].astype(np.int64), batch["input_ids"][keep]
    q, size = v.shape[1], code_counts.shape[-1]
    flat = ((t[:, None] * q + np.arange(q)) * size + v).ravel()
    code_counts += np.bincount(flat, minlength=code_counts.size).reshape(code_counts.shape)


# --- the regression targets (objectives 'features' and 'latent') ---------------------------------------

def regression_targets(batch: dict, ids: torch.Tensor, chosen: torch.Tensor, objectives, code_table) -> dict:
    """{objective: targets (M, dim)} of the chosen positions, unstandardised."""
    out = {}
    if "latent" in objectives:  # the sum of the object's codebook vectors
        out["latent"] = code_table[ids[chosen].long()].sum(-2)
    if "features" in objectives:  # attached to the batch by the stream (SequenceStream.features)
        out["features"] = torch.from_numpy(batch["features"]).to(ids.device)[chosen]
    if "event" in objectives:  # per event, attached by the stream (SequenceStream.observables)
        x = batch["observables"].astype(np.float64)
        out["event"] = torch.from_numpy(np.sign(x) * np.log1p(np.abs(x))).to(ids.device)  # NaN where undefined
    return out


def fit_scalers(stream, objectives, ranges, code_table, cont, n_types, event_type, dist) -> dict[str, T.TargetScaler]:
    """Standardisation of each regression target from the first SCALER_EVENTS training events (all objects)."""
    dims = {"latent": lambda: code_table.shape[1], "features": lambda: cont.width, "event": lambda: len(highlevel.NAMES)}
    scalers = {o: T.TargetScaler(n_types, dims[o]()) for o in objectives if o in dims}
    if not scalers:
        return scalers
    count = ranges[1]
    columns = latent_columns(code_table, ranges) if "latent" in scalers else None
    for batch in stream.batches(0, max_steps=-(-SCALER_EVENTS // stream.batch_size)):
        ids, types, attn = T.to_device(batch, dist.device)
        objects = torch.from_numpy((count[batch["token_type_ids"].astype(np.int64)] > 0).any(-1) & (batch["attention_mask"] > 0))
        targets = regression_targets(batch, ids, objects.to(ids.device), scalers, code_table)
        t = types[objects.to(types.device)].long().cpu().numpy()
        for name, scaler in scalers.items():
            x = targets[name].float().cpu().numpy()
            if name == "event":
                valid = np.isfinite(x).astype(np.float64)
                scaler.add(np.full(len(x), event_type), np.nan_to_num(x), valid)
                continue
            valid = cont_valid(t, cont, x.shape[1]) if name == "features" else columns[t].astype(x.dtype)
            scaler.add(t, x, valid)
    return {o: s.finish(lambda a: D.all_sum(torch.from_numpy(a).to(dist.device), dist).cpu().numpy())
            for o, s in scalers.items()}


def latent_columns(code_table: torch.Tensor, ranges) -> np.ndarray:
    """bool (n_types, width): the latent columns a type's codes fill. Granularity group: the blocks
    of its feature groups; an object with fewer groups than the widest type is not scored on the rest."""
    start, count = ranges
    table = code_table.cpu().numpy()
    used = np.zeros((len(start), table.shape[1]), bool)
    for t, level in zip(*np.nonzero(count)):  # a loop over (type, level) ranges, not objects
        used[t] |= table[start[t, level] : start[t, level] + count[t, level]].any(0)
    return used


def cont_valid(types: np.ndarray, cont: ContinuousFeatures, width: int) -> np.ndarray:
    """1 where a feature column exists for the object's type (types have different widths)."""
    dims = np.zeros(max(cont.type_ids.values()) + 1, np.int64)
    for o, t in cont.type_ids.items():
        dims[t] = cont.dims[o]
    return (np.arange(width)[None] < dims[types][:, None]).astype(np.float64)


# --- one pass over a stream ---------------------------------------------------------------------------

def run_epoch(model, stream, epoch, steps, ctx, args, dist, stats, opt=None, sched=None, code_counts=None, desc="",
              by_process=None, copies=1):
    """One pass: trains when an optimizer is given, else evaluates (the same masks every epoch, each event
    masked `copies` times: its copies are one unit of the intervals). `by_process`: a RegressionStats of
    the first objective's errors per (process, type), filed under process index x n_types + type."""
    train = opt is not None
    model.train(train)
    rng = np.random.default_rng([args.seed, epoch if train else 10**6, dist.rank])
    amp = T.use_amp(args.amp, dist.device)
    n_events = 0
    bar = tqdm(total=steps, desc=desc, disable=not dist.main, leave=False, file=sys.stderr)
    for batch in stream.batches(epoch, max_steps=steps):
        if copies > 1:
            batch = {k: np.repeat(v, copies, axis=0) for k, v in batch.items()}
        ids_np, labels, chosen_np = mask_objects(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                                 ctx["ranges"], rng, ctx["mask_rates"])
        if code_counts is not None:
            count_codes(code_counts, batch)
        orig, types, attn = T.to_device(batch, dist.device)
        ids = torch.from_numpy(ids_np).to(dist.device)
        chosen = torch.from_numpy(chosen_np).to(dist.device)
        b_labels = torch.from_numpy(labels).long().to(dist.device)[chosen]
        m_rows = torch.nonzero(chosen)[:, 0]  # each masked object's row of the batch
        m_types, m_events = types[chosen].long(), m_rows // copies
        targets = regression_targets(batch, orig, chosen, args.objectives, ctx["code_table"])
        kin = visible = None  # decoded from the masked ids: a [MASK]ed object has none
        if ctx["kinematics"] is not None:
            overlap = "overlap" in args.objectives
            kin, truth = decode_kinematics(ctx["kinematics"], ids_np, batch, chosen_np if overlap else None)
            kin = kin.to(dist.device)
            if overlap:
                visible, overlaps = overlap_inputs(batch["token_type_ids"], chosen_np, kin, truth.to(dist.device),
                                                   ctx["kinematics"].transverse, args.overlap_dr)
        cons = T.constituent_tensors(batch, dist.device)
        if cons is not None:  # a masked jet is not predicted from its own constituents
            cons = (cons[0], constituent_model.hide(cons[1], types, chosen))
        with torch.set_grad_enabled(train), torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(ids, types, attn, chosen, b_labels, cons, kin, visible)
        loss = 0.0
        for name in args.objectives:
            if name == "tokens":
                loss = loss + stats[name].add(*out[name], b_labels, m_types, ctx.get("mode"))
            elif name == "overlap":
                loss = loss + args.overlap_weight * stats[name].add(out[name], overlaps, m_types)
            elif name == "event":
                x = targets[name]
                ev_types = torch.full((len(x),), ctx["event_type"], device=x.device)
                z, valid = ctx["scalers"][name].standardise(ev_types, torch.nan_to_num(x))
                valid = valid * torch.isfinite(x)
                loss = loss + stats[name].add(ev_types, out[name], z * valid, valid, torch.arange(len(x), device=x.device) // copies)
            else:
                z, valid = ctx["scalers"][name].standardise(m_types, targets[name])
                loss = loss + stats[name].add(m_types, out[name], z, valid, m_events, args.balance_types)
                if by_process is not None and name == args.objectives[0]:
                    process = np.searchsorted(ctx["processes"], batch["process"][m_rows.cpu().numpy()].astype(str))
                    by_process.add(torch.from_numpy(process).to(m_types.device) * ctx["n_types"] + m_types, out[name], z,
                                   valid, m_events)
        if train:
            T.optimiser_step(loss, model, opt, sched, args.grad_clip)
        n_events += len(ids) // copies
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # shown at the bar's next refresh, not written every step
    bar.close()
    return n_events


def new_stats(objectives, cfg, device) -> dict:
    kinds = {"tokens": lambda: LevelStats(cfg.n_types, cfg.levels, device), "overlap": lambda: OverlapStats(cfg.n_types, device)}
    return {o: kinds.get(o, lambda: T.RegressionStats(cfg.n_types, device))() for o in objectives}


def summarise(stats: dict, vocab: dict, dist, overlap_weight: float) -> dict:
    """Each objective's figures, and the loss the training minimises (the overlap objective's weighted)."""
    out = {o: (s.summary(vocab, lambda t: D.all_sum(t, dist)) if isinstance(s, T.RegressionStats) else s.summary(vocab, dist))
           for o, s in stats.items()}
    weights = {"overlap": overlap_weight}
    out["loss"] = sum(weights.get(o, 1.0) * v["loss" if o in ("tokens", "overlap") else "mse"] for o, v in out.items())
    return out


def context_gain(val: dict, objective: str) -> dict:
    """Per object type: 1 - MSE / baseline MSE (regression), or accuracy / frequency-baseline accuracy (ids)."""
    per_type = val[objective]["per_type"]
    if objective == "tokens":
        return {o: {"accuracy": v["acc"], "baseline_accuracy": v["frequency_baseline_acc"],
                    "ratio": v["acc"] / v["frequency_baseline_acc"] if v["frequency_baseline_acc"] else float("nan")}
                for o, v in per_type.items()}
    return {o: regression_gain(v) for o, v in per_type.items()}


def regression_gain(v: dict) -> dict:
    return {"mse": v["mse"], "baseline_mse": v["baseline_mse"], "gain": v["context_gain"],
            "gain_ci95": v["context_gain_ci95"], "n": v["n"], "n_events": v["n_events"]}


def context_gain_by_process(stats: T.RegressionStats, processes, n_types: int, vocab: dict, dist) -> dict:
    """{process: {type: context gain}} of the first objective: the headline gain per type is their mix, so
    it moves with the corpus's processes as well as with what the model learns."""
    keys = {(p, o): i * n_types + t for i, p in enumerate(processes) for o, t in vocab["type_ids"].items()}
    per_key = stats.summary({"type_ids": keys}, lambda t: D.all_sum(t, dist))["per_type"]
    return {p: {o: regression_gain(v) for (q, o), v in per_key.items() if q == p} for p in processes}


def progress_figure(objective: str, v: dict) -> str:
    """An objective's validation figure for the line printed after each epoch."""
    if objective == "tokens":
        return f"tokens acc {v['acc']:.4f} (frequency baseline {v['frequency_baseline_acc']:.4f})"
    if objective == "overlap":
        return f"overlap acc {v['acc']:.3f} (null baseline {v['null_baseline_acc']:.3f})"
    return f"{objective} context gain {v['context_gain']:.3f}"


def history_row(epoch, step, lr, train, val, seconds, events):
    row = {"epoch": epoch, "step": step, "lr": lr, "seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1),
           "train_loss": train["loss"], "val_loss": val["loss"]}
    for name, v in val.items():
        if name == "tokens":
            row.update(val_acc=v["acc"], val_frequency_baseline_acc=v["frequency_baseline_acc"])
            row.update({f"val_acc_L{lvl}": x["acc"] for lvl, x in v["per_level"].items()})
        elif name == "overlap":
            row.update(val_overlap_acc=v["acc"], val_overlap_null_baseline_acc=v["null_baseline_acc"])
        elif name != "loss":
            row[f"val_{name}_context_gain"] = v["context_gain"]
            row.update({f"val_{name}_gain_{obj}": x["context_gain"] for obj, x in v["per_type"].items()})
    return row


def write_history(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    set_threads(args.threads)
    out = Path(args.out_dir)
    if (out / "backbone.pt").exists() and not (args.overwrite or args.resume):
        print(f"{out / 'backbone.pt'} exists, skipping (use --overwrite to redo)")
        return EXIT_OK
    if args.cpu_ranks > 1 and not D.launched() and not D.wants_cuda(args.device):
        return D.run_as_cpu_ranks(args.cpu_ranks, [__file__, *map(str, sys.argv[1:] if argv is None else argv)])
    paths = input_files(args.parquet)
    vocab, paths, errors = open_sequences(paths)
    for line in errors:
        print(line, file=sys.stderr)
    if not paths:
        die("no usable Parquet input", EXIT_SOME_FAILED)
    dist = D.setup(args.device)

    # What the objectives need: the tokenizers' codebooks, the HDF5 features.
    code_table = cont = None
    if args.code_geometry or "latent" in args.objectives:
        tok_dir = args.tokenizers or recorded_tokenizers(paths[0])
        try:
            code_table = codebook_table(vocab, tok_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            need = "--objective latent" if "latent" in args.objectives else "code geometry (or run with --no-code-geometry)"
            die(f"{need} needs the step2 tokenizers: {first_line(exc)}")
    kinematics = None
    if args.pair_bias or "overlap" in args.objectives:
        kinematics = open_kinematics(vocab, args.tokenizers or recorded_tokenizers(paths[0]),
                                     "--pair-bias" if args.pair_bias else "--objective overlap")
    h5_files = None
    if {"features", "event"} & set(args.objectives):
        try:
            h5_files = h5_locations(paths, args.h5_dir)
            if "features" in args.objectives:
                cont = ContinuousFeatures(h5_files, vocab, args.tokenizers or recorded_tokenizers(paths[0]))
        except (OSError, ValueError, KeyError) as exc:
            die(f"--objective {args.objective} needs the step1 HDF5 files: {first_line(exc)}")
    constituents = constituent_model.open_reader(paths, args.h5_dir, args.constituent_fallback) if args.constituents else None

    # Data: train and validation splits only; the test split is never read.
    if args.batch_size < dist.world or args.batch_size % dist.world:
        die(f"--batch-size {args.batch_size}: events per step must be a positive multiple of the {dist.world} rank(s)")
    rank_batch = args.batch_size // dist.world
    failed = {}  # files whose data pages turn out unreadable: skipped where found, listed in metrics.json
    stream = lambda split, shuffle: SequenceStream(paths, vocab["levels"], rank_batch, split=SPLITS[split],  # noqa: E731
                                                   shuffle_buffer=args.shuffle_buffer if shuffle else 0, seed=args.seed,
                                                   rank=dist.rank, world=dist.world, features=cont, failed=failed,
                                                   observables=h5_files if "event" in args.objectives else None,
                                                   constituents=constituents)
    train_stream, val_stream = stream("train", True), stream("val", False)
    val_totals = val_stream.totals()  # every rank reads all of it: the per-process sums line up
    val_processes = sorted(val_totals)
    n_train, n_val = train_stream.count(), sum(v["events"] for v in val_totals.values())
    for name, n in (("train", n_train), ("validation", n_val)):
        if n == 0:
            die(f"{', '.join(paths)}: the {name} split holds no events", EXIT_SOME_FAILED)
    steps = train_stream.steps_per_epoch(n_train)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    if steps == 0:
        die(f"{n_train} train events give no full step of batch {args.batch_size}")
    val_steps = val_stream.steps_per_epoch(n_val, even=False)

    cfg = ModelConfig.from_vocab(vocab, **T.model_sizes(args),
                                 code_dim=0 if code_table is None or not args.code_geometry else code_table.shape[1])
    cfg = replace(cfg, id_levels=T.id_levels(args.id_levels, cfg))
    if problem := T.id_levels_problem(cfg):
        die(problem)
    ranges = code_ranges(vocab)
    backbone = EventTransformer(cfg)
    if cfg.code_dim:
        backbone.set_code_vectors(code_table)
    table = None if code_table is None else torch.from_numpy(code_table).to(dist.device)
    event_type = vocab["type_ids"]["event"]  # the event objective's statistics are filed under the event type
    scalers = fit_scalers(train_stream, args.objectives, ranges, table, cont, cfg.n_types, event_type, dist)
    heads = {o: TypedRegressionHead(cfg.d_model, len(s.mean[0]), cfg.n_types) if args.typed_head else
             RegressionHead(cfg.d_model, len(s.mean[0])) for o, s in scalers.items() if o != "event"}
    token_head = MaskedTokenHead(cfg, legal_id_mask(vocab)) if "tokens" in args.objectives else None
    if "event" in args.objectives:
        backbone.set_observables_head(len(highlevel.NAMES))
        cfg = backbone.cfg
    model = PretrainModel(backbone, token_head, heads, REPRESENTATION, overlap="overlap" in args.objectives).to(dist.device)
    opt = T.adamw(model.parameters(), args.lr, args.weight_decay)
    sched = T.warmup_cosine(opt, steps * args.epochs, args.warmup_fraction)
    code_counts = np.zeros((cfg.n_types, cfg.levels, cfg.vocab_size), dtype=np.int64) if token_head else None
    start_epoch, history = 0, []
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        try:
            state = load_tensors(ckpt)
            model.load_state_dict(state["model"])
        except ValueError as exc:
            die(str(exc), EXIT_SOME_FAILED)
        except RuntimeError as exc:  # another model's checkpoint (other sizes, objectives or code version)
            die(f"{ckpt}: does not fit this model ({first_line(exc)}); resume with the settings that wrote it, "
                "or delete it", EXIT_SOME_FAILED)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        if token_head:
            code_counts = state["code_counts"].numpy()
        start_epoch, history = int(state["epoch"]) + 1, state["history"]
        if dist.main:
            print(f"resuming after epoch {start_epoch - 1} from {ckpt}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    ctx = {"ranges": ranges, "mask_rates": mask_rates(args, vocab["type_ids"], cfg.n_types), "code_table": table,
           "scalers": scalers, "event_type": event_type, "kinematics": kinematics, "n_types": cfg.n_types,
           "processes": np.array(val_processes)}
    if dist.main:
        n_params = sum(p.numel() for p in backbone.parameters())
        print(f"pretraining ({', '.join(args.objectives)}) on {n_train} train / {n_val} val events, {steps} steps/epoch "
              f"x {args.epochs} epochs, {dist.world} rank(s) on {dist.device}, backbone {n_params} parameters")

    if dist.main:
        output_dir(out)
    train_summary = val_summary = gain_by_process = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        train_stats = new_stats(args.objectives, cfg, dist.device)
        n_ev = run_epoch(ddp, train_stream, epoch, steps, ctx, args, dist, train_stats, opt=opt, sched=sched,
                         code_counts=code_counts if epoch == 0 else None, desc=f"epoch {epoch} train")
        seconds = time.perf_counter() - t0
        if token_head:  # the most frequent code of each (type, level) in train
            ctx["mode"] = D.all_sum(torch.from_numpy(code_counts).to(dist.device), dist).argmax(-1)
        last = epoch == args.epochs - 1  # its validation, with --val-masks draws, gives metrics.json's figures
        val_stats = new_stats(args.objectives, cfg, dist.device)
        by_process = None if args.objectives[0] in ("tokens", "event") or not last else \
            T.RegressionStats(cfg.n_types * len(val_processes), dist.device)
        if backbone.constituents is not None:
            backbone.constituents.reset()
        with torch.no_grad():
            run_epoch(model, val_stream, 0, val_steps, ctx, args, dist, val_stats, desc=f"epoch {epoch} val",
                      by_process=by_process, copies=args.val_masks if last else 1)
        if backbone.constituents is not None:  # validation jets; masked ones count as without constituents
            usage = {**backbone.constituents.summary(), "methods": constituents.methods, "files_without": constituents.missing,
                     "track_hits": constituents.track_hits}
        train_summary, val_summary = (summarise(s, vocab, dist, args.overlap_weight) for s in (train_stats, val_stats))
        if by_process is not None:
            gain_by_process = context_gain_by_process(by_process, val_processes, cfg.n_types, vocab, dist)
        n_ev = int(D.all_sum(torch.tensor([n_ev], dtype=torch.float64, device=dist.device), dist).item())
        history.append(history_row(epoch, sched.last_epoch, sched.get_last_lr()[0], train_summary, val_summary, seconds, n_ev))
        if dist.main:
            gains = ", ".join(progress_figure(o, val_summary[o]) for o in args.objectives)
            print(f"epoch {epoch}: train loss {train_summary['loss']:.4f} | val loss {val_summary['loss']:.4f}, {gains} "
                  f"| {history[-1]['events_per_s']} events/s")
            out.mkdir(parents=True, exist_ok=True)
            with atomic_output(ckpt) as tmp:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "code_counts": torch.from_numpy(code_counts if code_counts is not None else np.zeros(0)),
                            "epoch": epoch, "history": history}, tmp)
            write_history(out / "history.csv", history)
        D.barrier(dist)

    errors += list(failed.values())
    if dist.main:
        if train_summary is None:  # resumed a finished run: evaluate nothing new, keep the last numbers
            print("all epochs already done; writing the backbone from the checkpoint")
        prov = provenance("step3_pretrain.py", args, paths)
        metrics = {"objectives": args.objectives, "representation": REPRESENTATION, "train": train_summary,
                   "val": val_summary, "context_gain": context_gain(val_summary, args.objectives[0]) if val_summary else None,
                   "context_gain_by_process": gain_by_process,
                   "target_scalers": {o: s.state() for o, s in scalers.items()},
                   "n_events": {"train": n_train, "val": n_val}, "epochs": args.epochs, "steps_per_epoch": steps,
                   "world_size": dist.world, "model": T.model_record(cfg), "history": history, "input_errors": errors,
                   "provenance": prov, "constituents": usage if backbone.constituents is not None and val_summary else None}
        write_json(out / "metrics.json", metrics)
        save_module(out / "backbone.pt", backbone, backbone_sidecar(cfg, vocab, provenance=prov, objectives=args.objectives,
                                                                     representation=REPRESENTATION))
        if not args.no_plots:
            from plotting.plot_training import plot_pretraining
            plot_pretraining(out / "metrics.json", out / "plots")
        print(f"wrote {out / 'backbone.pt'}, metrics.json, history.csv")
    return D.finish(dist, EXIT_SOME_FAILED if errors else EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
