"""One self-contained HTML page per run: the sample, the conversion, the tokenizers, pretraining,
the classifier, and the settings and code version of every step.

    python plotting/report.py --run-dir runs/default --sample-dir data/raw --out runs/default/report.html

It reads what the steps write, under the keys they write them (docs/DESIGN.md): HDF5 /metadata
and the n datasets, step0's generator metadata tree, the tokenizer sidecars, the metrics.json of
steps 3 and 4, the Parquet provenance, and the steps' PNG plots. PNGs are embedded as base64
data URIs and the CSS is inline, so the page has no external resource. A section whose step has
not run says so in one line; a section that cannot be built from what it finds (a corrupt file,
a step output of another version) says so in one line, and the rest of the page still renders.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from common import h5io  # noqa: E402
from common.classifier_metrics import WORKING_POINTS  # noqa: E402
from common.runtime import EXIT_OK, EXIT_USAGE, InputError, atomic_output, die, first_line, provenance  # noqa: E402
from common.schema import LIST_OBJECTS, TOKENIZED_OBJECTS  # noqa: E402
from common.decoded_closure import QUANTITIES  # noqa: E402
from common.tokenizer_quality import WORST_BIN_MIN_OBJECTS  # noqa: E402

RUN_DIR = "runs/default"
SAMPLE_DIR = "data/raw"
OUT = ""  # default: <run-dir>/report.html
SEED = 0  # the report is deterministic; --seed is accepted like every step's
MAX_MULTIPLICITY = 12  # last bin of the multiplicity plot holds this many objects or more
CHUNK_EVENTS = 65536  # HDF5 rows read at once when counting objects
MAX_TABLE_ROWS = 60  # longer tables are cut (and say so)
MAX_PLOTS_PER_DIR = 40
REJECTIONS = tuple(f"rejection_at_{int(e * 100)}" for e in WORKING_POINTS)  # step4's keys

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


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts -> {'a.b.c': value}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def kv_table(d: dict) -> str:
    flat = flatten(d)
    return table(["key", "value"], [[k, v] for k, v in flat.items()]) if flat else missing("(empty)")


def png_tag(data: bytes, caption: str = "") -> str:
    b64 = base64.b64encode(data).decode()
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}">{cap}</figure>'


FIRST_PLOTS = ("roc", "confusion", "class_roc", "data_efficiency", "training_curves", "reco_vs_original", "pt_correlation_resolution")


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
    """The parsed JSON, or None when the file is absent (that step has not run). A file that is
    not JSON raises: its section then reports it (guarded)."""
    return json.loads(path.read_text()) if path.exists() else None


def plots_in(d: Path) -> list[Path]:
    return sorted(d.rglob("*.png")) if d.is_dir() else []


# --- the sample (HDF5 /metadata and the n datasets, step0's generator metadata) ----------------------

def read_h5_summaries(run_dir: Path) -> tuple[list[dict], list[str]]:
    """Per step1 HDF5 file: its /metadata and its object multiplicity histograms (counted in
    chunks); one line per file that cannot be read."""
    out, errors = [], []
    for path in sorted((run_dir / "h5").glob("*.h5")):
        try:
            meta = h5io.read_metadata(path)
            counts = {}
            for obj in LIST_OBJECTS:
                key = f"common/{obj}/n"
                hist = np.zeros(MAX_MULTIPLICITY + 1, dtype=np.int64)
                for _, chunk in h5io.iter_chunks(path, [key], step=CHUNK_EVENTS):
                    hist += np.bincount(np.minimum(chunk[key], MAX_MULTIPLICITY), minlength=MAX_MULTIPLICITY + 1)
                counts[obj] = hist
            out.append({"path": path, "meta": meta, "counts": counts})
        except (OSError, ValueError, KeyError) as exc:
            errors.append(f"{path.name}: {first_line(exc)}")
    return out, errors


def process_roles(run_dir: Path) -> dict[str, str]:
    """process -> what this run's classifiers use it as (signal, background, a multi-class class); a process
    that none uses was read by the pretraining alone. Unreadable step4 outputs give no roles (the classifier
    section reports them)."""
    def task(name: str) -> dict:
        try:
            return (load_json(run_dir / name / "metrics.json") or {}).get("task", {})
        except ValueError:
            return {}

    roles = {}
    for role in ("signal", "background"):
        roles.update({p: role for p in task("finetune").get(role, [])})
    for name, members in task("finetune_multiclass").get("classes", {}).items():
        for p in members:
            roles[p] = f"{roles[p]}, class {name}" if p in roles else f"class {name}"
    return roles


def section_sample(run_dir: Path, sample_dir: Path | None, h5s: list[dict], errors: list[str],
                   generated: list[tuple[Path, dict]]) -> str:
    parts = []
    if not h5s:
        parts.append(missing(f"no step1 HDF5 files under {run_dir / 'h5'}: sample not shown"))
    else:
        rows, roles = [], process_roles(run_dir)
        for s in h5s:
            m = s["meta"]
            xs = m["cross_section_pb"]
            rows.append([m["process"], roles.get(m["process"], "pretraining only"), str(m["dsid"]), m["experiment"],
                         m["n_events"], xs if math.isfinite(xs) else "n/a", m["sum_weights"], s["path"].name])
        parts.append('<p class="note">Every process is pretrained on (its train and validation events); the role '
                     "says what the classifiers of this run read it as.</p>")
        parts.append(table(["process", "role", "dsid", "experiment", "events", "cross-section [pb]", "sum of weights",
                            "file"], rows))
        parts.append("<h3>Object multiplicities</h3>")
        parts.append('<p class="note">Mean number of stored objects per event (after the step1 pT cuts), '
                     "and the fraction of events with at least one.</p>")
        rows = []
        for s in h5s:
            row = [s["meta"]["process"]]
            for obj in LIST_OBJECTS:
                h = s["counts"][obj]  # capped at MAX_MULTIPLICITY
                row.append(f"{(np.arange(len(h)) * h).sum() / h.sum():.2f} ({1 - h[0] / h.sum():.0%})" if h.sum() else "n/a")
            rows.append(row)
        parts.append(table(["process"] + list(LIST_OBJECTS), rows))
        parts.append(multiplicity_plot(h5s))
    if errors:
        parts.append(missing("unreadable HDF5 files: " + "; ".join(errors)))
    pngs = plots_in(run_dir / "plots" / "sample")
    if pngs:
        parts.append("<h3>Sample plots</h3>" + png_files(pngs, run_dir))
    parts.append(sample_files(sample_dir, generated))
    return "".join(parts)


def multiplicity_plot(h5s: list[dict]) -> str:
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(LIST_OBJECTS) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.0 * rows), squeeze=False)
    edges = np.arange(MAX_MULTIPLICITY + 2) - 0.5
    for ax, obj in zip(axes.flat, LIST_OBJECTS):
        for s in h5s:
            h = s["counts"][obj]
            if h.sum():
                ax.stairs(h / h.sum(), edges, label=str(s["meta"]["process"]))
        ax.set_xlabel(f"number of {obj} (last bin: {MAX_MULTIPLICITY} or more)")
        ax.set_ylabel("fraction of events")
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(LIST_OBJECTS):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return fig_tag(fig, "object multiplicity per process (normalised)")


def generator_metadata(sample_dir: Path | None) -> list[tuple[Path, dict]]:
    """(ROOT file, its generator metadata: {} for a file without that tree, {"error": ...} for one
    that cannot be read) for every ROOT file of the sample folder."""
    if sample_dir is None or not sample_dir.is_dir():
        return []
    from common.physlite import TREES, open_tree, read_generator_metadata

    out = []
    for path in sorted(sample_dir.glob("*.root")):
        try:
            _, _, f = open_tree(path, TREES)
            with f:
                out.append((path, read_generator_metadata(f)))
        except InputError as exc:
            out.append((path, {"error": str(exc)}))
    return out


def sample_files(sample_dir: Path | None, generated: list[tuple[Path, dict]]) -> str:
    if sample_dir is None:
        return ""
    if not generated:
        return missing(f"no generated ROOT files under {sample_dir}")
    rows = []
    for path, m in generated:
        if "process" in m:  # a step0 file
            rows.append([path.name, f"{path.stat().st_size / 2**20:.1f} MiB", m["process"], m["n_events"],
                         f"{fmt(m['cross_section_pb'])} ± {fmt(m['cross_section_error_pb'])}", m["description"]])
        else:
            rows.append([path.name, f"{path.stat().st_size / 2**20:.1f} MiB", "", "", "",
                         m.get("error", "no generator metadata (not a step0 file)")])
    return (f"<h3>Generated files ({esc(sample_dir)})</h3>"
            + table(["file", "size", "process", "events", "generator cross-section [pb]", "description"], rows))


# --- the conversion ----------------------------------------------------------------------------------

def same_in_all(h5s: list[dict], key: str):
    """A metadata value shared by every file, or a note that it differs."""
    values = {json.dumps(s["meta"][key], sort_keys=True, default=str) for s in h5s}
    return h5s[0]["meta"][key] if len(values) == 1 else "differs between files"


def section_conversion(h5s: list[dict]) -> str:
    if not h5s:
        return missing("no step1 HDF5 files: conversion not shown")
    parts = ['<p class="note">Non-kinematic variables absent from an input are NaN-filled (-1 for integers) '
             "and listed here.</p>"]
    rows = []
    for s in h5s:
        m = s["meta"]
        mf = m["missing_features"]
        rows.append([m["process"], Path(m["input_file"]).name, m["experiment"], len(mf), ", ".join(mf) or "none"])
    parts.append(table(["process", "input file", "experiment", "# missing", "missing features"], rows))
    parts.append(f"<p><b>MET definition:</b> {esc(same_in_all(h5s, 'met_definition'))}</p>")
    parts.append(object_settings_table(h5s))
    iso = {k: same_in_all(h5s, k) for k in ("common_iso_cone", "common_iso_pt_floor_gev", "common_iso_z0sintheta_cut_mm")}
    parts.append(f"<p><b>trk_iso03:</b> cone {esc(fmt(iso['common_iso_cone']))}, track pT &gt; "
                 f"{esc(fmt(iso['common_iso_pt_floor_gev']))} GeV, |z0 sin&theta;| &lt; "
                 f"{esc(fmt(iso['common_iso_z0sintheta_cut_mm']))} mm; format_version "
                 f"{esc(fmt(same_in_all(h5s, 'format_version')))}</p>")
    sources = same_in_all(h5s, "branch_sources")
    if isinstance(sources, dict):  # else: "differs between files"
        parts.append("<details><summary>where each variable was read (branch_sources)</summary>"
                     + table(["variable", "branch"], sorted(sources.items())) + "</details>")
    return "".join(parts)


def object_settings_table(h5s: list[dict]) -> str:
    """Per object: the pT cut, the number stored, and the objects dropped by that cap per process."""
    cuts, caps = same_in_all(h5s, "pt_cuts"), same_in_all(h5s, "max_objects")
    cuts, caps = (cuts if isinstance(cuts, dict) else {}), (caps if isinstance(caps, dict) else {})  # {}: they differ
    rows = [[obj, cuts.get(obj, "differs"), caps.get(obj, "differs")] + [s["meta"]["truncated_objects"][obj] for s in h5s]
            for obj in LIST_OBJECTS]
    return table(["object", "pT cut [GeV]", "max stored"] + [f"dropped by cap: {s['meta']['process']}" for s in h5s], rows)


# --- the tokenizers ----------------------------------------------------------------------------------

def tokenizer_sidecars(run_dir: Path) -> dict[str, dict]:
    """step2 fit's <obj>.json sidecars (per object type, or one `combined`): the JSONs beside a checkpoint."""
    return {path.stem: load_json(path) for path in sorted((run_dir / "tok").glob("*.json")) if path.with_suffix(".pt").exists()}


