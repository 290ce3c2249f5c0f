"""The straightforward way, written plainly, for bench/run.py to measure the project against (never used in training).

* `ReferenceImageDataset`: per-sample PIL decode + resize every epoch, then torchvision's ToTensor (float32 in
  [0, 1]), RandomHorizontalFlip and Normalize inside the DataLoader worker, so float batches cross the process
  boundary (4x the bytes of uint8).
* `lsep_loop`: LSEP with a Python loop over the images and the explicit |N_i| x |P_i| pairwise matrix per image.
* `mcc_scores_sklearn` / `mcc_thresholds_sklearn`: scikit-learn's matthews_corrcoef in a double loop over
  labels x grid points.
* `reference_train_step` / `reference_predict`: fp32, NCHW, float input already normalised, plain Adam.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import matthews_corrcoef
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class ReferenceImageDataset(Dataset):
    """Items (float image (3, S, S) normalised, target (C,)): open, RGB, bilinear resize, [flip], ToTensor, Normalize."""

    def __init__(self, paths: Sequence[Path], targets: torch.Tensor, image_size: int, mean, std, flip: bool = True):
        self.paths, self.targets = list(paths), targets
        steps = [transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BILINEAR)]
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as im:
            image = im.convert("RGB")
        return self.transform(image), self.targets[index]


def reference_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int = 0) -> DataLoader:
    """The usual shuffled DataLoader over `dataset`."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


def lsep_loop(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i log(1 + sum_{v in P_i} sum_{u in N_i} exp(x_iu - x_iv)), image by image, pairs spelled out.

    Images without a positive or without a negative label contribute 0, as in losses.LSEPLoss.
    """
    total = logits.new_zeros(())
    for i in range(logits.shape[0]):
        positive = logits[i][targets[i] > 0.5]  # (P,)
        negative = logits[i][targets[i] <= 0.5]  # (N,)
        if positive.numel() == 0 or negative.numel() == 0:
            continue
        pairs = negative[:, None] - positive[None, :]  # (N, P): x_u - x_v
        total = total + torch.log1p(torch.exp(pairs).sum())
    return total


def mcc_scores_sklearn(targets: np.ndarray, probs: np.ndarray, grid: Sequence[float],
                       labels: Sequence[int] | None = None) -> np.ndarray:
    """MCC (G, L) of labels `labels` (default all) at each grid point, predicting probs >= t; one sklearn call each."""
    labels = range(targets.shape[1]) if labels is None else labels
    # Compare in probs' dtype, as thresholds.py does (a float32 score against a float64 0.05 would differ).
    grid = np.asarray(grid).astype(probs.dtype)
    scores = np.zeros((len(grid), len(labels)))
    for j, c in enumerate(labels):
        for g, t in enumerate(grid):
            scores[g, j] = matthews_corrcoef(targets[:, c], probs[:, c] >= t)
    return scores


def mcc_thresholds_sklearn(targets: np.ndarray, probs: np.ndarray, grid: Sequence[float],
                           labels: Sequence[int] | None = None, default: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds (L,), scores (G, L)): the first grid point of best MCC per label; `default` where MCC is 0 everywhere."""
    scores = mcc_scores_sklearn(targets, probs, grid, labels)
    grid = np.asarray(grid).astype(probs.dtype)
    chosen = grid[scores.argmax(axis=0)]
    return np.where((scores == 0).all(axis=0), np.asarray(default, dtype=probs.dtype), chosen), scores


def reference_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                         images: torch.Tensor, targets: torch.Tensor) -> float:
    """One fp32 NCHW step on an already normalised float batch (B, 3, S, S); returns the loss."""
    model.train()
    loss = criterion(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def reference_predict(model: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 NCHW sigmoid outputs (N, C) over normalised float batches."""
    model.eval()
    return torch.cat([torch.sigmoid(model(x)) for x in batches])
