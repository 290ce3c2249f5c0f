"""Recipes: the values of the flags where this repository's defaults and the study's code differ.

`--recipe default` is this repository's honest recipe; `--recipe study` reproduces the study's code
(parham1998/CNN_Image_Annotaion). Every flag named here defaults to None, meaning "the recipe's value"; a flag given
on the command line wins over the recipe, so pieces can be mixed. `resolve` fills the None values, in the order of
RECIPE_KEYS (a value may depend on one resolved before it), and is idempotent; the resolved configuration is what
config.json holds. Older configurations lack some keys: config.complete fills them with None and "default",
and `resolve` then gives them the default recipe, which is what those runs did.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from utils import UserError

# Losses with focusing weights and a log of probabilities (the others take neither option).
FOCUSING_LOSSES = ("FocalLoss", "AsymmetricLoss")
# The timm pretrained tags the study's code loaded: torchvision's V1 weights through torchvision for the ResNets,
# timm's `xception` (today `legacy_xception`, one tag) and the 2022 `tresnet_m` (ImageNet-1k).
STUDY_WEIGHTS = {"ResNet101": "tv_in1k", "ResNeXt50": "tv_in1k", "Xception": "tf_in1k", "TResNet": "miil_in1k"}
# The study trains for OneCycleLR laid over --epochs 80 and stops after epoch 60 (engine.py: `if epoch == 59`).
STUDY_SCHEDULE_RATIO = 80 / 60


# --normalise words (besides six numbers): see trainer.input_normalisation.
NORMALISE_SOURCES = ("backbone", "corel5k", "dataset")


def valid_normalise(values: list[str]) -> bool:
    """Whether --normalise VALUES is one source word, or six numbers (three means, three positive stds)."""
    if len(values) == 1:
        return values[0] in NORMALISE_SOURCES
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return False
    return len(numbers) == 6 and all(v > 0 for v in numbers[3:])


def _focusing(value: Any) -> Callable[[dict], Any]:
    """`value` for the focal and ASL losses, None (not applicable) for the others."""
    return lambda c: value if c["loss_function"] in FOCUSING_LOSSES else None


def _timm_default_tag(c: dict) -> str | None:
    from models import default_weights_tag  # models imports timm: only when a tag is needed

    return default_weights_tag(c["model"]) if c["model"] else None


def _is_corel(data: str | None) -> bool:
    return data is not None and Path(str(data).rstrip("/")).name == "Corel-5k"


RECIPES: dict[str, dict[str, Any]] = {
    "default": {
        "seed": 0,
        "select_on_test": False,
        "epochs": 40,
        "schedule_epochs": lambda c: float(c["epochs"]),
        "loss_reduction": "sum",
        "detach_focusing": _focusing(True),
        "loss_eps": _focusing(0.0),
        "flip": True,
        "vertical_flip": False,
        "normalise": ["backbone"],
        "weights_tag": _timm_default_tag,
        "drop_last": True,
        "shuffle_once": False,
        # train+val: measured best for rare labels (README "Thresholds for rare labels", bench/threshold_options.py)
        "threshold_split": lambda c: "train" if c["select_on_test"] else "train+val",
        "threshold_transform": "eval",
        "threshold_fallback": "default",
        "threshold_compare": "ge",
        "metric_epsilon": 0.0,
    },
    "study": {
        "seed": 1,
        "select_on_test": True,
        "epochs": 60,
        "schedule_epochs": lambda c: c["epochs"] * STUDY_SCHEDULE_RATIO,
        "loss_reduction": lambda c: "mean" if c["loss_function"] == "LSEPLoss" else "mean-all",
        "detach_focusing": _focusing(False),
        "loss_eps": _focusing(1e-8),
        "flip": True,
        "vertical_flip": True,
        "normalise": lambda c: ["corel5k"] if _is_corel(c["data"]) else ["dataset"],
        "weights_tag": lambda c: STUDY_WEIGHTS.get(c["model"]) or _timm_default_tag(c),
        "drop_last": False,
        "shuffle_once": True,
        "threshold_split": "train",
        "threshold_transform": "train",
        "threshold_fallback": "first",
        "threshold_compare": "gt",
        "metric_epsilon": 1e-7,
    },
}
RECIPE_KEYS = tuple(RECIPES["default"])
# Keys that --evaluate may override for an existing run (the others are fixed by training).
EVALUATION_KEYS = ("threshold_split", "threshold_transform", "threshold_fallback", "threshold_compare",
                   "metric_epsilon")


def resolve(config: Mapping[str, Any], keys: tuple[str, ...] = RECIPE_KEYS) -> dict:
    """`config` with every None among `keys` set to its recipe's value (config["recipe"]); explicit values kept."""
    name = config["recipe"]
    if name not in RECIPES:
        raise UserError(f"Unknown recipe '{name}'; choose one of: {', '.join(sorted(RECIPES))}.")
    out = dict(config)
    for key in keys:
        if out[key] is None:
            value = RECIPES[name][key]
            out[key] = value(out) if callable(value) else value
    if out["epochs"] is not None and out["schedule_epochs"] is not None and out["schedule_epochs"] < out["epochs"]:
        raise UserError(f"--schedule-epochs {out['schedule_epochs']:g} is shorter than --epochs {out['epochs']}: the "
                        f"learning-rate schedule must cover every epoch trained (the study: 80 over 60 epochs).")
    return out


