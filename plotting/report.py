"""One self-contained HTML page per run: the sample, the conversion, the tokenizers, pretraining,
the classifier, and the settings and code version of every step.

    python plotting/report.py --run-dir runs/default --sample-dir data/raw --out runs/default/report.html

It only reads what the steps wrote (HDF5 /metadata and mask/n datasets, JSON sidecars, CSV
histories, PNG plots, Parquet schema metadata); PNGs are embedded as base64 data URIs, the CSS is
inline, so the page has no external resource. A section whose inputs are missing says so in one
line; a step's JSON with unexpected keys is still shown as tables, never a crash.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import html
import io
import json
import math
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from common import h5io  # noqa: E402
from common.runtime import EXIT_OK, EXIT_USAGE, atomic_output, die, provenance  # noqa: E402
from common.schema import LIST_OBJECTS, TOKENIZED_OBJECTS  # noqa: E402

RUN_DIR = "runs/default"
SAMPLE_DIR = "data/raw"
OUT = ""  # default: <run-dir>/report.html
SEED = 0  # the report is deterministic; --seed is accepted like every step's
MAX_MULTIPLICITY = 12  # last bin of the multiplicity plot holds this many objects or more
CHUNK_EVENTS = 65536  # HDF5 rows read at once when counting objects
MAX_TABLE_ROWS = 60  # longer tables are cut (and say so)
MAX_PLOTS_PER_DIR = 40

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:1em 2em;color:#222;line-height:1.4}
h1{border-bottom:3px solid #345;padding-bottom:.2em} h2{border-bottom:1px solid #aaa;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em} th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right;vertical-align:top} th{background:#e8edf3} td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#f7f9fb} .missing{color:#a33;font-style:italic}
.note{color:#555;font-size:.9em} figure{display:inline-block;margin:.4em;vertical-align:top}
figure img{max-width:560px;border:1px solid #ddd} figcaption{font-size:.8em;color:#555;text-align:center}
code{background:#f0f0f0;padding:0 3px} details{margin:.4em 0} summary{cursor:pointer;font-weight:600}
nav a{margin-right:1em}
"""


# --- small HTML helpers --------------------------------------------------------------------------

def esc(x) -> str:
    return html.escape(str(x))


def fmt(v) -> str:
    """Numbers short and readable; everything else as text."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
        return ", ".join(fmt(x) for x in v) if len(v) <= 12 else ", ".join(fmt(x) for x in v[:12]) + f", ... ({len(v)})"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)[:300]
    return str(v)


def missing(what: str) -> str:
    return f'<p class="missing">{esc(what)}</p>'


def table(header: list, rows: list[list], raw: bool = False) -> str:
    """rows of cells -> <table>; raw=True when the cells already hold HTML."""
    cut = len(rows) - MAX_TABLE_ROWS
    rows = rows[:MAX_TABLE_ROWS]
    cell = (lambda c: str(c)) if raw else (lambda c: esc(fmt(c)))
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows]
    out.append("</table>")
    if cut > 0:
        out.append(f'<p class="note">... {cut} more rows not shown</p>')
    return "".join(out)


def flatten(d, prefix: str = "") -> dict:
    """Nested dicts -> {'a.b.c': value}; lists stay values."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def kv_table(d: dict) -> str:
    flat = flatten(d)
    return table(["key", "value"], [[k, v] for k, v in flat.items()]) if flat else missing("(empty)")


def render(value) -> str:
    """Any JSON value as HTML: a dict of dicts or a list of dicts becomes one table with the
    union of keys as columns; a flat dict becomes key/value rows; scalars become text."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        rows = {k: flatten(v) for k, v in value.items()}
        cols = list(dict.fromkeys(c for r in rows.values() for c in r))
        if len(cols) <= 14:
            return table([""] + cols, [[k] + [r.get(c, "") for c in cols] for k, r in rows.items()])
        return "".join(f"<details><summary>{esc(k)}</summary>{kv_table(v)}</details>" for k, v in value.items())
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rows = [flatten(v) for v in value]
        cols = list(dict.fromkeys(c for r in rows for c in r))
        return table(cols, [[r.get(c, "") for c in cols] for r in rows])
    if isinstance(value, dict):
        return kv_table(value)
    return f"<p>{esc(fmt(value))}</p>"


def png_tag(data: bytes, caption: str = "") -> str:
    b64 = base64.b64encode(data).decode()
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}">{cap}</figure>'


FIRST_PLOTS = ("roc", "data_efficiency", "training_curves", "reco_vs_original", "pt_correlation_resolution")


def png_files(pngs: list[Path], base: Path) -> str:
    """The PNGs as figures, the headline plots (ROC, data efficiency, ...) first."""
    rank = {name: i for i, name in enumerate(FIRST_PLOTS)}
    pngs = sorted(pngs, key=lambda p: (rank.get(p.stem, len(rank)), str(p)))
    return "".join(png_tag(p.read_bytes(), str(p.relative_to(base))) for p in pngs[:MAX_PLOTS_PER_DIR])


def fig_tag(fig, caption: str = "") -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return png_tag(buf.getvalue(), caption)


def load_json(path: Path):
    """The parsed JSON, or None when the file is absent or unreadable (the caller says so)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def find_key(d, *names):
    """First value whose key is one of `names`, searched depth-first through nested dicts."""
    if not isinstance(d, dict):
        return None
    for n in names:
        if n in d:
            return d[n]
    for v in d.values():
        hit = find_key(v, *names)
        if hit is not None:
            return hit
    return None


