"""Training of a tokenizer's VQ-VAE (step2 fit, the benchmarks): codebook size and levels from
the amount of training data, the pT loss weight, the training loop (vq: plain autoencoder warm-up,
k-means initialisation of the codebooks, VQ training with EMA codebooks and dead-code resets;
the FSQ kinds: a fixed grid, trained end to end from the first step) and the codebook checksums
that show every torchrun rank ends with the same codebooks."""
from __future__ import annotations

import copy
import hashlib
import math
import time

import torch
from tqdm import tqdm

from common.tokenizer import (FSQ_LEVELS, KMEANS_ITERS, MAX_LEVELS, ResidualEMAQuantizer, VQAutoencoder,
                              fsq_levels_for, reconstruction_loss)

# --- codebook size and levels ('auto') ----------------------------------------------------------
AUTO_OBJECTS_PER_CODE = 32  # 64 left e, mu, jet pT at 2.3-2.4%, 128 at 4-8%: each doubling buys ~30%
AUTO_MIN_CODES, AUTO_MAX_CODES = 64, 2048  # 16 tau codes could not hold pT; 4096 track codes cost 2x fit time
AUTO_MIN_LEVELS = 4
AUTO_BITS = 32  # levels x log2(codes): taus (64 codes) get 6 levels, pT 2.3-2.7% -> 1.5-1.6%
PT_FEATURES = ("pt", "sumet")  # the features the pT loss weight applies to

# --- the training loop --------------------------------------------------------------------------
WEIGHT_DECAY = 1e-4
LR_RISE_FRACTION = 0.05  # one-cycle schedule: the learning rate rises over this fraction of the steps
KMEANS_FACTOR = 10  # k-means buffer: at least this x codebook size vectors
RESET_WINDOW_HITS = 32  # reset window: mean hits per code it must hold (so "dead" is not noise)
RESETS_UNTIL = 0.9  # no dead-code resets after this fraction of the steps: the codebooks settle
HISTORY_EVERY = 50  # steps between loss records


def choose_codebook_size(requested: str | int, n_train: int) -> int:
    """An explicit size, or 'auto': a power of two near n_train / AUTO_OBJECTS_PER_CODE, clipped."""
    if str(requested) != "auto":
        return int(requested)
    k = 2 ** int(math.floor(math.log2(max(n_train / AUTO_OBJECTS_PER_CODE, 1))))
    return int(min(max(k, AUTO_MIN_CODES), AUTO_MAX_CODES))


def choose_levels(requested: str | int, codebook_size: int) -> int:
    """An explicit number, or 'auto': a codebook that few objects keep small gets more levels, so
    each object keeps its bits (a level's codes must all be hit by held-out objects; more levels
    ask no more of them)."""
    if str(requested) != "auto":
        return int(requested)
    return min(MAX_LEVELS, max(AUTO_MIN_LEVELS, math.ceil(AUTO_BITS / math.log2(max(codebook_size, 2)))))


def choose_fsq_levels(requested: str | int, n_train: int) -> list[int]:
    """FSQ levels per dimension for --codebook-size: an explicit size the rule knows
    (common.tokenizer.FSQ_LEVELS), or 'auto': the largest size of the rule not above vq's auto
    size (the smallest, 2^8, where that is below it)."""
    if str(requested) != "auto":
        return fsq_levels_for(int(requested))
    k = choose_codebook_size("auto", n_train)
    return list(FSQ_LEVELS[max((s for s in FSQ_LEVELS if s <= k), default=min(FSQ_LEVELS))])


def weight_pt(specs: list[dict], weight: float) -> None:
    """pT (and MET sumet) get a larger reconstruction weight: the bits of the codes go where analyses need them."""
    for s in specs:
        if s["kind"] == "continuous" and s["names"][0].split("/")[-1] in PT_FEATURES:
            s["loss_weight"] = float(weight)


