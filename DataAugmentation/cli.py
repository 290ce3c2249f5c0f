"""Command line: `python -m DataAugmentation --data Corel-5k --iterations 1001 [--group-size K] [--limit N] ...`.

Trains one WGAN-GP per training image of <root>/train.json, K images at a time, and writes three fakes per image
to <root>/aug-images/ plus <root>/train_aug.json (see files.py). Resumable: images whose three outputs exist are
skipped, and train_aug.json is rebuilt from what exists after every group, so Ctrl-C (or a crash) loses at most
the group in flight.

Under `torchrun --nproc-per-node N -m DataAugmentation ...` the pending images are dealt out by rank (each process on
cuda:LOCAL_RANK, or the CPU); each image's random stream depends on (seed, name) only, so the files are the same as
one process's, and a run stopped with N processes can be finished with any other number.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from dataset import DatasetError, read_annotations, resolve_data_root
from distributed import World, get_device, launch_world
from utils import ArgumentParser, DefaultsHelpFormatter, UserError

from .files import (AUG_DIR, AUG_JSON, ENCODINGS, FEW_ITERATIONS, FLAT_RATIO, check_output_names, finished_images,
                    load_real_image, save_outputs, spread_ratio, write_train_aug)
from .models import GanConfig
from .train import BACKENDS, N_OUTPUTS, image_seed, train_images

# Measured (bench/gan.py, DataAugmentation/README.md): on the CPU a grouped step costs more per image than K
# single-image steps, so the CPU trains one image at a time (K = 1, and the "loop" backend if K > 1 is asked
# for); on CUDA the batch-of-one step is launch-bound and K = 32 images share every kernel launch.
AUTO_GROUP_SIZE = {"cpu": 1, "cuda": 32}
AUTO_BACKEND = {"cpu": "loop", "cuda": "grouped"}
FIRST_FEW = 5


def parse_size(text: str) -> tuple[int, int]:
    """'128x192' -> (128, 192) (height x width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size HEIGHTxWIDTH such as 128x192 or 16x24") from None
    return height, width


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m DataAugmentation",
        description="ML-WGAN-GP data augmentation: one WGAN-GP per training image, K images trained at once; "
                    "writes <root>/aug-images/ and <root>/train_aug.json (used by main.py --augmentation).",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data", default="Corel-5k",
                        help="dataset: Corel-5k, ESP-Game, IAPR-TC-12, demo, or a folder with train.json and images/")
    parser.add_argument("--iterations", type=positive_int, default=1001,
                        help=f"iterations per image ({GanConfig.n_critic} critic steps + 1 generator step each); "
                             f"the fakes of the last {N_OUTPUTS} are saved")
    parser.add_argument("--group-size", type=positive_int, default=None,
                        help=f"images trained simultaneously (default: {AUTO_GROUP_SIZE['cpu']} on CPU, "
                             f"{AUTO_GROUP_SIZE['cuda']} on CUDA, as measured)")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="grouped: the K images share every kernel (CUDA); loop: one after another (CPU); "
                             "auto picks per device as measured. Both give the same images")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N images of train.json (default: all)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each image's stream is seeded by (seed, name)")
    parser.add_argument("--size", type=parse_size, default="128x192", metavar="HxW",
                        help="generated image size (landscape); the study's is 128x192, tests use 16x24")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"],
                        help="bf16 autocast for the convolutions (penalty norm and losses stay fp32); fp16 is not "
                             "offered: without hand-made scaling the penalty's inner gradient can underflow")
    parser.add_argument("--encoding", default="default", choices=sorted(ENCODINGS),
                        help="how the fakes are written: default = JPEG quality 95 of round(255 v); study = the "
                             "study's plt.imsave: JPEG quality 75 of floor(255 v), the same bytes as its call")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def _check_images(root: Path, names: Sequence[str]) -> list[Path]:
    """Paths <root>/images/<name>; a clear error when the folder is empty or some images are missing."""
    folder = root / "images"
    paths = [folder / n for n in names]
    missing = [n for n, p in zip(names, paths) if not p.is_file()]
    if missing and len(missing) == len(names):
        raise DatasetError(f"No training images found in '{folder}' (none of the {len(names)} pending images of "
                           f"train.json, e.g. '{names[0]}'); put the dataset's images there.")
    if missing:
        raise DatasetError(f"{len(missing)} of {len(names)} pending training images are missing from '{folder}' "
                           f"(first few: {', '.join(missing[:FIRST_FEW])}); add them, or remove them from train.json.")
    return paths


