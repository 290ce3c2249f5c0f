"""Reading the real images and writing the generated ones (atomically), plus train_aug.json.

Layout under a dataset root:
    <root>/images/<image_name>                   the training photos (listed in <root>/train.json)
    <root>/aug-images/<stem>_aug<ext>            fake 1, as generated (landscape H x W)
    <root>/aug-images/<stem>_aug_hor_flip<ext>   fake 2, flipped left-right
    <root>/aug-images/<stem>_aug_rot_90<ext>     fake 3, rotated 90 degrees clockwise (W x H), i.e. "rotated back"
                                                 into the portrait orientation the study rotated portraits out of
    <root>/train_aug.json                        {"samples": [{"image_name": "<stem>_aug<ext>", "image_labels": [...]}
                                                 , ...], "labels": <train.json's vocabulary>}

<ext> is the original's extension when it is .jpeg/.jpg (Corel-5k: "1000.jpeg" -> "1000_aug.jpeg", the study's
names), otherwise ".jpeg"; the files are JPEG either way. Every train_aug.json entry also names its "original", so the
copies of a PNG or TIFF original map back to it exactly (dataset.py uses it to keep validation copies out of training);
two originals that would write the same copy names ("x.png" and "x.jpeg") are refused by `check_output_names`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from dataset import BadImageError, DatasetError, load_image, to_rgb
from utils import atomic_write_bytes, atomic_write_json

AUG_DIR = "aug-images"
AUG_JSON = "train_aug.json"
SUFFIXES = ("_aug", "_aug_hor_flip", "_aug_rot_90")
# The study crops 122 x 186 out of its 128 x 192 (landscape) images before resizing back to 128 x 192.
CROP_FRACTION = (122 / 128, 186 / 192)
# How a fake becomes a JPEG file. default: pixel round(255 * clamp((x + 1) / 2, 0, 1)), quality 95. study: the study's
# `plt.imsave(path.jpeg, x / 2 + 0.5)` (augmentation/data_augmentation.py lines 163-185): matplotlib multiplies the
# float32 image by 255 and truncates to uint8 (floor), and Pillow saves it with its default quality, 75, and
# matplotlib's 100 dpi; the same bytes as matplotlib's own call (tested).
ENCODINGS = {"default": {"quality": 95}, "study": {"quality": 75, "dpi": (100, 100)}}


# A fake whose pixel spread is below this fraction of its real image's is flat, a near-uniform rectangle: its GAN was
# trained for too few iterations. bench/gan_quality.py (4 demo images, 32x48): median spread ratio 0.01 at 3 and 10
# iterations, 0.02 at 30, 0.10 at 100, 0.49 at 300, 1.01 at 600. Below FEW_ITERATIONS the command warns before training.
FLAT_RATIO = 0.5
FEW_ITERATIONS = 300


def spread_ratio(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The fake's pixel spread over its real image's: std over the pixels of each channel, averaged over the 3
    channels, for the fake (3, H, W) over the real image (3, H', W') (any sizes, any common scale); a 0-d tensor."""
    def spread(image: torch.Tensor) -> torch.Tensor:
        return image.float().flatten(1).std(dim=1).mean()

    return spread(fake) / spread(real).clamp(min=1e-8)


