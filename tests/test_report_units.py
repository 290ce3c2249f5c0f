"""report.py's pure pieces without training (the fast tests the mutation check runs): tables, files, figures' panels,
--predict's annotation and --compare. Each against a hand-made expectation."""
import csv
import io
import json

import numpy as np
import pytest
import torch

import report
from checkpoint import CheckpointError
from dataset import Split

KEYS = ("per_image/precision", "per_image/recall", "per_image/f1", "per_class/precision", "per_class/recall",
        "per_class/f1", "N+", "N+/precision", "mAP")


def results(method="mcc"):
    default = dict(zip(KEYS, (0.5, 0.25, 0.33333, 0.125, 1.0, 0.2222222, 3, 0.4, 45.678)))
    fitted = dict(zip(KEYS, (0.75, 0.5, 0.6, 0.5, 0.75, 0.6, 4, 0.625, 45.678)))
    default["per_class/f1_mean_per_label"], fitted["per_class/f1_mean_per_label"] = 0.11111, 0.55556
    ranked = dict(zip(KEYS, (0.25, 0.75, 0.375, 0.5, 0.5, 0.5, 5, 0.5, 45.678)))
    ranking = {"ranking/lrap": 0.812345, "ranking/coverage": 3.456, "ranking/loss": 0.0912345, "ranking/one_error": 0.25}
    run = {"model": "TinyResNet", "loss_function": "BCELoss", "data": "demo", "threshold_method": method,
           "split_sizes": {"train": 8, "val": 2, "test": 5}, "protocol": "holdout", "threshold_split": "val",
           "threshold_fallback": "default", "image_size": 64, "epochs": 3, "best_epoch": 2, "best_source": "ema",
           "seed": 7, "recipe": {"recipe": "default", "flips": "horizontal"}, "normalisation": None, "top_k": 5}
    return {"default": default, "mcc": fitted, "top_k": ranked, "ranking": ranking, "thresholds": {}, "run": run}


def test_markdown_tables_format_every_cell():
    assert report.markdown_tables(results("f1")) == (
        "| Thresholds | Per-image P | Per-image R | Per-image F1 | Per-class P | Per-class R | Per-class F1 | N+ | "
        "P of N+ | mAP |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        "| 0.5 | 0.5000 | 0.2500 | 0.3333 | 0.1250 | 1.0000 | 0.2222 | 3 | 0.4000 | 45.68 |\n"
        "| F1 | 0.7500 | 0.5000 | 0.6000 | 0.5000 | 0.7500 | 0.6000 | 4 | 0.6250 | 45.68 |\n"
        "| top-5 | 0.2500 | 0.7500 | 0.3750 | 0.5000 | 0.5000 | 0.5000 | 5 | 0.5000 | 45.68 |")


