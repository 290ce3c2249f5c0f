"""thresholds.py against brute-force scikit-learn loops, on tiny CPU tensors."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef
from torch.testing import assert_close

import metrics as M
import thresholds as T

SEEDS = [0, 1, 2]


def make_case(seed, n=50, c=6, decimals=2):
    """Random (targets, probs) float64 (n, c); scores rounded to 2 decimals so many sit exactly on grid points.
    Column 0 has no positives and column 1 only positives (MCC 0 at every threshold for both)."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, c, generator=g) < 0.3).double()
    # Positives score higher on average so that the best threshold varies between labels.
    probs = (0.6 * torch.rand(n, c, generator=g, dtype=torch.float64) + 0.35 * targets).clamp(0, 1)
    targets[:, 0] = 0
    targets[:, 1] = 1
    return targets, torch.round(probs, decimals=decimals)


def brute_scores(targets, probs, grid, score):
    """(G, C) numpy: score(y_c, probs_c >= t) for every grid point t and label c, by a double loop."""
    y, p = targets.numpy().astype(int), probs.numpy()
    with warnings.catch_warnings():  # sklearn warns when a column holds a single class; the score is still defined
        warnings.simplefilter("ignore")
        return np.array([[score(y[:, c], (p[:, c] >= t).astype(int)) for c in range(y.shape[1])] for t in grid])


def brute_thresholds(scores, grid, fallback, default=0.5):
    """Per label: the first grid point with the best score, or `default` for a label scoring 0 at every grid
    point when fallback="default"."""
    chosen = []
    for c in range(scores.shape[1]):
        if fallback == "default" and np.all(scores[:, c] == 0):
            chosen.append(default)
        else:
            chosen.append(float(grid[int(np.argmax(scores[:, c]))]))
    return torch.tensor(chosen, dtype=torch.float64)


def sk_f1(y, pred):
    return f1_score(y, pred, zero_division=0)


def test_default_grid_is_the_study_grid():
    assert T.DEFAULT_GRID.tolist() == [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [2, 6])
def test_mcc_scores_match_sklearn_at_every_grid_point(seed, decimals):
    targets, probs = make_case(seed, decimals=decimals)
    expected = brute_scores(targets, probs, T.DEFAULT_GRID.tolist(), matthews_corrcoef)
    scores = T.mcc_scores(targets, probs, T.DEFAULT_GRID)
    assert scores.dtype == torch.float64 and scores.shape == (14, 6)
    assert_close(scores, torch.from_numpy(expected), rtol=0, atol=1e-12)
    assert (scores[:, :2] == 0).all()  # no positives / only positives: denominator 0 -> exactly 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fallback", ["default", "first"])
def test_mcc_thresholds_match_brute_force(seed, fallback):
    targets, probs = make_case(seed)
    grid = T.DEFAULT_GRID.tolist()
    expected = brute_thresholds(brute_scores(targets, probs, grid, matthews_corrcoef), grid, fallback)
    got = T.mcc_thresholds(targets, probs, fallback=fallback)
    assert_close(got, expected, rtol=0, atol=0)
    # The labels with MCC 0 everywhere get 0.5, or the study's accidental first grid point 0.05.
    assert got[:2].tolist() == ([0.5, 0.5] if fallback == "default" else [0.05, 0.05])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fallback", ["default", "first"])
def test_f1_thresholds_match_brute_force(seed, fallback):
    targets, probs = make_case(seed)
    grid = T.DEFAULT_GRID.tolist()
    scores = brute_scores(targets, probs, grid, sk_f1)
    assert_close(T.f1_scores(targets, probs), torch.from_numpy(scores))
    got = T.f1_thresholds(targets, probs, fallback=fallback, default=0.4)
    assert_close(got, brute_thresholds(scores, grid, fallback, default=0.4), rtol=0, atol=0)
    assert got[0].item() == (0.4 if fallback == "default" else 0.05)  # F1 is 0 everywhere without positives
    assert got[1].item() == 0.05  # all positives: F1 decreases with the threshold, the first point is best


