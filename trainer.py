"""Training: a run configuration in, a run directory out (config.json, log.csv, last.pth, best.pth).

`train(config)` is a sequence of named steps, each readable on one screen:

1. `load_data`       the dataset's train/val/test splits (rank 0 generates the demo; every rank reads that folder)
2. `build_loaders`   the seeded, sharded training loader (augmentation, decoded-image cache) and the validation loader
3. `prepare_parts`   `build_training` (model, loss, optimiser, OneCycleLR, EMA), then precision, AMP scaler and DDP
4. `start_run`       a fresh run directory, or `resume_run`: last.pth restored (checkpoint.restore_training_state)
5. `run_epochs`      per epoch `train_epoch` (Ctrl-C saves a resumable last.pth) and `validate`; best.pth, last.pth
                     and a log.csv row (`keep_checkpoints`)

The configuration is the dict of config.py's training keys (what config.json holds) plus "progress" and "resume"
(None, or the run directory to continue); `resume_config` rebuilds it for --resume from the run's config.json. The
builders it shares with inference (data, loaders, model, loss) live in components.py.
"""
from __future__ import annotations

import shlex
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

import cpu_precision
from augment import TrainAugmentation, make_train_augmentation
from checkpoint import (CSVLogger, check_vocabulary, load_checkpoint, restore_training_state, save_checkpoint,
                        training_state)
from components import (apply_cudnn, eval_loader, first_few, load_data, loss_from_config, model_from_config,
                        training_flips)
from dashboard import TrainingEvents
from DataAugmentation.files import FLAT_RATIO, copies_spread
from dataset import COREL5K_STATISTICS, AnnotationDataset, DatasetSplits, make_loader
from distributed import World, broadcast_object, get_device, init_distributed, say, sum_across_ranks
from engine import (BatchPreprocessor, EpochProgress, Precision, cpu_has_native_bf16, evaluate, resolve_precision,
                    train_one_epoch)
from image_cache import build_cache, channel_statistics
from models import AnnotationModel, count_trainable_parameters, normalisation
from recipes import describe
from runs import data_records, load_config, make_run_dir, run_data, save_config
from utils import GracefulStop, Interrupted, UserError, check_writable, seed_everything


def resume_config(run_dir: str | Path, runtime: Mapping[str, Any]) -> dict:
    """An interrupted run's configuration: its config.json (completed for older runs, runs.load_config) with the
    resuming command's `runtime` values (config.RUNTIME_KEYS, "progress") on top, "resume" set, and its dataset
    where it is now (runs.run_data: the folder it was trained on, from any working directory)."""
    config = load_config(run_dir)
    return {**config, **runtime, "resume": str(run_dir), "data": run_data(Path(run_dir), config)}


# ---------------------------------------------------------------- 1-2. data and loaders

@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    augmentation: TrainAugmentation | None  # told the epoch before each epoch's iterator is made
    train_cache: np.ndarray | None  # the decoded training images (N, 3, S, S) uint8, if cached


