"""The event transformer shared by step3 (masked-token pretraining) and step4 (classification).

Per position the Q code embeddings are summed (the quantizer levels of one object), then the
type and position embeddings are added, LayerNorm, dropout, N pre-norm encoder blocks. The
"continuous" variant replaces the code embedding of object positions by a per-type linear
projection of the normalised features (the tokenization-cost baseline); special and event
positions keep their code embedding.

Granularity group (token files of step2 fit --granularity group): an object position holds the
level codes of each of its feature groups ("slots"). Each group's sub-token is the sum of its
slots' code embeddings plus a learned group embedding; the sub-tokens of a position go through one
inner encoder layer (all positions at once) and are pooled (mean, or a learned attention query)
into the one vector per object that the event transformer reads, as in the flat model. Special,
event and PAD positions keep the flat path. GroupAttentionLayer (--group-attention N) is the cheap
variant on the flat model: attention among N slices of each position's embedding.

Pair bias (step3 --pair-bias W): every attention layer adds, per head, a bias computed from the
kinematics of each pair of objects (common.pair_kinematics: decoded from the tokens), as in
Particle Transformer.

Checkpoints are a torch.save'd state_dict (loaded with weights_only=True) plus a JSON sidecar
holding the config and the vocabulary checksum, so nothing unpickles arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.constituent_model import ConstituentEncoder
from common.pair_kinematics import PairBias
from common.runtime import atomic_output, first_line, write_json
from common.schema import PAD, SPECIAL_TYPE_ID

# The parts of the vocabulary that decide what an id means; a backbone is valid for any
# Parquet whose vocabulary agrees on these.
VOCAB_IDENTITY_KEYS = ("levels", "vocab_size", "type_ids", "ranges", "event_tokens", "tokenizers", "granularity", "groups")
GROUP_ONLY_KEYS = ("granularity", "groups")  # in the checksum only in granularity group: object vocabularies keep theirs


def granularity(vocab: dict) -> str:
    return vocab.get("granularity", "object")


def vocab_checksum(vocab: dict) -> str:
    ident = {k: vocab.get(k) for k in VOCAB_IDENTITY_KEYS if granularity(vocab) == "group" or k not in GROUP_ONLY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ModelConfig:
    vocab_size: int
    levels: int
    n_types: int
    max_length: int
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    continuous_dims: dict[str, int] = field(default_factory=dict)  # type id -> input width
    code_dim: int = 0  # > 0: each code's tokenizer codebook vector enters its embedding too
    constituent_dim: int = 0  # > 0: jets are enriched by a constituent encoder of this width
    granularity: str = "object"  # "group": the sub-token path of the object positions (slot_groups)
    slot_groups: dict[str, list[int]] = field(default_factory=dict)  # type id -> feature-group index of each slot
    group_pooling: str = "mean"  # sub-tokens -> object vector: "mean" or "attention" (a learned query)
    group_attention: int = 0  # > 0: a GroupAttentionLayer over this many slices of each position's embedding
    pair_bias: int = 0  # > 0: an attention bias from the decoded pair kinematics, an MLP of this width (PairBias)
    id_levels: int = 0  # > 0: only the N coarsest levels' ids are embedded (the finer ones through code_dim)
    type_rank: bool = False  # embed each position's rank among the positions of its type (objects stand in pT order);
    #                          False in the backbones saved before it
    observables: int = 0  # > 0: a head predicting this many event observables from the pooled state (step3's event
    #                       objective); a classifier may read its prediction beside that state (EventClassifier)
    level_ranges: list = field(default_factory=list)  # per quantizer level, the [start, count] id range of each object
    #                   type (object granularity): with id_levels, code_emb holds no rows for the finer levels' ids

    @classmethod
    def from_vocab(cls, vocab: dict, **sizes) -> "ModelConfig":
        """The vocabulary's sizes; in granularity group also its slot -> feature-group layout."""
        slots = {str(vocab["type_ids"][obj]): [g for g, (_, n) in enumerate(layout) for _ in range(n)]
                 for obj, layout in (vocab.get("groups") or {}).items()}
        levels = [[list(r[q]) for r in vocab["ranges"].values() if q < len(r)] for q in range(int(vocab["levels"]))]
        return cls(vocab_size=int(vocab["vocab_size"]), levels=int(vocab["levels"]),
                   n_types=max(vocab["type_ids"].values()) + 1, max_length=int(vocab["max_length"]),
                   granularity=granularity(vocab), slot_groups=slots,
                   level_ranges=levels if granularity(vocab) == "object" else [], **sizes)

    def embedded_ids(self) -> np.ndarray | None:
        """The ids code_emb has rows for, ascending (PAD first): every id but those of the levels at or past
        id_levels. None: all of them (id_levels 0, or a backbone saved before level_ranges)."""
        if not self.id_levels or not self.level_ranges:
            return None
        keep = np.ones(self.vocab_size, bool)
        for start, count in (r for level in self.level_ranges[self.id_levels :] for r in level):
            keep[start : start + count] = False
        return np.flatnonzero(keep)