# --- the sample (HDF5 /metadata and the n datasets) -------------------------------------------------

def h5_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "h5").glob("*.h5"))


def read_h5_summaries(run_dir: Path) -> tuple[list[dict], list[str]]:
    """Per HDF5 file: its metadata and its object multiplicity histogram (counted in chunks)."""
    out, errors = [], []
    for path in h5_files(run_dir):
        try:
            meta = h5io.read_metadata(path)
            counts = {}
            for obj in LIST_OBJECTS:
                key = f"common/{obj}/n"
                hist = np.zeros(MAX_MULTIPLICITY + 1, dtype=np.int64)
                try:
                    for _, chunk in h5io.iter_chunks(path, [key], step=CHUNK_EVENTS):
                        hist += np.bincount(np.minimum(chunk[key], MAX_MULTIPLICITY), minlength=MAX_MULTIPLICITY + 1)
                except KeyError:
                    continue
                counts[obj] = hist
            out.append({"path": path, "meta": meta, "counts": counts})
        except (OSError, ValueError, KeyError) as exc:
            errors.append(f"{path.name}: {str(exc).splitlines()[0]}")
    return out, errors


def section_sample(run_dir: Path, sample_dir: Path | None, h5s: list[dict], errors: list[str],
                   generated: list[tuple[Path, dict]]) -> str:
    parts = []
    if not h5s:
        parts.append(missing(f"no step1 HDF5 files under {run_dir / 'h5'}: sample not shown"))
    else:
        rows = []
        for s in h5s:
            m = s["meta"]
            xs, n = m.get("cross_section_pb"), m.get("n_events")
            rows.append([m.get("process", s["path"].stem), str(m.get("dsid", "")), m.get("experiment", ""), n,
                         xs if isinstance(xs, (int, float)) and math.isfinite(xs) else "n/a", m.get("sum_weights", ""), s["path"].name])
        parts.append(table(["process", "dsid", "experiment", "events", "cross-section [pb]", "sum of weights", "file"], rows))
        parts.append("<h3>Object multiplicities</h3>")
        parts.append('<p class="note">Mean number of stored objects per event (after the step1 pT cuts), '
                     "and the fraction of events with at least one.</p>")
        rows = []
        for s in h5s:
            row = [s["meta"].get("process", s["path"].stem)]
            for obj in LIST_OBJECTS:
                h = s["counts"].get(obj)
                if h is None or h.sum() == 0:
                    row.append("n/a")
                else:
                    mean = float((np.arange(len(h)) * h).sum() / h.sum())  # capped at MAX_MULTIPLICITY
                    row.append(f"{mean:.2f} ({1 - h[0] / h.sum():.0%})")
            rows.append(row)
        parts.append(table(["process"] + list(LIST_OBJECTS), rows))
        parts.append(multiplicity_plot(h5s))
    if errors:
        parts.append(missing("unreadable HDF5 files: " + "; ".join(errors)))
    pngs = sorted((run_dir / "plots" / "sample").rglob("*.png"))
    if pngs:
        parts.append("<h3>Sample plots</h3>" + png_files(pngs, run_dir))
    parts.append(sample_files(sample_dir, generated))
    return "".join(parts)


