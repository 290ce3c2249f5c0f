"""Datasets in the annotation format shared by Corel-5k, ESP-Game and IAPR-TC-12.

Layout of a dataset root::

    <root>/train.json       {"samples": [{"image_name": "1000.jpeg", "image_labels": ["sky", "sun"]}, ...],
    <root>/test.json         "labels": [...vocabulary...]}
    <root>/train_aug.json   (optional, --augmentation) the GAN-generated copies, same format ("labels" may be absent)
    <root>/images/          the photos (the published archive also keeps generated images here)
    <root>/aug-images/      where our ML-WGAN-GP writes its generated images

The vocabulary order is the order of train.json's "labels"; targets are multi-hot float vectors in that order.
Images are decoded to RGB (grey, CMYK, palette and RGBA images included), resized to a square
`image_size` x `image_size` with bilinear filtering (as the study does) and handed out as uint8 (3, S, S)
tensors: conversion to float, flips and normalisation happen batched on the compute device (engine.py).

Honest protocol: a validation split (`val_size` images, seeded) is held out of train.json for model
selection and threshold fitting; the GAN copies of validation images are dropped from training so that
nothing about a validation image leaks into training.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils import UserError, first_sentence

REPO_DIR = Path(__file__).resolve().parent
# CLI name -> folder next to main.py (the study keeps Corel-5k there).
DATASETS = {"Corel-5k": REPO_DIR / "Corel-5k", "ESP-Game": REPO_DIR / "ESP-Game", "IAPR-TC-12": REPO_DIR / "IAPR-TC-12"}
DEFAULT_DATA = "Corel-5k"  # the CLI's default --data
DEMO_ROOT = REPO_DIR / "data" / "demo"
IMAGE_DIRS = ("images", "aug-images")
# The study's normalisation (its dataset.py get_mean_std): Corel-5k's 4,500 training images, and the 18,000 with the
# ML-WGAN-GP copies (--augmentation); (mean, std) per RGB channel on the [0, 1] scale.
COREL5K_STATISTICS = {False: ((0.3928, 0.4079, 0.3531), (0.2559, 0.2436, 0.2544)),
                      True: ((0.4249, 0.4365, 0.3926), (0.1955, 0.1830, 0.1987))}
# A GAN copy is named <original stem><suffix>.<ext>; the longest suffixes first so that "_aug" matches last.
AUG_SUFFIX = re.compile(r"(_aug_hor_flip|_aug_rot_90|_aug)$")
FIRST_FEW = 5


class DatasetError(UserError, ValueError):
    """A dataset problem the user can fix (missing folder, malformed annotation file, missing images...)."""


class BadImageError(UserError, OSError):
    """An image file that cannot be read or decoded; `reason` says why in a few words."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def resolve_data_root(data: str) -> Path:
    """Map `--data` (a dataset name, 'demo', or a path) to an existing dataset root folder.

    'demo' generates the built-in demo dataset on first use (see demo_dataset.py).
    """
    if data == "demo":
        from demo_dataset import ensure_demo_dataset  # imported lazily: only the demo needs the generator

        return ensure_demo_dataset(DEMO_ROOT)
    root = DATASETS.get(data, Path(data)).expanduser()
    if not root.is_dir():
        hint = ("put the dataset there (train.json, test.json and images/; see Corel-5k/README.md)"
                if data in DATASETS else "check the path")
        raise DatasetError(
            f"Dataset root '{root}' does not exist: {hint}, pass --data with another path "
            f"(known names: {', '.join(sorted(DATASETS))}), or run the built-in demo with --data demo.")
    return root


