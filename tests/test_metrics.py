"""metrics.py against scikit-learn and hand-computed values, on tiny CPU tensors."""

import json
import math

import numpy as np

import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)
from torch.testing import assert_close

import metrics as M
from metrics import binarize, compute_metrics

SEEDS = [0, 1, 2]
KEYS = [
    "per_class/precision",
    "per_class/recall",
    "per_class/f1",
    "per_class/f1_mean_per_label",
    "per_image/precision",
    "per_image/recall",
    "per_image/f1",
    "N+",
    "N+/precision",
    "mAP",
]


def make_case(seed, n=40, c=7, decimals=None):
    """Random (targets, probs) float64 (n, c) with edge-case columns at threshold 0.5:
    0 = no positives, 1 = all positives, 2 = never predicted, 3 = always predicted (one score exactly 0.5)."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < 0.35).double()
    probs = torch.rand(n, c, generator=g, dtype=torch.float64)
    targets[:, 0] = 0
    targets[:, 1] = 1
    targets[0, 2] = 1  # make sure the never-predicted label has a positive to miss
    probs[:, 2] *= 0.49
    probs[:, 3] = 0.5 + 0.5 * probs[:, 3]
    probs[0, 3] = 0.5
    if decimals is not None:
        probs = torch.round(probs, decimals=decimals)
    return targets, probs


def sk_prf(targets, preds, average):
    return precision_recall_fscore_support(targets.numpy(), preds.numpy(), average=average, zero_division=0)[:3]


def sk_ap(targets, probs):
    """sklearn AP per label, NaN for labels without positives."""
    return torch.tensor(
        [
            average_precision_score(targets[:, c].numpy(), probs[:, c].numpy()) if targets[:, c].any() else math.nan
            for c in range(targets.shape[1])
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_per_label_prf_match_sklearn(seed):
    targets, probs = make_case(seed)
    out = M.per_label_metrics(targets, probs, 0.5)
    p, r, f = sk_prf(targets, (probs >= 0.5).double(), average=None)
    assert_close(out["precision"], torch.from_numpy(p))
    assert_close(out["recall"], torch.from_numpy(r))
    assert_close(out["f1"], torch.from_numpy(f))
    assert_close(out["support"], targets.sum(0).long())
    assert_close(out["predicted"], (probs >= 0.5).sum(0))
    # The edge columns really are edge cases, and get 0 where undefined.
    assert out["support"][0] == 0 and out["recall"][0] == 0
    assert out["predicted"][2] == 0 and out["precision"][2] == 0
    assert out["predicted"][3] == probs.shape[0]


@pytest.mark.parametrize("seed", SEEDS)
def test_summary_metrics_match_sklearn(seed):
    targets, probs = make_case(seed)
    out = M.compute_metrics(targets, probs, 0.5)
    preds = (probs >= 0.5).double()
    macro_p, macro_r, macro_f1 = sk_prf(targets, preds, average="macro")  # means over ALL labels
    micro_p, micro_r, micro_f1 = sk_prf(targets, preds, average="micro")
    expected = {
        "per_class/precision": macro_p,
        "per_class/recall": macro_r,
        "per_class/f1": 2 * macro_p * macro_r / (macro_p + macro_r),
        "per_class/f1_mean_per_label": macro_f1,
        "per_image/precision": micro_p,
        "per_image/recall": micro_r,
        "per_image/f1": micro_f1,
    }
    assert_close({k: out[k] for k in expected}, {k: float(v) for k, v in expected.items()})
    positive = targets.any(0)
    assert_close(out["mAP"], 100 * sk_ap(targets, probs)[positive].mean().item())


def test_hand_computed_example():
    targets = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    probs = torch.tensor(
        [[0.9, 0.6, 0.4, 0.7], [0.4, 0.7, 0.2, 0.2], [0.6, 0.3, 0.1, 0.2], [0.1, 0.8, 0.3, 0.2]], dtype=torch.float64
    )
    # Predictions at 0.5: label 0 -> samples {0, 2}, label 1 -> {0, 1, 3}, label 2 -> none, label 3 -> {0}.
    # label 0: TP 1 FP 1 FN 1 -> P 1/2, R 1/2, F1 1/2
    # label 1: TP 1 FP 2 FN 1 -> P 1/3, R 1/2, F1 2*(1/3)(1/2)/(5/6) = 2/5
    # label 2: TP 0 FP 0 FN 1 -> P 0 (never predicted), R 0, F1 0
    # label 3: TP 0 FP 1 FN 0 -> P 0, R 0 (no positives), F1 0
    per_label = M.per_label_metrics(targets, probs)
    assert_close(per_label["precision"], torch.tensor([1 / 2, 1 / 3, 0, 0], dtype=torch.float64))
    assert_close(per_label["recall"], torch.tensor([1 / 2, 1 / 2, 0, 0], dtype=torch.float64))
    assert_close(per_label["f1"], torch.tensor([1 / 2, 2 / 5, 0, 0], dtype=torch.float64))
    # AP, scores sorted high to low (+ = positive):
    # label 0: 0.9+ 0.6 0.4+ 0.1 -> (1/1 + 2/3) / 2 = 5/6; label 1: 0.8 0.7+ 0.6 0.3+ -> (1/2 + 2/4) / 2 = 1/2
    # label 2: 0.4+ first -> 1; label 3: no positives -> NaN
    assert_close(per_label["ap"], torch.tensor([5 / 6, 1 / 2, 1, math.nan], dtype=torch.float64), equal_nan=True)
    expected = {
        "per_class/precision": (1 / 2 + 1 / 3 + 0 + 0) / 4,  # 5/24
        "per_class/recall": (1 / 2 + 1 / 2 + 0 + 0) / 4,  # 1/4
        "per_class/f1": 5 / 22,  # 2 * (5/24) * (1/4) / (5/24 + 6/24) = (10/96) / (11/24)
        "per_class/f1_mean_per_label": (1 / 2 + 2 / 5) / 4,  # 9/40
        "per_image/precision": 2 / 6,  # sum TP 2, sum FP 1 + 2 + 0 + 1 = 4
        "per_image/recall": 2 / 5,  # sum FN 1 + 1 + 1 + 0 = 3
        "per_image/f1": 4 / 11,  # 2 * (1/3) * (2/5) / (1/3 + 2/5) = (4/15) / (11/15)
        "N+": 2,  # labels 0 and 1 have a true positive
        "N+/precision": (1 / 2 + 1 / 3) / 2,  # their precisions
        "mAP": 100 * (5 / 6 + 1 / 2 + 1) / 3,  # 700/9, label 3 (no positives) left out
    }
    out = M.compute_metrics(targets, probs)
    assert list(out) == KEYS
    assert out["N+"] == 2 and isinstance(out["N+"], int)
    assert_close(out, expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [None, 1])
def test_average_precision_matches_sklearn(seed, decimals):
    targets, probs = make_case(seed, n=60, decimals=decimals)
    probs[:, 4] = 0.3  # one label with a single run of equal scores: AP = prevalence
    ap = M.average_precision(targets, probs)
    assert_close(ap, sk_ap(targets, probs), equal_nan=True)
    assert torch.isnan(ap[0]) and not torch.isnan(ap[1:]).any()
    assert_close(ap[4].item(), targets[:, 4].mean().item())


def test_average_precision_steps_only_at_distinct_scores():
    targets = torch.tensor([[1], [0], [0], [1]])
    probs = torch.tensor([[0.5], [0.5], [0.5], [0.2]], dtype=torch.float64)
    # Thresholds 0.5 (TP 1 of 3 predicted, R 1/2) and 0.2 (TP 2 of 4, R 1): AP = 1/2 * 1/3 + 1/2 * 2/4 = 5/12.
    assert_close(M.average_precision(targets, probs), torch.tensor([5 / 12], dtype=torch.float64))
    sklearn_ap = average_precision_score([1, 0, 0, 1], [0.5, 0.5, 0.5, 0.2])
    assert_close(M.average_precision(targets, probs).item(), sklearn_ap)


def test_all_zero_targets_and_single_sample():
    targets, probs = make_case(0)
    out = M.compute_metrics(torch.zeros_like(targets), probs)
    assert math.isnan(out["mAP"]) and out["N+"] == 0
    assert out["per_class/recall"] == 0 and out["per_class/f1"] == 0 and out["per_image/f1"] == 0

    one_t = torch.tensor([[1, 0, 1, 0]])
    one_p = torch.tensor([[0.7, 0.8, 0.2, 0.1]], dtype=torch.float64)
    per_label = M.per_label_metrics(one_t, one_p)
    p, r, f = sk_prf(one_t, (one_p >= 0.5).long(), average=None)
    assert_close(per_label["precision"], torch.from_numpy(p))
    assert_close(per_label["recall"], torch.from_numpy(r))
    assert_close(per_label["f1"], torch.from_numpy(f))
    assert_close(per_label["ap"], torch.tensor([1.0, math.nan, 1.0, math.nan], dtype=torch.float64), equal_nan=True)
    assert M.compute_metrics(one_t, one_p)["N+"] == 1


@pytest.mark.parametrize("seed", SEEDS)
def test_per_label_thresholds_equal_thresholding_columns_by_hand(seed):
    targets, probs = make_case(seed, decimals=2)
    thresholds = torch.tensor([0.3, 0.5, 0.05, 0.7, 0.42, 0.9, 0.6], dtype=torch.float64)
    by_hand = torch.stack([probs[:, c] >= thresholds[c] for c in range(probs.shape[1])], dim=1)  # (N, C)
    out = M.per_label_metrics(targets, probs, thresholds)
    p, r, f = sk_prf(targets, by_hand.long(), average=None)
    assert_close(out["precision"], torch.from_numpy(p))
    assert_close(out["recall"], torch.from_numpy(r))
    assert_close(out["f1"], torch.from_numpy(f))
    assert_close(out["tp"], (by_hand & (targets == 1)).sum(0))
    for c in range(probs.shape[1]):  # each column alone with its scalar threshold gives the same numbers
        column = M.per_label_metrics(targets[:, c : c + 1], probs[:, c : c + 1], thresholds[c].item())
        assert_close({k: v[0] for k, v in column.items()}, {k: v[c] for k, v in out.items()}, equal_nan=True)
    micro = sk_prf(targets, by_hand.long(), average="micro")
    summary = M.compute_metrics(targets, probs, thresholds)
    assert_close([summary["per_image/precision"], summary["per_image/recall"]], [float(micro[0]), float(micro[1])])
    assert summary["N+"] == int(((by_hand & (targets == 1)).sum(0) > 0).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_score_equal_to_threshold_is_predicted(dtype):
    probs = torch.tensor([[0.35, 0.3], [0.34, 0.29]], dtype=dtype)
    targets = torch.tensor([[1, 1], [1, 1]])
    # >= in probs' dtype: float32(0.35) < float64 0.35, yet the float32 score 0.35 counts at threshold 0.35.
    out = M.per_label_metrics(targets, probs, torch.tensor([0.35, 0.3], dtype=torch.float64))
    assert out["predicted"].tolist() == [1, 1]
    # A Python float threshold is not rounded through float32 (float32(0.3) > 0.3 would drop a float64 0.3).
    assert M.per_label_metrics(targets, probs, 0.3)["predicted"].tolist() == [2, 1]
    assert torch.equal(M.binarize(probs, 0.3), probs >= 0.3)


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_counts_match_sklearn(seed):
    targets, probs = make_case(seed, decimals=2)
    preds = probs >= 0.5
    tp, fp, fn, tn = M.confusion_counts(targets, preds)
    mcm = torch.from_numpy(multilabel_confusion_matrix(targets.numpy(), preds.numpy().astype(int)))  # (C, 2, 2)
    assert_close(torch.stack([tn, fp, fn, tp], 1), mcm.reshape(-1, 4))
    # A leading grid dim gives one row per threshold, and grid_confusion_counts avoids building it.
    grid = torch.tensor([0.05, 0.3, 0.5, 0.5, 0.77, 1.0], dtype=torch.float64)
    gridded = M.confusion_counts(targets, probs >= grid[:, None, None])
    for g, t in enumerate(grid.tolist()):
        assert_close(tuple(x[g] for x in gridded), M.confusion_counts(targets, probs >= t))
    assert_close(M.grid_confusion_counts(targets, probs, grid), gridded)
    probs32 = probs.float()  # ties at the grid points are then decided in float32, like probs32 >= t
    assert_close(
        M.grid_confusion_counts(targets, probs32, grid),
        M.confusion_counts(targets, probs32 >= grid.float()[:, None, None]),
    )


def test_target_dtypes_agree_and_output_is_json_serialisable():
    targets, probs = make_case(1)
    results = [M.compute_metrics(t, probs) for t in (targets, targets.bool(), targets.long(), targets.float())]
    assert all(r == results[0] for r in results)
    assert all(type(v) is float for k, v in results[0].items() if k != "N+")
    json.dumps(results[0])
    assert_close(M.compute_metrics(targets, probs.float()), results[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t, p: M.compute_metrics(t[:, :3], p), "same shape"),
        (lambda t, p: M.compute_metrics(t, p[0]), r"shape \(N, C\)"),
        (lambda t, p: M.compute_metrics(t, p, torch.full((3,), 0.5)), r"shape \(7,\)"),
        (lambda t, p: M.compute_metrics(t, p, torch.full((7, 1), 0.5)), r"shape \(7,\)"),
        (lambda t, p: M.compute_metrics(t, p * 4 - 2), "sigmoid"),
        (lambda t, p: M.compute_metrics(t, p.masked_fill(p > 0.9, math.nan)), "NaN"),
        (lambda t, p: M.compute_metrics(t * 2, p), "only 0 and 1"),
        (lambda t, p: M.compute_metrics(t, (p > 0.5).long()), "floating-point"),
        (lambda t, p: M.compute_metrics(t[:0], p[:0]), "at least one sample"),
        (lambda t, p: M.confusion_counts(t, p), "bool"),
        (lambda t, p: M.grid_confusion_counts(t, p, [0.5, 0.2]), "non-decreasing"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    targets, probs = make_case(0)
    with pytest.raises(ValueError, match=message):
        call(targets, probs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    device = torch.device("cuda")
    targets, probs = make_case(2, decimals=2)
    thresholds = torch.linspace(0.1, 0.7, probs.shape[1], dtype=torch.float64)
    expected = M.compute_metrics(targets, probs, thresholds)
    assert_close(M.compute_metrics(targets.to(device), probs.to(device), thresholds.to(device)), expected)
    grid = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    on_device = M.grid_confusion_counts(targets.to(device), probs.to(device), grid)
    assert_close(tuple(x.cpu() for x in on_device), M.grid_confusion_counts(targets, probs, grid))


# ---------------------------------------------------------------- the study's rule: p > t and epsilon 1e-7

def _study_metrics(y, p, thresholds, eps=1e-7):
    """The study's evaluation_metrics.py in numpy: torch.gt, every ratio a / (b + eps), F1 = 2PR / (P + R + eps)."""
    pred = (p > thresholds).astype(float)
    tp_c, pred_c, true_c = (y * pred).sum(0), pred.sum(0), y.sum(0)
    pc_p, pc_r = np.mean(tp_c / (pred_c + eps)), np.mean(tp_c / (true_c + eps))
    pi_p, pi_r = (y * pred).sum() / (pred.sum() + eps), (y * pred).sum() / (y.sum() + eps)
    f1 = lambda a, b: 2 * (a * b / (a + b + eps))  # noqa: E731
    return {"per_class/precision": pc_p, "per_class/recall": pc_r, "per_class/f1": f1(pc_p, pc_r),
            "per_image/precision": pi_p, "per_image/recall": pi_r, "per_image/f1": f1(pi_p, pi_r),
            "N+": int((tp_c > 0).sum())}


