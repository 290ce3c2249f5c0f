"""One home for a trained run: where it lives, what it was trained with, and applying it.

A run directory `<save-dir>/<model>_<loss>_<dataset>_<timestamp or --run-name>/` holds what training wrote and
nothing else ever changes: config.json (the training keys of config.py, where its dataset was and when it started),
log.csv, last.pth, best.pth. Later commands add files beside them: --evaluate writes thresholds.json (the thresholds
--predict and --export apply) and its report files, --export model.onnx.

  finding      `run_directory` (--checkpoint, else `find_latest_run`: the newest by the time training started)
  config       `save_config`, `load_config` (older runs completed by config.complete)
  data         `run_data`: where the run's dataset is now, from wherever the command runs
  model        `load_run`: the model of best.pth in eval mode, the checkpoint and the config
  inputs       `run_normalisation`, `run_preprocessor`
  predictions  `predict_split`
  thresholds   `save_thresholds`, `load_thresholds` (thresholds.json; runs evaluated by older versions kept them
               inside best.pth)
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from checkpoint import CheckpointError, check_model, load_checkpoint
from components import eval_loader, model_from_config
from config import RECORD_KEYS, Runtime, complete, training_config
from dataset import DATASETS, Split
from distributed import World
from engine import BatchPreprocessor, predict, resolve_precision
from models import normalisation
from utils import atomic_write_json

THRESHOLDS_FILE = "thresholds.json"


# ---------------------------------------------------------------- naming, creating and finding runs

def dataset_tag(data: str) -> str:
    """Short dataset name for run-directory names: a known name as is, a path by its last folder."""
    return Path(str(data).rstrip("/")).name or "data"


def run_dir_name(model: str, loss: str, data: str, run_name: str | None = None) -> str:
    return f"{model}_{loss}_{dataset_tag(data)}_{run_name or time.strftime('%Y%m%d-%H%M%S')}"


def make_run_dir(save_dir: str | Path, model: str, loss: str, data: str, run_name: str | None = None) -> Path:
    """Create a fresh run directory; an existing --run-name is refused rather than overwritten."""
    path = Path(save_dir) / run_dir_name(model, loss, data, run_name)
    if path.exists() and any(path.iterdir()):
        raise CheckpointError(f"Run directory '{path}' already exists; pick another --run-name, resume it with "
                              f"--resume {path}, or delete it.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"Cannot create the run directory '{path}' ({e.strerror or e}); give --save-dir a "
                              f"folder you can write to.") from None
    return path


def _saved_config(run_dir: Path) -> dict | None:
    """config.json as saved, or None when it is missing or not a JSON object (such a folder is not a usable run)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def training_started(run_dir: Path) -> float:
    """When the run's training started (seconds since the epoch): config.json's "started", or for runs older than
    that key (or with an unreadable one) the time config.json was written (training writes it once, at the start)."""
    started = (_saved_config(run_dir) or {}).get("started")
    try:
        return datetime.fromisoformat(started).timestamp()
    except (TypeError, ValueError):
        return (run_dir / "config.json").stat().st_mtime


def find_latest_run(save_dir: str | Path, model: str, loss: str, data: str) -> Path:
    """The run of this model/loss/dataset under `save_dir` with a best.pth whose training started last. The folder
    name only narrows the search ('tiny_' also starts 'tiny_v2_...'): the run's config.json must name the same."""
    prefix = f"{model}_{loss}_{dataset_tag(data)}_"
    runs = []
    for path in Path(save_dir).glob(prefix + "*"):
        saved = _saved_config(path) if (path / "best.pth").is_file() else None
        if saved and (saved.get("model"), saved.get("loss_function"), dataset_tag(saved.get("data", ""))) == \
                (model, loss, dataset_tag(data)):
            runs.append(path)
    if not runs:
        raise CheckpointError(f"No trained run of {model} + {loss} on {dataset_tag(data)} under '{save_dir}' "
                              f"(looked for {prefix}*/best.pth); train one first with the same --model, "
                              f"--loss-function and --data, or pass --checkpoint RUN_DIR.")
    return max(runs, key=training_started)


def run_directory(checkpoint: str | None, save_dir: str, model: str, loss: str, data: str) -> Path:
    """--checkpoint RUN_DIR, or the newest run of `model` + `loss` on `data` under `save_dir`."""
    return Path(checkpoint) if checkpoint else find_latest_run(save_dir, model, loss, data)


# ---------------------------------------------------------------- config.json

