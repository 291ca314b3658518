"""Held-out quality of a fitted tokenizer: per-feature bias and robust resolution (relative and in
truth-pT bins for pT-like features), exact-match rates of flags and categories, b-tag
working-point efficiencies before and after the round trip, code usage and perplexity per
level, and the goals evaluated on these numbers (README.md, step 2). Written by step2 fit to
<obj>.json; the diagnostics read the held-out sample saved beside it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common import runtime
from common.physics import btag_discriminant
from common.tokenizer import EVENT_KEY, TYPE_FEATURE, Tokenizer, perplexity

PT_BINS = (0, 10, 20, 30, 50, 75, 100, 150, 250, 500, np.inf)  # GeV, truth-pT bins of the resolution
MIN_OBJECTS_PER_BIN = 20  # a pT bin with fewer held-out objects is left out
RELATIVE_FEATURES = ("pt", "sumet", "mass")  # continuous features also measured relative to the truth
RESOLUTION_QUANTILES = (0.16, 0.5, 0.84)  # robust resolution: half the 68% interval; bias: the median
BTAG_PASS_FRACTIONS = (0.05, 0.10, 0.20, 0.40)  # fixed cuts: where these fractions of fit jets pass
EVAL_SAMPLE_OBJECTS = 50_000  # held-out objects saved for the diagnostics
# the goals
GOAL_USED_FRACTION = 0.9  # of every level's codes, used by held-out objects
GOAL_EXACT_MATCH = 0.995  # flags and charge come back exactly
GOAL_BTAG_ABS_DIFF = 0.01  # working-point efficiency moves by at most this
GOAL_PT_RESOLUTION = 0.02  # relative pT resolution
WORST_BIN_MIN_OBJECTS = 50  # the worst pT bin is looked for among bins with at least this many held-out objects
GOAL_WORST_BIN_RESOLUTION = 0.03  # relative pT resolution in every such bin
GOAL_WORST_BIN_ABS_BIAS = 0.01  # |relative pT bias| in every such bin


def robust(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"n": 0}
    q16, q50, q84 = np.quantile(x, list(RESOLUTION_QUANTILES))
    return {"n": int(len(x)), "bias": float(q50), "mean_bias": float(np.mean(x)), "resolution": float((q84 - q16) / 2)}


def btag_triplets(specs: list[dict]):
    """(key, tagger, (pb, pc, pu) names) of every score triplet: key 'GN2' or, combined, 'jets/GN2'."""
    for s in specs:
        if s["kind"] == "score":
            key = s["names"][0].rsplit("_", 1)[0]
            yield key, key.split("/")[-1], s["names"]


def btag_cuts(sample: dict[str, np.ndarray], specs: list[dict]) -> dict:
    """Discriminant cuts where BTAG_PASS_FRACTIONS of the fit sample's objects pass."""
    cuts = {}
    for key, tagger, names in btag_triplets(specs):
        d = btag_discriminant(*(sample[n] for n in names), tagger)
        cuts[key] = [float(np.quantile(d, 1 - f)) for f in BTAG_PASS_FRACTIONS]
    return cuts


def feature_quality(kind: str, name: str, o: np.ndarray, r: np.ndarray) -> dict:
    """Exact match of a flag or category; bias and resolution of the rest (+ relative, binned in pT)."""
    if kind in ("flag", "category"):
        return {"kind": kind, "exact_match": float(np.mean(o == r))}
    diff = np.angle(np.exp(1j * (r - o))) if kind == "angle" else r - o
    entry = {"kind": kind, **robust(diff[np.isfinite(diff)])}
    if name.split("/")[-1] in RELATIVE_FEATURES and kind == "continuous":
        ok = np.isfinite(o) & (o > 0)
        rel = r[ok] / o[ok] - 1
        entry["relative"] = robust(rel)
        idx = np.digitize(o[ok], PT_BINS) - 1
        entry["relative_binned"] = [{"lo": PT_BINS[b], "hi": PT_BINS[b + 1], **robust(rel[idx == b])}
                                    for b in range(len(PT_BINS) - 1) if (idx == b).sum() >= MIN_OBJECTS_PER_BIN]
        entry["worst_bin"] = worst_bins(entry["relative_binned"])
    return entry


def worst_bins(binned: list[dict]) -> dict:
    """The bins of largest resolution and of largest |bias| among those with WORST_BIN_MIN_OBJECTS
    objects: a goal on the average hides the rare high-pT objects that get too few codes."""
    full = [b for b in binned if b["n"] >= WORST_BIN_MIN_OBJECTS]
    if not full:
        return {}
    return {"resolution": max(full, key=lambda b: b["resolution"]), "bias": max(full, key=lambda b: abs(b["bias"]))}