def build_loaders(config: Mapping[str, Any], data: DatasetSplits, world: World, device: torch.device) -> Loaders:
    """The training loader (seeded order, per-image augmentation, decoded-image cache) and the validation loader."""
    size, batch, workers, skip = config["image_size"], config["batch_size"], config["num_workers"], config["skip_bad_images"]
    cache_mode = config["cache"]
    if skip and cache_mode != "none":
        say("Note: --skip-bad-images decodes images every epoch (the decoded-image cache needs every image readable).")
        cache_mode = "none"
    cache_dir, progress = Path(config["save_dir"]) / "cache", config["progress"] and world.is_main
    train_cache = build_cache(data.train, size, cache_mode, cache_dir, workers, progress)
    val_cache = build_cache(data.val, size, cache_mode, cache_dir, workers, progress)
    augmentation = make_train_augmentation(config["randaugment"], config["cutout"], config["seed"])
    train_set = AnnotationDataset(data.train, size, skip, cache=train_cache, transform=augmentation)
    train = make_loader(train_set, batch, workers, shuffle=True, seed=config["seed"], pin_memory=device.type == "cuda",
                        drop_last=_drop_last(config["drop_last"], len(train_set) // world.world_size, batch),
                        num_replicas=world.world_size, rank=world.rank)
    val = eval_loader(data.val, size, batch, workers, world, device, skip, cache=val_cache)
    return Loaders(train, val, augmentation, train_cache)


def _drop_last(drop_last: bool, images: int, batch: int) -> bool:
    """Whether the loader drops the last partial batch of each epoch (--drop-last / --no-drop-last).

    Dropping (the default) leaves out a different few images each epoch, as the order is reshuffled. Tiny runs with
    fewer images than a batch keep them. A kept last batch of one image would break BatchNorm in training mode, so
    it is dropped, and that is said.
    """
    if drop_last:
        return images >= batch
    if images % batch == 1 and images > 1:
        say(f"Note: {images} training images in batches of {batch} leave a last batch of one image, which BatchNorm "
            f"cannot train on; it is dropped each epoch.")
        return True
    return False


# ---------------------------------------------------------------- 3. model, loss, optimiser

def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int):
    """OneCycleLR over `total_steps` with a 20 % warm-up (the study's pct_start)."""
    # OneCycleLR needs more than one warm-up step (pct_start * total_steps > 1) and a step after it; only tiny
    # smoke-test runs are that short, and they get the shortest valid warm-up instead of a division by zero.
    pct_start = 0.2 if 0.2 * total_steps > 1 else min(1.5 / total_steps, 0.75)
    if pct_start != 0.2:
        say(f"Note: {total_steps} optimiser steps are too few for a 20% warm-up; OneCycleLR warms up over "
            f"{pct_start:.0%} of them.")
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=max(total_steps, 2),
                                               pct_start=pct_start)


def build_training(config: Mapping[str, Any], device: torch.device, num_classes: int, steps_per_epoch: int,
                   train_targets: torch.Tensor | None = None, vocabulary: list[str] | None = None):
    """(model, criterion, optimizer, scheduler, ema) of a run configuration, the model on `device`.

    `train_targets` (N, C): the TRAINING split's targets, from which the gcn head's label graph is computed (never
    validation or test); `vocabulary`: the label names, for text label embeddings.
    """
    seed_everything(config["seed"])
    model = model_from_config(config, num_classes, train_targets, vocabulary).to(device)
    criterion = loss_from_config(config)
    weight_decay = config["weight_decay"]
    # With weight decay, biases and norm weights (1-D) are left undecayed (timm's rule, as the ASL recipe).
    parameters = param_groups_weight_decay(model, weight_decay) if weight_decay > 0 else model.parameters()
    optimizer_class = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
    # Fused Adam where the device has it (one kernel for all parameters), else the multi-tensor path.
    optimizer = optimizer_class(parameters, lr=config["learning_rate"], weight_decay=weight_decay,
                                fused=device.type in ("cuda", "cpu"))
    # The schedule may be longer than the training (the study: 80 epochs' OneCycleLR, stopped after 60).
    scheduler = one_cycle(optimizer, config["learning_rate"], round(config["schedule_epochs"] * steps_per_epoch))
    ema = None
    if config["ema"]:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config["ema_decay"]), use_buffers=True)
    return model, criterion, optimizer, scheduler, ema


@dataclass
class Parts:
    """Everything a training step touches."""

    model: AnnotationModel  # the bare model: checkpoints hold its state dict
    forward_model: nn.Module  # what the loop calls: DDP-wrapped under torchrun, compiled with --compile
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: torch.optim.swa_utils.AveragedModel | None
    scaler: torch.amp.GradScaler | None
    preprocess: BatchPreprocessor
    device: torch.device
    normalisation: dict[str, list[float]]  # {"mean": (3,), "std": (3,)} the inputs are normalised with
    precision: Precision  # what training runs at (recorded in config.json)


