"""Every number --evaluate, --predict and --compare print or write is recomputed here from evaluation.npz with
scikit-learn or a few lines of numpy, never with the project's own metric or threshold functions."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, matthews_corrcoef, precision_recall_fscore_support

import main as main_module
from conftest import evaluate, run_dirs, train_args, write_dataset
from main import cli

GRID = [round(0.05 * k, 2) for k in range(1, 15)]
VAL = ("--threshold-split", "val")  # the validation split alone: its 12 images are easy to follow
# scikit-learn warns when a label's column holds one class only (a label absent from the fitting split): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
LABELS = ("sky", "sun", "water", "boat", "tree", "moon")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A TinyResNet run on a tiny dataset whose label 'moon' has positives in the test set only."""
    root = write_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=40, n_test=16, labels=LABELS, seed=3)
    for name in ("train", "test"):
        data = json.loads((root / f"{name}.json").read_text())
        for s in data["samples"]:
            if name == "train":
                s["image_labels"] = [label for label in s["image_labels"] if label != "moon"]
        (root / f"{name}.json").write_text(json.dumps(data))
    save = tmp_path_factory.mktemp("runs")
    cli(train_args(root, save, "--epochs", "3", "--val-size", "12", "--batch-size", "8"))
    (run_dir,) = run_dirs(save)
    return run_dir, root


def sklearn_thresholds(y, p, grid=GRID, criterion="mcc", fallback="default"):
    """The study's loop, with scikit-learn's scores: per label the first grid point of the best score."""
    score = matthews_corrcoef if criterion == "mcc" else (lambda a, b: f1_score(a, b, zero_division=0))
    thresholds = []
    for c in range(y.shape[1]):
        scores = [score(y[:, c], (p[:, c] >= t).astype(int)) for t in grid]
        best = grid[int(np.argmax(scores))]
        thresholds.append(0.5 if fallback == "default" and max(abs(s) for s in scores) == 0 else best)
    return np.array(thresholds)


def sklearn_metrics(y, p, thresholds, strict=False):
    """results.json's figures from scikit-learn: per-class P/R means, F1 of the means, micro per-image, N+, mAP."""
    pred = (p > thresholds) if strict else (p >= thresholds)
    prec, rec, _, _ = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    micro_p, micro_r, micro_f, _ = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    P, R = prec.mean(), rec.mean()
    aps = [average_precision_score(y[:, c], p[:, c]) for c in range(y.shape[1]) if y[:, c].any()]
    per_label_f1 = [2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(prec, rec)]
    recalled = (pred & (y == 1)).sum(0) > 0
    return {"per_class/precision": P, "per_class/recall": R, "per_class/f1": 2 * P * R / (P + R) if P + R else 0.0,
            "per_class/f1_mean_per_label": float(np.mean(per_label_f1)), "per_image/precision": micro_p,
            "per_image/recall": micro_r, "per_image/f1": micro_f, "N+": int(recalled.sum()),
            "N+/precision": float(prec[recalled].mean()) if recalled.any() else 0.0, "mAP": 100 * float(np.mean(aps))}


