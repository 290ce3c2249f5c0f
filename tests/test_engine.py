"""The loops and the batch preprocessing (engine.py), against numpy and hand-made references."""
import numpy as np
import pytest
import torch
from torch import nn

from dataset import AnnotationDataset, Split, make_loader
from engine import (BatchPreprocessor, EpochProgress, NonFiniteLossError, epoch_flips, predict, resolve_precision,
                    train_one_epoch)
from losses import create_loss
from utils import UserError

MEAN, STD = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)


def test_preprocessor_normalises_each_channel_and_flips_the_width_axis_of_the_chosen_images():
    images = torch.randint(0, 256, (3, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flip = torch.tensor([True, False, True])
    out = BatchPreprocessor(MEAN, STD, torch.device("cpu"))(images, flip)
    x = images.numpy().astype(np.float64) / 255.0  # (B, 3, H, W)
    x[flip.numpy()] = x[flip.numpy()][..., ::-1]  # the last axis is the width
    expected = (x - np.array(MEAN)[None, :, None, None]) / np.array(STD)[None, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32 and out.shape == images.shape


def test_epoch_flips_depend_on_seed_and_epoch_only():
    a = epoch_flips(1000, seed=3, epoch=0)
    assert torch.equal(a, epoch_flips(1000, seed=3, epoch=0))
    assert not torch.equal(a, epoch_flips(1000, seed=3, epoch=1))
    assert not torch.equal(a, epoch_flips(1000, seed=4, epoch=0))
    assert a.dtype == torch.bool and 400 < int(a.sum()) < 600


def test_precision_defaults_on_cpu_and_fp16_needs_cuda(monkeypatch):
    import engine

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)  # the rest of the matrix: test_cpu_precision.py
    auto = resolve_precision("auto", "auto", cpu)
    assert auto.amp_dtype is None and not auto.channels_last
    assert resolve_precision("bf16", "on", cpu).amp_dtype is torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "auto", cpu)


class Constant(nn.Module):
    """Logits that do not depend on the image: one learnable vector (C,), so the loss is known in closed form."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def _loader(targets, batch=3):
    n = targets.shape[0]
    split = Split("s", [f"{i}" for i in range(n)], [None] * n, targets)
    cache = np.zeros((n, 3, 4, 4), dtype=np.uint8)
    return make_loader(AnnotationDataset(split, 4, cache=cache), batch, 0, shuffle=False)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_train_one_epoch_reports_the_loss_per_image_whatever_the_reduction(reduction):
    targets = torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0], [1, 0]])
    logits = [0.3, -1.2]
    model = Constant(logits)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # no change: every batch sees the same logits
    stats = train_one_epoch(model, _loader(targets), create_loss("BCELoss", reduction=reduction), optimizer,
                            torch.device("cpu"), BatchPreprocessor(MEAN, STD, torch.device("cpu")), epoch=0,
                            progress=False)
    p = 1 / (1 + np.exp(-np.array(logits)))
    y = targets.numpy()
    per_image = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(1)  # (N,)
    assert stats["train/loss"] == pytest.approx(per_image.mean(), rel=1e-6)


def test_train_one_epoch_stops_on_a_non_finite_loss_naming_the_batch():
    targets = torch.ones(6, 2)

    class Nan(nn.Module):
        def forward(self, logits, targets):
            return logits.sum() * float("nan")

    model, state = Constant([0.0, 0.0]), EpochProgress()
    with pytest.raises(NonFiniteLossError, match="epoch 3, batch 1"):
        train_one_epoch(model, _loader(targets), Nan(), torch.optim.SGD(model.parameters(), lr=0.1),
                        torch.device("cpu"), BatchPreprocessor(MEAN, STD, torch.device("cpu")), epoch=2, state=state,
                        progress=False)
    assert state.step == 0


def test_predict_returns_rows_in_dataset_order_with_sigmoid_probabilities():
    class ByIndex(nn.Module):  # logit = the image's mean pixel, which encodes its index
        def forward(self, x):
            return x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2)

    n = 7
    targets = torch.eye(2)[torch.arange(n) % 2]
    split = Split("s", [str(i) for i in range(n)], [None] * n, targets)
    cache = np.stack([np.full((3, 4, 4), 10 * i, dtype=np.uint8) for i in range(n)])
    loader = make_loader(AnnotationDataset(split, 4, cache=cache), 3, 0, shuffle=False)
    out = predict(ByIndex(), loader, torch.device("cpu"), BatchPreprocessor((0, 0, 0), (1, 1, 1), torch.device("cpu")),
                  progress=False)
    expected_logits = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2) * 10 / 255
    torch.testing.assert_close(out["logits"], expected_logits)
    torch.testing.assert_close(out["probs"], torch.sigmoid(expected_logits))
    assert torch.equal(out["targets"], targets) and out["indices"].tolist() == list(range(n))
    assert out["bad"].numel() == 0


def test_epoch_flips_keep_the_horizontal_draw_and_add_an_independent_vertical_one():
    n, seed, epoch = 500, 3, 2
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    first, second = torch.rand(n, generator=generator) < 0.5, torch.rand(n, generator=generator) < 0.5
    both = epoch_flips(n, seed, epoch, horizontal=True, vertical=True)
    assert torch.equal(both[:, 0], first) and torch.equal(both[:, 1], second)
    assert not epoch_flips(n, seed, epoch)[:, 1].any()  # vertical off by default
    assert not epoch_flips(n, seed, epoch, horizontal=False, vertical=True)[:, 0].any()
    assert 0.4 < (first == second).float().mean() < 0.6  # independent, not the same coin twice


def test_preprocessor_flips_rows_for_vertical_and_columns_for_horizontal():
    images = torch.arange(4 * 3 * 2 * 3, dtype=torch.uint8).view(4, 3, 2, 3)
    flips = torch.tensor([[False, False], [True, False], [False, True], [True, True]])
    out = BatchPreprocessor((0, 0, 0), (1 / 255, 1 / 255, 1 / 255), torch.device("cpu"))(images, flips)
    x = images.numpy().astype(np.float64)
    expected = np.stack([x[0], x[1][..., ::-1], x[2][:, ::-1, :], x[3][:, ::-1, ::-1]])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)
