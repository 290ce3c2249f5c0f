"""Multi-label losses for image annotation (logits (B, C), multi-hot targets (B, C)).

Every loss is a stateless ``nn.Module`` whose ``forward(logits, targets)`` returns a
scalar.  Notation: ``x`` = logits, ``p = sigmoid(x)``, ``y`` in {0, 1} the targets,
sums run over all images ``i`` and labels ``c``.

Reductions (all losses), with ``L_i`` the per-image sum over the C labels:

* ``"sum"`` (default): ``L = sum_i L_i`` - the sum over every image and label, as the
  ASL reference implementation. NOT the study's (see below).
* ``"mean"``: ``L = (1 / B) sum_i L_i`` - the mean over images of the per-image sum;
  the study's LSEP (``loss / targets.size(0)``).
* ``"mean-all"``: ``L = (1 / (B C)) sum_i L_i`` - the mean over all B * C entries; the
  study's BCE (``nn.MultiLabelSoftMarginLoss``), focal and ASL (``-loss.mean()``).

Two more of the study's choices are options of the focal and ASL losses: ``eps`` (the study
takes ``log(clamp(p, 1e-8))``, so a positive with a logit below -18.4 costs a flat 18.42
with zero gradient through the log; 0 = the exact log-sigmoid) and ``detach_focusing``
(the study does NOT detach the focusing weights; ASL's reference implementation does).

All computations run on ``logits.float()`` / ``targets.float()``, so bf16/fp16 logits
from autocast are safe and the loss is float32.

Use :func:`create_loss` (CLI entry point) or the :data:`LOSSES` registry;
:data:`LOSS_DEFAULTS` / ``<Loss>.defaults()`` give the true default hyper-parameters.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "REDUCTIONS",
    "MultiLabelLoss",
    "BCELoss",
    "FocalLoss",
    "AsymmetricLoss",
    "LSEPLoss",
    "LOSSES",
    "LOSS_DEFAULTS",
    "create_loss",
    "reduction_factor",
]

REDUCTIONS: Tuple[str, ...] = ("sum", "mean", "mean-all")


def reduction_factor(reduction: str, batch: int, labels: int) -> int:
    """f such that the sum over images and labels = f * the loss reduced by `reduction` (1, B or B * C)."""
    return {"sum": 1, "mean": batch, "mean-all": batch * labels}[reduction]



def _check_non_negative(name: str, value: Any, owner: str) -> float:
    """Return ``value`` as a float, raising if it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{owner}: {name} must be a finite number >= 0, got {value!r}; pass e.g. {name}=0.0."
        )
    return float(value)


def _check_eps(value: Any, owner: str) -> float:
    """The log clamp: 0 (exact log-sigmoid) or a small positive number such as the study's 1e-8."""
    value = _check_non_negative("eps", value, owner)
    if value >= 0.5:
        raise ValueError(f"{owner}: eps clamps probabilities before the log and must be below 0.5, got {value!r}; "
                         "the study uses 1e-8, and 0 gives the exact log-sigmoid.")
    return value


def _focal_terms(
    x: Tensor,
    y: Tensor,
    gamma_pos: float,
    gamma_neg: float,
    margin: float,
    detach_focusing: bool,
    eps: float = 0.0,
) -> Tensor:
    """Element-wise asymmetric focal loss, shape (B, C).

    ``l = -[ y (1-p)^{g+} log p + (1-y) p_m^{g-} log(1-p_m) ]`` with
    ``p_m = max(p - m, 0)``.  With ``eps = 0``: ``log p = logsigmoid(x)``; for the negatives
    ``log(1-p_m) = log(min(sigmoid(-x) + m, 1))`` (``= logsigmoid(-x)`` when m = 0, which is
    also exact where sigmoid(-x) underflows).  With ``eps > 0`` (the study's code, eps = 1e-8):
    ``log(max(p, eps))`` and ``log(max(1 - p_m, eps))`` from ``p = sigmoid(x)``, so the log saturates
    at log(eps) and its gradient is 0 there.  ``0^0 = 1``: a zero exponent gives the plain
    BCE term (and its weight is skipped, which also avoids pow's 0 * inf gradient at p = 1).
    With ``detach_focusing`` the weights ``(1-p)^{g+}``, ``p_m^{g-}`` are constants for
    autograd (ASL reference behaviour), done locally with ``.detach()``.
    """
    if eps > 0:
        p = torch.sigmoid(x)  # (B, C)
        log_p = torch.log(p.clamp(min=eps))  # (B, C)
        p_m = (p - margin).clamp(min=0) if margin > 0 else p  # (B, C)
        log_one_minus_pm = torch.log((1 - p_m).clamp(min=eps))  # (B, C)
        one_minus_p = 1 - p
    else:
        log_p = F.logsigmoid(x)  # (B, C)
        one_minus_p = torch.sigmoid(-x)
        if margin == 0:
            p_m = torch.sigmoid(x)  # (B, C)
            log_one_minus_pm = F.logsigmoid(-x)  # (B, C)
        else:
            # 1 - p_m = min(1 - p + m, 1); clamping keeps the log exactly 0 (and its gradient 0)
            # for negatives already below the margin.
            p_m = (torch.sigmoid(x) - margin).clamp(min=0)  # (B, C)
            log_one_minus_pm = torch.log((torch.sigmoid(-x) + margin).clamp(max=1))  # (B, C)
    pos = y * log_p  # (B, C)
    if gamma_pos != 0:
        w_pos = one_minus_p.pow(gamma_pos)  # (1 - p)^{g+}, (B, C)
        if detach_focusing:
            w_pos = w_pos.detach()
        pos = pos * w_pos
    neg = (1 - y) * log_one_minus_pm  # (B, C)
    if gamma_neg != 0:
        w_neg = p_m.pow(gamma_neg)  # p_m^{g-}, (B, C)
        if detach_focusing:
            w_neg = w_neg.detach()
        neg = neg * w_neg
    return -(pos + neg)