def assert_same_metrics(ours, reference):
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_results_json_and_per_label_csv_are_recomputed_from_the_saved_predictions(run):
    run_dir, root = run
    results, saved = evaluate(run_dir, *VAL)
    y_fit, p_fit = saved["fit_targets"].astype(int), saved["fit_probs"].astype(np.float64)
    thresholds = sklearn_thresholds(y_fit, p_fit)
    np.testing.assert_allclose(saved["thresholds"], thresholds, rtol=0, atol=1e-7)
    assert list(results["thresholds"].values()) == pytest.approx(list(thresholds))
    assert list(saved["labels"]) == list(LABELS)
    # The fitted split is the validation split (asked for), in split order; the test set is test.json in file order.
    test_names = [s["image_name"] for s in json.loads((root / "test.json").read_text())["samples"]]
    assert list(saved["test_images"]) == test_names and len(saved["fit_images"]) == 12
    y, p = saved["test_targets"].astype(int), saved["test_probs"].astype(np.float64)
    # float32 probabilities compared with the float32 thresholds, as the evaluation does.
    p32, t32 = saved["test_probs"], saved["thresholds"]
    assert_same_metrics(results["default"], sklearn_metrics(y, p32, np.float32(0.5)))
    assert_same_metrics(results["mcc"], sklearn_metrics(y, p32, t32))
    with (run_dir / "per_label.csv").open() as f:
        rows = list(csv.DictReader(f))
    train = [s for s in json.loads((root / "train.json").read_text())["samples"]]
    val = set(saved["fit_images"])
    for c, row in enumerate(rows):
        pred = p32[:, c] >= t32[c]
        tp = int((pred & (y[:, c] == 1)).sum())
        assert row["label"] == LABELS[c]
        assert int(row["train_frequency"]) == sum(LABELS[c] in s["image_labels"] for s in train
                                                  if s["image_name"] not in val)
        assert int(row["train_gan_copies"]) == 0 and int(row["test_frequency"]) == int(y[:, c].sum())
        assert float(row["threshold"]) == pytest.approx(thresholds[c])
        assert float(row["precision"]) == pytest.approx(tp / pred.sum() if pred.sum() else 0.0, abs=5e-5)
        assert float(row["recall"]) == pytest.approx(tp / y[:, c].sum() if y[:, c].sum() else 0.0, abs=5e-5)
        ap = average_precision_score(y[:, c], p[:, c]) if y[:, c].any() else math.nan
        assert (row["ap"] == "" and math.isnan(ap)) or float(row["ap"]) == pytest.approx(ap, abs=5e-5)


