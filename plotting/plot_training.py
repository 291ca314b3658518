"""Pretraining diagnostics (step3): loss and masked-token accuracy per epoch, the accuracy per
object type and quantizer level against the frequency baseline.

  python plotting/plot_training.py runs/x/pretrain/metrics.json --out-dir runs/x/pretrain/plots
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
    a.set(xlabel="epoch", ylabel="masked-token loss (mean over levels)")
    a.legend()
    b.plot(ep, [h["train_acc"] for h in hist], "o-", label="train")
    b.plot(ep, [h["val_acc"] for h in hist], "s-", label="validation")
    b.plot(ep, [h["val_frequency_baseline_acc"] for h in hist], "k--", label="most frequent code (val)")
    b.set(xlabel="epoch", ylabel="masked-token accuracy")
    b.legend()
    written.append(save_figure(fig, out / "training_curves.png"))

    val = m.get("val") or {}
    per_type = val.get("per_type", {})
    if per_type:
        names = list(per_type)
        levels = len(next(iter(per_type.values()))["acc_per_level"])
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
        width = 0.8 / (levels + 1)
        for l in range(levels):
            ax.bar([i + l * width for i in range(len(names))], [per_type[n]["acc_per_level"][l] for n in names],
                   width, label=f"level {l}")
        ax.bar([i + levels * width for i in range(len(names))], [per_type[n]["frequency_baseline_acc"] for n in names],
               width, color="grey", label="frequency baseline")
        ax.set_xticks([i + 0.4 for i in range(len(names))], names)
        ax.set(ylabel="validation masked-token accuracy", title="per object type and quantizer level")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out / "masked_accuracy_per_type.png"))
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