def codebook_usage(side: dict) -> str:
    """Per quantizer level: codes used of the codebook, dead codes, perplexity."""
    size = side["settings"]["codebook_size"]
    return table(["level", "codebook size", "used", "used fraction", "dead", "perplexity"],
                 [[c["level"], size, c["used"], c["used_fraction"], c["dead"], c["perplexity"]]
                  for c in side["quality"]["codes"]])


def resolution(side: dict) -> str:
    """One row per feature: bias and resolution of the decoded value (relative for pT, sumet and
    mass), or the exact-match rate of flags and categories, on held-out objects."""
    feats = side["quality"]["features"]
    rows = []
    for name, q in feats.items():
        rel = q.get("relative", {})  # pt, sumet and mass only
        rows.append([name, q["kind"], q.get("n", ""), q.get("bias", ""), q.get("resolution", ""),
                     rel.get("bias", ""), rel.get("resolution", ""), q.get("exact_match", "")])
    out = table(["feature", "kind", "objects", "bias", "resolution", "relative bias", "relative resolution",
                 "exact match"], rows)
    binned = feats.get("pt", {}).get("relative_binned")
    if binned:
        out += "<p><b>pT resolution in bins of true pT</b> (relative, reco/true - 1)</p>" + table(
            ["true pT [GeV]", "objects", "bias", "resolution"],
            [[f"{fmt(b['lo'])} - {fmt(b['hi'])}", b["n"], b["bias"], b["resolution"]] for b in binned])
    worst = feats.get("pt", {}).get("worst_bin")
    if worst:
        where = lambda b: f"{fmt(b['lo'])} - {fmt(b['hi'])} GeV, {fmt(b['n'])} objects"  # noqa: E731
        out += (f"<p><b>worst bins</b> (at least {WORST_BIN_MIN_OBJECTS} objects): resolution "
                f"{esc(fmt(worst['resolution']['resolution']))} ({esc(where(worst['resolution']))}), bias "
                f"{esc(fmt(worst['bias']['bias']))} ({esc(where(worst['bias']))})</p>")
    return out