def multiplicity_plot(h5s: list[dict]) -> str:
    import matplotlib.pyplot as plt

    objs = [o for o in LIST_OBJECTS if any(o in s["counts"] for s in h5s)]
    if not objs:
        return ""
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(objs) / cols), cols, figsize=(11, 3.0 * math.ceil(len(objs) / cols)),
                             squeeze=False)
    edges = np.arange(MAX_MULTIPLICITY + 2) - 0.5
    for ax, obj in zip(axes.flat, objs):
        for s in h5s:
            h = s["counts"].get(obj)
            if h is not None and h.sum():
                ax.stairs(h / h.sum(), edges, label=str(s["meta"].get("process", s["path"].stem)))
        ax.set_xlabel(f"number of {obj} (last bin: {MAX_MULTIPLICITY} or more)")
        ax.set_ylabel("fraction of events")
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(objs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig_tag(fig, "object multiplicity per process (normalised)")


GENERATOR_TREE = "GeneratorMetaData"  # step0's one-entry metadata tree (common/physlite_writer.py)


def generator_metadata(sample_dir: Path | None) -> list[tuple[Path, dict]]:
    """(ROOT file, its step0 generator metadata or {}) for every ROOT file of the sample folder;
    only the one-entry metadata tree is read."""
    if sample_dir is None or not sample_dir.is_dir():
        return []
    import uproot

    out = []
    for path in sorted(sample_dir.glob("*.root")):
        meta = {}
        try:
            with uproot.open(path) as f:
                if GENERATOR_TREE in {k.split(";")[0] for k in f.keys(recursive=False)}:
                    arrays = f[GENERATOR_TREE].arrays(library="np", entry_stop=1)
                    meta = {k: (v[0].decode() if isinstance(v[0], bytes) else v[0].item() if hasattr(v[0], "item") else v[0])
                            for k, v in arrays.items() if len(v)}
                    if isinstance(meta.get("provenance"), str):
                        meta["provenance"] = json.loads(meta["provenance"])
        except (OSError, ValueError, KeyError) as exc:
            meta = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        out.append((path, meta))
    return out


def sample_files(sample_dir: Path | None, generated: list[tuple[Path, dict]]) -> str:
    if sample_dir is None:
        return ""
    if not generated:
        return missing(f"no generated ROOT files under {sample_dir}")
    rows = []
    for path, m in generated:
        xs, err = m.get("cross_section_pb"), m.get("cross_section_error_pb")
        xs_text = f"{fmt(xs)} ± {fmt(err)}" if isinstance(xs, float) and isinstance(err, float) else fmt(xs or "")
        rows.append([path.name, f"{path.stat().st_size / 2**20:.1f} MiB", m.get("process", ""), m.get("n_events", ""),
                     xs_text, m.get("description", m.get("error", "no generator metadata (not a step0 file)"))])
    return (f"<h3>Generated files ({esc(sample_dir)})</h3>"
            + table(["file", "size", "process", "events", "generator cross-section [pb]", "description"], rows))


# --- the conversion ----------------------------------------------------------------------------------

def same_in_all(h5s: list[dict], key: str):
    """A metadata value shared by every file, or a note that it differs."""
    values = {json.dumps(s["meta"].get(key), sort_keys=True, default=str) for s in h5s}
    return h5s[0]["meta"].get(key) if len(values) == 1 else "differs between files"


def section_conversion(h5s: list[dict]) -> str:
    if not h5s:
        return missing("no step1 HDF5 files: conversion not shown")
    parts = ['<p class="note">Non-kinematic variables absent from an input are NaN-filled (-1 for integers) '
             "and listed here.</p>"]
    rows = []
    for s in h5s:
        mf = s["meta"].get("missing_features") or []
        mf = mf if isinstance(mf, list) else [mf]
        rows.append([s["meta"].get("process", s["path"].stem), Path(str(s["meta"].get("input_file", ""))).name,
                     s["meta"].get("experiment", ""), len(mf), ", ".join(map(str, mf)) or "none"])
    parts.append(table(["process", "input file", "experiment", "# missing", "missing features"], rows))
    met = same_in_all(h5s, "met_definition")
    parts.append(f"<p><b>MET definition:</b> {esc(met if met not in (None, '') else 'not recorded')}</p>")
    parts.append(object_settings_table(h5s))
    iso = {k: same_in_all(h5s, k) for k in ("common_iso_cone", "common_iso_pt_floor_gev", "common_iso_z0sintheta_cut_mm")}
    parts.append(f"<p><b>trk_iso03:</b> cone {esc(fmt(iso['common_iso_cone']))}, track pT &gt; "
                 f"{esc(fmt(iso['common_iso_pt_floor_gev']))} GeV, |z0 sin&theta;| &lt; "
                 f"{esc(fmt(iso['common_iso_z0sintheta_cut_mm']))} mm; format_version "
                 f"{esc(fmt(same_in_all(h5s, 'format_version')))}</p>")
    sources = same_in_all(h5s, "branch_sources")
    if isinstance(sources, dict):
        parts.append("<details><summary>where each variable was read (branch_sources)</summary>"
                     + table(["variable", "branch"], sorted(sources.items())) + "</details>")
    return "".join(parts)


def object_settings_table(h5s: list[dict]) -> str:
    """Per object: the pT cut, the number stored, and the objects dropped by that cap per process."""
    cuts, caps = same_in_all(h5s, "pt_cuts"), same_in_all(h5s, "max_objects")
    cuts, caps = (cuts if isinstance(cuts, dict) else {}), (caps if isinstance(caps, dict) else {})
    procs = [str(s["meta"].get("process", s["path"].stem)) for s in h5s]
    rows = []
    for obj in LIST_OBJECTS:
        trunc = [(s["meta"].get("truncated_objects") or {}).get(obj, "") if isinstance(
            s["meta"].get("truncated_objects"), dict) else "" for s in h5s]
        rows.append([obj, cuts.get(obj, ""), caps.get(obj, "")] + trunc)
    return table(["object", "pT cut [GeV]", "max stored"] + [f"dropped by cap: {p}" for p in procs], rows)


# --- the tokenizers ----------------------------------------------------------------------------------

def tokenizer_sidecars(run_dir: Path) -> dict[str, dict]:
    """tok/<obj>.json files that describe a tokenizer (other JSON files in tok/ are skipped)."""
    out = {}
    for path in sorted((run_dir / "tok").glob("*.json")):
        d = load_json(path)
        if isinstance(d, dict) and ("quality" in d or "settings" in d or "object" in d):
            out[path.stem] = d
    return out


def codebook_usage(side: dict) -> str:
    """Per quantizer level: codes used of the codebook, dead codes, perplexity."""
    codes = find_key(side.get("quality", {}), "codes") or find_key(side, "codebook_usage", "usage")
    if not codes or not isinstance(codes, (list, dict)):
        return missing("no codebook usage recorded")
    size = (side.get("settings") or {}).get("codebook_size", "")
    rows = codes if isinstance(codes, list) else list(codes.values())
    rows = [r if isinstance(r, dict) else {"used": r} for r in rows]
    return table(["level", "codebook size", "used", "used fraction", "dead", "perplexity"],
                 [[r.get("level", i), size, r.get("used", ""), r.get("used_fraction", ""), r.get("dead", ""),
                   r.get("perplexity", "")] for i, r in enumerate(rows)])


def resolution(side: dict) -> str:
    """One row per feature: bias and resolution of the decoded value (relative for pT and mass),
    or the exact-match rate of flags and categories, on held-out objects."""
    feats = find_key(side.get("quality", {}), "features")
    if not isinstance(feats, dict) or not feats:
        res = find_key(side, "resolution", "resolutions")
        return render(res) if res is not None else missing("no resolution table recorded")
    rows = []
    for name, q in feats.items():
        q = q if isinstance(q, dict) else {"value": q}
        rel = q.get("relative") if isinstance(q.get("relative"), dict) else {}
        rows.append([name, q.get("kind", ""), q.get("n", rel.get("n", "")), q.get("bias", ""), q.get("resolution", ""),
                     rel.get("bias", ""), rel.get("resolution", ""), q.get("exact_match", "")])
    out = table(["feature", "kind", "objects", "bias", "resolution", "relative bias", "relative resolution",
                 "exact match"], rows)
    binned = (feats.get("pt") or {}).get("relative_binned") if isinstance(feats.get("pt"), dict) else None
    if isinstance(binned, list) and binned:
        out += "<p><b>pT resolution in bins of true pT</b> (relative, reco/true - 1)</p>" + table(
            ["true pT [GeV]", "objects", "bias", "resolution"],
            [[f"{fmt(b.get('lo'))} - {fmt(b.get('hi'))}", b.get("n", ""), b.get("bias", ""), b.get("resolution", "")]
             for b in binned if isinstance(b, dict)])
    return out


def goals_line(side: dict) -> str:
    goals = (side.get("quality") or {}).get("goals")
    if not isinstance(goals, dict) or not isinstance(goals.get("pass"), dict):
        return ""
    marks = [f"{esc(k)}: {'pass' if v else 'FAIL'}" for k, v in goals["pass"].items() if v is not None]
    return f"<p><b>goals:</b> {'; '.join(marks) or 'none applicable'}</p>" if marks else ""


def btag_table(side: dict) -> str:
    wps = (side.get("quality") or {}).get("btag_working_points")
    if not isinstance(wps, dict) or not wps:
        return ""
    rows = [[tagger, w.get("pass_fraction_fit", ""), w.get("cut", ""), w.get("eff_before", ""), w.get("eff_after", ""),
             w.get("abs_diff", "")] for tagger, lst in wps.items() for w in (lst if isinstance(lst, list) else [])
            if isinstance(w, dict)]
    return ("<h4>b-tagging working points (fixed cuts, before / after encode-decode)</h4>"
            + table(["tagger", "pass fraction", "cut", "pass before", "pass after", "|diff|"], rows))


def section_tokenizers(run_dir: Path) -> str:
    sides = tokenizer_sidecars(run_dir)
    if not sides:
        return missing(f"no tokenizer sidecars under {run_dir / 'tok'}: tokenizers not shown")
    order = [o for o in list(TOKENIZED_OBJECTS) + ["combined"] if o in sides] + \
            [o for o in sides if o not in TOKENIZED_OBJECTS and o != "combined"]
    parts = [summary_tokenizers(sides, order)]
    parts.append('<p class="note">' + " ".join(f'<a href="#tok-{esc(o)}">{esc(o)}</a>' for o in order) + "</p>")
    for obj in order:
        side = sides[obj]
        parts.append(f'<h3 id="tok-{esc(obj)}">{esc(obj)}</h3>')
        feats = side.get("features_used") or side.get("features")
        if feats:
            parts.append("<p><b>features:</b> " + esc(", ".join(
                f"{f.get('name', f)} ({f.get('kind', '')})" if isinstance(f, dict) else str(f) for f in feats)) + "</p>")
        if side.get("dropped_features"):
            parts.append(f"<p><b>dropped (absent from an input):</b> {esc(fmt(side['dropped_features']))}</p>")
        parts.append(goals_line(side))
        parts.append("<h4>Codebook usage per level</h4>" + codebook_usage(side))
        parts.append("<h4>Resolution (held-out objects)</h4>" + resolution(side))
        parts.append(btag_table(side))
        pngs = plots_for(run_dir / "tok" / "plots", obj)
        parts.append("<h4>Reconstruction plots</h4>" + (png_files(pngs, run_dir) if pngs else missing("no plots")))
        parts.append(f"<details><summary>settings</summary>{kv_table(side.get('settings') or {})}</details>")
    return "".join(parts)


def summary_tokenizers(sides: dict, order: list[str]) -> str:
    rows = []
    for obj in order:
        s, q = sides[obj].get("settings") or {}, sides[obj].get("quality") or {}
        goals = q.get("goals") if isinstance(q.get("goals"), dict) else {}
        codes = q.get("codes") if isinstance(q.get("codes"), list) else []
        rows.append([obj, s.get("levels", ""), s.get("codebook_size", ""), s.get("dim", ""),
                     s.get("n_train_objects", ""), q.get("n_objects", ""),
                     ", ".join(f"{fmt(c.get('used_fraction', ''))}" for c in codes if isinstance(c, dict)),
                     goals.get("pt_relative_resolution", "")])
    return table(["tokenizer", "levels", "codebook size", "dim", "training objects", "held-out objects",
                  "used fraction per level", "pT rel. resolution"], rows)


def plots_for(plot_dir: Path, obj: str) -> list[Path]:
    if (plot_dir / obj).is_dir():
        return sorted((plot_dir / obj).rglob("*.png"))
    return sorted(plot_dir.glob(f"{obj}_*.png")) + sorted(plot_dir.glob(f"{obj}.png"))


# --- pretraining ---------------------------------------------------------------------------------

def read_history(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {}
    for key in (rows[0].keys() if rows else []):
        try:
            cols[key] = np.array([float(r[key]) if r[key] not in ("", None) else np.nan for r in rows])
        except ValueError:
            continue
    return cols


def history_plot(hist: dict[str, np.ndarray], title: str) -> str:
    """Loss and accuracy columns of a history.csv against its step/epoch column (used only when
    the step made no plots of its own)."""
    import matplotlib.pyplot as plt

    if not hist:
        return ""
    xkey = next((k for k in ("step", "epoch", "iteration") if k in hist), None)
    x = hist[xkey] if xkey else np.arange(len(next(iter(hist.values()))))
    groups = {"loss": [k for k in hist if "loss" in k], "accuracy": [k for k in hist if k.endswith("acc")]}
    groups = {g: ks for g, ks in groups.items() if ks}
    if not groups:
        return ""
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    for ax, (g, ks) in zip(axes.flat, groups.items()):
        for k in ks:
            ok = np.isfinite(hist[k])
            ax.plot(x[ok], hist[k][ok], marker=".", label=k)
        ax.set_xlabel(xkey or "row")
        ax.set_ylabel(g)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig_tag(fig, title)


def masked_accuracy_table(metrics: dict) -> str:
    """Masked-token accuracy (and the most-frequent-code baseline) per split, per level and per type."""
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict) and "acc" in v}
    if not splits:
        acc = find_key(metrics, "masked_token_accuracy", "masked_accuracy", "val_masked_acc")
        return f"<p><b>masked-token accuracy:</b> {esc(fmt(acc))}</p>" if acc is not None else ""
    out = table(["split", "masked positions", "loss", "masked-token accuracy", "frequency baseline"],
                [[k, v.get("n_masked", ""), v.get("loss", ""), v.get("acc", ""), v.get("frequency_baseline_acc", "")]
                 for k, v in splits.items()])
    split = "val" if "val" in splits else next(iter(splits))
    per_type, per_level = (v if isinstance(v, dict) else {} for v in (splits[split].get("per_type"),
                                                                       splits[split].get("per_level")))
    if per_type:
        out += f"<p><b>{esc(split)}: per object type</b></p>" + table(
            ["type", "masked", "accuracy", "per level", "frequency baseline", "loss"],
            [[t, v.get("n", ""), v.get("acc", ""), v.get("acc_per_level", ""), v.get("frequency_baseline_acc", ""),
              v.get("loss", "")] for t, v in per_type.items() if isinstance(v, dict)])
    if per_level:
        out += f"<p><b>{esc(split)}: per quantizer level</b></p>" + table(
            ["level", "masked", "accuracy", "loss"],
            [[lv, v.get("n", ""), v.get("acc", ""), v.get("loss", "")] for lv, v in per_level.items()
             if isinstance(v, dict)])
    return out


