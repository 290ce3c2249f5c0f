"""The entry point (main.py): argument validation before any work, the registries' choices, the study's flag names,
--plot, and its shape (parser, validation and dispatch; no training code)."""
import ast
from pathlib import Path

import pytest

import main as main_module
from main import cli


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--image-size", "100"], "--image-size must be a positive multiple of 32"),
    (["--learning-rate", "-1"], "--learning-rate must be a positive number"),
    (["--weights", "x.pth", "--no-pretrained"], "contradict"),
])
def test_nonsense_arguments_are_rejected_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        cli(["--data", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "runs"), *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_unknown_choice_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli(["--model", "ResNet50"])
    assert "TResNet" in capsys.readouterr().err


def test_data_root_dir_alias_is_accepted(tiny_dataset, tmp_path):
    args = main_module.get_args_parser().parse_args(["--data-root-dir", str(tiny_dataset)])
    assert args.data == str(tiny_dataset)


def test_plot_passes_through_to_analysis(tmp_path):
    cli(["--plot", "gradients", "--out", str(tmp_path)])
    assert (tmp_path / "gradients.png").stat().st_size > 0 and (tmp_path / "gradients.csv").stat().st_size > 0


@pytest.mark.parametrize("flags, message", [
    (["--head", "fc", "--label-embeddings", "minilm"], "is for --head gcn"),
    (["--gcn-tau", "0"], "--gcn-tau must be in (0, 1]"),
    (["--gcn-p", "2"], "--gcn-p must be in [0, 1]"),
    (["--cutout", "1.5"], "--cutout must be a fraction"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
])
def test_nonsense_head_and_recipe_flags_are_rejected(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        cli(["--data", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "runs"), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- the entry point's shape

REPO = Path(__file__).resolve().parents[1]
MAIN_FUNCTIONS = {"get_args_parser", "validate_args", "config_defaults", "main", "cli"}


def _functions(path):
    """(name, number of lines) of every function in a module, nested ones included."""
    tree = ast.parse(path.read_text())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_main_py_is_parser_validation_and_dispatch_only():
    source = (REPO / "main.py").read_text()
    tree = ast.parse(source)
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert defined == MAIN_FUNCTIONS
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    # No training, evaluation or report machinery is imported into main.py: it calls train / evaluate_run / ... only.
    assert not imported & {"train_one_epoch", "evaluate", "predict", "build_training", "create_model", "create_loss",
                           "compute_metrics", "fit_thresholds"}
    parser_lines = dict(_functions(REPO / "main.py"))["get_args_parser"]
    assert len(source.splitlines()) - parser_lines <= 150


@pytest.mark.parametrize("module", ["main.py", "trainer.py", "report.py"])
def test_no_function_is_longer_than_a_screen(module):
    long = [(name, n) for name, n in _functions(REPO / module) if n > 60 and name != "get_args_parser"]
    assert not long, f"{module}: {long}"


def test_main_dispatches_each_mode_without_touching_args(monkeypatch):
    calls = []
    monkeypatch.setattr(main_module, "train", lambda config: calls.append(("train", config["model"], config["data"])))
    monkeypatch.setattr(main_module, "evaluate_run", lambda args, defaults: calls.append(("evaluate", defaults["head"])))
    monkeypatch.setattr(main_module, "predict_paths", lambda args, defaults: calls.append(("predict", args.predict)))
    monkeypatch.setattr(main_module, "compare_runs", lambda runs: calls.append(("compare", runs)) or "")
    parser = main_module.get_args_parser()
    for argv in ([], ["--evaluate"], ["--predict", "x.jpg"], ["--compare", "a", "b"]):
        args = parser.parse_args(argv)
        before = vars(args).copy()
        main_module.main(args)
        assert vars(args) == before
    assert calls == [("train", "TResNet", "Corel-5k"), ("evaluate", "fc"), ("predict", "x.jpg"),
                     ("compare", ["a", "b"])]
