"""Data against simulation of fitted tokenizers, from a step2 fit folder's data_mc.json
(step2_fit --data-mc, common/data_mc.py): per tokenizer and object type, every tokenized feature
and every quantizer level's code usage, data (points) against simulation (line), both normalised to
unit area, with the ratio data / simulation below and chi2/ndf in the title.

  python plotting/plot_data_mc.py runs/tok   -> runs/tok/plots/data_mc/<tokenizer>[.<object>]_features.png, _codes.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from plotting.figures import plt, save_figure  # noqa: E402  (sets the headless backend first)

DISCRETE = ("flag", "category")
RATIO_RANGE = (0.5, 1.5)


def panels(n: int, title: str, cols: int = 4):
    """A figure of n (main, ratio) axis pairs, each ratio panel close below its main panel, sharing x."""
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    height = 3.6 * rows + 1.2  # inches: the panels, 0.8 above for the title, 0.4 below for the labels
    fig = plt.figure(figsize=(4 * cols, height))
    outer = fig.add_gridspec(rows, cols, hspace=0.4, wspace=0.35, left=0.07, right=0.98, bottom=0.5 / height,
                             top=1 - 0.8 / height)
    fig.suptitle(title, y=1 - 0.3 / height)
    pairs = []
    for i in range(n):
        inner = outer[divmod(i, cols)].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
        main = fig.add_subplot(inner[0])
        pairs.append((main, fig.add_subplot(inner[1], sharex=main)))
        main.tick_params(labelbottom=False)
    return fig, pairs


def chi2_text(h: dict) -> str:
    return f"chi2/ndf {h['chi2_ndf']:.2f} ({h['ndf']})" if h["chi2_ndf"] is not None else "chi2/ndf -"


def draw(main, ratio, x, width, h: dict, step: bool, order=slice(None)) -> None:
    """Unit-area data (points; Poisson errors x the square root of the design effect, common/data_mc.py)
    against simulation (a line), and data / simulation."""
    data, mc = np.asarray(h["data"], np.float64)[order], np.asarray(h["mc"], np.float64)[order]
    d, m = data / max(data.sum(), 1) / width, mc / max(mc.sum(), 1) / width
    scale = np.sqrt(h["design_effect"] or 1.0)
    d_err = scale * np.sqrt(data) / max(data.sum(), 1) / width
    if step:
        main.stairs(m, np.append(x - width / 2, x[-1] + width[-1] / 2), color="tab:blue", label="simulation")
    else:
        main.plot(x, m, color="tab:blue", drawstyle="steps-mid", lw=1.2, zorder=3, label="simulation")
    main.errorbar(x, d, d_err, fmt="o", ms=2.5, color="k", elinewidth=0.8, alpha=0.7, label="data")
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m > 0, d / m, np.nan)
        r_err = scale * r * np.sqrt(1 / np.maximum(data, 1) + 1 / np.maximum(mc, 1))
    ratio.errorbar(x, r, r_err, fmt="o", ms=2, color="k", elinewidth=0.7)
    ratio.axhline(1, color="tab:blue", lw=0.8)
    ratio.set_ylim(*RATIO_RANGE)
    ratio.set_yticks([0.75, 1.0, 1.25])
    ratio.set_ylabel("data / sim.", fontsize=7)


def plot_features(c: dict, path: Path) -> Path:
    feats = c["features"]
    fig, pairs = panels(len(feats), f"{c['tokenizer']}, {c['object']}: data ({c['n_data']:,}) against simulation "
                                    f"({c['n_mc']:,}), held-out objects, unit area")
    for (main, ratio), h in zip(pairs, feats):
        name = h["name"]
        edges = np.asarray(h["edges"])
        if h["kind"] in DISCRETE:  # one bin per value, shown side by side
            x, width = np.arange(len(edges) - 1, dtype=np.float64), np.ones(len(edges) - 1)
            ratio.set_xticks(x, [f"{v:g}" for v in (edges[:-1] + edges[1:]) / 2], fontsize=7)
        else:
            x, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
            if len(edges) > 4:  # the outer bins hold the tails (up to the extremes): show the bulk and a bin more
                pad = np.median(width)
                main.set_xlim(max(edges[0], edges[1] - pad), min(edges[-1], edges[-2] + pad))
        draw(main, ratio, x, width, h, step=True)
        main.set_title(f"{name}: {chi2_text(h)}", fontsize=8)
        main.set_ylabel("fraction / bin width" if h["kind"] not in DISCRETE else "fraction", fontsize=7)
        ratio.set_xlabel(name, fontsize=8)
    pairs[0][0].legend(fontsize=7)
    return save_figure(fig, path, dpi=90, tight=False)


def plot_codes(c: dict, path: Path) -> Path:
    """Per level: the codes ranked by their frequency in simulation."""
    fig, pairs = panels(len(c["levels"]), f"{c['tokenizer']}, {c['object']}: code usage per level, data against "
                                          "simulation (held-out)")
    for (main, ratio), lv in zip(pairs, c["levels"]):
        order = np.argsort(-np.asarray(lv["mc"]), kind="stable")
        x = np.arange(len(order), dtype=np.float64)
        draw(main, ratio, x, np.ones(len(x)), lv, step=False, order=order)
        main.set_yscale("log")
        main.set_title(f"q{lv['level']}: {chi2_text(lv)}", fontsize=8)
        main.set_ylabel("fraction of objects", fontsize=7)
        ratio.set_xlabel("code, by frequency in simulation", fontsize=8)
    pairs[0][0].legend(fontsize=7)
    return save_figure(fig, path, dpi=90, tight=False)


def plot_data_mc(tok_dir: str | Path) -> Path:
    tok_dir = Path(tok_dir)
    result = json.loads((tok_dir / "data_mc.json").read_text())
    out = tok_dir / "plots" / "data_mc"
    for c in result["comparisons"]:
        own = c["tokenizer"].split(".")[0] == c["object"]  # '<obj>' or '<obj>.<group>'; else the combined one
        label = c["tokenizer"] if own else f"{c['tokenizer']}.{c['object']}"
        plot_features(c, out / f"{label}_features.png")
        plot_codes(c, out / f"{label}_codes.png")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tok_dir")
    args = p.parse_args(argv)
    if not (Path(args.tok_dir) / "data_mc.json").exists():
        print(f"error: {args.tok_dir}: no data_mc.json (step2_fit --data-mc writes it)", file=sys.stderr)
        return 2
    print(f"[plot] {plot_data_mc(args.tok_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