def test_results_markdown_states_the_run_its_recipe_and_the_per_label_mean():
    text = report._results_markdown(results())
    assert text.startswith("# TinyResNet + BCELoss on demo\n\nRecipe: default. Test set (5 images). Thresholds fitted "
                           "on the val split (mcc, fallback default); held-out validation split for model selection.\n"
                           "Image size 64, 3 epochs (best epoch 2, ema weights), seed 7.\n\n| Thresholds |")
    assert "| choice | this run |\n|---|---|\n| recipe | default |\n| flips | horizontal |\n" in text
    assert "| input mean / std | the backbone's / the backbone's |" in text
    assert "mean of per-label F1 is 0.5556 with the fitted thresholds (0.1111 at 0.5)" in text
    assert ("top-5: every test image annotated with its 5 highest-scoring labels (ties to the label listed first), as "
            "the annotation literature's tables. Ranking, threshold-free: label-ranking average precision 0.8123, "
            "coverage error 3.46, ranking loss 0.0912, one-error 0.2500.") in text
    study = results()
    study["run"].update(protocol="study", normalisation={"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]})
    text = report._results_markdown(study)
    assert "; the study's protocol (--select-on-test: epoch chosen on the test set).\n" in text
    assert "| [0.1, 0.2, 0.3] / [1, 2, 3] |" in text


def test_format_keeps_integers_and_rounds_ratios_and_percentages():
    assert [report._format(v) for v in (3, 0.123456, 1.0, 1.5, 12.3456, 100.0)] == \
        ["3", "0.1235", "1.0000", "1.50", "12.35", "100.00"]


def test_per_label_csv_counts_originals_and_gan_copies_apart():
    targets = torch.tensor([[1.0, 0], [1, 1], [0, 1], [1, 0], [1, 1]])
    train = Split("train", ["a.jpeg", "b.jpeg", "a_aug.jpeg", "a_aug_hor_flip.jpeg", "b_aug.jpeg"], [None] * 5, targets,
                  sources=[None, None, "a.jpeg", "a.jpeg", "b.jpeg"])
    test = {"targets": torch.tensor([[1.0, 0], [0, 1], [1, 1]]), "probs": torch.tensor([[0.9, 0.2], [0.6, 0.6],
                                                                                       [0.4, 0.7]])}
    text = _csv(train, test, torch.tensor([0.5, 0.6]), strict=False, k=1)
    rows = list(csv.DictReader(io.StringIO(text)))
    # sky: predicted for images 0, 1 (TP 1, FP 1), missed image 2; sea: predicted 1, 2 (both TP).
    # Top-1: image 0 -> sky, image 1 -> sky (a tie goes to the label listed first), image 2 -> sea.
    assert rows[0] == {"label": "sky", "train_frequency": "2", "train_gan_copies": "2", "test_frequency": "2",
                       "threshold": "0.5", "precision": "0.5000", "recall": "0.5000", "f1": "0.5000", "ap": "0.8333",
                       "top1_precision": "0.5000", "top1_recall": "0.5000", "top1_f1": "0.5000"}
    assert rows[1] == {"label": "sea", "train_frequency": "1", "train_gan_copies": "2", "test_frequency": "2",
                       "threshold": "0.6", "precision": "1.0000", "recall": "1.0000", "f1": "1.0000", "ap": "1.0000",
                       "top1_precision": "1.0000", "top1_recall": "0.5000", "top1_f1": "0.6667"}
    strict = list(csv.DictReader(io.StringIO(_csv(train, test, torch.tensor([0.5, 0.6]), strict=True))))
    assert strict[1]["recall"] == "0.5000"  # 0.6 > 0.6 is false: image 1 no longer gets 'sea'
    empty = {"targets": torch.zeros(2, 2), "probs": torch.full((2, 2), 0.3)}
    assert list(csv.DictReader(io.StringIO(_csv(train, empty, torch.tensor([0.5, 0.5]), False))))[0]["ap"] == ""


def _csv(train, test, thresholds, strict, k=5):
    return report.per_label_csv(["sky", "sea"], report.per_label_table(train, test, thresholds, strict, k), k)


def test_evaluation_arrays_round_trip_by_image_name():
    split = Split("test", ["x.jpg", "y.jpg", "z.jpg"], [None] * 3, torch.eye(3))
    out = {"indices": torch.tensor([0, 2]), "probs": torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]),
           "targets": torch.tensor([[1.0, 0, 0], [0, 0, 1]]), "split": split}
    saved = np.load(io.BytesIO(report.evaluation_arrays(["a", "b", "c"], {"test": out}, torch.tensor([0.1, 0.2, 0.3]))))
    assert saved["labels"].tolist() == ["a", "b", "c"] and saved["test_images"].tolist() == ["x.jpg", "z.jpg"]
    np.testing.assert_array_equal(saved["test_probs"], out["probs"].numpy())
    assert saved["test_targets"].dtype == np.uint8 and saved["test_targets"].tolist() == [[1, 0, 0], [0, 0, 1]]
    assert saved["test_probs"].dtype == np.float32 and saved["thresholds"].dtype == np.float32
    np.testing.assert_allclose(saved["thresholds"], [0.1, 0.2, 0.3])