def section_pretraining(run_dir: Path) -> str:
    d = run_dir / "pretrain"
    metrics = load_json(d / "metrics.json")
    if metrics is None and not (d / "history.csv").exists():
        return missing(f"no pretraining outputs under {d}: pretraining not shown")
    parts = []
    if isinstance(metrics, dict):
        n = metrics.get("n_events") if isinstance(metrics.get("n_events"), dict) else {}
        parts.append(f"<p>{esc(fmt(metrics.get('epochs', '?')))} epochs of {esc(fmt(metrics.get('steps_per_epoch', '?')))}"
                     f" steps; events: {esc(', '.join(f'{k} {fmt(v)}' for k, v in n.items()) or 'n/a')}; "
                     f"ranks: {esc(fmt(metrics.get('world_size', 1)))}</p>")
        parts.append(masked_accuracy_table(metrics))
    else:
        parts.append(missing("no pretrain/metrics.json"))
    backbone = load_json(d / "backbone.json")
    if isinstance(backbone, dict) and isinstance(backbone.get("config"), dict):
        parts.append("<details><summary>backbone configuration</summary>" + kv_table(backbone["config"]) + "</details>")
    pngs = sorted((d / "plots").rglob("*.png")) if (d / "plots").is_dir() else []
    if pngs:
        parts.append(png_files(pngs, run_dir))
    elif (d / "history.csv").exists():
        parts.append(history_plot(read_history(d / "history.csv"), "pretraining history"))
    return "".join(parts)


