"""Tests for losses.py: hand-computed values, autograd vs float64 references, closed-form
gradients, equivalences between losses, LSEP vs a brute-force double loop, registry/factory."""

import math

import pytest
import torch
from torch.testing import assert_close

from losses import (
    LOSS_DEFAULTS,
    LOSSES,
    AsymmetricLoss,
    BCELoss,
    FocalLoss,
    LSEPLoss,
    create_loss,
)

# Tiny fixed example, 2 images x 3 labels.
X = [[0.0, 2.0, -4.0], [1.0, -2.0, 3.0]]
Y = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]


def _xy(dtype=torch.float32, requires_grad=False):
    x = torch.tensor(X, dtype=dtype, requires_grad=requires_grad)
    y = torch.tensor(Y, dtype=dtype)
    return x, y


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _random_batch(seed, b=6, c=7, scale=3.0, dtype=torch.float32):
    """Random logits (B, C) and multi-hot targets (B, C) with an all-negative row, an
    all-positive row and a row with a single positive."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, generator=g) * scale).to(dtype)
    y = (torch.rand(b, c, generator=g) < 0.3).to(dtype)
    y[0] = 0.0
    y[1] = 1.0
    y[2] = 0.0
    y[2, 3] = 1.0
    return x, y


# ----------------------------------------------------------------------------- references
# Plain float64 formulas written out with naive sigmoid / log (independent of the module's
# logsigmoid / clamp tricks); the `detach` flag detaches the focusing weight.


def _ref_asl(x, y, gamma_pos, gamma_neg, margin, detach):
    p = 1.0 / (1.0 + torch.exp(-x))
    w_pos = (1.0 - p) ** gamma_pos
    p_m = torch.clamp(p - margin, min=0.0)
    w_neg = p_m**gamma_neg
    if detach:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    return -(y * w_pos * torch.log(p) + (1.0 - y) * w_neg * torch.log(1.0 - p_m)).sum()


def _ref_bce(x, y):
    p = 1.0 / (1.0 + torch.exp(-x))
    return -(y * torch.log(p) + (1.0 - y) * torch.log(1.0 - p)).sum()


def _grad(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    fn(x, y).backward()
    return x.grad


# ----------------------------------------------------------------------------- hand values


def test_bce_hand_values():
    # positives: log(1 + e^-x), negatives: log(1 + e^x)
    # row 0: x=0 (pos) log 2 = 0.693147; x=2 (neg) log(1+e^2) = 2.126928; x=-4 (neg) log(1+e^-4) = 0.018150
    # row 1: x=1 (neg) 1.313262; x=-2 (pos) log(1+e^2) = 2.126928; x=3 (pos) log(1+e^-3) = 0.048587
    # total = 6.327002
    expected = sum(
        math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x))
        for row_x, row_y in zip(X, Y)
        for x, y in zip(row_x, row_y)
    )
    assert abs(expected - 6.327002) < 1e-6
    x, y = _xy()
    loss = BCELoss()(x, y)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, torch.tensor(expected, dtype=torch.float32))
    assert_close(BCELoss(reduction="mean")(x, y), torch.tensor(expected / 2, dtype=torch.float32))


def test_focal_hand_values_default_gamma3():
    # p = sigmoid(x); pos: -(1-p)^3 log p, neg: -p^3 log(1-p)
    # row 0: 0.5^3*0.693147 = 0.086643; 0.880797^3*2.126928 = 1.453384; 0.017986^3*0.018150 = 1.06e-7
    # row 1: 0.731059^3*1.313262 = 0.513107; 0.880797^3*2.126928 = 1.453384; 0.047426^3*0.048587 = 5.18e-6
    # total = 3.506524
    expected = 0.0
    for row_x, row_y in zip(X, Y):
        for x, y in zip(row_x, row_y):
            p = _sig(x)
            expected += -((1 - p) ** 3 * math.log(p)) if y else -(p**3 * math.log(1 - p))
    assert abs(expected - 3.506524) < 1e-6
    x, y = _xy()
    assert FocalLoss().gamma == 3.0
    assert_close(FocalLoss()(x, y), torch.tensor(expected, dtype=torch.float32))


def test_asl_hand_values_defaults():
    # gamma+=0, gamma-=4, m=0.05; pos: -log p; neg: -p_m^4 log(1-p_m), p_m = max(p-0.05, 0)
    # row 0: x=0 pos log2 = 0.693147; x=2 neg p_m=0.830797 -> 0.830797^4 * -log(0.169203) = 0.846415;
    #        x=-4 neg p=0.017986 <= m -> p_m=0 -> 0
    # row 1: x=1 neg p_m=0.681059 -> 0.245860; x=-2 pos 2.126928; x=3 pos 0.048587
    # total = 3.960938
    expected = 0.0
    for row_x, row_y in zip(X, Y):
        for x, y in zip(row_x, row_y):
            p = _sig(x)
            p_m = max(p - 0.05, 0.0)
            expected += -math.log(p) if y else -(p_m**4) * math.log(1 - p_m)
    assert abs(expected - 3.960938) < 1e-6
    x, y = _xy()
    loss = AsymmetricLoss()
    assert (loss.gamma_pos, loss.gamma_neg, loss.margin) == (0.0, 4.0, 0.05)
    assert_close(loss(x, y), torch.tensor(expected, dtype=torch.float32))


def test_lsep_hand_values():
    # row 0: pos {0}, neg {2, -4}: log(1 + e^(2-0) + e^(-4-0)) = log(8.407372) = 2.129109
    # row 1: pos {-2, 3}, neg {1}: log(1 + e^(1+2) + e^(1-3)) = log(21.220872) = 3.054985
    # total = 5.184094
    expected = math.log(1 + math.exp(2) + math.exp(-4)) + math.log(1 + math.exp(3) + math.exp(-2))
    assert abs(expected - 5.184094) < 1e-6
    x, y = _xy()
    assert_close(LSEPLoss()(x, y), torch.tensor(expected, dtype=torch.float32))
    assert_close(LSEPLoss(reduction="mean")(x, y), torch.tensor(expected / 2, dtype=torch.float32))


# ----------------------------------------------------------------------------- gradients


def test_bce_gradient_closed_form():
    x, y = _random_batch(0)
    grad = _grad(BCELoss(), x, y)
    p = torch.sigmoid(x)
    # dL/dx = p - 1 for positives, p for negatives
    assert_close(grad, torch.where(y > 0, p - 1, p))
    assert_close(_grad(BCELoss(reduction="mean"), x, y), torch.where(y > 0, p - 1, p) / x.shape[0])


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize(
    "gammas_margin",
    [(0.0, 4.0, 0.05), (1.0, 2.0, 0.2), (2.0, 3.0, 0.0), (0.0, 0.0, 0.1)],
)
def test_asl_gradient_matches_float64_reference(gammas_margin, detach):
    gamma_pos, gamma_neg, margin = gammas_margin
    for seed in range(3):
        x, y = _random_batch(seed)
        loss = AsymmetricLoss(gamma_pos, gamma_neg, margin, detach_focusing=detach)
        grad = _grad(loss, x, y)
        ref = _grad(lambda a, b: _ref_asl(a, b, gamma_pos, gamma_neg, margin, detach), x.double(), y.double())
        ref_loss = _ref_asl(x.double(), y.double(), gamma_pos, gamma_neg, margin, detach)
        assert_close(loss(x, y).double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma_neg", [4.0, 1.5, 1.0, 0.0])
@pytest.mark.parametrize("detach", [False, True])
def test_asl_negatives_below_margin_have_exactly_zero_gradient(detach, gamma_neg):
    margin = 0.2
    # sigmoid(-3) = 0.047 and sigmoid(-1.5) = 0.18 are <= m; sigmoid(0.5) = 0.62 is not
    x = torch.tensor([[-3.0, -1.5, 0.5, 1.0]], requires_grad=True)
    y = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    loss = AsymmetricLoss(gamma_pos=1.0, gamma_neg=gamma_neg, margin=margin, detach_focusing=detach)(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert x.grad[0, 0].item() == 0.0 and x.grad[0, 1].item() == 0.0
    assert x.grad[0, 2].item() > 0.0 and x.grad[0, 3].item() < 0.0


def test_asl_gradient_closed_form_detached():
    # With the weight w detached: pos dL/dx = -w (1 - p), w = (1-p)^{g+};
    # neg dL/dx = w p (1 - p) / (1 - p + m) if p > m else 0, w = (p - m)^{g-}.
    gamma_pos, gamma_neg, m = 1.0, 2.0, 0.05
    x, y = _random_batch(4)
    grad = _grad(AsymmetricLoss(gamma_pos, gamma_neg, m, detach_focusing=True), x, y)
    xd = x.double()
    p = torch.sigmoid(xd)
    g_pos = -((1 - p) ** gamma_pos) * (1 - p)
    g_neg = torch.where(p > m, (p - m).clamp(min=0) ** gamma_neg * p * (1 - p) / (1 - p + m), torch.zeros_like(p))
    assert_close(grad.double(), torch.where(y > 0, g_pos, g_neg), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.0])
def test_focal_gradient_closed_form(gamma):
    x, y = _random_batch(5)
    xd = x.double()
    p = torch.sigmoid(xd)
    q = 1 - p
    # full gradient of -[y q^g log p + (1-y) p^g log q]:
    #   pos: g p q^g log p - q^{g+1};   neg: p^{g+1} - g q p^g log q
    full_pos = gamma * p * q**gamma * torch.log(p) - q ** (gamma + 1)
    full_neg = p ** (gamma + 1) - gamma * q * p**gamma * torch.log(q)
    full = torch.where(y > 0, full_pos, full_neg)
    # weight detached: pos -q^g q, neg p^g p
    detached = torch.where(y > 0, -(q ** (gamma + 1)), p ** (gamma + 1))
    assert_close(_grad(FocalLoss(gamma, detach_focusing=False), x, y).double(), full, rtol=1e-5, atol=1e-6)
    assert_close(_grad(FocalLoss(gamma, detach_focusing=True), x, y).double(), detached, rtol=1e-5, atol=1e-6)
    if gamma > 0:
        # the two modes really differ, so the flag is not a no-op
        assert not torch.allclose(full, detached)


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("detach", [False, True])
def test_focal_gamma0_and_asl_zero_equal_bce(detach):
    x, y = _random_batch(6)
    bce_loss, bce_grad = BCELoss()(x, y), _grad(BCELoss(), x, y)
    for loss in (FocalLoss(0.0, detach_focusing=detach), AsymmetricLoss(0.0, 0.0, 0.0, detach_focusing=detach)):
        assert_close(loss(x, y), bce_loss)
        assert_close(_grad(loss, x, y), bce_grad)
    assert_close(bce_loss.double(), _ref_bce(x.double(), y.double()), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 2.5, 3.0])
def test_asl_symmetric_no_margin_equals_focal(gamma, detach):
    x, y = _random_batch(7)
    asl = AsymmetricLoss(gamma, gamma, 0.0, detach_focusing=detach)
    focal = FocalLoss(gamma, detach_focusing=detach)
    assert_close(asl(x, y), focal(x, y))
    assert_close(_grad(asl, x, y), _grad(focal, x, y))
    ref_loss = _ref_asl(x.double(), y.double(), gamma, gamma, 0.0, detach)
    assert_close(focal(x, y).double(), ref_loss, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- LSEP


def _lsep_brute(x, y):
    """Per-image double loop: sum_i log(1 + sum_{v pos} sum_{u neg} exp(x_u - x_v)), float64."""
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        pos = [c for c in range(x.shape[1]) if y[i, c] > 0.5]
        neg = [c for c in range(x.shape[1]) if y[i, c] <= 0.5]
        if not pos or not neg:
            continue
        s = x.new_zeros(())
        for v in pos:
            for u in neg:
                s = s + torch.exp(x[i, u] - x[i, v])
        total = total + torch.log1p(s)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lsep_matches_brute_force(seed):
    x, y = _random_batch(seed, b=6, c=7)
    loss_fn = LSEPLoss()
    xg = x.clone().requires_grad_(True)
    loss = loss_fn(xg, y)
    loss.backward()
    xd = x.double().requires_grad_(True)
    ref = _lsep_brute(xd, y.double())
    ref.backward()
    assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    assert_close(xg.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    # rows 0 (no positive) and 1 (all positive) have exactly zero gradient
    assert torch.all(xg.grad[:2] == 0)
    assert_close(LSEPLoss(reduction="mean")(x, y), loss.detach() / x.shape[0])


def test_lsep_degenerate_rows_are_zero_without_nan():
    x = torch.randn(3, 5, requires_grad=True)
    y = torch.tensor([[0.0] * 5, [1.0] * 5, [0.0] * 5])
    loss = LSEPLoss()(x, y)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(x.grad == 0)


def test_lsep_large_logits_finite():
    # row: pos {-1e4}, neg {1e4, 0}: L = log(1 + e^(2e4) + e^(1e4)) = 2e4 (to float32 precision)
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss = LSEPLoss()(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # second row: log(1 + e^(-2e4) + e^(5-1e4)) = 0 in float32
    assert_close(loss, torch.tensor(2e4))
    # d/dx of the dominant pair (u=0, v=1): +1 for u, -1 for v
    assert_close(x.grad[0], torch.tensor([1.0, -1.0, 0.0]))


# ----------------------------------------------------------------------------- dtype / numerics


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_logits_give_float32_loss(name):
    x, y = _random_batch(8)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    loss_fn = create_loss(name)
    loss = loss_fn(xb, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    # same as float32 on the bf16-rounded logits
    assert_close(loss, loss_fn(xb.detach().float(), y))


@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_huge_logits_finite(name, detach):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(4, 6, generator=g).sign() * 1e4).requires_grad_(True)
    y = (torch.rand(4, 6, generator=g) < 0.5).float()
    hyper = {} if name in ("BCELoss", "LSEPLoss") else {"detach_focusing": detach}
    loss = create_loss(name, **hyper)(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_loss_does_not_touch_grad_mode():
    # The ASL reference toggles global grad mode inside forward; ours must leave it alone.
    x, y = _random_batch(10)
    with torch.no_grad():
        for name in sorted(LOSSES):
            create_loss(name)(x, y)
            assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


# ----------------------------------------------------------------------------- registry / factory


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registry_builds_and_backprops(name):
    loss_fn = create_loss(name)
    assert isinstance(loss_fn, LOSSES[name])
    x, y = _random_batch(11)
    x.requires_grad_(True)
    loss = loss_fn(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_none_hyper_parameters_mean_defaults(name):
    # exactly what the CLI passes when nothing is set
    loss_fn = create_loss(name, gamma_pos=None, gamma_neg=None, margin=None, reduction=None)
    defaults = LOSSES[name].defaults()
    assert LOSS_DEFAULTS[name] == defaults
    for key, value in defaults.items():
        assert getattr(loss_fn, key) == value


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mean_is_sum_over_batch_size(name):
    x, y = _random_batch(12)
    assert_close(create_loss(name, reduction="mean")(x, y), create_loss(name, reduction="sum")(x, y) / x.shape[0])


def test_create_loss_passes_values():
    asl = create_loss("AsymmetricLoss", gamma_pos=1, gamma_neg=2, margin=0.1, reduction="mean")
    assert (asl.gamma_pos, asl.gamma_neg, asl.margin, asl.reduction) == (1.0, 2.0, 0.1, "mean")
    assert create_loss("AsymmetricLoss", gamma_neg=2).gamma_pos == 0.0


def test_unknown_loss_lists_options():
    with pytest.raises(ValueError, match="NoSuchLoss") as info:
        create_loss("NoSuchLoss")
    assert str(sorted(LOSSES)) in str(info.value)


@pytest.mark.parametrize(
    "name,hyper", [("BCELoss", {"margin": 0.1}), ("LSEPLoss", {"gamma_neg": 4}), ("FocalLoss", {"margin": 0.05})]
)
def test_unaccepted_hyper_parameter_raises(name, hyper):
    with pytest.raises(ValueError, match=f"{name}.*{next(iter(hyper))}"):
        create_loss(name, **hyper)


def test_focal_gamma_aliases():
    assert create_loss("FocalLoss", gamma_pos=2, gamma_neg=2).gamma == 2.0
    assert create_loss("FocalLoss", gamma_pos=None, gamma_neg=1.5).gamma == 1.5
    assert create_loss("FocalLoss", gamma=2, gamma_pos=2).gamma == 2.0
    with pytest.raises(ValueError, match="AsymmetricLoss"):
        create_loss("FocalLoss", gamma_pos=0, gamma_neg=4)
    with pytest.raises(ValueError):
        FocalLoss(gamma=3, gamma_neg=2)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"\['sum', 'mean', 'mean-all'\]"):
        BCELoss(reduction="none")
    with pytest.raises(ValueError, match="eps"):
        AsymmetricLoss(eps=0.5)
    with pytest.raises(ValueError, match="margin"):
        AsymmetricLoss(margin=1.0)
    with pytest.raises(ValueError, match="gamma_neg"):
        AsymmetricLoss(gamma_neg=-1)
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=float("nan"))


def test_bad_input_shapes():
    loss = BCELoss()
    with pytest.raises(ValueError, match="differs"):
        loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, 3), torch.zeros(0, 3))


# ---------------------------------------------------------------- the study's definitions (--recipe study)

def _study_fixture():
    """Seeded (16, 260) logits and targets with all-negative rows, a label with no positive, and logits far enough
    out (+-25) to reach the study's 1e-8 clamp on both sides."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(16, 260, generator=g, dtype=torch.float64) * 4
    x[0, :8] = torch.tensor([-25.0, -21.0, 25.0, 22.0, -19.0, 19.0, 0.0, 30.0], dtype=torch.float64)
    y = (torch.rand(16, 260, generator=g) < 0.05).double()
    y[0, :8] = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0])  # positives at -25/-21/-19: clamped; negatives at 25/22/30
    y[[3, 7]] = 0  # images with no label
    y[:, 5] = 0  # a label with no positive
    return x, y