def save_config(run_dir: Path, config: Mapping[str, Any], records: Mapping[str, Any]) -> None:
    """config.json: the training keys of `config` and the `records` (RECORD_KEYS: run_dir, data_root, ...)."""
    unknown = set(records) - set(RECORD_KEYS)
    assert not unknown, unknown  # a new record key belongs in config.RECORD_KEYS
    saved = {**training_config(config), **records}
    atomic_write_json(run_dir / "config.json", {k: str(v) if isinstance(v, Path) else v for k, v in saved.items()})


def load_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's configuration: its config.json, completed for older runs (config.complete)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a run directory (no config.json); give the folder that "
                              f"training created under --save-dir.")
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    return complete(saved)


def data_records(run_dir: Path, root: Path) -> dict[str, str]:
    """Where the dataset is, for config.json: absolute, and relative to the run directory (both move together)."""
    root = root.resolve()
    return {"data_root": str(root), "data_root_from_run": os.path.relpath(root, run_dir.resolve())}


def run_data(run_dir: Path, config: Mapping[str, Any], data: str | None = None) -> str:
    """The dataset to evaluate the run on: `data` (--data) when given; else the folder it was trained on, found
    from wherever the command runs: its absolute path, else the same place relative to the run directory (the run
    and its dataset moved together); a known name (demo, Corel-5k, ...) resolves as at training."""
    if data is not None:
        return data
    root, relative = config.get("data_root"), config.get("data_root_from_run")
    if root is None:
        return config["data"]  # a run older than the record: the path as typed at training
    for candidate in [Path(root)] + ([Path(run_dir) / relative] if relative else []):
        if candidate.is_dir():
            return str(candidate.resolve())
    if config["data"] in DATASETS or config["data"] == "demo":
        return config["data"]
    raise CheckpointError(f"The dataset run '{run_dir}' was trained on is no longer at '{root}' (--data "
                          f"{config['data']} at training); pass --data with the folder where it is now.")


# ---------------------------------------------------------------- the trained model

def load_run(run_dir: Path, wanted_model: str | None, device: torch.device):
    """(model of best.pth in eval mode on `device`, best checkpoint, run config); `wanted_model` (--model, None =
    any) must be the run's."""
    config = load_config(run_dir)
    ckpt = load_checkpoint(run_dir / "best.pth")
    check_model(config["model"], wanted_model or config["model"], run_dir / "best.pth")
    # The head's label graph and text embeddings are placeholders here, filled from the checkpoint's state dict.
    model = model_from_config(config, len(ckpt["vocabulary"]), pretrained=False).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, config


def run_normalisation(model, ckpt: dict) -> dict:
    """{"mean", "std"} the run trained with: its checkpoint's, or the backbone's for runs older than that field."""
    return ckpt["normalisation"] or dict(zip(("mean", "std"), normalisation(model)))


def run_preprocessor(model, ckpt: dict, runtime: Runtime, device: torch.device,
                     config: Mapping[str, Any]) -> BatchPreprocessor:
    """The inputs' normalisation the run trained with (`run_normalisation`), at the runtime's precision, or the run's
    own (its --amp / --channels-last: fp32 NCHW for a study run) where the command gives none."""
    stats = run_normalisation(model, ckpt)
    precision = resolve_precision(runtime.amp or config["amp"], runtime.channels_last or config["channels_last"],
                                  device)
    return BatchPreprocessor(stats["mean"], stats["std"], device, precision)


def skip_bad_images(runtime: Runtime, config: Mapping[str, Any]) -> bool:
    """Evaluation's one rule: skip missing or unreadable images when this command or the run's training asked to."""
    return bool(runtime.skip_bad_images or config["skip_bad_images"])


def predict_split(model, split: Split, config: Mapping[str, Any], runtime: Runtime, world: World,
                  device: torch.device, preprocess: BatchPreprocessor, flips: torch.Tensor | None = None) -> dict:
    """{'probs', 'targets' (N, C), 'indices' (N,), 'bad' (unreadable images)} of `split`, rows in split order;
    `flips` (N, 2) flips the images first. Unreadable images are skipped when the command or the training asked."""
    loader = eval_loader(split, config["image_size"], runtime.batch_size, runtime.num_workers, world, device,
                         skip_bad_images(runtime, config))
    out = predict(model, loader, device, preprocess, desc=split.name, progress=runtime.progress and world.is_main,
                  flips=flips, source=f"The model of {config.get('run_dir') or 'the run'}")
    return {"probs": out["probs"], "targets": out["targets"], "indices": out["indices"], "bad": out["bad"]}