def input_normalisation(config: Mapping[str, Any], data: DatasetSplits, model: AnnotationModel,
                        train_cache: np.ndarray | None, world: World) -> tuple[list[float], list[float]]:
    """(mean, std) per channel for --normalise: the backbone's, the study's Corel-5k figures (its augmented ones
    under --augmentation), this training split's own (computed once, cached under <save-dir>/cache), or 6 numbers."""
    source = list(config["normalise"])
    if source == ["backbone"]:
        mean, std = normalisation(model)
    elif source == ["corel5k"]:
        mean, std = COREL5K_STATISTICS[bool(config["augmentation"])]
    elif source == ["dataset"]:
        mean, std = channel_statistics(data.train, config["image_size"], train_cache, config["num_workers"],
                                       Path(config["save_dir"]) / "cache", config["progress"] and world.is_main)
    else:
        values = [float(v) for v in source]
        mean, std = values[:3], values[3:]
    return [float(v) for v in mean], [float(v) for v in std]


PRECISION_NAMES = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}


def training_precision(config: Mapping[str, Any], model, criterion, mean, std, device: torch.device,
                       num_classes: int, world: World) -> Precision:
    """The run's training precision: the one config.json records (a resumed run keeps it), else --amp/--channels-last
    resolved, --amp auto on a CPU with native bf16 deciding bf16 by measuring (cpu_precision; rank 0 decides)."""
    recorded = config.get("precision")
    if recorded:
        amp = {name: dtype for dtype, name in PRECISION_NAMES.items()}[recorded["amp"]]
        return Precision(amp, recorded["channels_last"])
    measure = config["amp"] == "auto" and device.type == "cpu" and cpu_has_native_bf16()
    bf16 = None
    if measure and world.is_main:
        bf16 = cpu_precision.train_bf16(model, criterion, mean, std, dict(config), num_classes)
    bf16 = bool(broadcast_object(bf16)) if measure else False
    return resolve_precision(config["amp"], config["channels_last"], device, training=True, train_bf16=bf16)


def prepare_parts(config: Mapping[str, Any], data: DatasetSplits, loaders: Loaders, world: World,
                  device: torch.device) -> Parts:
    """`build_training`, then the precision (`training_precision`), memory format, fp16 scaler, batch preprocessor
    and DDP / compile."""
    model, criterion, optimizer, scheduler, ema = build_training(
        config, device, len(data.vocabulary), len(loaders.train), train_targets=data.train.targets,
        vocabulary=data.vocabulary)
    mean, std = input_normalisation(config, data, model, loaders.train_cache, world)
    precision = training_precision(config, model, criterion, mean, std, device, len(data.vocabulary), world)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if precision.amp_dtype is torch.float16 else None
    forward_model = model
    if world.world_size > 1:
        if config["sync_bn"]:
            forward_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(forward_model)
        forward_model = torch.nn.parallel.DistributedDataParallel(
            forward_model, device_ids=[device.index] if device.type == "cuda" else None)
    if config["compile"]:
        forward_model = torch.compile(forward_model)
    preprocess = BatchPreprocessor(mean, std, device, precision)
    return Parts(model, forward_model, criterion, optimizer, scheduler, ema, scaler, preprocess, device,
                 {"mean": mean, "std": std}, precision)


# ---------------------------------------------------------------- 4. run directory, checkpoints, resume

@dataclass
class RunState:
    """Where training stands: the epoch to run next (0-based), how far into it, and the best validation score."""

    run_dir: Path
    epoch: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)
    best: float = -1.0
    best_epoch: int = 0
    new_save_dir: bool = False  # this run created --save-dir (removed again if it fails before its first checkpoint)


def snapshot(parts: Parts, state: RunState, config: Mapping[str, Any], vocabulary: list[str],
             weights: dict | None = None, best_source: str | None = None) -> dict:
    """checkpoint.training_state of the parts at `state`."""
    return training_state(parts.model, parts.optimizer, parts.scheduler, scaler=parts.scaler, ema=parts.ema,
                          epoch=state.epoch, epoch_progress=asdict(state.progress), best_metric=state.best,
                          best_epoch=state.best_epoch, config=dict(config), vocabulary=vocabulary, device=parts.device,
                          normalisation=parts.normalisation, weights=weights, best_source=best_source)