def test_strict_comparison_and_epsilon_reproduce_the_studys_metrics():
    rng = np.random.default_rng(5)
    y = (rng.random((60, 9)) < 0.3).astype(float)
    y[:, 4] = 0  # a label without positives
    p = np.round(rng.random((60, 9)), 2)  # many scores exactly on a grid threshold
    thresholds = np.round(rng.choice(np.arange(5, 75, 5) / 100, 9), 2)
    for t in (0.5, thresholds):
        ours = compute_metrics(torch.tensor(y), torch.tensor(p), torch.tensor(t) if not isinstance(t, float) else t,
                               strict=True, epsilon=1e-7)
        reference = _study_metrics(y, p, t)
        for key, value in reference.items():
            assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_strict_comparison_drops_exactly_the_scores_equal_to_their_threshold():
    y = torch.tensor([[1, 0], [1, 1], [0, 1]])
    p = torch.tensor([[0.5, 0.25], [0.75, 0.5], [0.5, 0.75]])
    assert binarize(p, 0.5).tolist() == [[True, False], [True, True], [True, True]]
    assert binarize(p, 0.5, strict=True).tolist() == [[False, False], [True, False], [False, True]]
    assert compute_metrics(y, p, 0.5)["per_image/recall"] == 1.0
    assert compute_metrics(y, p, 0.5, strict=True)["per_image/recall"] == 0.5


