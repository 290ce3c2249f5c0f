"""runs.py: one home for a trained run. Training's files never change afterwards (--evaluate writes thresholds.json,
which --predict and --export apply and name), the newest run is the one whose training started last, a run finds its
own dataset from any working directory (and after moving together with it), and config.json holds the run only."""
import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch

import runs
from checkpoint import CheckpointError
from config import RECORD_KEYS, TRAINING_DEFAULTS, Runtime
from conftest import evaluate, run_dirs, train_args, write_dataset
from main import cli, get_args_parser, main

pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


def test_load_config_errors_are_one_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        runs.load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="line 1, column"):
        runs.load_config(tmp_path)


def test_make_run_dir_refuses_to_overwrite_a_run(tmp_path):
    run = runs.make_run_dir(tmp_path, "TinyResNet", "BCELoss", "/data/tiny/", "x")
    assert run.name == "TinyResNet_BCELoss_tiny_x"
    (run / "log.csv").write_text("epoch\n")
    with pytest.raises(CheckpointError, match="already exists"):
        runs.make_run_dir(tmp_path, "TinyResNet", "BCELoss", "/data/tiny/", "x")


def test_the_latest_run_is_the_one_whose_training_started_last_whatever_the_file_times(tmp_path):
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def run(name, minutes=None, best_mtime=0.0, best=True, config_mtime=None):
        folder = tmp_path / name
        folder.mkdir()
        model, loss, data = name.split("_")[:3]
        config = {"model": model, "loss_function": loss, "data": f"/somewhere/{data}"}
        if minutes is not None:
            config["started"] = (start + timedelta(minutes=minutes)).isoformat()
        (folder / "config.json").write_text(json.dumps(config))
        if config_mtime is not None:
            os.utime(folder / "config.json", (config_mtime, config_mtime))
        if best:
            (folder / "best.pth").write_bytes(b"x")
            os.utime(folder / "best.pth", (best_mtime, best_mtime))  # evaluation by older versions touched it
        return folder

    run("TinyResNet_BCELoss_tiny_a", minutes=1, best_mtime=9e9)  # re-evaluated last: its best.pth is the newest file
    newest = run("TinyResNet_BCELoss_tiny_b", minutes=3, best_mtime=1000)
    run("TinyResNet_BCELoss_tiny_c", minutes=2, best_mtime=5000)
    run("TinyResNet_BCELoss_tiny_d", minutes=9, best=False)  # no best.pth yet: not a candidate
    run("TinyResNet_BCELoss_tiny_e", config_mtime=start.timestamp() + 120)  # older version: config.json's time
    run("ResNet18_BCELoss_tiny_f", minutes=30)  # another model
    run("TinyResNet_BCELoss_other_g", minutes=30)  # another dataset
    assert runs.find_latest_run(tmp_path, "TinyResNet", "BCELoss", "tiny") == newest
    run("TinyResNet_BCELoss_tiny_h", config_mtime=start.timestamp() + 240)
    assert runs.find_latest_run(tmp_path, "TinyResNet", "BCELoss", "tiny").name == "TinyResNet_BCELoss_tiny_h"
    with pytest.raises(CheckpointError, match="No trained run of TinyResNet \\+ LSEPLoss"):
        runs.find_latest_run(tmp_path, "TinyResNet", "LSEPLoss", "tiny")


def test_skip_bad_images_is_on_when_the_command_or_the_training_asked():
    for given, trained, expected in ((False, False, False), (True, False, True), (False, True, True)):
        assert runs.skip_bad_images(Runtime(skip_bad_images=given), {"skip_bad_images": trained}) is expected


# ---------------------------------------------------------------- real runs