def closure_section(run_dir: Path) -> str:
    """The decoded-physics closure of the tokenizers together (step2 fit's closure.json) and its plots."""
    c = load_json(run_dir / "tok" / "closure.json")
    if c is None:
        return missing(f"no {run_dir / 'tok' / 'closure.json'}: decoded-physics closure not shown")
    rows = [[name, ", ".join(q["objects"]), q["difference"], q.get("n", 0), q["n_original"], q["n_decoded"],
             q.get("bias", ""), q.get("resolution", "")] for name in QUANTITIES if (q := c["quantities"].get(name))]
    marks = "; ".join(f"{esc(k)}: {'pass' if v else 'FAIL'}" for k, v in c["goals"].items() if v is not None)
    pngs = plots_in(run_dir / "tok" / "plots" / "closure")
    return (f'<h3 id="tok-closure">Decoded-physics closure ({fmt(c["n_events"])} held-out events)</h3>'
            "<p>Each quantity from the original and from the decoded objects of the same event; bias = median and "
            "resolution = half the 16-84% interval of decoded/original - 1 (relative) or decoded - original (absolute), "
            "over the events where both define it.</p>"
            + (f"<p><b>goals:</b> {marks}</p>" if marks else "")
            + table(["quantity", "objects", "difference", "events (both)", "events (original)", "events (decoded)",
                     "bias", "resolution"], rows)
            + (png_files(pngs, run_dir) if pngs else ""))


def data_mc_section(run_dir: Path) -> str:
    """Data against simulation (step2 fit --data-mc: tok/data_mc.json) with its plots; nothing without it."""
    result = load_json(run_dir / "tok" / "data_mc.json")
    if result is None:
        return ""
    parts = ['<h3 id="tok-data-mc">Data against simulation (held-out objects)</h3>'
             "<p>Every tokenized feature (as stored, and as decoded) and every level's code usage, data against "
             "simulation, both normalised to unit area (common/data_mc.py). chi2/ndf is about 1 when both come from "
             "one distribution; the design effect corrects it for objects of one event that are not independent "
             f"(the tracks of an event share its vertex). {esc(result['definition'])}.</p>"]
    for c in result["comparisons"]:
        rows = [[r["quantity"], r["name"], r["kind"], r["chi2"], r["ndf"], r["chi2_ndf"], r["p_value"], r["design_effect"],
                 r["chi2_ndf_decoded"]] for r in result["rows"] if (r["tokenizer"], r["object"]) == (c["tokenizer"], c["object"])]
        parts.append(f"<h4>{esc(c['tokenizer'])}, {esc(c['object'])}: {fmt(c['n_data'])} data and {fmt(c['n_mc'])} "
                     "simulated objects</h4>" + table(["quantity", "feature or level", "kind", "chi2", "ndf", "chi2/ndf",
                                                      "p-value", "design effect", "chi2/ndf decoded"], rows))
    pngs = plots_in(run_dir / "tok" / "plots" / "data_mc")
    return "".join(parts) + (png_files(pngs, run_dir) if pngs else missing("no data/simulation plots"))


def goals_line(side: dict) -> str:
    marks = [f"{esc(k)}: {'pass' if v else 'FAIL'}" for k, v in side["quality"]["goals"]["pass"].items() if v is not None]
    return f"<p><b>goals:</b> {'; '.join(marks)}</p>" if marks else ""


def btag_table(side: dict) -> str:
    rows = [[tagger, w["pass_fraction_fit"], w["cut"], w["eff_before"], w["eff_after"], w["abs_diff"]]
            for tagger, wps in side["quality"]["btag_working_points"].items() for w in wps]
    if not rows:
        return ""
    return ("<h4>b-tagging working points (fixed cuts, before / after encode-decode)</h4>"
            + table(["tagger", "pass fraction", "cut", "pass before", "pass after", "|diff|"], rows))


def features_line(side: dict) -> str:
    """features_used: a list of names, or {object: names} for the combined tokenizer."""
    used = side["features_used"]
    text = "; ".join(f"{o}: {', '.join(n)}" for o, n in used.items()) if isinstance(used, dict) else ", ".join(used)
    out = f"<p><b>features:</b> {esc(text)}</p>"
    if side["dropped_features"]:
        out += f"<p><b>dropped (absent from an input):</b> {esc(fmt(side['dropped_features']))}</p>"
    return out


