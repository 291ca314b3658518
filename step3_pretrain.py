"""Step 3: masked-token pretraining of the event transformer on step2's token Parquet files.

Whole object positions are masked (15%: 80% [MASK], 10% a random code legal for the type, 10%
kept) and every quantizer level's code is predicted, with logits restricted to the ids legal
for the position's type and level. Only the train split is trained on and the validation split
evaluated: test events (the shared split hash) are never read. AdamW, warmup + cosine decay,
gradient clipping, a checkpoint per epoch (--resume). CPU, one GPU (bf16 autocast) or many
with `torchrun --nproc_per_node N step3_pretrain.py ...` (DDP; gloo on CPU).

  python step3_pretrain.py --parquet runs/x/tokens/*.parquet --out-dir runs/x/pretrain
Outputs: backbone.pt + backbone.json (config, vocab checksum), metrics.json, history.csv,
checkpoint.pt (+ .json), plots/.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import distributed as D
from common.event_data import SequenceStream, code_ranges, mask_objects, open_sequences
from common.runtime import EXIT_OK, EXIT_SOME_FAILED, atomic_output, die, expand_inputs, provenance, seed_everything, write_json
from common.token_parquet import SPLITS, legal_id_mask, recorded_tokenizers
from common.transformer import (EventTransformer, MaskedTokenHead, MaskedTokenModel, ModelConfig, backbone_sidecar,
                                codebook_table, save_module)

# --- defaults (the run_all setting: small and quick on 2 CPU cores) ------------------------------------
OUT_DIR = "runs/pretrain"
D_MODEL, N_HEADS, N_LAYERS, D_FF, DROPOUT = 64, 4, 2, 256, 0.1
EPOCHS = 4
BATCH_SIZE = 128
LR = 1e-3
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0
MASK_PROB = 0.15
SHUFFLE_BUFFER = 16384
SEED = 1
DEVICE = "auto"
CODE_GEOMETRY = True  # embed each object's quantised latent (from the step2 codebooks) beside its code ids
THREADS = 0  # 0: all cores (1.1-1.4x faster, quiet 2-core box); 1 if others share the cores (all: 5-20x slower)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parquet", nargs="+", required=True, help="step2 token Parquet files (or directories)")
    p.add_argument("--tokenizers", default=None, help="step2 tokenizer folder (default: recorded in the Parquet)")
    p.add_argument("--no-code-geometry", dest="code_geometry", action="store_false", default=CODE_GEOMETRY,
                   help="code ids only: do not add the codebook vectors to the embedding")
    p.add_argument("--out-dir", default=OUT_DIR)
    p.add_argument("--d-model", type=int, default=D_MODEL)
    p.add_argument("--n-heads", type=int, default=N_HEADS)
    p.add_argument("--n-layers", type=int, default=N_LAYERS)
    p.add_argument("--d-ff", type=int, default=D_FF)
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="per rank")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--warmup-fraction", type=float, default=WARMUP_FRACTION)
    p.add_argument("--grad-clip", type=float, default=GRAD_CLIP)
    p.add_argument("--mask-prob", type=float, default=MASK_PROB)
    p.add_argument("--shuffle-buffer", type=int, default=SHUFFLE_BUFFER, help="events held for shuffling")
    p.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (quick runs)")
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch CPU threads (0: all cores; 1 on a busy shared machine)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on GPU)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--resume", action="store_true", help="continue from out-dir/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.mask_prob < 1:
        p.error("--mask-prob must be in (0, 1)")
    if args.d_model % args.n_heads:
        p.error("--d-model must be a multiple of --n-heads")
    return args


def lr_lambda(total: int, warmup: int):
    """Linear warmup, then cosine decay to zero."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


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
        ratio = lambda a, b: float(a.sum() / b.sum()) if b.sum() else float("nan")
        out = {"n_masked": int(n.sum()), "acc": ratio(correct, n), "loss": ratio(loss, n),
               "frequency_baseline_acc": ratio(base, n),
               "per_level": {str(l): {"n": int(n[:, l].sum()), "acc": ratio(correct[:, l], n[:, l]),
                                      "loss": ratio(loss[:, l], n[:, l])} for l in range(n.shape[1])},
               "per_type": {}}
        for obj, t in vocab["type_ids"].items():
            if n[t].sum():
                out["per_type"][obj] = {"n": int(n[t].sum()), "acc": ratio(correct[t], n[t]), "loss": ratio(loss[t], n[t]),
                                        "frequency_baseline_acc": ratio(base[t], n[t]),
                                        "acc_per_level": [ratio(correct[t, l], n[t, l]) for l in range(n.shape[1])]}
        return out


