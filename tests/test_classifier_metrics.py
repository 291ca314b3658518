"""common.classifier_metrics: signed-weight AUC and ROC against direct computations, multi-class
metrics on hand-built cases, and the bootstrap intervals."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.classifier_metrics import (binary_metrics, multiclass_metrics, paired_auc_difference, weighted_auc_rows,
                                       weighted_roc)


def pairwise_auc(y, s, w):
    """The definition, O(n^2): sum over (signal i, background j) of w_i w_j ([s_i > s_j] + [s_i == s_j] / 2)
    over (sum of signal weights)(sum of background weights)."""
    sig, bkg = y == 1, y == 0
    ws, wb = w[sig][:, None], w[bkg][None, :]
    gt = (s[sig][:, None] > s[bkg][None, :]) + 0.5 * (s[sig][:, None] == s[bkg][None, :])
    return (ws * wb * gt).sum() / (w[sig].sum() * w[bkg].sum())


def negative_weight_sample(n=600, seed=0):
    """NLO-like: 20% of the events carry weight -0.5, scores rounded so ties occur. The negative-weight
    signal events sit at high score, so dropping or flipping their sign changes the AUC visibly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(0.6 * y, 1.0), 1)
    w = np.where(rng.random(n) < 0.2, -0.5, rng.uniform(0.5, 1.5, n))
    w[(y == 1) & (s > 1.0)] *= np.where(rng.random(((y == 1) & (s > 1.0)).sum()) < 0.5, -1, 1)
    return y, s, w


def test_signed_weight_auc_matches_pairwise_definition():
    y, s, w = negative_weight_sample()
    assert (w < 0).sum() > 50 and np.unique(s).size < 80, "negative weights and ties are both exercised"
    direct = pairwise_auc(y, s, w)
    m = binary_metrics(y, s, w, n_bootstrap=50)
    assert m["auc"] == pytest.approx(direct, abs=1e-12)
    assert abs(direct - pairwise_auc(y, s, np.abs(w))) > 0.01, "|w| would give another answer: the sign matters"
    fpr, tpr = weighted_roc(y, s, w)
    assert np.trapezoid(tpr, fpr) == pytest.approx(direct, abs=1e-12), "the ROC's area is the same AUC"
    assert (np.diff(tpr) < 0).any(), "a signed-weight ROC steps back where negative weights dominate"
    assert m["auc_ci95"][0] < m["auc"] < m["auc_ci95"][1] and m["n_negative_weights"] == (w < 0).sum()
    with pytest.raises(ValueError):  # what sklearn does with these weights (the reason for our own AUC)
        roc_auc_score(y, s, sample_weight=w)


def test_positive_weights_agree_with_sklearn_and_rejection():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    s, w = rng.normal(y, 1.0), rng.uniform(0.1, 2.0, 3000)
    m = binary_metrics(y, s, w, n_bootstrap=20)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s, sample_weight=w), abs=1e-12)
    # rejection at 50% signal efficiency: the weighted background fraction above the weighted signal median
    order = np.argsort(-s[y == 1])
    cut = s[y == 1][order][np.searchsorted(np.cumsum(w[y == 1][order]) / w[y == 1].sum(), 0.5)]
    eff_b = w[(y == 0) & (s >= cut)].sum() / w[y == 0].sum()
    assert m["rejection_at_50"] == pytest.approx(1 / eff_b, rel=0.02)


def test_bootstrap_rows_match_single_auc():
    y, s, w = negative_weight_sample(200, seed=2)
    rows = np.stack([w, 2 * w, np.where(np.arange(200) % 2, w, 0)])
    a = weighted_auc_rows(y, s, rows)
    assert a[0] == pytest.approx(a[1]) and a[0] == pytest.approx(pairwise_auc(y, s, w))
    odd = np.arange(200) % 2 == 1
    assert a[2] == pytest.approx(pairwise_auc(y[odd], s[odd], w[odd]))


def test_multiclass_confusion_accuracy_and_ovr_auc():
    # 3 classes, 7 events; predictions (argmax) by hand: true 0 -> 0, 0, 1; true 1 -> 1, 2; true 2 -> 2, 0
    y = np.array([0, 0, 0, 1, 1, 2, 2])
    prob = np.array([[.8, .1, .1], [.5, .3, .2], [.2, .7, .1], [.1, .8, .1], [.2, .3, .5], [.1, .1, .8], [.6, .2, .2]])
    w = np.array([1, 1, 2, 1, 1, 1, -0.5])
    m = multiclass_metrics(y, prob, w, classes=["a", "b", "c"], n_bootstrap=30)
    assert m["confusion"]["counts"] == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert m["confusion"]["weighted"] == [[2, 2, 0], [0, 1, 1], [-0.5, 0, 1]]
    assert np.allclose(m["confusion"]["normalised"], [[0.5, 0.5, 0], [0, 0.5, 0.5], [-1, 0, 2]])
    assert m["accuracy"] == pytest.approx((1 + 1 + 1 + 1) / w.sum()) and m["accuracy_unweighted"] == pytest.approx(4 / 7)
    for k, name in enumerate("abc"):
        assert m["per_class"][name]["auc"] == pytest.approx(pairwise_auc((y == k).astype(int), prob[:, k], w))
    assert m["auc"] == pytest.approx(np.mean([m["per_class"][c]["auc"] for c in "abc"]))
    assert m["n_test"] == {"a": 3, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="c"):
        multiclass_metrics(y[:5], prob[:5], classes=["a", "b", "c"], n_bootstrap=5)


def test_multiclass_separable_and_random():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 1000)
    good = np.eye(3)[y] + rng.normal(0, 0.05, (3000, 3))
    m = multiclass_metrics(y, good, n_bootstrap=40)
    assert m["auc"] == pytest.approx(1.0) and m["accuracy"] == pytest.approx(1.0)
    assert np.allclose(m["confusion"]["normalised"], np.eye(3))
    m = multiclass_metrics(y, rng.dirichlet([1, 1, 1], 3000), n_bootstrap=40)
    assert abs(m["auc"] - 0.5) < 0.03 and abs(m["accuracy"] - 1 / 3) < 0.04
    assert m["auc_ci95"][0] < m["auc"] < m["auc_ci95"][1] and m["accuracy_ci95"][0] < m["accuracy"] < m["accuracy_ci95"][1]
    lo, hi = np.array(m["confusion"]["normalised_ci95"])
    assert lo.shape == (3, 3) and (lo <= np.array(m["confusion"]["normalised"]) + 1e-12).all() and (hi > lo).all()


def test_paired_difference_binary_and_macro():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 400)
    strong = np.stack([np.eye(3)[y] + rng.normal(0, 0.5, (1200, 3)) for _ in range(2)])
    weak = np.stack([np.eye(3)[y] + rng.normal(0, 2.0, (1200, 3)) for _ in range(2)])
    d = paired_auc_difference(y, np.ones(1200), strong, weak, n=40)
    assert d["ci95"][0] > 0 and len(d["per_seed"]) == 2, "the macro AUC of the stronger arm is clearly higher"
    yb = (y == 0).astype(int)
    d = paired_auc_difference(yb, np.ones(1200), strong[:, :, 0], strong[:, :, 0], n=20)
    assert d["delta_auc"] == 0 and d["ci95"] == [0.0, 0.0]