# --- the classifier ----------------------------------------------------------------------------------

def arms_of(metrics: dict) -> dict:
    """The classifier arms and baselines: {name: {auc, auc_ci95, rejection_at_X, ...}}."""
    arms = metrics.get("arms")
    if isinstance(arms, list):
        arms = {str(a.get("name", a.get("arm", i))): a for i, a in enumerate(arms) if isinstance(a, dict)}
    arms = dict(arms) if isinstance(arms, dict) else {}
    base = metrics.get("baselines")
    if isinstance(base, dict):
        arms.update({k: v for k, v in base.items() if k not in arms})
    return {k: v for k, v in arms.items() if isinstance(v, dict)}


def auc_text(arm: dict) -> str:
    """'0.912 [0.900, 0.924]' (95% interval) from the arm's auc and auc_ci95 (or auc_ci)."""
    auc = arm.get("auc")
    ci = next((arm[k] for k in ("auc_ci95", "auc_ci", "auc_interval") if k in arm), None)
    if not isinstance(auc, (int, float)):
        return fmt(auc) if auc is not None else ""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return f"{auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{auc:.3f}"


def seeds_text(arm: dict) -> str:
    seeds = arm.get("seeds") if isinstance(arm.get("seeds"), dict) else {}
    auc = seeds.get("auc") if isinstance(seeds.get("auc"), dict) else {}
    if seeds.get("n_seeds", 1) in (None, 1) or not auc:
        return str(seeds.get("n_seeds", ""))
    return f"{seeds['n_seeds']}: {auc.get('mean', float('nan')):.3f} ± {auc.get('std', float('nan')):.3f}"


