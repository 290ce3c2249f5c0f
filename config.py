"""What a trained run is configured by: the keys of its config.json and their defaults, in one place.

A run's config.json holds the TRAINING keys below and nothing of the command that happened to run it (no --evaluate,
--predict, --output ...). main.py's parser takes these flags' defaults from TRAINING_DEFAULTS (`parser.set_defaults`),
so a default is written once. Runs made before a flag existed lack its key: `complete` fills those keys with the
defaults (what those older runs did) and then gives every recipe key its run's recipe value (recipes.resolve).

Keys that are None here are either "the recipe's value" (see recipes.RECIPES) or "the model's / dataset's default",
resolved when a run starts.

`Runtime` is the other half of a command: how it runs on this machine (device, batches, loader processes,
precision, progress), which --evaluate and --predict take from their flags (--export runs on the CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from heads import GCN_P, GCN_TAU
from recipes import resolve

TRAINING_DEFAULTS: dict[str, Any] = {
    # recipe and model
    "recipe": "default", "model": None, "global_pooling": "avg", "dropout": 0.3, "freeze_bn": False,
    "pretrained": True, "weights": None, "weights_tag": None, "head": "fc", "gcn_tau": GCN_TAU, "gcn_p": GCN_P,
    "label_embeddings": "learned",
    # loss
    "loss_function": "AsymmetricLoss", "gamma_pos": None, "gamma_neg": None, "margin": None, "loss_reduction": None,
    "detach_focusing": None, "loss_eps": None,
    # data
    "data": None, "augmentation": False, "image_size": 448, "val_size": 500, "select_on_test": None,
    "shuffle_once": None, "drop_last": None, "normalise": None, "skip_bad_images": False, "num_workers": 2,
    "cache": "auto",
    # training
    "epochs": None, "schedule_epochs": None, "batch_size": 32, "learning_rate": 1e-4, "seed": None, "flip": None,
    "vertical_flip": None, "randaugment": False, "cutout": 0.0, "optimizer": "adam", "weight_decay": 0.0,
    "ema": False, "ema_decay": 0.9997, "device": "auto", "amp": None, "channels_last": None, "compile": False,
    "cudnn_deterministic": None, "cudnn_benchmark": None, "selection_start": None,
    "sync_bn": False, "save_dir": "runs", "run_name": None, "tensorboard": True,
    # the run's own thresholding (its recipe's; --evaluate may override each)
    "threshold_split": None, "threshold_transform": None, "threshold_fallback": None, "threshold_compare": None,
    "metric_epsilon": None,
    # internal, never a flag: cross-fitting (--threshold-split cv) trains without fold K of FOLDS
    "hold_out_fold": None,
}
# Keys that a resumed run takes from the resuming command (how it runs here, not what it trains).
RUNTIME_KEYS = ("num_workers", "device", "save_dir", "cache")
# Keys written by training beside the flags: where the run lives, its dataset's absolute folder, when it started.
RECORD_KEYS = ("run_dir", "data_root", "data_root_from_run", "started", "world_size", "precision")


def training_config(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The training keys of `flags` (a dict of main.py's flags), in TRAINING_DEFAULTS' order; absent ones defaulted."""
    return {key: flags.get(key, default) for key, default in TRAINING_DEFAULTS.items()}


def complete(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config.json made whole: keys it lacks (older runs) from TRAINING_DEFAULTS, then the recipe's values.
    Keys outside the training keys (mode flags that older versions saved) are dropped, except RECORD_KEYS."""
    kept = {k: v for k, v in saved.items() if k in TRAINING_DEFAULTS or k in RECORD_KEYS}
    return resolve({**TRAINING_DEFAULTS, **kept})


@dataclass(frozen=True)
class Runtime:
    """How a command runs on this machine: device, batches, loader processes, precision, progress bars and whether
    unreadable images are skipped (the flags of the same names)."""

    device: str = TRAINING_DEFAULTS["device"]
    batch_size: int = TRAINING_DEFAULTS["batch_size"]
    num_workers: int = TRAINING_DEFAULTS["num_workers"]
    amp: str | None = None  # None: the run's own precision (its --amp / --channels-last, its recipe's)
    channels_last: str | None = None
    progress: bool = True
    skip_bad_images: bool = TRAINING_DEFAULTS["skip_bad_images"]
