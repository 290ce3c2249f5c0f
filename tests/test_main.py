"""The entry point (main.py): argument validation before any work, the registries' choices, the study's flag names,
--plot, and its shape (parser, validation and dispatch; no training code)."""
import ast
import json
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
MAIN_FUNCTIONS = {"get_args_parser", "validate_args", "runtime_of", "main", "evaluate", "cli"}


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
    # Parser aside: the table of ranges, validation, a dispatch of a few lines per mode (the modes: modes.py).
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
    (["--resume", "r", "--epochs", "3", "--learning-rate", "1"], "--epochs, --learning-rate do not apply to --resume "
                                                                 "(a resumed run continues exactly as configured"),
    (["--export", "onnx", "--top-k", "3"], "--top-k does not apply to --export"),
    (["--compare", "a", "--data", "demo"], "--data does not apply to --compare"),
    (["--output", "tags", "--min-score", "0.5"], "--output does not apply to training (only --predict and --export "
                                                 "read it); --min-score does not apply to training (only --predict"),
    (["--threshold-grid", "0.2", "0.4"], "--threshold-grid does not apply to training"),
    (["--quantize", "int8"], "--quantize does not apply to training"),
    (["--predict", "x", "--max-map-drop", "2"], "--max-map-drop does not apply to --predict"),
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