def read_annotations(path: str | Path, require_labels: bool = True) -> tuple[list[dict], list[str] | None]:
    """Read one annotation JSON file and return (samples, vocabulary).

    Each sample is a dict with "image_name" (str) and "image_labels" (list of str). The vocabulary is the
    file's "labels" list, or None when `require_labels` is False and the file has none (train_aug.json).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Annotation file '{path}' is missing: a dataset root needs train.json and test.json "
                           f"in the format {{\"samples\": [{{\"image_name\", \"image_labels\"}}], \"labels\": [...]}}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"Annotation file '{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} "
                           f"(character {e.pos}); fix or re-download the file.") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"Annotation file '{path}' is not UTF-8 text (byte {e.start}); "
                           f"it should be a JSON file.") from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list):
        raise DatasetError(f"Annotation file '{path}' has no \"samples\" list at the top level; expected "
                           f"{{\"samples\": [{{\"image_name\": ..., \"image_labels\": [...]}}], \"labels\": [...]}}.")
    vocabulary = data.get("labels")
    if vocabulary is None and require_labels:
        raise DatasetError(f"Annotation file '{path}' has no \"labels\" list (the vocabulary); add it at the top level.")
    if vocabulary is not None:
        if not isinstance(vocabulary, list) or not all(isinstance(v, str) for v in vocabulary):
            raise DatasetError(f"Annotation file '{path}': \"labels\" must be a list of strings.")
        duplicates = sorted({v for v in vocabulary if vocabulary.count(v) > 1}) if len(set(vocabulary)) != len(vocabulary) else []
        if duplicates:
            raise DatasetError(f"Annotation file '{path}': the vocabulary lists {duplicates} more than once.")
    for i, s in enumerate(data["samples"]):
        if (not isinstance(s, dict) or not isinstance(s.get("image_name"), str)
                or not isinstance(s.get("image_labels"), list)
                or not all(isinstance(label, str) for label in s["image_labels"])
                or not isinstance(s.get("original", ""), str)):
            raise DatasetError(f"Annotation file '{path}': sample {i} ({str(s)[:80]}) needs a string \"image_name\" "
                               f"and a list of strings \"image_labels\" (and \"original\", if given, a string).")
    return data["samples"], vocabulary


def multi_hot(samples: Sequence[dict], vocabulary: Sequence[str], source: str | Path) -> torch.Tensor:
    """Multi-hot float targets (N, C) in vocabulary order; labels outside the vocabulary are an error."""
    index = {label: j for j, label in enumerate(vocabulary)}
    unknown = sorted({label for s in samples for label in s["image_labels"] if label not in index})
    if unknown:
        raise DatasetError(f"Annotation file '{source}' uses {len(unknown)} label(s) that are not in the vocabulary: "
                           f"{', '.join(unknown[:20])}{' ...' if len(unknown) > 20 else ''}; add them to \"labels\" "
                           f"or fix the samples.")
    rows = [i for i, s in enumerate(samples) for _ in s["image_labels"]]
    cols = [index[label] for s in samples for label in s["image_labels"]]
    targets = torch.zeros(len(samples), len(vocabulary))  # (N, C)
    targets[rows, cols] = 1.0
    return targets


def locate_images(root: Path, names: Sequence[str]) -> list[Path | None]:
    """Path of each image under <root>/images/ or <root>/aug-images/ (None where it is in neither)."""
    listings = [(root / d, set(p.name for p in (root / d).iterdir()) if (root / d).is_dir() else set()) for d in IMAGE_DIRS]
    # Names may carry sub-folders; those are checked on disk, plain names against the listings (fast for 20k files).
    found = []
    for name in names:
        hit = None
        for folder, listing in listings:
            if ("/" not in name and name in listing) or ("/" in name and (folder / name).is_file()):
                hit = folder / name
                break
        found.append(hit)
    return found


@dataclass
class Split:
    """One split: image names, their files and multi-hot targets (N, C); `sources[i]` names the original a GAN copy
    was generated from (None for an original image)."""

    name: str
    image_names: list[str]
    paths: list[Path]
    targets: torch.Tensor
    skipped: list[str] = field(default_factory=list)  # listed images that were missing and skipped
    sources: list[str | None] | None = None  # None: every row is an original

    def __post_init__(self) -> None:
        if self.sources is None:
            self.sources = [None] * len(self.image_names)

    def __len__(self) -> int:
        return len(self.image_names)

    @property
    def generated(self) -> torch.Tensor:
        """(N,) bool: which rows are GAN copies."""
        return torch.tensor([s is not None for s in self.sources], dtype=torch.bool)

    def subset(self, indices: Sequence[int], name: str, keep_skipped: bool = False) -> "Split":
        """Rows `indices` (in that order) as a split called `name`; it inherits the list of skipped images only
        with `keep_skipped` (the part that stands for the whole)."""
        idx = list(indices)
        return Split(name, [self.image_names[i] for i in idx], [self.paths[i] for i in idx], self.targets[idx],
                     list(self.skipped) if keep_skipped else [], [self.sources[i] for i in idx])

    def __add__(self, other: "Split") -> "Split":
        return Split(self.name, self.image_names + other.image_names, self.paths + other.paths,
                     torch.cat([self.targets, other.targets]), self.skipped + other.skipped,
                     self.sources + other.sources)


@dataclass
class DatasetSplits:
    root: Path
    vocabulary: list[str]
    train: Split
    val: Split
    test: Split
    protocol: str  # "holdout" (validation held out of train.json) or "study" (selection on the test set)

    def sizes(self) -> dict[str, int]:
        """Images per split; under the study's protocol there is no validation split (the test set selects)."""
        if self.protocol == "study":
            return {"train": len(self.train), "test": len(self.test)}
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _make_split(root: Path, filename: str, vocabulary: list[str], skip_missing: bool, name: str,
                require_labels: bool = True) -> Split:
    path = root / filename
    samples, file_vocabulary = read_annotations(path, require_labels=require_labels)
    if file_vocabulary is not None and file_vocabulary != vocabulary:
        only_here = [v for v in file_vocabulary if v not in vocabulary]
        only_train = [v for v in vocabulary if v not in file_vocabulary]
        detail = (f"only in {filename}: {only_here[:10]}; only in train.json: {only_train[:10]}"
                  if only_here or only_train else "same labels in a different order")
        raise DatasetError(f"The vocabulary of '{path}' differs from train.json's ({detail}); "
                           f"all splits must share one \"labels\" list in the same order.")
    targets = multi_hot(samples, vocabulary, path)
    names = [s["image_name"] for s in samples]
    paths = locate_images(root, names)
    missing = [n for n, p in zip(names, paths) if p is None]
    if missing and not skip_missing:
        raise DatasetError(
            f"{len(missing)} of {len(names)} images listed in '{path}' are not in {root / 'images'} or "
            f"{root / 'aug-images'} (first few: {', '.join(missing[:FIRST_FEW])}); add the images, or pass "
            f"--skip-bad-images to train without them.")
    keep = [i for i, p in enumerate(paths) if p is not None]
    sources = [_source(samples[i]) for i in keep] if not require_labels else None
    return Split(name, [names[i] for i in keep], [paths[i] for i in keep], targets[keep], missing, sources)


