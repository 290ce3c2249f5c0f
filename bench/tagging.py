"""Folder tagging speed: --predict's streaming tagger (PyTorch, and ONNX Runtime on the exported file) against a plain
per-image loop, on the same generated images and the same model, in one run.

    python bench/tagging.py                   # TinyResNet at 64 px, EfficientNet-Lite0 at 96 and 224 px, 512 images
    python bench/tagging.py --images 128      # quicker

The reference is what one writes first: for each file, PIL open, convert, resize, ToTensor + Normalize, the model on a
batch of one, the sigmoid. The project: predict._tag, i.e. the DataLoader with --num-workers processes decoding uint8
batches while the model runs, batches of --batch-size, each batch's rows appended to a CSV: with PyTorch in fp32 and at
the precision --predict uses on this CPU (bf16 + channels_last where the CPU has native bf16), with ONNX Runtime on the
exported fp32 graph (normalisation and sigmoid inside) and on its static int8 quantisation (export.quantize_int8,
calibrated on 32 of the images); and the two ONNX files alone on batches decoded beforehand (what int8 changes, without
the decoding that shares the 2 cores). Variants are interleaved, each repeated; rates are medians.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
for _path in (str(BENCH_DIR), str(BENCH_DIR.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see bench/run.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import predict  # noqa: E402
from config import Runtime  # noqa: E402
from dataset import load_image  # noqa: E402
from engine import resolve_precision  # noqa: E402
from export import Annotator, OnnxAnnotator, onnx_bytes, quantize_int8  # noqa: E402
from models import create_model, normalisation  # noqa: E402
from utils import atomic_write_json  # noqa: E402

MODELS = (("TinyResNet", 64), ("EfficientNetLite0", 96), ("EfficientNetLite0", 224))  # the demo's sizes, and 224


def stand_in_images(folder: Path, count: int) -> list[Path]:
    """`count` JPEGs of Corel's sizes (192 x 128 and 128 x 192) with random content."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = (128, 192) if i % 3 else (192, 128)
        path = folder / f"{i:04d}.jpeg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def per_image_loop(model, paths, size, mean, std):
    """The reference: one image at a time, decode + transform + model, no batching, no workers."""
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as im:
                array = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
            x = (torch.from_numpy(array).permute(2, 0, 1) / 255 - mean_t) / std_t
            torch.sigmoid(model(x[None]))


def tagger(predictor, paths, workers, batch):
    runtime = Runtime(batch_size=batch, num_workers=workers, progress=False)
    with open(os.devnull, "w", newline="") as table, open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet  # the tagger prints a line per image without a progress bar
        try:
            predict._tag(paths, predictor, runtime, None, None, table, [], [])
        finally:
            sys.stdout = stdout


def variants(name: str, size: int, paths, workers: int, batch: int) -> dict:
    model = create_model(name, 260).eval()  # Corel-5k's 260 labels; speed does not depend on the weights
    mean, std = normalisation(model)
    annotator = Annotator(model, mean, std)
    meta = {"vocabulary": "[]", "thresholds": "[]", "threshold_compare": "ge", "image_size": str(size),
            "mean": "[]", "std": "[]"}
    fp32 = onnx_bytes(annotator, size, meta)
    onnx = OnnxAnnotator(fp32)
    calibration = np.stack([load_image(p, size).numpy() for p in paths[:32]])  # (32, 3, S, S) uint8
    int8 = OnnxAnnotator(quantize_int8(fp32, calibration))
    decoded = [np.stack([load_image(p, size).numpy() for p in paths[i:i + batch]])  # (B, 3, S, S) uint8
               for i in range(0, len(paths), batch)]
    vocabulary, thresholds = [str(j) for j in range(260)], torch.full((260,), 0.5)
    default = resolve_precision("auto", "auto", torch.device("cpu"))  # what --predict runs a run at on this CPU
    fast = Annotator(model, mean, std).to(memory_format=torch.channels_last if default.channels_last else
                                          torch.contiguous_format)

    def torch_score(images):
        with torch.no_grad():
            return annotator(images)

    def default_score(images):
        with torch.no_grad(), default.autocast(torch.device("cpu")):
            return fast(images).float()

    make = lambda score: predict.Predictor(score, vocabulary, thresholds, "ge", size, Path("."), Path("x"))  # noqa: E731
    return {
        "per-image loop (PyTorch)": lambda: per_image_loop(model, paths, size, mean, std),
        "tagger, PyTorch": lambda: tagger(make(torch_score), paths, workers, batch),
        "tagger, PyTorch, default precision": lambda: tagger(make(default_score), paths, workers, batch),
        "tagger, ONNX Runtime": lambda: tagger(make(lambda im: torch.from_numpy(onnx.probabilities(im.numpy()))),
                                               paths, workers, batch),
        "tagger, ONNX Runtime int8": lambda: tagger(make(lambda im: torch.from_numpy(int8.probabilities(im.numpy()))),
                                                    paths, workers, batch),
        # The model alone on batches decoded beforehand: what int8 changes, without the decoding that shares the CPU.
        "model only, ONNX Runtime": lambda: [onnx.probabilities(x) for x in decoded],
        "model only, ONNX Runtime int8": lambda: [int8.probabilities(x) for x in decoded],
    }


def measure(name, size, paths, workers, batch, repeats) -> dict:
    runs = variants(name, size, paths, workers, batch)
    times = {label: [] for label in runs}
    for label, run in runs.items():
        run()  # warm-up
    for r in range(repeats):
        for label in list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]:  # rotate the order each repeat
            start = time.perf_counter()
            runs[label]()
            times[label].append(time.perf_counter() - start)
    rates = {label: len(paths) / statistics.median(t) for label, t in times.items()}
    reference = rates["per-image loop (PyTorch)"]
    return {label: {"images_per_s": rate, "speed_up": rate / reference} for label, rate in rates.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(BENCH_DIR / "results_predict.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        paths = stand_in_images(Path(folder), args.images)
        results = {f"{name} {size}px": measure(name, size, paths, args.workers, args.batch_size, args.repeats)
                   for name, size in MODELS}
    print(f"{args.images} images, {args.workers} workers, batch {args.batch_size}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, median of {args.repeats}")
    print("| model | variant | images/s | speed-up vs per-image loop |\n|---|---|---:|---:|")
    for model, rows in results.items():
        for label, row in rows.items():
            print(f"| {model} | {label} | {row['images_per_s']:.0f} | {row['speed_up']:.2f}x |")
    int8 = {model: {kind: rows[f"{kind}, ONNX Runtime int8"]["images_per_s"] / rows[f"{kind}, ONNX Runtime"]["images_per_s"]
                    for kind in ("tagger", "model only")} for model, rows in results.items()}
    for model, ratio in int8.items():
        print(f"{model}: int8 / fp32 ONNX Runtime: {ratio['model only']:.2f}x the model alone, "
              f"{ratio['tagger']:.2f}x tagging a folder (decoding included)")
    atomic_write_json(args.json, {"settings": vars(args), "results": results, "int8_over_fp32": int8})
    return results


if __name__ == "__main__":
    main()