# ---------------------------------------------------------------- the bad-input table: one sentence, exit 2, nothing left

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, a trained and evaluated run, its ONNX export, and damaged copies of each."""
    import shutil

    import torch

    from conftest import run_dirs, train_args, write_dataset

    root = tmp_path_factory.mktemp("bad")
    data = write_dataset(root / "tiny")
    cli(train_args(data, root / "runs", "--epochs", "1"))
    (run,) = run_dirs(root / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(root / "model.onnx")])
    damaged = {}
    for name in ("truncated", "config", "thresholds", "nan", "labels"):
        damaged[name] = root / f"run_{name}"
        shutil.copytree(run, damaged[name])
    (damaged["truncated"] / "best.pth").write_bytes((run / "best.pth").read_bytes()[:500])
    (damaged["config"] / "config.json").write_text('{"model": ')
    (damaged["thresholds"] / "thresholds.json").write_text("[1, 2")
    labels = json.loads((run / "thresholds.json").read_text())
    (damaged["labels"] / "thresholds.json").write_text(json.dumps({**labels, "labels": labels["labels"][::-1]}))
    ckpt = torch.load(run / "best.pth", weights_only=True)
    ckpt["model"] = {k: v.float() * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, damaged["nan"] / "best.pth")
    onnx = (root / "model.onnx").read_bytes()
    (root / "cut.onnx").write_bytes(onnx[: len(onnx) // 2])
    import numpy as np
    import onnx as onnx_lib
    from onnx import numpy_helper

    proto = onnx_lib.load(root / "model.onnx")  # a few hundred bytes overwritten: one weight tensor becomes NaN
    weight = next(t for t in proto.graph.initializer if t.data_type == onnx_lib.TensorProto.FLOAT and len(t.dims) == 4)
    weight.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(weight).shape, np.nan, np.float32), weight.name))
    onnx_lib.save(proto, root / "nan.onnx")
    for name, change in (("malformed", lambda d: "{"), ("nolabels", lambda d: json.dumps({"samples": d["samples"]})),
                         ("unknown", lambda d: json.dumps({**d, "samples": d["samples"] + [
                             {"image_name": "0.jpeg", "image_labels": ["unicorn"]}]}))):
        shutil.copytree(data, root / name)
        (root / name / "train.json").write_text(change(json.loads((data / "train.json").read_text())))
    shutil.copytree(data, root / "noimages")
    shutil.rmtree(root / "noimages" / "images")
    shutil.copytree(data, root / "corrupt")
    (root / "corrupt" / "images" / "3.jpeg").write_bytes(b"not a jpeg")
    (root / "empty").mkdir()
    (root / "a_file").write_text("x")
    (root / "finished.json").write_text("[]")
    return {"root": root, "data": data, "run": run, **damaged}


RUNNING = ["--num-workers", "0", "--no-progress"]
BAD_INPUTS = {  # name -> (flags, with {root} {data} {run} ... filled from the fixture; a phrase of the one-line error)
    "unknown model": (["--model", "ResNet50"], "invalid choice: 'ResNet50'"),
    "unknown loss": (["--loss-function", "L2"], "invalid choice: 'L2'"),
    "not a number": (["--epochs", "many"], "invalid int value: 'many'"),
    "no epochs": (["--epochs", "0", "--data", "{data}"], "--epochs must be at least 1 (got 0)"),
    "batch of none": (["--batch-size", "0", "--data", "{data}"], "--batch-size must be at least 1"),
    "odd image size": (["--image-size", "100", "--data", "{data}"], "--image-size must be a positive multiple of 32"),
    "NaN learning rate": (["--learning-rate", "nan", "--data", "{data}"], "--learning-rate must be a positive number"),
    "dropout of 1.5": (["--dropout", "1.5", "--data", "{data}"], "--dropout must be in [0, 1)"),
    "unknown normalisation": (["--normalise", "imagenet", "--data", "{data}"], "--normalise takes backbone"),
    "threshold grid above 1": (["--evaluate", "--checkpoint", "{run}", "--threshold-grid", "1.5", "2"],
                               "--threshold-grid must be probabilities strictly between 0 and 1"),
    "top-k of 0": (["--predict", "{data}/images", "--checkpoint", "{run}", "--top-k", "0"], "--top-k must be at least 1"),
    "min score of 2": (["--predict", "{data}/images", "--checkpoint", "{run}", "--min-score", "2"],
                       "--min-score must be a probability"),
    "negative int8 mAP bound": (["--export", "onnx", "--quantize", "int8", "--checkpoint", "{run}", "--max-map-drop",
                                 "-1"], "--max-map-drop must be a number of mAP points >= 0 (got -1.0)"),
    "no calibration images": (["--export", "onnx", "--quantize", "int8", "--checkpoint", "{run}",
                               "--calibration-images", "0"], "--calibration-images must be at least 1 (got 0)"),
    "two modes": (["--evaluate", "--export", "onnx"], "--evaluate and --export cannot be combined"),
    "training flag to evaluate": (["--evaluate", "--checkpoint", "{run}", "--epochs", "3"],
                                  "--epochs does not apply to --evaluate"),
    "resume with new epochs": (["--resume", "{run}", "--epochs", "9"], "--epochs does not apply to --resume"),
    "no CUDA here": (["--device", "cuda", "--data", "{data}", "--save-dir", "{root}/new"], "CUDA is not available"),
    "missing dataset": (["--data", "{root}/nowhere", "--save-dir", "{root}/new"], "Dataset root"),
    "malformed train.json": (["--data", "{root}/malformed", "--save-dir", "{root}/new"], "is not valid JSON"),
    "no vocabulary": (["--data", "{root}/nolabels", "--save-dir", "{root}/new"], 'has no "labels" list'),
    "label outside the vocabulary": (["--data", "{root}/unknown", "--save-dir", "{root}/new"], "unicorn"),
    "images missing": (["--data", "{root}/noimages", "--save-dir", "{root}/new"], "are not in"),
    "corrupt image": (["--data", "{root}/corrupt", "--save-dir", "{root}/new", "--cache", "none", "--val-size", "6",
                       "--model", "TinyResNet", "--no-pretrained", "--image-size", "32"],
                      "cannot be read (UnidentifiedImageError"),
    "save-dir under a file": (["--data", "{data}", "--save-dir", "{root}/a_file/runs"], "is a file where a folder"),
    "missing weights file": (["--weights", "{root}/none.pth", "--data", "{data}", "--model", "TinyResNet", "--val-size",
                              "6", "--save-dir", "{root}/new"],
                             "none.pth"),
    "not a run directory": (["--evaluate", "--checkpoint", "{root}/empty"], "is not a run directory"),
    "no run to evaluate": (["--evaluate", "--save-dir", "{root}/empty", "--model", "TinyResNet"],
                           "No trained run of TinyResNet"),
    "other model asked": (["--evaluate", "--checkpoint", "{run}", "--model", "ResNet18"], "was made with TinyResNet"),
    "malformed config.json": (["--evaluate", "--checkpoint", "{config}"], "config.json' is not valid JSON"),
    "truncated checkpoint": (["--evaluate", "--checkpoint", "{truncated}"], "may be truncated"),
    "NaN weights": (["--evaluate", "--checkpoint", "{nan}"], "non-finite scores"),
    "dataset of other labels": (["--evaluate", "--checkpoint", "{run}", "--data", "{root}/unknown"], "unicorn"),
    "nothing to resume": (["--resume", "{root}/empty"], "is not a run directory"),
    "predict a missing folder": (["--predict", "{root}/nowhere", "--checkpoint", "{run}"], "does not exist"),
    "predict an empty folder": (["--predict", "{root}/empty", "--checkpoint", "{run}"], "No images"),
    "damaged thresholds.json": (["--predict", "{data}/images", "--checkpoint", "{thresholds}"],
                                "is not a thresholds file"),
    "thresholds of other labels": (["--predict", "{data}/images", "--checkpoint", "{labels}"], "other labels"),
    "NaN model tagging": (["--predict", "{data}/images", "--checkpoint", "{nan}", "--output", "{root}/nan_tags"],
                          "non-finite scores"),
    "truncated ONNX": (["--predict", "{data}/images", "--checkpoint", "{root}/cut.onnx"], "cannot be opened"),
    "NaN ONNX": (["--predict", "{data}/images", "--checkpoint", "{root}/nan.onnx"], "nan.onnx' gives non-finite"),
    "finished output": (["--predict", "{data}/images", "--checkpoint", "{run}", "--output", "{root}/finished"],
                        "is a finished --predict output"),
    "output under a file": (["--predict", "{data}/images", "--checkpoint", "{run}", "--output", "{root}/a_file/x"],
                            "is a file where a folder"),
    "export under a file": (["--export", "onnx", "--checkpoint", "{run}", "--output", "{root}/a_file/m.onnx"],
                            "is a file where a folder"),
    "export on a missing dataset": (["--export", "onnx", "--checkpoint", "{run}", "--data", "{root}/nowhere",
                                     "--output", "{root}/m.onnx"], "Dataset root"),
    "compare an unevaluated run": (["--compare", "{root}/empty"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_sentence_exit_2_and_leaves_nothing(world, case, capsys):
    flags, phrase = BAD_INPUTS[case]
    argv = [f.format(**world) for f in flags]
    argv += [] if "--compare" in argv else ["--no-progress"] if "--export" in argv else RUNNING
    before = sorted(p.relative_to(world["root"]) for p in world["root"].rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert phrase in err, err
    assert sorted(p.relative_to(world["root"]) for p in world["root"].rglob("*")) == before


@pytest.mark.parametrize("mode, argv, patch, said", [
    ("evaluate", ["--evaluate", "--checkpoint", "{run}"], ("evaluation", "evaluate_run"), "nothing was written"),
    ("export", ["--export", "onnx", "--checkpoint", "{run}", "--output", "{root}/x.onnx"], ("export", "export_onnx"),
     "nothing was written"),
    ("demo", ["--data", "demo", "--save-dir", "{root}/new"], ("dataset", "resolve_data_root"),
     "before the first training step; no checkpoint was saved"),
])
def test_ctrl_c_in_every_command_is_one_line_and_exit_130(world, monkeypatch, capsys, mode, argv, patch, said):
    import importlib

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(patch[0]), patch[1], stop)
    if mode == "demo":
        import components

        monkeypatch.setattr(components, "resolve_data_root", stop)
    with pytest.raises(SystemExit) as exit_:
        cli([a.format(**world) for a in argv] + ["--no-progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and err.startswith("interrupted: ") and said in err and err.count("\n") == 1, err
    assert not (world["root"] / "x.onnx").exists() and not (world["root"] / "new").exists()


def test_evaluate_says_first_which_run_and_what_it_computes(world, capsys):
    cli(["--evaluate", "--checkpoint", str(world["run"]), *RUNNING])
    first, second = capsys.readouterr().out.splitlines()[:2]
    assert first == f"Evaluating {world['run']}: loading the run and its dataset."
    assert second.startswith("TinyResNet + AsymmetricLoss, best epoch 1: MCC thresholds fitted on the train+val split")