def train(model: VQAutoencoder, specs: list[dict], batches, *, steps: int, warmup_steps: int, batch_size: int,
          lr: float, commit_weight: float, discrete_weight: float, seed: int, ddp_model=None, label: str = "",
          progress: bool = True) -> list[dict]:
    """vq: warm-up as a plain autoencoder for `warmup_steps`, k-means init of the codebooks (seeded
    with `seed`), then VQ training with EMA codebooks and dead-code resets (none after
    RESETS_UNTIL of the steps). The FSQ kinds: quantised from the first step (nothing to
    initialise or reset). `batches`: an endless iterator of (batch_size, d_in) tensors, or of
    (x, events) pairs of whole events for the transformer encoder; `ddp_model`: the
    DistributedDataParallel wrapper under torchrun. Returns the loss history."""
    ddp_model = model if ddp_model is None else ddp_model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=LR_RISE_FRACTION)
    q = model.quantizer
    vq = isinstance(q, ResidualEMAQuantizer)
    reset_every = max(1, math.ceil(RESET_WINDOW_HITS * q.size / batch_size))
    history, t0 = [], time.time()
    bar = tqdm(range(steps), desc=f"fit {label}", disable=not progress, mininterval=1.0)
    for step in bar:
        if vq and (step == warmup_steps or (step == 0 and warmup_steps <= 0)):
            init_codebooks(model, batches, q.size * KMEANS_FACTOR, seed)
        quantize = bool(q.initialised) if vq else True
        x, events = split_batch(next(batches))
        out, codes, commit = ddp_model(x, quantize=quantize, events=events)
        recon, parts = reconstruction_loss(specs, out, x, discrete_weight)
        loss = recon + commit_weight * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if vq and quantize and step % reset_every == reset_every - 1 and step < RESETS_UNTIL * steps:
            with torch.no_grad():
                _, _, residuals = q.quantize(model.encode_z(x, events))
            q.reset_dead_codes(residuals)
        if step % HISTORY_EVERY == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item(), "recon": recon.item(), "commit": commit.item(),
                            "quantized": quantize, **{f"loss_{k}": v for k, v in parts.items()}})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    history.append({"seconds": time.time() - t0, "objects_per_s": steps * batch_size / (time.time() - t0)})
    return history


def nest_levels(model: VQAutoencoder, levels: int) -> VQAutoencoder:
    """A fitted residual-VQ autoencoder with more levels (`levels` in all), to be trained on: its encoder and
    fitted levels frozen, so an object's first codes stay those of the fit and the new levels only add detail;
    the decoder learns to read them, and train() k-means-initialises the new levels on the residuals."""
    q = model.quantizer
    if not isinstance(q, ResidualEMAQuantizer):
        raise ValueError("nested levels need the residual EMA VQ (--quantizer vq)")
    nested = copy.deepcopy(model)
    new = ResidualEMAQuantizer(levels, q.size, q.dim, q.decay, q.cosine, q.dead_fraction).to(q.codebooks.device)
    for name, buf in q.named_buffers():  # the per-level buffers' first rows; `seen` and `initialised` start afresh
        if buf.dim() and len(buf) == q.levels:
            getattr(new, name)[: q.levels] = buf
    new.frozen_levels = q.levels
    nested.quantizer = new
    nested.encoder.requires_grad_(False)
    return nested


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, events) of a minibatch: a plain tensor has no events (the mlp encoder)."""
    return batch if isinstance(batch, tuple) else (batch, None)


@torch.no_grad()
def init_codebooks(model: VQAutoencoder, batches, n_vectors: int, seed: int) -> None:
    """k-means on >= n_vectors encoder outputs streamed from the data (not the first batch)."""
    buf, have = [], 0
    while have < n_vectors:
        z = model.encode_z(*split_batch(next(batches)))
        buf.append(z)
        have += len(z)
    g = torch.Generator().manual_seed(seed)
    model.quantizer.kmeans_init(torch.cat(buf), KMEANS_ITERS, g)


def codebook_digest(model: VQAutoencoder) -> str:
    return hashlib.sha256(model.quantizer.code_vectors().cpu().contiguous().numpy().tobytes()).hexdigest()


def ranks_digests(model: VQAutoencoder, world: int) -> list[str]:
    """Every rank's codebook checksum (gathered as tensors): the DDP synchronisation check."""
    digest = codebook_digest(model)
    if world == 1:
        return [digest]
    import torch.distributed as dist

    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64, device=next(model.decoder.parameters()).device)
    out = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [bytes(t.tolist()).hex() for t in out]