# ---------------------------------------------------------------- input checks (killing mutants that survived)

@pytest.mark.parametrize("grid, message", [
    ([0.2, float("nan")], "non-decreasing"), ([[0.2, 0.4]], "1-D"), ([0.2, 0.5, 0.3], "non-decreasing"),
    ([], "non-empty")])
def test_grid_confusion_counts_refuses_bad_grids(grid, message):
    with pytest.raises(ValueError, match=message):
        M.grid_confusion_counts(torch.tensor([[1, 0]]), torch.tensor([[0.3, 0.6]]), torch.tensor(grid))


def test_a_single_threshold_grid_is_a_grid():
    tp, fp, fn, tn = M.grid_confusion_counts(torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0.3, 0.6], [0.2, 0.1]]),
                                             torch.tensor([0.25]))
    assert tp.tolist() == [[1, 0]] and fp.tolist() == [[0, 1]] and fn.tolist() == [[0, 1]] and tn.tolist() == [[1, 0]]


def test_probabilities_above_one_and_nan_thresholds_are_refused_with_their_sentence():
    with pytest.raises(ValueError, match=r"^probs must lie in \[0, 1\] without NaN \(got min 0.1, max 1.5\); apply "
                                         r"torch.sigmoid to logits first.$"):
        M.compute_metrics(torch.tensor([[1, 0]]), torch.tensor([[0.1, 1.5]]))
    with pytest.raises(ValueError, match=r"^thresholds contain NaN; pass finite thresholds, e.g. 0.5.$"):
        M.binarize(torch.tensor([[0.1, 0.5]]), torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match=r"^probs must have shape \(N, C\); got \(2,\).$"):
        M.binarize(torch.tensor([0.1, 0.5]))
    with pytest.raises(ValueError, match=r"^targets must contain only 0 and 1 \(multi-hot label indicators\), not "
                                         r"label indices or soft labels.$"):
        M.compute_metrics(torch.tensor([[2, 0]]), torch.tensor([[0.1, 0.5]]))
    with pytest.raises(ValueError, match=r"^targets is on meta but the scores are on cpu; move both to one device.$"):
        M.compute_metrics(torch.zeros(1, 2, device="meta"), torch.tensor([[0.1, 0.5]]))
    with pytest.raises(ValueError, match=r"^preds must be a bool tensor of shape \(N, C\) or \(G, N, C\), e.g. probs "
                                         r">= threshold; got dtype torch.float32 and shape \(1, 2\).$"):
        M.confusion_counts(torch.tensor([[1, 0]]), torch.tensor([[0.1, 0.5]]))


