"""Training-image augmentations of the modern multi-label recipe: Cutout and RandAugment, per image in the loader.

The ASL training recipe (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021, train.py of
its repository) applies, after the resize, Cutout with a box of half the image side filled with a random colour,
then RandAugment. `TrainAugmentation` does the same on the uint8 (3, S, S) tensors of dataset.AnnotationDataset
(its `transform` hook), before the batched flip and normalisation of engine.BatchPreprocessor.

Determinism: every random draw for image `index` in `epoch` comes from a generator seeded with (seed, epoch,
index) alone, so a run gives the same images whatever the worker count or batch order, an interrupted run resumes
bit-identically, and runs with the same seed are identical. The process-wide torch RNG (dropout) is left as it was.
Call `set_epoch` before each epoch's DataLoader iterator is created: workers receive a copy of the dataset with
the epoch it had then (the loaders of this project do not keep workers alive across epochs).
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from utils import UserError


class AugmentationError(UserError, ValueError):
    """An augmentation setting the user can fix."""


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on (seed, epoch, index) alone (numpy's SeedSequence hash; negative seeds allowed)."""
    words = np.random.SeedSequence([seed % 2**64, epoch % 2**64, index % 2**64]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def cutout(image: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """ASL's CutoutPIL on a uint8 image (3, H, W): a box of round(factor*H) x round(factor*W) around a uniform random
    centre (y_c in [0, H), x_c in [0, W)), clipped to the image, filled with a uniform random RGB colour.

    Rows y_c - h//2 .. y_c + h//2 - 1 and the same for columns are filled; returns a new tensor.
    """
    _, height, width = image.shape
    box_h, box_w = int(factor * height + 0.5), int(factor * width + 0.5)
    y_c = int(torch.randint(height, (), generator=generator))
    x_c = int(torch.randint(width, (), generator=generator))
    colour = torch.randint(0, 256, (3,), generator=generator, dtype=torch.uint8)  # (3,)
    y1, y2 = max(y_c - box_h // 2, 0), min(y_c + box_h // 2, height)
    x1, x2 = max(x_c - box_w // 2, 0), min(x_c + box_w // 2, width)
    out = image.clone()
    out[:, y1:y2, x1:x2] = colour[:, None, None]
    return out


class TrainAugmentation:
    """Cutout (if `cutout_factor` > 0) then RandAugment (if `randaugment`) of one uint8 image (3, S, S).

    RandAugment (Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search space",
    NeurIPS 2020) is torchvision's: `num_ops` operations drawn uniformly from its 14, each at `magnitude` of 31
    bins (9 = torchvision's and timm's default), filled with the ImageNet mean colour outside the image.
    """

    # ImageNet mean on the uint8 scale, timm's RandAugment fill: rotated/translated borders look like an average pixel.
    FILL = [124, 116, 104]

    def __init__(self, seed: int, randaugment: bool = False, cutout_factor: float = 0.0, num_ops: int = 2,
                 magnitude: int = 9):
        if not 0 <= cutout_factor <= 1:
            raise AugmentationError(f"--cutout must be a fraction of the image side in [0, 1] (ASL uses 0.5), "
                                    f"not {cutout_factor}.")
        self.seed, self.epoch = seed, 0
        self.cutout_factor = cutout_factor
        self.randaugment = v2.RandAugment(num_ops=num_ops, magnitude=magnitude, fill=self.FILL) if randaugment else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """uint8 (3, S, S) -> uint8 (3, S, S), a pure function of (image, seed, epoch, index)."""
        key = item_seed(self.seed, self.epoch, index)
        if self.cutout_factor > 0:
            image = cutout(image, self.cutout_factor, torch.Generator().manual_seed(key))
        if self.randaugment is not None:
            # torchvision draws from the process-wide CPU generator: seed it for this image inside a fork, so the
            # draws depend on (seed, epoch, index) only and the training RNG (dropout) is restored afterwards.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(key ^ 0x5DEECE66D)
                image = self.randaugment(image)
        return image


def make_train_augmentation(randaugment: bool, cutout_factor: float, seed: int) -> TrainAugmentation | None:
    """`TrainAugmentation` with RandAugment on/off and Cutout of `cutout_factor` (0 = off), or None when both are off."""
    if not randaugment and cutout_factor == 0:
        return None
    return TrainAugmentation(seed, randaugment=randaugment, cutout_factor=cutout_factor)
