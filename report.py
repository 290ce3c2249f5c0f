"""Writing what --evaluate computed (evaluation.py), and --compare; it computes nothing itself.

Under the run directory, beside training's files (which stay as training left them):
  thresholds.json the fitted thresholds, their comparison rule and how they were fitted (--predict, --export use it)
  results.json   {"default": metrics at 0.5, "mcc": metrics with fitted thresholds, "thresholds": {label: t}, "run": ...}
  results.md     the study's tables (per-image, per-class, per-class + MCC, N+, N+ + MCC) and mAP
  per_label.csv  label, train frequency (originals; GAN copies apart), test frequency, threshold, P, R, F1, AP
  evaluation.npz the per-image probabilities and targets of the threshold split and the test set (recompute anything)
  predictions.png  test images titled with the truth and the predictions (0.5 and fitted), each marked right/wrong
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointError
from dataset import Split
from dashboard import write_evaluation as write_evaluation_events
from evaluation import TOP_K, Evaluation
from metrics import binarize, per_label_metrics, top_k
from prediction_grid import label_marks, marks_text, predictions_figure
from runs import save_thresholds
from utils import atomic_write_bytes, atomic_write_json, atomic_write_text

METRIC_ROWS = (("per_image/precision", "Per-image P"), ("per_image/recall", "Per-image R"),
               ("per_image/f1", "Per-image F1"), ("per_class/precision", "Per-class P"),
               ("per_class/recall", "Per-class R"), ("per_class/f1", "Per-class F1"), ("N+", "N+"),
               ("N+/precision", "P of N+"), ("mAP", "mAP"))


def _format(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4f}" if value <= 1 else f"{value:.2f}"


def markdown_tables(results: dict) -> str:
    """The study's tables as markdown: one row per thresholding, the study's columns."""
    header = "| Thresholds | " + " | ".join(name for _, name in METRIC_ROWS) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_ROWS) + 1)]
    rows = [("default", "0.5"), ("mcc", results["run"]["threshold_method"].upper()),
            ("top_k", f"top-{results['run']['top_k']}")]
    for key, name in rows:
        lines.append(f"| {name} | " + " | ".join(_format(results[key][k]) for k, _ in METRIC_ROWS) + " |")
    return "\n".join(lines)


def _results_markdown(results: dict) -> str:
    run = results["run"]
    protocol = ("the study's protocol (--select-on-test: epoch chosen on the test set)" if run["protocol"] == "study"
                else "held-out validation split for model selection")
    recipe = "\n".join(f"| {row} | {value} |" for row, value in run["recipe"].items())
    stats = run["normalisation"] or {"mean": "the backbone's", "std": "the backbone's"}
    return (f"# {run['model']} + {run['loss_function']} on {run.get('evaluated_on', run['data'])}\n\n"
            f"Recipe: {run['recipe']['recipe']}. Test set ({run['split_sizes']['test']} images). Thresholds fitted on "
            f"the {run['threshold_split']} split ({run['threshold_method']}, fallback {run['threshold_fallback']}); "
            f"{protocol}.\nImage size {run['image_size']}, {run['epochs']} epochs (best epoch {run['best_epoch']}, "
            f"{run['best_source']} weights), seed {run['seed']}.\n\n"
            f"{markdown_tables(results)}\n\n"
            f"| choice | this run |\n|---|---|\n{recipe}\n| input mean / std | {stats['mean']} / {stats['std']} |\n\n"
            f"{_ranking_line(results)}"
            f"Per-class F1 is 2PR/(P+R) of the label-averaged precision P and recall R; the mean of per-label F1 is "
            f"{results['mcc']['per_class/f1_mean_per_label']:.4f} with the fitted thresholds "
            f"({results['default']['per_class/f1_mean_per_label']:.4f} at 0.5). mAP is in percent.\n")


def _ranking_line(results: dict) -> str:
    """The top-k protocol and the ranking metrics in words (results of --evaluate)."""
    r, k = results["ranking"], results["run"]["top_k"]
    return (f"top-{k}: every test image annotated with its {k} highest-scoring labels (ties to the label listed first), "
            f"as the annotation literature's tables. Ranking, threshold-free: label-ranking average precision "
            f"{r['ranking/lrap']:.4f}, coverage error {r['ranking/coverage']:.2f}, ranking loss "
            f"{r['ranking/loss']:.4f}, one-error {r['ranking/one_error']:.4f}.\n\n")


def marked_labels(scores: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, vocabulary: list[str]) -> str:
    """The predicted labels, highest score first, each marked right (✓) or wrong (✗), then the missed true labels."""
    return marks_text(label_marks(scores, predicted, truth, vocabulary))


def figure_panels(split: Split, probs: torch.Tensor, indices: torch.Tensor, thresholds: torch.Tensor,
                  vocabulary: list[str], count: int = 12, strict: bool = False) -> list[dict]:
    """What each panel of predictions.png shows, for the first `count` images of `split`: its name and path, the
    truth, and the predictions at 0.5 and at `thresholds` marked right, wrong or missed (as marks for the figure and
    as text). Row r of `probs` (R, C) belongs to split image indices[r]; an image with no row (unreadable, skipped)
    says so instead of borrowing another's."""
    row_of = {int(i): r for r, i in enumerate(indices.tolist())}
    panels = []
    for i in range(min(count, len(split))):
        truth = split.targets[i].bool()  # (C,)
        labels = [vocabulary[j] for j in truth.nonzero().flatten().tolist()]
        panel = {"name": split.image_names[i], "path": split.paths[i], "truth": ", ".join(labels) or "-",
                 "truth_labels": labels}
        if i not in row_of:
            panels.append({**panel, "readable": False})
            continue
        p = probs[row_of[i]]  # (C,)
        half = label_marks(p, binarize(p[None], 0.5, strict)[0], truth, vocabulary)
        fitted = label_marks(p, binarize(p[None], thresholds, strict)[0], truth, vocabulary)
        panels.append({**panel, "readable": True, "at_half": marks_text(half), "fitted": marks_text(fitted),
                       "at_half_marks": half, "fitted_marks": fitted})
    return panels


