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
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from checkpoint import CheckpointError
from dataset import BadImageError, Split, to_rgb
from evaluation import TOP_K, Evaluation
from metrics import binarize, per_label_metrics, top_k
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
    chosen = sorted(predicted.nonzero().flatten().tolist(), key=lambda j: -float(scores[j]))
    marked = [f"{vocabulary[j]} {'✓' if truth[j] else '✗'}" for j in chosen]
    missed = [vocabulary[j] for j in (truth.bool() & ~predicted).nonzero().flatten().tolist()]
    return (", ".join(marked) or "-") + (f"; missed: {', '.join(missed)}" if missed else "")


def figure_panels(split: Split, probs: torch.Tensor, indices: torch.Tensor, thresholds: torch.Tensor,
                  vocabulary: list[str], count: int = 12, strict: bool = False) -> list[dict]:
    """What each panel of predictions.png shows, for the first `count` images of `split`: its name and path, the
    truth, and the predictions at 0.5 and at `thresholds` marked right or wrong. Row r of `probs` (R, C) belongs to
    split image indices[r]; an image with no row (unreadable, skipped) says so instead of borrowing another's."""
    row_of = {int(i): r for r, i in enumerate(indices.tolist())}
    panels = []
    for i in range(min(count, len(split))):
        truth = split.targets[i].bool()  # (C,)
        panel = {"name": split.image_names[i], "path": split.paths[i],
                 "truth": ", ".join(vocabulary[j] for j in truth.nonzero().flatten().tolist()) or "-"}
        if i not in row_of:
            panels.append({**panel, "readable": False})
            continue
        p = probs[row_of[i]]  # (C,)
        half, fitted = binarize(p[None], 0.5, strict)[0], binarize(p[None], thresholds, strict)[0]
        panels.append({**panel, "readable": True, "at_half": marked_labels(p, half, truth, vocabulary),
                       "fitted": marked_labels(p, fitted, truth, vocabulary)})
    return panels


def display_image(path: Path, longest_side: int = 320):
    """The image as an RGB uint8 array (H, W, 3) at its own aspect ratio, for figures."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            im.thumbnail((longest_side, longest_side))
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"Image '{path}' cannot be read ({type(e).__name__}: {e}).") from None


def predictions_figure(panels: list[dict], method: str = "mcc", columns: int = 4) -> bytes:
    """PNG bytes: a grid of the `figure_panels`, each image titled with its truth and its marked predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(math.ceil(len(panels) / columns), 1)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        if panel["readable"]:
            ax.imshow(display_image(panel["path"]))
            lines = [panel["name"], f"truth: {panel['truth']}", f"@0.5: {panel['at_half']}",
                     f"{method.upper()}: {panel['fitted']}"]
        else:
            lines = [panel["name"], "unreadable: skipped (--skip-bad-images)", f"truth: {panel['truth']}"]
        ax.set_title("\n".join(textwrap.fill(line, 52, subsequent_indent="    ") for line in lines), fontsize=8,
                     loc="left")
    fig.suptitle("✓ right, ✗ wrong; missed: true labels not predicted", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def per_label_csv(vocabulary: list[str], train: Split, test: dict, thresholds: torch.Tensor, strict: bool,
                  k: int = TOP_K) -> str:
    """per_label.csv: each label's training images (originals; GAN copies in their own column), test images, fitted
    threshold, and its test precision, recall, F1 (under the evaluation's rule), AP, and P/R/F1 under the top-k
    protocol."""
    per_label = per_label_metrics(test["targets"], test["probs"], thresholds, strict)
    ranked = per_label_metrics(test["targets"], top_k(test["probs"], k).float(), 0.5)  # 1 for the k best, else 0
    generated = train.generated  # (N,) bool
    originals = train.targets[~generated].sum(0).long().tolist()
    copies = train.targets[generated].sum(0).long().tolist()
    test_freq = test["targets"].sum(0).long().tolist()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "train_frequency", "train_gan_copies", "test_frequency", "threshold", "precision",
                     "recall", "f1", "ap", f"top{k}_precision", f"top{k}_recall", f"top{k}_f1"])
    for j, label in enumerate(vocabulary):
        ap = float(per_label["ap"][j])
        writer.writerow([label, originals[j], copies[j], test_freq[j], f"{float(thresholds[j]):.6g}",
                         f"{float(per_label['precision'][j]):.4f}", f"{float(per_label['recall'][j]):.4f}",
                         f"{float(per_label['f1'][j]):.4f}", "" if math.isnan(ap) else f"{ap:.4f}",
                         *(f"{float(ranked[m][j]):.4f}" for m in ("precision", "recall", "f1"))])
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
    atomic_write_text(run_dir / "per_label.csv", per_label_csv(data.vocabulary, data.train, test, thresholds, strict,
                                                               results["run"]["top_k"]))
    atomic_write_bytes(run_dir / "evaluation.npz", evaluation_arrays(data.vocabulary, predictions, thresholds))
    panels = figure_panels(data.test, test["probs"], test["indices"], thresholds, data.vocabulary, strict=strict)
    atomic_write_bytes(run_dir / "predictions.png", predictions_figure(panels, results["run"]["threshold_method"]))


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