def test_ties_pick_the_first_best_grid_point():
    targets = torch.tensor([[1], [1], [0], [0]])
    probs = torch.tensor([[0.9], [0.8], [0.2], [0.1]], dtype=torch.float64)
    grid = [0.1, 0.15, 0.3, 0.5, 0.7, 0.85]
    # 0.1 predicts everything (TN 0: MCC 0); 0.15 adds one false positive: TP 2 FP 1 FN 0 TN 1 -> 2 / sqrt(3*2*2*1);
    # 0.3, 0.5 and 0.7 separate perfectly (MCC 1, F1 1); 0.85 misses 0.8: TP 1 FP 0 FN 1 TN 2 -> 2 / sqrt(1*2*2*3).
    expected = torch.tensor([0, 1 / 3**0.5, 1, 1, 1, 1 / 3**0.5], dtype=torch.float64)
    assert_close(T.mcc_scores(targets, probs, grid)[:, 0], expected)
    assert T.mcc_thresholds(targets, probs, grid).tolist() == [0.3]
    assert T.f1_thresholds(targets, probs, grid).tolist() == [0.3]


@pytest.mark.parametrize("seed", SEEDS)
def test_custom_grid(seed):
    targets, probs = make_case(seed, decimals=3)
    grid = [0.12, 0.2, 0.33, 0.5, 0.61, 0.8, 0.95]
    scores = brute_scores(targets, probs, grid, matthews_corrcoef)
    assert_close(T.mcc_scores(targets, probs, grid), torch.from_numpy(scores), rtol=0, atol=1e-12)
    for method, score in [("mcc", matthews_corrcoef), ("f1", sk_f1)]:
        expected = brute_thresholds(brute_scores(targets, probs, grid, score), grid, "default")
        assert_close(T.fit_thresholds(method, targets, probs, grid=grid), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["mcc", "f1"])
def test_fitted_thresholds_reproduce_the_best_score_in_float32(method):
    targets, probs64 = make_case(3)
    probs = probs64.float()  # scores like 0.35 sit on grid points, where float32 vs float64 matters
    thresholds = T.fit_thresholds(method, targets, probs)
    assert thresholds.dtype == torch.float32
    scores = (T.mcc_scores if method == "mcc" else T.f1_scores)(targets, probs)  # (G, C)
    preds = probs >= thresholds  # (N, C): the thresholds are the exact values the scores were compared with
    score = matthews_corrcoef if method == "mcc" else sk_f1
    y, p = targets.numpy().astype(int), preds.numpy().astype(int)
    achieved = torch.tensor([score(y[:, c], p[:, c]) for c in range(y.shape[1])], dtype=torch.float64)  # (C,)
    if method == "f1":
        assert_close(M.per_label_metrics(targets, probs, thresholds)["f1"], achieved)
    informative = ~(scores == 0).all(0)
    assert informative.sum() >= 3
    assert_close(achieved[informative], scores.max(0).values[informative])