def _study_reference(name, x, y):
    """The study's losses (loss_functions.py + nn.MultiLabelSoftMarginLoss), written out in the study's precision:
    its model outputs `x` are float32, so p = sigmoid(x) is float32; its targets `y` are float64 (numpy float
    arrays), so every product with them, and the mean, is float64."""
    p = torch.sigmoid(x)
    if name == "BCELoss":  # MultiLabelSoftMarginLoss: -mean_c [y log sigmoid(x) + (1-y) log sigmoid(-x)], mean over B
        return -(y * torch.nn.functional.logsigmoid(x) + (1 - y) * torch.nn.functional.logsigmoid(-x)).mean()
    if name == "LSEPLoss":  # per image log(1 + sum_{v pos} sum_{u neg} exp(x_u - x_v)), divided by B
        total = 0  # the study's per-image loop, in float32 as its outputs
        y = y.float()
        for i in range(x.shape[0]):
            pos, neg = x[i][y[i] == 1], x[i][y[i] == 0]
            total = total + torch.log(1 + torch.exp(neg[None, :] - pos[:, None]).sum())
        return total / x.shape[0]
    gamma_pos, gamma_neg, margin = {"FocalLoss": (3, 3, 0.0), "AsymmetricLoss": (0, 4, 0.05)}[name]
    eps = 1e-8
    los_pos = y * torch.log(p.clamp(min=eps)) * ((1 - p) ** gamma_pos)
    p_m = (p - margin).clamp(min=0) if margin > 0 else p
    los_neg = (1 - y) * torch.log((1 - p_m).clamp(min=eps)) * (p_m ** gamma_neg)
    return -(los_pos + los_neg).mean()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_under_the_study_recipe_equals_the_studys_definition(name):
    from recipes import resolve
    from components import loss_from_config

    config = resolve({**_config_defaults(), "recipe": "study", "loss_function": name, "model": "TinyResNet",
                      "data": "Corel-5k"})
    loss = loss_from_config(config)
    x, y = _study_fixture()
    ours_x = x.float().requires_grad_(True)
    value = loss(ours_x, y.float())
    value.backward()
    ref_x = x.float().requires_grad_(True)
    reference = _study_reference(name, ref_x, y)
    reference.backward()
    assert abs(value.item() - reference.item()) / abs(reference.item()) < 1e-6
    # The gradient: relative error of the whole (16, 260) gradient below 1e-6, and entry by entry to float precision.
    error = (ours_x.grad.double() - ref_x.grad.double()).norm() / ref_x.grad.double().norm()
    assert error < 1e-6, float(error)
    assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6 * float(ref_x.grad.abs().max()))


