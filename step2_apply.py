"""Step 2, apply: step1 HDF5 files -> Parquet event token sequences, with the tokenizers of fit.

  python step2_apply.py --h5 data/h5/*.h5 --tokenizers runs/tok --out-dir data/tokens [--shard K/N]
  (or: python step2_tokenize.py apply ...)

One Parquet file per HDF5 file (common/token_parquet.py) with the sequences of
common/sequences.py: each type keeps its first --cap objects, the event at most --max-length
positions; objects that the caps or the length drop are not encoded (a tokenizer of step2 fit
--encoder transformer still reads each event's leading objects as their context), and the truncation
is counted in the vocabulary metadata. A folder of group tokenizers (step2 fit --granularity group,
<obj>.<group>.pt) gives each object position the concatenation of its groups' level codes.
Encoding and code search run on a GPU when there is one.
Reading the next chunk, encoding this one and writing the previous one overlap.
"""
from __future__ import annotations

import common  # noqa: F401  (first: sets the OpenMP wait policy before torch and numba load)

import argparse
import pickle
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from common import distributed as D
from common import h5io, runtime, sequences, token_parquet
from common.object_stream import describe_file, flatten_objects, object_keys
from common.schema import SEQUENCE_OBJECTS, TOKENIZED_OBJECTS, TYPE_IDS
from common.tokenizer import (COMBINED, CONTEXT_OBJECTS, EVENT_KEY, TYPE_FEATURE, GroupedTokenizer, Tokenizer,
                              folder_granularity, load_grouped, load_tokenizer)

MAX_LENGTH = 128
CHUNK_EVENTS = 8192
SEED = 1
THREADS = 0  # 0: the usable CPUs
DEVICE = "auto"  # auto: a GPU when there is one (matmul search), else the compiled CPU search


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h5", nargs="+", required=True, help="step1 HDF5 files (or directories)")
    p.add_argument("--tokenizers", required=True, help="directory written by fit")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--granularity", choices=("auto", "object", "group"), default="auto",
                   help="the tokenizers' granularity (auto: what the folder holds)")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH)
    p.add_argument("--cap", action="append", default=[], metavar="OBJ=N,...",
                   help=f"objects kept per type, e.g. tracks=50,jets=10 (default {sequences.DEFAULT_CAPS})")
    p.add_argument("--chunk-events", type=int, default=CHUNK_EVENTS)
    p.add_argument("--shard", default=None, help="K/N: this job's share of the inputs")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=THREADS, help="threads (0: the usable CPUs)")
    p.add_argument("--device", default=DEVICE, help="auto | cpu | cuda: where encoding and code search run")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


# --- the tokenizers -------------------------------------------------------------------------------


def load_checked(path: Path) -> Tokenizer:
    """A tokenizer checkpoint, or one error line naming it and the cause (exit 2: --tokenizers is unusable)."""
    try:
        return load_tokenizer(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError, TypeError) as exc:
        cause = str(exc).strip().split("\n")[0].split(". ")[0]  # torch's messages go on for lines
        runtime.die(f"{path}: not a readable step2 tokenizer ({type(exc).__name__}: {cause})")


def load_tokenizers(tok_dir: str, granularity: str = "auto") -> tuple[dict[str, Tokenizer | GroupedTokenizer], str]:
    """{obj: tokenizer} for every tokenized type, and the folder's granularity: 'combined' (one
    tokenizer for all), 'object' (<obj>.pt) or 'group' (<obj>.<group>.pt, one GroupedTokenizer per type)."""
    d = Path(tok_dir)
    try:
        found = folder_granularity(d, TOKENIZED_OBJECTS)
    except ValueError as exc:
        runtime.die(f"{tok_dir}: {exc}")
    if granularity not in ("auto", found) and found != COMBINED:
        runtime.die(f"{tok_dir}: --granularity {granularity}, but the folder holds {found}-granularity tokenizers")
    if found == COMBINED:
        tok = load_checked(d / f"{COMBINED}.pt")
        return {o: tok for o in TOKENIZED_OBJECTS}, found
    if found == "group":
        try:
            return {o: load_grouped(d, o) for o in TOKENIZED_OBJECTS}, found
        except (ValueError, RuntimeError, OSError, KeyError) as exc:
            runtime.die(f"{tok_dir}: {runtime.first_line(exc)}")
    missing = [o for o in TOKENIZED_OBJECTS if not (d / f"{o}.pt").exists()]
    if missing:
        runtime.die(f"{tok_dir}: no tokenizer for {', '.join(missing)} (run step2_fit.py)")
    return {o: load_checked(d / f"{o}.pt") for o in TOKENIZED_OBJECTS}, found