def classifier_table(arms: dict) -> str:
    rej = sorted({k for a in arms.values() for k in a if k.startswith("rejection")}, key=lambda k: (len(k), k))
    rows = []
    for name, arm in sorted(arms.items(), key=lambda kv: -(kv[1].get("auc") or 0)):
        n = arm.get("n_test") if isinstance(arm.get("n_test"), dict) else {}
        rows.append([esc(name), esc(auc_text(arm))] + [esc(fmt(arm.get(k, ""))) for k in rej]
                    + [esc(f"{fmt(n.get('signal', ''))} / {fmt(n.get('background', ''))}"), seeds_text(arm),
                       esc(fmt(arm.get("train_seconds", "")))])
    header = ["arm / baseline", "AUC [95% interval]"] + [k.replace("rejection_at_", "bkg rejection at eff_S=0.") for k in rej]
    return table(header + ["test events S / B", "seeds: AUC mean ± std", "train s"], rows, raw=True)


def data_efficiency_table(eff: dict) -> str:
    """Rows: labelled fraction; columns: arms; cells: AUC [95% interval]."""
    points = {arm: {p.get("fraction"): p for p in pts if isinstance(p, dict)} for arm, pts in eff.items()
              if isinstance(pts, list)}
    fractions = sorted({f for pts in points.values() for f in pts if f is not None})
    if not fractions:
        return render(eff)
    rows = []
    for f in fractions:
        n = next((pts[f].get("n_labelled") for pts in points.values() if f in pts), "")
        rows.append([fmt(f), fmt(n)] + [auc_text(points[a][f]) if f in points[a] else "" for a in points])
    return table(["labelled fraction", "labelled events"] + [f"AUC {a}" for a in points], rows)