def _settings(args: argparse.Namespace, world: World) -> tuple[GanConfig, torch.device, int, str]:
    """(GAN size, device, group size K, backend) from the flags; under torchrun each process on cuda:LOCAL_RANK."""
    try:
        cfg = GanConfig(height=args.size[0], width=args.size[1])
    except ValueError as e:
        raise UserError(f"--size {args.size[0]}x{args.size[1]}: {e}") from None
    if args.iterations < N_OUTPUTS:
        raise UserError(f"--iterations {args.iterations} is too small: the fakes of the last {N_OUTPUTS} iterations "
                        f"are saved, so use at least {N_OUTPUTS} (the study uses 1001).")
    try:
        device = get_device(args.device)
    except RuntimeError:  # torch.device's own complaint about an unknown device string
        raise UserError(f"--device {args.device} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in AUTO_GROUP_SIZE:
        raise UserError(f"--device {args.device} is not supported here; use auto, cpu or cuda.")
    if device.type == "cuda" and world.world_size > 1:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes per group: let cuDNN pick the grouped-conv kernels
    return cfg, device, args.group_size or AUTO_GROUP_SIZE[device.type], (
        AUTO_BACKEND[device.type] if args.backend == "auto" else args.backend)


def share(pending: list, world: World) -> list:
    """This process's part of the pending images: every world_size-th from its rank, so the shares differ by one
    image at most and every process fills its groups of K alike (no rank idles while another finishes a long tail)."""
    return pending[world.rank::world.world_size]


@dataclass
class Job:
    """The dataset's side of a run: where to write, every sample of train.json, and this process's pending share."""

    root: Path
    all_samples: list[dict]
    vocabulary: list[str]
    samples: list[dict]  # the first --limit samples (all without --limit)
    done: set[str]  # images whose three outputs exist
    already: int  # samples finished before this run
    mine: list[dict]  # this process's pending samples
    paths: list[Path]  # their image files
    spreads: list[float] = field(default_factory=list)  # each fake's pixel spread over its real image's

    def write_json(self) -> int:
        """train_aug.json rebuilt from the outputs that exist (every finished image of train.json, in its order)."""
        return write_train_aug(self.root / AUG_JSON, self.all_samples, self.vocabulary, self.done)


def plan(args: argparse.Namespace, world: World) -> Job:
    """What is left to do, from the files that exist: a resumed run, with any number of processes, skips them."""
    root = resolve_data_root(args.data)
    all_samples, vocabulary = read_annotations(root / "train.json")
    samples = all_samples[:args.limit] if args.limit is not None else all_samples
    if not samples:
        raise DatasetError(f"'{root / 'train.json'}' lists no samples; nothing to augment.")
    check_output_names([s["image_name"] for s in all_samples])
    # train_aug.json lists every finished image of train.json, also those beyond --limit from earlier runs.
    done = finished_images(root / AUG_DIR, [s["image_name"] for s in all_samples])
    pending = [s for s in samples if s["image_name"] not in done]
    mine = share(pending, world)
    paths = _check_images(root, [s["image_name"] for s in mine]) if mine else []
    (root / AUG_DIR).mkdir(parents=True, exist_ok=True)
    return Job(root, all_samples, vocabulary, samples, done, len(samples) - len(pending), mine, paths)


def train_share(job: Job, args: argparse.Namespace, cfg: GanConfig, device: torch.device, group_size: int,
                backend: str, world: World) -> int:
    """Train this process's images K at a time, writing each image's outputs as its group ends; returns the count.
    Process 0 rebuilds train_aug.json after every group, so an interruption loses at most the groups in flight."""
    label = f"rank {world.rank}/{world.world_size} " if world.world_size > 1 else ""
    bar = tqdm(total=len(job.mine), unit="img", disable=not args.progress, dynamic_ncols=True, position=world.rank,
               desc=f"{label}ML-WGAN-GP K={group_size} {backend} {device.type}")
    show = _iteration_display(bar) if args.progress else None
    try:
        for start in range(0, len(job.mine), group_size):
            names = [s["image_name"] for s in job.mine[start:start + group_size]]
            t0 = time.perf_counter()
            real = torch.stack([load_real_image(p, cfg.height, cfg.width) for p in job.paths[start:start + len(names)]])
            fakes_k = train_images(real, [image_seed(args.seed, n) for n in names], cfg, args.iterations, backend,
                                   device=device, precision="bf16" if args.amp == "bf16" else "fp32", on_progress=show)
            for name, fakes, image in zip(names, fakes_k, real):
                save_outputs(job.root / AUG_DIR, name, fakes, args.encoding)
                job.spreads += [float(spread_ratio(fake, image)) for fake in fakes]
            job.done.update(names)
            if world.is_main:
                job.write_json()
            bar.set_postfix_str(f"last group {time.perf_counter() - t0:.1f}s", refresh=False)
            bar.update(len(names))
    finally:
        bar.close()
    return len(job.mine)


def _iteration_display(bar):
    """on_progress callback: within a group (minutes to hours on a CPU) show the iterations done, at most every 2 s."""
    last = [0.0]

    def show(done_its: int, total_its: int) -> None:
        now = time.monotonic()
        if now - last[0] > 2.0:
            last[0] = now
            bar.set_postfix_str(f"group it {done_its}/{total_its}", refresh=True)

    return show


def run(args: argparse.Namespace) -> dict:
    """Generate the missing outputs (this process's share under torchrun); returns {"trained", "skipped", "entries",
    "group_size", "backend", "device", "root", "complete", "spread" (the fakes' median spread ratio)}."""
    world = launch_world()
    cfg, device, group_size, backend = _settings(args, world)
    job = plan(args, world)
    if world.is_main:
        job.write_json()  # rebuilt from what exists
    if args.iterations < FEW_ITERATIONS and job.mine:
        print(f"Warning: --iterations {args.iterations} is far below what makes usable copies: measured on the demo "
              f"(bench/gan_quality.py), the fakes are near-flat rectangles until about {FEW_ITERATIONS} iterations "
              f"and look like their images by 600; the study trains 1001.", file=sys.stderr)
    trained = train_share(job, args, cfg, device, group_size, backend, world)
    # Whichever process finds every image finished writes the final train_aug.json (the same from any process).
    job.done = finished_images(job.root / AUG_DIR, [s["image_name"] for s in job.all_samples])
    complete = all(s["image_name"] in job.done for s in job.samples)
    entries = job.write_json() if complete or world.is_main else None
    return {"trained": trained, "skipped": job.already, "entries": entries, "group_size": group_size,
            "backend": backend, "device": str(device), "root": str(job.root), "complete": complete,
            "spread": statistics.median(job.spreads) if job.spreads else None,
            "rank": f"rank {world.rank}/{world.world_size}: " if world.world_size > 1 else ""}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 2 user error, 130 interrupted)."""
    args = get_args_parser().parse_args(argv)
    try:
        summary = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted: finished images are saved and listed in train_aug.json; the group in flight was "
              "discarded. Rerun the same command to continue.", file=sys.stderr)
        return 130
    listed = (f"{summary['entries']} generated images listed in {Path(summary['root']) / AUG_JSON}"
              if summary["entries"] is not None else f"the process that finishes last writes {AUG_JSON}")
    print(f"{summary['rank']}Done: {summary['trained']} images trained, {summary['skipped']} already finished; "
          f"{listed}.")
    if summary["spread"] is not None and summary["spread"] < FLAT_RATIO:
        print(f"Warning: the fakes of this run are flat (median pixel spread {summary['spread']:.2f} of their real "
              f"images', below {FLAT_RATIO}): --iterations {args.iterations} is too few (bench/gan_quality.py; the "
              f"study trains 1001). main.py --augmentation would train on near-uniform images with real labels; "
              f"delete {Path(summary['root']) / AUG_DIR} and run again with more --iterations.", file=sys.stderr)
    return 0