def per_label_table(train: Split, test: dict, thresholds: torch.Tensor, strict: bool, k: int = TOP_K) -> dict:
    """Each label's (C lists) training images (originals; GAN copies apart), test images, fitted threshold, and its
    test precision, recall, F1 (under the evaluation's rule), AP, and P/R/F1 under the top-k protocol."""
    per_label = per_label_metrics(test["targets"], test["probs"], thresholds, strict)
    ranked = per_label_metrics(test["targets"], top_k(test["probs"], k).float(), 0.5)  # 1 for the k best, else 0
    generated = train.generated  # (N,) bool
    return {"train_frequency": train.targets[~generated].sum(0).long().tolist(),
            "train_gan_copies": train.targets[generated].sum(0).long().tolist(),
            "test_frequency": test["targets"].sum(0).long().tolist(), "threshold": thresholds.tolist(),
            **{m: per_label[m].tolist() for m in ("precision", "recall", "f1", "ap")},
            **{f"top{k}_{m}": ranked[m].tolist() for m in ("precision", "recall", "f1")}}


def per_label_csv(vocabulary: list[str], table: dict, k: int = TOP_K) -> str:
    """per_label.csv: one row per label of `per_label_table`, AP left empty for a label without test positives."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "train_frequency", "train_gan_copies", "test_frequency", "threshold", "precision",
                     "recall", "f1", "ap", f"top{k}_precision", f"top{k}_recall", f"top{k}_f1"])
    for j, label in enumerate(vocabulary):
        ap = float(table["ap"][j])
        writer.writerow([label, table["train_frequency"][j], table["train_gan_copies"][j], table["test_frequency"][j],
                         f"{float(table['threshold'][j]):.6g}",
                         *(f"{float(table[m][j]):.4f}" for m in ("precision", "recall", "f1")),
                         "" if math.isnan(ap) else f"{ap:.4f}",
                         *(f"{float(table[f'top{k}_{m}'][j]):.4f}" for m in ("precision", "recall", "f1"))])
    return buffer.getvalue()


def evaluation_arrays(vocabulary: list[str], predictions: dict, thresholds: torch.Tensor) -> bytes:
    """evaluation.npz: what --evaluate measured, so every figure can be recomputed. `<part>_images` (N,) names,
    `<part>_probs` (N, C) float32, `<part>_targets` (N, C) uint8 for part = fit (the threshold split) and test, in
    split order, unreadable images left out; `labels` (C,) and `thresholds` (C,)."""
    arrays = {"labels": np.array(vocabulary), "thresholds": thresholds.numpy().astype(np.float32)}
    for part, out in predictions.items():
        arrays[f"{part}_images"] = np.array([out["split"].image_names[i] for i in out["indices"].tolist()])
        arrays[f"{part}_probs"] = out["probs"].numpy().astype(np.float32)
        arrays[f"{part}_targets"] = out["targets"].numpy().astype(np.uint8)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_report(evaluation: Evaluation) -> None:
    """thresholds.json (what --predict and --export apply), results.json, results.md, per_label.csv, evaluation.npz
    and predictions.png under the run directory, each written atomically. Training's files are not touched."""
    run_dir, results, data = evaluation.run_dir, evaluation.results, evaluation.data
    thresholds, predictions = evaluation.thresholds, evaluation.predictions
    strict = results["run"]["threshold_compare"] == "gt"
    test = predictions["test"]
    save_thresholds(run_dir, data.vocabulary, thresholds, evaluation.settings, evaluation.checkpoint,
                    evaluation.data_source)
    atomic_write_json(run_dir / "results.json", results)
    atomic_write_text(run_dir / "results.md", _results_markdown(results))
    k = results["run"]["top_k"]
    table = per_label_table(data.train, test, thresholds, strict, k)
    atomic_write_text(run_dir / "per_label.csv", per_label_csv(data.vocabulary, table, k))
    atomic_write_bytes(run_dir / "evaluation.npz", evaluation_arrays(data.vocabulary, predictions, thresholds))
    panels = figure_panels(data.test, test["probs"], test["indices"], thresholds, data.vocabulary, strict=strict)
    atomic_write_bytes(run_dir / "predictions.png", predictions_figure(panels, results["run"]["threshold_method"]))
    if evaluation.tensorboard:
        write_evaluation_events(run_dir, results["run"]["best_epoch"], results, data.vocabulary, table, test)


