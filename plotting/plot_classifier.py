"""Classifier diagnostics (step4): ROC curves of all arms, score distributions, training curves,
the data-efficiency curve and the generalisation table as a bar chart; for a multi-class task, the
confusion matrix and the one-vs-rest ROC of every class instead of the ROC and score plots. Every
title names the event weighting its numbers use.

  python plotting/plot_classifier.py runs/x/finetune/metrics.json --out-dir runs/x/finetune/plots
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


def weighting(m: dict) -> str:
    return f"{m['task'].get('weighting', 'events')}-weighted"


def auc_name(m: dict) -> str:
    return "macro AUC" if "classes" in m["task"] else "AUC"


def arm_grid(n: int):
    """One panel per arm, three to a row."""
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes.flat


def plot_confusion(m: dict, out: Path) -> Path | None:
    """Each arm's confusion matrix, normalised per true class (rows sum to 1)."""
    arms = {a: r for a, r in m["arms"].items() if "confusion" in r}
    if not arms:
        return None
    fig, axes = arm_grid(len(arms))
    for ax, (arm, r) in zip(axes, arms.items()):
        c, names = np.array(r["confusion"]["normalised"]), r["classes"]
        ax.imshow(c, vmin=0, vmax=1, cmap="Blues")
        for (i, j), v in np.ndenumerate(c):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v > 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set(xlabel="predicted class", ylabel="true class",
               title=f"{arm}: accuracy {r['accuracy']:.3f}\n({weighting(m)}, rows normalised)")
    return save_figure(fig, out / "confusion.png")


def plot_class_rocs(m: dict, out: Path) -> Path | None:
    """Each arm's one-vs-rest ROC curve of every class, with its AUC."""
    arms = {a: r for a, r in m["arms"].items() if "per_class" in r}
    if not arms:
        return None
    fig, axes = arm_grid(len(arms))
    for ax, (arm, r) in zip(axes, arms.items()):
        for name, c in r["per_class"].items():
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"{name} (AUC {c['auc']:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="efficiency of the other classes", ylabel="efficiency of the class")
        ax.set_title(f"{arm}: macro AUC {r['auc']:.3f}\n({weighting(m)}, one vs the rest)", fontsize=10)
        ax.legend(fontsize=7)
    return save_figure(fig, out / "class_roc.png")


def plot_roc(m: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 5))
    for arm, r in m["arms"].items():
        if "roc" not in r:  # an arm that could not be computed
            continue
        tpr, fpr = np.array(r["roc"]["tpr"]), np.array(r["roc"]["fpr"])
        keep = fpr > 0
        ax.plot(tpr[keep], 1 / fpr[keep], label=f"{arm} (AUC {r['auc']:.3f})")
    ax.set(xlabel="signal efficiency", ylabel="background rejection 1/eff_bkg", yscale="log", xlim=(0, 1),
           title=f"{'+'.join(m['task']['signal'])} vs {'+'.join(m['task']['background'])} (test split, {weighting(m)})")
    ax.legend(fontsize=8)
    return save_figure(fig, out / "roc.png")


def plot_scores(m: dict, scores_path: Path, out: Path) -> Path | None:
    if not scores_path.exists():
        return None
    s = np.load(scores_path, allow_pickle=False)
    arms = [k[len("score_"):] for k in s.files if k.startswith("score_")]
    sig = np.isin(s["process"], m["task"]["signal"])
    bkg = np.isin(s["process"], m["task"]["background"])
    cols = min(3, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, arm in zip(axes.flat, arms):
        for sel, label in ((sig, "signal"), (bkg, "background")):
            ax.hist(s[f"score_{arm}"][sel], bins, weights=np.abs(s["weight"][sel]), density=True, histtype="step", label=label)
        ax.set(title=f"{arm} (|generator weight|)", xlabel="classifier score", yscale="log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    return save_figure(fig, out / "score_distributions.png")


def plot_training(m: dict, out: Path) -> Path | None:
    nets = {a: h for a, h in m["training"].items() if h and "step" in h[0]}
    if not nets:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, h in nets.items():
        a.plot([r["step"] for r in h], [r["train_loss"] for r in h], "o-", label=arm)
        b.plot([r["step"] for r in h], [r["val_auc"] for r in h], "o-", label=arm)
    a.set(xlabel="optimiser step", ylabel="weighted training loss")
    b.set(xlabel="optimiser step", ylabel=f"validation {auc_name(m)} ({weighting(m)}, all labels, first seed)")
    a.legend(fontsize=8)
    return save_figure(fig, out / "training_curves.png")


def plot_efficiency(m: dict, out: Path) -> Path | None:
    eff = m["data_efficiency"]
    if not any(len(pts) > 1 for pts in eff.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm, pts in eff.items():
        pts = [p for p in pts if "auc" in p]
        n = np.array([p["n_labelled"] for p in pts])
        auc, std = np.array([p["auc"] for p in pts]), np.array([p["auc_std"] for p in pts])
        line = ax.errorbar(n, auc, yerr=std, fmt="o-", capsize=3, label=arm)
        for p in pts:  # every seed's AUC, so the spread is seen, not only summarised
            seeds = [s["auc"] for s in p["per_seed"] if "auc" in s]
            ax.plot([p["n_labelled"]] * len(seeds), seeds, ".", color=line[0].get_color(), alpha=0.5)
    ax.set(xscale="log", xlabel="labelled training events",
           ylabel=f"test {auc_name(m)} ({weighting(m)}; mean, spread over seeds)",
           title="data efficiency")
    ax.legend()
    return save_figure(fig, out / "data_efficiency.png")


def plot_generalisation(m: dict, out: Path) -> Path | None:
    gen = m.get("generalisation", {}).get("arms") or {}
    if not gen:
        return None
    bkgs = m["generalisation"]["tested_on"]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(bkgs) * len(gen) / 3), 4))
    width = 0.8 / len(gen)
    for i, (arm, per) in enumerate(gen.items()):
        ax.bar(np.arange(len(bkgs)) + i * width, [per[b].get("auc_mean") or np.nan for b in bkgs], width, label=arm)
    trained = set(m["generalisation"]["trained_on"])
    ax.set_xticks(np.arange(len(bkgs)) + 0.4 - width / 2, [b + ("" if b in trained else "\n(not trained on)") for b in bkgs])
    ax.set(ylabel="test AUC vs this background (mean of seeds)", ylim=(0.4, 1.0), title="generalisation")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "generalisation.png")


def plot_all(metrics_path, out_dir) -> list[Path]:
    metrics_path, out = Path(metrics_path), Path(out_dir)
    m = json.loads(metrics_path.read_text())
    if "classes" in m["task"]:  # multi-class
        made = [plot_confusion(m, out), plot_class_rocs(m, out)]
    else:
        made = [plot_roc(m, out), plot_scores(m, metrics_path.parent / "test_scores.npz", out), plot_generalisation(m, out)]
    made += [plot_training(m, out), plot_efficiency(m, out)]
    return [p for p in made if p is not None]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="step4 metrics.json")
    p.add_argument("--out-dir", default=None, help="default: plots/ next to metrics.json")
    args = p.parse_args(argv)
    for path in plot_all(args.metrics, args.out_dir or Path(args.metrics).parent / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
