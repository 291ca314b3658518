"""Tokenizer scans (step2_scan.py): the grid of step2_fit settings, one id per configuration, and
the table of what each configuration recorded (reconstruction, code usage, downstream AUC, speed).

A grid is {axis: [values]}; its configurations are the Cartesian product, for every object type
scanned. The axes are step2_fit options; a configuration leaves the others at step2_fit's defaults.
Every point must be a possible fit (e.g. quantizer fsq has one level, FSQ knows only the codebook
sizes of common.tokenizer.FSQ_LEVELS): the grid check names the first that is not.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np

from common import tokenizer_quality
from common.classifier_metrics import paired_auc_difference, verdict
from common.schema import OBJECTS, TOKENIZED_OBJECTS, TRANSFORMS
from common.tokenizer import ENCODERS, MAX_LEVELS, QUANTIZERS, quantizer_problem


def _integer(lo: int, hi: int | None = None, why: str = ""):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"an integer {lo}..{hi}" if hi else f"an integer of at least {lo}{why}")
        return v
    return check


def _number(ok, what: str):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ValueError(what)
        return float(v)
    return check


def _flag(v):
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _one_of(choices: tuple[str, ...]):
    def check(v):
        if v not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return v
    return check


def _fsq_levels(v):
    """FSQ levels per dimension: a list of integers, or text '8x5x5x5' (an --axis flag's value)."""
    try:
        levels = [int(x) for x in v.split("x")] if isinstance(v, str) else list(v)
    except (TypeError, ValueError):
        levels = None
    if not levels or any(isinstance(x, bool) or not isinstance(x, int) or x < 2 for x in levels):
        raise ValueError("levels per dimension of at least 2, as [8, 5, 5, 5] or '8x5x5x5'")
    return levels


def _transform(v):
    """'OBJ.FEATURE=T' (step2_fit's --transform) checked against the schema, or a list of them."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError("'OBJ.FEATURE=TRANSFORM' or a list of them")
    for text in items:
        try:
            key, transform = str(text).split("=")
            obj, name = key.split(".")
            feature = OBJECTS[obj].feature(name)
        except (ValueError, KeyError):
            raise ValueError(f"{text!r} is not OBJ.FEATURE=TRANSFORM with a schema feature") from None
        if feature.kind != "continuous" or transform not in TRANSFORMS:
            raise ValueError(f"{text!r}: only continuous features, transform one of {', '.join(TRANSFORMS)}")
    return list(items)


# axis -> (step2_fit flag, check, short name in a configuration's readable name)
AXES = {
    "codebook_size": ("--codebook-size", _integer(2, why=" (one code carries no information)"), "K"),
    "levels": ("--levels", _integer(1, MAX_LEVELS), "L"),
    "nested_levels": ("--nested-levels", _integer(1, MAX_LEVELS), "N"),  # levels in all after the nested refit
    "dim": ("--dim", _integer(1), "d"),
    "hidden": ("--hidden", _integer(1), "h"),
    "depth": ("--depth", _integer(1), "D"),
    "cosine": ("--cosine", _flag, "cos"),
    "decay": ("--decay", _number(lambda v: 0 < v < 1, "a number in (0, 1)"), "ema"),
    "commit_weight": ("--commit-weight", _number(lambda v: v >= 0, "a number >= 0"), "cw"),
    "pt_weight": ("--pt-weight", _number(lambda v: v >= 0, "a number >= 0"), "ptw"),
    "transform": ("--transform", _transform, "tf"),
    "encoder": ("--encoder", _one_of(ENCODERS), "enc"),
    "quantizer": ("--quantizer", _one_of(QUANTIZERS), "q"),
    "fsq_levels": ("--fsq-levels", _fsq_levels, "fsq"),
}


def check_grid(grid: dict) -> dict[str, list]:
    """{axis: [values]} with every axis known and every value possible; ValueError names the culprit."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError("the grid must be a non-empty object {axis: [values]}")
    unknown = sorted(set(grid) - set(AXES))
    if unknown:
        raise ValueError(f"unknown axis {', '.join(unknown)}; the axes are {', '.join(AXES)}")
    out = {}
    for axis, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ValueError(f"axis {axis}: no values")
        checked = []
        for v in values:
            try:
                checked.append(AXES[axis][1](v))
            except ValueError as exc:
                raise ValueError(f"axis {axis}: {v!r} is not {exc}") from None
        out[axis] = checked
    for point in itertools.product(*out.values()):  # the quantizer kind with the other settings
        s = dict(zip(out, point))
        problem = quantizer_problem(s.get("quantizer", "vq"), s.get("levels", "auto"), s.get("codebook_size", "auto"),
                                    s.get("fsq_levels"), s.get("cosine", False))
        if not problem and s.get("nested_levels") and s.get("quantizer", "vq") != "vq":
            problem = "nested levels need the residual EMA VQ (quantizer vq)"
        if problem:
            raise ValueError(f"the grid point {json.dumps(s)}: {problem}")
    return out


def parse_axis_flag(text: str) -> tuple[str, list]:
    """--axis codebook_size=256,1024 -> ('codebook_size', [256, 1024]); each value read as JSON
    when it parses (numbers, true/false), else kept as text (transforms)."""
    axis, sep, values = text.partition("=")
    if not sep or not values:
        raise ValueError(f"--axis {text!r}: expected AXIS=V1,V2,...")

    def value(v):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    return axis.strip(), [value(v.strip()) for v in values.split(",")]


def load_grid(path: str | None, axis_flags: list[str]) -> dict[str, list]:
    """The grid of --grid FILE (JSON), with --axis flags added or replacing its axes, checked."""
    grid = {}
    if path:
        try:
            grid = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON grid ({type(exc).__name__}: {exc})") from None
        if not isinstance(grid, dict):
            raise ValueError(f"{path}: the grid must be an object {{axis: [values]}}")
    grid = dict(grid)
    for text in axis_flags:
        axis, values = parse_axis_flag(text)
        grid[axis] = values
    return check_grid(grid)


def configurations(grid: dict[str, list], objects: list[str]) -> list[dict]:
    """One {'object', 'settings', 'id'} per object type and point of the grid."""
    axes = sorted(grid)
    out = []
    for obj in objects:
        for values in itertools.product(*(grid[a] for a in axes)):
            settings = dict(zip(axes, values))
            out.append({"object": obj, "settings": settings, "id": config_id(obj, settings)})
    return out


def config_id(obj: str, settings: dict) -> str:
    """A readable name (object, short axis names) and a hash of the exact settings: stable across
    runs and machines, so a rerun finds its finished configurations."""
    digest = hashlib.sha256(json.dumps([obj, settings], sort_keys=True).encode()).hexdigest()[:8]
    parts = []
    for axis in (a for a in AXES if a in settings):
        v = settings[axis]
        short = AXES[axis][2]
        if axis == "cosine":
            parts.append(short if v else f"no{short}")
        elif axis == "fsq_levels":
            parts.append(short + "x".join(map(str, v)))
        elif axis != "transform":  # too long for a name: the hash tells transforms apart
            parts.append(f"{short}{v:g}" if isinstance(v, float) else f"{short}{v}")
    return "-".join([obj, *parts, digest])


def fit_flags(settings: dict) -> list[str]:
    """step2_fit's command-line flags of one configuration."""
    argv = []
    for axis in (a for a in AXES if a in settings):
        flag, v = AXES[axis][0], settings[axis]
        if axis == "cosine":
            argv += [flag] if v else []
        elif axis == "transform":
            argv += [x for t in v for x in (flag, t)]
        elif axis == "fsq_levels":
            argv += [flag, ",".join(map(str, v))]
        else:
            argv += [flag, str(v)]
    return argv


def check_reference(ref_dir: str, objects: list[str]) -> None:
    """The reference tokenizer files each configuration borrows (<obj>.pt and .json of every type
    other than the one scanned); ValueError names what is missing."""
    d = Path(ref_dir)
    if not d.is_dir():
        raise ValueError(f"{ref_dir}: reference tokenizer directory not found")
    if (d / "combined.pt").exists():
        raise ValueError(f"{ref_dir}: a combined tokenizer; the scan needs one tokenizer per object type")
    needed = sorted({o for obj in objects for o in TOKENIZED_OBJECTS if o != obj})
    missing = [f"{o}{ext}" for o in needed for ext in (".pt", ".json") if not (d / f"{o}{ext}").exists()]
    if missing:
        raise ValueError(f"{ref_dir}: reference tokenizers missing: {', '.join(missing)} (run step2_fit.py)")


# --- what one configuration records ------------------------------------------------------------------


def bits_per_object(levels: int, codebook_size: int) -> float:
    return levels * math.log2(codebook_size)


def worst_bins(pt: dict) -> tuple[dict, dict] | None:
    """The truth-pT bins of largest relative resolution and of largest |relative bias|: the fit's
    own choice where its quality records one, else the same rule on its binned table; None
    without bins."""
    worst = pt.get("worst_bin") or tokenizer_quality.worst_bins(pt.get("relative_binned", []))
    return (worst["resolution"], worst["bias"]) if worst else None


def quality_columns(sidecar: dict) -> dict:
    """(A) and (B) from a fit's <obj>.json: every feature's resolution and bias (the units of the
    fit's table; pT also relative), the worst pT bin, and codes used, dead and perplexity per level,
    all measured on held-out events."""
    q = sidecar["quality"]
    row = {"quantizer": sidecar["settings"].get("quantizer", "vq"),
           "codebook_size": sidecar["settings"]["codebook_size"], "levels": sidecar["settings"]["levels"],
           "n_eval_objects": q.get("n_objects"), "pt_resolution": q["goals"].get("pt_relative_resolution")}
    if "fsq_levels" in sidecar["settings"]:
        row["fsq_levels"] = "x".join(map(str, sidecar["settings"]["fsq_levels"]))
    for name, f in q["features"].items():
        for key in ("resolution", "bias", "exact_match"):
            if isinstance(f.get(key), (int, float)):
                row[f"{key}_{name}"] = f[key]
    pt = q["features"].get("pt", {})
    if "relative" in pt:
        row["pt_bias"] = pt["relative"]["bias"]
    worst = worst_bins(pt)
    if worst:
        (res, bias), where = worst, lambda b: f"{b['lo']:g}-{b['hi']:g} GeV"
        row.update(pt_worst_bin_resolution=res["resolution"], pt_worst_bin=where(res),
                   pt_worst_bias=bias["bias"], pt_worst_bias_bin=where(bias))
    for c in q["codes"]:
        for key in ("used", "dead", "perplexity", "used_fraction"):
            row[f"{key}_L{c['level']}"] = c[key]
    row["min_used_fraction"] = min(c["used_fraction"] for c in q["codes"])
    row["bits_per_object"] = bits_per_object(row["levels"], row["codebook_size"])
    return row


def closure_columns(closure: dict, prefix: str = "closure") -> dict:
    """Every number of a closure.json, flattened to closure_<path> columns."""
    out = {}
    for key, value in closure.items():
        name = f"{prefix}_{key}"
        if isinstance(value, dict):
            out.update(closure_columns(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def auc_columns(metrics: dict, arm: str = "scratch") -> dict:
    """(D): the test AUC of the quick classifier and its 95% interval, from step4's metrics.json."""
    m = metrics["arms"][arm]
    ci = m.get("auc_ci95") or [None, None]
    return {"auc": m.get("auc"), "auc_ci_lo": ci[0], "auc_ci_hi": ci[1]}


def paired_auc_columns(scores: Path, reference_scores: Path, signal: set[str], n_bootstrap: int, seed: int) -> dict:
    """(D) against the reference: AUC minus the reference's on the same test events (step4's test_scores.npz
    of the two classifiers), its paired 95% interval and verdict; nothing where either file is missing."""
    if not (scores.exists() and reference_scores.exists()):
        return {}
    with np.load(scores) as a, np.load(reference_scores) as b:
        if not (np.array_equal(a["process"], b["process"]) and np.array_equal(a["weight"], b["weight"])):
            raise ValueError(f"{scores}: other test events than the reference's {reference_scores}")
        y = np.isin(a["process"], sorted(signal)).astype(int)
        d = paired_auc_difference(y, a["weight"].astype(np.float64), a["score_scratch"][None], b["score_scratch"][None],
                                  n_bootstrap, seed)
    return {"auc_minus_reference": d["delta_auc"], "auc_minus_reference_ci_lo": d["ci95"][0],
            "auc_minus_reference_ci_hi": d["ci95"][1], "auc_verdict": verdict(d["ci95"])}


# --- the table ----------------------------------------------------------------------------------------


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats on both (smaller x and smaller y are better)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    better_eq = (x[None, :] <= x[:, None]) & (y[None, :] <= y[:, None])
    strictly = (x[None, :] < x[:, None]) | (y[None, :] < y[:, None])
    dominated = (better_eq & strictly & ok[None, :]).any(axis=1)
    return ok & ~dominated


def ranking(table, obj: str):
    """One object's configurations, best first: downstream AUC, then pT resolution, then fewer bits."""
    rows = table[table["object"] == obj]
    keys = [k for k in ("auc", "pt_resolution", "bits_per_object") if k in rows]
    return rows.sort_values(keys, ascending=[k != "auc" for k in keys], na_position="last")