class MultiLabelLoss(nn.Module):
    """Base class: input checks, float32 promotion and the ``sum`` / ``mean`` reduction.

    Subclasses implement ``_per_image(x, y) -> (B,)`` (per-image loss ``L_i``) and
    ``defaults()``.  ``reduction="sum"``: ``L = sum_i L_i``; ``"mean"``: ``L = sum_i L_i / B``;
    ``"mean-all"``: ``L = sum_i L_i / (B C)``.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}."
            )
        self.reduction = reduction

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Default hyper-parameters of this loss (what ``create_loss`` uses for ``None``)."""
        return {"reduction": "sum"}

    @classmethod
    def accepted_hyper_parameters(cls) -> Tuple[str, ...]:
        """Names of the keyword arguments the constructor takes."""
        params = inspect.signature(cls.__init__).parameters
        return tuple(name for name in params if name != "self")

    def _per_image(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Return the scalar float32 loss for ``logits`` (B, C) and multi-hot ``targets`` (B, C)."""
        name = type(self).__name__
        if logits.dim() != 2:
            raise ValueError(
                f"{name}: logits must be 2-D (batch, labels), got shape {tuple(logits.shape)}; "
                "flatten or unsqueeze them before the loss."
            )
        if targets.shape != logits.shape:
            raise ValueError(
                f"{name}: targets shape {tuple(targets.shape)} differs from logits shape "
                f"{tuple(logits.shape)}; pass one multi-hot row per image."
            )
        if logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ValueError(f"{name}: got an empty batch of shape {tuple(logits.shape)}; skip empty batches.")
        per_image = self._per_image(logits.float(), targets.float())  # (B,)
        if self.reduction == "mean":
            return per_image.mean()
        return per_image.sum() / reduction_factor(self.reduction, *logits.shape)  # sum: / 1, mean-all: / (B C)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.defaults())


class BCELoss(MultiLabelLoss):
    """Binary cross-entropy on logits.

    ``L = -sum_{i,c} [ y log p + (1 - y) log(1 - p) ]``, ``p = sigmoid(x)``,
    computed with ``F.binary_cross_entropy_with_logits`` for stability.
    Gradient: ``dL/dx = p - y``.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__(reduction)

    def _per_image(self, x: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(x, y, reduction="none").sum(dim=1)  # (B,)


class FocalLoss(MultiLabelLoss):
    """Symmetric focal loss (Lin et al. 2017, without alpha), default ``gamma = 3``.

    ``L = -sum_{i,c} [ y (1 - p)^g log p + (1 - y) p^g log(1 - p) ]`` with
    ``log p = logsigmoid(x)``, ``log(1 - p) = logsigmoid(-x)``.  ``gamma = 0`` is BCE.

    ``detach_focusing=True`` (default) treats the weights ``(1-p)^g``, ``p^g`` as constants
    in backward (as the ASL reference does); ``False`` gives the full analytic gradient (the study).
    ``eps > 0`` takes the log of probabilities clamped at ``eps`` (the study: 1e-8); 0 = exact.

    CLI convenience: ``gamma_pos`` / ``gamma_neg`` are accepted as aliases of ``gamma``
    only if every one of ``gamma``, ``gamma_pos``, ``gamma_neg`` that is not ``None`` has the
    same value (that value is then ``gamma``); differing values raise ``ValueError``
    (use ``AsymmetricLoss`` for different exponents).  All ``None`` means ``gamma = 3``.
    """

    DEFAULT_GAMMA = 3.0

    def __init__(
        self,
        gamma: Optional[float] = None,
        detach_focusing: bool = True,
        reduction: str = "sum",
        gamma_pos: Optional[float] = None,
        gamma_neg: Optional[float] = None,
        eps: float = 0.0,
    ) -> None:
        super().__init__(reduction)
        candidates = (("gamma", gamma), ("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg))
        given = {k: v for k, v in candidates if v is not None}
        if len(set(given.values())) > 1:
            raise ValueError(
                f"FocalLoss: got different exponents {given}; the focal loss has one gamma - pass a single "
                "value (or equal gamma_pos and gamma_neg), or use AsymmetricLoss for different ones."
            )
        value = next(iter(given.values())) if given else self.DEFAULT_GAMMA
        self.gamma = _check_non_negative("gamma", value, "FocalLoss")
        self.detach_focusing = bool(detach_focusing)
        self.eps = _check_eps(eps, "FocalLoss")

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Default hyper-parameters (gamma_pos / gamma_neg are only aliases of gamma)."""
        return {"gamma": cls.DEFAULT_GAMMA, "detach_focusing": True, "eps": 0.0, "reduction": "sum"}

    def _per_image(self, x: Tensor, y: Tensor) -> Tensor:
        return _focal_terms(x, y, self.gamma, self.gamma, 0.0, self.detach_focusing, self.eps).sum(dim=1)  # (B,)


class AsymmetricLoss(MultiLabelLoss):
    """Asymmetric loss, ASL (Ridnik et al. 2021); defaults ``gamma+ = 0, gamma- = 4, m = 0.05``.

    ``p_m = max(p - m, 0)`` (probability shifting of the negatives),
    ``L = -sum_{i,c} [ y (1 - p)^{g+} log p + (1 - y) p_m^{g-} log(1 - p_m) ]``,
    computed stably as ``log p = logsigmoid(x)`` and
    ``log(1 - p_m) = log(min(sigmoid(-x) + m, 1))`` (``= logsigmoid(-x)`` for m = 0).
    ``0^0 = 1``: zero exponents give plain BCE terms; m = 0, g+ = g- = g is Focal(g).
    Negatives with ``p <= m`` contribute 0 loss and exactly 0 gradient.

    ``detach_focusing=True`` (default, as the ASL reference which toggles grad mode - here a
    local ``.detach()``) excludes ``(1-p)^{g+}`` and ``p_m^{g-}`` from the gradient;
    ``False`` gives the full analytic gradient of the formula (the study). ``eps > 0`` takes the
    logs of ``max(p, eps)`` and ``max(1 - p_m, eps)`` (the study: 1e-8); 0 = exact.
    """

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        margin: float = 0.05,
        detach_focusing: bool = True,
        reduction: str = "sum",
        eps: float = 0.0,
    ) -> None:
        super().__init__(reduction)
        self.gamma_pos = _check_non_negative("gamma_pos", gamma_pos, "AsymmetricLoss")
        self.gamma_neg = _check_non_negative("gamma_neg", gamma_neg, "AsymmetricLoss")
        margin = _check_non_negative("margin", margin, "AsymmetricLoss")
        if margin >= 1:
            raise ValueError(
                f"AsymmetricLoss: margin must be in [0, 1) (it shifts probabilities), got {margin!r}; "
                "the usual value is 0.05."
            )
        self.margin = margin
        self.detach_focusing = bool(detach_focusing)
        self.eps = _check_eps(eps, "AsymmetricLoss")

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Default hyper-parameters."""
        return {"gamma_pos": 0.0, "gamma_neg": 4.0, "margin": 0.05, "detach_focusing": True, "eps": 0.0,
                "reduction": "sum"}

    def _per_image(self, x: Tensor, y: Tensor) -> Tensor:
        terms = _focal_terms(x, y, self.gamma_pos, self.gamma_neg, self.margin, self.detach_focusing,
                             self.eps)  # (B, C)
        return terms.sum(dim=1)  # (B,)


class LSEPLoss(MultiLabelLoss):
    """Log-sum-exp pairwise ranking loss, LSEP (Li et al. 2017).

    Per image ``i`` with positive labels ``P_i`` and negative labels ``N_i``:
    ``L_i = log(1 + sum_{v in P_i} sum_{u in N_i} exp(x_u - x_v))``.
    The double sum factorises, ``sum_u exp(x_u) * sum_v exp(-x_v)``, so
    ``L_i = softplus( LSE_{u in N_i}(x_u) + LSE_{v in P_i}(-x_v) )`` - O(B * C), in log
    space (no overflow for huge logits).  Images with no positive or no negative label
    have ``L_i = 0`` and zero gradient.  Targets are binarised as ``y > 0.5``.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__(reduction)

    def _per_image(self, x: Tensor, y: Tensor) -> Tensor:
        return _LSEPFunction.apply(x, y > 0.5)  # (B,)


class _LSEPFunction(torch.autograd.Function):
    """Per-image LSEP (B,) from logits x (B, C) and positives (B, C) bool, with its gradient made in the forward.

    With s = -1 on positives and +1 on negatives, z_i = LSE_{u in N_i}(x_u) + LSE_{v in P_i}(-x_v) and
    L_i = softplus(z_i), so dL_i/dx_c = sigmoid(z_i) * s_c * softmax over c's own group of (s x)_c.
    One pass of element-wise ops on (B, C) tensors; autograd through logsumexp/where costs ~2x more on a CPU.
    An empty group gives z_i = -inf, so L_i = 0 and a zero gradient (rows with no pair), with no NaN.
    """

    @staticmethod
    def forward(ctx, x: Tensor, pos: Tensor) -> Tensor:
        signed = torch.where(pos, -x, x)  # (B, C): -x_v on positives, x_u on negatives
        neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
        max_pos = torch.where(pos, signed, neg_inf).amax(dim=1, keepdim=True)  # (B, 1), -inf if no positive
        max_neg = torch.where(pos, neg_inf, signed).amax(dim=1, keepdim=True)  # (B, 1), -inf if no negative
        # Shift each entry by its own group's maximum: exp never overflows and each group's largest term is 1.
        e = torch.exp(signed - torch.where(pos, max_pos, max_neg))  # (B, C) in (0, 1]
        sum_pos = (e * pos).sum(dim=1, keepdim=True)  # (B, 1)
        sum_neg = e.sum(dim=1, keepdim=True) - sum_pos  # (B, 1)
        z = max_neg + torch.log(sum_neg) + max_pos + torch.log(sum_pos)  # (B, 1), -inf for rows without pairs
        loss = F.softplus(z).squeeze(1)  # (B,)
        weight = torch.sigmoid(z)  # (B, 1), 0 for rows without pairs
        # sign * softmax within the group: -e/sum_pos on positives, e/sum_neg on negatives.
        ctx.save_for_backward(torch.where(pos, -e * (weight / sum_pos), e * (weight / sum_neg)))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor):
        (grad_x,) = ctx.saved_tensors  # (B, C)
        return grad_x * grad_loss.unsqueeze(1), None


LOSSES: Dict[str, Type[MultiLabelLoss]] = {
    "BCELoss": BCELoss,
    "FocalLoss": FocalLoss,
    "AsymmetricLoss": AsymmetricLoss,
    "LSEPLoss": LSEPLoss,
}

LOSS_DEFAULTS: Dict[str, Dict[str, Any]] = {name: cls.defaults() for name, cls in LOSSES.items()}


def create_loss(name: str, **hyper: Any) -> MultiLabelLoss:
    """Build the loss registered as ``name`` in :data:`LOSSES`.

    ``None`` hyper-parameters mean "use the loss's default" and are dropped (like timm's
    factory), so the CLI can pass every option unconditionally.  A non-``None``
    hyper-parameter that the loss does not take raises ``ValueError``.

    Example: ``create_loss("AsymmetricLoss", gamma_pos=None, gamma_neg=2, margin=None)``
    -> ``AsymmetricLoss(gamma_pos=0.0, gamma_neg=2.0, margin=0.05)``.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {sorted(LOSSES)}.")
    cls = LOSSES[name]
    given = {k: v for k, v in hyper.items() if v is not None}
    accepted = cls.accepted_hyper_parameters()
    unexpected = sorted(k for k in given if k not in accepted)
    if unexpected:
        raise ValueError(
            f"Loss {name!r} does not accept {', '.join(f'{k}={given[k]!r}' for k in unexpected)}; "
            f"it takes {sorted(accepted)} - leave the others unset."
        )
    return cls(**given)
