"""Cross-fitted thresholds (--threshold-split cv): honest predictions for every training image.

The training split's original images are cut into K folds (dataset.fold_of; a GAN copy goes with its original). For
each fold k a model is trained as the run was, but without fold k (and its copies), and it predicts fold k: every
training image then has a prediction from a model that never saw it, and the run's thresholds are fitted on those
out-of-fold predictions. It costs K extra trainings; each fold lives in <run>/folds/ as an ordinary run (resumable
with its last.pth) and its predictions in <run>/folds/fold<k>of<K>.npz, which later --evaluate calls reuse.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from config import Runtime
from dataset import DatasetSplits, fold_of
from distributed import World, get_device, say
from runs import load_config, load_run, predict_split, run_dir_name, run_preprocessor
from utils import UserError, atomic_write_bytes


def fold_run(run_dir: Path, config: dict, k: int, folds: int, runtime: Runtime, train: Callable[[dict], Path]) -> Path:
    """Train (or resume, or reuse) the model of fold k of `folds` with `train` (trainer.train); returns its run
    directory. The fold trains as the run did, on this command's device and loader settings."""
    save_dir = run_dir / "folds"
    fold_dir = save_dir / run_dir_name(config["model"], config["loss_function"], config["data"], f"fold{k}of{folds}")
    here = {"num_workers": runtime.num_workers, "device": runtime.device, "save_dir": str(save_dir),
            "progress": runtime.progress}
    if (fold_dir / "last.pth").is_file():
        return train({**load_config(fold_dir), **here, "resume": str(fold_dir)})
    return train({**config, **here, "resume": None, "run_name": f"fold{k}of{folds}", "hold_out_fold": [k, folds]})


def fold_predictions(fold_dir: Path, rows: list[int], data: DatasetSplits, runtime: Runtime) -> dict:
    """The fold model's probabilities of the training rows `rows` (its held-out fold)."""
    device = get_device(runtime.device)
    model, ckpt, config = load_run(fold_dir, None, device)
    split = data.train.subset(rows, "fold")
    out = predict_split(model, split, config, runtime, World(), device,
                        run_preprocessor(model, ckpt, runtime, device, config))
    return {"probs": out["probs"], "targets": out["targets"], "rows": torch.tensor(rows)[out["indices"]]}


def save_fold(path: Path, out: dict, data: str = "") -> None:
    """The fold's predictions as one .npz written atomically (an interrupted write leaves no file that a later
    --evaluate would take for a finished fold), with the dataset they were predicted on."""
    buffer = io.BytesIO()
    np.savez(buffer, probs=out["probs"].numpy(), targets=out["targets"].numpy(), rows=out["rows"].numpy(),
             data=np.array(str(data)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def out_of_fold(run_dir: Path, config: dict, data: DatasetSplits, folds: int, runtime: Runtime,
                train: Callable[[dict], Path] | None) -> dict:
    """{"probs", "targets"} (N, C) of the training split's original images, each from the fold model that did not
    see it, in split order; trains the folds not finished yet with `train` (saying so), reuses the rest."""
    fold = fold_of(data.train, folds, config["seed"])  # (N,) -1 never: every row has an original
    originals = ~data.train.generated  # (N,) bool
    parts = []
    for k in range(folds):
        cached = run_dir / "folds" / f"fold{k}of{folds}.npz"
        if not cached.is_file():
            if train is None:
                raise UserError(f"Fold {k + 1} of {folds} of {run_dir} is not trained yet, and this command cannot "
                                f"train; run --evaluate --threshold-split cv through main.py.")
            say(f"Cross-fitting: fold {k + 1} of {folds}, a model trained without {int((fold == k).sum())} of the "
                f"{len(fold)} training images (K = {folds} extra trainings in all; finished folds are reused).")
            fold_dir = fold_run(run_dir, config, k, folds, runtime, train)
            rows = ((fold == k) & originals).nonzero().flatten().tolist()
            save_fold(cached, fold_predictions(fold_dir, rows, data, runtime), data.root.resolve())
        saved = np.load(cached)
        if "data" in saved.files and str(saved["data"]) not in ("", str(data.root.resolve())):
            raise UserError(f"'{cached}' holds predictions of the dataset '{saved['data']}', and this evaluation reads "
                            f"'{data.root.resolve()}'; evaluate on that dataset, or delete {cached.parent} to "
                            f"cross-fit again.")
        parts.append({key: torch.from_numpy(saved[key]) for key in ("probs", "targets", "rows")})
    rows = torch.cat([p["rows"] for p in parts])
    order = torch.argsort(rows)
    return {"probs": torch.cat([p["probs"] for p in parts])[order],
            "targets": torch.cat([p["targets"] for p in parts])[order], "indices": rows[order]}