# ---------------------------------------------------------------- thresholds.json

def checkpoint_identity(ckpt: dict) -> dict:
    """What tells one best.pth from another of the same run (a resumed run may write a new one)."""
    return {"best_epoch": ckpt["best_epoch"], "best_source": ckpt.get("best_source"),
            "best_metric": round(float(ckpt["best_metric"]), 8)}


def save_thresholds(run_dir: Path, vocabulary: list[str], thresholds: torch.Tensor, settings: Mapping[str, Any],
                    checkpoint: dict, data: str) -> dict:
    """thresholds.json: the latest --evaluate's thresholds in label order, their comparison rule, how they were
    fitted (method, split, transform, fallback, grid, rare-label options, folds), on which dataset, for which best.pth
    (`checkpoint`: its `checkpoint_identity`), with the time; returns it."""
    record = {"labels": list(vocabulary), "thresholds": [round(float(t), 6) for t in thresholds],
              "compare": settings["threshold_compare"], "method": settings["threshold_method"],
              "split": settings["threshold_split"], "transform": settings["threshold_transform"],
              "fallback": settings["threshold_fallback"], "grid": [round(float(g), 6) for g in settings["grid"]],
              "min_positives": settings["threshold_min_positives"], "shrinkage": settings["threshold_shrinkage"],
              "folds": settings["folds"] if settings["threshold_split"] == "cv" else None, "data": str(data),
              "checkpoint": checkpoint,
              "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_json(run_dir / THRESHOLDS_FILE, record)
    return record


def load_thresholds(run_dir: Path, ckpt: dict) -> dict | None:
    """{"thresholds" (C,), "compare", "source": which evaluation they come from, in words, "fitting": how they were
    fitted (method, split, grid, fallback; {} for thresholds of older versions)} of the run's latest --evaluate
    (thresholds.json; older versions stored them inside best.pth), or None before any --evaluate."""
    path = run_dir / THRESHOLDS_FILE
    if path.is_file():
        record = _read_thresholds(path, ckpt)
        source = (f"{record['method'].upper()} thresholds fitted on {record['split']} by --evaluate at "
                  f"{record['evaluated']} ({path})")
        return {"thresholds": torch.tensor(record["thresholds"], dtype=torch.float32), "compare": record["compare"],
                "source": source,
                "fitting": {k: record[k] for k in ("method", "split", "grid", "fallback") if k in record}}
    if ckpt.get("thresholds") is not None:
        return {"thresholds": ckpt["thresholds"].float(), "compare": ckpt["threshold_compare"],
                "source": f"{(ckpt.get('threshold_method') or 'mcc').upper()} thresholds stored in "
                          f"{run_dir / 'best.pth'} by an older --evaluate", "fitting": {}}
    return None


def _read_thresholds(path: Path, ckpt: dict) -> dict:
    """thresholds.json checked: every key there, one finite threshold in [0, 1] per label of best.pth in its order,
    a known rule, and fitted for this best.pth (not one that a resumed run has replaced since)."""
    fix = f"run --evaluate --checkpoint {path.parent} again to rewrite it"
    try:
        record = json.loads(path.read_text())
        values = torch.tensor(record["thresholds"], dtype=torch.float64)
        keys = {"labels", "compare", "method", "split", "evaluated"} - set(record)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not a thresholds file of this project ({type(e).__name__}); {fix}.") from None
    problem = (f"it lacks {', '.join(sorted(keys))}" if keys else
               "it lists other labels than the run's best.pth" if record["labels"] != list(ckpt["vocabulary"]) else
               f"it has {values.numel()} thresholds for {len(ckpt['vocabulary'])} labels"
               if values.shape != (len(ckpt["vocabulary"]),) else
               "a threshold is not a number in [0, 1]" if not bool(((values >= 0) & (values <= 1)).all()) else
               f"its comparison rule '{record['compare']}' is neither ge nor gt" if record["compare"] not in ("ge", "gt")
               else None)
    if problem is None and record.get("checkpoint") not in (None, checkpoint_identity(ckpt)):
        problem = (f"it was fitted for the best.pth of epoch {record['checkpoint']['best_epoch']}, and best.pth is now "
                   f"epoch {ckpt['best_epoch']} (the run was resumed since)")
    if problem:
        raise CheckpointError(f"'{path}' cannot be applied: {problem}; {fix}.")
    return record
