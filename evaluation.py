"""--evaluate's computation: settings -> predictions -> thresholds -> results, returned for report.py to write (the
only files written here are cross-fitting's folds, which crossfit.py trains and caches).

`evaluate_run` loads a run (runs.py), predicts the split its thresholds are fitted on (--threshold-split: train+val
by default, val, train, or cv = out-of-fold predictions of models trained without each image, crossfit.py), fits one
threshold per label (thresholds.py), predicts the test set and scores it (metrics.py). report.py writes the files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from checkpoint import check_vocabulary
from components import apply_cudnn, load_data, training_flips
from config import Runtime
from crossfit import out_of_fold
from dataset import DatasetSplits
from distributed import World, get_device, init_distributed, say
from metrics import compute_metrics, ranking_metrics, top_k_metrics
from recipes import EVALUATION_KEYS, describe
from runs import checkpoint_identity, load_run, predict_split, run_data, run_preprocessor, skip_bad_images
from thresholds import DEFAULT_GRID, fit_thresholds, pooled_threshold, stabilise
from utils import UserError

TOP_K = 5  # the annotation literature's protocol: 5 labels per image


@dataclass(frozen=True)
class EvaluationOptions:
    """What --evaluate computes besides the run's own settings: the threshold criterion and grid (None = the study's
    0.05 ... 0.70), the rare-label options, cross-fitting's folds, the top-k protocol's k, and `overrides` of the
    run's recipe thresholding (keys of recipes.EVALUATION_KEYS; None or absent = the run's value)."""

    threshold_method: str = "mcc"
    threshold_grid: tuple[float, ...] | None = None
    threshold_min_positives: int = 0
    threshold_shrinkage: float = 0.0
    folds: int = 5
    top_k: int = TOP_K
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What one --evaluate computed: `results` (results.json), the fitting and test `predictions` ({"fit", "test"}:
    probs, targets, indices, split), the fitted `thresholds` (C,) and the `settings` they were fitted with."""

    run_dir: Path
    results: dict
    data: DatasetSplits
    predictions: dict
    thresholds: torch.Tensor
    settings: dict
    world: World
    checkpoint: dict  # runs.checkpoint_identity of the best.pth evaluated
    data_source: str  # the dataset evaluated (the run's, or --data)
    tensorboard: bool  # the run writes TensorBoard events (report.py adds the evaluation's)


def evaluation_settings(options: EvaluationOptions, config: Mapping[str, Any]) -> dict:
    """The thresholding of this evaluation: each override given, else the run's (its recipe's) value; the method,
    the grid (a float64 tensor), the rare-label options, the folds and k."""
    settings = {key: options.overrides.get(key) if options.overrides.get(key) is not None else config[key]
                for key in EVALUATION_KEYS}
    if options.folds != EvaluationOptions.folds and settings["threshold_split"] != "cv":
        raise UserError(f"--folds applies to --threshold-split cv, and this evaluation fits its thresholds on "
                        f"{settings['threshold_split']}; add --threshold-split cv, or drop --folds.")
    grid = torch.tensor(options.threshold_grid, dtype=torch.float64) if options.threshold_grid else DEFAULT_GRID
    return {**settings, "threshold_method": options.threshold_method, "grid": grid, "top_k": options.top_k,
            "threshold_min_positives": options.threshold_min_positives,
            "threshold_shrinkage": options.threshold_shrinkage, "folds": options.folds}


def run_metadata(run_dir: Path, config: dict, ckpt: dict, data: DatasetSplits, settings: dict) -> dict:
    """What results.json says about the run, its recipe and the thresholding (results["run"])."""
    return {"run_dir": str(run_dir), "model": config["model"], "loss_function": config["loss_function"],
            "data": config["data"], "evaluated_on": str(data.root), "image_size": config["image_size"],
            "epochs": config["epochs"],
            "seed": config["seed"], "split_sizes": data.sizes(), "protocol": data.protocol,
            **{k: v for k, v in settings.items() if k != "grid"},
            "threshold_grid": [round(float(g), 6) for g in settings["grid"]],
            "best_epoch": ckpt["best_epoch"], "best_source": ckpt["best_source"], "head": config["head"],
            "normalisation": ckpt["normalisation"], "recipe": dict(describe({**config, **settings}))}


@dataclass
class Loaded:
    """A run ready to predict: its model, checkpoint, config, data (and where it was read: `data_source`), device,
    world and input preprocessing."""

    run_dir: Path
    model: torch.nn.Module
    ckpt: dict
    config: dict
    data: DatasetSplits
    data_source: str
    device: torch.device
    world: World
    preprocess: Any
    runtime: Runtime

    def predict(self, split, flips: torch.Tensor | None = None) -> dict:
        out = predict_split(self.model, split, self.config, self.runtime, self.world, self.device, self.preprocess,
                            flips)
        return {**out, "split": split}


