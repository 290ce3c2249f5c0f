"""Checkpoints and the training log of a run directory (runs.py: the directory itself and its config.json).

Training writes `last.pth` (every epoch and on Ctrl-C), `best.pth` (on improvement of the validation per-class F1)
and `log.csv` (one row per epoch); nothing changes them afterwards. A checkpoint is a plain dict (see
`training_state`), written atomically.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from utils import UserError, atomic_torch_save, atomic_write_text, first_sentence

CHECKPOINT_VERSION = 2  # 2: + "normalisation" (the inputs' mean/std); version 1 files are upgraded on load


class CheckpointError(UserError, ValueError):
    """A checkpoint or run directory that cannot be used as asked."""


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    atomic_torch_save(path, checkpoint)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint dict written by save_checkpoint, with one clear sentence if that is impossible."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist; train first, or point --checkpoint/--resume "
                              f"at a run directory that has it.")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read ({type(e).__name__}: {first_sentence(e)}); "
                              f"it may be truncated or not a checkpoint of this project.") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("version") not in (1, CHECKPOINT_VERSION):
        raise CheckpointError(f"'{path}' is not a checkpoint of this project (version {CHECKPOINT_VERSION}).")
    if checkpoint["version"] == 1:
        # Version 1 runs normalised with the backbone's own mean/std (None says so) and predicted with p >= t.
        checkpoint = {**checkpoint, "version": CHECKPOINT_VERSION, "normalisation": None, "threshold_compare": "ge"}
    return checkpoint


def check_model(made: str, wanted: str, source: str | Path) -> None:
    """Refuse a checkpoint of model `made` when `wanted` (--model) names another, naming both."""
    if made != wanted:
        raise CheckpointError(f"Checkpoint '{source}' was made with {made}, but {wanted} was asked for; "
                              f"use --model {made} or another checkpoint.")


def check_vocabulary(saved: list[str], vocabulary: list[str], source: str | Path) -> None:
    """Refuse a checkpoint whose label vocabulary differs from the dataset's (labels or their order)."""
    if saved != list(vocabulary):
        diff = sorted(set(saved) ^ set(vocabulary))
        detail = f"labels in one but not the other: {diff[:8]}" if diff else "same labels in another order"
        raise CheckpointError(f"Checkpoint '{source}' has a vocabulary of {len(saved)} labels and the dataset "
                              f"has {len(vocabulary)} ({detail}); evaluate it on the dataset it was trained on.")


def training_state(model: torch.nn.Module, optimizer, scheduler, *, scaler, ema, epoch: int,
                   epoch_progress: dict, best_metric: float, best_epoch: int, config: dict, vocabulary: list[str],
                   device: torch.device, normalisation: dict | None = None, weights: dict | None = None,
                   best_source: str | None = None) -> dict:
    """Everything a run needs to continue bit-identically: weights (`weights`, else the model's), optimiser,
    scheduler, AMP scaler, EMA, where training stands (`epoch` to run next, `epoch_progress` inside it), the best
    validation score so far, the configuration, the vocabulary, the inputs' `normalisation` ({"mean", "std"};
    None = the backbone's) and the RNG state. best.pth names its `best_source` ("model" or "ema")."""
    return {"version": CHECKPOINT_VERSION, "model": weights if weights is not None else model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "epoch_progress": dict(epoch_progress), "best_metric": best_metric,
            "best_epoch": best_epoch, "best_source": best_source, "config": config, "vocabulary": list(vocabulary),
            "normalisation": normalisation,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


def restore_training_state(state: dict, model: torch.nn.Module, optimizer, scheduler, *, scaler, ema,
                           device: torch.device) -> tuple[int, dict, float, int]:
    """Load a `training_state` into the given objects and the RNG; returns (epoch, epoch_progress, best_metric,
    best_epoch)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["epoch"], state["epoch_progress"], state["best_metric"], state["best_epoch"]


class CSVLogger:
    """Appends one row per epoch to log.csv; the header is fixed by the first row."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, row: dict[str, Any]) -> None:
        new = not self.path.exists()
        fields = list(row) if new else self.path.open().readline().strip().split(",")
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def truncate_after(self, epoch: int) -> None:
        """Drop rows of epochs >= `epoch` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) < epoch]
        atomic_write_text(self.path, "".join(kept))
