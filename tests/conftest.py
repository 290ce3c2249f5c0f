"""Shared fixtures: tiny generated datasets in the Corel-5k format and the real annotation files in ../shared."""
from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tqdm import tqdm

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

# tqdm's default lock holds a multiprocessing semaphore that every fork of this process shares: a forked child stopped
# while it holds it (as mutmut stops a mutant that runs too long) leaves it held for good, and every later fork that
# draws a bar then hangs. The tests draw bars from one process at a time: a lock of this process is all they need.
tqdm.set_lock(threading.RLock())
tqdm.monitor_interval = 0  # no monitor thread, whose lock a fork could copy held


def write_dataset(root: Path, n_train: int = 24, n_test: int = 10, labels=("sky", "sun", "water", "boat", "tree"),
                  seed: int = 0, size=(48, 32)) -> Path:
    """A tiny learnable dataset: label j present <=> a coloured square in slot j; returns root."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(len(labels), 3))
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n, offset in (("train", n_train, 0), ("test", n_test, 10_000)):
        samples = []
        for i in range(n):
            present = rng.random(len(labels)) < 0.4
            present[rng.integers(len(labels))] = True
            image = np.full((size[1], size[0], 3), 20, dtype=np.uint8)
            for j in np.flatnonzero(present):
                x0 = (j * size[0]) // len(labels)
                image[4:-4, x0 + 1:x0 + size[0] // len(labels) - 1] = colours[j]
            name = f"{offset + i}.jpeg"
            Image.fromarray(image).save(root / "images" / name, quality=95)
            samples.append({"image_name": name, "image_labels": [labels[j] for j in np.flatnonzero(present)]})
        (root / f"{split}.json").write_text(json.dumps({"samples": samples, "labels": list(labels)}))
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "tiny")


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the real annotation files are not at {SHARED_DATASETS} (../shared beside the repository)")
    return SHARED_DATASETS


def train_args(data, save_dir, *extra) -> list[str]:
    """main.py flags for a seconds-long CPU run of TinyResNet at 32 px on `data`, runs under `save_dir`."""
    # fp32 NCHW on any CPU, so that the tests' arithmetic is the same everywhere (--amp auto is tested on its own)
    return ["--data", str(data), "--model", "TinyResNet", "--no-pretrained", "--image-size", "32", "--batch-size", "8",
            "--val-size", "6", "--num-workers", "0", "--no-progress", "--save-dir", str(save_dir),
            "--loss-function", "AsymmetricLoss", "--learning-rate", "3e-3", "--amp", "none", "--channels-last", "off",
            *extra]


def run_dirs(save_dir: Path) -> list[Path]:
    """The run directories under `save_dir` (not its cache/ folder)."""
    return sorted(p for p in save_dir.iterdir() if (p / "config.json").is_file())


def log_rows(run_dir: Path) -> list[dict]:
    """log.csv rows without the wall-clock columns."""
    with (run_dir / "log.csv").open() as f:
        # Wall-clock columns (images/s, seconds) differ between runs by nature; everything else must not.
        return [{k: v for k, v in row.items() if not k.endswith(("images_per_s", "time_s"))} for row in csv.DictReader(f)]


def evaluate(run_dir: Path, *flags) -> tuple[dict, dict]:
    """--evaluate a run (with `flags`); returns (results.json, the arrays of evaluation.npz)."""
    from main import cli

    cli(["--evaluate", "--checkpoint", str(run_dir), "--num-workers", "0", "--no-progress", *flags])
    saved = np.load(run_dir / "evaluation.npz")
    return json.loads((run_dir / "results.json").read_text()), {k: saved[k] for k in saved.files}


# Fixtures that train a classifier: the tests using them are end-to-end ("slow"), left out of the mutation check,
# whose mutants each rerun the tests that reach them (setup.cfg: -m "not slow").
TRAINING_FIXTURES = {"run", "planted", "two_runs", "world", "study_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def make_run(root: Path, data: Path, thresholds=None, compare: str = "ge", sharpen: float = 8.0,
             name: str = "TinyResNet_AsymmetricLoss_tiny_fast", **flags) -> Path:
    """A run directory built in a fraction of a second, without training: the config.json training would write for
    TinyResNet at 32 px on `data`, a best.pth of a freshly initialised model whose head is scaled by `sharpen` (so
    the probabilities spread over (0, 1) instead of sitting at 0.5), and, with `thresholds` (C values), the
    thresholds.json an --evaluate would write. For the fast tests that apply a run (--predict, --export, cross-fitting)."""
    import torch

    from components import model_from_config
    from config import training_config
    from recipes import resolve
    from runs import checkpoint_identity, data_records, save_config

    run_dir = root / name
    run_dir.mkdir(parents=True)
    vocabulary = json.loads((data / "train.json").read_text())["labels"]
    config = resolve(training_config({"model": "TinyResNet", "pretrained": False, "image_size": 32, "data": str(data),
                                      "val_size": 6, "num_workers": 0, "batch_size": 8, "save_dir": str(root),
                                      "amp": "none", "channels_last": "off", **flags}))
    save_config(run_dir, config, {"run_dir": str(run_dir), **data_records(run_dir, data),
                                  "started": "2026-01-01T00:00:00+00:00", "world_size": 1})
    torch.manual_seed(0)
    model = model_from_config(config, len(vocabulary), pretrained=False)
    state = model.state_dict()
    for key in ("head.1.weight", "head.1.bias"):
        state[key] = state[key] * sharpen
    ckpt = {"version": 2, "model": state, "vocabulary": vocabulary, "normalisation": None, "best_epoch": 1,
            "best_source": "model", "best_metric": 0.5, "epoch": 1, "config": config}
    torch.save(ckpt, run_dir / "best.pth")
    if thresholds is not None:
        record = {"labels": vocabulary, "thresholds": [float(t) for t in thresholds], "compare": compare,
                  "method": "mcc", "split": "val", "transform": "eval", "fallback": "default",
                  "grid": [round(0.05 * k, 2) for k in range(1, 15)],
                  "min_positives": 0, "shrinkage": 0.0, "folds": None, "data": str(data),
                  "checkpoint": checkpoint_identity(ckpt), "evaluated": "2026-01-01T00:00:00+00:00"}
        (run_dir / "thresholds.json").write_text(json.dumps(record))
    return run_dir
