"""The training plumbing step3 (pretraining) and step4 (fine-tuning) share: the model-size
defaults, the optimiser, the warm-up + cosine schedule, the AMP choice, batches to the device, an optimiser
step with clipping, and the pooled event representation of a sequence."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# The run_all model: small and quick on 2 CPU cores. Steps 3 and 4 take these as flag defaults.
D_MODEL, N_HEADS, N_LAYERS, D_FF, DROPOUT = 64, 4, 2, 256, 0.1
CONSTITUENT_DIM = 32  # width of the jet-constituent encoder (--constituents)
CODE_GEOMETRY = True  # embed each object's quantised latent (from the step2 codebooks) beside its code ids
PAIR_BIAS = 32  # > 0: the width of the pair-kinematics attention bias MLP (common/pair_kinematics.py); 0: off
# Embed the ids of the coarsest quantizer level only; the finer levels enter through their codebook vectors.
# Where the tokens allow it (object granularity with the code geometry): scratch gains 0.012 / 0.011 AUC at 10 / 100%
# of run_all's labels, fine-tuned level (bench/README.md, "The coarsest ids by default")
ID_LEVELS = 1
# Embed each object's rank among the objects of its type (they stand in pT order): the fine-tuned AUC rose by 0.005 /
# 0.007 at 10 / 100% of run_all's labels and the photons' and jets' context gains by 0.03 (bench/README.md, "Where the
# taus stand")
TYPE_RANK = True
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.05
GRAD_CLIP = 1.0
SEQUENCE_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def add_model_args(p) -> None:
    """The model-size flags, with the same defaults in every step that builds a model."""
    p.add_argument("--d-model", type=int, default=D_MODEL)
    p.add_argument("--n-heads", type=int, default=N_HEADS)
    p.add_argument("--n-layers", type=int, default=N_LAYERS)
    p.add_argument("--d-ff", type=int, default=D_FF)
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--group-pooling", choices=("mean", "attention"), default="mean",
                   help="granularity group tokens: how an object's feature-group sub-tokens become one vector")
    p.add_argument("--group-attention", type=int, default=0, metavar="N",
                   help="a GroupAttentionLayer: attention among N slices of each position's embedding (0: off)")
    p.add_argument("--no-code-geometry", dest="code_geometry", action="store_false", default=CODE_GEOMETRY,
                   help="code ids only: do not add the codebook vectors of the step2 tokenizers to the embedding "
                        "(step4 --init: the backbone's)")
    p.add_argument("--pair-bias", type=int, default=PAIR_BIAS, metavar="WIDTH",
                   help="an attention bias from each pair of objects' kinematics, decoded from the tokens with the "
                        "step2 tokenizers, through an MLP of this width (0: off; step4 --init: the backbone's)")
    p.add_argument("--id-levels", type=int, default=None, metavar="N",
                   help="embed the code ids of the N coarsest quantizer levels only (0: all); the finer levels enter "
                        f"through their codebook vectors (code geometry). Default: {ID_LEVELS} where the tokens allow "
                        "it (object granularity with the code geometry), else 0 (step4 --init: the backbone's)")
    p.add_argument("--no-type-rank", dest="type_rank", action="store_false", default=TYPE_RANK,
                   help="do not embed each object's rank within its type (step4 --init: the backbone's)")
    p.add_argument("--constituents", action="store_true",
                   help="enrich each jet with its constituents (common/jet_constituents in the HDF5, step1)")
    p.add_argument("--constituent-dim", type=int, default=CONSTITUENT_DIM)
    p.add_argument("--no-constituent-fallback", dest="constituent_fallback", action="store_false",
                   help="fail on HDF5 files without constituents instead of using the jets alone")


def check_model_args(p, args) -> None:
    """Usage errors (exit 2) of the model-size flags."""
    if args.d_model % args.n_heads:
        p.error("--d-model must be a multiple of --n-heads")
    if args.pair_bias < 0:
        p.error("--pair-bias must be 0 (off) or a positive width")
    if args.id_levels is not None and args.id_levels < 0:
        p.error("--id-levels must be 0 (all) or a positive number of levels")
    if args.group_attention < 0 or (args.group_attention and args.d_model % args.group_attention):
        p.error(f"--group-attention {args.group_attention} must divide --d-model {args.d_model}")


def model_sizes(args) -> dict:
    sizes = {k: getattr(args, k) for k in ("d_model", "n_heads", "n_layers", "d_ff", "dropout", "group_pooling",
                                           "group_attention", "pair_bias", "type_rank")}
    return {**sizes, "id_levels": args.id_levels or 0, "constituent_dim": args.constituent_dim if args.constituents else 0}


def id_levels(requested: int | None, cfg) -> int:
    """--id-levels as given, or (None) its default where cfg's tokens allow it (object granularity, code geometry)."""
    if requested is not None:
        return requested
    return ID_LEVELS if cfg.code_dim and cfg.granularity == "object" else 0


