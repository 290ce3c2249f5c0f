"""Backbones of the study behind one registry, each with the study's head: Dropout(0.3) + Linear(features, C).

`create_model` is a thin wrapper over `timm.create_model`: the backbone is built without its classifier
(`num_classes=0`), its spatial feature map (`forward_features`, (B, F, h, w)) is pooled (avg or max) and fed
to the head. Arguments left as None mean "use the model's default", as in timm's factory.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from heads import build_head
from utils import UserError, first_sentence
from weights import PACKAGED_WEIGHTS, backbone_state_dict, packaged_state_dict

# CLI name -> timm model name. The four backbones of the study, plus small CPU-friendly ones for demos and tests.
MODELS = {
    "ResNet101": "resnet101",
    "ResNeXt50": "resnext50_32x4d",
    "Xception": "legacy_xception",
    "TResNet": "tresnet_m",
    "ResNet18": "resnet18",
    "TinyResNet": "test_resnet",
    # ImageNet weights from pip packages, no download (weights.PACKAGED_WEIGHTS); TensorFlow "same" padding, as trained.
    "EfficientNetLite0": "tf_efficientnet_lite0",
    "EfficientNetLite1": "tf_efficientnet_lite1",
    "EfficientNetLite2": "tf_efficientnet_lite2",
}
DEFAULT_MODEL = "TResNet"  # the study's best backbone; the CLI's default
# Image sizes must be multiples of the backbone's total stride (TResNet's space-to-depth stem needs it).
STRIDE = 32


class ModelError(UserError, ValueError):
    """A model choice or weight file the user can fix."""


class AnnotationModel(nn.Module):
    """backbone.forward_features -> global pooling -> Dropout(p) -> Linear(F, C) (the study's `head="fc"`).

    `head` names another head of heads.HEADS ("gcn", "decoder"), built with `head_options`; a head whose
    `spatial` attribute is True gets the spatial map (B, F, h, w) instead of the pooled features (B, F).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, global_pooling: str = "avg", dropout: float = 0.3,
                 head: str = "fc", head_options: dict | None = None):
        super().__init__()
        if global_pooling not in ("avg", "max"):
            raise ModelError(f"--global-pooling must be 'avg' or 'max', not '{global_pooling}'.")
        self.backbone = backbone
        self.global_pooling = global_pooling
        self.num_features = backbone.num_features
        self.head_name = head
        self.head = build_head(head, self.num_features, num_classes, dropout=dropout, **(head_options or {}))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        # (B, F, h, w) -> (B, F)
        return features.amax(dim=(2, 3)) if self.global_pooling == "max" else features.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(x)  # (B, F, h, w)
        if getattr(self.head, "spatial", False):
            return self.head(features)  # (B, C)
        return self.head(self.pool(features))  # (B, C)


def _offline_message(name: str, error: Exception) -> str:
    return (f"Could not fetch ImageNet weights for {name} ({type(error).__name__}: {first_sentence(error, 120)}); "
            f"pass --no-pretrained to train from scratch, or --weights PATH to load a local weight file.")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weight hub (HF_ENDPOINT or huggingface.co) accepts a TCP connection within `timeout` seconds.

    Asked before a download so that an offline machine gets one sentence at once instead of a minute of hub retries.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def default_weights_tag(name: str) -> str:
    """timm's default pretrained tag of registry model `name` (e.g. TResNet -> 'miil_in21k_ft_in1k')."""
    if name not in MODELS:
        raise ModelError(f"Unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}.")
    return timm.models.get_pretrained_cfg(MODELS[name]).tag


def create_model(name: str, num_classes: int, pretrained: bool = False, weights: str | Path | None = None,
                 global_pooling: str = "avg", dropout: float = 0.3, head: str = "fc", head_options: dict | None = None,
                 weights_tag: str | None = None, **kwargs) -> AnnotationModel:
    """Build a registry backbone with the study's head.

    pretrained: ImageNet weights, from a pip package where the model has one (weights.PACKAGED_WEIGHTS: no network),
    else from timm's hub (network needed). weights: a local weight file loaded into the backbone instead (timm,
    torchvision or `_blocks` layout, or a training checkpoint of this repository; see weights.py). weights_tag: which
    of timm's pretrained weights (e.g. 'tv_in1k'; None = timm's default); it also sets the backbone's pretrained
    configuration (its mean/std). head/head_options: the classifier head (heads.HEADS, default the study's fc;
    heads.head_options builds the options). Extra kwargs go to timm.
    """
    if name not in MODELS:
        raise ModelError(f"Unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}.")
    timm_name = MODELS[name] if weights_tag is None else f"{MODELS[name]}.{weights_tag}"
    if weights_tag is not None and timm_name not in timm.list_pretrained(f"{MODELS[name]}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{MODELS[name]}.*")]
        raise ModelError(f"--weights-tag {weights_tag} is not one of timm's weights for {name} ({MODELS[name]}); "
                         f"choose one of: {', '.join(tags)}.")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise ModelError(f"--weights file '{weights}' does not exist; give the path of a local {timm_name} weight file.")
    if pretrained and weights is None and name in PACKAGED_WEIGHTS:
        backbone = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
        state = packaged_state_dict(name, MODELS[name])  # timm names, with the ImageNet classifier
        classifier = backbone.pretrained_cfg["classifier"]
        backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith(classifier + ".")})
    else:
        backbone = _timm_backbone(timm_name, pretrained and weights is None, kwargs)
    if weights is not None:
        backbone.load_state_dict(backbone_state_dict(weights, backbone))
    return AnnotationModel(backbone, num_classes, global_pooling=global_pooling, dropout=dropout, head=head,
                           head_options=head_options)


def _timm_backbone(timm_name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """timm's backbone without classifier; with `pretrained`, its ImageNet weights from the hub (network needed)."""
    if pretrained and not os.environ.get("HF_HUB_OFFLINE") and not _hub_reachable():
        raise ModelError(_offline_message(timm_name, ConnectionError("no connection to the weight hub")))
    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError, ValueError, ImportError, KeyError) as e:
        if pretrained:
            raise ModelError(_offline_message(timm_name, e)) from None
        raise


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def normalisation(model: AnnotationModel) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone expects on [0, 1] RGB input (TResNet: mean 0, std 1)."""
    cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