def copies_spread(split, sample: int = 32, size: int = 64) -> float | None:
    """The median `spread_ratio` of up to `sample` GAN copies of `split` (dataset.Split; rows with a source) against
    their originals, read from their files at size x size; None when the split has no copies or none is readable."""
    path_of = dict(zip(split.image_names, split.paths))
    rows = [i for i, source in enumerate(split.sources) if source is not None and source in path_of]
    ratios = []
    for i in rows[:: max(len(rows) // sample, 1)][:sample]:
        try:
            ratios.append(float(spread_ratio(load_image(split.paths[i], size), load_image(path_of[split.sources[i]],
                                                                                          size))))
        except BadImageError:
            continue
    return float(np.median(ratios)) if ratios else None


def output_names(image_name: str) -> tuple[str, str, str]:
    """The three output file names of one training image: '1000.jpeg' -> ('1000_aug.jpeg', ...)."""
    stem, ext = os.path.splitext(os.path.basename(image_name))
    ext = ext if ext.lower() in (".jpeg", ".jpg") else ".jpeg"
    return tuple(f"{stem}{suffix}{ext}" for suffix in SUFFIXES)  # type: ignore[return-value]


def load_real_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """The study's preprocessing of the real image; returns (3, H, W) in [-1, 1].

    Portrait images (height > width) are rotated 90 degrees counter-clockwise (the study's
    `rotate(90, expand=True)`), then centre-cropped to a fraction 122/128 x 186/192 of their size (the study's
    CenterCrop((122, 186)) on 128 x 192), resized bilinearly to H x W, and mapped x -> 2 x / 255 - 1.
    """
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            if im.height > im.width:
                im = im.transpose(Image.Transpose.ROTATE_90)
            h, w = im.height, im.width
            ch, cw = round(h * CROP_FRACTION[0]), round(w * CROP_FRACTION[1])
            top, left = round((h - ch) / 2), round((w - cw) / 2)  # torchvision's CenterCrop offsets
            im = im.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BILINEAR)
            array = np.asarray(im, dtype=np.float32)  # (H, W, 3) in [0, 255]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"Image '{path}' cannot be read ({type(e).__name__}: {e}); replace the file or remove "
                            f"it from train.json.") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def fake_pixels(fakes: torch.Tensor, encoding: str = "default") -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) of fakes in [-1, 1]: round(255 * clamp((x + 1) / 2, 0, 1)), or under the study's
    encoding floor(255 * (x / 2 + 0.5)) in float32, as matplotlib computes it (a tanh output stays in [0, 1])."""
    x = fakes.detach().float().cpu()
    if encoding == "study":
        return torch.floor((x / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def fakes_to_images(fakes: torch.Tensor, encoding: str = "default") -> list[Image.Image]:
    """Three fakes (3, 3, H, W) in [-1, 1] -> the three output images: as is, flipped left-right, rotated clockwise,
    with the pixels of `fake_pixels`."""
    pixels = fake_pixels(fakes, encoding)  # (3, 3, H, W)
    views = [pixels[0],
             pixels[1].flip(-1),  # horizontal flip: reverse the columns
             torch.rot90(pixels[2], k=-1, dims=(1, 2))]  # 90 degrees clockwise: (3, W, H)
    return [Image.fromarray(v.permute(1, 2, 0).contiguous().numpy()) for v in views]


def save_outputs(aug_dir: Path, image_name: str, fakes: torch.Tensor, encoding: str = "default") -> list[Path]:
    """Write the three outputs of one image into `aug_dir` as JPEG files (ENCODINGS), each atomically (temporary
    file + os.replace)."""
    paths = []
    for name, image in zip(output_names(image_name), fakes_to_images(fakes, encoding)):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", **ENCODINGS[encoding])
        paths.append(atomic_write_bytes(aug_dir / name, buffer.getvalue()))
    return paths


def check_output_names(image_names: Sequence[str]) -> None:
    """Refuse training images whose GAN copies would share file names ('x.png' and 'x.jpeg' both give x_aug.jpeg)."""
    owner: dict[str, str] = {}
    for name in image_names:
        for out in output_names(name):
            if out in owner and owner[out] != name:
                raise DatasetError(f"Training images '{owner[out]}' and '{name}' would both write the GAN copy "
                                   f"'{out}'; rename one of them (in images/ and train.json) and run again.")
            owner[out] = name


def finished_images(aug_dir: Path, image_names: Iterable[str]) -> set[str]:
    """The image names whose three outputs all exist in `aug_dir` (one directory listing)."""
    existing = set(os.listdir(aug_dir)) if aug_dir.is_dir() else set()
    return {n for n in image_names if all(o in existing for o in output_names(n))}


def write_train_aug(path: Path, samples: Sequence[dict], vocabulary: Sequence[str], done: set[str]) -> int:
    """Atomically (re)write train_aug.json: the outputs of every finished sample, in train.json order, with the
    original's labels and train.json's vocabulary. Returns the number of entries."""
    entries = [{"image_name": out, "image_labels": list(s["image_labels"]), "original": s["image_name"]}
               for s in samples if s["image_name"] in done for out in output_names(s["image_name"])]
    atomic_write_json(path, {"samples": entries, "labels": list(vocabulary)})
    return len(entries)