def start_run(config: Mapping[str, Any], data: DatasetSplits, world: World,
              precision: Precision) -> tuple[dict, RunState]:
    """A fresh run directory (rank 0 creates it and writes config.json: the training keys, where the dataset is,
    when training started and the precision it trains at); returns (config with run_dir, state)."""
    run_dir, new_save_dir = None, not Path(config["save_dir"]).exists()
    # The same record in config.json and in every checkpoint's config, as a resumed run reads it back.
    recorded = {"amp": PRECISION_NAMES[precision.amp_dtype], "channels_last": precision.channels_last}
    if world.is_main:
        run_dir = make_run_dir(config["save_dir"], config["model"], config["loss_function"], config["data"],
                               config["run_name"])
        started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        save_config(run_dir, config, {"run_dir": str(run_dir), **data_records(run_dir, data.root),
                                      "started": started, "world_size": world.world_size, "precision": recorded})
    run_dir = Path(broadcast_object(str(run_dir)))
    say(f"Run directory: {run_dir}")
    return ({**config, "run_dir": str(run_dir), "world_size": world.world_size, "precision": recorded},
            RunState(run_dir, best=config["selection_start"], new_save_dir=new_save_dir))


def resume_run(config: Mapping[str, Any], parts: Parts, vocabulary: list[str]) -> RunState:
    """Restore last.pth of the run in config["resume"] into `parts`; returns where it stopped."""
    run_dir = Path(config["resume"])
    last = load_checkpoint(run_dir / "last.pth")
    check_vocabulary(last["vocabulary"], vocabulary, run_dir / "last.pth")
    epoch, progress, best, best_epoch = restore_training_state(
        last, parts.model, parts.optimizer, parts.scheduler, scaler=parts.scaler, ema=parts.ema, device=parts.device)
    state = RunState(run_dir, epoch, EpochProgress(**progress), best, best_epoch)
    if state.epoch >= config["epochs"]:
        say(f"{run_dir} has finished all its {config['epochs']} epochs; nothing is left to train.")
    else:
        say(f"Resuming {run_dir} at epoch {state.epoch + 1}, batch {state.progress.step + 1} with its saved "
            f"configuration.")
    return state


def warn_if_flat_copies(data: DatasetSplits) -> None:
    """--augmentation: say so when the GAN copies are near-uniform images (made with too few --iterations)."""
    spread = copies_spread(data.train)
    if spread is not None and spread < FLAT_RATIO:
        say(f"Warning: the GAN copies in {data.root / 'aug-images'} are flat: their pixel spread is {spread:.2f} of "
            f"their originals' (median of up to 32, below {FLAT_RATIO}), so they were made with too few --iterations "
            f"(bench/gan_quality.py; the study trains 1001). Training on them adds near-uniform images with real "
            f"labels; regenerate them with python -m DataAugmentation --iterations 1001, or train without "
            f"--augmentation.")


def discard_empty_run(run_dir: Path, new_save_dir: bool) -> None:
    """Remove a new run directory that holds nothing but its config.json (training failed before its first
    checkpoint), and --save-dir too if this run created it and it is now empty: a failed start leaves nothing."""
    if {p.name for p in run_dir.iterdir()} <= {"config.json"}:
        for path in run_dir.iterdir():
            path.unlink()
        run_dir.rmdir()
        if new_save_dir and not any(run_dir.parent.iterdir()):
            run_dir.parent.rmdir()


def resume_command(run_dir: Path) -> str:
    return f"python main.py --resume {shlex.quote(str(run_dir.absolute()))}"


# ---------------------------------------------------------------- 5. the epoch loop

