"""--evaluate, --predict and --compare (report.py) through main.py on runs of a tiny generated dataset."""
import csv
import json

import numpy as np
import pytest
import torch

import main as main_module
from conftest import log_rows, run_dirs, train_args
from dataset import load_dataset
from heads import label_adjacency
from main import cli


def test_train_evaluate_predict_compare(tiny_dataset, tmp_path, capsys):
    save = tmp_path / "runs"
    cli(train_args(tiny_dataset, save, "--epochs", "1", "--run-name", "a"))
    (run,) = run_dirs(save)
    assert {"config.json", "last.pth", "best.pth", "log.csv"} <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "TinyResNet" and config["epochs"] == 1
    assert len(log_rows(run)) == 1

    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    for name in ("results.json", "results.md", "per_label.csv", "predictions.png"):
        assert (run / name).stat().st_size > 0, name
    results = json.loads((run / "results.json").read_text())
    keys = {"per_class/precision", "per_class/recall", "per_class/f1", "per_image/precision", "per_image/recall",
            "per_image/f1", "N+", "mAP"}
    assert keys <= results["default"].keys() and keys <= results["mcc"].keys()
    assert list(results["thresholds"]) == ["sky", "sun", "water", "boat", "tree"]
    assert results["run"]["threshold_split"] == "train+val" and results["run"]["split_sizes"]["test"] == 10
    assert "Per-class F1" in (run / "results.md").read_text()
    with (run / "per_label.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["sky", "sun", "water", "boat", "tree"]
    assert sum(int(r["test_frequency"]) for r in rows) == int(results["run"]["split_sizes"]["test"] and
                                                               sum(len(s["image_labels"]) for s in json.loads(
                                                                   (tiny_dataset / "test.json").read_text())["samples"]))
    # The fitted thresholds are kept beside the weights (which stay as training left them), and --predict applies them.
    assert json.loads((run / "thresholds.json").read_text())["thresholds"] == list(results["thresholds"].values())
    assert "thresholds" not in torch.load(run / "best.pth", weights_only=True)
    capsys.readouterr()
    cli(["--predict", str(tiny_dataset / "images"), "--checkpoint", str(run), "--num-workers", "0", "--no-progress",
         "--output", str(tmp_path / "tags")])
    printed = capsys.readouterr().out
    assert "10003.jpeg" in printed
    assert len(json.loads((tmp_path / "tags.json").read_text())) == 34
    assert (tmp_path / "tags.csv").read_text().startswith("image,labels,scores")

    cli(["--compare", str(run), str(run)])
    table = capsys.readouterr().out
    assert table.count("| a |") == 0 and table.count("TinyResNet_AsymmetricLoss_tiny_a") == 2


def test_evaluate_finds_the_latest_matching_run(tiny_dataset, tmp_path):
    save = tmp_path / "runs"
    cli(train_args(tiny_dataset, save, "--epochs", "1", "--run-name", "only"))
    results = main_module.main(main_module.get_args_parser().parse_args(
        ["--evaluate", "--model", "TinyResNet", "--loss-function", "AsymmetricLoss", "--data", str(tiny_dataset),
         "--save-dir", str(save), "--num-workers", "0", "--no-progress"]))
    assert results["run"]["run_dir"].endswith("TinyResNet_AsymmetricLoss_tiny_only")


def test_checkpoint_of_another_model_or_vocabulary_is_refused(tiny_dataset, tmp_path, capsys):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1"))
    (run,) = run_dirs(tmp_path / "runs")
    with pytest.raises(SystemExit):
        cli(["--evaluate", "--checkpoint", str(run), "--model", "ResNet18", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert "TinyResNet" in err and "ResNet18" in err and err.count("\n") == 1

    other = tmp_path / "other"
    other.mkdir()
    for f in ("train.json", "test.json"):
        data = json.loads((tiny_dataset / f).read_text())
        data["labels"] = data["labels"] + ["moon"]
        (other / f).write_text(json.dumps(data))
    (other / "images").symlink_to(tiny_dataset / "images")
    with pytest.raises(SystemExit):
        cli(["--evaluate", "--checkpoint", str(run), "--data", str(other), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert "vocabulary of 5 labels" in err and "6" in err and "moon" in err


@pytest.mark.parametrize("head", ["gcn", "decoder"])
def test_train_then_evaluate_with_each_new_head(tiny_dataset, tmp_path, head):
    save = tmp_path / "runs"
    cli(train_args(tiny_dataset, save, "--epochs", "1", "--head", head, "--run-name", head))
    (run,) = sorted(save.iterdir())
    assert json.loads((run / "config.json").read_text())["head"] == head
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    results = json.loads((run / "results.json").read_text())
    assert results["run"]["head"] == head and 0 <= results["mcc"]["per_class/f1"] <= 1
    state = torch.load(run / "best.pth", weights_only=True)["model"]
    if head == "gcn":
        # The graph is the TRAINING split's (validation held out), saved with the weights.
        train = load_dataset(tiny_dataset, val_size=6, seed=0).train
        torch.testing.assert_close(state["head.adjacency"], label_adjacency(train.targets), rtol=0, atol=0)
    else:
        assert state["head.queries"].shape[0] == 5


# ---------------------------------------------------------------- the study's thresholding through --evaluate

def _constant_half_run(tiny_dataset, tmp_path):
    """A trained run whose model then says p = 0.5 exactly for every label of every image (zero head)."""
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1"))
    (run,) = run_dirs(tmp_path / "runs")
    ckpt = torch.load(run / "best.pth", weights_only=True)
    ckpt["model"]["head.1.weight"].zero_()
    ckpt["model"]["head.1.bias"].zero_()
    torch.save(ckpt, run / "best.pth")
    return run


def _evaluate(run, *flags):
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress", *flags])
    return json.loads((run / "results.json").read_text())


def test_strict_comparison_and_the_first_point_fallback_through_evaluate(tiny_dataset, tmp_path):
    run = _constant_half_run(tiny_dataset, tmp_path)
    test = json.loads((tiny_dataset / "test.json").read_text())["samples"]
    positives, cells = sum(len(s["image_labels"]) for s in test), len(test) * 5
    # p >= 0.5: every label of every image is predicted; constant scores have MCC 0 everywhere, so fallback 0.5.
    ge = _evaluate(run, "--threshold-compare", "ge", "--threshold-fallback", "default")
    assert ge["default"]["per_image/recall"] == 1.0 and ge["default"]["per_image/precision"] == positives / cells
    assert set(ge["thresholds"].values()) == {0.5} and ge["mcc"]["N+"] == 5
    # p > 0.5: nothing is predicted, at 0.5 and with the fallback thresholds of 0.5.
    gt = _evaluate(run, "--threshold-compare", "gt", "--threshold-fallback", "default")
    assert gt["default"]["per_image/recall"] == 0.0 and gt["mcc"]["N+"] == 0 and gt["mcc"]["per_class/f1"] == 0.0
    assert _predicted_labels(run, tiny_dataset, tmp_path) == 0  # --predict applies the saved rule: 0.5 > 0.5 is false
    # The study's fallback: the grid's first point, 0.05, and 0.5 > 0.05 predicts everything again.
    first = _evaluate(run, "--threshold-compare", "gt", "--threshold-fallback", "first")
    assert set(first["thresholds"].values()) == {0.05} and first["mcc"]["per_image/recall"] == 1.0
    assert first["run"]["threshold_compare"] == "gt" and first["run"]["threshold_fallback"] == "first"
    assert _predicted_labels(run, tiny_dataset, tmp_path) == 5


def _predicted_labels(run, data, tmp_path) -> int:
    rows = main_module.main(main_module.get_args_parser().parse_args(
        ["--predict", str(data / "images" / "10000.jpeg"), "--checkpoint", str(run), "--num-workers", "0",
         "--no-progress", "--output", str(tmp_path / "p"), "--overwrite"]))
    return len(rows[0]["labels"])


def test_a_study_run_states_its_recipe_in_results_md(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--recipe", "study", "--epochs", "2"))
    (run,) = run_dirs(tmp_path / "runs")
    results = _evaluate(run)
    assert results["run"]["threshold_split"] == "train" and results["run"]["threshold_transform"] == "train"
    assert results["run"]["protocol"] == "study" and results["run"]["metric_epsilon"] == 1e-7
    text = (run / "results.md").read_text()
    for row in ("Recipe: study", "| loss reduction | mean over all images x labels", "| focusing weights | not detached",
                "| log of probabilities | log(max(p, 1e-08))", "| flips | horizontal and vertical",
                "| normalisation | dataset", "| schedule | OneCycleLR over 2.66667 epochs, trained 2",
                "| weights | test_resnet.r160_in1k, not loaded (--no-pretrained)", "| precision | fp32, NCHW",
                "| cuDNN | deterministic on, benchmark off", "seed 1, shuffled once (scikit-learn, random_state 0), last partial batch kept",
                "fitted on train (train transform), fallback first, predict p > t, metric epsilon 1e-07",
                "| model selection | test set (every epoch)", "| input mean / std |"):
        assert row in text, row


# ---------------------------------------------------------------- figures and skipped images

def test_evaluate_skips_an_unreadable_test_image_without_shifting_the_others(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1"))
    (run,) = run_dirs(tmp_path / "runs")
    (tiny_dataset / "images" / "10002.jpeg").write_bytes(b"not an image")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress", "--skip-bad-images"])
    saved = np.load(run / "evaluation.npz")
    assert "10002.jpeg" not in saved["test_images"].tolist() and len(saved["test_images"]) == 9
    results = json.loads((run / "results.json").read_text())
    assert results["run"]["split_sizes"]["test"] == 10 and (run / "predictions.png").stat().st_size > 0


def test_augmentation_end_to_end_with_png_and_jpeg_originals(tiny_dataset, tmp_path):
    from PIL import Image

    from DataAugmentation import cli as gan_cli
    from components import load_data
    from distributed import World
    from runs import load_config

    data = json.loads((tiny_dataset / "train.json").read_text())
    for s in data["samples"][::3]:  # a third of the training images become PNG originals
        png = s["image_name"].replace(".jpeg", ".png")
        Image.open(tiny_dataset / "images" / s["image_name"]).save(tiny_dataset / "images" / png)
        s["image_name"] = png
    (tiny_dataset / "train.json").write_text(json.dumps(data))
    assert gan_cli.main(["--data", str(tiny_dataset), "--iterations", "3", "--size", "16x24", "--device", "cpu",
                         "--no-progress"]) == 0
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--augmentation"))
    (run,) = run_dirs(tmp_path / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])

    splits = load_data(str(tiny_dataset), load_config(run), False, World())
    val = set(splits.val.image_names)
    originals = [n for n, src in zip(splits.train.image_names, splits.train.sources) if src is None]
    copies = [src for src in splits.train.sources if src is not None]
    assert not set(copies) & val and sorted(set(copies)) == sorted(originals) and len(copies) == 3 * len(originals)
    assert any(n.endswith(".png") for n in originals) and any(n.endswith(".png") for n in val)
    labels = {s["image_name"]: s["image_labels"] for s in data["samples"]}
    with (run / "per_label.csv").open() as f:
        for row in csv.DictReader(f):
            count = sum(row["label"] in labels[n] for n in originals)
            assert (int(row["train_frequency"]), int(row["train_gan_copies"])) == (count, 3 * count), row["label"]