def fitting_predictions(run: Loaded, settings: dict, train: Callable | None) -> dict:
    """The predictions the thresholds are fitted on, by --threshold-split: val, train (through the training flips
    under --threshold-transform train, drawn for the epoch after the last trained one), train+val, or cv (each
    training image predicted by a model that never saw it; crossfit.py, which trains with `train`)."""
    where, data, config = settings["threshold_split"], run.data, run.config
    if where == "cv":
        # The folds train on the dataset this evaluation reads (the run's, or --data).
        fold_config = {**config, "data": run.data_source}
        return {**out_of_fold(run.run_dir, fold_config, data, settings["folds"], run.runtime, train),
                "split": data.train}
    parts = []
    for split in ([data.train] if where == "train" else [data.val] if where == "val" else [data.train, data.val]):
        flips = (training_flips(config, len(split), config["epochs"])
                 if settings["threshold_transform"] == "train" and split is data.train else None)
        parts.append(run.predict(split, flips))
    if len(parts) == 1:
        return parts[0]
    offset = len(data.train)  # train+val: val's rows follow train's
    return {"probs": torch.cat([p["probs"] for p in parts]), "targets": torch.cat([p["targets"] for p in parts]),
            "indices": torch.cat([parts[0]["indices"], parts[1]["indices"] + offset]),
            "split": data.train + data.val}


def fit_run_thresholds(fitted: dict, settings: dict) -> torch.Tensor:
    """Per-label thresholds (C,) on the fitting predictions, steadied for rare labels when asked: labels with fewer
    than --threshold-min-positives positives take the threshold of those labels pooled, and --threshold-shrinkage
    lambda pulls every label toward the pooled threshold (of all labels, without a minimum) by n / (n + lambda)."""
    method, grid = settings["threshold_method"], settings["grid"]
    thresholds = fit_thresholds(method, fitted["targets"], fitted["probs"], grid=grid,
                                fallback=settings["threshold_fallback"]).float()  # (C,)
    minimum, shrinkage = settings["threshold_min_positives"], settings["threshold_shrinkage"]
    if not (minimum or shrinkage):
        return thresholds
    positives = fitted["targets"].sum(0)  # (C,)
    rare = positives < minimum  # (C,) bool

    def pooled(over: torch.Tensor) -> torch.Tensor:
        return pooled_threshold(method, fitted["targets"], fitted["probs"], over, grid).float()

    if shrinkage:  # every label toward the threshold of all labels pooled
        thresholds = stabilise(thresholds, positives, pooled(torch.ones_like(rare)), shrinkage=shrinkage)
    if minimum:  # then the rare labels take the threshold of the rare labels pooled
        thresholds = torch.where(rare, pooled(rare), thresholds)
    return thresholds


def score_test_set(test: dict, thresholds: torch.Tensor, settings: dict) -> dict:
    """{"default": metrics at 0.5, "mcc": metrics with the fitted thresholds} under the evaluation's rule, "top_k":
    each image annotated with its k best labels (the literature's protocol), "ranking": threshold-free ranking."""
    rule = dict(strict=settings["threshold_compare"] == "gt", epsilon=settings["metric_epsilon"])
    return {"default": compute_metrics(test["targets"], test["probs"], 0.5, **rule),
            "mcc": compute_metrics(test["targets"], test["probs"], thresholds, **rule),
            "top_k": top_k_metrics(test["targets"], test["probs"], settings["top_k"]),
            "ranking": ranking_metrics(test["targets"], test["probs"])}


def load_for_evaluation(run_dir: Path, runtime: Runtime, data: str | None, model_name: str | None) -> Loaded:
    """The run's best model on this process's device, its dataset (--data, else where it was trained) with the
    vocabulary checked, and the inputs' preprocessing."""
    world, device = init_distributed(get_device(runtime.device))
    model, ckpt, config = load_run(run_dir, model_name, device)
    apply_cudnn(config)
    source = run_data(run_dir, config, data)
    splits = load_data(source, config, skip_bad_images(runtime, config), world)
    check_vocabulary(ckpt["vocabulary"], splits.vocabulary, run_dir / "best.pth")
    return Loaded(run_dir, model, ckpt, config, splits, source, device, world,
                  run_preprocessor(model, ckpt, runtime, device, config), runtime)


def evaluate_run(run_dir: Path, options: EvaluationOptions, runtime: Runtime, data: str | None = None,
                 model_name: str | None = None, train: Callable[[dict], Path] | None = None) -> Evaluation:
    """Fit thresholds on the run's threshold split and score the test set with them. `data` (--data) replaces the
    run's dataset, `model_name` (--model) must be the run's; `train` trains the folds of --threshold-split cv (the
    caller passes trainer.train, so that this module never imports the training code)."""
    say(f"Evaluating {run_dir}: loading the run and its dataset.")
    run = load_for_evaluation(run_dir, runtime, data, model_name)
    settings = evaluation_settings(options, run.config)
    say(f"{run.config['model']} + {run.config['loss_function']}, best epoch {run.ckpt['best_epoch']}: "
        f"{settings['threshold_method'].upper()} thresholds fitted on the {settings['threshold_split']} split "
        f"({run.data.sizes()}), then the {len(run.data.test)} test images scored with them.")
    fitted = fitting_predictions(run, settings, train)
    thresholds = fit_run_thresholds(fitted, settings)
    test = run.predict(run.data.test)
    if len(test["bad"]):
        say(f"Skipped {len(test['bad'])} unreadable test images; the figures cover the remaining "
            f"{len(test['probs'])}.")
    results = {**score_test_set(test, thresholds, settings),
               "thresholds": {label: round(float(t), 6) for label, t in zip(run.data.vocabulary, thresholds)},
               "run": run_metadata(run_dir, run.config, run.ckpt, run.data, settings)}
    return Evaluation(run_dir, results, run.data, {"fit": fitted, "test": test}, thresholds, settings, run.world,
                      checkpoint_identity(run.ckpt), run.data_source, bool(run.config["tensorboard"]))
