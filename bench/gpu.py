"""TResNet-m at 448 px, end to end on one GPU (loader included): AMP + channels_last against fp32, images/s.

    python bench/gpu.py                       # on a CUDA machine; about 2-4 minutes, well under 10
    python bench/gpu.py --device cpu --model TinyResNet --images 32 --image-size 64 --batch-size 8   # smoke test

What runs, per configuration (fp32 NCHW; the project's defaults on CUDA = bf16 autocast + channels_last; with
--compile also those defaults under torch.compile):

1. stand-in JPEGs of Corel size (192x128 / 128x192) are generated in a temporary folder and decoded once into the
   uint8 cache (image_cache.build_cache, memory mode);
2. `epochs` epochs of engine.train_one_epoch over dataset.make_loader(AnnotationDataset(cache=...), pin_memory),
   with trainer.build_training (fused Adam) and engine.BatchPreprocessor on the GPU. The first epoch is warm-up
   (cuDNN autotuning, allocator, compilation); images/s is the median over the later epochs, loader included;
3. the same step on batches already on the GPU (no loader) to tell loader cost from compute.

Results (with the GPU's name) go to $OUT/gpu_results.json when $OUT is set, else bench/gpu_results.json.
Goal of issue 5: >= 1,500 images/s for AMP + channels_last on an H200.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(REPO_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# bench/run.py applies its process set-up (OpenMP wait policy, glibc allocator) when imported, which must happen
# before torch loads its OpenMP runtime: so it is imported first.
from run import MALLOC_TUNING, NUM_LABELS, random_targets, write_stand_in_images  # noqa: E402, I001

import torch  # noqa: E402

from dataset import AnnotationDataset, Split, make_loader  # noqa: E402
from engine import BatchPreprocessor, epoch_flips, resolve_precision, train_one_epoch  # noqa: E402
from image_cache import build_cache  # noqa: E402
from bench_config import training_config  # noqa: E402
from models import normalisation  # noqa: E402
from trainer import build_training  # noqa: E402
from utils import atomic_write_json  # noqa: E402

GOAL_IMAGES_PER_S = 1500


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu for a smoke test")
    parser.add_argument("--model", default="TResNet", help="registry name (models.MODELS)")
    parser.add_argument("--images", type=int, default=4096, help="stand-in images (one epoch)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration; the first is warm-up")
    parser.add_argument("--workers", type=int, default=min(12, max((os.cpu_count() or 2) - 2, 1)),
                        help="DataLoader workers (also used to build the cache)")
    parser.add_argument("--compile", action="store_true", help="also time the CUDA defaults under torch.compile")
    parser.add_argument("--output", type=Path, default=None, help="default: $OUT/gpu_results.json or bench/gpu_results.json")
    parser.add_argument("--no-process-tuning", action="store_true",
                        help="keep the default OpenMP wait policy and glibc allocator settings (see bench/run.py)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one is warm-up)")
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_configuration(label: str, amp: str, channels_last: str, compile_model: bool, args, device, split, cache) -> dict:
    """Train `args.epochs` epochs end to end and then a few device-resident batches; images/s of each."""
    precision = resolve_precision(amp, channels_last, device)
    if device.type == "cuda":
        # The previous configuration's tensors were freed when its call returned; give their memory back.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = training_config(args.model, epochs=args.epochs, batch_size=args.batch_size)
    loader = make_loader(AnnotationDataset(split, args.image_size, cache=cache), args.batch_size, args.workers,
                         shuffle=True, drop_last=True, pin_memory=device.type == "cuda")
    model, criterion, optimizer, scheduler, _ = build_training(config, device, NUM_LABELS, len(loader) + 8)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward_model = torch.compile(model) if compile_model else model
    preprocess = BatchPreprocessor(*normalisation(model), device, precision)
    result = {"amp_dtype": str(precision.amp_dtype), "channels_last": precision.channels_last,
              "compile": compile_model, "batch_size": args.batch_size, "epochs": []}
    print(f"{label}: {args.epochs} epochs of {len(loader)} batches ...", flush=True)
    try:
        for epoch in range(args.epochs):
            loader.sampler.set_epoch(epoch)
            flips = epoch_flips(len(split), 0, epoch)
            synchronize(device)
            start = time.perf_counter()
            stats = train_one_epoch(forward_model, loader, criterion, optimizer, device, preprocess, epoch=epoch,
                                    flips=flips, scheduler=scheduler, progress=False)
            synchronize(device)
            seconds = time.perf_counter() - start
            result["epochs"].append({"seconds": seconds, "images_per_s": len(loader) * args.batch_size / seconds,
                                     "loss": stats["train/loss"]})
            print(f"  epoch {epoch + 1}: {result['epochs'][-1]['images_per_s']:,.0f} images/s "
                  f"({seconds:.1f} s, loss {stats['train/loss']:.2f})", flush=True)
        result["end_to_end_images_per_s"] = statistics.median(e["images_per_s"] for e in result["epochs"][1:])
        # Compute alone: the same batches, already on the device, no loader.
        resident = [(batch[0].to(device), batch[1], batch[2], batch[3]) for _, batch in zip(range(8), loader)]
        synchronize(device)
        start = time.perf_counter()
        train_one_epoch(forward_model, resident, criterion, optimizer, device, preprocess, epoch=args.epochs,
                        flips=flips, scheduler=None, progress=False)
        synchronize(device)
        result["device_resident_images_per_s"] = len(resident) * args.batch_size / (time.perf_counter() - start)
        if device.type == "cuda":
            result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.cuda.OutOfMemoryError as e:
        # Recorded, not hidden: the other configurations still run and the JSON says which one failed.
        result["error"] = f"out of memory at batch {args.batch_size}: {str(e).splitlines()[0]}"
        print(f"  {result['error']}", flush=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py: CUDA is not available here; run it on a GPU machine or pass --device cpu.")
        # Fixed input size: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
    started = time.perf_counter()
    env = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "python": platform.python_version(), "cpu_count": os.cpu_count(), "workers": args.workers,
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "malloc": MALLOC_TUNING,
           "model": args.model, "image_size": args.image_size, "images": args.images,
           "command": "python bench/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(f"bench/gpu.py on {env['gpu'] or device}: {args.model} at {args.image_size}px, batch {args.batch_size}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        start = time.perf_counter()
        paths = write_stand_in_images(Path(folder), args.images)
        targets = random_targets(len(paths), NUM_LABELS, torch.Generator().manual_seed(0))
        split = Split("bench", [p.name for p in paths], paths, targets)
        env["generate_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        cache = build_cache(split, args.image_size, "memory", num_workers=args.workers)
        env["cache_build_images_per_s"] = len(paths) / (time.perf_counter() - start)
    print(f"cache built: {env['cache_build_images_per_s']:,.0f} images/s", flush=True)
    configurations = {"fp32 NCHW": ("none", "off", False), "defaults (AMP + channels_last)": ("auto", "auto", False)}
    if args.compile:
        configurations["defaults + torch.compile"] = ("auto", "auto", True)
    results = {label: run_configuration(label, *choice, args, device, split, cache)
               for label, choice in configurations.items()}
    base = results["fp32 NCHW"].get("end_to_end_images_per_s")
    print("\n| configuration | end to end images/s (loader included) | device-resident images/s | vs fp32 |")
    print("|---|---:|---:|---:|")
    for label, r in results.items():
        if "error" in r:
            print(f"| {label} | {r['error']} | | |")
            continue
        ratio = r["end_to_end_images_per_s"] / base if base else float("nan")
        print(f"| {label} | {r['end_to_end_images_per_s']:,.0f} | {r['device_resident_images_per_s']:,.0f} | "
              f"{ratio:.2f}x |")
    best = max((r.get("end_to_end_images_per_s", 0.0) for r in results.values()), default=0.0)
    env["seconds"] = time.perf_counter() - started
    report = {"environment": env, "results": results, "goal_images_per_s": GOAL_IMAGES_PER_S,
              "goal_met": best >= GOAL_IMAGES_PER_S if device.type == "cuda" else None}
    print(f"\n{env['gpu'] or device}: best {best:,.0f} images/s end to end (goal {GOAL_IMAGES_PER_S:,} on an H200); "
          f"{env['seconds']:.0f} s in all")
    output = args.output or (Path(os.environ["OUT"]) / "gpu_results.json" if os.environ.get("OUT")
                             else BENCH_DIR / "gpu_results.json")
    atomic_write_json(output, report)
    print(f"wrote {output}")
    print(json.dumps({k: v for k, v in env.items() if k != "command"}))
    return report


if __name__ == "__main__":
    main()
