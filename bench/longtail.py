"""A long-tailed benchmark with Corel-5k's real label sets: each of the 260 labels is a small mark of its own (one of
64 cells x one of 5 colours) on a noisy 64 px canvas, so a small CNN can learn every label, and the labels keep
Corel-5k's frequencies (water 1,004 training images ... 1). Used by bench/threshold_options.py.

    python bench/longtail.py OUT [--shared ../shared/datasets/Corel-5k]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PALETTE = np.array([[230, 60, 60], [60, 200, 80], [70, 110, 240], [240, 210, 60], [220, 90, 230]])
SIZE, CELL = 64, 8


def paint(labels: list[int], rng: np.random.Generator) -> np.ndarray:
    """uint8 (64, 64, 3): dark noise, then for label j a 6 x 6 mark of colour j // 64 in cell j % 64 (+-1 px)."""
    image = rng.integers(0, 70, (SIZE, SIZE, 3)).astype(np.int16)
    for j in labels:
        row, col = divmod(j % 64, SIZE // CELL)
        y, x = row * CELL + 1 + rng.integers(-1, 2), col * CELL + 1 + rng.integers(-1, 2)
        y, x = int(np.clip(y, 0, SIZE - 6)), int(np.clip(x, 0, SIZE - 6))
        image[y:y + 6, x:x + 6] = PALETTE[j // 64] + rng.integers(-25, 26, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def generate(out: Path, shared: Path, seed: int = 0) -> Path:
    """OUT/{train,test}.json with Corel-5k's samples (names .png) and OUT/images/ painted; returns OUT."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    vocabulary = json.loads((shared / "train.json").read_text())["labels"]
    index = {label: j for j, label in enumerate(vocabulary)}
    for split in ("train", "test"):
        samples = json.loads((shared / f"{split}.json").read_text())["samples"]
        renamed = []
        for s in samples:
            name = Path(s["image_name"]).stem + ".png"
            Image.fromarray(paint([index[label] for label in s["image_labels"]], rng)).save(out / "images" / name)
            renamed.append({"image_name": name, "image_labels": s["image_labels"]})
        (out / f"{split}.json").write_text(json.dumps({"samples": renamed, "labels": vocabulary}))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets" / "Corel-5k"))
    args = parser.parse_args()
    print(generate(Path(args.out), Path(args.shared)), file=sys.stderr)
