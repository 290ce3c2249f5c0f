"""Benchmark of the ML-WGAN-GP augmentation: image-iterations per second for group sizes K = 1, 4, 8, 32.

    python bench/gan.py --quick               # ~1 minute on 2 CPU cores: 32x48 images, 2 timed iterations, 1 thread
    python bench/gan.py                       # the study's 128x192 images (CPU: slow, and K=32 needs ~15 GB)
    python bench/gan.py --device cuda         # on a GPU: fp32 and bf16 autocast, 10 timed iterations per K

One image-iteration = 5 critic steps + 1 generator step of one image's WGAN-GP (batch of one). K images of a group
train simultaneously (DataAugmentation/train.py: grouped convolutions, per-image BatchNorm). For every K the
script runs `train_group` on K random images for warm-up + timed iterations and reports, from the timed
iterations only: wall-clock image-iterations/s, CPU seconds per image-iteration (robust to other processes on a
shared machine), the speed-up over K = 1, the per-group setup time (building and initialising the K models and
drawing their random numbers for 1,001 iterations; timed separately) and the projected wall time of the study's
job, 4,500 Corel-5k training images x 1,001 iterations, setup included.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `python bench/gan.py`

import torch  # noqa: E402

from DataAugmentation.models import GanConfig, GroupedCritic, GroupedGenerator, init_group_  # noqa: E402
from DataAugmentation.train import draw_randomness, train_group  # noqa: E402

COREL_TRAIN_IMAGES, STUDY_ITERATIONS = 4500, 1001
BYTES_PER_PARAMETER = 4 * 4  # fp32 weight, gradient and Adam's two moments
ACTIVATION_MARGIN = 1.5  # activations, the penalty's double-backward graph, allocator slack


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32x48 images, 2 timed iterations (CPU smoke run)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--group-sizes", default="1,4,8,32", help="comma-separated K values (default: 1,4,8,32)")
    parser.add_argument("--size", default=None, help="HxW (default: 32x48 with --quick, else 128x192)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed iterations per K (default: 2 on CPU / --quick, 10 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 1 CPU, 3 CUDA)")
    parser.add_argument("--amp", default=None,
                        help="comma-separated precisions among none,bf16 (default: none on CPU, none,bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --quick, else torch's choice); 1 is the most "
                             "robust on a shared machine")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (CUDA) or MemAvailable (CPU, Linux); 0 if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parameters_per_image(cfg: GanConfig) -> int:
    with torch.device("meta"):
        modules = [GroupedGenerator(cfg, 1), GroupedCritic(cfg, 1)]
    return sum(p.numel() for m in modules for p in m.parameters())


def hardware(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = (f"CPU: {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda}"
    return text


def setup_time(cfg: GanConfig, seeds: list[int], device: torch.device) -> float:
    """Seconds to build and initialise a group's models and draw its random numbers, as train_group does first."""
    start = time.perf_counter()
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    with torch.device(device):
        modules = [GroupedGenerator(cfg, len(seeds)), GroupedCritic(cfg, len(seeds))]
    init_group_(modules, generators, cfg.init_std)
    draw_randomness(generators, cfg, STUDY_ITERATIONS)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(cfg: GanConfig, k: int, device: torch.device, warmup: int, timed: int, precision: str) -> dict:
    """Train one group of K random images for warmup + timed iterations; rates from the timed ones."""
    marks = {}

    def mark(t: int) -> None:
        if t in (warmup - 1, warmup + timed - 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[t] = (time.perf_counter(), time.process_time())

    real = torch.rand(k, 3, cfg.height, cfg.width, generator=torch.Generator().manual_seed(k)) * 2 - 1
    seeds = list(range(k))
    result = train_group(real, seeds, cfg, max(3, warmup + timed), device=device, precision=precision,
                         on_iteration=mark)
    (w0, c0), (w1, c1) = marks[warmup - 1], marks[warmup + timed - 1]
    wall, cpu = w1 - w0, c1 - c0
    iteration_s = wall / timed
    if not torch.isfinite(result.critic_loss).all():
        raise RuntimeError(f"K={k}: non-finite critic loss {result.critic_loss.tolist()}")
    del result  # free the K models before timing the setup of another K
    setup_s = setup_time(cfg, seeds, device)
    groups = -(-COREL_TRAIN_IMAGES // k)
    projected_s = groups * (setup_s + STUDY_ITERATIONS * iteration_s)
    return {"K": k, "precision": precision, "image_it_per_s": k * timed / wall, "cpu_s_per_image_it": cpu / (k * timed),
            "iteration_s": iteration_s, "setup_s": setup_s, "projected_s": projected_s}


def human(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but CUDA is not available here; use --device cpu.", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    # --quick: small tensors gain nothing from a second thread, and on a shared machine OpenMP spin-waits made the
    # 2-thread quick run 2-10x slower than 1 thread (measured); the full run keeps torch's default unless told.
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the CLI does
    size = args.size or ("32x48" if args.quick else "128x192")
    try:
        height, width = (int(v) for v in size.lower().split("x"))
        cfg = GanConfig(height=height, width=width)
        group_sizes = [int(v) for v in args.group_sizes.split(",")]
    except ValueError as e:
        print(f"error: bad --size '{size}' or --group-sizes '{args.group_sizes}': {e}", file=sys.stderr)
        return 2
    timed = args.iterations or (10 if cuda and not args.quick else 2)
    warmup = args.warmup or (3 if cuda else 1)
    precisions = (args.amp or ("none,bf16" if cuda else "none")).split(",")
    if set(precisions) - {"none", "bf16"} or min(group_sizes) < 1 or timed < 1 or warmup < 1:
        print("error: --amp takes none and/or bf16, and --group-sizes, --iterations and --warmup must be positive.",
              file=sys.stderr)
        return 2

    per_image = parameters_per_image(cfg)
    print(f"# ML-WGAN-GP benchmark: {height}x{width}, {per_image / 1e6:.1f}M parameters per image (G + D), "
          f"{warmup} warm-up + {timed} timed iterations per K, device {device}")
    print(f"# {hardware(device)}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"# command: python {' '.join(sys.argv)}")
    header = ("| K | amp | image-it/s | CPU s / image-it | speed-up vs K=1 | s / group iteration | setup s / group "
              "| projected 4,500 x 1,001 |")
    print(header)
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for precision in precisions:
        base = None
        for k in group_sizes:
            need = k * per_image * BYTES_PER_PARAMETER * ACTIVATION_MARGIN
            free = available_memory(device)
            if free and need > 0.8 * free:
                print(f"| {k} | {precision} | skipped: needs ~{need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free "
                      f"| | | | | |", flush=True)
                continue
            row = measure(cfg, k, device, warmup, timed, "bf16" if precision == "bf16" else "fp32")
            row["precision"] = precision
            base = base or (row["image_it_per_s"] if k == 1 else None)
            speedup = f"{row['image_it_per_s'] / base:.2f}x" if base else "n/a"
            print(f"| {k} | {precision} | {row['image_it_per_s']:.3f} | {row['cpu_s_per_image_it']:.3f} | {speedup} | "
                  f"{row['iteration_s']:.3f} | {row['setup_s']:.1f} | {human(row['projected_s'])} |", flush=True)
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()
    where = "" if (height, width) == (128, 192) else f", at {height}x{width} (not the study size)"
    print(f"# load average {os.getloadavg()[0]:.2f} at end. Projection = ceil(4500 / K) x (setup + 1001 x "
          f"s / group iteration){where}.")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": [height, width], "device": str(device),
                                               "hardware": hardware(device), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
