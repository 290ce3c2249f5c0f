"""Builders shared by training and inference, from a run configuration (the dict config.json holds).

As timm's `create_model` / `create_loader` / `create_loss`: the dataset's splits under the run's protocol
(`load_data`), an unshuffled loader for predictions (`eval_loader`), the run's model (`model_from_config`) and loss
(`loss_from_config`), and the training flips of an epoch (`training_flips`, which the study's threshold fitting
reuses). trainer.py trains with them; runs.py, evaluation.py, predict.py and export.py load and apply runs with them,
so none of those imports the training code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from dataset import AnnotationDataset, DatasetSplits, Split, fold_of, load_dataset, make_loader, resolve_data_root
from distributed import World, broadcast_object, say
from engine import epoch_flips
from heads import head_options
from losses import create_loss
from models import AnnotationModel, create_model

FIRST_FEW = 5


def first_few(names: list[str]) -> str:
    return ", ".join(names[:FIRST_FEW]) + (" ..." if len(names) > FIRST_FEW else "")


def load_data(data: str | Path, config: Mapping[str, Any], skip_bad_images: bool, world: World) -> DatasetSplits:
    """The splits of `data` (a dataset name, 'demo' or a folder) under the run's protocol (keys augmentation,
    val_size, seed, select_on_test, shuffle_once, hold_out_fold).

    Rank 0 resolves the root first (generating the demo data if needed); the others then read the same folder.
    """
    root = resolve_data_root(str(data)) if world.is_main else None
    if world.world_size > 1:
        root = resolve_data_root(str(broadcast_object(str(root))))
    splits = load_dataset(root, config["augmentation"], config["val_size"], config["seed"], config["select_on_test"],
                          skip_bad_images, shuffle_once=config["shuffle_once"])
    if config.get("hold_out_fold"):
        # A cross-fitting model (--threshold-split cv): trained without fold k of K of the training split.
        k, folds = config["hold_out_fold"]
        keep = (fold_of(splits.train, folds, config["seed"]) != k).nonzero().flatten().tolist()
        splits.train = splits.train.subset(keep, "train", keep_skipped=True)
    for split in {id(s): s for s in (splits.train, splits.val, splits.test)}.values():
        if split.skipped:
            say(f"Skipping {len(split.skipped)} missing images of {split.name} (--skip-bad-images): "
                f"{first_few(split.skipped)}")
    return splits


def eval_loader(split: Split, image_size: int, batch_size: int, num_workers: int, world: World,
                device: torch.device, skip_bad_images: bool = False, cache=None) -> torch.utils.data.DataLoader:
    """An unshuffled loader over `split`, sharded over the torchrun world (engine.predict gathers the rows)."""
    dataset = AnnotationDataset(split, image_size, skip_bad_images, cache=cache)
    return make_loader(dataset, batch_size, num_workers, shuffle=False, pin_memory=device.type == "cuda",
                       num_replicas=world.world_size, rank=world.rank)


def model_from_config(config: Mapping[str, Any], num_classes: int, train_targets: torch.Tensor | None = None,
                      vocabulary: list[str] | None = None, pretrained: bool | None = None) -> AnnotationModel:
    """The run's model. `train_targets` (N, C), the TRAINING split's, give the gcn head its label graph; without
    them (a model whose state dict is loaded next) the graph is a placeholder. `pretrained` None = the config's."""
    options = head_options(config["head"], tau=config["gcn_tau"], p=config["gcn_p"],
                           label_embeddings=config["label_embeddings"], train_targets=train_targets,
                           vocabulary=vocabulary)
    return create_model(config["model"], num_classes,
                        pretrained=config["pretrained"] if pretrained is None else pretrained,
                        weights=config["weights"] if pretrained is None else None, weights_tag=config["weights_tag"],
                        global_pooling=config["global_pooling"], dropout=config["dropout"], head=config["head"],
                        head_options=options)


def loss_from_config(config: Mapping[str, Any]):
    """The run's training loss (losses.create_loss; None options mean the loss's own default)."""
    return create_loss(config["loss_function"], gamma_pos=config["gamma_pos"], gamma_neg=config["gamma_neg"],
                       margin=config["margin"], reduction=config["loss_reduction"],
                       detach_focusing=config["detach_focusing"], eps=config["loss_eps"])


def apply_cudnn(config: Mapping[str, Any]) -> None:
    """The run's cuDNN settings, process-wide (--cudnn-deterministic, --cudnn-benchmark; the study's main.py sets
    deterministic on and benchmark off before training and before evaluating)."""
    torch.backends.cudnn.deterministic = bool(config["cudnn_deterministic"])
    torch.backends.cudnn.benchmark = bool(config["cudnn_benchmark"])


def training_flips(config: Mapping[str, Any], num_images: int, epoch: int) -> torch.Tensor | None:
    """The epoch's (N, 2) flips under --flip / --vertical-flip, or None when both are off."""
    if not (config["flip"] or config["vertical_flip"]):
        return None
    return epoch_flips(num_images, config["seed"], epoch, horizontal=config["flip"], vertical=config["vertical_flip"])
