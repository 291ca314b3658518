"""Figures of merit shared by step4 and the report, for event weights of either sign.

Binary: weighted AUC with a bootstrap interval, background rejection at fixed signal efficiency,
a subsampled ROC. Multi-class: one-vs-rest AUC per class, their mean (macro AUC), accuracy and
the confusion matrix normalised per true class, each with a bootstrap interval.

Negative generator weights (NLO generators) are kept with their sign: a weighted rate is the
signed sum of the weights that pass over the signed sum of all, so the negative-weight events
subtract what they are meant to subtract. sklearn's roc_auc_score refuses such weights (its ROC
is then not monotonic, and its trapezoid check raises), so the AUC here is the signed-weight
Mann-Whitney statistic, sum over (signal i, background j) of w_i w_j [s_i > s_j] (ties one half)
over (sum w_signal)(sum w_background), computed from cumulative sums over the sorted distinct
scores: the same number as the area under the signed-weight ROC, and sklearn's for positive weights.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

N_BOOTSTRAP = 200
ROC_POINTS = 200
WORKING_POINTS = (0.5, 0.3)  # signal efficiencies for the rejection figures
SCALARS = ("auc", *(f"rejection_at_{int(e * 100)}" for e in WORKING_POINTS), "accuracy")  # what summarize_seeds averages


def signed_weights(weight, n: int) -> np.ndarray:
    return np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)


def weighted_roc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct score threshold, from (0, 0) to (1, 1), with signed weights
    (where negative weights dominate locally the curve steps back: that is the physical answer)."""
    order = np.argsort(-s, kind="stable")
    ws, ys = w[order], y[order].astype(bool)
    last = np.r_[s[order][1:] != s[order][:-1], True]  # the last event of each distinct score
    tp, fp = np.cumsum(np.where(ys, ws, 0.0))[last], np.cumsum(np.where(ys, 0.0, ws))[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def rejection_at(fpr: np.ndarray, tpr: np.ndarray, sig_eff: float) -> float:
    """1 / background efficiency at the given signal efficiency (interpolated on the ROC; the
    signal efficiency is taken as its running maximum, which a signed-weight ROC may not be)."""
    eff_b = float(np.interp(sig_eff, np.maximum.accumulate(tpr), fpr))
    return float("inf") if eff_b <= 0 else 1.0 / eff_b


def roc_points(fpr: np.ndarray, tpr: np.ndarray) -> dict:
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(ROC_POINTS, len(fpr))).astype(int))
    return {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()}