def section_tokenizers(run_dir: Path) -> str:
    sides = tokenizer_sidecars(run_dir)
    if not sides:
        return missing(f"no tokenizer sidecars under {run_dir / 'tok'}: tokenizers not shown")
    order = [o for o in (*TOKENIZED_OBJECTS, "combined") if o in sides] + \
            [o for o in sides if o not in TOKENIZED_OBJECTS and o != "combined"]
    parts = [summary_tokenizers(sides, order)]
    parts.append('<p class="note">' + " ".join(f'<a href="#tok-{esc(o)}">{esc(o)}</a>' for o in order)
                 + ' <a href="#tok-closure">closure</a>'
                 + (' <a href="#tok-data-mc">data against simulation</a>' if (run_dir / "tok" / "data_mc.json").exists() else "")
                 + "</p>")
    parts.append(closure_section(run_dir))
    parts.append(data_mc_section(run_dir))
    for obj in order:
        side = sides[obj]
        parts.append(f'<h3 id="tok-{esc(obj)}">{esc(obj)}</h3>')
        parts.append(features_line(side))
        parts.append(goals_line(side))
        parts.append("<h4>Codebook usage per level</h4>" + codebook_usage(side))
        parts.append("<h4>Resolution (held-out objects)</h4>" + resolution(side))
        parts.append(btag_table(side))
        pngs = plots_in(run_dir / "tok" / "plots" / obj)
        parts.append("<h4>Reconstruction plots</h4>" + (png_files(pngs, run_dir) if pngs else missing("no plots")))
        parts.append(f"<details><summary>settings</summary>{kv_table(side['settings'])}</details>")
    return "".join(parts)


def summary_tokenizers(sides: dict, order: list[str]) -> str:
    rows = []
    for obj in order:
        s, q = sides[obj]["settings"], sides[obj]["quality"]
        kind = s.get("quantizer", "vq") + (f' ({"x".join(map(str, s["fsq_levels"]))})' if "fsq_levels" in s else "")
        rows.append([obj, kind, s.get("encoder", "mlp"), s["levels"], s["codebook_size"], s["dim"], s["n_train_objects"],
                     q["n_objects"], ", ".join(fmt(c["used_fraction"]) for c in q["codes"]),
                     q["goals"]["pt_relative_resolution"], q["goals"].get("pt_worst_bin_resolution", ""),
                     q["goals"].get("pt_worst_bin_abs_bias", "")])
    return table(["tokenizer", "quantizer", "encoder", "levels", "codebook size", "dim", "training objects",
                  "held-out objects", "used fraction per level", "pT rel. resolution", "worst pT bin: resolution",
                  "worst pT bin: |bias|"], rows)


# --- tokenizer scan (step2_scan.py's scan/ folder) -------------------------------------------------

SCAN_COLUMNS = (("config", "configuration"), ("bits_per_object", "bits"), ("auc", "AUC (scratch)"),
                ("auc_minus_reference", "AUC - reference"), ("auc_verdict", "vs reference (paired 95%)"),
                ("pt_resolution", "pT rel. resolution"), ("pt_worst_bin_resolution", "worst pT bin"),
                ("min_used_fraction", "codes used (worst level)"), ("perplexity_L0", "perplexity L0"),
                ("fit_seconds", "fit [s]"), ("encode_objects_per_s", "encode [obj/s]"),
                ("data_mc_features_max_chi2_ndf", "data/sim. chi2/ndf: worst feature"),
                ("data_mc_codes_max_chi2_ndf", "data/sim. chi2/ndf: worst level"))


def section_scan(run_dir: Path) -> str:
    """Per object type, the scanned configurations ranked (downstream AUC, then pT resolution,
    then fewer bits), and the scan's plots."""
    import pandas as pd

    from common.tokenizer_scan import ranking

    d = run_dir / "scan"
    path = d / "scan.parquet"
    if not path.exists():
        return missing(f"no {path}: the scan has not finished a configuration")
    scan = pd.read_parquet(path)
    cols = [(c, h) for c, h in SCAN_COLUMNS if c in scan]
    parts = [f'<p class="note">{len(scan)} configuration(s) from <code>{esc(path)}</code>, ranked by the downstream '
             "AUC, then the held-out pT resolution, then fewer bits per object; the <code>reference</code> row of each "
             "object is its reference tokenizer, and a configuration is better or worse than it only where the paired "
             "interval of the AUC difference on the same test events excludes 0.</p>"]
    for obj in sorted(scan["object"].unique()):
        ranked = ranking(scan, obj)
        rows = [[i, *(r[c] for c, _ in cols)] for i, (_, r) in enumerate(ranked.iterrows(), 1)]
        parts.append(f"<h3>{esc(obj)}</h3>" + table(["rank", *(h for _, h in cols)], rows))
    pngs = plots_in(d / "plots")
    return "".join(parts) + ("<h4>Plots</h4>" + png_files(pngs, run_dir) if pngs else "")


# --- pretraining ---------------------------------------------------------------------------------

CONTEXT_GAIN_GOAL = {"gain": 0.2, "ratio": 3.0}  # regression 20% below, or ids 3x, the no-context baseline


def context_gain_table(metrics: dict) -> str:
    """Per object type, the first objective's validation context gain against its no-context baseline."""
    gain, first = metrics["context_gain"], metrics["objectives"][0]
    if not gain:
        return missing("no evaluation recorded (a finished run resumed)")
    if first == "tokens":
        rows = [[t, v["accuracy"], v["baseline_accuracy"], v["ratio"], pass_mark(v["ratio"] >= CONTEXT_GAIN_GOAL["ratio"])]
                for t, v in gain.items()]
        return table(["type", "masked-token accuracy", "most frequent code", "ratio", "goal: >= 3x"], rows)
    interval = lambda v: "[{:.3f}, {:.3f}]".format(*v["gain_ci95"]) if "gain_ci95" in v else "-"  # noqa: E731  (step3 before it)
    scored = lambda v: f"{v['n']} in {v['n_events']} events" if "n_events" in v else "-"  # noqa: E731  (step3 before it)
    rows = [[t, v["mse"], v["baseline_mse"], v["gain"], interval(v), scored(v),
             pass_mark(v["gain"] >= CONTEXT_GAIN_GOAL["gain"])] for t, v in gain.items()]
    return table(["type", "MSE (standardised)", "no-context MSE", "context gain 1 - MSE / no-context",
                  "95% interval (events resampled)", "masked predictions", "goal: >= 0.2"], rows)