def id_levels_problem(cfg) -> str | None:
    """Why cfg's id_levels cannot be built (None where it can)."""
    if cfg.id_levels and (not cfg.code_dim or cfg.granularity == "group"):
        return ("--id-levels needs object-granularity tokens and the code geometry: the finer levels enter only through "
                "their codebook vectors")
    return None


def model_record(cfg) -> dict:
    """What metrics.json records of the architecture beyond its sizes."""
    return {"granularity": cfg.granularity, "group_pooling": cfg.group_pooling if cfg.granularity == "group" else None,
            "group_attention": cfg.group_attention, "constituent_dim": cfg.constituent_dim, "pair_bias": cfg.pair_bias,
            "type_rank": cfg.type_rank}


def constituent_tensors(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's jet constituents (SequenceStream.constituents) on the device, None when absent."""
    if "constituents" not in batch:
        return None
    return torch.from_numpy(batch["constituents"]).to(device), torch.from_numpy(batch["constituent_mask"]).to(device)


def add_runtime_args(p, device: str = "auto") -> None:
    """--device, --threads and --amp, one meaning in every step."""
    p.add_argument("--device", default=device, help="auto (a GPU when torch sees one), cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (0: the CPUs this process may use: affinity, cgroup quota, OMP_NUM_THREADS)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on GPU)")


def use_amp(amp: str, device: torch.device) -> bool:
    return amp == "on" or (amp == "auto" and device.type == "cuda")


def adamw(params, lr: float = 1e-3, weight_decay: float = WEIGHT_DECAY) -> torch.optim.AdamW:
    """AdamW, fused: one kernel over all parameters. The per-tensor loop of the default took 22 ms
    a step for the 1.6M-parameter run_all classifier on one CPU thread, the fused kernel 3 ms."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def warmup_cosine(optimizer, total_steps: int, warmup_fraction: float = WARMUP_FRACTION, hold: Sequence[int] = ()):
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to zero. `hold`: per
    parameter group, steps at lr 0 before that group's own warm-up and decay over the steps left."""

    def schedule(start: int):
        span = max(1, total_steps - start)
        warmup = max(1, int(warmup_fraction * span))

        def factor(step: int) -> float:
            step -= start
            if step < 0:
                return 0.0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, span - warmup))))
        return factor
    starts = list(hold) + [0] * (len(optimizer.param_groups) - len(hold))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(s) for s in starts])


def to_device(batch: dict, device, keys=SEQUENCE_KEYS) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[k])).to(device) for k in keys)


def optimiser_step(loss: torch.Tensor, model: torch.nn.Module, opt, sched, grad_clip: float = GRAD_CLIP) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()


# --- masked-object regression targets (step3) ----------------------------------------------------------