def run_main(*argv):
    """main.py's result for these flags (cli() prints it and returns nothing)."""
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Runs A then B of the same model, loss and dataset (A trained first)."""
    data = write_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=40, n_test=12, seed=5)
    save = tmp_path_factory.mktemp("runs")
    for name, epochs in (("A", "3"), ("B", "1")):
        cli(train_args(data, save, "--epochs", epochs, "--run-name", name, "--val-size", "12"))
    found = {p.name.rsplit("_", 1)[-1]: p for p in run_dirs(save)}
    # A few epochs leave every probability near 0.5; a sharper head (the same ranking) spreads them over (0, 1), so
    # that the fitted thresholds differ from label to label and from one grid to another.
    ckpt = torch.load(found["A"] / "best.pth", weights_only=True)
    for key in ("head.1.weight", "head.1.bias"):
        ckpt["model"][key] *= 8
    torch.save(ckpt, found["A"] / "best.pth")
    return found, data, save


def test_config_json_holds_the_trained_run_only(two_runs):
    saved = json.loads((two_runs[0]["A"] / "config.json").read_text())
    assert set(saved) == set(TRAINING_DEFAULTS) | set(RECORD_KEYS)
    assert saved["data_root"] == str(two_runs[1].resolve()) and saved["epochs"] == 3


def test_training_outputs_never_change_and_predict_applies_the_latest_evaluation(two_runs, tmp_path, capsys):
    run, data = two_runs[0]["A"], two_runs[1]
    before = {name: _digest(run / name) for name in ("best.pth", "last.pth", "config.json", "log.csv")}
    low, _ = evaluate(run, "--threshold-grid", "0.05", "0.1", "0.15")
    high, saved = evaluate(run, "--threshold-split", "val", "--threshold-grid", "0.55", "0.6", "0.65")
    fitted = json.loads((run / "thresholds.json").read_text())
    assert fitted["split"] == "val" and fitted["grid"] == [0.55, 0.6, 0.65] and fitted["labels"] == list(high["thresholds"])
    t = np.array(fitted["thresholds"], dtype=np.float32)
    assert list(low["thresholds"].values()) != list(high["thresholds"].values())  # the two evaluations differ
    assert len(set(t.tolist()) - {0.5}) >= 2  # ... and the latest has distinct fitted thresholds
    capsys.readouterr()
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in saved["test_images"]:
        (folder / name).symlink_to(data / "images" / name)
    rows = run_main("--predict", folder, "--checkpoint", run, "--num-workers", "0", "--no-progress",
                    "--output", tmp_path / "tags")
    assert "MCC thresholds fitted on val by --evaluate at" in capsys.readouterr().out
    by_name = {os.path.basename(r["image"]): {x["label"] for x in r["labels"]} for r in rows}
    p = saved["test_probs"]
    assert ((p >= t) != (p >= 0.5)).any()  # images whose labels depend on which thresholds are applied
    for i, name in enumerate(saved["test_images"]):
        assert by_name[name] == {saved["labels"][c] for c in np.flatnonzero(p[i] >= t)}, name
    cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "model.onnx")])
    assert "fitted on val" in capsys.readouterr().out
    assert {name: _digest(run / name) for name in before} == before


def test_an_older_run_with_thresholds_inside_best_pth_still_predicts(two_runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(two_runs[0]["B"], old)
    ckpt = torch.load(old / "best.pth", weights_only=True)
    planted = torch.tensor([0.05, 0.99, 0.05, 0.99, 0.05])
    torch.save({**ckpt, "thresholds": planted, "threshold_compare": "gt", "threshold_method": "f1"}, old / "best.pth")
    rows = run_main("--predict", two_runs[1] / "images", "--checkpoint", old, "--num-workers", "0", "--no-progress",
                    "--output", tmp_path / "tags")
    assert "F1 thresholds stored in" in capsys.readouterr().out
    vocabulary = ckpt["vocabulary"]
    assert rows and all({x["label"] for x in r["labels"]} <= {vocabulary[j] for j in (0, 2, 4)} for r in rows)
    assert any(r["labels"] for r in rows)


def test_evaluate_without_checkpoint_takes_the_newest_trained_run_not_the_latest_evaluated(two_runs):
    found, data, save = two_runs
    evaluate(found["A"])  # A (trained first) evaluated after B was trained
    results = run_main("--evaluate", "--model", "TinyResNet", "--loss-function", "AsymmetricLoss", "--data", data,
                       "--save-dir", save, "--num-workers", "0", "--no-progress")
    assert results["run"]["run_dir"] == str(found["B"])


def test_a_run_finds_its_own_dataset_from_another_working_directory(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    write_dataset(first / "data" / "tiny", n_test=10, seed=1)
    write_dataset(second / "data" / "tiny", n_test=7, seed=2)  # same relative name, another dataset
    monkeypatch.chdir(first)
    cli(train_args("data/tiny", "runs", "--epochs", "1"))
    (run,) = run_dirs(first / "runs")
    monkeypatch.chdir(second)
    results, saved = evaluate(run)
    assert results["run"]["split_sizes"]["test"] == 10 and len(saved["test_images"]) == 10

    # Moved together (run and dataset), from a third folder: found beside the run.
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    results, _ = evaluate(moved / "runs" / run.name)
    assert results["run"]["split_sizes"]["test"] == 10
    shutil.rmtree(moved / "data")
    with pytest.raises(CheckpointError, match="pass --data with the folder where it is now"):
        runs.run_data(moved / "runs" / run.name, runs.load_config(moved / "runs" / run.name))
    results, _ = evaluate(moved / "runs" / run.name, "--data", str(second / "data" / "tiny"))  # told where: used
    assert results["run"]["split_sizes"]["test"] == 7


# ---------------------------------------------------------------- review findings, each pinned

def test_the_folder_name_only_narrows_the_search_and_bad_siblings_are_skipped(tmp_path):
    def run(name, config, started="2026-01-01T00:00:00+00:00"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config if config is not None else ["x"]))
        (folder / "best.pth").write_bytes(b"x")
        return folder

    mine = run("TinyResNet_BCELoss_tiny_a", {"model": "TinyResNet", "loss_function": "BCELoss", "data": "/d/tiny",
                                             "started": "2026-01-01T00:00:00+00:00"})
    run("TinyResNet_BCELoss_tiny_v2_b", {"model": "TinyResNet", "loss_function": "BCELoss", "data": "/d/tiny_v2",
                                         "started": "2026-02-01T00:00:00+00:00"})  # newer, another dataset
    run("TinyResNet_BCELoss_tiny_c", None)  # config.json is not an object: not a run
    odd = run("TinyResNet_BCELoss_tiny_d", {"model": "TinyResNet", "loss_function": "BCELoss", "data": "tiny",
                                            "started": "yesterday"})  # unreadable time: config.json's file time
    os.utime(odd / "config.json", (0, 0))
    assert runs.find_latest_run(tmp_path, "TinyResNet", "BCELoss", "/elsewhere/tiny") == mine


def _ckpt():
    return {"vocabulary": ["sky", "sea", "sun"], "best_epoch": 3, "best_source": "model", "best_metric": 0.5,
            "thresholds": None}


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.update(thresholds=[0.1, 0.2]), "has 2 thresholds for 3 labels"),
    (lambda r: r.update(labels=["sea", "sky", "sun"]), "lists other labels"),
    (lambda r: r.pop("method"), "lacks method"),
    (lambda r: r.update(compare="lt"), "comparison rule 'lt' is neither ge nor gt"),
    (lambda r: r.update(thresholds=[0.1, 1.5, 0.2]), "is not a number in [0, 1]"),
    (lambda r: r.update(checkpoint={"best_epoch": 1, "best_source": "model", "best_metric": 0.4}),
     "was fitted for the best.pth of epoch 1, and best.pth is now epoch 3"),
])
def test_a_thresholds_file_that_does_not_fit_the_checkpoint_is_refused_in_one_sentence(tmp_path, change, problem):
    record = {"labels": ["sky", "sea", "sun"], "thresholds": [0.1, 0.2, 0.3], "compare": "gt", "method": "f1",
              "split": "val", "evaluated": "now", "checkpoint": runs.checkpoint_identity(_ckpt())}
    (tmp_path / "thresholds.json").write_text(json.dumps(record))
    fitted = runs.load_thresholds(tmp_path, _ckpt())
    assert fitted["compare"] == "gt" and fitted["source"].startswith("F1 thresholds fitted on val")
    torch.testing.assert_close(fitted["thresholds"], torch.tensor([0.1, 0.2, 0.3]))
    change(record)
    (tmp_path / "thresholds.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"cannot be applied: (it |its |a threshold )?" + re.escape(problem)):
        runs.load_thresholds(tmp_path, _ckpt())


def test_older_thresholds_inside_best_pth_keep_their_rule(tmp_path):
    fitted = runs.load_thresholds(tmp_path, {**_ckpt(), "thresholds": torch.tensor([0.2, 0.3, 0.4]),
                                             "threshold_compare": "gt", "threshold_method": "mcc"})
    assert fitted["compare"] == "gt" and "by an older --evaluate" in fitted["source"]
    assert runs.load_thresholds(tmp_path, _ckpt()) is None


def test_the_absolute_place_wins_and_known_names_resolve_again(tmp_path, monkeypatch):
    here, there = write_dataset(tmp_path / "here" / "tiny"), write_dataset(tmp_path / "runs" / "tiny")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir()
    config = {"data": "tiny", **runs.data_records(run_dir, here)}
    (there.parent / "r").mkdir(exist_ok=True)
    config["data_root_from_run"] = "../tiny"  # also a folder that exists: the absolute one still wins
    assert runs.run_data(run_dir, config) == str(here.resolve())
    shutil.rmtree(here)
    assert runs.run_data(run_dir, config) == str(there.resolve())
    shutil.rmtree(there)
    monkeypatch.setitem(runs.DATASETS, "tiny", tmp_path / "known")
    assert runs.run_data(run_dir, config) == "tiny"  # a registered name resolves as at training
    assert runs.run_data(run_dir, config, "elsewhere") == "elsewhere"  # --data always wins


def test_evaluate_records_what_it_fitted_on_and_reads_its_runtime_flags(two_runs, monkeypatch):
    import components

    run, data = two_runs[0]["A"], two_runs[1]
    seen = []
    real = components.eval_loader

    def spy(split, image_size, batch_size, num_workers, *rest, **kwargs):
        seen.append((batch_size, num_workers))
        return real(split, image_size, batch_size, num_workers, *rest, **kwargs)

    monkeypatch.setattr(runs, "eval_loader", spy)
    results, _ = evaluate(run, "--threshold-method", "f1", "--threshold-transform", "train", "--threshold-split",
                          "train", "--batch-size", "5")
    assert seen and set(seen) == {(5, 0)}
    record = json.loads((run / "thresholds.json").read_text())
    ckpt = torch.load(run / "best.pth", weights_only=True)
    assert (record["method"], record["transform"], record["split"], record["folds"]) == ("f1", "train", "train", None)
    assert record["data"] == str(data.resolve()) == results["run"]["evaluated_on"]
    assert record["checkpoint"] == runs.checkpoint_identity(ckpt)


def test_resume_reads_its_own_dataset_and_this_commands_runtime_flags(two_runs, tmp_path, monkeypatch):
    from trainer import resume_config

    run = two_runs[0]["B"]
    monkeypatch.chdir(tmp_path)
    config = resume_config(run, {"num_workers": 3, "device": "cpu", "save_dir": "s", "cache": "none",
                                 "progress": False})
    assert config["data"] == str(two_runs[1].resolve())  # not the path as typed, relative to this folder
    assert (config["num_workers"], config["cache"], config["resume"]) == (3, "none", str(run))


def test_folds_without_cross_fitting_are_refused(two_runs, capsys):
    with pytest.raises(SystemExit):
        cli(["--evaluate", "--checkpoint", str(two_runs[0]["B"]), "--folds", "3", "--threshold-split", "val",
             "--num-workers", "0", "--no-progress"])
    assert "--folds applies to --threshold-split cv" in capsys.readouterr().err