def context_gain_by_process_table(metrics: dict) -> str:
    """Rows of processes, columns of object types: the per-type gain above is their mix."""
    by_process = metrics.get("context_gain_by_process")  # step3 before it, or a token objective: none
    if not by_process:
        return ""
    types = list(dict.fromkeys(o for v in by_process.values() for o in v))
    cell = lambda v: "{:.3f} [{:.3f}, {:.3f}] ({})".format(v["gain"], *v["gain_ci95"], v["n"]) if v else "-"  # noqa: E731
    rows = [[p] + [cell(v.get(o)) for o in types] for p, v in by_process.items()]
    return ("<p><b>Context gain per process</b> (validation; gain [95% interval] (masked predictions)): the gain "
            "per type above is their mix, so it moves with what the corpus holds as well as with what the model "
            "learns</p>" + table(["process"] + types, rows))


def pass_mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


ACCURACY_OBJECTIVES = ("tokens", "overlap")  # the objectives scored by an accuracy, the others by a context gain


def objective_tables(metrics: dict) -> str:
    """Loss per split; for the token objective the accuracy per level, for the overlap objective per object type."""
    splits = {k: metrics[k] for k in ("train", "val") if metrics[k]}
    objectives = metrics["objectives"]
    out = table(["split", "loss"] + [f"{o}: {'accuracy' if o in ACCURACY_OBJECTIVES else 'context gain'}" for o in objectives],
                [[k, v["loss"]] + [v[o]["acc" if o in ACCURACY_OBJECTIVES else "context_gain"] for o in objectives]
                 for k, v in splits.items()])
    if "tokens" in objectives and "val" in splits:
        levels = splits["val"]["tokens"]["per_level"]
        out += "<p><b>val: masked-token accuracy per quantizer level</b></p>" + table(
            ["level", "masked", "accuracy", "loss"], [[lv, v["n"], v["acc"], v["loss"]] for lv, v in levels.items()])
    if "overlap" in objectives and "val" in splits:
        per_type = splits["val"]["overlap"]["per_type"]
        out += ("<p><b>val: the overlap pointer per object type</b> (a masked object points at the visible objects "
                "within its Delta R, or at nothing; the null baseline always answers nothing)</p>" + table(
                    ["type", "masked", "with an overlapping visible object", "accuracy", "null baseline", "cross-entropy"],
                    [[t, v["n"], v["overlapped"], v["acc"], v["null_baseline_acc"], v["loss"]] for t, v in per_type.items()]))
    return out


def pretraining_plots(d: Path, run_dir: Path) -> str:
    """step3's plots; for a run made with --no-plots, the same plots drawn here from metrics.json."""
    pngs = plots_in(d / "plots")
    if pngs:
        return png_files(pngs, run_dir)
    from plotting.plot_training import plot_pretraining

    with tempfile.TemporaryDirectory() as tmp:
        return "".join(png_tag(p.read_bytes(), f"{p.name} (drawn by the report)")
                       for p in plot_pretraining(d / "metrics.json", tmp))


def section_pretraining(run_dir: Path) -> str:
    d = run_dir / "pretrain"
    metrics = load_json(d / "metrics.json")
    if metrics is None:
        return missing(f"no {d / 'metrics.json'}: pretraining not shown")
    n = metrics["n_events"]
    parts = [f"<p>objective {esc(' + '.join(metrics['objectives']))}; event representation "
             f"{esc(metrics['representation'])}; {esc(fmt(metrics['epochs']))} epochs of "
             f"{esc(fmt(metrics['steps_per_epoch']))} steps; events: train {esc(fmt(n['train']))}, val "
             f"{esc(fmt(n['val']))}; ranks: {esc(fmt(metrics['world_size']))}</p>",
             '<h3 id="context-gain">Context gain per object type (validation)</h3>', context_gain_table(metrics),
             context_gain_by_process_table(metrics), objective_tables(metrics)]
    backbone = load_json(d / "backbone.json")
    if backbone is not None:
        parts.append("<details><summary>backbone configuration</summary>" + kv_table(backbone["config"]) + "</details>")
    parts.append(pretraining_plots(d, run_dir))
    return "".join(parts)


# --- the classifier ----------------------------------------------------------------------------------

def auc_text(m: dict) -> str:
    """'0.912 [0.900, 0.924]': the AUC and its 95% bootstrap interval."""
    lo, hi = m["auc_ci95"]
    return f"{m['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def seeds_text(arm: dict) -> str:
    seeds = arm["seeds"]
    if seeds["n_seeds"] == 1:
        return "1"
    return f"{seeds['n_seeds']}: {seeds['auc']['mean']:.3f} ± {seeds['auc']['std']:.3f}"


def weighting_text(task: dict) -> str:
    """Which event weights every number of a step4 output uses (older outputs: events)."""
    w = task.get("weighting", "events")
    return (f"<p><b>weighting:</b> {esc(w)}: every AUC, rejection, accuracy and confusion matrix of this block is "
            f"computed with these event weights: {esc(task.get('weighting_definition', 'generator weights'))}. "
            f"Loss weights: {esc(task.get('loss_weights', '|generator weight|, classes balanced'))}.</p>")


def multiclass_table(arms: dict, weighting: str) -> str:
    """Per arm: macro AUC, accuracy and every class's one-vs-rest AUC, each with its interval."""
    rows, failed, names = [], [], []
    for name, arm in sorted(arms.items(), key=lambda kv: -kv[1].get("auc", -1)):
        if "error" in arm:
            failed.append([name, arm["error"]])
            continue
        names = arm["classes"]
        lo, hi = arm["accuracy_ci95"]
        rows.append([name, auc_text(arm), f"{arm['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"]
                    + [auc_text(arm["per_class"][c]) for c in names] + [seeds_text(arm), fmt(arm["train_seconds"])])
    header = ["arm / baseline", f"macro AUC ({weighting}) [95%]", f"accuracy ({weighting}) [95%]"]
    out = table(header + [f"AUC {c} vs rest" for c in names] + ["seeds: macro AUC mean ± std", "train s"], rows)
    return out + (table(["arm", "not computable"], failed) if failed else "")