def test_compare_runs_puts_each_runs_numbers_in_its_row(tmp_path):
    for name, shift in (("a", 0.0), ("b", -0.1)):
        r = results()
        r["default"] = {k: (v + shift if isinstance(v, float) else v) for k, v in r["default"].items()}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    lines = report.compare_runs([str(tmp_path / "a"), str(tmp_path / "b")]).splitlines()
    assert lines[0] == ("| Run | Model | Loss | Data | Per-class P @0.5 | Per-class R @0.5 | Per-class F1 @0.5 | "
                        "Per-class P +MCC | Per-class R +MCC | Per-class F1 +MCC | N+ +MCC | mAP |")
    assert lines[1] == "|" + "---|" * 12
    assert lines[2] == "| a | TinyResNet | BCELoss | demo | 0.1250 | 1.0000 | 0.2222 | 0.5000 | 0.7500 | 0.6000 | 4 | 45.68 |"
    assert lines[3].startswith("| b | TinyResNet | BCELoss | demo | 0.0250 | 0.9000 | 0.1222 | 0.5000 |")
    with pytest.raises(CheckpointError, match="run --evaluate --checkpoint"):
        report.compare_runs([str(tmp_path / "missing")])


def test_marked_labels_marks_right_wrong_and_missed():
    scores = torch.tensor([0.2, 0.9, 0.6, 0.1])
    predicted, truth = torch.tensor([False, True, True, False]), torch.tensor([1, 1, 0, 0])
    assert report.marked_labels(scores, predicted, truth, ["a", "b", "c", "d"]) == "b ✓, c ✗; missed: a"
    assert report.marked_labels(scores, torch.zeros(4, dtype=torch.bool), torch.zeros(4), list("abcd")) == "-"
    # Highest score first whatever the label order; every missed label listed.
    assert report.marked_labels(torch.tensor([0.6, 0.9, 0.2, 0.1]), torch.tensor([True, True, False, False]),
                                torch.tensor([1, 0, 1, 1]), list("abcd")) == "b ✗, a ✓; missed: c, d"


def test_figure_panels_show_each_images_own_predictions_and_unreadable_ones_as_such():
    from dataset import Split
    from report import figure_panels

    vocabulary = ["sky", "sea", "sun"]
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    split = Split("test", ["a", "b", "c", "d"], [None] * 4, targets)
    # Image 1 was unreadable: the rows are images 0, 2, 3, in that order.
    probs = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.8], [0.7, 0.6, 0.1]])
    panels = figure_panels(split, probs, torch.tensor([0, 2, 3]), torch.tensor([0.5, 0.65, 0.5]), vocabulary)
    assert [p["name"] for p in panels] == ["a", "b", "c", "d"]
    assert panels[1]["readable"] is False and "at_half" not in panels[1]
    assert panels[0]["at_half"] == "sky ✓" and panels[2]["at_half"] == "sun ✓"
    assert panels[3]["at_half"] == "sky ✓, sea ✓" and panels[3]["fitted"] == "sky ✓; missed: sea"
    assert panels[3]["truth"] == "sky, sea"
    wrong = figure_panels(split, torch.tensor([[0.1, 0.9, 0.1]] * 3), torch.tensor([0, 2, 3]), 0.5, vocabulary)
    assert wrong[0]["at_half"] == "sea ✗; missed: sky"




def test_figure_panels_hold_twelve_images_by_default_and_follow_the_comparison():
    split = Split("test", [f"{i}.jpg" for i in range(13)], [f"p{i}" for i in range(13)], torch.zeros(13, 2))
    probs = torch.full((13, 2), 0.5)
    panels = report.figure_panels(split, probs, torch.arange(13), torch.tensor([0.5, 0.5]), ["sky", "sea"])
    assert len(panels) == 12
    assert panels[0] == {"name": "0.jpg", "path": "p0", "truth": "-", "readable": True, "at_half": "sky ✗, sea ✗",
                         "fitted": "sky ✗, sea ✗", "truth_labels": [],
                         "at_half_marks": [("sky", "wrong"), ("sea", "wrong")],
                         "fitted_marks": [("sky", "wrong"), ("sea", "wrong")]}
    strict = report.figure_panels(split, probs, torch.arange(13), torch.tensor([0.5, 0.4]), ["sky", "sea"], strict=True)
    assert (strict[0]["at_half"], strict[0]["fitted"]) == ("-", "sea ✗")