def test_binarize_defaults_to_one_half():
    assert M.binarize(torch.tensor([[0.49, 0.5, 0.51]])).tolist() == [[False, True, True]]


# ---------------------------------------------------------------- the literature's top-k protocol and ranking metrics

def _numpy_top_k(y, p, k):
    """Ten lines of numpy: each image's k best labels (ties to the lower label index), then the table's figures."""
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    pred = np.zeros_like(y, dtype=bool)
    np.put_along_axis(pred, order, True, axis=1)
    tp, predicted, support = (pred & (y == 1)).sum(0), pred.sum(0), y.sum(0)
    P = np.mean(np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0))
    R = np.mean(np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0))
    ip, ir = tp.sum() / predicted.sum(), tp.sum() / support.sum()
    return {"per_class/precision": P, "per_class/recall": R, "per_class/f1": 2 * P * R / (P + R),
            "per_image/precision": ip, "per_image/recall": ir, "per_image/f1": 2 * ip * ir / (ip + ir),
            "N+": int((tp > 0).sum())}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_figures_equal_a_numpy_recomputation_with_ties(k):
    rng = np.random.default_rng(k)
    y = (rng.random((40, 9)) < 0.3).astype(int)
    p = np.round(rng.random((40, 9)), 1)  # many ties, also at the k-th score
    ours = M.top_k_metrics(torch.tensor(y), torch.tensor(p), k)
    for key, value in _numpy_top_k(y, p, k).items():
        assert ours[key] == pytest.approx(value, rel=1e-12), key
    assert M.top_k(torch.tensor(p), k).sum(1).tolist() == [k] * 40