def _source(sample: dict) -> str:
    """The original image of a GAN copy: its "original" field (written by DataAugmentation), else derived from the
    study's naming ('1000_aug_rot_90.jpeg' -> '1000.jpeg'), which only holds for .jpeg/.jpg originals."""
    return sample.get("original") or original_name(sample["image_name"])


def original_name(image_name: str) -> str:
    """The training image a GAN copy was made from: '1000_aug_rot_90.jpeg' -> '1000.jpeg'."""
    stem, dot, ext = image_name.rpartition(".")
    if not dot:
        stem, ext = image_name, ""
    base = AUG_SUFFIX.sub("", stem)
    return f"{base}.{ext}" if dot else base


def load_dataset(root: Path, augmentation: bool = False, val_size: int = 500, seed: int = 0,
                 select_on_test: bool = False, skip_missing: bool = False, shuffle_once: bool = False) -> DatasetSplits:
    """Read train/test (and train_aug with `augmentation`) under `root` and build train/val/test splits.

    With `select_on_test` the study's protocol is used: no validation split, the test set serves for model
    selection. Otherwise `val_size` images of train.json (a seeded permutation) are held out as validation.
    `shuffle_once` permutes the final training split (GAN copies included) as the study's dataset does,
    `sklearn.utils.shuffle(samples, random_state=0)`.
    """
    _, vocabulary = read_annotations(root / "train.json")
    train = _make_split(root, "train.json", vocabulary, skip_missing, "train")
    test = _make_split(root, "test.json", vocabulary, skip_missing, "test")
    if select_on_test:
        val, protocol = test, "study"
    else:
        if len(train) < 2:
            raise DatasetError(f"train.json has {len(train)} usable image{'s' * (len(train) != 1)}: holding out a "
                               f"validation split needs at least 2 (one to train on); add images, or pass "
                               f"--select-on-test for the study's protocol.")
        if not 0 < val_size < len(train):
            raise DatasetError(f"--val-size {val_size} must be between 1 and {len(train) - 1} (train.json has "
                               f"{len(train)} usable images); or pass --select-on-test for the study's protocol.")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
        val = train.subset(sorted(order[:val_size]), "val")
        train = train.subset(sorted(order[val_size:]), "train", keep_skipped=True)
        protocol = "holdout"
    if augmentation:
        aug = _make_split(root, "train_aug.json", vocabulary, skip_missing, "train_aug", require_labels=False)
        # Drop GAN copies of validation images: they would leak validation content into training.
        held_out = set(val.image_names) if protocol == "holdout" else set()
        train = train + aug.subset([i for i, src in enumerate(aug.sources) if src not in held_out], "train_aug",
                                   keep_skipped=True)
    if shuffle_once:
        from sklearn.utils import shuffle  # the study's own call, so the permutation is the study's

        train = train.subset(shuffle(np.arange(len(train)), random_state=0).tolist(), "train", keep_skipped=True)
    return DatasetSplits(root, vocabulary, train, val, test, protocol)