def summary(results: dict, run_dir: Path) -> str:
    """What --evaluate prints when done: the recipe, the study's tables and the per-class F1 line."""
    method = results["run"]["threshold_method"].upper()
    return (f"Recipe: {results['run']['recipe']['recipe']}\n{markdown_tables(results)}\n"
            f"Per-class F1: {results['default']['per_class/f1']:.4f} at 0.5, {results['mcc']['per_class/f1']:.4f} "
            f"with {method} thresholds; report in {run_dir}")


def compare_runs(run_dirs: list[str]) -> str:
    """One markdown table, one row per run, from each run's results.json."""
    header = ("| Run | Model | Loss | Data | " + " | ".join(f"{n} @0.5" for _, n in METRIC_ROWS[3:6]) + " | "
              + " | ".join(f"{n} +MCC" for _, n in METRIC_ROWS[3:7]) + " | mAP |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in run_dirs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise CheckpointError(f"'{path}' does not exist; run --evaluate --checkpoint {run} first.")
        r = json.loads(path.read_text())
        meta = r["run"]
        cells = ([Path(run).name, meta["model"], meta["loss_function"], meta["data"]]
                 + [_format(r["default"][k]) for k, _ in METRIC_ROWS[3:6]]
                 + [_format(r["mcc"][k]) for k, _ in METRIC_ROWS[3:7]] + [_format(r["mcc"]["mAP"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
