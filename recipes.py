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
# The timm pretrained tags the study's code loaded (its models.py): torchvision's V1 weights for the ResNets
# (`torchvision.models.resnet101(pretrained=True)`, lines 21 and 38: timm's tv_in1k), timm's `xception` (line 55; today
# legacy_xception.tf_in1k) and timm's `tresnet_m` (line 72). In the timm releases of the study's time (0.5.4 of January
# 2022 to 0.6.12 of November 2022, timm/models/tresnet.py line 31) `tresnet_m` downloaded tresnet_m_1k_miil_83_1.pth:
# ImageNet-21K-P pretraining fine-tuned on ImageNet-1k, 83.1 % top-1, which timm >= 0.8 names
# tresnet_m.miil_in21k_ft_in1k (miil_in1k is the original 80.8 % model, which the study did not load).
STUDY_WEIGHTS = {"ResNet101": "tv_in1k", "ResNeXt50": "tv_in1k", "Xception": "tf_in1k",
                 "TResNet": "miil_in21k_ft_in1k"}
# The study trains for OneCycleLR laid over --epochs 80 (main.py line 25) and stops after epoch 60 (engine.py line 204:
# `if epoch == 59: break`).
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
        "amp": "auto",
        "channels_last": "auto",
        "cudnn_deterministic": False,  # torch's own defaults
        "cudnn_benchmark": False,
        "selection_start": -1.0,
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
    "study": {  # each value: the line of the study's code it comes from
        "seed": 1,  # main.py line 21
        "amp": "none",  # fp32: the study never autocasts (engine.py trains and evaluates the plain model)
        "channels_last": "off",
        "cudnn_deterministic": True,  # main.py line 47
        "cudnn_benchmark": False,  # main.py line 48
        "selection_start": 0.0,  # engine.py line 54 (best_f1_score = 0) and line 177 (strictly greater)
        "select_on_test": True,  # dataset.py lines 117-127: test.json is the "validation_loader"; engine.py line 177
        "epochs": 60,  # engine.py line 204
        "schedule_epochs": lambda c: c["epochs"] * STUDY_SCHEDULE_RATIO,  # main.py line 25, engine.py line 44-49
        # main.py line 64: nn.MultiLabelSoftMarginLoss (mean over B x C); loss_functions.py line 33 `-loss.mean()`; LSEP 52
        "loss_reduction": lambda c: "mean" if c["loss_function"] == "LSEPLoss" else "mean-all",
        "detach_focusing": _focusing(False),  # loss_functions.py lines 24-31: the focusing weights are not detached
        "loss_eps": _focusing(1e-8),  # loss_functions.py line 14
        "flip": True,  # dataset.py line 77
        "vertical_flip": True,  # dataset.py line 76
        "normalise": lambda c: ["corel5k"] if _is_corel(c["data"]) else ["dataset"],  # dataset.py lines 61-67
        "weights_tag": lambda c: STUDY_WEIGHTS.get(c["model"]) or _timm_default_tag(c),  # models.py, see above
        "drop_last": False,  # dataset.py line 115 (DataLoader's default drop_last=False)
        "shuffle_once": True,  # dataset.py line 31
        "threshold_split": "train",  # main.py line 90: engine.matthew_corrcoef(train_loader)
        "threshold_transform": "train",  # ... the training loader, its random flips on
        "threshold_fallback": "first",  # engine.py line 245: np.argmax of all-zero MCCs is the grid's first point
        "threshold_compare": "gt",  # evaluation_metrics.py lines 40 and 43: torch.gt
        "metric_epsilon": 1e-7,  # evaluation_metrics.py line 9
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


AMP_WORDS = {"auto": "bf16 autocast on CUDA (fp16 without bf16), fp32 on CPU", "none": "fp32", "bf16": "bf16 autocast",
             "fp16": "fp16 autocast"}
CHANNELS_LAST_WORDS = {"auto": "channels_last on CUDA, NCHW on CPU", "on": "channels_last", "off": "NCHW"}


def _weights_words(config: Mapping[str, Any]) -> str:
    """The ImageNet weights in timm's full name (tresnet_m.miil_in21k_ft_in1k), and whether they are loaded."""
    if config.get("weights"):
        return f"the file --weights {config['weights']}"
    from models import MODELS  # models imports timm: only here, for the backbone's timm name

    name = f"{MODELS.get(config['model'], config['model'])}.{config['weights_tag']}"
    return name if config.get("pretrained", True) else f"{name}, not loaded (--no-pretrained)"


def describe(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(row, value) of every choice where the recipes differ, in words, for the printed header and results.md."""
    reduction = {"sum": "sum over images and labels", "mean": "mean over images of the per-image sum",
                 "mean-all": "mean over all images x labels"}[config["loss_reduction"]]
    focusing = ("not applicable" if config["detach_focusing"] is None else
                "detached (constants for the gradient)" if config["detach_focusing"] else "not detached")
    eps = ("not applicable" if config["loss_eps"] is None else
           "exact log-sigmoid" if config["loss_eps"] == 0 else f"log(max(p, {config['loss_eps']:g}))")
    flips = " and ".join(n for n, on in (("horizontal", config["flip"]), ("vertical", config["vertical_flip"])) if on)
    selection = "test set (every epoch)" if config["select_on_test"] else "validation split"
    return [("recipe", config["recipe"]),
            ("loss reduction", f"{reduction} ({config['loss_function']}, --loss-reduction {config['loss_reduction']})"),
            ("focusing weights", focusing), ("log of probabilities", eps),
            ("flips", flips or "none"), ("normalisation", " ".join(map(str, config["normalise"]))),
            ("schedule", f"OneCycleLR over {config['schedule_epochs']:g} epochs, trained {config['epochs']}"),
            ("weights", _weights_words(config)),
            ("precision", f"{AMP_WORDS[config['amp']]}, {CHANNELS_LAST_WORDS[config['channels_last']]} (--amp "
                          f"{config['amp']} --channels-last {config['channels_last']})"),
            ("cuDNN", f"deterministic {'on' if config['cudnn_deterministic'] else 'off'}, benchmark "
                      f"{'on' if config['cudnn_benchmark'] else 'off'}"),
            ("data order", f"seed {config['seed']}, {'shuffled once (scikit-learn, random_state 0), ' if config['shuffle_once'] else ''}"
                           f"last partial batch {'dropped' if config['drop_last'] else 'kept'}"),
            ("thresholds", f"fitted on {config['threshold_split']} ({config['threshold_transform']} transform), "
                           f"fallback {config['threshold_fallback']}, predict p {'>' if config['threshold_compare'] == 'gt' else '>='} t, "
                           f"metric epsilon {config['metric_epsilon']:g}"),
            ("model selection", f"{selection}; an epoch becomes best.pth when its per-class F1 beats "
                                f"{config['selection_start']:g} and every earlier epoch's")]


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
    if args.selection_start is not None and not -1 <= args.selection_start < 1:
        problems.append(f"--selection-start must be in [-1, 1) (got {args.selection_start}; the study: 0)")
    if args.val_size < 1 and args.select_on_test is False:
        problems.append(f"--val-size must be at least 1 (got {args.val_size}); or use --select-on-test")
    return problems