# Integer greyscale modes whose values run to 65535 (16-bit PNG/TIFF): PIL's own conversion to RGB clips them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB of any PIL mode: 16-bit greyscale scaled to 8 bits (v / 257, so 65535 -> 255), palette transparency
    through RGBA, everything else by PIL's conversion (CMYK, L, P, RGBA: alpha dropped)."""
    if im.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(im, dtype=np.float64)  # (H, W) in 0..65535
        im = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "P" and "transparency" in im.info:
        # Palette images with transparency must pass through RGBA, or PIL warns and may pick wrong colours.
        im = im.convert("RGBA")
    return im.convert("RGB")


def fold_of(split: Split, folds: int, seed: int) -> torch.Tensor:
    """Fold (N,) in 0..folds-1 of every row of `split`: the originals by a seeded permutation (original r of the
    permutation goes to fold r % folds, so folds differ in size by one at most), each GAN copy with its original."""
    originals = [i for i, src in enumerate(split.sources) if src is None]
    order = torch.randperm(len(originals), generator=torch.Generator().manual_seed(seed * 7919 + folds))
    fold_by_name = {split.image_names[originals[int(j)]]: r % folds for r, j in enumerate(order)}
    return torch.tensor([fold_by_name.get(src if src is not None else name, -1)
                         for name, src in zip(split.image_names, split.sources)])