def weighted_auc_rows(y: np.ndarray, s: np.ndarray, w_rows: np.ndarray) -> np.ndarray:
    """The weighted AUC for each row of (signed) event weights (B, N) at once: Mann-Whitney over
    the sorted distinct scores, a tie counting one half (sklearn's value for positive weights)."""
    _, inv = np.unique(s, return_inverse=True)
    k = inv.max() + 1
    bins = (np.arange(len(w_rows))[:, None] * k + inv).ravel()
    pos = np.bincount(bins, (w_rows * y).ravel(), len(w_rows) * k).reshape(-1, k)
    neg = np.bincount(bins, (w_rows * (1 - y)).ravel(), len(w_rows) * k).reshape(-1, k)
    below = np.cumsum(neg, 1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def ovr_auc_rows(y: np.ndarray, prob: np.ndarray, w_rows: np.ndarray) -> np.ndarray:
    """(B, K): the one-vs-rest AUC of each class k (score prob[:, k]) for each row of weights."""
    return np.stack([weighted_auc_rows((y == k).astype(float), prob[:, k], w_rows) for k in range(prob.shape[1])], 1)


def auc_rows(y: np.ndarray, score: np.ndarray, w_rows: np.ndarray) -> np.ndarray:
    """The headline AUC per row of weights: binary for scores (N,), macro one-vs-rest for (N, K)."""
    return weighted_auc_rows(y, score, w_rows) if score.ndim == 1 else ovr_auc_rows(y, score, w_rows).mean(1)


def resample_counts(n_events: int, n: int, rng) -> np.ndarray:
    """(n, n_events) multiplicities of n bootstrap resamples of the events."""
    counts = np.zeros((n, n_events))
    np.add.at(counts, (np.arange(n)[:, None], rng.integers(0, n_events, (n, n_events))), 1)
    return counts


def resamples(n_events: int, n: int, seed: int, chunk: int = 50) -> Iterator[np.ndarray]:
    """n bootstrap resamples of the events, `chunk` rows of multiplicities at a time (memory stays flat)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        yield resample_counts(n_events, min(chunk, n - start), rng)


def ci95(values: np.ndarray) -> list:
    """The 2.5 and 97.5 percentiles over resamples (axis 0), skipping resamples without a value
    (one with a single class has no AUC)."""
    values = np.where(np.isfinite(values), values, np.nan)
    lo, hi = np.nanpercentile(values, [2.5, 97.5], axis=0)
    return [float(lo), float(hi)] if np.ndim(lo) == 0 else [lo.tolist(), hi.tolist()]


def bootstrap_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray, n: int, seed: int, chunk: int = 50) -> tuple[float, float]:
    """95% interval of the AUC from n resamples of the test events (each resample is a row of
    multiplicities that scales the event weights)."""
    lo, hi = ci95(np.concatenate([auc_rows(y, s, c * w) for c in resamples(len(y), n, seed, chunk)]))
    return lo, hi


def paired_auc_difference(y: np.ndarray, w: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                          n: int = N_BOOTSTRAP, seed: int = 0, chunk: int = 50) -> dict:
    """AUC(a) - AUC(b) on the same test events, averaged over seeds (rows of scores_a/b: (S, N)
    binary scores, or (S, N, K) class probabilities with y the class index and the macro AUC),
    with a 95% interval from resampling the events: each resample is applied to every seed and
    both arms at once, so the interval holds the test-set fluctuation of the difference."""
    y = np.asarray(y).astype(int)
    diff = lambda w_rows: np.mean([auc_rows(y, a, w_rows) - auc_rows(y, b, w_rows)  # noqa: E731
                                   for a, b in zip(scores_a, scores_b)], axis=0)
    lo, hi = ci95(np.concatenate([diff(c * w) for c in resamples(len(y), n, seed, chunk)]))
    per_seed = [float(auc_rows(y, a, w[None])[0] - auc_rows(y, b, w[None])[0]) for a, b in zip(scores_a, scores_b)]
    return {"delta_auc": float(np.mean(per_seed)), "ci95": [lo, hi], "per_seed": per_seed}


def verdict(ci95) -> str:
    """A difference's verdict from its 95% interval: better or worse only when the interval excludes 0."""
    return "better" if ci95[0] > 0 else "worse" if ci95[1] < 0 else "not distinguishable"


def binary_metrics(y: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None,
                   n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """AUC with its interval, rejections and ROC, all with the signed event weights."""
    y = np.asarray(y).astype(int)
    w = signed_weights(weight, len(y))
    if y.min() == y.max():
        raise ValueError("the test set holds only one class")
    if min(w[y == 1].sum(), w[y == 0].sum()) <= 0:
        raise ValueError("the signal or background test weights do not sum to a positive number")
    fpr, tpr = weighted_roc(y, score, w)
    lo, hi = bootstrap_auc(y, score, w, n_bootstrap, seed)
    return {
        "auc": float(weighted_auc_rows(y, score, w[None])[0]), "auc_ci95": [lo, hi],
        **{f"rejection_at_{int(e * 100)}": rejection_at(fpr, tpr, e) for e in WORKING_POINTS},
        "roc": roc_points(fpr, tpr),
        "n_test": {"signal": int((y == 1).sum()), "background": int((y == 0).sum())},
        "n_negative_weights": int((w < 0).sum()),
    }


def confusion_rows(y: np.ndarray, pred: np.ndarray, k: int, w_rows: np.ndarray) -> np.ndarray:
    """(B, K, K) summed weights of (true class, predicted class) for each row of weights."""
    cells = (np.arange(len(w_rows))[:, None] * k * k + y * k + pred).ravel()
    return np.bincount(cells, w_rows.ravel(), len(w_rows) * k * k).reshape(-1, k, k)


def per_true_class(confusion: np.ndarray) -> np.ndarray:
    """Each row (true class) divided by its sum: the fraction of a class predicted as each class."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return confusion / confusion.sum(-1, keepdims=True)


def multiclass_metrics(y: np.ndarray, prob: np.ndarray, weight: np.ndarray | None = None, classes=None,
                       n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """One-vs-rest AUC and ROC per class, macro AUC ("auc"), accuracy and the confusion matrix
    (raw counts, summed weights, and weights normalised per true class), with the signed event
    weights; intervals from n_bootstrap resamples of the events (the same resamples for all)."""
    y, prob = np.asarray(y).astype(int), np.asarray(prob, dtype=np.float64)
    k = prob.shape[1]
    classes = list(classes or range(k))
    w = signed_weights(weight, len(y))
    class_w = np.bincount(y, w, k)
    if (class_w <= 0).any():
        bad = [str(c) for c, s in zip(classes, class_w) if s <= 0]
        raise ValueError(f"class(es) {', '.join(bad)} have no test events (or a weight sum that is not positive)")
    pred = prob.argmax(1)
    auc = ovr_auc_rows(y, prob, w[None])[0]
    confusion = confusion_rows(y, pred, k, w[None])[0]
    boot = {"per_class": [], "accuracy": [], "confusion": []}
    for c in resamples(len(y), n_bootstrap, seed):
        rows = c * w
        boot["per_class"].append(ovr_auc_rows(y, prob, rows))
        boot["accuracy"].append((rows * (pred == y)).sum(1) / rows.sum(1))
        boot["confusion"].append(per_true_class(confusion_rows(y, pred, k, rows)))
    boot = {key: np.concatenate(v) for key, v in boot.items()}
    per_class = {}
    for i, name in enumerate(classes):
        fpr, tpr = weighted_roc((y == i).astype(int), prob[:, i], w)
        per_class[str(name)] = {"auc": float(auc[i]), "auc_ci95": ci95(boot["per_class"][:, i]),
                                "roc": roc_points(fpr, tpr), "n_test": int((y == i).sum())}
    return {
        "auc": float(auc.mean()), "auc_ci95": ci95(boot["per_class"].mean(1)), "auc_definition": "macro one-vs-rest",
        "accuracy": float(w[pred == y].sum() / w.sum()), "accuracy_ci95": ci95(boot["accuracy"]),
        "accuracy_unweighted": float((pred == y).mean()),
        "per_class": per_class, "classes": [str(c) for c in classes],
        "confusion": {"normalised": per_true_class(confusion).round(6).tolist(),
                      "normalised_ci95": ci95(boot["confusion"]), "weighted": confusion.tolist(),
                      "counts": confusion_rows(y, pred, k, np.ones((1, len(y))))[0].astype(int).tolist(),
                      "axes": "rows: true class, columns: predicted class (the largest probability)"},
        "n_test": {str(c): int((y == i).sum()) for i, c in enumerate(classes)},
        "n_negative_weights": int((w < 0).sum()),
    }


def summarize_seeds(per_seed: list[dict]) -> dict:
    """Mean and spread (standard deviation) of the scalar metrics over repeated trainings."""
    out = {"n_seeds": len(per_seed)}
    for key in (k for k in SCALARS if k in per_seed[0]):
        vals = np.array([m[key] for m in per_seed], dtype=float)
        with np.errstate(invalid="ignore"):  # an infinite rejection (no background left) has no spread: NaN, said once here
            out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out