class GroupAttentionLayer(nn.Module):
    """(..., d) -> (..., d): each position's vector split into n equal slices, one attention layer
    among the slices of each position (residual + LayerNorm), concatenated back."""

    def __init__(self, d_model: int, n_slices: int, dropout: float = 0.0):
        super().__init__()
        if n_slices < 1 or d_model % n_slices:
            raise ValueError(f"--group-attention {n_slices} must divide --d-model {d_model}")
        self.n, width = n_slices, d_model // n_slices
        self.attn = nn.MultiheadAttention(width, 1, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        s = x.reshape(-1, self.n, x.shape[-1] // self.n)
        return self.norm(s + self.attn(s, s, s, need_weights=False)[0]).reshape(x.shape)


DROPOUT_BITS = 15  # random bits per element of cpu_dropout's mask


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on CPU with a mask of 15 random bits per element, four elements to a 64-bit draw. torch's CPU dropout
    draws a Bernoulli per element, 5.5 ns each, about 15% of a run_all pretraining step on one thread; this one takes
    2.6 ns (bench/README.md, "Dropout and the unused embedding rows"). p is rounded to a multiple of 2^-15
    (0.1 -> 0.100006) and the scale keeps the expectation exact."""
    n, one = x.numel(), 1 << DROPOUT_BITS
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().view(torch.int16)[:n].view(x.shape)
    cut = round(p * one)  # the top 16-bit word of each draw has 15 random bits: 15 of every word are read
    # keep = 1 + ((bits mod 2^15) - cut >> 15): 1 where bits mod 2^15 >= cut, else 0, in int16 arithmetic. The same
    # mask as a comparison, but 1.7x faster: a bool tensor's compare and conversion to float are slow on CPU
    keep = (bits & (one - 1)).sub_(cut).bitwise_right_shift_(DROPOUT_BITS).add_(1)
    return x * keep.to(x.dtype).mul_(one / (one - cut))


class Dropout(nn.Dropout):
    """nn.Dropout that trains with cpu_dropout on CPU; elsewhere (CUDA) torch's own."""

    def forward(self, x):
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        return cpu_dropout(x, self.p)


def cheap_dropouts(module: nn.Module) -> nn.Module:
    """module with each of its nn.Dropout layers (those of torch's encoder layers too) replaced by Dropout."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, Dropout(child.p))
        else:
            cheap_dropouts(child)
    return module


class EncoderLayer(nn.TransformerEncoderLayer):
    """torch's encoder layer, whose self-attention, when it trains on CPU with dropout, is written out with cpu_dropout
    on the attention weights (at the attention's own rate). torch's own runs its unfused path there: a Bernoulli draw
    per attention weight and a check for rows with no visible key, 0.8 and 0.5 ms a layer in a run_all step3 step of
    32 events on one thread; the step runs 9% faster without them (bench/README.md, "The attention's dropout"). Every
    row here has a visible key ([CLS]). Elsewhere (evaluation, CUDA, dropout 0) torch's own; the parameters are the
    same."""

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        attn = self.self_attn
        if not (self.training and x.device.type == "cpu" and 0 < attn.dropout < 1) or is_causal:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        b, length, d = x.shape
        heads = attn.num_heads
        q, k, v = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(
            b, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4).flatten(1, 2)  # each (b * heads, L, d / heads)
        # the masks arrive as float, -inf where hidden (torch's _canonical_mask); the pair bias is (b * heads, L, L)
        bias = x.new_zeros(1, 1, 1) if attn_mask is None else attn_mask.view(-1, length, length)
        if key_padding_mask is not None:
            bias = bias + key_padding_mask[:, None, None, :].expand(b, heads, 1, length).reshape(b * heads, 1, length)
        scores = torch.baddbmm(bias.to(q.dtype), q, k.transpose(1, 2), alpha=(d // heads) ** -0.5)
        weights = cpu_dropout(torch.softmax(scores, -1), attn.dropout)
        out = torch.bmm(weights, v).view(b, heads, length, d // heads).transpose(1, 2).reshape(b, length, d)
        return self.dropout1(attn.out_proj(out))


SUB_TOKEN_FF = 2  # feed-forward width of the sub-token layer, in units of d_model


class SubTokenEncoder(nn.Module):
    """Granularity group: code embeddings (N, Q, d) of N object positions -> one vector (N, d) each.
    slot_group (n_types, Q, G) one-hot tells which slots make up which group's sub-token."""

    def __init__(self, cfg: "ModelConfig"):
        super().__init__()
        d, n_groups = cfg.d_model, 1 + max(g for slots in cfg.slot_groups.values() for g in slots)
        table = torch.zeros(cfg.n_types, cfg.levels, n_groups)
        for t, slots in cfg.slot_groups.items():
            table[int(t), torch.arange(len(slots)), torch.tensor(slots)] = 1.0
        self.register_buffer("slot_group", table, persistent=False)  # from the config, not a weight
        self.group_emb = nn.Parameter(torch.randn(n_groups, d) * 0.02)
        # a small mixer over 1-3 sub-tokens: half the outer blocks' width and no dropout (the outer blocks
        # regularise). The layer alone, forward + backward over the 4 271 objects of a run_all batch of 128
        # events, one thread: 0.22 s instead of 0.56 s
        self.layer = nn.TransformerEncoderLayer(d, cfg.n_heads, SUB_TOKEN_FF * d, 0.0, activation="gelu",
                                                batch_first=True, norm_first=True)
        self.query = nn.Parameter(torch.randn(d) * d**-0.5) if cfg.group_pooling == "attention" else None

    def has_groups(self, token_type_ids):
        """(B, L) bool: the positions of types that have feature groups (object positions)."""
        return self.slot_group[token_type_ids].flatten(-2).any(-1)

    def forward(self, slot_emb, types):
        onehot = self.slot_group[types]  # (N, Q, G)
        present = onehot.any(1)  # (N, G): the groups an object of this type has
        sub = torch.einsum("nqd,nqg->ngd", slot_emb, onehot.to(slot_emb.dtype)) + self.group_emb
        with sdpa_kernel(SDPBackend.MATH):  # 1-3 keys: plain batched matmuls beat the flash kernel's blocks on CPU
            h = self.layer(sub, src_key_padding_mask=~present)
        if self.query is None:
            w = present.to(h.dtype)
            return (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
        scores = (h @ self.query.to(h.dtype)).masked_fill(~present, float("-inf")) * h.shape[-1] ** -0.5
        return (h * torch.softmax(scores, 1).unsqueeze(-1)).sum(1)


def rank_in_type(types: torch.Tensor, n_types: int) -> torch.Tensor:
    """(B, L) type ids -> (B, L): the number of earlier positions of the same type in the sequence."""
    return nn.functional.one_hot(types, n_types).cumsum(1).gather(2, types[..., None])[..., 0] - 1


class EventTransformer(nn.Module):
    """(input_ids (B,L,Q), token_type_ids (B,L), attention_mask (B,L)[, features (B,L,F)][, kinematics (B,L,4)])
    -> (B,L,d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.id_levels and not cfg.code_dim:
            raise ValueError("id_levels needs the code geometry (code_dim): the finer levels would be lost")
        self.code_emb = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD)
        self.register_buffer("id_row", None, persistent=False)  # vocabulary id -> code_emb row, where they differ
        if (ids := cfg.embedded_ids()) is not None:
            # The rows of ids never embedded (86% of run_all's vocabulary with id_levels 1, 1.9M of 2.3M parameters)
            # would cost every step a dense gradient, its norm and an AdamW update (one thread: 839 -> 938 events/s
            # without them; bench/README.md, "Dropout and the unused embedding rows"). The full table is drawn and
            # cut: every other parameter draws the initial values it drew before, and the outputs are the same
            assert ids[PAD] == PAD
            self.id_row = torch.zeros(cfg.vocab_size, dtype=torch.long)  # an id without a row reads PAD's: zeros
            self.id_row[torch.from_numpy(ids)] = torch.arange(len(ids))
            self.code_emb = nn.Embedding.from_pretrained(self.code_emb.weight.detach()[ids].clone(), freeze=False,
                                                         padding_idx=PAD)
        self.type_emb = nn.Embedding(cfg.n_types, d)
        self.pos_emb = nn.Embedding(cfg.max_length, d)
        self.rank_emb = nn.Embedding(cfg.max_length, d) if cfg.type_rank else None
        self.proj = nn.ModuleDict({t: nn.Linear(n, d) for t, n in cfg.continuous_dims.items()})
        if cfg.code_dim:
            # Code geometry: an id embedding alone does not know which codes are close; the sum of an
            # object's codebook vectors (its quantised latent) does. Filled by set_code_vectors.
            self.register_buffer("code_vectors", torch.zeros(cfg.vocab_size, cfg.code_dim))
            self.code_proj = nn.Parameter(torch.randn(cfg.n_types, cfg.code_dim, d) * cfg.code_dim ** -0.5)
        self.constituents = ConstituentEncoder(d, cfg.constituent_dim) if cfg.constituent_dim else None
        self.sub_tokens = SubTokenEncoder(cfg) if cfg.granularity == "group" else None
        self.group_attention = GroupAttentionLayer(d, cfg.group_attention, cfg.dropout) if cfg.group_attention else None
        self.pair_bias = PairBias(cfg.pair_bias, cfg.n_heads) if cfg.pair_bias else None
        self.observables = None
        self.norm = nn.LayerNorm(d)
        self.drop = Dropout(cfg.dropout)
        block = EncoderLayer(d, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = cheap_dropouts(nn.TransformerEncoder(block, cfg.n_layers, norm=nn.LayerNorm(d),
                                                            enable_nested_tensor=False))
        if cfg.observables:  # on a side stream: building (or loading) a backbone draws the caller's random numbers
            with torch.random.fork_rng(devices=[]):  # as one without the head did, so seeded runs stay as they were
                self.set_observables_head(cfg.observables)

    def set_observables_head(self, n: int) -> None:
        """Add (n > 0) or drop (0) the event objective's head, pooled state -> n event observables. step3
        adds it after its other heads, so every other parameter draws the initial values it drew before the
        head shipped with the backbone; a classifier that does not read it drops it (DDP stalls on unused
        parameters)."""
        self.cfg = replace(self.cfg, observables=n)
        self.observables = RegressionHead(self.cfg.d_model, n) if n else None

    def embed(self, input_ids, token_type_ids, features=None, constituents=None):
        if self.sub_tokens is not None:
            x = self.grouped_embedding(input_ids, token_type_ids.long())
        else:
            # combine the Q levels of each position; ids of fine levels (--id-levels) would be noise to a model
            # trained on a few hundred labels: their codebook vectors below carry them (bench/README.md)
            ids = input_ids[..., : self.cfg.id_levels or None]
            x = self.code_emb(ids if self.id_row is None else self.id_row[ids]).sum(dim=-2)
            if self.cfg.code_dim:  # [MASK] and PAD have zero vectors: a masked object leaks nothing
                latent = self.code_vectors[input_ids].sum(dim=-2)
                x = x + torch.einsum("blc,blcd->bld", latent, self.code_proj[token_type_ids.long()])
        if self.proj and features is not None:
            for t, proj in self.proj.items():  # a loop over object types, not events
                sel = token_type_ids == int(t)
                if sel.any():
                    x = x.masked_scatter(sel.unsqueeze(-1), proj(features[sel][:, : proj.in_features]).to(x.dtype))
        if self.constituents is not None and constituents is not None:
            x = self.constituents(x, token_type_ids, *constituents)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = token_type_ids.long()
        x = x + self.type_emb(types) + self.pos_emb(pos)[None]
        if self.rank_emb is not None:  # where a masked object stands among its type: between which pTs
            x = x + self.rank_emb(rank_in_type(types, self.cfg.n_types))
        x = self.norm(x)
        return self.drop(x if self.group_attention is None else self.group_attention(x))

    def grouped_embedding(self, input_ids, types):
        """(B, L, d): object positions pooled from their sub-tokens, the rest the flat sum of their codes."""
        e = self.code_emb(input_ids)  # (B, L, Q, d)
        x = e.sum(dim=-2)  # special and event ids have no code vectors: the flat path is the code sum
        sel = self.sub_tokens.has_groups(types)
        if not sel.any():
            return x
        slots, kinds = e[sel], types[sel]
        if self.cfg.code_dim:  # per slot its code's vector, projected (a group's latent fills its own columns)
            latent = self.code_vectors[input_ids[sel]]
            proj = torch.zeros_like(slots)
            for t in kinds.unique().tolist():  # a loop over object types, not positions
                rows = kinds == t
                proj[rows] = (latent[rows] @ self.code_proj[t]).to(proj.dtype)
            slots = slots + proj
        pooled = self.sub_tokens(slots, kinds)
        return x.masked_scatter(sel.unsqueeze(-1), pooled.to(x.dtype))

    def set_code_vectors(self, table: np.ndarray) -> None:
        self.code_vectors.copy_(torch.as_tensor(table, dtype=self.code_vectors.dtype))

    def forward(self, input_ids, token_type_ids, attention_mask, features=None, constituents=None, kinematics=None):
        """kinematics (B, L, 4): the positions' decoded (pT, eta, phi, mass) (common.pair_kinematics),
        needed by a model with a pair bias and ignored by one without."""
        if input_ids.shape[1] > self.cfg.max_length:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's max_length {self.cfg.max_length}")
        x = self.embed(input_ids.long(), token_type_ids.long(), features, constituents)
        padding = attention_mask == 0
        if self.pair_bias is None:
            return self.encoder(x, src_key_padding_mask=padding)
        if kinematics is None:
            raise ValueError("this model has a pair-kinematics attention bias (pair_bias): it needs each batch's "
                             "decoded kinematics")
        # one float mask carries the bias and the padding: a separate bool padding mask would be a mismatched mask type.
        # torch's eval-mode fast path misreads a per-head (B * heads, L, L) mask (eval and train outputs differ by O(1)
        # with dropout 0: tests/test_pair_kinematics.py), so it is off for this call
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.encoder(x, mask=self.pair_bias(kinematics, padding).to(x.dtype))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)


def codebook_table(vocab: dict, tok_dir: str | os.PathLike) -> np.ndarray:
    """float32 (vocab_size, width): the codebook vector behind every object code id, read from the
    step2 tokenizers that made the vocabulary (checked by checksum). Width: the codebook dim; in
    granularity group G x dim, group g of an object filling columns [g dim, (g+1) dim), so the sum
    over an object's slots is the concatenation of its groups' quantised latents."""
    from common.tokenizer import tokenizer_name, vocab_tokenizer

    layout = vocab.get("groups") or {obj: [[None, len(r)]] for obj, r in vocab["ranges"].items()}
    table = None
    for obj, ranges in vocab["ranges"].items():
        slot = 0
        for block, (group, n_levels) in enumerate(layout[obj]):
            tok = vocab_tokenizer(vocab, tok_dir, tokenizer_name(obj, group), "code geometry")
            books = tok.model.quantizer.code_vectors().numpy()  # (levels, codes, dim), every quantizer kind
            dim = books.shape[-1]
            if table is None:
                width = dim * max(len(groups) for groups in layout.values())
                table = np.zeros((vocab["vocab_size"], width), dtype=np.float32)
            for level in range(n_levels):
                start, count = ranges[slot + level]
                table[start : start + count, block * dim : (block + 1) * dim] = books[level, :count]
            slot += n_levels
    return table


class MaskedTokenHead(nn.Module):
    """One linear head per quantizer level over the whole vocabulary, evaluated only on the ids
    legal for the position's type and level (common.token_parquet.legal_id_mask): those form one
    contiguous range per (type, level), so each is a small matmul instead of a (M, Q, V) tensor."""

    def __init__(self, cfg: ModelConfig, legal: np.ndarray):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, cfg.vocab_size) for _ in range(cfg.levels))
        self.register_buffer("span", torch.as_tensor(legal_spans(legal)), persistent=False)

    def forward(self, hidden: torch.Tensor, types: torch.Tensor, labels: torch.Tensor):
        """hidden (M,d) of the masked positions, types (M,), labels (M,Q) absolute ids
        -> (cross-entropy (M,Q) float32, correct (M,Q) bool). A label outside the legal range
        (e.g. -100, not predicted) gets a meaningless value that the caller masks out."""
        m, q = labels.shape
        index, losses, hits = [], [], []
        for t in types.unique().tolist():  # a loop over object types and levels, not positions
            rows = (types == t).nonzero().squeeze(1)
            h = hidden[rows]
            for level in range(q):
                lo, hi = self.span[t, level].tolist()
                head = self.heads[level]
                logits = nn.functional.linear(h, head.weight[lo:hi], head.bias[lo:hi]).float()
                target = (labels[rows, level] - lo).clamp(0, hi - lo - 1)
                losses.append(nn.functional.cross_entropy(logits, target, reduction="none"))
                hits.append(logits.argmax(-1) == target)
                index.append(rows * q + level)
        if not index:  # nothing masked in this batch
            zero = hidden.sum() * 0.0  # keeps the graph connected for DDP
            return zero + torch.zeros(m, q, device=hidden.device), torch.zeros(m, q, dtype=torch.bool, device=hidden.device)
        index = torch.cat(index)
        loss = torch.zeros(m * q, device=hidden.device).scatter(0, index, torch.cat(losses)).view(m, q)
        correct = torch.zeros(m * q, dtype=torch.bool, device=hidden.device).scatter(0, index, torch.cat(hits)).view(m, q)
        return loss, correct


def legal_spans(legal: np.ndarray) -> np.ndarray:
    """bool[type, level, id] -> int64[type, level, 2]: the [lo, hi) range of legal ids, checked contiguous."""
    any_legal = legal.any(-1)
    lo = np.where(any_legal, legal.argmax(-1), 0)
    hi = np.where(any_legal, legal.shape[-1] - legal[..., ::-1].argmax(-1), 1)
    if (legal.sum(-1) != np.where(any_legal, hi - lo, 0)).any():
        raise ValueError("legal ids of a (type, level) do not form one contiguous range")
    return np.stack([lo, hi], axis=-1).astype(np.int64)


class RegressionHead(nn.Module):
    """Hidden state -> a standardised target vector: a small MLP. The event observables' head, and step3's
    default masked-object head (its target: the object's quantised latent, or its normalised features),
    shared by all types: the type embedding in the hidden state tells it which object it predicts."""

    def __init__(self, d_model: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, dim))

    def forward(self, hidden, types=None):  # types: unused, one output layer serves every type
        return self.net(hidden).float()


class TypedRegressionHead(nn.Module):
    """RegressionHead with an output layer per object type (step3 --typed-head), zero at the start: each
    type's prediction starts at its no-context mean (0 in standardised units) and its output layer learns
    from its own objects only. With one output layer for all types the tracks (64% of the masked objects)
    shape it, and the taus are predicted worse than their mean (bench/README.md, "An output layer per
    object type")."""

    def __init__(self, d_model: int, dim: int, n_types: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU())
        self.weight = nn.Parameter(torch.zeros(n_types, d_model, dim))
        self.bias = nn.Parameter(torch.zeros(n_types, dim))

    def forward(self, hidden, types):
        h = self.hidden(hidden)
        return (torch.einsum("md,mdk->mk", h, self.weight[types]) + self.bias[types]).float()


class OverlapPointer(nn.Module):
    """step3's overlap objective: each masked position attends once more over the visible objects of its event and
    a null slot ("nothing visible overlaps me"). The attention logits are the objective's prediction, trained
    toward the objects that overlap the masked one (common.pair_kinematics.overlap_targets); what the attention
    reads is added to the masked position's state before the other heads. A masked tau, which lies on the jet it was
    reconstructed from, so learns to find that jet and read it: every type's context gain rose, the taus' most
    (bench/README.md, "The overlap objective")."""

    def __init__(self, d_model: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(d_model, d_model) for _ in range(3))

    def forward(self, states, chosen, visible):
        """states (B, L, d), chosen (B, L) bool: the masked positions, visible (B, L) bool -> (the masked positions'
        states + what each reads (M, d), row-major, and their logits (M, L + 1), the last the null slot's).
        Every position attends, in one batched product per event, and the masked rows are taken after: on the CPU its
        forward and backward run 1.7x faster than with each masked position's event gathered (M, L, d), the same
        figures to three decimals (bench/README.md, "The overlap objective")."""
        logits = torch.bmm(self.query(states), self.key(states).transpose(1, 2)) * states.shape[-1] ** -0.5
        logits = torch.cat([logits.masked_fill(~visible[:, None], float("-inf")), logits.new_zeros(logits.shape[:2] + (1,))], -1)
        weights = torch.softmax(logits.float(), -1)[..., :-1].to(states.dtype)
        return states[chosen] + torch.bmm(weights, self.value(states))[chosen], logits[chosen]


class PretrainModel(nn.Module):
    """Backbone + the heads of the pretraining objectives in one module (DDP wraps both):
    hidden states of the masked positions go to each head (through the overlap pointer first, when there is one)."""

    def __init__(self, backbone: EventTransformer, token_head: MaskedTokenHead | None = None,
                 regression_heads: dict[str, nn.Module] | None = None, pooling: str = "mean", overlap: bool = False):
        super().__init__()
        self.backbone, self.token_head, self.pooling = backbone, token_head, pooling
        self.regression_heads = nn.ModuleDict(regression_heads or {})
        self.overlap = OverlapPointer(backbone.cfg.d_model) if overlap else None

    def forward(self, input_ids, token_type_ids, attention_mask, chosen, labels=None, constituents=None, kinematics=None,
                visible=None):
        """-> {objective: output}: for the M chosen positions (row-major) 'tokens' gives (loss (M,Q),
        correct (M,Q)), an object regression its prediction (M, dim) and 'overlap' the pointer's logits
        (M, L + 1) over the `visible` (B, L) positions; 'event' predicts (B, dim) with the backbone's
        observables head from the pooled state that fine-tuning reads."""
        states = self.backbone(input_ids, token_type_ids, attention_mask, constituents=constituents, kinematics=kinematics)
        types = token_type_ids[chosen].long()
        out = {}
        if self.overlap is not None:
            hidden, out["overlap"] = self.overlap(states, chosen, visible)
        else:
            hidden = states[chosen]
        out.update({name: head(hidden, types) for name, head in self.regression_heads.items()})
        if self.token_head is not None:
            out["tokens"] = self.token_head(hidden, types, labels)
        if self.backbone.observables is not None:
            out["event"] = self.backbone.observables(pool(states, token_type_ids, attention_mask, self.pooling))
        return out


def pool_mask(token_type_ids, attention_mask):
    """The positions an event representation averages: every stored position but [CLS] and [SEP]."""
    return (attention_mask > 0) & (token_type_ids > SPECIAL_TYPE_ID["MASK"])


def pool(hidden, token_type_ids, attention_mask, pooling: str = "mean"):
    """(B, L, d) -> (B, d): the mean of the object states ('mean'), or the [CLS] state ('cls')."""
    if pooling == "cls":
        return hidden[:, 0]
    m = pool_mask(token_type_ids, attention_mask).unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class ClassifierHead(nn.Module):
    """Event representation -> class logits: Linear-ReLU-Dropout-Linear (one Linear for a probe)."""

    def __init__(self, d_model: int, n_classes: int = 2, dropout: float = 0.1, linear: bool = False):
        super().__init__()
        self.net = nn.Linear(d_model, n_classes) if linear else nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(), Dropout(dropout), nn.Linear(d_model, n_classes))

    def forward(self, x):
        return self.net(x)


class EventClassifier(nn.Module):
    def __init__(self, backbone: EventTransformer, pooling: str = "mean", n_classes: int = 2, observables: bool = False):
        super().__init__()
        if observables and backbone.observables is None:
            raise ValueError("the backbone has no observables head (pretrain it with the event objective)")
        if not observables:
            backbone.set_observables_head(0)
        self.backbone, self.pooling = backbone, pooling
        self.head = ClassifierHead(backbone.cfg.d_model + backbone.cfg.observables, n_classes, backbone.cfg.dropout)

    def embed(self, input_ids, token_type_ids, attention_mask, features=None, constituents=None, kinematics=None):
        """The event representation: the pooled state, and with `observables` beside it the event observables
        the backbone predicts from it (step4 --observables)."""
        x = pool(self.backbone(input_ids, token_type_ids, attention_mask, features, constituents, kinematics),
                 token_type_ids, attention_mask, self.pooling)
        if self.backbone.observables is None:
            return x
        return torch.cat([x, self.backbone.observables(x).to(x.dtype)], dim=-1)

    def forward(self, input_ids, token_type_ids, attention_mask, features=None, constituents=None, kinematics=None):
        return self.head(self.embed(input_ids, token_type_ids, attention_mask, features, constituents, kinematics))


# --- checkpoints -----------------------------------------------------------------------------------

def save_module(path: str | os.PathLike, module: nn.Module, sidecar: dict) -> Path:
    """state_dict -> path (atomic), sidecar -> path with .json."""
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    write_json(path.with_suffix(".json"), sidecar)
    return path


def backbone_sidecar(cfg: ModelConfig, vocab: dict, **extra) -> dict:
    return {"config": asdict(cfg), "vocab_checksum": vocab_checksum(vocab), "vocab": vocab, **extra}


def load_backbone(path: str | os.PathLike, **training) -> tuple[EventTransformer, dict]:
    """training: settings that do not shape the weights, here the dropout, set for the run that loads it."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such backbone checkpoint")
    if not side.exists():
        raise FileNotFoundError(f"{path}: the JSON sidecar {side.name} is missing")
    sidecar = json.loads(side.read_text())
    model = EventTransformer(ModelConfig(**{**sidecar["config"], **training}))
    model.load_state_dict(load_tensors(path))
    return model, sidecar


def load_tensors(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True; a file holding pickled objects is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refusing to unpickle it (not a tensor-only checkpoint: "
                         f"{first_line(exc)[:120]})") from None


def check_vocab(sidecar: dict, vocab: dict, backbone: str) -> None:
    """A backbone only understands the ids of the vocabulary it was trained on."""
    if sidecar.get("vocab_checksum") != vocab_checksum(vocab):
        raise ValueError(f"{backbone}: the backbone was pretrained on another token vocabulary (checksum "
                         f"{sidecar.get('vocab_checksum')}) than these token files (checksum {vocab_checksum(vocab)}); "
                         "re-tokenize or re-pretrain")