def image_problem(error: Exception) -> str:
    """Why an image could not be read, in a few words (for lists of skipped images)."""
    if isinstance(error, Image.DecompressionBombError):
        return (f"larger than PIL's limit for untrusted images ({2 * Image.MAX_IMAGE_PIXELS:,} pixels); "
                f"resize it")
    if isinstance(error, FileNotFoundError):
        return "missing"
    return f"{type(error).__name__}: {first_sentence(error)}"


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Decode one image to RGB (see `to_rgb`), resize it to (image_size, image_size) bilinearly; uint8 (3, S, S).

    Images above PIL's decompression-bomb warning size (89 Mpx) load without its raw warning; above twice that,
    PIL refuses them, and so does this, saying why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = to_rgb(im).resize((image_size, image_size), Image.BILINEAR)
                array = np.asarray(im, dtype=np.uint8)  # (S, S, 3)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"Image '{path}' cannot be read ({image_problem(e)}); replace the file, or pass "
                            f"--skip-bad-images to skip unreadable images.", reason=image_problem(e)) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class AnnotationDataset(Dataset):
    """Images of one split as uint8 (3, S, S) tensors with multi-hot targets.

    Items are (image, target, index, ok). With `skip_bad_images`, an unreadable image gives a zero image and
    ok=False, and the training loop drops it from the batch and counts it; otherwise it raises BadImageError.
    With `cache` (an array (N, 3, S, S) uint8 from image_cache.py) images are read from it instead of decoded.
    `transform(image, index) -> image` (uint8 (3, S, S) both) is applied to every readable image, in the loader's
    workers: the per-image training augmentation of augment.py, keyed by the index so it is reproducible.
    """

    def __init__(self, split: Split, image_size: int, skip_bad_images: bool = False, cache: np.ndarray | None = None,
                 transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None):
        self.split = split
        self.image_size = image_size
        self.skip_bad_images = skip_bad_images
        self.cache = cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        target = self.split.targets[index]
        if self.cache is not None:
            image = torch.from_numpy(np.ascontiguousarray(self.cache[index]))
        else:
            try:
                image = load_image(self.split.paths[index], self.image_size)
            except BadImageError:
                if not self.skip_bad_images:
                    raise
                return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), target, index, False
        if self.transform is not None:
            image = self.transform(image, index)
        return image, target, index, True


def split_fingerprint(split: Split, image_size: int) -> str:
    """A key that changes whenever the split's files, their sizes/mtimes or the image size change."""
    h = hashlib.sha1(f"{split.name}|{image_size}".encode())
    for p in split.paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class EpochSampler(torch.utils.data.Sampler):
    """Index order for one epoch: a permutation drawn from (seed, epoch) alone, or 0..N-1 when not shuffling.

    `set_epoch(epoch, skip=k)` starts the epoch after its first k indices, so an interrupted epoch resumes with
    exactly the batches it had left. With `num_replicas` > 1 (DistributedDataParallel) each rank takes every
    num_replicas-th index of the order padded to a multiple of num_replicas, as DistributedSampler does.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        padded = -(-self.num_samples // self.num_replicas) * self.num_replicas
        if padded > self.num_samples:
            # Pad with the first indices so every rank gets the same count (evaluation de-duplicates them).
            order = torch.cat([order, order[: padded - self.num_samples]])
        return order[self.rank::self.num_replicas].tolist()[self.skip:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return max(-(-self.num_samples // self.num_replicas) - self.skip, 0)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, *, shuffle: bool, seed: int = 0,
                drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over an EpochSampler; call `loader.sampler.set_epoch(epoch, skip)` before each epoch.

    The loader gets its own generator so that creating its iterator never draws from the global RNG
    (which drives dropout), keeping runs and resumed runs bit-identical.
    """
    sampler = EpochSampler(len(dataset), shuffle, seed, num_replicas, rank)
    if getattr(dataset, "cache", None) is not None and not pin_memory:
        # Cached uint8 batches are gathered faster in-process than shipped from worker processes (bench/run.py:
        # 4.4x vs 0.85x the PIL pipeline at 448 px on 2 CPU cores). On CUDA (pinned memory) workers stay, to overlap.
        num_workers = 0
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if num_workers > 0 else None)