def train_epoch(parts: Parts, loaders: Loaders, data: DatasetSplits, config: Mapping[str, Any], state: RunState,
                world: World, stop: GracefulStop) -> dict[str, float]:
    """Epoch `state.epoch` from where `state.progress` stands (Ctrl-C: see run_epochs)."""
    epoch = state.epoch
    loaders.train.sampler.set_epoch(epoch, skip=state.progress.step * config["batch_size"])
    if loaders.augmentation is not None:
        loaders.augmentation.set_epoch(epoch)  # before the loader's iterator copies the dataset into its workers
    flips = training_flips(config, len(data.train), epoch)
    bad: list[int] = []
    stats = train_one_epoch(parts.forward_model, loaders.train, parts.criterion, parts.optimizer, parts.device,
                            parts.preprocess, epoch=epoch, flips=flips, scheduler=parts.scheduler,
                            scaler=parts.scaler, ema=parts.ema, state=state.progress,
                            progress=config["progress"] and world.is_main, bad_images=bad,
                            freeze_bn=config["freeze_bn"], stop=stop)
    if bad:
        say(f"Epoch {epoch + 1}: skipped {len(bad)} unreadable training images: "
            f"{first_few([data.train.image_names[i] for i in bad])}")
    if world.world_size > 1:
        # Every rank saw its own shard: log the loss per image over all of them, and the total throughput.
        loss_sum, seen, rate = sum_across_ranks(state.progress.loss_sum, state.progress.seen,
                                                stats["train/images_per_s"])
        stats = {**stats, "train/loss": loss_sum / max(seen, 1), "train/images_per_s": rate}
    return stats


def validate(parts: Parts, loader, config: Mapping[str, Any], progress: bool,
             stop: GracefulStop | None = None) -> tuple[dict[str, float], float, str]:
    """(validation metrics, score, source): the score is the per-class F1 at 0.5 of the model or of its EMA,
    whichever is higher (`source` says which; the EMA must beat the model strictly). Predictions follow the run's
    --threshold-compare and --metric-epsilon (the study selects with p > 0.5)."""
    rule = dict(progress=progress, strict=config["threshold_compare"] == "gt", epsilon=config["metric_epsilon"],
                stop=stop)
    row = evaluate(parts.forward_model, loader, parts.criterion, parts.device, parts.preprocess, **rule)
    score, source = row["val/per_class/f1"], "model"
    if parts.ema is not None:
        row.update(evaluate(parts.ema.module, loader, parts.criterion, parts.device, parts.preprocess,
                            prefix="val_ema", **rule))
        if row["val_ema/per_class/f1"] > score:
            score, source = row["val_ema/per_class/f1"], "ema"
    return row, score, source


def keep_checkpoints(parts: Parts, state: RunState, score: float, source: str, config: Mapping[str, Any],
                     vocabulary: list[str], world: World) -> bool:
    """After an epoch: best.pth when `score` beats the best so far (with the winning weights), then last.pth.
    Returns whether the score improved."""
    improved = score > state.best
    if improved:
        state.best, state.best_epoch = score, state.epoch
        weights = parts.ema.module.state_dict() if source == "ema" else parts.model.state_dict()
        if world.is_main:
            save_checkpoint(state.run_dir / "best.pth",
                            snapshot(parts, state, config, vocabulary, weights, best_source=source))
    if world.is_main:
        save_checkpoint(state.run_dir / "last.pth", snapshot(parts, state, config, vocabulary))
    return improved


def epoch_line(row: dict[str, float], epochs: int, improved: bool) -> str:
    ema = f", EMA {row['val_ema/per_class/f1']:.3f}" if "val_ema/per_class/f1" in row else ""
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train/loss']:.4f}, val loss {row['val/loss']:.4f}, "
            f"val per-class F1@0.5 {row['val/per_class/f1']:.3f}{ema}, mAP {row['val/mAP']:.1f}, "
            f"N+ {row['val/N+']}, {row['train/images_per_s']:.0f} img/s{'  *best*' if improved else ''}")