def quality(tok: Tokenizer, orig: dict, reco: dict, codes: np.ndarray, cuts: dict, specs: list[dict]) -> dict:
    """Held-out quality of `specs`' features (originals vs reconstructions) and of the codes."""
    feats = {}
    for s in specs:
        for name in s["names"]:
            if name != TYPE_FEATURE:
                feats[name] = feature_quality(s["kind"], name, np.asarray(orig[name], np.float64),
                                              np.asarray(reco[name], np.float64))
    btag = {}
    for key, tagger, names in btag_triplets(specs):
        d_o = btag_discriminant(*(orig[n] for n in names), tagger)
        d_r = btag_discriminant(*(reco[n] for n in names), tagger)
        btag[key] = [{"cut": c, "pass_fraction_fit": f, "eff_before": float(np.mean(d_o > c)),
                      "eff_after": float(np.mean(d_r > c)), "abs_diff": float(abs(np.mean(d_r > c) - np.mean(d_o > c)))}
                     for c, f in zip(cuts.get(key, []), BTAG_PASS_FRACTIONS)]
    levels = []
    for l in range(codes.shape[1]):
        counts = np.bincount(codes[:, l], minlength=tok.codebook_size)
        levels.append({"level": l, "used": int((counts > 0).sum()), "dead": int((counts == 0).sum()),
                       "used_fraction": float((counts > 0).mean()), "perplexity": perplexity(counts)})
    out = {"n_objects": int(len(codes)), "features": feats, "btag_working_points": btag, "codes": levels}
    out["goals"] = goals(out)
    return out


def goals(q: dict) -> dict:
    """The goals, evaluated on the held-out numbers of `quality`."""
    exact = [v["exact_match"] for k, v in q["features"].items() if v["kind"] in ("flag",) or k.endswith("charge")]
    btag = [wp["abs_diff"] for wps in q["btag_working_points"].values() for wp in wps]
    pt = [v["relative"]["resolution"] for k, v in q["features"].items() if k.split("/")[-1] == "pt" and "relative" in v]
    worst = [v["worst_bin"] for k, v in q["features"].items() if k.split("/")[-1] == "pt" and v.get("worst_bin")]
    g = {"min_used_fraction": min(l["used_fraction"] for l in q["codes"]),
         "min_flag_charge_exact_match": min(exact) if exact else None,
         "max_btag_abs_diff": max(btag) if btag else None,
         "pt_relative_resolution": max(pt) if pt else None,
         "pt_worst_bin_resolution": max(w["resolution"]["resolution"] for w in worst) if worst else None,
         "pt_worst_bin_abs_bias": max(abs(w["bias"]["bias"]) for w in worst) if worst else None}
    g["pass"] = {"codes_used_ge_90pct": g["min_used_fraction"] >= GOAL_USED_FRACTION,
                 "flags_charge_exact_ge_99.5pct": None if not exact else g["min_flag_charge_exact_match"] >= GOAL_EXACT_MATCH,
                 "btag_within_1pct": None if not btag else g["max_btag_abs_diff"] <= GOAL_BTAG_ABS_DIFF,
                 "pt_resolution_le_2pct": None if not pt else g["pt_relative_resolution"] <= GOAL_PT_RESOLUTION,
                 "pt_worst_bin_resolution_le_3pct_bias_le_1pct": None if not worst else (
                     g["pt_worst_bin_resolution"] <= GOAL_WORST_BIN_RESOLUTION and g["pt_worst_bin_abs_bias"] <= GOAL_WORST_BIN_ABS_BIAS)}
    return g


def evaluate(tok: Tokenizer, stream, max_objects: int, cuts: dict):
    """Reconstruct up to max_objects held-out objects. The combined tokenizer's stream mixes
    object types (different feature names): each type is reconstructed and measured on its own,
    then the per-feature entries (prefixed '<obj>/') are merged and the codes pooled. A stream
    made with context=True gives the transformer encoder each object's event.
    Returns (originals, reconstructions, codes, quality, event numbers or None)."""
    groups: dict[tuple, list] = {}
    n = 0
    for feats in stream:
        groups.setdefault(tuple(sorted(feats)), []).append(feats)
        n += len(next(iter(feats.values())))
        if n >= max_objects:
            break
    if not groups:
        raise ValueError("no held-out objects to evaluate on")
    orig, reco, codes, qs, events = {}, {}, [], [], None
    for keys, parts in groups.items():
        o = {k: np.concatenate([p[k] for p in parts])[:max_objects] for k in keys}
        events = o.pop(EVENT_KEY, None)
        c, r = tok.reconstruct(o, events)
        specs = [sp for sp in tok.specs if all(nm in o for nm in sp["names"])]
        qs.append(quality(tok, o, r, c, cuts, specs))
        keep = [k for k in o if k != TYPE_FEATURE]  # combined: the decoder also outputs other types' blocks
        orig.update({k: o[k] for k in keep})
        reco.update({k: r[k] for k in keep})
        codes.append(c)
    codes = np.concatenate(codes)
    q = quality(tok, {}, {}, codes, cuts, [])
    q["features"] = {k: v for qq in qs for k, v in qq["features"].items()}
    q["btag_working_points"] = {k: v for qq in qs for k, v in qq["btag_working_points"].items()}
    q["goals"] = goals(q)
    return orig, reco, codes, q, events


def save_eval_sample(path: Path, orig: dict, reco: dict, codes: np.ndarray, n_max: int = EVAL_SAMPLE_OBJECTS,
                     events: np.ndarray | None = None) -> None:
    """Held-out originals, reconstructions and codes for the diagnostics (plain arrays only), and the
    objects' event numbers where the encoder uses them."""
    arrays = {f"orig/{k}": np.asarray(v)[:n_max] for k, v in orig.items()}
    arrays.update({f"reco/{k}": np.asarray(v)[:n_max] for k, v in reco.items()})
    arrays["codes"] = codes[:n_max]
    if events is not None:
        arrays["events"] = np.asarray(events)[:n_max]
    with runtime.atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