def _markdown_rows(text):
    """{first cell: [other cells]} of every markdown table row in `text`."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_results_md_shows_exactly_the_numbers_of_results_json(run):
    run_dir, _ = run
    results, _ = evaluate(run_dir)
    rows = _markdown_rows((run_dir / "results.md").read_text())
    keys = ["per_image/precision", "per_image/recall", "per_image/f1", "per_class/precision", "per_class/recall",
            "per_class/f1", "N+", "N+/precision", "mAP"]
    for name, block in (("0.5", "default"), ("MCC", "mcc")):
        expected = [str(results[block][k]) if k == "N+" else f"{results[block][k]:.2f}" if k == "mAP"
                    else f"{results[block][k]:.4f}" for k in keys]
        assert rows[name] == expected, name


def test_each_threshold_option_changes_exactly_what_it_should(run):
    run_dir, _ = run
    base, saved = evaluate(run_dir, *VAL)
    y_fit, p_fit = saved["fit_targets"].astype(int), saved["fit_probs"].astype(np.float64)
    y, p = saved["test_targets"].astype(int), saved["test_probs"]

    f1, s = evaluate(run_dir, *VAL, "--threshold-method", "f1")
    np.testing.assert_allclose(s["thresholds"], sklearn_thresholds(y_fit, p_fit, criterion="f1"), atol=1e-7)
    assert f1["default"] == base["default"]  # the 0.5 row does not depend on the thresholds
    assert_same_metrics(f1["mcc"], sklearn_metrics(y, p, s["thresholds"]))

    grid = [0.2, 0.4, 0.6]
    coarse, s = evaluate(run_dir, *VAL, "--threshold-grid", *map(str, grid))
    np.testing.assert_allclose(s["thresholds"], sklearn_thresholds(y_fit, p_fit, grid=grid), atol=1e-7)
    assert coarse["run"]["threshold_grid"] == grid and coarse["default"] == base["default"]

    first, s = evaluate(run_dir, *VAL, "--threshold-fallback", "first")
    fallback = np.array([not y_fit[:, c].any() or all(matthews_corrcoef(y_fit[:, c], p_fit[:, c] >= t) == 0
                                                      for t in GRID) for c in range(len(LABELS))])
    assert fallback[LABELS.index("moon")]  # no positive in the validation split
    np.testing.assert_allclose(s["thresholds"][fallback], 0.05, atol=1e-7)
    np.testing.assert_allclose(s["thresholds"][~fallback], saved["thresholds"][~fallback], atol=0)

    train, s = evaluate(run_dir, "--threshold-split", "train")
    assert train["run"]["threshold_split"] == "train" and len(s["fit_images"]) == 28
    train_names = set(s["fit_images"])
    assert not set(s["fit_images"]) & set(saved["fit_images"])
    np.testing.assert_allclose(s["thresholds"], sklearn_thresholds(s["fit_targets"], s["fit_probs"]), atol=1e-7)

    both, s = evaluate(run_dir)  # the default: train and validation predictions together, train's rows first
    assert both["run"]["threshold_split"] == "train+val" and len(s["fit_images"]) == 28 + 12
    assert set(s["fit_images"]) == set(saved["fit_images"]) | set(train_names)
    np.testing.assert_allclose(s["thresholds"], sklearn_thresholds(s["fit_targets"], s["fit_probs"]), atol=1e-7)
    assert_same_metrics(both["mcc"], sklearn_metrics(y, p, s["thresholds"]))


def test_predict_applies_the_runs_thresholds_to_the_same_probabilities(run, tmp_path):
    run_dir, root = run
    _, saved = evaluate(run_dir)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in saved["test_images"]:
        (folder / name).symlink_to(root / "images" / name)
    rows = main_module.main(main_module.get_args_parser().parse_args(
        ["--predict", str(folder), "--checkpoint", str(run_dir), "--num-workers", "0", "--no-progress",
         "--output", str(tmp_path / "tags")]))
    p, t = saved["test_probs"], saved["thresholds"]
    moon = LABELS.index("moon")
    assert t[moon] == np.float32(0.5)  # a label on the fallback threshold
    disagree = ((p >= 0.5) != (p >= t)).any(axis=1)
    assert disagree.any()  # images where 0.5 and the fitted thresholds disagree
    by_name = {Path(r["image"]).name: r for r in rows}
    for i, name in enumerate(saved["test_images"]):
        expected = {LABELS[c] for c in np.flatnonzero(p[i] >= t)}
        assert {x["label"] for x in by_name[name]["labels"]} == expected, name
        for x in by_name[name]["labels"]:
            assert x["score"] == pytest.approx(p[i, LABELS.index(x["label"])], abs=1e-4)
    with (tmp_path / "tags.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(saved["test_images"])


def test_every_compare_cell_is_its_runs_results_json(run, capsys):
    run_dir, _ = run
    results, _ = evaluate(run_dir, "--threshold-method", "f1")
    capsys.readouterr()
    table = main_module.main(main_module.get_args_parser().parse_args(["--compare", str(run_dir)]))
    header, _, row = table.splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(names, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["Run"] == run_dir.name and cells["Model"] == "TinyResNet" and cells["Loss"] == "AsymmetricLoss"
    for name, (block, key) in {"Per-class P @0.5": ("default", "per_class/precision"),
                               "Per-class R @0.5": ("default", "per_class/recall"),
                               "Per-class F1 @0.5": ("default", "per_class/f1"),
                               "Per-class P +MCC": ("mcc", "per_class/precision"),
                               "Per-class R +MCC": ("mcc", "per_class/recall"),
                               "Per-class F1 +MCC": ("mcc", "per_class/f1")}.items():
        assert float(cells[name]) == pytest.approx(results[block][key], abs=5e-5), name
    assert int(cells["N+ +MCC"]) == results["mcc"]["N+"]
    assert float(cells["mAP"]) == pytest.approx(results["mcc"]["mAP"], abs=5e-3)
    assert re.fullmatch(r"\d+\.\d{4}", cells["Per-class F1 +MCC"])


def test_top_k_and_ranking_blocks_are_recomputed_from_the_saved_predictions(run):
    from sklearn.metrics import coverage_error, label_ranking_average_precision_score, label_ranking_loss

    run_dir, _ = run
    results, saved = evaluate(run_dir, "--top-k", "2")
    y, p = saved["test_targets"].astype(int), saved["test_probs"]
    order = np.argsort(-p, axis=1, kind="stable")[:, :2]  # each image's 2 best labels, ties to the first
    pred = np.zeros_like(y, dtype=bool)
    np.put_along_axis(pred, order, True, axis=1)
    prec, rec, _, _ = precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    micro = precision_recall_fscore_support(y, pred, average="micro", zero_division=0)
    assert results["run"]["top_k"] == 2
    assert results["top_k"]["per_class/precision"] == pytest.approx(prec.mean(), rel=1e-9)
    assert results["top_k"]["per_class/recall"] == pytest.approx(rec.mean(), rel=1e-9)
    assert results["top_k"]["per_image/f1"] == pytest.approx(micro[2], rel=1e-9)
    assert results["top_k"]["N+"] == int(((pred & (y == 1)).sum(0) > 0).sum())
    assert results["ranking"]["ranking/lrap"] == pytest.approx(label_ranking_average_precision_score(y, p), rel=1e-9)
    assert results["ranking"]["ranking/coverage"] == pytest.approx(coverage_error(y, p), rel=1e-9)
    assert results["ranking"]["ranking/loss"] == pytest.approx(label_ranking_loss(y, p), rel=1e-9)
    rows = _markdown_rows((run_dir / "results.md").read_text())
    assert rows["top-2"][5] == f"{results['top_k']['per_class/f1']:.4f}"


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """A --recipe study run (p > t) whose head says exactly p = 0.5 for 'sky' and 'sun': with the 0.5 fallback those
    labels sit on their thresholds, where only the comparison rule decides."""
    import torch

    root = write_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=40, n_test=16, labels=LABELS, seed=4)
    save = tmp_path_factory.mktemp("runs")
    cli(train_args(root, save, "--recipe", "study", "--epochs", "2"))
    (run_dir,) = run_dirs(save)
    ckpt = torch.load(run_dir / "best.pth", weights_only=True)
    for key in ("head.1.weight", "head.1.bias"):
        ckpt["model"][key][:2] = 0
    torch.save(ckpt, run_dir / "best.pth")
    return run_dir, root


def test_every_per_label_cell_of_a_study_run_is_recomputed_with_the_strict_rule(study_run):
    run_dir, root = study_run
    results, saved = evaluate(run_dir, "--threshold-fallback", "default")
    assert results["run"]["threshold_compare"] == "gt" and results["run"]["recipe"]["recipe"] == "study"
    y, p, t = saved["test_targets"].astype(int), saved["test_probs"], saved["thresholds"]
    assert (p[:, :2] == np.float32(0.5)).all() and (t[:2] == np.float32(0.5)).all()  # the ties
    assert y[:, :2].sum(0).min() > 0  # ... on labels the test set has
    train = json.loads((root / "train.json").read_text())["samples"]  # the study trains on all of train.json
    ranked = np.zeros_like(y, dtype=bool)
    ranked[np.arange(len(p))[:, None], np.argsort(-p, axis=1, kind="stable")[:, :5]] = True  # top 5, ties to the first
    with (run_dir / "per_label.csv").open() as f:
        rows = list(csv.DictReader(f))
    for c, row in enumerate(rows):
        pred = p[:, c] > t[c]
        expected = {"label": LABELS[c], "train_frequency": sum(LABELS[c] in s["image_labels"] for s in train),
                    "train_gan_copies": 0, "test_frequency": int(y[:, c].sum()), "threshold": float(t[c])}
        for prefix, chosen in (("", pred), ("top5_", ranked[:, c])):
            tp = int((chosen & (y[:, c] == 1)).sum())
            precision = tp / chosen.sum() if chosen.sum() else 0.0
            recall = tp / y[:, c].sum() if y[:, c].sum() else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            expected.update({f"{prefix}precision": precision, f"{prefix}recall": recall, f"{prefix}f1": f1})
        ap = average_precision_score(y[:, c], p[:, c]) if y[:, c].any() else math.nan
        assert list(row) == list(expected)[:5] + ["precision", "recall", "f1", "ap", "top5_precision",
                                                  "top5_recall", "top5_f1"]
        for key, value in expected.items():
            if isinstance(value, str):
                assert row[key] == value
            else:
                assert float(row[key]) == pytest.approx(value, abs=5e-5), (LABELS[c], key)
        assert (row["ap"] == "" and math.isnan(ap)) or float(row["ap"]) == pytest.approx(ap, abs=5e-5)
    assert all(float(rows[c]["recall"]) == 0.0 for c in (0, 1))  # p = t = 0.5 is not p > t