def vocab_tokenizers(toks: dict, granularity: str) -> tuple[dict, dict | None]:
    """The vocabulary's record of the tokenizers, keyed <obj> (or <obj>.<group> in granularity group),
    and in granularity group each object's slot layout {obj: [[group, levels], ...]}."""
    entry = lambda t: {"sha256": t.sha256, "features": t.features, "levels": t.levels,  # noqa: E731
                       "codebook_size": t.codebook_size, "file": Path(t.path).name}
    if granularity != "group":
        return {o: entry(t) for o, t in toks.items()}, None
    return ({f"{o}.{g}": entry(t) for o, gt in toks.items() for g, t in gt.groups.items()},
            {o: gt.layout for o, gt in toks.items()})


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
    events = feats.pop(EVENT_KEY, None)  # the transformer encoder's context; the others ignore it
    if combined:
        n = len(next(iter(feats.values()))) if feats else 0
        feats = {**{f"{obj}/{k}": v for k, v in feats.items()}, TYPE_FEATURE: np.full(n, TYPE_IDS[obj])}
    if not len(next(iter(feats.values()))):
        return np.zeros((0, tok.levels), np.int32)
    return tok.encode(feats, events)


def encode_kept(obj: str, tok: Tokenizer, keys: dict, arrays: dict, stored: np.ndarray, kept: np.ndarray,
                combined: bool) -> np.ndarray:
    """Codes of the kept objects. A transformer encoder's context is the event's leading
    CONTEXT_OBJECTS stored objects, as in the fit, so those are encoded too, dropped or not."""
    events = np.arange(len(stored))
    mask = kept | (stored & (sequences.slot_of(stored) < CONTEXT_OBJECTS)) if tok.context else kept
    codes = encode_chunk(obj, tok, flatten_objects(obj, keys, arrays, events, mask, with_events=True), combined)
    return codes[kept[mask]] if tok.context else codes


# --- one HDF5 file -> one Parquet file ------------------------------------------------------------


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
            codes = {o: encode_kept(o, toks[o], keys[o], arrays, stored[o], masks[o], combined) for o in SEQUENCE_OBJECTS}
            met = encode_chunk("met", toks["met"], flatten_objects("met", keys["met"], arrays, events, with_events=True),
                               combined)
            ids, types, lengths = sequences.build_sequences(masks, codes, met, arrays["common/event/mu"], vocab)
            bar.update(n)
            yield token_parquet.sequences_table(ids, types, lengths, np.arange(lo, lo + n), path,
                                                str(meta.get("process", "")), int(meta.get("dsid", 0) or 0),
                                                arrays["common/event/weight"])
        bar.close()

    prov = runtime.provenance("step2_apply.py", args, [path])
    token_parquet.write_sequences(out, runtime.read_ahead(tables()), vocab, prov)  # computing overlaps writing
    return str(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime.seed_everything(args.seed)
    runtime.set_threads(args.threads)
    if not Path(args.tokenizers).is_dir():
        runtime.die(f"{args.tokenizers}: tokenizer directory not found")
    try:
        shard_paths = runtime.select_shard(runtime.input_files(args.h5), args.shard)
    except ValueError as exc:
        runtime.die(str(exc))
    caps = runtime.per_object(args.cap, sequences.DEFAULT_CAPS, "--cap", int)
    toks, granularity = load_tokenizers(args.tokenizers, args.granularity)
    combined = granularity == COMBINED
    device = D.setup(args.device).device
    models = [t for gt in toks.values() for t in (gt.groups.values() if granularity == "group" else [gt])]
    for tok in {id(t): t for t in models}.values():  # combined: one tokenizer behind every type
        tok.model.to(device)
    meta, groups = vocab_tokenizers(toks, granularity)
    try:
        vocab_base = sequences.build_vocab(meta, caps, args.max_length, combined=combined, groups=groups)
    except ValueError as exc:
        runtime.die(f"--max-length: {exc}")

    results, errors = runtime.process_inputs(shard_paths, lambda p: apply_one(p, toks, combined, vocab_base, args))
    for r in results:
        print(f"[apply] {r}")
    return runtime.exit_code(errors)


if __name__ == "__main__":
    runtime.bound_heap_growth()  # memory flat over many chunks
    sys.exit(main())