def section_classifier(run_dir: Path) -> str:
    """One block per step4 output folder: finetune/ (the main task), finetune_*/ (protocols run apart)."""
    dirs = [run_dir / "finetune"] + sorted(p for p in run_dir.glob("finetune_*") if p.is_dir())
    if len(dirs) == 1:
        return classifier_block(run_dir, dirs[0])
    return "".join(f"<h3>{esc(d.name)}/</h3>" + classifier_block(run_dir, d) for d in dirs)


def classifier_block(run_dir: Path, d: Path) -> str:
    metrics = load_json(d / "metrics.json")
    if not isinstance(metrics, dict):
        return missing(f"no readable {d / 'metrics.json'}: classifier not shown")
    parts = []
    task = metrics.get("task") if isinstance(metrics.get("task"), dict) else {}
    if task:
        parts.append(f"<p><b>signal:</b> {esc(fmt(task.get('signal', '')))}; <b>background:</b> "
                     f"{esc(fmt(task.get('background', '')))}"
                     + (f"; <b>tested only:</b> {esc(fmt(task['test_background']))}" if task.get("test_background") else "")
                     + "</p>")
    arms = arms_of(metrics)
    parts.append(classifier_table(arms) if arms else missing(f"no arms found in {d.name}/metrics.json"))
    if isinstance(task.get("events"), dict):
        rows = [[split, proc, v.get("events", ""), v.get("sum_weights", "")] for split, procs in task["events"].items()
                if isinstance(procs, dict) for proc, v in procs.items() if isinstance(v, dict)]
        parts.append("<details><summary>events per split and process</summary>"
                     + table(["split", "process", "events", "sum of weights"], rows) + "</details>")
    eff = metrics.get("data_efficiency")
    if isinstance(eff, dict) and eff:
        parts.append("<h3>Data efficiency</h3>" + data_efficiency_table(eff))
    gen = metrics.get("generalisation")
    if isinstance(gen, dict) and isinstance(gen.get("arms"), dict) and gen["arms"]:
        rows = [[arm, proc, auc_text(v), fmt(v.get("rejection_at_50", ""))] for arm, procs in gen["arms"].items()
                if isinstance(procs, dict) for proc, v in procs.items() if isinstance(v, dict)]
        parts.append(f"<h3>Generalisation</h3><p>trained on {esc(fmt(gen.get('trained_on', '')))}, tested on "
                     f"{esc(fmt(gen.get('tested_on', '')))}</p>" + table(["arm", "background", "AUC", "rejection_at_50"], rows))
    pngs = sorted((d / "plots").rglob("*.png")) if (d / "plots").is_dir() else []
    parts.append(png_files(pngs, run_dir) if pngs else missing(f"no ROC / data-efficiency plots under {d.name}/plots"))
    return "".join(parts)


# --- settings and code version ---------------------------------------------------------------------

def parquet_provenance(run_dir: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    from common.token_parquet import PROVENANCE_KEY

    out = []
    for path in sorted((run_dir / "tokens").glob("*.parquet")):
        try:
            meta = pq.read_schema(path).metadata or {}
            out.append((str(path.relative_to(run_dir)), json.loads(meta.get(PROVENANCE_KEY, b"{}"))))
        except (OSError, ValueError) as exc:
            out.append((str(path.relative_to(run_dir)), {"error": str(exc).splitlines()[0]}))
    return out


def json_provenance(run_dir: Path, sample_dir: Path | None) -> list[tuple[str, dict]]:
    """Every JSON a step wrote that carries a provenance block (or is one)."""
    paths = sorted(run_dir.rglob("*.json"))
    if sample_dir is not None and sample_dir.is_dir():
        paths += sorted(sample_dir.glob("*.json"))
    out = []
    for p in paths:
        d = load_json(p)
        if not isinstance(d, dict):
            continue
        prov = d.get("provenance") if isinstance(d.get("provenance"), dict) else (d if "git_hash" in d else None)
        if prov is not None:
            out.append((str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p), prov))
    return out