class TargetScaler:
    """Per object type and target dimension: the mean and spread of a regression target, from
    the objects of a few training batches. Targets are standardised with them, so every type and
    dimension weighs alike in the loss, and predicting 0 is the no-context baseline (the type's mean)."""

    def __init__(self, n_types: int, dim: int):
        self.sums = np.zeros((3, n_types, dim))  # n, sum, sum of squares
        self.mean = self.std = self.valid = None

    def add(self, types: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> None:
        for k, v in enumerate((valid, targets * valid, targets**2 * valid)):
            np.add.at(self.sums[k], types, v)

    def finish(self, reduce=lambda a: a) -> "TargetScaler":
        n, s, s2 = reduce(self.sums)
        self.valid = n > 0
        self.mean = np.divide(s, n, out=np.zeros_like(s), where=self.valid)
        var = np.divide(s2, n, out=np.zeros_like(s), where=self.valid) - self.mean**2
        # a spread needs 2 values and must exceed float32 round-off (targets are squared in float32), else 1:
        # a column with a single valid value got the round-off as its spread (2e-4) and values of 1e4 sigma
        spread = (n >= 2) & (var > 1e-6 * (1 + self.mean**2))
        self.std = np.sqrt(np.where(spread, var, 1.0))
        return self

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "valid": self.valid.tolist()}

    def standardise(self, types: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, valid) of targets (M, dim) of objects of the given types (M,)."""
        t = types.long()
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=targets.device)[t]  # noqa: E731
        valid = as_t(self.valid)
        return (targets.float() - as_t(self.mean)) / as_t(self.std) * valid, valid


class RegressionStats:
    """Squared errors of the model and of the no-context baseline (predicting 0 in standardised
    units, the type's training mean) summed per object type; reduced over ranks before reading.
    The context gain's interval treats events as the independent units (objects of one event share
    their context): per event and type the summed errors M and B, and over events the count and the
    sums of M^2, B^2 and M*B, give the delta-method spread of the ratio sum(M) / sum(B)."""

    def __init__(self, n_types: int, device):
        self.sums = torch.zeros(4, n_types, dtype=torch.float64, device=device)  # objects, values, model, baseline
        self.events = torch.zeros(4, n_types + 1, dtype=torch.float64, device=device)  # events, M^2, B^2, M*B; last: all

    def add(self, types, pred, z, valid, events, balanced: bool = False) -> torch.Tensor:
        """Accumulates and returns the mean squared error of this batch (the loss): over all values,
        or (balanced) the mean over the types present of each type's mean squared error. `events`:
        each object's event (row) in the batch."""
        sq = (pred - z) ** 2 * valid
        t = types.long()
        model, base = sq.sum(1).detach().double(), (z**2 * valid).sum(1).detach().double()
        for k, v in enumerate((torch.ones_like(model), valid.sum(1).double(), model, base)):
            self.sums[k].index_add_(0, t, v)
        n_types = len(self.sums[0])
        self._add_events(events.long() * n_types + t, model, base, lambda key: key % n_types)
        self._add_events(events.long(), model, base, lambda key: torch.full_like(key, n_types))
        if not balanced:
            return sq.sum() / valid.sum().clamp(min=1)
        per_type = torch.zeros(2, n_types, dtype=sq.dtype, device=sq.device)
        per_type[0].index_add_(0, t, sq.sum(1))
        per_type[1].index_add_(0, t, valid.sum(1).to(sq.dtype))
        present = per_type[1] > 0
        return (per_type[0][present] / per_type[1][present]).mean()

    def _add_events(self, key, model, base, column) -> None:
        """Sums the errors per key (an event, or an event and type), then their squares per column."""
        keys, inverse = torch.unique(key, return_inverse=True)
        m = torch.zeros(len(keys), dtype=torch.float64, device=model.device).index_add_(0, inverse, model)
        b = torch.zeros_like(m).index_add_(0, inverse, base)
        for k, v in enumerate((torch.ones_like(m), m * m, b * b, m * b)):
            self.events[k].index_add_(0, column(keys), v)

    def summary(self, vocab: dict, reduce=lambda t: t) -> dict:
        (n, values, model, base), (n_ev, m2, b2, mb) = reduce(self.sums).cpu().numpy(), reduce(self.events).cpu().numpy()
        ratio = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731

        def gain(i, m, b) -> dict:
            if not b:
                return {"context_gain": float("nan"), "context_gain_ci95": [float("nan")] * 2}
            r = m / b  # an interval needs two events
            spread = n_ev[i] / (n_ev[i] - 1) * max(0.0, m2[i] - 2 * r * mb[i] + r * r * b2[i]) if n_ev[i] > 1 else np.nan
            half = 1.96 * np.sqrt(spread) / b
            return {"context_gain": float(1 - r), "context_gain_ci95": [float(1 - r - half), float(1 - r + half)]}
        out = {"n_masked": int(n.sum()), "mse": ratio(model.sum(), values.sum()),
               "baseline_mse": ratio(base.sum(), values.sum()), **gain(-1, model.sum(), base.sum()), "per_type": {}}
        for obj, t in vocab["type_ids"].items():
            if n[t]:
                out["per_type"][obj] = {"n": int(n[t]), "n_events": int(n_ev[t]), "mse": ratio(model[t], values[t]),
                                        "baseline_mse": ratio(base[t], values[t]), **gain(t, model[t], base[t])}
        return out
