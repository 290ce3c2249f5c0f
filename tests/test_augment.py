"""Per-image training augmentation (augment.py): Cutout by hand, RandAugment's determinism per (seed, epoch, index)."""
import torch

from augment import TrainAugmentation, cutout, item_seed, make_train_augmentation
from dataset import AnnotationDataset, load_dataset, make_loader


def test_cutout_fills_one_box_of_the_hand_computed_size_with_one_colour():
    image = torch.full((3, 10, 8), 7, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(3)
    out = cutout(image, 0.5, generator)
    replay = torch.Generator().manual_seed(3)
    y_c, x_c = int(torch.randint(10, (), generator=replay)), int(torch.randint(8, (), generator=replay))
    colour = torch.randint(0, 256, (3,), generator=replay, dtype=torch.uint8)
    # Box 5 x 4 (round(0.5 * 10), round(0.5 * 8)): rows y_c-2 .. y_c+1, columns x_c-2 .. x_c+1, clipped.
    mask = torch.zeros(10, 8, dtype=torch.bool)
    mask[max(y_c - 2, 0):min(y_c + 2, 10), max(x_c - 2, 0):min(x_c + 2, 8)] = True
    expected = torch.where(mask, colour[:, None, None], image)
    assert torch.equal(out, expected) and torch.equal(image, torch.full((3, 10, 8), 7, dtype=torch.uint8))


def test_augmentation_depends_on_seed_epoch_and_index_only_and_leaves_the_global_rng():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = TrainAugmentation(seed=5, randaugment=True, cutout_factor=0.5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = aug(image, 4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(aug(image, 4), first)
    assert not torch.equal(aug(image, 5), first)
    aug.set_epoch(1)
    assert not torch.equal(aug(image, 4), first)
    assert item_seed(5, 1, 4) != item_seed(5, 0, 4) and item_seed(-1, 0, 0) >= 0


def test_augmented_batches_are_the_same_with_zero_or_two_workers(tiny_dataset):
    data = load_dataset(tiny_dataset, val_size=6)
    batches = {}
    for workers in (0, 2):
        aug = TrainAugmentation(seed=0, randaugment=True, cutout_factor=0.5)
        loader = make_loader(AnnotationDataset(data.train, 32, transform=aug), 8, workers, shuffle=True, seed=0)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            aug.set_epoch(epoch)
            batches[workers, epoch] = next(iter(loader))[0]
    assert torch.equal(batches[0, 0], batches[2, 0]) and torch.equal(batches[0, 1], batches[2, 1])
    assert not torch.equal(batches[0, 0], batches[0, 1])


def test_make_train_augmentation_is_none_when_both_are_off():
    assert make_train_augmentation(False, 0.0, seed=0) is None
    aug = make_train_augmentation(True, 0.5, seed=3)
    assert aug.seed == 3 and aug.cutout_factor == 0.5 and aug.randaugment is not None
    assert make_train_augmentation(False, 0.25, seed=0).randaugment is None