def to_torch(batch: dict, device) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[k])).to(device)
                 for k in ("input_ids", "token_type_ids", "attention_mask"))


def run_epoch(model, stream, epoch, steps, ranges, args, dist, stats, mode=None, opt=None, sched=None,
              code_counts=None, desc=""):
    """One pass over a stream: trains when an optimizer is given, else evaluates."""
    train = opt is not None
    model.train(train)
    rng = np.random.default_rng([args.seed, epoch if train else 10**6, dist.rank])  # val: the same masks each epoch
    amp = args.amp == "on" or (args.amp == "auto" and dist.device.type == "cuda")
    n_events = 0
    bar = tqdm(total=steps, desc=desc, disable=not dist.main, leave=False, file=sys.stderr)
    for batch in stream.batches(epoch, max_steps=steps):
        ids, labels, chosen = mask_objects(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                           ranges, rng, args.mask_prob)
        if code_counts is not None:  # frequency baseline: how often each code stands at each (type, level)
            t = batch["token_type_ids"][batch["attention_mask"] > 0].astype(np.int64)
            v = batch["input_ids"][batch["attention_mask"] > 0]
            q, size = v.shape[1], code_counts.shape[-1]
            flat = ((t[:, None] * q + np.arange(q)) * size + v).ravel()
            code_counts += np.bincount(flat, minlength=code_counts.size).reshape(code_counts.shape)
        b_ids, b_types, b_attn = to_torch({**batch, "input_ids": ids}, dist.device)
        b_chosen = torch.from_numpy(chosen).to(dist.device)
        b_labels = torch.from_numpy(labels).long().to(dist.device)[b_chosen]
        with torch.set_grad_enabled(train), torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=amp):
            per_level_loss, correct = model(b_ids, b_types, b_attn, b_chosen, b_labels)
        loss = stats.add(per_level_loss, correct, b_labels, b_types[b_chosen].long(), mode)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            sched.step()
        n_events += len(ids)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return n_events


