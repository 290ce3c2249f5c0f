"""The training configuration the benchmarks use: main.py's defaults, for a backbone trained from scratch.

Spelled out here rather than read from main.py's parser, so that bench/ depends on the training code (trainer.py)
alone; tests/test_trainer.py checks that every value is main.py's default (apart from OVERRIDDEN) and that
trainer.build_training accepts the configuration.
"""
from __future__ import annotations

# Keys trainer.build_training reads, with main.py's default values.
TRAINING = {
    "seed": 0, "model": "TResNet", "pretrained": True, "weights": None, "global_pooling": "avg", "dropout": 0.3, "head": "fc",
    "gcn_tau": 0.4, "gcn_p": 0.25, "label_embeddings": "learned", "loss_function": "AsymmetricLoss",
    "gamma_pos": None, "gamma_neg": None, "margin": None, "loss_reduction": "sum", "optimizer": "adam",
    "learning_rate": 1e-4, "weight_decay": 0.0, "epochs": 40, "schedule_epochs": 40.0, "batch_size": 32, "ema": False,
    "ema_decay": 0.9997, "amp": "auto", "channels_last": "auto", "detach_focusing": True, "loss_eps": 0.0,
    "weights_tag": None,
}
# What the benchmarks change: no download, their own schedule, and timm's default weights tag given as None.
OVERRIDDEN = ("model", "pretrained", "epochs", "schedule_epochs", "batch_size", "weights_tag")


def training_config(model: str, **overrides) -> dict:
    """main.py's default configuration for `model` from scratch, with `overrides` (e.g. epochs, batch_size); the
    learning-rate schedule spans the epochs trained, as by default."""
    config = {**TRAINING, "model": model, "pretrained": False, "epochs": 1, **overrides}
    return {**config, "schedule_epochs": float(config["epochs"])}
