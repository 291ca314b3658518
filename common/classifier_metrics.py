"""Signal-vs-background figures of merit shared by step4 and the report: weighted AUC with a
bootstrap interval, background rejection at fixed signal efficiency, a subsampled ROC."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

N_BOOTSTRAP = 200
ROC_POINTS = 200
WORKING_POINTS = (0.5, 0.3)  # signal efficiencies for the rejection figures


def rejection_at(fpr: np.ndarray, tpr: np.ndarray, sig_eff: float) -> float:
    """1 / background efficiency at the given signal efficiency (interpolated on the ROC)."""
    eff_b = float(np.interp(sig_eff, tpr, fpr))
    return float("inf") if eff_b <= 0 else 1.0 / eff_b


def weighted_auc_rows(y: np.ndarray, s: np.ndarray, w_rows: np.ndarray) -> np.ndarray:
    """The weighted AUC for each row of event weights (B, N) at once: Mann-Whitney over the sorted
    distinct scores, a tie counting one half (the same value as sklearn's roc_auc_score)."""
    _, inv = np.unique(s, return_inverse=True)
    k = inv.max() + 1
    bins = (np.arange(len(w_rows))[:, None] * k + inv).ravel()
    pos = np.bincount(bins, (w_rows * y).ravel(), len(w_rows) * k).reshape(-1, k)
    neg = np.bincount(bins, (w_rows * (1 - y)).ravel(), len(w_rows) * k).reshape(-1, k)
    below = np.cumsum(neg, 1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def bootstrap_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray, n: int, seed: int, chunk: int = 50) -> tuple[float, float]:
    """95% interval of the AUC from n resamples of the test events, `chunk` resamples at a time
    (each resample is a row of multiplicities that scales the event weights)."""
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, n, chunk):
        a = weighted_auc_rows(y, s, resample_counts(len(y), min(chunk, n - start), rng) * w)
        aucs.append(a[np.isfinite(a)])  # a resample with one class only has no AUC
    lo, hi = np.percentile(np.concatenate(aucs), [2.5, 97.5])
    return float(lo), float(hi)


def resample_counts(n_events: int, n: int, rng) -> np.ndarray:
    """(n, n_events) multiplicities of n bootstrap resamples of the events."""
    counts = np.zeros((n, n_events))
    np.add.at(counts, (np.arange(n)[:, None], rng.integers(0, n_events, (n, n_events))), 1)
    return counts


def paired_auc_difference(y: np.ndarray, w: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                          n: int = N_BOOTSTRAP, seed: int = 0, chunk: int = 50) -> dict:
    """AUC(a) - AUC(b) on the same test events, averaged over seeds (rows of scores_a/b, (S, N)),
    with a 95% interval from resampling the events: each resample is applied to every seed and
    both arms at once, so the interval holds the test-set fluctuation of the difference."""
    y = np.asarray(y).astype(int)
    auc = lambda s, w_rows: weighted_auc_rows(y, s, w_rows)  # noqa: E731
    diff = lambda w_rows: np.mean([auc(a, w_rows) - auc(b, w_rows) for a, b in zip(scores_a, scores_b)], axis=0)  # noqa: E731
    rng, deltas = np.random.default_rng(seed), []
    for start in range(0, n, chunk):
        d = diff(resample_counts(len(y), min(chunk, n - start), rng) * w)
        deltas.append(d[np.isfinite(d)])
    lo, hi = np.percentile(np.concatenate(deltas), [2.5, 97.5])
    per_seed = [float(auc(a, w[None])[0] - auc(b, w[None])[0]) for a, b in zip(scores_a, scores_b)]
    return {"delta_auc": float(np.mean(per_seed)), "ci95": [float(lo), float(hi)], "per_seed": per_seed}


def binary_metrics(y: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None,
                   n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    y = np.asarray(y).astype(int)
    w = np.ones(len(y)) if weight is None else np.abs(np.asarray(weight, dtype=np.float64))
    if y.min() == y.max():
        raise ValueError("the test set holds only one class")
    fpr, tpr, _ = roc_curve(y, score, sample_weight=w)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).astype(int))
    lo, hi = bootstrap_auc(y, score, w, n_bootstrap, seed)
    return {
        "auc": float(roc_auc_score(y, score, sample_weight=w)), "auc_ci95": [lo, hi],
        **{f"rejection_at_{int(e * 100)}": rejection_at(fpr, tpr, e) for e in WORKING_POINTS},
        "roc": {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()},
        "n_test": {"signal": int((y == 1).sum()), "background": int((y == 0).sum())},
    }


def summarize_seeds(per_seed: list[dict]) -> dict:
    """Mean and spread (standard deviation) of the scalar metrics over repeated trainings."""
    out = {"n_seeds": len(per_seed)}
    for key in ("auc", *(f"rejection_at_{int(e * 100)}" for e in WORKING_POINTS)):
        vals = np.array([m[key] for m in per_seed], dtype=float)
        out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out