def confusion_tables(arms: dict) -> str:
    """Each arm's confusion matrix normalised per true class, with the raw event counts."""
    parts = []
    for name, arm in arms.items():
        if "confusion" not in arm:
            continue
        c, names = arm["confusion"], arm["classes"]
        rows = [[t] + [f"{v:.3f} ({n})" for v, n in zip(c["normalised"][i], c["counts"][i])] for i, t in enumerate(names)]
        parts.append(f"<details><summary>{esc(name)}: confusion matrix (rows: true class, normalised; "
                     f"raw test events in brackets)</summary>" + table(["true \\ predicted"] + names, rows) + "</details>")
    return "".join(parts)


def classifier_table(arms: dict, weighting: str = "events") -> str:
    rows, failed = [], []
    for name, arm in sorted(arms.items(), key=lambda kv: -kv[1].get("auc", -1)):
        if "error" in arm:
            failed.append([name, arm["error"]])
            continue
        n = arm["n_test"]
        rows.append([name, auc_text(arm)] + [fmt(arm[k]) for k in REJECTIONS]
                    + [f"{fmt(n['signal'])} / {fmt(n['background'])}", seeds_text(arm), fmt(arm["train_seconds"])])
    header = ["arm / baseline", f"AUC ({weighting}) [95% interval], first seed"] + [
        k.replace("rejection_at_", "bkg rejection at eff_S=0.") for k in REJECTIONS]
    out = table(header + ["test events S / B", "seeds: AUC mean ± std", "train s"], rows)
    return out + (table(["arm", "not computable"], failed) if failed else "")


def efficiency_cell(point: dict) -> str:
    if "error" in point:
        return "not computable"
    n = len([s for s in point["per_seed"] if "auc" in s])
    return f"{point['auc']:.3f} ± {point['auc_std']:.3f} ({n} seed{'s' * (n > 1)})"


def data_efficiency_table(eff: dict) -> str:
    """Rows: labelled fraction; columns: arms; cells: mean AUC ± spread over seeds."""
    points = {arm: {p["fraction"]: p for p in pts} for arm, pts in eff.items()}
    fractions = sorted({f for pts in points.values() for f in pts})
    rows = []
    for f in fractions:
        n = next(pts[f]["n_labelled"] for pts in points.values() if f in pts)
        rows.append([fmt(f), fmt(n)] + [efficiency_cell(points[a][f]) if f in points[a] else "" for a in points])
    return table(["labelled fraction", "labelled events"] + [f"AUC {a}" for a in points], rows)


def verdict_table(verdicts: dict) -> str:
    """Per label fraction: the paired test-set difference of two arms' AUCs, with its interval."""
    rows = [[f, pair.replace("_minus_", " - "), v["delta_auc"], f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
             len(v["seeds"]), v["verdict"]] for f, pairs in sorted(verdicts.items(), key=lambda kv: float(kv[0]))
            for pair, v in pairs.items()]
    return table(["labelled fraction", "arms", "delta AUC (mean of seeds; macro AUC for classes)",
                  "95% interval (test events)", "seeds", "verdict"], rows)


def generalisation_table(gen: dict) -> str:
    rows = []
    for arm, procs in gen["arms"].items():
        for proc, v in procs.items():
            if "error" in v:
                rows.append([arm, proc, v["error"], "", ""])
            else:
                rows.append([arm, proc, auc_text(v), fmt(v["auc_mean"]), fmt(v["rejection_at_50"])])
    return table(["arm", "background", "AUC [95% interval], first seed", "AUC mean of seeds", "rejection_at_50"], rows)


def section_classifier(run_dir: Path) -> str:
    """One block per step4 output folder: finetune/ (the main task), finetune_*/ (protocols run apart)."""
    dirs = [run_dir / "finetune"] + sorted(p for p in run_dir.glob("finetune_*") if p.is_dir())
    if len(dirs) == 1:
        return classifier_block(run_dir, dirs[0])
    return "".join(f"<h3>{esc(d.name)}/</h3>" + classifier_block(run_dir, d) for d in dirs)


def classifier_block(run_dir: Path, d: Path) -> str:
    metrics = load_json(d / "metrics.json")
    if metrics is None:
        return missing(f"no {d / 'metrics.json'}: classifier not shown")
    task = metrics["task"]
    weighting = task.get("weighting", "events")
    if "classes" in task:  # multi-class
        what = "; ".join(f"<b>{esc(c)}:</b> {esc(fmt(p))}" for c, p in task["classes"].items())
        tables = [multiclass_table(metrics["arms"], weighting), confusion_tables(metrics["arms"])]
    else:
        what = (f"<b>signal:</b> {esc(fmt(task['signal']))}; <b>background:</b> {esc(fmt(task['background']))}"
                + (f"; <b>tested only:</b> {esc(fmt(task['test_background']))}" if task["test_background"] else ""))
        tables = [classifier_table(metrics["arms"], weighting)]
    parts = [f"<p>{what}; <b>seeds:</b> {esc(fmt(task['seeds']))}; <b>event representation:</b> {esc(task['pooling'])}; "
             f"<b>model selection:</b> {esc(task['model_selection'])}</p>", weighting_text(task), *tables]
    rows = [[split, proc, v["events"], v["sum_weights"]] for split, procs in task["events"].items() for proc, v in procs.items()]
    parts.append("<details><summary>events per split and process</summary>"
                 + table(["split", "process", "events", "sum of weights"], rows) + "</details>")
    if any(len(pts) > 1 for pts in metrics["data_efficiency"].values()):
        parts.append(f'<h3 id="{d.name}-efficiency">Data efficiency</h3>' + data_efficiency_table(metrics["data_efficiency"]))
        parts.append("<p><b>Does pretraining pay off?</b> Paired differences on the same test events "
                     "(&quot;better&quot; only when the whole interval is above zero)</p>"
                     + verdict_table(metrics["pretraining_verdict"]))
    gen = metrics["generalisation"]
    if gen.get("arms"):
        parts.append(f'<h3 id="{d.name}-generalisation">Generalisation</h3><p>trained on {esc(fmt(gen["trained_on"]))}, '
                     f"tested on {esc(fmt(gen['tested_on']))} ({esc(weighting)}-weighted)</p>" + generalisation_table(gen))
    pngs = plots_in(d / "plots")
    parts.append(png_files(pngs, run_dir) if pngs else missing(f"no ROC / data-efficiency plots under {d.name}/plots"))
    return "".join(parts)