def test_top_k_breaks_ties_towards_the_first_label():
    assert M.top_k(torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1]]), 2).tolist() == [[True, True, False, False, False]]
    assert M.top_k(torch.tensor([[0.2, 0.1]]), 5).tolist() == [[True, True]]
    with pytest.raises(ValueError, match="k >= 1"):
        M.top_k(torch.tensor([[0.2, 0.1]]), 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_metrics_equal_scikit_learn(seed):
    from sklearn.metrics import coverage_error, label_ranking_average_precision_score, label_ranking_loss

    rng = np.random.default_rng(seed)
    y = (rng.random((60, 8)) < 0.3).astype(int)
    y[0], y[1] = 0, 1  # an image with no label and one with every label
    p = np.round(rng.random((60, 8)), 1).astype(np.float32)  # ties
    ours = M.ranking_metrics(torch.tensor(y), torch.tensor(p))
    assert ours["ranking/lrap"] == pytest.approx(label_ranking_average_precision_score(y, p), rel=1e-12)
    assert ours["ranking/coverage"] == pytest.approx(coverage_error(y, p), rel=1e-12)
    assert ours["ranking/loss"] == pytest.approx(label_ranking_loss(y, p), rel=1e-12)
    labelled = y.sum(1) > 0
    top = np.argmax(p, axis=1)  # numpy's argmax also takes the first of equal scores
    assert ours["ranking/one_error"] == pytest.approx(np.mean(y[labelled, top[labelled]] == 0), rel=1e-12)
