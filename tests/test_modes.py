"""modes.py: which flags each command reads. Every flag a mode does not read is refused with its reason (a silent
no-op otherwise); the table below is the specification, so adding a flag to a mode's list fails here."""
import pytest

from main import get_args_parser
from modes import MODE_FLAGS, mode_of, mode_problems
from utils import UserError

DEFAULTS = get_args_parser().parse_args([])


def problems(*argv):
    args = get_args_parser().parse_args(list(argv))
    return mode_problems(args, mode_of(args), DEFAULTS)


@pytest.mark.parametrize("argv, stray, why", [
    (["--top-k", "3"], "--top-k", "only --evaluate and --predict read it"),
    (["--output", "o"], "--output", "only --predict and --export read it"),
    (["--threshold-method", "f1"], "--threshold-method", "only --evaluate reads it"),
    (["--folds", "3"], "--folds", "only --evaluate reads it"),
    (["--checkpoint", "r"], "--checkpoint", "only --evaluate and --predict and --export read it"),
    (["--overwrite"], "--overwrite", "only --predict reads it"),
    (["--evaluate", "--epochs", "3"], "--epochs", "a run keeps the settings it was trained with"),
    (["--evaluate", "--output", "o"], "--output", "only --predict and --export read it"),
    (["--evaluate", "--checkpoint", "r", "--loss-function", "BCELoss"], "--loss-function", "--checkpoint already names"),
    (["--evaluate", "--checkpoint", "r", "--save-dir", "s"], "--save-dir", "--checkpoint already names the run"),
    (["--predict", "x", "--threshold-compare", "gt"], "--threshold-compare", "a run keeps the settings"),
    (["--predict", "x", "--skip-bad-images"], "--skip-bad-images", "a run keeps the settings"),
    (["--predict", "x", "--checkpoint", "r", "--data", "d"], "--data", "--checkpoint already names the run"),
    (["--predict", "x", "--checkpoint", "m.onnx", "--model", "ResNet18"], "--model", "an exported .onnx file"),
    (["--predict", "x", "--checkpoint", "m.onnx", "--device", "cpu"], "--device", "an exported .onnx file"),
    (["--predict", "x", "--checkpoint", "m.onnx", "--amp", "bf16"], "--amp", "an exported .onnx file"),
    (["--export", "onnx", "--device", "cpu"], "--device", "a run keeps the settings"),
    (["--export", "onnx", "--batch-size", "4"], "--batch-size", "a run keeps the settings"),
    (["--export", "onnx", "--top-k", "2"], "--top-k", "only --evaluate and --predict read it"),
    (["--export", "onnx", "--checkpoint", "r", "--loss-function", "BCELoss"], "--loss-function", "--checkpoint"),
    (["--compare", "a", "--save-dir", "s"], "--save-dir", "a run keeps the settings"),
    (["--compare", "a", "--data", "d"], "--data", "a run keeps the settings"),
    (["--resume", "r", "--epochs", "3"], "--epochs", "a resumed run continues exactly as configured"),
    (["--resume", "r", "--output", "o"], "--output", "only --predict and --export read it"),
])
def test_a_flag_the_mode_does_not_read_is_refused_with_its_reason(argv, stray, why):
    (problem,) = problems(*argv)
    assert problem.startswith(f"{stray} does not apply to ") and why in problem, problem


@pytest.mark.parametrize("argv", [
    ["--data", "d", "--epochs", "3", "--threshold-split", "val", "--cache", "none"],
    ["--evaluate", "--checkpoint", "r", "--model", "TinyResNet", "--data", "d", "--batch-size", "4", "--device", "cpu",
     "--threshold-split", "cv", "--folds", "3", "--top-k", "3", "--skip-bad-images", "--amp", "bf16"],
    ["--evaluate", "--loss-function", "BCELoss", "--save-dir", "s", "--data", "d", "--model", "TinyResNet"],
    ["--predict", "x", "--checkpoint", "r", "--model", "TinyResNet", "--batch-size", "4", "--num-workers", "0",
     "--output", "o", "--top-k", "2", "--min-score", "0.1", "--overwrite", "--amp", "bf16", "--channels-last", "on"],
    ["--predict", "x", "--checkpoint", "m.onnx", "--batch-size", "4", "--num-workers", "0", "--output", "o"],
    ["--export", "onnx", "--checkpoint", "r", "--data", "d", "--output", "o", "--model", "TinyResNet"],
    ["--resume", "r", "--num-workers", "0", "--device", "cpu", "--cache", "none", "--save-dir", "s"],
    ["--compare", "a", "b", "--no-progress"],
])
def test_the_flags_each_mode_reads_are_accepted(argv):
    assert problems(*argv) == []


def test_modes_are_one_per_command_and_training_is_the_default():
    assert mode_of(get_args_parser().parse_args([])) == "train"
    assert set(MODE_FLAGS) == {"train", "resume", "evaluate", "predict", "export", "compare"}
    with pytest.raises(UserError, match="--evaluate and --predict cannot be combined"):
        mode_of(get_args_parser().parse_args(["--evaluate", "--predict", "x"]))