def test_the_study_clamp_flattens_the_loss_of_a_hopeless_positive():
    # A positive at logit -25 (p = 1.4e-11 < 1e-8): the study charges a flat -log(1e-8) = 18.42 and no gradient.
    x = torch.tensor([[-25.0]], requires_grad=True)
    y = torch.ones(1, 1)
    study = AsymmetricLoss(eps=1e-8, detach_focusing=False, reduction="mean-all")(x, y)
    study.backward()
    assert study.item() == pytest.approx(-math.log(1e-8), rel=1e-6) and x.grad.item() == 0.0
    exact = AsymmetricLoss()(x.detach(), y)
    assert exact.item() == pytest.approx(25.0, rel=1e-6)


def test_mean_all_divides_the_sum_by_every_entry():
    x, y = _random_batch(3)
    for name in sorted(LOSSES):
        assert_close(create_loss(name, reduction="mean-all")(x, y), create_loss(name)(x, y) / x.numel())
    assert_close(BCELoss(reduction="mean-all")(x, y), torch.nn.MultiLabelSoftMarginLoss()(x, y))


def _config_defaults():
    from config import TRAINING_DEFAULTS

    return TRAINING_DEFAULTS


# ---------------------------------------------------------------- messages and options (killing mutants that survived)

@pytest.mark.parametrize("make, message", [
    (lambda: AsymmetricLoss(gamma_pos=-1), "AsymmetricLoss: gamma_pos must be a finite number >= 0, got -1; pass e.g. "
                                           "gamma_pos=0.0."),
    (lambda: AsymmetricLoss(gamma_neg=-2), "AsymmetricLoss: gamma_neg must be a finite number >= 0, got -2;"),
    (lambda: AsymmetricLoss(margin=-0.1), "AsymmetricLoss: margin must be a finite number >= 0, got -0.1;"),
    (lambda: AsymmetricLoss(margin=1.0), "AsymmetricLoss: margin must be in [0, 1) (it shifts probabilities), got 1.0; "
                                         "the usual value is 0.05."),
    (lambda: AsymmetricLoss(eps=-1.0), "AsymmetricLoss: eps must be a finite number >= 0, got -1.0;"),
    (lambda: AsymmetricLoss(eps=0.5), "AsymmetricLoss: eps clamps probabilities before the log and must be below 0.5, "
                                      "got 0.5; the study uses 1e-8, and 0 gives the exact log-sigmoid."),
    (lambda: FocalLoss(gamma=-3), "FocalLoss: gamma must be a finite number >= 0, got -3;"),
    (lambda: FocalLoss(gamma=True), "FocalLoss: gamma must be a finite number >= 0, got True;"),
    (lambda: FocalLoss(eps=0.7), "FocalLoss: eps clamps probabilities"),
    (lambda: FocalLoss(gamma=3, gamma_neg=2), "FocalLoss: got different exponents {'gamma': 3, 'gamma_neg': 2}; the "
                                              "focal loss has one gamma - pass a single value (or equal gamma_pos and "
                                              "gamma_neg), or use AsymmetricLoss for different ones."),
    (lambda: FocalLoss(gamma_pos=1, gamma_neg=2), "FocalLoss: got different exponents {'gamma_pos': 1, 'gamma_neg': 2};"),
    (lambda: BCELoss(reduction="none"), "BCELoss: unknown reduction 'none'"),
    (lambda: create_loss("BCELoss", gamma_pos=1, margin=2), "Loss 'BCELoss' does not accept gamma_pos=1, margin=2;"),
])
def test_each_bad_option_is_named_in_its_own_sentence(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value).startswith(message), str(error.value)


def test_bad_shapes_name_the_loss_and_the_fix():
    with pytest.raises(ValueError) as error:
        LSEPLoss()(torch.zeros(3), torch.zeros(3))
    assert str(error.value) == ("LSEPLoss: logits must be 2-D (batch, labels), got shape (3,); flatten or unsqueeze "
                                "them before the loss.")


def test_reduction_factors_and_accepted_hyper_parameters():
    from losses import reduction_factor

    assert [reduction_factor(r, 4, 3) for r in ("sum", "mean", "mean-all")] == [1, 4, 12]
    assert BCELoss.accepted_hyper_parameters() == ("reduction",)
    assert LSEPLoss.accepted_hyper_parameters() == ("reduction",)
    assert AsymmetricLoss.accepted_hyper_parameters() == ("gamma_pos", "gamma_neg", "margin", "detach_focusing",
                                                          "reduction", "eps")


def test_lsep_takes_a_half_target_as_negative():
    x = torch.tensor([[2.0, -1.0, 0.5]])
    half = LSEPLoss()(x, torch.tensor([[1.0, 0.5, 0.0]]))
    assert_close(half, LSEPLoss()(x, torch.tensor([[1.0, 0.0, 0.0]])))
