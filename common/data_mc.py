"""Data against simulation for fitted tokenizers (step2_fit --data-mc, step2_scan --data-mc).

The held-out events (the `test` split, as the fit's quality) of the inputs are split by
common/event/is_simulation (0: data, 1: simulation; events where it is unknown are left out), up
to a bound of objects per side. Per tokenizer and object type, each side is encoded and decoded,
and these distributions of data are compared with those of simulation, both normalised to unit area:
  every tokenized feature as stored (and, in the table, as decoded), and
  the code usage of every quantizer level (one bin per code).
The number per comparison is DEFINITION's chi2/ndf (and its p-value): the two-histogram test
of ROOT's TH1::Chi2Test "UU", whose expectation is 1 per degree of freedom when both sides come
from one distribution however few entries a bin has, divided by the mean design effect (Rao and
Scott's first-order correction for clustered samples): the objects of one event are not
independent (the tracks of an event share its vertex, so their z0 fall into a bin or two
together): the tracks' z0 of two held-out sets of one Drell-Yan sample gave chi2/ndf 2.7 without
the correction and 1.4 with it (design effect 1.9). The design effect is 1 for independent
objects; chi2/ndf well above 1 (a small p-value) is a real difference in shape.
Feature bins: one per value of a flag or category; otherwise up to MAX_BINS bins of equal
population in both samples together (entries beyond the outer edges, decoded ones included, go to
the outer bins).
Outputs in the tokenizer folder: data_mc.json (the table's rows and the histograms), data_mc.csv
(the rows: one per tokenizer, object type and feature or level) and, unless plots are off,
plots/data_mc/<tokenizer>[.<object>]_features.png and _codes.png (plotting/plot_data_mc.py).
Memory: one chunk of events at a time, and at most the bound of objects per side.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from common import h5io, runtime
from common.decoded_closure import reconstruct_objects, tokenizer_features
from common.object_stream import CHUNK_EVENTS, flatten_objects, heldout, object_keys
from common.schema import OBJECTS, TOKENIZED_OBJECTS
from common.tokenizer import COMBINED, Tokenizer, load_tokenizer

SIMULATION_KEY = "common/event/is_simulation"
SIDES = {"data": 0, "mc": 1}  # side: its is_simulation value
MAX_OBJECTS = 200_000  # held-out objects per side and object type (step2_fit passes --eval-objects)
MAX_BINS = 40  # of a feature histogram
MIN_PER_BIN = 25  # feature bins hold about this many entries of the smaller side, at least
MIN_BINS = 5
DISCRETE = ("flag", "category")
DEFINITION = ("chi2 = sum_i (N_mc n_i - N_data m_i)^2 / ((n_i + m_i) N_data N_mc) / D, ndf = k - 1 over the k bins "
              "filled in either; n_i, m_i: the data and simulation objects in bin i, N: their totals; the design "
              "effect D = sum_i V_i / (n_i + m_i) / ndf with V_i = sum over the events of both sides of "
              "(c_ei - p_i t_e)^2 (c_ei: the event's objects in bin i, t_e: its objects, p_i = (n_i + m_i) / "
              "(N_data + N_mc)); D is 1 for one object per event")
COLUMNS = ("tokenizer", "object", "quantity", "name", "kind", "n_data", "n_mc", "chi2", "ndf", "chi2_ndf", "p_value",
           "design_effect", "chi2_ndf_decoded")


# --- the inputs -----------------------------------------------------------------------------------


def heldout_events(info: dict) -> dict[str, int]:
    """Held-out events of each side in one input (object_stream.describe_file)."""
    counts = dict.fromkeys(SIDES, 0)
    if SIMULATION_KEY in info["present"]:
        for lo, c in h5io.iter_chunks(info["path"], [SIMULATION_KEY], step=CHUNK_EVENTS):
            sim = c[SIMULATION_KEY][heldout(info["path"], lo, len(c[SIMULATION_KEY]))]
            for side, flag in SIDES.items():
                counts[side] += int((sim == flag).sum())
    return counts


def missing_side(infos: list[dict]) -> str | None:
    """Why the inputs cannot be compared (no held-out data event, or none simulated), or None (read
    until both sides are seen)."""
    counts = dict.fromkeys(SIDES, 0)
    for info in infos:
        here = heldout_events(info)
        counts = {s: counts[s] + here[s] for s in SIDES}
        if all(counts.values()):
            return None
    side = "data" if not counts["data"] else "mc"
    return (f"no {'data' if side == 'data' else 'simulation'} among the inputs (no held-out event with "
            f"{SIMULATION_KEY} = {SIDES[side]}; {counts['data']} data and {counts['mc']} simulated held-out events)")


def events_of(obj: str, keys: dict[str, str], c: dict[str, np.ndarray], events: np.ndarray) -> np.ndarray:
    """The event (index in the chunk) of every object flatten_objects returns for these events."""
    if OBJECTS[obj].per_event:
        return events
    return events[np.nonzero(c[keys["__mask__"]][events].astype(bool))[0]]


def heldout_by_side(obj: str, names: list[str], infos: list[dict], max_objects: int) -> dict[str, tuple]:
    """{side: ({feature: 1-D array}, event number of each object)}: the objects of held-out events of
    each side, up to max_objects each. The files take turns chunk by chunk, so a bound below the
    total still samples every file."""
    chunks = sorted((lo, i) for i, info in enumerate(infos) for lo in range(0, info["n_events"], CHUNK_EVENTS))
    parts, counts, first_event = {s: [] for s in SIDES}, dict.fromkeys(SIDES, 0), 0
    for lo, i in chunks:
        if min(counts.values()) >= max_objects:
            break
        info = infos[i]
        if SIMULATION_KEY not in info["present"]:
            continue
        keys = object_keys(obj, names, info)
        hi = min(lo + CHUNK_EVENTS, info["n_events"])
        _, c = next(h5io.iter_chunks(info["path"], [*keys.values(), SIMULATION_KEY], step=CHUNK_EVENTS, start=lo, stop=hi))
        test = heldout(info["path"], lo, hi - lo)
        for side, flag in SIDES.items():
            events = np.nonzero(test & (c[SIMULATION_KEY] == flag))[0]
            if counts[side] < max_objects and len(events):
                part = flatten_objects(obj, keys, c, events)
                parts[side].append((part, first_event + events_of(obj, keys, c, events)))
                counts[side] += len(parts[side][-1][1])
        first_event += hi - lo
    return {s: ({k: np.concatenate([p[k] for p, _ in ps])[:max_objects] for k in ps[0][0]},
                np.concatenate([e for _, e in ps])[:max_objects]) if ps else ({}, np.zeros(0, np.int64))
            for s, ps in parts.items()}


# --- the numbers ----------------------------------------------------------------------------------


def chi2_two_sample(n: np.ndarray, m: np.ndarray, variance: np.ndarray | None = None) -> dict:
    """chi2, ndf, chi2/ndf, p-value and design effect of the shapes of two histograms n (data) and m
    (simulation) (DEFINITION); variance: V_i (bin_sums, pooled), None for one object per event.
    None where a side is empty or fewer than two bins are filled."""
    n, m = np.asarray(n, np.float64), np.asarray(m, np.float64)
    big_n, big_m = n.sum(), m.sum()
    filled = (n + m) > 0
    ndf = int(filled.sum()) - 1
    if big_n == 0 or big_m == 0 or ndf < 1:
        return {"chi2": None, "ndf": max(ndf, 0), "chi2_ndf": None, "p_value": None, "design_effect": None}
    n, m = n[filled], m[filled]
    design = 1.0 if variance is None else float((np.asarray(variance, np.float64)[filled] / (n + m)).sum() / ndf)
    if design < 1e-9:  # every event has the same shape (one event per side): nothing to measure the spread on
        return {"chi2": None, "ndf": ndf, "chi2_ndf": None, "p_value": None, "design_effect": None}
    chi2 = float(((big_m * n - big_n * m) ** 2 / (n + m)).sum() / (big_n * big_m)) / design
    return {"chi2": chi2, "ndf": ndf, "chi2_ndf": chi2 / ndf, "p_value": float(stats.chi2.sf(chi2, ndf)),
            "design_effect": design}


def bin_edges(kind: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One bin per value (flags, categories), else up to MAX_BINS of equal population of a and b together."""
    both = np.concatenate([a, b]).astype(np.float64)
    both = both[np.isfinite(both)]
    if not len(both):
        return np.array([-0.5, 0.5])
    if kind in DISCRETE:
        v = np.unique(both)
        return np.concatenate([[v[0] - 0.5], (v[:-1] + v[1:]) / 2, [v[-1] + 0.5]])
    n_bins = int(np.clip(min(len(a), len(b)) // MIN_PER_BIN, MIN_BINS, MAX_BINS))
    edges = np.unique(np.quantile(both, np.linspace(0, 1, n_bins + 1)))
    return edges if len(edges) > 1 else np.array([edges[0] - 0.5, edges[0] + 0.5])


def bin_sums(index: np.ndarray, events: np.ndarray, n_bins: int) -> dict:
    """What the histogram of objects in bins `index` from events `events` needs: per bin the objects n,
    the sum over events of c_ei^2 and of c_ei t_e; and the sum over events of t_e^2 (DEFINITION)."""
    _, per_object, t = np.unique(events, return_inverse=True, return_counts=True)
    _, first, c = np.unique(events.astype(np.int64) * n_bins + index, return_index=True, return_counts=True)
    return {"n": np.bincount(index, minlength=n_bins), "c2": np.bincount(index[first], c.astype(np.float64) ** 2, n_bins),
            "ct": np.bincount(index, t[per_object].astype(np.float64), n_bins), "t2": float((t.astype(np.float64) ** 2).sum())}


def histogram(x: np.ndarray, events: np.ndarray, edges: np.ndarray) -> dict:
    """bin_sums of the finite entries in the bins of `edges`, those beyond the outer edges in the outer bins."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    index = np.clip(np.searchsorted(edges, x[ok], side="right") - 1, 0, len(edges) - 2)
    return bin_sums(index, events[ok], len(edges) - 1)


def compared(h: dict[str, dict]) -> dict:
    """{side: bin_sums} -> the counts of each side and the chi2 of the two, V_i pooled over both."""
    pooled = {k: h["data"][k] + h["mc"][k] for k in ("n", "c2", "ct", "t2")}
    p = pooled["n"] / max(pooled["n"].sum(), 1)
    variance = pooled["c2"] - 2 * p * pooled["ct"] + p**2 * pooled["t2"]
    return {**{s: h[s]["n"].tolist() for s in SIDES}, **chi2_two_sample(h["data"]["n"], h["mc"]["n"], variance)}


def objects_of(tok: Tokenizer) -> list[str]:
    """The object types a tokenizer encodes: its own, or those of the combined one."""
    return [o for o in TOKENIZED_OBJECTS if tokenizer_features(tok, o)] if tok.obj == COMBINED else [tok.obj]


def compare(tok: Tokenizer, name: str, obj: str, infos: list[dict], max_objects: int) -> dict | None:
    """Histograms and chi2 of one object type of one tokenizer (None: a side has no such object)."""
    names = tokenizer_features(tok, obj)
    sample = heldout_by_side(obj, names, infos, max_objects)  # side: (features, events)
    if not all(len(events) for _, events in sample.values()):
        return None
    reco = {s: reconstruct_objects(tok, obj, feats, ev) for s, (feats, ev) in sample.items()}  # side: (codes, decoded)
    events = {s: e for s, (_, e) in sample.items()}
    prefix = f"{obj}/" if tok.obj == COMBINED else ""  # the combined tokenizer's names: '<obj>/<name>'
    kinds = {n: sp["kind"] for sp in tok.specs for n in sp["names"]}
    features = []  # a list: the JSON keeps the tokenizer's order
    for f in names:
        kind = kinds[prefix + f]
        edges = bin_edges(kind, sample["data"][0][f], sample["mc"][0][f])
        decoded = compared({s: histogram(reco[s][1][f], events[s], edges) for s in SIDES})
        features.append({"name": f, "kind": kind, "edges": edges.tolist(),
                         **compared({s: histogram(sample[s][0][f], events[s], edges) for s in SIDES}),
                         **{f"{s}_decoded": decoded[s] for s in SIDES}, "chi2_ndf_decoded": decoded["chi2_ndf"]})
    levels = [{"level": level, **compared({s: bin_sums(reco[s][0][:, level], events[s], tok.codebook_size) for s in SIDES})}
              for level in range(tok.levels)]
    n = {f"n_{s}": len(events[s]) for s in SIDES}
    return {"tokenizer": name, "object": obj, **n, "features": features, "levels": levels}


def table_rows(comparison: dict) -> list[dict]:
    """One row per feature and per level of a comparison (COLUMNS)."""
    head = {k: comparison[k] for k in ("tokenizer", "object", "n_data", "n_mc")}
    keep = ("chi2", "ndf", "chi2_ndf", "p_value", "design_effect")
    rows = [{**head, "quantity": "feature", **{k: h[k] for k in ("name", "kind", *keep, "chi2_ndf_decoded")}}
            for h in comparison["features"]]
    rows += [{**head, "quantity": "codes", "name": f"q{lv['level']}", "kind": "level", **{k: lv[k] for k in keep},
              "chi2_ndf_decoded": None} for lv in comparison["levels"]]
    return rows


# --- the outputs ----------------------------------------------------------------------------------


def write_data_mc(tok_dir: str | Path, infos: list[dict], tokenizers: list[str] | None = None,
                  max_objects: int = MAX_OBJECTS, plots: bool = True) -> dict:
    """Compare data with simulation for the tokenizers (file stems) of tok_dir (default: every
    <name>.pt there) on the held-out events of `infos`; write data_mc.json, data_mc.csv and the plots."""
    tok_dir = Path(tok_dir)
    tokenizers = tokenizers or sorted(p.stem for p in tok_dir.glob("*.pt"))
    comparisons = []
    for name in tokenizers:
        tok = load_tokenizer(tok_dir / f"{name}.pt")
        comparisons += [c for obj in objects_of(tok) if (c := compare(tok, name, obj, infos, max_objects))]
    rows = [r for c in comparisons for r in table_rows(c)]
    result = {"definition": DEFINITION, "max_objects_per_side": max_objects,
              "inputs": [i["path"] for i in infos], "rows": rows, "comparisons": comparisons}
    runtime.write_json(tok_dir / "data_mc.json", result)
    with runtime.atomic_output(tok_dir / "data_mc.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if plots:
        from plotting.plot_data_mc import plot_data_mc

        plot_data_mc(tok_dir)
    return result


def worst(rows: list[dict], quantity: str) -> float | None:
    values = [r["chi2_ndf"] for r in rows if r["quantity"] == quantity and r["chi2_ndf"] is not None]
    return max(values) if values else None


def summary(result: dict) -> dict:
    """The scan's columns: the largest chi2/ndf of the features and of the levels."""
    return {"data_mc_features_max_chi2_ndf": worst(result["rows"], "feature"),
            "data_mc_codes_max_chi2_ndf": worst(result["rows"], "codes")}


def fit_data_mc(tok_dir: str | Path, infos: list[dict], max_objects: int, plots: bool) -> list[str]:
    """step2_fit --data-mc: write_data_mc on every tokenizer of tok_dir, one line of the worst chi2/ndf;
    its error line, if any, printed and returned."""
    try:
        s = summary(write_data_mc(tok_dir, infos, max_objects=max_objects, plots=plots))
    except (OSError, KeyError, ValueError) as exc:
        line = runtime.error_line("data-mc", exc)
        print(line, file=sys.stderr)
        return [line]
    shown = {k: f"{v:.2f}" if v is not None else "-" for k, v in s.items()}
    print(f"[fit] data against simulation: largest chi2/ndf features {shown['data_mc_features_max_chi2_ndf']}, "
          f"codes {shown['data_mc_codes_max_chi2_ndf']} ({Path(tok_dir) / 'data_mc.csv'})")
    return []
