"""The physics quality of a finished step2 fit against the tokenizer goals (README.md, step 2):

  1. the decoded-physics closure of the fit's tokenizers together (common/decoded_closure.py:
     m4l, Z candidates, mll, mjj, Delta R, MET; resolution and bias on held-out events);
  2. per object type, the worst truth-pT bin with at least 50 held-out objects (resolution and
     bias; common/tokenizer_quality.py), re-measured on the fit's held-out objects so that a fit
     made before the worst bins were recorded is measured too.

  python bench/bench_closure.py --tokenizers runs/default/tok --h5 runs/default/h5 [--out closure_bench.json]

Reads the fit, writes nothing beside it (the figures go to --out and stdout).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import runtime  # noqa: E402
from common.decoded_closure import MAX_EVENTS, closure_figures, heldout_quantities, tokenizers_in  # noqa: E402
from common.object_stream import describe_file, stream_objects  # noqa: E402
from common.schema import TOKENIZED_OBJECTS  # noqa: E402
from common.tokenizer import load_tokenizer  # noqa: E402
from common.tokenizer_quality import evaluate  # noqa: E402

EVAL_OBJECTS = 200_000  # as step2 fit's held-out quality


def worst_bins(tok_dir: Path, infos: list[dict]) -> dict:
    """Per object type: the fit's average pT resolution and the worst bins, re-measured."""
    out = {}
    for obj in TOKENIZED_OBJECTS:
        if not (tok_dir / f"{obj}.pt").exists():
            continue
        tok, side = load_tokenizer(tok_dir / f"{obj}.pt"), json.loads((tok_dir / f"{obj}.json").read_text())
        stream = stream_objects(obj, side["features_used"], infos, split="test", rng=None, context=True)
        q = evaluate(tok, stream, EVAL_OBJECTS, side["btag_cuts"])[3]
        out[obj] = {"pt": q["features"]["pt"], "goals": q["goals"],
                    "fit_pt_relative_resolution": side["quality"]["goals"]["pt_relative_resolution"]}
    return out


def describe_or_die(path: str) -> dict:
    """describe_file, or one error line naming the file (exit 1)."""
    try:
        return describe_file(path)
    except runtime.InputError as exc:
        runtime.die(f"{path}: {exc}", runtime.EXIT_SOME_FAILED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizers", required=True)
    p.add_argument("--h5", nargs="+", required=True)
    p.add_argument("--max-events", type=int, default=MAX_EVENTS)
    p.add_argument("--out", default="closure_bench.json")
    args = p.parse_args(argv)
    runtime.set_threads(1)
    tok_dir = Path(args.tokenizers)
    if not any(tok_dir.glob("*.pt")):
        runtime.die(f"{tok_dir}: no step2 tokenizers (*.pt) in it")
    infos = [describe_or_die(path) for path in runtime.input_files(args.h5)]
    orig, dec = heldout_quantities(tokenizers_in(tok_dir), infos, args.max_events)
    closure = closure_figures(orig, dec)
    bins = worst_bins(tok_dir, infos)
    print(f"closure on {len(orig['met'])} held-out events (resolution / bias):")
    for name, q in closure["quantities"].items():
        print(f"  {name:6s} {q['resolution']:.4f} / {q['bias']:+.4f} ({q['difference']}, {q['n']} events)")
    print(f"  goals: {closure['goals']}")
    print("worst pT bins with >= 50 held-out objects (resolution | bias, bin in GeV, objects):")
    for obj, b in bins.items():
        w, g = b["pt"]["worst_bin"], b["goals"]
        print(f"  {obj:9s} average {b['pt']['relative']['resolution']:.4f} (fit: {b['fit_pt_relative_resolution']:.4f}); "
              f"worst resolution {w['resolution']['resolution']:.4f} [{w['resolution']['lo']}-{w['resolution']['hi']}, "
              f"{w['resolution']['n']}] | worst bias {w['bias']['bias']:+.4f} [{w['bias']['lo']}-{w['bias']['hi']}, "
              f"{w['bias']['n']}]; goal {'pass' if g['pass']['pt_worst_bin_resolution_le_3pct_bias_le_1pct'] else 'FAIL'}")
    runtime.write_json(args.out, {"tokenizers": str(tok_dir), "n_events": len(orig["met"]), "closure": closure,
                                  "worst_bins": {o: {"worst_bin": b["pt"]["worst_bin"], "relative_binned": b["pt"]["relative_binned"],
                                                     "goals": b["goals"]} for o, b in bins.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
