"""Per-label decision thresholds chosen on a grid, by MCC (the study's rule) or by F1.

Each label c gets the grid point that maximises its score on the fitting split, predicting
``probs >= threshold`` as in metrics.py. All labels and grid points are scored in one vectorised
pass from ``metrics.grid_confusion_counts`` (no (G, N, C) tensor, no loop over labels or thresholds).

Tie and fallback rules:
* ties: the FIRST (lowest) best grid point wins (``torch.argmax`` returns the first maximum);
* a label whose score is 0 at EVERY grid point (e.g. no positives in the fitting split) carries no
  information: ``fallback="default"`` gives it ``default`` (0.5); ``fallback="first"`` gives it the
  first grid point (0.05 for ``DEFAULT_GRID``), which is what the study's plain argmax did by accident.

The returned (C,) thresholds are in probs' dtype and on probs' device, i.e. exactly the values the
scores were compared with, so ``metrics.compute_metrics(targets, probs, thresholds)`` reproduces them.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from metrics import grid_confusion_counts, safe_divide

Grid = Union[Sequence[float], Tensor]

__all__ = [
    "DEFAULT_GRID",
    "FALLBACKS",
    "THRESHOLD_METHODS",
    "f1_scores",
    "f1_thresholds",
    "fit_thresholds",
    "mcc_scores",
    "mcc_thresholds",
    "pooled_threshold",
    "stabilise",
]

# The study's grid 0.05, 0.10, ..., 0.70 (14 points), float64; integers / 100 are correctly rounded, no drift.
DEFAULT_GRID = torch.arange(5, 75, 5, dtype=torch.float64) / 100  # (14,)

FALLBACKS = ("default", "first")


def _check_grid(grid: Grid) -> Tensor:
    """Validate a threshold grid: a non-empty, strictly increasing 1-D sequence of numbers in (0, 1)."""
    grid = torch.as_tensor(grid, dtype=torch.float64, device="cpu")
    if grid.dim() != 1 or grid.numel() == 0:
        raise ValueError(f"grid must be a non-empty 1-D sequence of thresholds; got shape {tuple(grid.shape)}.")
    if not ((grid > 0) & (grid < 1)).all() or not (grid[1:] > grid[:-1]).all():
        raise ValueError(
            f"grid must be strictly increasing with every point in (0, 1), e.g. 0.05..0.70; got {grid.tolist()}."
        )
    return grid  # (G,)


def _grid_in_dtype(grid: Grid, probs: Tensor) -> Tensor:
    """The validated grid in probs' dtype and device, the precision in which scores are compared with it."""
    probs = torch.as_tensor(probs)
    # A non-float probs is rejected by grid_confusion_counts with its own message; keep float64 meanwhile.
    dtype = probs.dtype if probs.is_floating_point() else torch.float64
    grid = _check_grid(grid).to(device=probs.device, dtype=dtype)
    if not (grid[1:] > grid[:-1]).all():
        raise ValueError(f"grid points collapse when cast to probs' dtype {dtype}; use fewer, wider-spaced points.")
    return grid  # (G,)


def mcc_scores(targets: Tensor, probs: Tensor, grid: Grid = DEFAULT_GRID) -> Tensor:
    """Matthews correlation of every label at every grid point, (G, C) float64, predicting probs >= grid[g].

    MCC = (TP*TN - FP*FN) / sqrt((TP+FP) (TP+FN) (TN+FP) (TN+FN)), and exactly 0 when the denominator is 0
    (as scikit-learn's ``matthews_corrcoef``).
    """
    tp, fp, fn, tn = (x.to(torch.float64) for x in grid_confusion_counts(targets, probs, _grid_in_dtype(grid, probs)))
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()  # (G, C), products exact below 2**53
    return safe_divide(tp * tn - fp * fn, denominator)


def f1_scores(targets: Tensor, probs: Tensor, grid: Grid = DEFAULT_GRID) -> Tensor:
    """Per-label F1 at every grid point, (G, C) float64: F1 = 2TP / (2TP + FP + FN), 0 when TP = 0."""
    tp, fp, fn, _ = grid_confusion_counts(targets, probs, _grid_in_dtype(grid, probs))
    return safe_divide(2 * tp, 2 * tp + fp + fn)