# --- model variants (run_all VARIANTS) -------------------------------------------------------------------

VARIANT_SUFFIX = {"flat": "", "group": "_group", "constituent": "_constituent", "group+constituent": "_group_constituent"}


def variant_dirs(run_dir: Path) -> dict[str, tuple[Path, Path]]:
    """{variant: (its step3 folder, its step4 folder)} of the variants this run has."""
    return {v: (run_dir / f"pretrain{sfx}", run_dir / f"finetune{sfx}") for v, sfx in VARIANT_SUFFIX.items()
            if (run_dir / f"finetune{sfx}" / "metrics.json").exists()}


def section_variants(run_dir: Path) -> str:
    """The variants side by side: test AUC per label fraction (mean ± spread of seeds, first seed's interval),
    pretraining seconds per epoch, seconds per fine-tuning, and how much the constituents are used."""
    rows, fractions = [], set()
    found = {v: (load_json(pre / "metrics.json"), load_json(ft / "metrics.json")) for v, (pre, ft) in variant_dirs(run_dir).items()}
    for _, ft in found.values():
        fractions |= {p["fraction"] for pts in ft["data_efficiency"].values() for p in pts}
    fractions = sorted(fractions)
    for v, (pre, ft) in found.items():
        epoch_s = np.mean([h["seconds"] for h in pre["history"]]) if pre and pre.get("history") else None
        for arm in ("finetune", "scratch"):
            if arm not in ft["data_efficiency"]:
                continue
            pts = {p["fraction"]: p for p in ft["data_efficiency"][arm]}
            cells = [f"{efficiency_cell(pts[f])} [{pts[f]['auc_ci95'][0]:.3f}, {pts[f]['auc_ci95'][1]:.3f}]"
                     if f in pts and "auc" in pts[f] else "" for f in fractions]
            per_seed = [m for m in ft["arms"].get(arm, {}).get("per_seed", []) if "train_seconds" in m]
            use = ft["arms"].get(arm, {}).get("constituents")
            rows.append([v, arm, *cells, fmt(epoch_s), fmt(np.mean([m["train_seconds"] for m in per_seed]) if per_seed else None),
                         f"gate {use['mean_gate']:.2f}, {use['fraction_without_constituents']:.0%} of jets without"
                         if use else ""])
    return ("<p>Each variant is pretrained on the same corpus and fine-tuned on the same task, test events and seeds "
            "(run_all <code>VARIANTS</code>); cells: test AUC mean ± spread over seeds [95% interval of the first seed]. "
            "A difference is only a difference outside the intervals.</p>"
            + table(["variant", "arm"] + [f"AUC at {fmt(f)} of the labels" for f in fractions]
                    + ["step3 s / epoch", "step4 s / training (100%)", "constituents (test)"], rows)
            + variant_curves({v: ft for v, (_, ft) in found.items()}))