def test_fit_thresholds_registry():
    targets, probs = make_case(0)
    assert set(T.THRESHOLD_METHODS) == {"mcc", "f1"}
    fitted = T.fit_thresholds("mcc", targets, probs, fallback="first")
    assert torch.equal(fitted, T.mcc_thresholds(targets, probs, fallback="first"))
    assert torch.equal(T.fit_thresholds("f1", targets, probs), T.f1_thresholds(targets, probs))
    with pytest.raises(ValueError, match=r"'f1', 'mcc'"):
        T.fit_thresholds("youden", targets, probs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"grid": [0.5, 0.3]}, "strictly increasing"),
        ({"grid": [0.3, 0.3]}, "strictly increasing"),
        ({"grid": [0.0, 0.5]}, r"in \(0, 1\)"),
        ({"grid": [0.5, 1.0]}, r"in \(0, 1\)"),
        ({"grid": [[0.1, 0.2]]}, "1-D"),
        ({"grid": []}, "non-empty"),
        ({"fallback": "last"}, "fallback must be one of"),
        ({"default": 1.5}, "default must be"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    targets, probs = make_case(0)
    with pytest.raises(ValueError, match=message):
        T.mcc_thresholds(targets, probs, **kwargs)
    with pytest.raises(ValueError, match=message):
        T.fit_thresholds("f1", targets, probs, **kwargs)


def test_bad_scores_raise_value_error():
    targets, probs = make_case(0)
    with pytest.raises(ValueError, match="same shape"):
        T.mcc_scores(targets[:, :2], probs)
    with pytest.raises(ValueError, match="sigmoid"):
        T.mcc_thresholds(targets, probs * 3)
    with pytest.raises(ValueError, match="collapse"):
        T.mcc_scores(targets, probs.half(), [0.5, 0.50001])


# ---------------------------------------------------------------- input checks (killing mutants that survived)

@pytest.mark.parametrize("grid, message", [([[0.1, 0.2]], "1-D"), ([0.1, 0.5, 0.3], "strictly increasing"),
                                           ([0.1, 1.0], "in \\(0, 1\\)")])
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(ValueError, match=message):
        T.mcc_thresholds(torch.tensor([[1, 0]]), torch.tensor([[0.3, 0.6]]), grid=grid)


def test_one_point_grids_defaults_zero_and_one_and_integer_scores():
    y, p = torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    assert T.mcc_thresholds(y, p, grid=[0.5]).tolist() == [0.5, 0.5]
    never = torch.zeros(2, 2, dtype=torch.long)
    assert T.mcc_thresholds(never, p, default=0.0).tolist() == [0.0, 0.0]
    assert T.mcc_thresholds(never, p, default=1.0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="floating-point"):
        T.mcc_thresholds(y, torch.tensor([[1, 0], [0, 1]]))


def test_grid_points_that_collapse_in_the_scores_dtype_are_refused_wherever_they_are():
    probs = torch.tensor([[0.3, 0.6]], dtype=torch.float16)
    with pytest.raises(ValueError, match="collapse"):  # 0.5 and 0.5001 are one float16 number; 0.1 is not
        T.mcc_thresholds(torch.tensor([[1, 0]]), probs, grid=[0.1, 0.5, 0.5001])


# ---------------------------------------------------------------- pooled and shrunk thresholds (rare labels)

def test_the_pooled_threshold_is_the_best_grid_point_of_the_rare_labels_taken_together():
    y = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    p = torch.tensor([[0.9, 0.1, 0.35], [0.2, 0.62, 0.3], [0.1, 0.3, 0.32], [0.8, 0.2, 0.1]], dtype=torch.float64)
    rare = torch.tensor([False, True, True])
    # By hand: labels 1 and 2 pooled are 8 scores with positives 0.62 and 0.35; grid 0.05..0.70: MCC is 1 at
    # t in (0.32, 0.35], i.e. grid point 0.35 (0.30 also predicts 0.3 and 0.32): the first best is 0.35.
    pooled = T.pooled_threshold("mcc", y, p, rare)
    pooled_y = [0, 1, 1, 0, 0, 0, 0, 0]  # columns 1 and 2, row by row
    pooled_p = [0.1, 0.35, 0.62, 0.3, 0.3, 0.32, 0.2, 0.1]
    best = max(T.DEFAULT_GRID.tolist(), key=lambda t: (matthews_corrcoef(pooled_y, [int(v >= t) for v in pooled_p]), -t))
    assert float(pooled) == pytest.approx(0.35) == pytest.approx(best)
    assert float(T.pooled_threshold("mcc", y, p, torch.zeros(3, dtype=torch.bool))) == 0.5


def test_stabilise_replaces_the_rarest_and_shrinks_by_evidence():
    t = torch.tensor([0.05, 0.6, 0.3, 0.1], dtype=torch.float64)
    n = torch.tensor([1, 2, 200, 8])
    out = T.stabilise(t, n, torch.tensor(0.4, dtype=torch.float64), min_positives=2, shrinkage=4.0)
    # label 0: 1 < 2 positives -> 0.4; label 1: (2 * 0.6 + 4 * 0.4) / 6; label 2: (200 * 0.3 + 1.6) / 204; ...
    assert out.tolist() == pytest.approx([0.4, (1.2 + 1.6) / 6, (60 + 1.6) / 204, (0.8 + 1.6) / 12])
    assert T.stabilise(t, n, torch.tensor(0.4, dtype=torch.float64)).tolist() == t.tolist()  # neither: unchanged
