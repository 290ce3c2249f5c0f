"""How many GAN iterations make usable copies: the fakes' pixel spread against the real image's, by iteration count.

    python bench/gan_quality.py                       # 4 demo images at 32x48, 3 ... 300 iterations (~10 CPU-minutes)
    python bench/gan_quality.py --size 64x96 --iterations 3 30 100

A WGAN-GP trained for few iterations writes flat colour rectangles: its fakes have almost no pixel spread. For each
iteration count this trains the per-image GANs of the first --images demo training images (DataAugmentation, the
same code as `python -m DataAugmentation`) and reports the fakes' spread ratio, the pixel standard deviation of a
fake over its real image's (each channel over the image, averaged), median over images and fakes. DataAugmentation
warns below the iteration count where the median ratio first reaches FLAT_RATIO (DataAugmentation/files.py), and
main.py --augmentation warns when the GAN copies it reads are that flat. Results: bench/results_gan_quality.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))  # the repository root: `python bench/gan_quality.py`

import torch  # noqa: E402

from dataset import resolve_data_root  # noqa: E402
from DataAugmentation.files import FLAT_RATIO, load_real_image, spread_ratio  # noqa: E402
from DataAugmentation.models import GanConfig  # noqa: E402
from DataAugmentation.train import image_seed, train_images  # noqa: E402


def measure(images: int, size: tuple[int, int], counts: list[int]) -> list[dict]:
    root = resolve_data_root("demo")
    names = [s["image_name"] for s in json.loads((root / "train.json").read_text())["samples"][:images]]
    real = torch.stack([load_real_image(root / "images" / n, *size) for n in names])  # (K, 3, H, W)
    cfg = GanConfig(height=size[0], width=size[1])
    rows = []
    for iterations in counts:
        start = time.perf_counter()
        fakes = train_images(real, [image_seed(0, n) for n in names], cfg, iterations, backend="grouped")
        ratios = [float(spread_ratio(fakes[k, f], real[k])) for k in range(len(names)) for f in range(3)]
        rows.append({"iterations": iterations, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                     "max_ratio": max(ratios), "seconds": round(time.perf_counter() - start, 1)})
        print(f"{iterations:5d} iterations: spread ratio median {rows[-1]['median_ratio']:.3f} "
              f"(min {rows[-1]['min_ratio']:.3f}, max {rows[-1]['max_ratio']:.3f}), {rows[-1]['seconds']} s",
              flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", default="32x48", help="HxW")
    parser.add_argument("--iterations", type=int, nargs="+", default=[3, 10, 30, 100, 300])
    parser.add_argument("--json", default=str(BENCH / "results_gan_quality.json"))
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    saved = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    earlier = {r["iterations"]: r for r in saved.get(args.size, {}).get("rows", [])}  # other counts measured before
    rows = sorted({**earlier, **{r["iterations"]: r for r in measure(args.images, size, args.iterations)}}.values(),
                  key=lambda r: r["iterations"])
    usable = next((r["iterations"] for r in rows if r["median_ratio"] >= FLAT_RATIO), None)
    result = {"command": "python bench/gan_quality.py " + " ".join(sys.argv[1:]), "cpu": platform.processor(),
              "size": args.size, "images": args.images, "flat_ratio": FLAT_RATIO, "first_usable": usable, "rows": rows}
    saved[args.size] = result
    Path(args.json).write_text(json.dumps(saved, indent=2) + "\n")
    print(f"first count whose median ratio reaches {FLAT_RATIO}: {usable}")
    return result


if __name__ == "__main__":
    main()
