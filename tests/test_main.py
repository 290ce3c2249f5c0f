"""The entry point (main.py): argument validation before any work, the registries' choices, the study's flag names,
--plot, and its shape (parser, validation and dispatch; no training code)."""
import ast
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
MAIN_FUNCTIONS = {"get_args_parser", "mode_of", "mode_problems", "validate_args", "runtime_of", "main", "evaluate",
                  "cli"}


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
    # Parser aside: the mode and range tables, validation, and a dispatch of a few lines per mode.
    assert len(source.splitlines()) - parser_lines <= 200


@pytest.mark.parametrize("module", ["main.py", "trainer.py", "report.py", "evaluation.py", "runs.py", "components.py",
                                    "crossfit.py", "predict.py", "export.py", "config.py"])
def test_no_function_is_longer_than_a_screen(module):
    long = [(name, n) for name, n in _functions(REPO / module) if n > 60 and name != "get_args_parser"]
    assert not long, f"{module}: {long}"


def test_main_dispatches_each_mode_without_touching_args(monkeypatch):
    import evaluation
    import export
    import predict
    import report
    import trainer

    calls = []
    monkeypatch.setattr(trainer, "train", lambda config: calls.append(("train", config["model"], config["data"])))
    monkeypatch.setattr(main_module, "run_directory", lambda checkpoint, *rest: Path(checkpoint or "newest"))
    monkeypatch.setattr(evaluation, "evaluate_run", lambda run_dir, options, runtime, *rest: calls.append(
        ("evaluate", str(run_dir), options.threshold_method, runtime.batch_size)) or SimpleNamespace(results={}))
    monkeypatch.setattr(report, "write_report", lambda evaluation: None)
    monkeypatch.setattr(report, "summary", lambda results, run_dir: "")
    monkeypatch.setattr(predict, "predict_paths", lambda path, source, *rest: calls.append(("predict", str(path),
                                                                                                str(source))))
    monkeypatch.setattr(export, "export_run", lambda run_dir, *rest: calls.append(("export", str(run_dir))))
    monkeypatch.setattr(report, "compare_runs", lambda runs: calls.append(("compare", runs)) or "")
    parser = main_module.get_args_parser()
    for argv in ([], ["--evaluate", "--batch-size", "4"], ["--predict", "x.jpg"], ["--predict", "x.jpg", "--checkpoint",
                 "m.onnx"], ["--export", "onnx", "--checkpoint", "r"], ["--compare", "a", "b"]):
        args = parser.parse_args(argv)
        before = vars(args).copy()
        main_module.main(args)
        assert vars(args) == before
    assert calls == [("train", "TResNet", "Corel-5k"), ("evaluate", "newest", "mcc", 4), ("predict", "x.jpg", "newest"),
                     ("predict", "x.jpg", "m.onnx"), ("export", "r"), ("compare", ["a", "b"])]


@pytest.mark.parametrize("flags", [["--evaluate", "--predict", "x"], ["--resume", "r", "--export", "onnx"],
                                   ["--compare", "a", "--evaluate"]])
def test_modes_cannot_be_combined(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        cli(flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "cannot be combined" in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--evaluate", "--epochs", "3"], "--epochs does not apply to --evaluate"),
    (["--predict", "x", "--threshold-split", "val"], "--threshold-split does not apply to --predict"),
    (["--resume", "r", "--epochs", "3", "--learning-rate", "1"], "--epochs, --learning-rate do not apply to --resume"),
    (["--export", "onnx", "--top-k", "3"], "--top-k does not apply to --export"),
    (["--compare", "a", "--data", "demo"], "--data does not apply to --compare"),
    (["--output", "tags", "--min-score", "0.5"], "--output, --min-score do not apply to training"),
    (["--threshold-grid", "0.2", "0.4"], "--threshold-grid does not apply to training"),
])
def test_flags_the_mode_does_not_read_are_refused_not_ignored(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli([*flags, "--save-dir", str(tmp_path / "runs")] if "--compare" not in flags else flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- the import graph

def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere (inside functions too); relative imports name the package."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0] if node.module and not node.level else "DataAugmentation")
    return names & modules


def _import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in REPO.glob("*.py")} | {"DataAugmentation"}
    graph = {p.stem: _imports(p, modules) - {p.stem} for p in REPO.glob("*.py")}
    graph["DataAugmentation"] = set().union(*(_imports(p, modules) for p in (REPO / "DataAugmentation").glob("*.py")))
    graph["DataAugmentation"].discard("DataAugmentation")
    return graph


def test_no_import_circle_among_the_projects_modules():
    graph = _import_graph()
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles
    assert "crossfit" in graph["evaluation"] and "evaluation" not in graph["crossfit"]  # the graph is read


@pytest.mark.parametrize("module", ["predict", "export", "crossfit", "evaluation", "runs", "components"])
def test_inference_modules_import_neither_the_training_code_nor_the_report_writer(module):
    assert not _import_graph()[module] & {"trainer", "report", "main"}


def test_bench_scripts_do_not_shadow_the_projects_modules():
    project = {p.stem for p in REPO.glob("*.py")}
    assert not {p.stem for p in (REPO / "bench").glob("*.py")} & project
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as Spyder and many IDEs set it
    for script in sorted((REPO / "bench").glob("*.py")):
        if script.stem in ("bench_config", "reference", "longtail"):
            continue  # imported by the others, not run
        done = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (script.name, done.stderr[-1500:])
