"""Pretraining diagnostics (step3): loss and context gain per epoch, and the context gain of the
masked-object prediction per object type against its no-context baseline.

  python plotting/plot_training.py runs/x/pretrain/metrics.json --out-dir runs/x/pretrain/plots
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


def plot_pretraining(metrics_path, out_dir) -> list[Path]:
    m = json.loads(Path(metrics_path).read_text())
    hist, out = m["history"], Path(out_dir)
    ep = [h["epoch"] for h in hist]
    written = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in hist], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in hist], "s-", label="validation")
    a.set(xlabel="epoch", ylabel=f"loss ({' + '.join(m['objectives'])})")
    a.legend()
    for name in m["objectives"]:
        if name == "tokens":
            b.plot(ep, [h["val_acc"] / h["val_frequency_baseline_acc"] for h in hist], "s-",
                   label="tokens: accuracy / frequency baseline")
        elif name == "overlap":
            b.plot(ep, [h["val_overlap_acc"] for h in hist], "s-", label="overlap: pointer accuracy")
            b.plot(ep, [h["val_overlap_null_baseline_acc"] for h in hist], ":", color=b.lines[-1].get_color(),
                   label="overlap: null-slot baseline")
        else:
            b.plot(ep, [h[f"val_{name}_context_gain"] for h in hist], "s-", label=f"{name}: 1 - MSE / no-context MSE")
    b.set(xlabel="epoch", ylabel="validation context gain")
    b.legend(fontsize=8)
    written.append(save_figure(fig, out / "training_curves.png"))

    gain = m["context_gain"] or {}
    if gain:
        names = list(gain)
        key = "ratio" if m["objectives"][0] == "tokens" else "gain"
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
        values = np.array([gain[n][key] for n in names])
        intervals = key == "gain" and all("gain_ci95" in gain[n] for n in names)  # recorded since 2026-12-02
        errors = np.abs(np.array([gain[n]["gain_ci95"] for n in names]).T - values) if intervals else None
        ax.bar(names, values, yerr=errors, capsize=4)  # the 95% interval (events resampled)
        from plotting.report import CONTEXT_GAIN_GOAL  # the goal the report judges by, in one place
        ax.axhline(CONTEXT_GAIN_GOAL[key], color="k", ls="--", lw=1, label="goal")
        ax.set(ylabel="accuracy / frequency baseline" if key == "ratio" else "1 - MSE / no-context MSE",
               title=f"context gain of the masked-object prediction ({m['objectives'][0]}, validation)")
        ax.legend()
        written.append(save_figure(fig, out / "context_gain_per_type.png"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", help="step3 metrics.json")
    p.add_argument("--out-dir", default=None, help="default: plots/ next to metrics.json")
    args = p.parse_args(argv)
    for path in plot_pretraining(args.metrics, args.out_dir or Path(args.metrics).parent / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
