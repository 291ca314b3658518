"""Two step4 outputs judged on the same test events: for every arm and label fraction the two share, the
paired AUC difference A - B over their common seeds, with a 95% interval from resampling the test events
(common.classifier_metrics.paired_auc_difference, as step4's own pretraining verdicts). This is how two
backbones, tokenizers or pretraining settings are compared downstream: fine-tune each on the same token
files, then

  python bench/compare_classifiers.py runs/a/finetune runs/b/finetune [--arms finetune,frozen]

Both folders must hold a test_scores.npz with the per-fraction scores (step4 since 2026-12-04) of the
same test events. A different test set ends in one error line (exit 2).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.classifier_metrics import N_BOOTSTRAP, paired_auc_difference, verdict  # noqa: E402
from common.runtime import die  # noqa: E402


def fraction_scores(npz) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """{(arm, fraction): {seed: scores}} from the score_<arm>_<fraction>_seed<seed> arrays."""
    out = {}
    for key in npz.files:
        head, _, seed = key.rpartition("_seed")
        if key.startswith("score_") and seed.isdigit():
            arm, _, fraction = head[len("score_"):].rpartition("_")
            out.setdefault((arm, fraction), {})[int(seed)] = npz[key]
    return out


def load(folder: Path):
    path = Path(folder) / "test_scores.npz"
    if not path.exists():
        die(f"{path}: no such file (a step4 output folder holds it)")
    npz = np.load(path, allow_pickle=False)
    if "label" not in npz.files:
        die(f"{path}: written before step4 kept every label fraction's scores; run step4 again")
    return npz, fraction_scores(npz)


def compare(a: Path, b: Path, arms: list[str] | None, n_bootstrap: int, seed: int) -> list[dict]:
    (npz_a, scores_a), (npz_b, scores_b) = load(a), load(b)
    for key in ("process", "label", "event_weight"):
        if not np.array_equal(npz_a[key], npz_b[key]):
            die(f"{a}, {b}: not the same test events ({key} differs); compare runs on the same token files")
    y, w = npz_a["label"], npz_a["event_weight"]
    keep = y >= 0
    rows = []
    for arm, fraction in sorted(set(scores_a) & set(scores_b), key=lambda k: (k[0], float(k[1]))):
        seeds = sorted(set(scores_a[arm, fraction]) & set(scores_b[arm, fraction]))
        if (arms and arm not in arms) or not seeds:
            continue
        stack = lambda s: np.stack([s[arm, fraction][k][keep] for k in seeds])  # noqa: E731
        d = paired_auc_difference(y[keep], w[keep], stack(scores_a), stack(scores_b), n_bootstrap, seed)
        rows.append({"arm": arm, "fraction": float(fraction), "seeds": seeds, **d, "verdict": verdict(d["ci95"])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="step4 output folder A")
    p.add_argument("b", type=Path, help="step4 output folder B")
    p.add_argument("--arms", default=None, help="comma separated (default: every arm both hold)")
    p.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = compare(args.a, args.b, args.arms.split(",") if args.arms else None, args.bootstrap, args.seed)
    if not rows:
        die(f"{args.a}, {args.b}: no arm and label fraction in common")
    print(f"A = {args.a}, B = {args.b}: AUC(A) - AUC(B), mean over the common seeds, 95% interval over test events")
    for r in rows:
        print(f"{r['arm']:>14} {r['fraction']:>6g}  {r['delta_auc']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
              f"  {r['verdict']}  (seeds {', '.join(map(str, r['seeds']))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