def section_provenance(run_dir: Path, sample_dir: Path | None, h5s: list[dict],
                       generated: list[tuple[Path, dict]]) -> str:
    entries = [(str(path), m["provenance"]) for path, m in generated if isinstance(m.get("provenance"), dict)]
    entries += [(str(s["path"].relative_to(run_dir)), s["meta"]["provenance"] if isinstance(
        s["meta"].get("provenance"), dict) else {"script": "step1_convert.py", "git_hash": s["meta"].get("git_hash", "")})
        for s in h5s]
    entries += json_provenance(run_dir, sample_dir) + parquet_provenance(run_dir)
    if not entries:
        return missing("no provenance recorded by any step")
    groups: dict[str, list] = {}  # outputs made by one command share script, settings and code version
    for name, p in entries:
        key = json.dumps([p.get("script"), p.get("git_hash"), p.get("settings")], sort_keys=True, default=str)
        groups.setdefault(key, [[], p])[0].append(name)
    rows, details = [], []
    for names, p in groups.values():
        settings = p.get("settings") if isinstance(p.get("settings"), dict) else {}
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        rows.append([p.get("script", ""), shown, p.get("git_hash", ""), len(p.get("inputs", []) or []),
                     settings.get("seed", "")])
        details.append(f"<details><summary>{esc(p.get('script', ''))}: {esc(shown)}</summary>"
                       f"{kv_table(settings or p)}</details>")
    return table(["script", "outputs", "code version", "# inputs", "seed"], rows) + "".join(details)


# --- the page ----------------------------------------------------------------------------------

SECTIONS = (("sample", "The sample"), ("conversion", "The conversion (step1)"), ("tokenizers", "Tokenizers (step2)"),
            ("pretraining", "Pretraining (step3)"), ("classifier", "Classifier (step4)"),
            ("provenance", "Settings and code version"))


def guarded(build, title: str) -> str:
    """A section's HTML; a step output of a shape this report does not know costs that section
    one line, not the page (TOKEVENT_DEBUG=1 shows the traceback)."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - any surprise in one step's files must not lose the report
        if os.environ.get("TOKEVENT_DEBUG"):
            traceback.print_exc()
        print(f"warning: report section '{title}': {type(exc).__name__}: {exc}", file=sys.stderr)
        return missing(f"this section could not be built from the step outputs ({type(exc).__name__}: {exc})")


def build_report(run_dir: Path, sample_dir: Path | None, args=None) -> str:
    h5s, errors = read_h5_summaries(run_dir)
    generated = generator_metadata(sample_dir)
    bodies = {
        "sample": lambda: section_sample(run_dir, sample_dir, h5s, errors, generated),
        "conversion": lambda: section_conversion(h5s),
        "tokenizers": lambda: section_tokenizers(run_dir),
        "pretraining": lambda: section_pretraining(run_dir),
        "classifier": lambda: section_classifier(run_dir),
        "provenance": lambda: section_provenance(run_dir, sample_dir, h5s, generated),
    }
    prov = provenance("plotting/report.py", args, [run_dir])
    nav = "".join(f'<a href="#{key}">{esc(title)}</a>' for key, title in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{guarded(bodies[key], title)}</section>'
                   for key, title in SECTIONS)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Run report: {esc(run_dir.name)}</title>'
            f"<style>{CSS}</style></head><body><h1>Run report: {esc(run_dir.name)}</h1>"
            f'<p class="note">run directory <code>{esc(run_dir)}</code>; built {stamp} by plotting/report.py, '
            f'code version <code>{esc(prov["git_hash"])}</code></p><nav>{nav}</nav>{body}'
            f'<script type="application/json" id="report-provenance">{esc(json.dumps(prov, default=str))}</script>'
            "</body></html>\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=RUN_DIR, help="a run folder (h5/, tok/, tokens/, pretrain/, finetune/)")
    parser.add_argument("--sample-dir", default=SAMPLE_DIR, help="step0's ROOT files (listed when present)")
    parser.add_argument("--out", default=OUT, help="the HTML page (default <run-dir>/report.html)")
    parser.add_argument("--seed", type=int, default=SEED, help="accepted for uniformity; the report is deterministic")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        die(f"{run_dir}: run directory does not exist", EXIT_USAGE)
    sample_dir = Path(args.sample_dir) if args.sample_dir else None
    out = Path(args.out) if args.out else run_dir / "report.html"

    import matplotlib

    matplotlib.use("Agg")
    page = build_report(run_dir, sample_dir, args)
    with atomic_output(out) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    print(f"report: {out} ({len(page) / 2**10:.0f} KiB)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
