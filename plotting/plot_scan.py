"""Tokenizer scan plots, from step2_scan.py's table (<scan>/scan.parquet or scan.csv):

  each metric against bits per object (levels x log2 codebook size), one colour per object type,
  and the Pareto front of pT resolution against bits.

  python plotting/plot_scan.py runs/default/scan        -> runs/default/scan/plots/*.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.tokenizer_scan import pareto_front  # noqa: E402
from plotting.figures import plt, save_figure  # noqa: E402  (sets the headless backend first)

# metric column -> (axis label, log scale)
METRICS = {
    "pt_resolution": ("pT relative resolution (held-out)", True),
    "pt_worst_bin_resolution": ("worst pT bin resolution", True),
    "auc": ("downstream test AUC (scratch)", False),
    "auc_minus_reference": ("AUC - reference tokenizers' (paired, same test events)", False),
    "min_used_fraction": ("codes used, worst level (fraction)", False),
    "perplexity_L0": ("perplexity, level 0", True),
    "fit_seconds": ("fit wall time [s]", False),
    "encode_objects_per_s": ("encode speed [objects/s]", True),
    "apply_events_per_s": ("apply speed, whole event [events/s]", False),
    "data_mc_features_max_chi2_ndf": ("data against simulation: worst feature chi2/ndf", True),  # scan --data-mc
    "data_mc_codes_max_chi2_ndf": ("data against simulation: worst level chi2/ndf", True),
}


def load_table(scan_dir: Path) -> pd.DataFrame:
    parquet = scan_dir / "scan.parquet"
    return pd.read_parquet(parquet) if parquet.exists() else pd.read_csv(scan_dir / "scan.csv")


def metric_vs_bits(table: pd.DataFrame, metric: str, label: str, log: bool, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for obj, rows in table.groupby("object"):
        rows = rows.sort_values("bits_per_object")
        ax.plot(rows["bits_per_object"], rows[metric], "o", label=obj, alpha=0.8)
        colour = ax.lines[-1].get_color()
        if f"{metric}_ci_lo" in rows:  # the AUCs' 95% intervals
            ax.errorbar(rows["bits_per_object"], rows[metric], yerr=[rows[metric] - rows[f"{metric}_ci_lo"],
                        rows[f"{metric}_ci_hi"] - rows[metric]], fmt="none", alpha=0.4, color=colour)
        if "reference" in rows:  # the reference tokenizer of this object type
            ref = rows[rows["reference"] == True]  # noqa: E712  (NaN in the configurations' rows)
            ax.plot(ref["bits_per_object"], ref[metric], "*", ms=12, color=colour, mec="k", label=f"{obj}: reference")
    if metric == "auc_minus_reference":
        ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="bits per object (levels x log2 K)", ylabel=label, yscale="log" if log else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out / f"{metric}_vs_bits.png")


def pareto_plot(table: pd.DataFrame, out: Path) -> Path:
    """pT resolution against bits; the front (no configuration has fewer bits and better resolution)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for obj, rows in table.groupby("object"):
        x, y = rows["bits_per_object"].to_numpy(float), rows["pt_resolution"].to_numpy(float)
        front = pareto_front(x, y)
        pts = ax.plot(x, y, "o", alpha=0.35, label=f"{obj}")[0]
        order = np.argsort(x[front])
        ax.plot(x[front][order], y[front][order], "-o", color=pts.get_color(), label=f"{obj}: Pareto front")
        for name, xi, yi in zip(rows["config"][front], x[front], y[front]):
            ax.annotate(name.rsplit("-", 1)[0].split("-", 1)[-1], (xi, yi), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set(xlabel="bits per object (levels x log2 K)", ylabel="pT relative resolution (held-out)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "pareto_pt_resolution_vs_bits.png")


def plot_scan(table: pd.DataFrame, out: str | Path) -> list[Path]:
    out = Path(out)
    paths = [metric_vs_bits(table, m, label, log, out) for m, (label, log) in METRICS.items()
             if m in table and table[m].notna().any()]
    closure = [c for c in table if c.startswith("closure_") and c.endswith("resolution") and table[c].notna().any()]
    paths += [metric_vs_bits(table, c, c.replace("_", " "), False, out) for c in closure]
    if table["pt_resolution"].notna().any():
        paths.append(pareto_plot(table, out))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scan_dir", help="a step2_scan.py output folder (scan.parquet or scan.csv)")
    p.add_argument("--out", default=None, help="plot folder (default: <scan_dir>/plots)")
    args = p.parse_args(argv)
    d = Path(args.scan_dir)
    if not (d / "scan.parquet").exists() and not (d / "scan.csv").exists():
        print(f"error: {d}: no scan.parquet or scan.csv (run step2_scan.py)", file=sys.stderr)
        return 2
    for path in plot_scan(load_table(d), args.out or d / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
