"""Speed of the project against the straightforward way (bench/reference.py), measured side by side in one run.

    python bench/run.py            # the full run (about 4 minutes on 2 idle cores), writes bench/results.json
    python bench/run.py --quick    # about 1 minute: fewer images, repeats and steps, no ResNet18, and the
                                   # scikit-learn MCC loop timed on 1/10 of the labels and scaled (said in the table)

What is measured (all on the CPU of this machine; see bench/gpu.py for the GPU):

* loader images/s at 224 and 448 px over generated stand-in JPEGs of Corel size (192x128 and 128x192):
  reference = per-sample PIL decode + resize + ToTensor + flip + Normalize in the workers (float batches);
  project = dataset.make_loader over AnnotationDataset with the decoded-image cache (uint8 batches), then
  engine.BatchPreprocessor (flip + normalise) in the main process, the same number of workers. The one-off cache
  build is reported separately, and so are the project's uint8 path without the cache and the cache with 0 workers.
* train-step and eval images/s (batch 8) for TinyResNet and ResNet18 at 224 px and TResNet at 128 px: reference
  fp32 NCHW (plain Adam, input normalised beforehand) against engine.train_one_epoch / engine.predict with main.py's
  default flags (trainer.build_training: fused Adam; uint8 input flipped and normalised inside the step), with bf16
  autocast, with channels_last and with both.
* LSEP forward + backward at 32 x 260: losses.LSEPLoss against a per-image loop over the pairwise matrix, with the
  largest tensor each one creates (recorded by a dispatch mode that sees every op, backward included).
* per-label MCC threshold search at 4500 x 260 x 14: thresholds.mcc_thresholds against scikit-learn's
  matthews_corrcoef in a double loop (labels x grid); both give the same thresholds (checked). The full run times
  the scikit-learn loop once over all 260 labels (about 10-20 s).

Timings on a shared machine are noisy: each measurement is repeated, the variants of one measurement are
interleaved in rotating order within every repeat, rates are medians and ratios are medians of the per-repeat
ratios (reference time / project time in the same repeat). The process is set up as described above
PROCESS_TUNING below (OpenMP threads sleep when idle; glibc keeps freed memory), for the reference and the project
alike; --no-process-tuning measures with the defaults.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
for _path in (str(BENCH_DIR), str(REPO_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Process set-up, applied before torch starts its OpenMP threads (--no-process-tuning measures without it):
# * OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. On a CPU shared with other processes
#   (DataLoader workers included) spinning threads wait a whole time slice at every barrier: a TinyResNet train
#   step at 224 px took 2.6 s with torch's 2 threads and the default policy, 0.25 s with PASSIVE, on this machine.
# * glibc mallopt: tensors above 32 MiB are otherwise mmap'ed fresh and page-faulted in on every allocation
#   (a float batch of 32 x 3 x 448 x 448 is 77 MB); serving them from the heap and keeping freed memory for reuse
#   made BatchPreprocessor at 448 px 6x faster here. The settings are inherited by forked DataLoader workers.
PROCESS_TUNING = "--no-process-tuning" not in sys.argv[1:]
if PROCESS_TUNING:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory() -> str:
    """glibc only: mallopt(M_MMAP_THRESHOLD = 1 GiB, M_TRIM_THRESHOLD = 2 GiB - 1); returns what was done."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "unavailable (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt(m_mmap_threshold, 2**30) != 1 or mallopt(m_trim_threshold, 2**31 - 1) != 1:
        return "refused by mallopt"
    return "mmap threshold 1 GiB, trim threshold 2 GiB"


MALLOC_TUNING = keep_freed_memory() if PROCESS_TUNING else "glibc defaults"

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import sklearn  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from dataset import AnnotationDataset, Split, make_loader  # noqa: E402
import cpu_precision  # noqa: E402
from engine import (BatchPreprocessor, Precision, cpu_has_native_bf16, epoch_flips, predict,  # noqa: E402
                    resolve_precision, train_one_epoch)
from image_cache import build_cache  # noqa: E402
from losses import LSEPLoss, create_loss  # noqa: E402
from bench_config import training_config  # noqa: E402
from models import create_model, normalisation  # noqa: E402
from reference import (ReferenceImageDataset, lsep_loop, mcc_scores_sklearn, mcc_thresholds_sklearn,  # noqa: E402
                       reference_loader, reference_predict, reference_train_step)
from thresholds import DEFAULT_GRID, mcc_scores, mcc_thresholds  # noqa: E402
from trainer import build_training  # noqa: E402
from utils import atomic_write_json  # noqa: E402

NUM_LABELS = 260  # Corel-5k's vocabulary
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Settings:
    """How much work each measurement does."""

    images: int  # stand-in JPEGs for the loader
    repeats: int  # interleaved repeats of every measurement
    train_steps: int  # timed train steps (and eval batches) per repeat
    lsep_iterations: int  # project LSEP calls per repeat (the loop does 1/10 as many)
    mcc_label_stride: int  # the scikit-learn loop scores every k-th label (1 = all) and is scaled by k
    loader_sizes: tuple[int, ...] = (224, 448)
    loader_batch: int = 32
    train_batch: int = 8
    eval_batch: int = 32  # evaluation and tagging batch: main.py evaluates at --batch-size (32 by default)
    models: tuple[tuple[str, int], ...] = (("TinyResNet", 224), ("ResNet18", 224), ("TResNet", 128),
                                          ("EfficientNetLite0", 224))
    mcc_shape: tuple[int, int] = (4500, NUM_LABELS)
    lsep_shape: tuple[int, int] = (32, NUM_LABELS)


QUICK = Settings(images=128, repeats=3, train_steps=2, lsep_iterations=100, mcc_label_stride=10,
                 models=(("TinyResNet", 224), ("TResNet", 128)))
FULL = Settings(images=384, repeats=5, train_steps=4, lsep_iterations=300, mcc_label_stride=1)


@dataclass
class Measurement:
    """Seconds per repeat of each variant of one measurement, for `work` units (images, calls) per repeat."""

    name: str
    unit: str
    work: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def rate(self, variant: str) -> float:
        """work / median seconds (units per second)."""
        return self.work / statistics.median(self.seconds[variant])

    def ratios(self, variant: str, baseline: str = "reference") -> list[float]:
        """Per repeat: baseline seconds / variant seconds of the same repeat (> 1 = the variant is faster)."""
        return [b / v for b, v in zip(self.seconds[baseline], self.seconds[variant])]

    def ratio(self, variant: str, baseline: str = "reference") -> float:
        """Median of the paired per-repeat ratios."""
        return statistics.median(self.ratios(variant, baseline))

    def summary(self) -> dict:
        out = {"unit": self.unit, "work_per_repeat": self.work, "seconds": self.seconds, "notes": self.notes,
               "rate": {v: self.rate(v) for v in self.seconds}}
        if "reference" in self.seconds:
            out["ratio_vs_reference"] = {v: self.ratio(v) for v in self.seconds if v != "reference"}
        return out


def interleaved(measurement: Measurement, variants: dict[str, Callable[[], object]], repeats: int) -> Measurement:
    """Time each variant `repeats` times, rotating their order every repeat so that no variant always runs first."""
    names = list(variants)
    for name in names:
        measurement.seconds.setdefault(name, [])
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            measurement.seconds[name].append(time.perf_counter() - start)
    return measurement


def say(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- loader

def write_stand_in_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of Corel size (192x128 and 128x192 alternately): smooth colour fields plus noise, quality 75."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = (192, 128) if i % 2 == 0 else (128, 192)
        coarse = Image.fromarray(rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)  # (H, W, 3)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i}.jpeg"
        Image.fromarray(pixels).save(path, quality=75)
        paths.append(path)
    return paths


def random_targets(rows: int, labels: int, generator: torch.Generator) -> torch.Tensor:
    """Multi-hot (rows, labels) with 1 to 5 positives per row, as Corel-5k's annotations."""
    targets = torch.zeros(rows, labels)
    counts = torch.randint(1, 6, (rows,), generator=generator)
    for i, k in enumerate(counts.tolist()):
        targets[i, torch.randperm(labels, generator=generator)[:k]] = 1.0
    return targets


def bench_loader(settings: Settings, workers: int, folder: Path) -> dict:
    paths = write_stand_in_images(folder / "images", settings.images)
    targets = random_targets(len(paths), NUM_LABELS, torch.Generator().manual_seed(0))
    split = Split("bench", [p.name for p in paths], paths, targets)
    cpu = torch.device("cpu")
    preprocess = BatchPreprocessor(IMAGENET_MEAN, IMAGENET_STD, cpu)
    results = {}
    for size in settings.loader_sizes:
        start = time.perf_counter()
        cache = build_cache(split, size, "memory", num_workers=workers)
        build_s = time.perf_counter() - start

        # Same pixels: the reference (no flip) and the cached path after device-side normalisation agree.
        plain = ReferenceImageDataset(paths[:4], targets[:4], size, IMAGENET_MEAN, IMAGENET_STD, flip=False)
        torch.testing.assert_close(preprocess(torch.from_numpy(cache[:4])), torch.stack([plain[i][0] for i in range(4)]),
                                   rtol=1e-5, atol=1e-5)

        reference_set = ReferenceImageDataset(paths, targets, size, IMAGENET_MEAN, IMAGENET_STD)
        cached_set = AnnotationDataset(split, size, cache=cache)
        decoding_set = AnnotationDataset(split, size)
        epoch = {"n": 0}

        def reference() -> None:
            for images, _ in reference_loader(reference_set, settings.loader_batch, workers, seed=epoch["n"]):
                assert images.dtype == torch.float32

        def project(dataset: AnnotationDataset, num_workers: int) -> Callable[[], None]:
            def run() -> None:
                epoch["n"] += 1
                flips = epoch_flips(len(dataset), 0, epoch["n"])  # (N,)
                loader = make_loader(dataset, settings.loader_batch, num_workers, shuffle=True)
                loader.sampler.set_epoch(epoch["n"])
                for images, _, indices, _ in loader:
                    preprocess(images, flips[indices])  # (B, 3, S, S) float, normalised
            return run

        variants = {"reference": reference, "cache": project(cached_set, workers),
                    "cache, 0 workers": project(cached_set, 0), "decode uint8, no cache": project(decoding_set, workers)}
        say(f"  loader at {size}px: {len(paths)} images x {settings.repeats} repeats of {len(variants)} variants ...")
        m = interleaved(Measurement(f"loader_{size}", "images/s", len(paths)), variants, settings.repeats)
        m.notes = {"workers": str(workers), "batch": str(settings.loader_batch),
                   "cache_build_images_per_s": f"{len(paths) / build_s:.1f}",
                   "cache_bytes": str(cache.nbytes)}
        results[size] = m
        del cache
    return results


# ---------------------------------------------------------------- train and eval steps

def bench_model(name: str, size: int, settings: Settings) -> tuple[Measurement, Measurement]:
    cpu = torch.device("cpu")
    batch, steps = settings.train_batch, settings.train_steps
    generator = torch.Generator().manual_seed(1)
    count = steps * batch
    pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator).numpy()
    split = Split("bench", [f"{i}.jpeg" for i in range(count)], [Path(f"{i}.jpeg") for i in range(count)],
                  random_targets(count, NUM_LABELS, generator))
    flips = epoch_flips(count, 0, 0)  # (steps * B,)

    # The project's loader over the uint8 cache, no workers. Training gets its batches collated beforehand (loading
    # is the loader's cost, measured above), as the reference gets its float batches; predict needs a loader.
    dataset = AnnotationDataset(split, size, cache=pixels)
    batches = list(make_loader(dataset, batch, 0, shuffle=False))
    loader = make_loader(dataset, settings.eval_batch, 0, shuffle=False)

    defaults = training_config(name)
    # (training, evaluation) precision of each variant; the default flags' training precision is what a run of this
    # model, size and batch decides on this CPU (cpu_precision: measured, cached), its evaluation bf16 where native.
    fixed = {"bf16": resolve_precision("bf16", "off", cpu), "channels_last": resolve_precision("none", "on", cpu),
             "bf16 + channels_last": resolve_precision("bf16", "on", cpu)}
    precisions = {"default flags": (train_default(name, size, batch, defaults),
                                    resolve_precision(defaults["amp"], defaults["channels_last"], cpu)),
                  **{label: (p, p) for label, p in fixed.items()}}
    train_variants, eval_variants = {}, {}

    # Reference: fp32 NCHW, plain Adam, input normalised beforehand (the reference loader's job).
    ref_model = create_model(name, NUM_LABELS)
    ref_optimizer = torch.optim.Adam(ref_model.parameters(), lr=defaults["learning_rate"])
    ref_criterion = create_loss(defaults["loss_function"])
    normalise = BatchPreprocessor(*normalisation(ref_model), cpu)
    ref_inputs = [normalise(x, flips[idx]) for x, _, idx, _ in batches]  # (B, 3, S, S) float32
    targets = [y for _, y, _, _ in batches]  # (B, C)

    def reference_train(n: int = steps) -> None:
        for x, y in zip(ref_inputs[:n], targets[:n]):
            reference_train_step(ref_model, ref_optimizer, ref_criterion, x, y)

    train_variants["reference"] = reference_train
    ref_eval_inputs = list(torch.cat(ref_inputs).split(settings.eval_batch))  # (B_eval, 3, S, S) float32
    eval_variants["reference"] = lambda: reference_predict(ref_model, ref_eval_inputs)

    for label, (precision, eval_precision) in precisions.items():
        model, criterion, optimizer, scheduler, _ = build_training(defaults, cpu, NUM_LABELS, steps_per_epoch=10**6)
        if precision.channels_last:
            model = model.to(memory_format=torch.channels_last)
        preprocess = BatchPreprocessor(*normalisation(model), cpu, precision)
        eval_preprocess = BatchPreprocessor(*normalisation(model), cpu, eval_precision)

        def train(n: int = steps, model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler,
                  preprocess=preprocess) -> None:
            train_one_epoch(model, batches[:n], criterion, optimizer, cpu, preprocess, epoch=0, flips=flips,
                            scheduler=scheduler, progress=False)

        def evaluate(model=model, preprocess=eval_preprocess, channels_last=eval_precision.channels_last) -> None:
            predict(model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format),
                    loader, cpu, preprocess, progress=False)

        train_variants[label], eval_variants[label] = train, evaluate

    say(f"  {name} at {size}px, batch {batch}: warm-up, then {settings.repeats} x {steps} steps of "
        f"{len(train_variants)} variants ...")
    for variant in train_variants.values():
        variant(1)  # warm-up: allocator, oneDNN primitives, optimizer state
    work = steps * batch
    notes = {"model": name, "image_size": str(size), "batch": str(batch),
             "default flags resolve to": f"training {_describe(precisions['default flags'][0])}, evaluation "
                                         f"{_describe(precisions['default flags'][1])}",
             "reference": "fp32 NCHW, torch.optim.Adam (defaults), float input normalised beforehand",
             "project": "engine.train_one_epoch on collated uint8 batches (normalised and flipped inside the timed step) "
                        "and engine.predict over make_loader (uint8 cache, 0 workers), trainer.build_training (fused Adam)"}
    train = interleaved(Measurement(f"train_{name}_{size}", "images/s", work, notes=notes), train_variants,
                        settings.repeats)
    for variant in eval_variants.values():
        variant()  # warm-up of the eval-mode graphs
    evaluation = interleaved(Measurement(f"eval_{name}_{size}", "images/s", work,
                                         notes={**notes, "batch": str(settings.eval_batch)}), eval_variants,
                             settings.repeats)
    return train, evaluation