def _pick(scores: Tensor, grid: Tensor, fallback: str, default: float) -> Tensor:
    """(C,) thresholds: grid[argmax_g scores[g, c]] (first best on ties), with the module's fallback rule."""
    chosen = grid[scores.argmax(dim=0)]  # (C,) first maximum per label
    if fallback == "first":
        return chosen  # an all-zero column already has argmax 0, the first grid point
    uninformative = (scores == 0).all(dim=0)  # (C,)
    return torch.where(uninformative, torch.tensor(default, dtype=grid.dtype, device=grid.device), chosen)


def _check_choice(fallback: str, default: float) -> None:
    """Validate the fallback rule and the default threshold before any work is done."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}.")
    if not isinstance(default, (int, float)) or not 0 <= default <= 1:
        raise ValueError(f"default must be a threshold in [0, 1], e.g. 0.5; got {default!r}.")


def mcc_thresholds(
    targets: Tensor, probs: Tensor, grid: Grid = DEFAULT_GRID, fallback: str = "default", default: float = 0.5
) -> Tensor:
    """Per-label thresholds (C,): t_c = the first grid point maximising MCC_c (see ``mcc_scores``).

    A label whose MCC is 0 at every grid point gets ``default`` (fallback="default") or grid[0] (fallback="first").
    """
    _check_choice(fallback, default)
    grid = _grid_in_dtype(grid, probs)
    return _pick(mcc_scores(targets, probs, grid), grid, fallback, default)


def f1_thresholds(
    targets: Tensor, probs: Tensor, grid: Grid = DEFAULT_GRID, fallback: str = "default", default: float = 0.5
) -> Tensor:
    """Per-label thresholds (C,): t_c = the first grid point maximising F1_c = 2TP / (2TP + FP + FN).

    A label whose F1 is 0 at every grid point gets ``default`` (fallback="default") or grid[0] (fallback="first").
    """
    _check_choice(fallback, default)
    grid = _grid_in_dtype(grid, probs)
    return _pick(f1_scores(targets, probs, grid), grid, fallback, default)


THRESHOLD_METHODS: dict[str, Callable[..., Tensor]] = {"mcc": mcc_thresholds, "f1": f1_thresholds}


def fit_thresholds(
    method: str,
    targets: Tensor,
    probs: Tensor,
    grid: Grid = DEFAULT_GRID,
    fallback: str = "default",
    default: float = 0.5,
) -> Tensor:
    """Per-label thresholds (C,) by ``THRESHOLD_METHODS[method]`` ("mcc" or "f1"); see those functions."""
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"Unknown threshold method {method!r}; choose one of {sorted(THRESHOLD_METHODS)}.")
    return THRESHOLD_METHODS[method](targets, probs, grid=grid, fallback=fallback, default=default)


def pooled_threshold(method: str, targets: Tensor, probs: Tensor, labels: Tensor, grid: Grid = DEFAULT_GRID,
                     default: float = 0.5) -> Tensor:
    """One threshold for the labels `labels` (C,) bool taken together: their columns pooled into one long label
    (N * |labels| scores) and fitted by `method` as any label is. `default` when no label is selected or the pooled
    score is 0 everywhere. Returns a 0-d tensor in probs' dtype."""
    probs = torch.as_tensor(probs)
    labels = torch.as_tensor(labels, dtype=torch.bool, device=probs.device)
    if not bool(labels.any()):
        return torch.tensor(default, dtype=probs.dtype, device=probs.device)
    pooled_targets = torch.as_tensor(targets).to(probs.device)[:, labels].reshape(-1, 1)  # (N * L, 1)
    pooled_probs = probs[:, labels].reshape(-1, 1)
    return fit_thresholds(method, pooled_targets, pooled_probs, grid=grid, default=default)[0]


def stabilise(thresholds: Tensor, positives: Tensor, pooled: Tensor, min_positives: int = 0,
              shrinkage: float = 0.0) -> Tensor:
    """Thresholds (C,) made steadier for labels with few positives in the fitting split.

    With n_c the label's positives and t the pooled threshold (`pooled_threshold`):
    * labels with n_c < `min_positives` take t;
    * with `shrinkage` lambda > 0, every other label moves toward t by its evidence: t_c <- (n_c t_c + lambda t) /
      (n_c + lambda), so a label seen twice moves a lot and one seen 200 times hardly at all.
    """
    n = torch.as_tensor(positives, dtype=thresholds.dtype, device=thresholds.device)  # (C,)
    pooled = torch.as_tensor(pooled, dtype=thresholds.dtype, device=thresholds.device)
    out = (n * thresholds + shrinkage * pooled) / (n + shrinkage) if shrinkage > 0 else thresholds.clone()
    return torch.where(n < min_positives, pooled, out)
