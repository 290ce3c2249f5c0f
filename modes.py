"""The commands of main.py: which one a command line is, and which flags each reads.

main.py has one mode per command (training, --resume, --evaluate, --predict, --export, --compare). Each mode names
the flags it reads; a flag given to a mode that does not read it would be a silent no-op, so `mode_problems` refuses
it with the reason. `INTERRUPTED` says what a Ctrl-C leaves behind in each mode.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from config import RUNTIME_KEYS, TRAINING_DEFAULTS
from recipes import EVALUATION_KEYS
from utils import UserError

# The modes besides training, one per command; each names the flags it reads (the others must keep their defaults).
FIND_RUN = ("checkpoint", "model", "loss_function", "data", "save_dir")
RUNTIME = ("device", "batch_size", "num_workers", "amp", "channels_last", "skip_bad_images")
MODE_FLAGS = {
    "train": tuple(k for k in TRAINING_DEFAULTS if k != "hold_out_fold"),
    "resume": ("resume", *RUNTIME_KEYS),
    "evaluate": ("evaluate", *FIND_RUN, *RUNTIME, *EVALUATION_KEYS, "threshold_method", "threshold_grid",
                 "threshold_min_positives", "threshold_shrinkage", "folds", "top_k"),
    "predict": ("predict", *FIND_RUN, *(f for f in RUNTIME if f != "skip_bad_images"), "output", "top_k", "min_score",
                "overwrite"),  # --predict always skips unreadable images, and lists them
    "export": ("export", *FIND_RUN, "output", "quantize", "max_map_drop", "calibration_images", "int8_thresholds"),
    "compare": ("compare",),
}
# What a Ctrl-C outside the steps that save their own progress leaves behind (training saves last.pth at its next
# batch, --predict keeps its rows: they say so themselves).
INTERRUPTED = {
    "train": "before the first training step; no checkpoint was saved (a finished decoded-image cache is kept); run "
             "the same command again",
    "resume": "before the first training step; the run's last.pth is as it was; run the same command again",
    "evaluate": "nothing was written (finished cross-fitting folds are kept and reused); run the same command again",
    "predict": "before the first image was tagged; nothing was written",
    "export": "nothing was written",
    "compare": "nothing was written",
}


def mode_of(args: argparse.Namespace) -> str:
    """The command: train, or the one mode flag given (--resume, --evaluate, --predict, --export, --compare)."""
    given = [mode for mode in MODE_FLAGS if mode != "train" and getattr(args, mode)]
    if len(given) > 1:
        raise UserError(f"--{' and --'.join(given)} cannot be combined; give one of --resume, --evaluate, --predict, "
                        f"--export, --compare per command.")
    return given[0] if given else "train"


def _why_not(flag: str, mode: str, by_checkpoint: bool, onnx: bool) -> str:
    """Why `flag` does not apply to `mode`, in the words the refusal uses."""
    if onnx and flag in MODE_FLAGS["predict"]:
        return "an exported .onnx file carries its model and thresholds and runs on the CPU"
    if by_checkpoint and flag in FIND_RUN:
        return "--checkpoint already names the run"
    if mode == "resume" and flag in TRAINING_DEFAULTS:
        return ("a resumed run continues exactly as configured, its learning-rate schedule laid out for its own "
                "--epochs included; train a new run to change them")
    if mode != "train" and flag in TRAINING_DEFAULTS:
        return "a run keeps the settings it was trained with; train a new run to change them"
    readers = [f"--{m}" if m != "train" else "training" for m in MODE_FLAGS if flag in MODE_FLAGS[m]]
    return f"only {' and '.join(readers)} read{'s' if len(readers) == 1 else ''} it" if readers else "nothing reads it"


def mode_problems(args: argparse.Namespace, mode: str, defaults: argparse.Namespace) -> list[str]:
    """One sentence per reason for the flags given (differing from `defaults`, the parser's) that `mode` does not
    read, each a silent no-op otherwise: with --checkpoint the flags that find a run, with an .onnx file the run's
    runtime flags, and every other mode's."""
    by_checkpoint = bool(args.checkpoint) and mode in ("evaluate", "predict", "export")
    onnx = mode == "predict" and bool(args.checkpoint) and Path(args.checkpoint).suffix == ".onnx"
    readable = set(MODE_FLAGS[mode]) - ({"loss_function", "save_dir"} if by_checkpoint else set())
    readable -= {"data"} if mode == "predict" and by_checkpoint else set()
    readable -= {"model", "device", "amp", "channels_last"} if onnx else set()
    stray = [k for k, v in vars(args).items() if k not in readable and k != "progress" and v != getattr(defaults, k, v)]
    reasons: dict[str, list[str]] = {}
    for flag in stray:
        reasons.setdefault(_why_not(flag, mode, by_checkpoint, onnx), []).append("--" + flag.replace("_", "-"))
    where = "training" if mode == "train" else f"--{mode}"
    return [f"{', '.join(names)} {'does' if len(names) == 1 else 'do'} not apply to {where} ({why})"
            for why, names in reasons.items()]