def run_epochs(parts: Parts, loaders: Loaders, data: DatasetSplits, config: Mapping[str, Any], state: RunState,
               world: World) -> None:
    """Train from `state` to the last epoch: train, validate, keep checkpoints and log one row per epoch.

    Ctrl-C stops at the next batch (or validation batch) and saves last.pth at that point (`interrupted`): a batch
    is either done, its step included, or not begun, and the checkpoints and log of an epoch are written as one
    block, so a resumed run is bit-identical to an uninterrupted one.
    """
    logger = CSVLogger(state.run_dir / "log.csv")
    if world.is_main:
        logger.truncate_after(state.epoch + 1)
    progress = config["progress"] and world.is_main
    agree = (lambda flag: bool(sum_across_ranks(float(flag))[0])) if world.world_size > 1 else None
    events = TrainingEvents(state.run_dir, config["tensorboard"] and world.is_main, first_epoch=state.epoch + 1)
    with GracefulStop(agree) as stop, closing(events):
        while state.epoch < config["epochs"]:
            start = time.perf_counter()
            try:
                row = {"epoch": state.epoch + 1, **train_epoch(parts, loaders, data, config, state, world, stop)}
                metrics, score, source = validate(parts, loaders.val, config, progress, stop)
            except KeyboardInterrupt:
                interrupted(parts, state, config, data.vocabulary, world, len(loaders.train))
            with stop.critical():
                row.update(metrics)
                row["time_s"] = time.perf_counter() - start
                state.epoch, state.progress = state.epoch + 1, EpochProgress()
                improved = keep_checkpoints(parts, state, score, source, config, data.vocabulary, world)
                if world.is_main:
                    logger.log(row)
                events.epoch(row)
            say(epoch_line(row, config["epochs"], improved))


def interrupted(parts: Parts, state: RunState, config: Mapping[str, Any], vocabulary: list[str], world: World,
                batches: int) -> None:
    """Save last.pth where training stands and raise Interrupted, whose one line names the command that continues."""
    if world.is_main:
        save_checkpoint(state.run_dir / "last.pth", snapshot(parts, state, config, vocabulary))
    where = (f"batch {state.progress.step} of {batches}" if state.progress.step < batches
             else "after its training, before validation")
    raise Interrupted(f"Interrupted at epoch {state.epoch + 1}, {where}: saved {state.run_dir / 'last.pth'}; continue "
                      f"with: {resume_command(state.run_dir)}")


def train(config: Mapping[str, Any]) -> Path:
    """Train as configured (or resume config["resume"]); returns the run directory."""
    world, device = init_distributed(get_device(config["device"]))
    if world.is_main:
        check_writable(config["resume"] or config["save_dir"], "give --save-dir a folder you can write to")
    say(f"Recipe {config['recipe']}: " + "; ".join(f"{row}: {value}" for row, value in describe(config)[1:]))
    apply_cudnn(config)
    data = load_data(config["data"], config, config["skip_bad_images"], world)
    if config["augmentation"] and world.is_main:
        warn_if_flat_copies(data)
    if data.protocol == "study":
        say("Protocol: --select-on-test, the study's original protocol: the best epoch is chosen on the TEST set, "
            "so test figures are optimistic.")
    loaders = build_loaders(config, data, world, device)
    parts = prepare_parts(config, data, loaders, world, device)
    if config["resume"]:
        state = resume_run(config, parts, data.vocabulary)
    else:
        config, state = start_run(config, data, world, parts.precision)
    say(f"{config['model']} ({count_trainable_parameters(parts.model):,} trainable parameters) + "
        f"{config['loss_function']} on {device} ({PRECISION_NAMES[parts.precision.amp_dtype].replace('none', 'fp32')}"
        f", {'channels_last' if parts.precision.channels_last else 'NCHW'}); splits {data.sizes()}")
    say(f"Inputs normalised with mean {parts.normalisation['mean']}, std {parts.normalisation['std']}.")
    try:
        run_epochs(parts, loaders, data, config, state, world)
    except UserError:
        if world.is_main and not config["resume"]:
            discard_empty_run(state.run_dir, state.new_save_dir)
        raise
    say(f"Best validation per-class F1 {state.best:.4f} at epoch {state.best_epoch}; checkpoints in {state.run_dir}. "
        f"Evaluate with:\n  python main.py --evaluate --checkpoint {shlex.quote(str(state.run_dir))}")
    return state.run_dir