def describe(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(row, value) of every choice where the recipes differ, in words, for the printed header and results.md."""
    reduction = {"sum": "sum over images and labels", "mean": "mean over images of the per-image sum",
                 "mean-all": "mean over all images x labels"}[config["loss_reduction"]]
    loss = config["loss_function"]
    focusing = ("not applicable" if config["detach_focusing"] is None else
                "detached (constants for the gradient)" if config["detach_focusing"] else "not detached")
    eps = ("not applicable" if config["loss_eps"] is None else
           "exact log-sigmoid" if config["loss_eps"] == 0 else f"log(max(p, {config['loss_eps']:g}))")
    flips = " and ".join(n for n, on in (("horizontal", config["flip"]), ("vertical", config["vertical_flip"])) if on)
    weights_tag = (f"none (--weights {config['weights']})" if config.get("weights") else
                   str(config["weights_tag"]) if config.get("pretrained", True) else "none (--no-pretrained)")
    return [("recipe", config["recipe"]),
            ("loss reduction", f"{reduction} ({loss}, --loss-reduction {config['loss_reduction']})"),
            ("focusing weights", focusing), ("log of probabilities", eps),
            ("flips", flips or "none"), ("normalisation", " ".join(map(str, config["normalise"]))),
            ("schedule", f"OneCycleLR over {config['schedule_epochs']:g} epochs, trained {config['epochs']}"),
            ("weights tag", weights_tag),
            ("data order", f"seed {config['seed']}, {'shuffled once (scikit-learn, random_state 0), ' if config['shuffle_once'] else ''}"
                           f"last partial batch {'dropped' if config['drop_last'] else 'kept'}"),
            ("thresholds", f"fitted on {config['threshold_split']} ({config['threshold_transform']} transform), "
                           f"fallback {config['threshold_fallback']}, predict p {'>' if config['threshold_compare'] == 'gt' else '>='} t, "
                           f"metric epsilon {config['metric_epsilon']:g}"),
            ("model selection", "test set (every epoch)" if config["select_on_test"] else "validation split")]


def recipe_problems(config: Mapping[str, Any]) -> list[str]:
    """One sentence per problem with the recipe-controlled flags of `config`; a None (unset) flag is the recipe's
    and is not checked."""
    args = SimpleNamespace(**config)
    problems = []
    if args.epochs is not None and args.epochs < 1:
        problems.append(f"--epochs must be at least 1 (got {args.epochs})")
    if args.schedule_epochs is not None and not args.schedule_epochs > 0:
        problems.append(f"--schedule-epochs must be a positive number of epochs (got {args.schedule_epochs})")
    if args.loss_eps is not None and not 0 <= args.loss_eps < 0.5:
        problems.append(f"--loss-eps must be in [0, 0.5) (got {args.loss_eps}; the study uses 1e-8)")
    if args.metric_epsilon is not None and not 0 <= args.metric_epsilon < 0.01:
        problems.append(f"--metric-epsilon must be in [0, 0.01) (got {args.metric_epsilon}; the study uses 1e-7)")
    if args.loss_function not in FOCUSING_LOSSES:
        given = [f for f, v in (("--loss-eps", args.loss_eps), ("--detach-focusing", args.detach_focusing)) if v is not None]
        if given:
            problems.append(f"{' and '.join(given)} apply to {' and '.join(FOCUSING_LOSSES)}, not {args.loss_function}")
    if args.normalise is not None and not valid_normalise(args.normalise):
        problems.append(f"--normalise takes {', '.join(NORMALISE_SOURCES)} or six numbers MEAN_R MEAN_G MEAN_B "
                        f"STD_R STD_G STD_B with positive stds (got {' '.join(args.normalise)})")
    if args.val_size < 1 and args.select_on_test is False:
        problems.append(f"--val-size must be at least 1 (got {args.val_size}); or use --select-on-test")
    return problems