def train_default(name: str, size: int, batch: int, defaults: dict) -> Precision:
    """The training precision --amp auto resolves to for this model, size and batch on this CPU (main.py's own
    decision: cpu_precision.train_bf16 measures once and caches)."""
    cpu = torch.device("cpu")
    bf16 = False
    if defaults["amp"] == "auto" and cpu_has_native_bf16():
        model, criterion, *_ = build_training(defaults, cpu, NUM_LABELS, steps_per_epoch=10**6)
        bf16 = cpu_precision.train_bf16(model, criterion, *normalisation(model),
                                        {**defaults, "image_size": size, "batch_size": batch}, NUM_LABELS)
    return resolve_precision(defaults["amp"], defaults["channels_last"], cpu, training=True, train_bf16=bf16)


def _describe(precision: Precision) -> str:
    dtype = "fp32" if precision.amp_dtype is None else str(precision.amp_dtype).replace("torch.", "")
    return f"{dtype}, {'channels_last' if precision.channels_last else 'NCHW'}"


# ---------------------------------------------------------------- LSEP

class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) and the highest rank created by any op, backward included."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.shape = t.numel(), tuple(t.shape)
        return out


def bench_lsep(settings: Settings) -> Measurement:
    batch, labels = settings.lsep_shape
    generator = torch.Generator().manual_seed(2)
    logits = (2 * torch.randn(batch, labels, generator=generator)).requires_grad_()
    targets = random_targets(batch, labels, generator)
    criterion = LSEPLoss()

    def grad_of(loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        logits.grad = None
        loss = loss_fn(logits, targets)
        loss.backward()
        return loss.detach(), logits.grad.clone()

    # Right first: the factorised loss and its gradient equal the explicit pairwise loop.
    loss_p, grad_p = grad_of(criterion)
    loss_l, grad_l = grad_of(lsep_loop)
    torch.testing.assert_close(loss_p, loss_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_p, grad_l, rtol=1e-5, atol=1e-6)
    largest = {}
    for name, fn in (("project", criterion), ("reference", lsep_loop)):
        with LargestTensor() as probe:
            grad_of(fn)
        largest[name] = probe
    # Never a B x C x C tensor: the largest tensor of forward + backward has at most B * C elements.
    assert largest["project"].numel <= batch * labels, largest["project"].shape

    n_project, n_loop = settings.lsep_iterations, max(settings.lsep_iterations // 10, 5)

    def project() -> None:
        for _ in range(n_project):
            grad_of(criterion)

    def loop() -> None:
        for _ in range(n_loop):
            grad_of(lsep_loop)

    for fn in (project, loop):
        fn()
    say(f"  LSEP {batch}x{labels} fwd+bwd: {settings.repeats} repeats ({n_project} project / {n_loop} loop calls) ...")
    raw = interleaved(Measurement("lsep", "calls/s", 1), {"reference": loop, "project": project}, settings.repeats)
    m = Measurement("lsep", "calls/s", 1)
    # Per-call seconds: each variant makes its own number of calls per repeat.
    m.seconds = {"reference": [s / n_loop for s in raw.seconds["reference"]],
                 "project": [s / n_project for s in raw.seconds["project"]]}
    m.notes = {"shape": f"{batch}x{labels}",
               "largest_tensor_project": f"{largest['project'].shape} ({largest['project'].numel} elements)",
               "largest_tensor_reference": f"{largest['reference'].shape} ({largest['reference'].numel} elements)",
               "BxCxC_elements": str(batch * labels * labels),
               "checked": "loss and gradient equal to the loop (assert_close)"}
    return m


# ---------------------------------------------------------------- MCC

def bench_mcc(settings: Settings) -> Measurement:
    rows, labels = settings.mcc_shape
    generator = torch.Generator().manual_seed(3)
    # Zipf-like label frequencies, ~3.4 labels per image as Corel-5k; scores that carry some signal.
    frequency = 1.0 / torch.arange(1, labels + 1, dtype=torch.float64) ** 0.8
    frequency = frequency / frequency.sum() * 3.4  # (C,)
    targets = (torch.rand(rows, labels, generator=generator, dtype=torch.float64) < frequency).float()  # (N, C)
    probs = torch.sigmoid(2.5 * targets - 3.0 + 1.2 * torch.randn(rows, labels, generator=generator)).float()  # (N, C)
    grid = DEFAULT_GRID
    subset = list(range(0, labels, settings.mcc_label_stride))
    t_np, p_np, g_np = targets.numpy().astype(np.int64), probs.numpy(), grid.numpy()

    # Right first: the same scores and the same thresholds as the scikit-learn loop, on the labels it scores.
    ref_thresholds, ref_scores = mcc_thresholds_sklearn(t_np, p_np, g_np, subset)
    ours = mcc_thresholds(targets, probs, grid)
    np.testing.assert_array_equal(ours.numpy()[subset], ref_thresholds)
    np.testing.assert_allclose(mcc_scores(targets, probs, grid).numpy()[:, subset], ref_scores, rtol=0, atol=1e-12)

    scale = labels / len(subset)

    def reference() -> None:
        mcc_scores_sklearn(t_np, p_np, g_np, subset)

    def project() -> None:
        mcc_thresholds(targets, probs, grid)

    repeats = settings.repeats if settings.mcc_label_stride > 1 else 1
    say(f"  MCC search {rows}x{labels}x{len(grid)}: scikit-learn loop on {len(subset)} labels x {repeats} ...")
    m = interleaved(Measurement("mcc", "searches/s", 1), {"reference": reference, "project": project}, repeats)
    # Extra project repeats cost nothing and steady its median; the ratio pairs only the first `repeats`.
    m.seconds["project"] += [_seconds(project) for _ in range(max(settings.repeats - repeats, 0))]
    m.seconds["reference"] = [s * scale for s in m.seconds["reference"]]
    m.notes = {"shape": f"{rows}x{labels}x{len(grid)}", "sklearn_labels_timed": str(len(subset)),
               "sklearn_scaled_by": f"{scale:g}" + (" (linear in labels; --quick)" if scale != 1 else ""),
               "checked": "thresholds identical, MCC within 1e-12 of scikit-learn"}
    return m


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- report

SECTIONS = ("loader", "train", "lsep", "mcc")
TARGETS = {"loader_448": 3.0, "lsep": 10.0, "mcc": 200.0, "train": 1.0, "eval": 1.5}
# Evaluation's bf16 + channels_last target holds where bf16 is native (issue #29: TinyResNet 224, TResNet 128).
EVAL_TARGET_MODELS = ("eval_TinyResNet_224", "eval_TResNet_128")


def rows_for(results: dict[str, Measurement], mcc_note: str) -> list[tuple[str, ...]]:
    """Table rows: (measurement, variant, reference rate, variant rate, ratio, target)."""
    rows = []
    for key, m in results.items():
        if key.startswith("loader"):
            size = key.split("_")[1]
            ref = m.rate("reference")
            for variant in ("cache", "cache, 0 workers", "decode uint8, no cache"):
                target = f">= {TARGETS['loader_448']:g}x" if size == "448" and variant == "cache" else ""
                rows.append((f"loader {size}px ({m.notes['workers']} workers)", variant, f"{ref:,.0f} img/s",
                             f"{m.rate(variant):,.0f} img/s", f"{m.ratio(variant):.2f}x", target))
            rows.append((f"loader {size}px", "cache build (once)", "", f"{float(m.notes['cache_build_images_per_s']):,.0f} img/s",
                         "", ""))
        elif key.startswith(("train", "eval")):
            kind, name, size = key.split("_")
            ref = m.rate("reference")
            for variant in m.seconds:
                if variant == "reference":
                    continue
                target = ""
                if variant == "default flags" and kind == "train":
                    target = f">= {TARGETS['train']:g}x"
                elif variant == "default flags" and key in EVAL_TARGET_MODELS and native_bf16():
                    target = f">= {TARGETS['eval']:g}x"
                rows.append((f"{kind} {name} {size}px b{m.notes['batch']}", variant, f"{ref:,.1f} img/s",
                             f"{m.rate(variant):,.1f} img/s", f"{m.ratio(variant):.2f}x", target))
        elif key == "lsep":
            rows.append((f"LSEP fwd+bwd {m.notes['shape']}", "factorised", f"{statistics.median(m.seconds['reference']) * 1e3:.2f} ms",
                         f"{statistics.median(m.seconds['project']) * 1e3:.3f} ms", f"{m.ratio('project'):.0f}x",
                         f">= {TARGETS['lsep']:g}x"))
        elif key == "mcc":
            rows.append((f"MCC search {m.notes['shape']}", "vectorised", f"{statistics.median(m.seconds['reference']):.2f} s{mcc_note}",
                         f"{statistics.median(m.seconds['project']) * 1e3:.1f} ms", f"{m.ratio('project'):.0f}x",
                         f">= {TARGETS['mcc']:g}x"))
    return rows


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    header = ("measurement", "project variant", "reference", "project", "speed-up", "target")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 3) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def native_bf16() -> bool:
    return cpu_has_native_bf16()


def check_targets(results: dict[str, Measurement]) -> dict[str, dict]:
    """Each target of the issue: the measured ratio, the target and whether it is met."""
    checks = {}
    if "loader_448" in results:
        checks["loader 448px, cache vs PIL, same workers"] = (results["loader_448"], "cache", TARGETS["loader_448"])
    if "lsep" in results:
        checks["LSEP fwd+bwd vs loop"] = (results["lsep"], "project", TARGETS["lsep"])
    if "mcc" in results:
        checks["MCC search vs scikit-learn loop"] = (results["mcc"], "project", TARGETS["mcc"])
    for key, m in results.items():
        if key.startswith("train"):
            checks[f"{key}: default flags vs fp32 NCHW reference"] = (m, "default flags", TARGETS["train"])
        if key in EVAL_TARGET_MODELS and native_bf16():
            checks[f"{key}: default flags vs fp32 NCHW reference"] = (m, "default flags", TARGETS["eval"])
    return {name: {"ratio": m.ratio(variant), "repeats": [min(m.ratios(variant)), max(m.ratios(variant))],
                   "target": target, "met": m.ratio(variant) >= target}
            for name, (m, variant, target) in checks.items()}


def environment(args: argparse.Namespace) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"command": "python bench/run.py" + (" --quick" if args.quick else "") +
            (f" --threads {args.threads}" if args.threads else "") + (f" --workers {args.workers}" if args.workers != 2 else "") +
            (f" --only {args.only}" if args.only != ",".join(SECTIONS) else "") +
            (" --no-process-tuning" if args.no_process_tuning else ""),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            # mkldnn's check is true on any AVX-512 CPU (bf16 then emulated); the native instructions are the last two.
            "cpu_bf16_mkldnn": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "cpu_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "cpu_amx": bool(torch.cpu._is_amx_tile_supported()),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "scikit-learn": sklearn.__version__,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "malloc": MALLOC_TUNING,
            "load_average_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Speed of the project against the straightforward way, side by side.")
    parser.add_argument("--quick", action="store_true", help="fewer images, repeats and steps (a few minutes on 2 cores)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for both loaders")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "results.json", help="where the results go")
    parser.add_argument("--no-process-tuning", action="store_true",
                        help="keep the default OpenMP wait policy and glibc allocator settings (see the top of this file)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (for development; the report needs all)")
    args = parser.parse_args(argv)
    sections = args.only.split(",")
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--only takes a comma-separated subset of {','.join(SECTIONS)} (got {args.only})")
    if args.workers < 0:
        parser.error(f"--workers cannot be negative (got {args.workers})")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    env = environment(args)
    say(f"bench: {'quick' if args.quick else 'full'} run on {env['cpu']} ({env['cpu_count']} CPUs, "
        f"{env['torch_threads']} torch threads, OMP_WAIT_POLICY {env['OMP_WAIT_POLICY']}, malloc: {env['malloc']}, "
        f"load average {env['load_average_start'][0]:.1f})")
    start = time.perf_counter()
    results: dict[str, Measurement] = {}

    def record(*measurements: Measurement) -> None:
        for m in measurements:
            results[m.name] = m
            rates = ", ".join(f"{v} {m.rate(v):,.3g}" for v in m.seconds)
            say(f"    {m.name} ({m.unit}): {rates}  [{time.perf_counter() - start:.0f} s]")

    if "loader" in sections:
        with tempfile.TemporaryDirectory(prefix="bench-images-") as folder:
            record(*bench_loader(settings, args.workers, Path(folder)).values())
    if "train" in sections:
        for name, size in settings.models:
            record(*bench_model(name, size, settings))
    if "lsep" in sections:
        record(bench_lsep(settings))
    if "mcc" in sections:
        record(bench_mcc(settings))
    env["load_average_end"] = os.getloadavg()
    env["seconds"] = time.perf_counter() - start

    scaled = settings.mcc_label_stride > 1 and "mcc" in results
    mcc_note = f" (timed on 1/{settings.mcc_label_stride} of the labels, scaled)" if scaled else ""
    table = markdown_table(rows_for(results, mcc_note))
    targets = check_targets(results)
    say("")
    say(table)
    say("")
    for name, check in targets.items():
        low, high = check["repeats"]
        say(f"{'met    ' if check['met'] else 'NOT MET'}  {name}: {check['ratio']:.2f}x (repeats {low:.2f}-{high:.2f}; "
            f"target >= {check['target']:g}x)")
    say(f"\n{env['command']}: {env['seconds']:.0f} s; load average {env['load_average_start'][0]:.1f} -> "
        f"{env['load_average_end'][0]:.1f}; medians of {settings.repeats} interleaved repeats")
    report = {"environment": env, "settings": asdict(settings), "targets": targets, "table_markdown": table,
              "measurements": {k: m.summary() for k, m in results.items()}}
    atomic_write_json(args.output, report)
    say(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main()
