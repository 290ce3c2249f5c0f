"""Multi-label image annotation metrics: pure functions on tensors, vectorised over labels.

Conventions shared by every function here (and by thresholds.py):

* ``targets``: (N, C) ground truth in {0, 1}, as float, int or bool.
* ``probs``: (N, C) floating-point scores in [0, 1] (sigmoid outputs, not logits).
* ``thresholds``: a float, or a (C,) tensor with one threshold per label.
* Prediction rule: label c is predicted for sample n  iff  ``probs[n, c] >= thresholds[c]``
  (greater than OR EQUAL), or ``>`` with ``strict=True`` (the study's evaluation, ``torch.gt``).
  Thresholds are compared in ``probs``' dtype, exactly as ``probs >= 0.5`` does in PyTorch, so a
  float32 score equal to float32(t) is predicted (unless strict).
* For label c: TP_c, FP_c, FN_c, TN_c are the confusion counts over the N samples.
* Counts are int64, ratios float64; results stay on the inputs' device, except
  ``compute_metrics``, which returns plain Python numbers.
* A ratio whose denominator is 0 is 0 (scikit-learn's ``zero_division=0``), except AP,
  which is NaN for a label without positives (it is then left out of mAP).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Thresholds = Union[float, Sequence[float], Tensor]

__all__ = [
    "average_precision",
    "binarize",
    "compute_metrics",
    "confusion_counts",
    "grid_confusion_counts",
    "per_label_metrics",
    "ranking_metrics",
    "safe_divide",
    "top_k",
    "top_k_metrics",
]


def _check_targets(targets, shape: torch.Size, device: torch.device) -> Tensor:
    """Validate targets against the (N, C) shape and device of the scores; return them as bool (N, C)."""
    targets = torch.as_tensor(targets)
    if targets.shape != shape:
        raise ValueError(
            f"targets and probs/preds must have the same shape (N, C); got targets {tuple(targets.shape)} "
            f"and {tuple(shape)}."
        )
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but the scores are on {device}; move both to one device.")
    if targets.dtype != torch.bool:
        if not ((targets == 0) | (targets == 1)).all():
            raise ValueError(
                "targets must contain only 0 and 1 (multi-hot label indicators), not label indices or soft labels."
            )
        targets = targets != 0
    return targets


def _check_pair(targets, probs) -> tuple[Tensor, Tensor]:
    """Validate (targets, probs) and return (targets as bool (N, C), probs (N, C))."""
    probs = torch.as_tensor(probs)
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(
            f"probs must have shape (N, C) with at least one sample and one label; got {tuple(probs.shape)}."
        )
    if not probs.is_floating_point():
        raise ValueError(f"probs must be a floating-point tensor of scores in [0, 1]; got dtype {probs.dtype}.")
    if torch.isnan(probs).any() or (probs < 0).any() or (probs > 1).any():
        raise ValueError(
            "probs must lie in [0, 1] without NaN "
            f"(got min {probs.min().item():.4g}, max {probs.max().item():.4g}); apply torch.sigmoid to logits first."
        )
    return _check_targets(targets, probs.shape, probs.device), probs


def _like_probs(values, probs: Tensor) -> Tensor:
    """Thresholds as a tensor in probs' dtype and device.

    Python floats are converted straight to probs' dtype: ``torch.as_tensor(0.3)`` would first round
    them to float32 (the default dtype), and float32(0.3) > 0.3 would wrongly reject a float64 score of 0.3.
    """
    if isinstance(values, Tensor):
        return values.to(device=probs.device, dtype=probs.dtype)
    return torch.as_tensor(values, dtype=probs.dtype, device=probs.device)


def _as_thresholds(thresholds: Thresholds, probs: Tensor) -> Tensor:
    """Return the thresholds as a (C,) tensor in probs' dtype and device (see the module's prediction rule)."""
    num_labels = probs.shape[1]
    thr = _like_probs(thresholds, probs)
    if thr.dim() > 1 or (thr.dim() == 1 and thr.numel() != num_labels):
        raise ValueError(
            f"thresholds must be a float or a tensor of shape ({num_labels},), one per label; "
            f"got shape {tuple(thr.shape)}."
        )
    if torch.isnan(thr).any():
        raise ValueError("thresholds contain NaN; pass finite thresholds, e.g. 0.5.")
    return thr.expand(num_labels)  # (C,)


def binarize(probs: Tensor, thresholds: Thresholds = 0.5, strict: bool = False) -> Tensor:
    """Predictions (N, C) bool: ``pred[n, c] = probs[n, c] >= thresholds[c]`` (``>`` if `strict`), in probs' dtype."""
    probs = torch.as_tensor(probs)
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C); got {tuple(probs.shape)}.")
    thr = _as_thresholds(thresholds, probs)  # (C,)
    return probs > thr if strict else probs >= thr  # (N, C) vs (C,) -> (N, C)


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` in float64, and exactly 0 where ``denominator == 0``."""
    num = numerator.to(torch.float64)
    den = denominator.to(torch.float64)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _counts_from_tp(tp: Tensor, predicted: Tensor, support: Tensor, num_samples: int):
    """(TP, FP, FN, TN) from TP, predicted count TP+FP, support TP+FN and N (all broadcastable, int64)."""
    fp = predicted - tp
    fn = support - tp
    tn = num_samples - tp - fp - fn
    return torch.broadcast_tensors(tp, fp, fn, tn)


def _confusion(targets: Tensor, preds: Tensor):
    """Core of ``confusion_counts`` on already validated bool targets (N, C) and preds (N, C) or (G, N, C)."""
    tp = (preds & targets).sum(dim=-2)  # (C,) or (G, C)
    predicted = preds.sum(dim=-2)  # (C,) or (G, C)
    support = targets.sum(dim=0)  # (C,)
    return _counts_from_tp(tp, predicted, support, targets.shape[0])


def confusion_counts(targets: Tensor, preds: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-label confusion counts (TP, FP, FN, TN), each int64 of shape (C,), or (G, C) for gridded preds.

    ``targets`` is (N, C) in {0, 1}; ``preds`` is (N, C) bool, or (G, N, C) bool with a leading
    grid dimension (one prediction matrix per threshold). With y = targets, p = preds:
    TP_c = sum_n y*p, FP_c = sum_n (1-y)*p, FN_c = sum_n y*(1-p), TN_c = N - TP_c - FP_c - FN_c.
    """
    preds = torch.as_tensor(preds)
    if preds.dtype != torch.bool or preds.dim() not in (2, 3):
        raise ValueError(
            "preds must be a bool tensor of shape (N, C) or (G, N, C), e.g. probs >= threshold; "
            f"got dtype {preds.dtype} and shape {tuple(preds.shape)}."
        )
    return _confusion(_check_targets(targets, preds.shape[-2:], preds.device), preds)


def grid_confusion_counts(targets: Tensor, probs: Tensor, grid) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Confusion counts of every label at every threshold of a non-decreasing grid, each int64 (G, C).

    Same result as ``confusion_counts(targets, probs >= grid[:, None, None])`` (prediction rule
    ``probs >= grid[g]`` in probs' dtype) without building the (G, N, C) predictions: each score is put
    in bucket b = #{g : grid[g] <= p} (``torch.bucketize(..., right=True)``), so p >= grid[g] iff b > g.
    One bincount per (bucket, label) then a reversed cumulative sum over buckets give
    predicted_{g,c} = #{n : b_nc > g} and TP_{g,c} = #{n : b_nc > g, y_nc = 1}.
    """
    targets, probs = _check_pair(targets, probs)
    grid = _like_probs(grid, probs)
    if grid.dim() != 1 or grid.numel() == 0 or torch.isnan(grid).any() or (grid[1:] < grid[:-1]).any():
        raise ValueError(
            f"grid must be a non-empty 1-D non-decreasing sequence of thresholds in probs' dtype {probs.dtype}; "
            f"got {grid.tolist()}."
        )
    num_samples, num_labels = probs.shape
    num_buckets = grid.numel() + 1
    # int32 indices are ~25% faster on CPU than int64; they always fit for realistic (G + 1) * C.
    small = num_buckets * num_labels < 2**31
    bucket = torch.bucketize(probs, grid, right=True, out_int32=small)  # (N, C) in 0..G
    labels = torch.arange(num_labels, device=probs.device, dtype=bucket.dtype)  # (C,)
    cell = bucket * num_labels + labels  # (N, C) index of the (bucket, label) pair
    all_counts = torch.bincount(cell.flatten(), minlength=num_buckets * num_labels).view(num_buckets, num_labels)
    pos_counts = torch.bincount(cell[targets], minlength=num_buckets * num_labels).view(num_buckets, num_labels)
    # Suffix sums over buckets: row g of [1:] counts the scores in buckets g+1..G, i.e. those >= grid[g].
    predicted = all_counts.flip(0).cumsum(0).flip(0)[1:]  # (G, C)
    tp = pos_counts.flip(0).cumsum(0).flip(0)[1:]  # (G, C)
    support = pos_counts.sum(dim=0)  # (C,)
    return _counts_from_tp(tp, predicted, support, num_samples)


def average_precision(targets: Tensor, probs: Tensor) -> Tensor:
    """Per-label average precision (C,) float64, threshold-free; NaN for a label without positives.

    AP_c = sum_k (R_k - R_{k-1}) * P_k over the DISTINCT scores s_1 > s_2 > ... of label c, where P_k, R_k
    are the precision and recall of predicting ``probs >= s_k`` and R_0 = 0: identical to scikit-learn's
    ``average_precision_score`` including tied scores (a run of equal scores is one step). Vectorised:
    sort each column once, cumulative TP, and keep only the last index of each run of equal scores.
    """
    return _average_precision(*_check_pair(targets, probs))


def _average_precision(targets: Tensor, probs: Tensor) -> Tensor:
    """Core of ``average_precision`` on validated bool targets (N, C) and probs (N, C)."""
    num_samples, num_labels = probs.shape
    # The order inside a run of equal scores is irrelevant (only run ends are used), so no stable sort.
    sorted_probs, order = torch.sort(probs, dim=0, descending=True)  # (N, C)
    cum_tp = targets.gather(0, order).to(torch.float64).cumsum(dim=0)  # (N, C) TP among the top i+1 scores
    # Row i is a threshold iff it is the last of its run of equal scores (the last row always is).
    is_end = torch.ones_like(sorted_probs, dtype=torch.bool)  # (N, C)
    is_end[:-1] = sorted_probs[:-1] != sorted_probs[1:]
    rank = torch.arange(1, num_samples + 1, dtype=torch.float64, device=probs.device).unsqueeze(1)  # (N, 1)
    precision = cum_tp / rank  # (N, C) precision when predicting the top i+1 scores
    # TP at the previous threshold: cum_tp never decreases, so the running max of the run-end values,
    # shifted down one row, is the cum_tp of the latest earlier run end (0 before the first).
    end_tp = torch.where(is_end, cum_tp, 0.0)  # (N, C)
    prev_end_tp = torch.cat([cum_tp.new_zeros(1, num_labels), end_tp.cummax(dim=0).values[:-1]])  # (N, C)
    new_tp = torch.where(is_end, cum_tp - prev_end_tp, 0.0)  # (N, C) positives gained at each threshold
    support = cum_tp[-1]  # (C,)
    ap = (new_tp * precision).sum(dim=0) / torch.where(support > 0, support, 1.0)  # (C,) = sum dR * P
    return torch.where(support > 0, ap, torch.nan)


def per_label_metrics(targets: Tensor, probs: Tensor, thresholds: Thresholds = 0.5,
                      strict: bool = False) -> dict[str, Tensor]:
    """Per-label metrics, each a (C,) tensor on the inputs' device, predicting ``probs >= thresholds`` (``>`` if
    `strict`).

    * ``precision`` P_c = TP_c / (TP_c + FP_c), 0 for a label never predicted.
    * ``recall`` R_c = TP_c / (TP_c + FN_c), 0 for a label without positives.
    * ``f1`` F1_c = 2 P_c R_c / (P_c + R_c) = 2 TP_c / (2 TP_c + FP_c + FN_c), 0 when TP_c = 0.
    * ``ap`` average precision (see ``average_precision``), NaN for a label without positives.
    * ``support`` TP_c + FN_c, ``predicted`` TP_c + FP_c, ``tp`` TP_c (int64).
    """
    targets, probs = _check_pair(targets, probs)
    return _per_label(targets, probs, binarize(probs, thresholds, strict))


def _per_label(targets: Tensor, probs: Tensor, preds: Tensor) -> dict[str, Tensor]:
    """per_label_metrics of validated bool targets (N, C), probs (N, C) and predictions (N, C)."""
    tp, fp, fn, _ = _confusion(targets, preds)  # each (C,)
    return {
        "precision": safe_divide(tp, tp + fp),
        "recall": safe_divide(tp, tp + fn),
        "f1": safe_divide(2 * tp, 2 * tp + fp + fn),
        "ap": _average_precision(targets, probs),
        "support": tp + fn,
        "predicted": tp + fp,
        "tp": tp,
    }


def compute_metrics(targets: Tensor, probs: Tensor, thresholds: Thresholds = 0.5, strict: bool = False,
                    epsilon: float = 0.0) -> dict[str, float]:
    """Summary metrics as plain Python numbers, predicting ``probs >= thresholds`` (``>`` if `strict`).

    With P_c, R_c, F1_c, AP_c from ``per_label_metrics`` and the mean taken over ALL C labels:

    * ``per_class/precision`` P = mean_c P_c (a label never predicted counts 0).
    * ``per_class/recall`` R = mean_c R_c (a label without positives counts 0).
    * ``per_class/f1`` = 2 P R / (P + R) of those two means (0 if P + R = 0), as in the annotation literature.
    * ``per_class/f1_mean_per_label`` = mean_c F1_c.
    * ``per_image/precision`` = sum TP / (sum TP + sum FP), ``per_image/recall`` = sum TP / (sum TP + sum FN),
      ``per_image/f1`` = 2 P R / (P + R), from the counts pooled over labels (micro; 0 when undefined).
    * ``N+`` (int) = #{c : TP_c > 0}, the labels recalled at least once; ``N+/precision`` = mean_{c : TP_c > 0} P_c,
      their precision (an N+ bought with false positives shows here; 0 when N+ = 0).
    * ``mAP`` = 100 * mean of AP_c over the labels with at least one positive (percent, 0-100);
      NaN when no label has a positive.

    ``epsilon > 0`` computes the six P/R/F1 figures as the study's code does: every ratio a / (b + epsilon) and
    F1 = 2 P R / (P + R + epsilon) (the study: 1e-7), instead of exact ratios with 0 for 0/0.
    """
    targets, probs = _check_pair(targets, probs)
    return _summary(_per_label(targets, probs, binarize(probs, thresholds, strict)), epsilon)


def _summary(per_label: dict[str, Tensor], epsilon: float = 0.0) -> dict[str, float]:
    """compute_metrics' figures from per-label counts (see there)."""
    tp, predicted, support = per_label["tp"], per_label["predicted"], per_label["support"]

    def ratio(a: Tensor, b: Tensor) -> Tensor:
        return a.to(torch.float64) / (b.to(torch.float64) + epsilon) if epsilon > 0 else safe_divide(a, b)

    class_p, class_r = ratio(tp, predicted).mean(), ratio(tp, support).mean()
    image_p, image_r = ratio(tp.sum(), predicted.sum()), ratio(tp.sum(), support.sum())
    return {
        "per_class/precision": class_p.item(),
        "per_class/recall": class_r.item(),
        "per_class/f1": ratio(2 * class_p * class_r, class_p + class_r).item(),
        "per_class/f1_mean_per_label": per_label["f1"].mean().item(),
        "per_image/precision": image_p.item(),
        "per_image/recall": image_r.item(),
        "per_image/f1": ratio(2 * image_p * image_r, image_p + image_r).item(),
        "N+": int((tp > 0).sum().item()),
        "N+/precision": per_label["precision"][tp > 0].mean().item() if bool((tp > 0).any()) else 0.0,
        "mAP": 100.0 * per_label["ap"].nanmean().item(),
    }


def top_k(probs: Tensor, k: int) -> Tensor:
    """Predictions (N, C) bool: each image's k highest-scoring labels (the annotation literature's protocol, k = 5).

    Ties at the k-th score go to the label that comes first in the vocabulary (a stable descending sort), so the
    result is deterministic. k >= C predicts every label.
    """
    probs = torch.as_tensor(probs)
    if probs.dim() != 2 or isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k needs probs of shape (N, C) and k >= 1; got shape {tuple(probs.shape)} and k={k!r}.")
    order = torch.sort(probs, dim=1, descending=True, stable=True).indices[:, :k]  # (N, min(k, C))
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, order, True)


def top_k_metrics(targets: Tensor, probs: Tensor, k: int = 5) -> dict[str, float]:
    """compute_metrics' figures when every image is annotated with its k highest-scoring labels (`top_k`)."""
    targets, probs = _check_pair(targets, probs)
    return _summary(_per_label(targets, probs, top_k(probs, k)))


def ranking_metrics(targets: Tensor, probs: Tensor) -> dict[str, float]:
    """Threshold-free ranking quality of each image's label scores, as plain numbers (scikit-learn's definitions).

    With rank_nc = #{l : p_nl >= p_nc} (ties share the worst rank) and L_nc = #{relevant l : p_nl >= p_nc}:

    * ``ranking/lrap`` label-ranking average precision: mean_n mean_{relevant c} L_nc / rank_nc; an image with no
      relevant label, or only relevant ones, scores 1.
    * ``ranking/coverage`` coverage error: mean_n max_{relevant c} rank_nc (how far down the ranking one must go to
      cover every true label); 0 for an image with no label.
    * ``ranking/loss`` ranking loss: mean_n #{(relevant c, irrelevant u) : p_nu >= p_nc} / (|relevant| |irrelevant|);
      0 for an image with no relevant or no irrelevant label.
    * ``ranking/one_error`` the fraction of images (with at least one label) whose top-scored label (the first in
      the vocabulary on ties) is not one of theirs.

    Vectorised: each row sorted once, ranks counted with searchsorted; no loop over images or labels.
    """
    targets, probs = _check_pair(targets, probs)
    num_labels = probs.shape[1]
    ascending = torch.sort(probs, dim=1).values.contiguous()  # (N, C)
    rank = num_labels - torch.searchsorted(ascending, probs.contiguous())  # (N, C) #{l : p_l >= p_c}
    relevant_only = torch.sort(torch.where(targets, probs, -1.0), dim=1).values.contiguous()  # others below 0
    relevant_rank = num_labels - torch.searchsorted(relevant_only, probs.contiguous())  # (N, C)
    n_rel = targets.sum(1)  # (N,)
    ranked = (n_rel > 0) & (n_rel < num_labels)  # images whose ranking has a meaning
    ratio = torch.where(targets, relevant_rank.double() / rank, 0.0).sum(1) / n_rel.clamp(min=1)  # (N,) float64
    lrap = torch.where(ranked, ratio, 1.0)
    coverage = torch.where(targets, rank, 0).amax(1)  # (N,) 0 without labels
    wrong_pairs = torch.where(targets, rank - relevant_rank, 0).sum(1)  # (N,) irrelevant at or above each relevant
    loss = torch.where(ranked, wrong_pairs.double() / (n_rel * (num_labels - n_rel)).clamp(min=1), 0.0)
    labelled = n_rel > 0
    top_is_wrong = ~targets.gather(1, probs.argmax(1, keepdim=True)).squeeze(1)  # (N,)
    one_error = (top_is_wrong & labelled).sum().double() / labelled.sum().clamp(min=1)
    return {"ranking/lrap": lrap.double().mean().item(), "ranking/coverage": coverage.double().mean().item(),
            "ranking/loss": loss.double().mean().item(), "ranking/one_error": one_error.item()}