def variant_curves(finetunes: dict[str, dict]) -> str:
    """The data-efficiency curves of every variant in one plot: a colour per variant, solid fine-tuned,
    dashed scratch; the band is the first seed's 95% interval, the points the seeds' mean."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (v, ft) in enumerate(finetunes.items()):
        for arm, style in (("finetune", "o-"), ("scratch", "s--")):
            pts = sorted((p for p in ft["data_efficiency"].get(arm, []) if "auc" in p), key=lambda p: p["n_labelled"])
            if not pts:
                continue
            n = [p["n_labelled"] for p in pts]
            ax.plot(n, [p["auc"] for p in pts], style, color=f"C{i}", label=f"{v} {arm}")
            ax.fill_between(n, [p["auc_ci95"][0] for p in pts], [p["auc_ci95"][1] for p in pts], color=f"C{i}", alpha=0.08)
    ax.set(xscale="log", xlabel="labelled training events", ylabel="test AUC (mean of seeds)", title="data efficiency per variant")
    ax.legend(fontsize=8)
    return fig_tag(fig, "data efficiency of every model variant (band: first seed's 95% interval)")


# --- the one-screen summary -------------------------------------------------------------------------

def section_summary(run_dir: Path) -> str:
    """What a physicist reads first: each arm's test AUC, the data-efficiency verdict, the context
    gain and the tokenizer goals, each linked to the section behind it."""
    parts = []
    ft = load_json(run_dir / "finetune" / "metrics.json")
    if ft is not None:
        arms = {a: v for a, v in ft["arms"].items() if "error" not in v}
        parts.append(f'<p><b>Test AUC, all labels</b> ({esc(ft["task"].get("weighting", "events"))}-weighted; first seed '
                     '[95% interval]; mean ± std over seeds) - '
                     '<a href="#classifier">details</a></p>'
                     + table(["arm", "AUC [95% interval]", "mean ± std"],
                             [[a, auc_text(v), seeds_text(v)] for a, v in sorted(arms.items(), key=lambda kv: -kv[1]["auc"])]))
        lines = []
        for f, pairs in sorted(ft["pretraining_verdict"].items(), key=lambda kv: float(kv[0])):
            v = pairs.get("finetune_minus_scratch")
            if v:
                n = next(p["n_labelled"] for p in ft["data_efficiency"]["finetune"] if str(p["fraction"]) == f)
                lines.append(f"<li>{esc(fmt(n))} labelled events ({esc(f)}): fine-tuned - scratch = {v['delta_auc']:+.3f} "
                             f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]: <b>{esc(v['verdict'])}</b></li>")
        if lines:
            parts.append('<p><b>Does pretraining pay off?</b> - <a href="#finetune-efficiency">data efficiency</a></p>'
                         f"<ul>{''.join(lines)}</ul>")
    mc = load_json(run_dir / "finetune_multiclass" / "metrics.json")
    if mc is not None:
        arms = {a: v for a, v in mc["arms"].items() if "error" not in v}
        parts.append(f'<p><b>Multi-class</b> ({esc(", ".join(mc["task"]["classes"]))}; '
                     f'{esc(mc["task"]["weighting"])}-weighted) - <a href="#classifier">details</a></p>'
                     + table(["arm", "macro AUC [95% interval]", "accuracy", "mean ± std"],
                             [[a, auc_text(v), fmt(v["accuracy"]), seeds_text(v)]
                              for a, v in sorted(arms.items(), key=lambda kv: -kv[1]["auc"])]))
    pre = load_json(run_dir / "pretrain" / "metrics.json")
    if pre is not None and pre["context_gain"]:
        key = "ratio" if pre["objectives"][0] == "tokens" else "gain"
        cells = ", ".join(f"{esc(t)} {v[key]:.2f}" for t, v in pre["context_gain"].items())
        ok = all(v[key] >= CONTEXT_GAIN_GOAL[key] for v in pre["context_gain"].values())
        parts.append(f'<p><b>Context gain</b> ({esc(pre["objectives"][0])}, validation; goal {CONTEXT_GAIN_GOAL[key]:g} '
                     f'for every type: {pass_mark(ok)}): {cells} - <a href="#context-gain">details</a></p>')
    sides = tokenizer_sidecars(run_dir)
    if sides:
        failing = [f"{o}: {k}" for o, side in sides.items() for k, v in side["quality"]["goals"]["pass"].items() if v is False]
        closure = load_json(run_dir / "tok" / "closure.json") or {"goals": {}}
        failing += [f"closure: {k}" for k, v in closure["goals"].items() if v is False]
        parts.append(f"<p><b>Tokenizer goals:</b> {len(sides)} tokenizers and their decoded-physics closure, "
                     + (f"failing: {esc('; '.join(failing))}" if failing else "all pass")
                     + ' - <a href="#tokenizers">details</a></p>')
    return "".join(parts) or missing("no step outputs to summarise yet")


# --- settings and code version ---------------------------------------------------------------------

def step_provenance(run_dir: Path, h5s: list[dict], generated: list[tuple[Path, dict]]) -> list[tuple[str, dict]]:
    """(output, its runtime.provenance) of everything the steps wrote: step0's ROOT files, step1's
    HDF5 /metadata, every JSON with a "provenance" block (tokenizers, pretraining, classifier), and
    step2 apply's Parquet files."""
    from common.token_parquet import read_provenance

    rel = lambda p: str(p.relative_to(run_dir)) if p.is_relative_to(run_dir) else str(p)  # noqa: E731
    out = [(rel(path), m["provenance"]) for path, m in generated if "provenance" in m]
    out += [(rel(s["path"]), s["meta"]["provenance"]) for s in h5s]
    for path in sorted(run_dir.rglob("*.json")):
        d = load_json(path)
        if isinstance(d, dict) and "provenance" in d:
            out.append((rel(path), d["provenance"]))
    out += [(rel(path), read_provenance(path)) for path in sorted((run_dir / "tokens").glob("*.parquet"))]
    return out


def section_provenance(run_dir: Path, h5s: list[dict], generated: list[tuple[Path, dict]]) -> str:
    entries = step_provenance(run_dir, h5s, generated)
    if not entries:
        return missing("no provenance recorded by any step")
    groups: dict[str, list] = {}  # outputs made by one command share script, settings and code version
    for name, p in entries:
        key = json.dumps([p["script"], p["git_hash"], p["settings"]], sort_keys=True, default=str)
        groups.setdefault(key, [[], p])[0].append(name)
    rows, details = [], []
    for names, p in groups.values():
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        rows.append([p["script"], shown, p["git_hash"], len(p["inputs"]), p["settings"]["seed"]])
        details.append(f"<details><summary>{esc(p['script'])}: {esc(shown)}</summary>{kv_table(p['settings'])}</details>")
    return table(["script", "outputs", "code version", "# inputs", "seed"], rows) + "".join(details)


# --- the page ----------------------------------------------------------------------------------

SECTIONS = (("summary", "Summary"), ("sample", "The sample"), ("conversion", "The conversion (step1)"), ("tokenizers", "Tokenizers (step2)"),
            ("pretraining", "Pretraining (step3)"), ("classifier", "Classifier (step4)"),
            ("provenance", "Settings and code version"))
SCAN_SECTION = ("scan", "Tokenizer scan (step2_scan)")  # shown when the run has a scan/ folder
VARIANTS_SECTION = ("variants", "Model variants: flat, group, constituent")  # shown when run_all ran VARIANTS


def guarded(build, title: str) -> str:
    """A section's HTML. The one safety net: a section that cannot be built from what it finds (a
    corrupt file, a step output of another version) costs that section one line, not the page
    (TOKEVENT_DEBUG=1 shows the traceback)."""
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
        "summary": lambda: section_summary(run_dir),
        "sample": lambda: section_sample(run_dir, sample_dir, h5s, errors, generated),
        "conversion": lambda: section_conversion(h5s),
        "tokenizers": lambda: section_tokenizers(run_dir),
        "pretraining": lambda: section_pretraining(run_dir),
        "classifier": lambda: section_classifier(run_dir),
        "provenance": lambda: section_provenance(run_dir, h5s, generated),
        "scan": lambda: section_scan(run_dir),
        "variants": lambda: section_variants(run_dir),
    }
    scan = (SCAN_SECTION,) if (run_dir / "scan").is_dir() else ()
    variants = (VARIANTS_SECTION,) if len(variant_dirs(run_dir)) > 1 else ()
    at = [k for k, _ in SECTIONS].index("tokenizers") + 1
    after = [k for k, _ in SECTIONS].index("classifier") + 1
    sections = SECTIONS[:at] + scan + SECTIONS[at:after] + variants + SECTIONS[after:]
    prov = provenance("plotting/report.py", args, [run_dir])
    nav = "".join(f'<a href="#{key}">{esc(title)}</a>' for key, title in sections)
    body = "".join(f'<section id="{key}"><h2>{esc(title)}</h2>{guarded(bodies[key], title)}</section>'
                   for key, title in sections)
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