def write_history(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def history_row(epoch, step, lr, train, val, seconds, events):
    row = {"epoch": epoch, "step": step, "lr": lr, "seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1),
           "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val["loss"], "val_acc": val["acc"],
           "val_frequency_baseline_acc": val["frequency_baseline_acc"]}
    row.update({f"val_acc_L{l}": v["acc"] for l, v in val["per_level"].items()})
    row.update({f"val_acc_{obj}": v["acc"] for obj, v in val["per_type"].items()})
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    if (out / "backbone.pt").exists() and not (args.overwrite or args.resume):
        print(f"{out / 'backbone.pt'} exists, skipping (use --overwrite to redo)")
        return EXIT_OK
    paths = expand_inputs(args.parquet)
    vocab, paths, errors = open_sequences(paths)
    for line in errors:
        print(line, file=sys.stderr)
    if not paths:
        die("no usable Parquet input", EXIT_SOME_FAILED)
    dist = D.setup(args.device)

    # Data: train and validation splits only; the test split is never read.
    stream = lambda split, shuffle: SequenceStream(paths, vocab["levels"], args.batch_size, split=SPLITS[split],
                                                   shuffle_buffer=args.shuffle_buffer if shuffle else 0, seed=args.seed,
                                                   rank=dist.rank, world=dist.world)
    train_stream, val_stream = stream("train", True), stream("val", False)
    n_train, n_val = train_stream.count(), val_stream.count()
    for name, n in (("train", n_train), ("validation", n_val)):
        if n == 0:
            die(f"{', '.join(paths)}: the {name} split holds no events", EXIT_SOME_FAILED)
    steps = train_stream.steps_per_epoch(n_train)
    if args.max_steps:
        steps = min(steps, args.max_steps)
    if steps == 0:
        die(f"{n_train} train events give no full step for {dist.world} rank(s) of batch {args.batch_size}")
    val_steps = val_stream.steps_per_epoch(n_val, even=False)

    # Model, optimizer, schedule.
    code_table = None
    if args.code_geometry:
        try:
            code_table = codebook_table(vocab, args.tokenizers or recorded_tokenizers(paths[0]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            die(f"code geometry: {str(exc).splitlines()[0]} (or run with --no-code-geometry)")
    cfg = ModelConfig.from_vocab(vocab, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                                 d_ff=args.d_ff, dropout=args.dropout,
                                 code_dim=0 if code_table is None else code_table.shape[1])
    ranges = code_ranges(vocab)
    backbone = EventTransformer(cfg)
    if code_table is not None:
        backbone.set_code_vectors(code_table)
    model = MaskedTokenModel(backbone, MaskedTokenHead(cfg, legal_id_mask(vocab))).to(dist.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = steps * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, int(args.warmup_fraction * total))))
    code_counts = np.zeros((cfg.n_types, cfg.levels, cfg.vocab_size), dtype=np.int64)
    start_epoch, history = 0, []
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        code_counts = state["code_counts"].numpy()
        start_epoch, history = int(state["epoch"]) + 1, state["history"]
        if dist.main:
            print(f"resuming after epoch {start_epoch - 1} from {ckpt}")
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    if dist.main:
        n_params = sum(p.numel() for p in backbone.parameters())
        print(f"pretraining on {n_train} train / {n_val} val events, {steps} steps/epoch x {args.epochs} epochs, "
              f"{dist.world} rank(s) on {dist.device}, backbone {n_params} parameters")

    train_summary = val_summary = None
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        train_stats = LevelStats(cfg.n_types, cfg.levels, dist.device)
        n_ev = run_epoch(ddp, train_stream, epoch, steps, ranges, args, dist, train_stats, opt=opt, sched=sched,
                         code_counts=code_counts if epoch == 0 else None, desc=f"epoch {epoch} train")
        seconds = time.perf_counter() - t0
        counts = D.all_sum(torch.from_numpy(code_counts).to(dist.device), dist).cpu()
        mode = counts.argmax(-1).to(dist.device)  # the most frequent code of each (type, level) in train
        val_stats = LevelStats(cfg.n_types, cfg.levels, dist.device)
        with torch.no_grad():
            run_epoch(model, val_stream, 0, val_steps, ranges, args, dist, val_stats, mode=mode, desc=f"epoch {epoch} val")
        train_summary, val_summary = train_stats.summary(vocab, dist), val_stats.summary(vocab, dist)
        n_ev = int(D.all_sum(torch.tensor([n_ev], dtype=torch.float64, device=dist.device), dist).item())
        history.append(history_row(epoch, sched.last_epoch, sched.get_last_lr()[0], train_summary, val_summary, seconds, n_ev))
        if dist.main:
            h = history[-1]
            print(f"epoch {epoch}: train loss {h['train_loss']:.4f} acc {h['train_acc']:.4f} | val loss {h['val_loss']:.4f} "
                  f"acc {h['val_acc']:.4f} (frequency baseline {h['val_frequency_baseline_acc']:.4f}) | {h['events_per_s']} events/s")
            out.mkdir(parents=True, exist_ok=True)
            with atomic_output(ckpt) as tmp:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "code_counts": torch.from_numpy(code_counts), "epoch": epoch, "history": history}, tmp)
            write_history(out / "history.csv", history)
        D.barrier(dist)

    if dist.main:
        if train_summary is None:  # resumed a finished run: evaluate nothing new, keep the last numbers
            print("all epochs already done; writing the backbone from the checkpoint")
        prov = provenance("step3_pretrain.py", args, paths)
        metrics = {"train": train_summary, "val": val_summary, "n_events": {"train": n_train, "val": n_val},
                   "epochs": args.epochs, "steps_per_epoch": steps, "world_size": dist.world, "history": history,
                   "provenance": prov}
        write_json(out / "metrics.json", metrics)
        save_module(out / "backbone.pt", backbone, backbone_sidecar(cfg, vocab, provenance=prov,
                                                                     val_masked_acc=(val_summary or {}).get("acc")))
        if not args.no_plots:
            from plotting.plot_training import plot_pretraining
            plot_pretraining(out / "metrics.json", out / "plots")
        print(f"wrote {out / 'backbone.pt'}, metrics.json, history.csv")
    D.teardown(dist)
    return EXIT_SOME_FAILED if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
