"""Analysis and plots: loss gradients, label distribution, training curves and per-label results.

    python analysis.py gradients [--gamma 3] [--gamma-pos 0] [--gamma-neg 4] [--margin 0.05]
    python analysis.py labels --data Corel-5k [--split train]      # needs only train.json/test.json, no images
    python analysis.py curves RUN_DIR [RUN_DIR ...]                 # from each run's log.csv
    python analysis.py per-label RUN_DIR [RUN_DIR ...]              # from per_label.csv (after --evaluate)

Each command writes a PNG and its data as CSV (``labels`` also a markdown "class name | count" table) into
``--out`` (default: ``<first RUN_DIR>/analysis/`` for curves/per-label, ``runs/analysis/`` for gradients/labels,
which read no run; never the current folder itself). The computations (``loss_gradients``, ``label_statistics``, ``read_log``,
``read_per_label``, ``frequency_bins``) are pure functions returning tensors/dicts; the ``draw_*`` functions
turn their results into PNG bytes. Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg), so importing
this module never touches pyplot's global state or the interactive backend.
"""
from __future__ import annotations

import startup

if __name__ == "__main__":
    startup.guard()  # a Ctrl-C while torch loads: one line, not a traceback

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from dataset import multi_hot, read_annotations, resolve_data_root
from losses import MultiLabelLoss, create_loss
from runs import dataset_tag
from utils import ArgumentParser, UserError, atomic_write_bytes, atomic_write_text

COMMANDS = ("gradients", "labels", "curves", "per-label")
# log.csv columns drawn by `curves` (engine.train_one_epoch / engine.evaluate write them).
CURVE_COLUMNS = ("train/loss", "val/loss", "val/per_class/f1", "val/N+", "val/mAP")
PER_LABEL_COLUMNS = ("label", "train_frequency", "f1")
FIXED_FOCAL_GAMMA = 2.0  # the study's figures always show focal loss with gamma = 2 beside the configured one
DPI = 110


class AnalysisError(UserError, ValueError):
    """Input that `analysis.py` cannot plot (missing run directory or log, malformed CSV, bad option)."""


# --------------------------------------------------------------------------------------------------------------
# Computations (pure: tensors / dicts in, tensors / dicts out)
# --------------------------------------------------------------------------------------------------------------

def _fmt(value: float) -> str:
    return f"{value:g}"


def gradient_losses(gamma: float | None = None, gamma_pos: float | None = None, gamma_neg: float | None = None,
                    margin: float | None = None, detach_focusing: bool = False) -> dict[str, MultiLabelLoss]:
    """The losses compared by `gradients`, built with ``losses.create_loss`` (``None`` = the loss's default).

    Returns ``{name: loss}`` in drawing order: BCE; focal with gamma = 2; focal with ``gamma`` (default 3;
    omitted when it is 2); ASL with ``gamma_pos``, ``gamma_neg``, ``margin`` (defaults 0, 4, 0.05). All use
    ``reduction="sum"``. ``detach_focusing=False`` (default) keeps the focusing weights in the graph, so autograd
    gives the exact derivative of the written loss; ``True`` gives the gradient training applies by default.
    """
    try:
        focal = create_loss("FocalLoss", gamma=gamma, detach_focusing=detach_focusing, reduction="sum")
        asl = create_loss("AsymmetricLoss", gamma_pos=gamma_pos, gamma_neg=gamma_neg, margin=margin,
                          detach_focusing=detach_focusing, reduction="sum")
    except ValueError as e:
        raise AnalysisError(f"{e} (analysis.py gradients: see --gamma, --gamma-pos, --gamma-neg, --margin)") from None
    losses: dict[str, MultiLabelLoss] = {"BCE": create_loss("BCELoss", reduction="sum")}
    losses[f"focal gamma={_fmt(FIXED_FOCAL_GAMMA)}"] = create_loss(
        "FocalLoss", gamma=FIXED_FOCAL_GAMMA, detach_focusing=detach_focusing, reduction="sum")
    if focal.gamma != FIXED_FOCAL_GAMMA:
        losses[f"focal gamma={_fmt(focal.gamma)}"] = focal
    losses[f"ASL gamma+={_fmt(asl.gamma_pos)} gamma-={_fmt(asl.gamma_neg)} m={_fmt(asl.margin)}"] = asl
    return losses


def probability_grid(points: int) -> Tensor:
    """``points`` probabilities evenly spaced strictly inside (0, 1): ``p_k = k / (points + 1)``, k = 1..points."""
    if points < 2:
        raise AnalysisError(f"--points must be at least 2 (got {points}); the default is 999.")
    return torch.arange(1, points + 1, dtype=torch.float64) / (points + 1)  # (N,)


def loss_gradients(losses: dict[str, MultiLabelLoss], p: Tensor) -> dict[str, Any]:
    """dL/dx of each loss at logits ``x = logit(p)`` for a positive (y = 1) and a negative (y = 0) label, by autograd.

    One backward per loss through a (2, N) batch, row 0 all positives, row 1 all negatives. Every loss here is a
    sum of element-wise terms (``reduction="sum"``), so entry (r, k) of the gradient is the derivative of that
    element's own term ``l(x_k, y_r)``. Returns ``{"x": (N,), "p": (N,) = sigmoid(x) as the losses see it
    (float32), "positive": {name: (N,)}, "negative": {name: (N,)}}`` (float32 tensors). Closed forms for
    reference: BCE ``p - y``; focal, y = 1: ``(1-p)^g (g p log p - (1-p))``, y = 0: ``p^g (p - g (1-p) log(1-p))``.
    """
    if p.dim() != 1 or not bool(((p > 0) & (p < 1)).all()):
        raise AnalysisError("loss_gradients: p must be a 1-D tensor of probabilities strictly between 0 and 1.")
    x = torch.logit(p.to(torch.float32))  # (N,)
    targets = torch.stack([torch.ones_like(x), torch.zeros_like(x)])  # (2, N)
    positive, negative = {}, {}
    for name, loss in losses.items():
        if getattr(loss, "reduction", "sum") != "sum":
            raise AnalysisError(f"loss_gradients: loss {name!r} must use reduction='sum' (a mean would scale the "
                                f"gradient by 1/B); build it with gradient_losses().")
        logits = x.expand(2, -1).clone().requires_grad_(True)  # (2, N)
        (grad,) = torch.autograd.grad(loss(logits, targets), logits)  # (2, N)
        positive[name], negative[name] = grad[0].detach(), grad[1].detach()
    return {"x": x, "p": torch.sigmoid(x), "positive": positive, "negative": negative}


def label_statistics(samples: Sequence[dict], vocabulary: Sequence[str], source: str | Path = "annotations") -> dict:
    """Label frequencies and labels per image of annotation ``samples`` (the format of dataset.read_annotations).

    With the multi-hot matrix Y (N, C) (a label repeated in one image counts once):
    ``counts[c] = sum_i Y[i, c]`` (images showing label c), ``labels_per_image[i] = sum_c Y[i, c]``,
    ``histogram[k] = #{i : labels_per_image[i] = k}`` for k = 0..max. Returns those three long tensors plus
    ``order`` (C,), the label indices by decreasing count (ties by name), and ``vocabulary`` (list of str).
    Labels outside the vocabulary raise dataset.DatasetError.
    """
    targets = multi_hot(samples, vocabulary, source)  # (N, C)
    counts = targets.sum(0).long()  # (C,)
    per_image = targets.sum(1).long()  # (N,)
    # Sort by name first, then stably by decreasing count: ties stay in name order.
    by_name = sorted(range(len(vocabulary)), key=lambda j: vocabulary[j])
    by_name = torch.tensor(by_name, dtype=torch.long)  # (C,)
    order = by_name[torch.sort(counts[by_name], descending=True, stable=True).indices]  # (C,)
    histogram = torch.bincount(per_image, minlength=1)  # (max + 1,)
    return {"vocabulary": list(vocabulary), "counts": counts, "labels_per_image": per_image,
            "histogram": histogram, "order": order}


def load_label_statistics(data: str, split: str = "train") -> dict:
    """label_statistics of ``split`` ("train", "test" or "all" = both) of dataset ``data`` (name, 'demo' or folder).

    Reads only the annotation JSON files (train.json's vocabulary), never the images.
    """
    if split not in ("train", "test", "all"):
        raise AnalysisError(f"--split must be train, test or all (got {split!r}).")
    root = resolve_data_root(data)
    train_samples, vocabulary = read_annotations(root / "train.json")
    samples: list[dict] = []
    if split in ("train", "all"):
        samples += train_samples
    if split in ("test", "all"):
        samples += read_annotations(root / "test.json")[0]
    if not samples:
        raise AnalysisError(f"The {split} split of '{root}' has no samples; there is nothing to count.")
    stats = label_statistics(samples, vocabulary, root / ("train.json" if split == "train" else f"{split} split"))
    stats.update(root=root, split=split)
    return stats


def _read_csv(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    """Rows of ``path`` as dicts, after checking that the header has every ``required`` column."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise AnalysisError(f"'{path}' lacks the column(s) {missing} (it has {header}); it is not a {what} "
                                f"written by this project's main.py.")
        rows = list(reader)
    if not rows:
        raise AnalysisError(f"'{path}' has a header but no rows yet; train at least one epoch (or run --evaluate) "
                            f"first.")
    return rows


def _column(rows: list[dict[str, str]], name: str, path: Path) -> Tensor:
    """Column ``name`` as float64 (N,); an empty cell is NaN, anything else non-numeric is an error."""
    values = []
    for i, row in enumerate(rows):
        cell = (row.get(name) or "").strip()
        try:
            values.append(float(cell) if cell else math.nan)
        except ValueError:
            raise AnalysisError(f"'{path}', row {i + 2}, column {name!r}: {cell!r} is not a number.") from None
    return torch.tensor(values, dtype=torch.float64)


def _run_directory(run_dir: str | Path, needs: str, hint: str) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AnalysisError(f"Run directory '{run_dir}' does not exist; pass a folder that main.py created under "
                            f"--save-dir (e.g. runs/TResNet_AsymmetricLoss_Corel-5k_...).")
    if not (run_dir / needs).is_file():
        raise AnalysisError(f"'{run_dir}' has no {needs}; {hint}")
    return run_dir


def read_log(run_dir: str | Path) -> dict[str, Tensor]:
    """The per-epoch curves of one run from ``<run_dir>/log.csv``: ``{"epoch": (E,), column: (E,)}`` float64.

    Columns: ``epoch`` and :data:`CURVE_COLUMNS` (empty cells become NaN); rows sorted by epoch.
    """
    path = _run_directory(run_dir, "log.csv", "it is written after each training epoch, so train (or resume) the "
                                              "run for at least one epoch first.") / "log.csv"
    rows = _read_csv(path, ("epoch",) + CURVE_COLUMNS, "training log")
    curves = {name: _column(rows, name, path) for name in ("epoch",) + CURVE_COLUMNS}
    if bool(torch.isnan(curves["epoch"]).any()):
        raise AnalysisError(f"'{path}' has a row without an epoch number; every row of log.csv starts with one.")
    order = torch.argsort(curves["epoch"])  # (E,)
    return {name: values[order] for name, values in curves.items()}


def read_per_label(run_dir: str | Path) -> dict[str, Any]:
    """Per-label results of one run from ``<run_dir>/per_label.csv`` (written by ``main.py --evaluate``).

    Returns ``{"labels": list of str, "train_frequency": (C,), "f1": (C,)}`` (float64 tensors; F1 on the test set
    at the fitted thresholds).
    """
    path = _run_directory(run_dir, "per_label.csv", f"run `python main.py --evaluate --checkpoint {run_dir}` "
                                                    f"first, which writes it.") / "per_label.csv"
    rows = _read_csv(path, PER_LABEL_COLUMNS, "per-label report")
    result = {"labels": [row["label"] for row in rows], "train_frequency": _column(rows, "train_frequency", path),
              "f1": _column(rows, "f1", path)}
    if bool(torch.isnan(result["train_frequency"]).any()) or bool((result["train_frequency"] < 0).any()):
        raise AnalysisError(f"'{path}': every train_frequency must be a count >= 0.")
    return result


def frequency_bins(train_frequency: Tensor, f1: Tensor) -> dict[str, Tensor]:
    """F1 grouped by training frequency in powers of two.

    Bin 0 holds labels with frequency 0, bin k >= 1 holds ``2^(k-1) <= n < 2^k``, i.e. ``k = floor(log2 n) + 1``.
    Per non-empty bin: ``low``, ``high`` (inclusive frequency range), ``labels`` (how many),
    ``mean_f1 = sum F1 / labels`` and ``zero_f1 = #{F1 = 0} / labels`` (the fraction of labels never right).
    Labels whose F1 is NaN are left out. Returns (K,) tensors for the K non-empty bins.
    """
    keep = ~torch.isnan(f1)  # (C,)
    n, f1 = train_frequency[keep].to(torch.float64), f1[keep].to(torch.float64)
    bins = torch.where(n >= 1, torch.floor(torch.log2(n.clamp(min=1))) + 1, torch.zeros_like(n)).long()  # (C,)
    size = int(bins.max()) + 1 if bins.numel() else 1
    labels = torch.bincount(bins, minlength=size)  # (size,)
    f1_sum = torch.bincount(bins, weights=f1, minlength=size)  # (size,)
    zero = torch.bincount(bins, weights=(f1 == 0).to(torch.float64), minlength=size)  # (size,)
    present = torch.nonzero(labels).squeeze(1)  # (K,)
    k = present.to(torch.float64)
    low = torch.where(k == 0, 0.0, 2.0 ** (k - 1))  # (K,)
    high = torch.where(k == 0, 0.0, 2.0 ** k - 1)  # (K,)
    count = labels[present]
    return {"low": low, "high": high, "labels": count, "mean_f1": f1_sum[present] / count,
            "zero_f1": zero[present] / count}


# --------------------------------------------------------------------------------------------------------------
# Drawing (results of the functions above -> PNG bytes)
# --------------------------------------------------------------------------------------------------------------

def _figure(width: float, height: float, rows: int = 1, columns: int = 1):
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot alone

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _pretty(name: str) -> str:
    return name.replace("gamma", "γ").replace("γ-", "γ−")


GRADIENT_NOTE = {
    False: "dL/dx by autograd through losses.py with detach_focusing=False: the exact derivative of the written loss "
           "(training detaches the focusing weights by default)",
    True: "dL/dx by autograd through losses.py with detach_focusing=True: the gradient training applies "
          "(focusing weights treated as constants)",
}


def draw_gradients(curves: dict[str, Any], margin: float, detach_focusing: bool = False) -> bytes:
    """Two panels (positive, negative label) of dL/dx against p, one line per loss; PNG bytes."""
    fig, axes = _figure(11.5, 4.8, 1, 2)
    p = curves["p"].numpy()
    for ax, key, title in ((axes[0, 0], "positive", "positive label (y = 1)"),
                           (axes[0, 1], "negative", "negative label (y = 0)")):
        for name, grad in curves[key].items():
            # BCE wide and pale underneath, so that ASL with gamma+ = 0 (identical for positives) stays visible.
            style = (dict(linewidth=3.5, alpha=0.5) if name == "BCE" else
                     dict(linewidth=1.8, linestyle="--") if name.startswith("focal") else
                     dict(linewidth=1.8, linestyle="-."))
            ax.plot(p, grad.numpy(), label=_pretty(name), **style)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_xlim(0, 1)
        ax.set_xlabel("p = σ(x)")
        ax.set_ylabel("dL/dx")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if margin > 0:
        axes[0, 1].axvspan(0, margin, color="tab:red", alpha=0.12, label=f"ASL: p ≤ m = {_fmt(margin)}, zero gradient")
    axes[0, 0].legend(loc="lower right", fontsize=9)
    axes[0, 1].legend(loc="upper left", fontsize=9)
    fig.suptitle("Gradient of each loss w.r.t. the logit\n" + GRADIENT_NOTE[detach_focusing], fontsize=10)
    return _png(fig)


def draw_labels(stats: dict, name: str, top: int) -> bytes:
    """Sorted label frequencies (log y, the ``top`` most common and rarest named) and the labels-per-image histogram."""
    import numpy as np

    fig, axes = _figure(13, 5, 1, 2)
    ax = axes[0, 0]
    order = stats["order"]
    counts = stats["counts"][order].numpy()  # (C,) decreasing
    vocabulary = stats["vocabulary"]
    C = len(counts)
    top = min(top, C)
    ranks = np.arange(1, C + 1)
    colours = np.full(C, "tab:blue", dtype=object)
    colours[:top], colours[C - top:] = "tab:green", "tab:red"
    # Labels that never occur (count 0) cannot sit on a log axis; they are drawn at 0.5 and said so.
    shown = np.where(counts > 0, counts, 0.5)
    ax.bar(ranks, shown, width=1.0, color=list(colours), linewidth=0)
    ax.set_yscale("log")
    ax.set_xlim(0.5, C + 0.5)
    ax.set_xlabel(f"label rank (1 = most common, {C} labels)")
    ax.set_ylabel("images with the label")
    absent = int((counts == 0).sum())
    ax.set_title(f"Label frequency, {name} ({stats['split']}, {len(stats['labels_per_image'])} images)"
                 + (f"; {absent} labels never occur (drawn at 0.5)" if absent else ""))
    common = "\n".join(f"{vocabulary[j]}: {int(stats['counts'][j])}" for j in order[:top].tolist())
    rare = "\n".join(f"{vocabulary[j]}: {int(stats['counts'][j])}" for j in order[C - top:].tolist())
    box = dict(boxstyle="round", facecolor="white", alpha=0.85)
    # Both boxes in the top right, where a long-tailed (decreasing) distribution leaves the axes empty.
    ax.text(0.70, 0.97, f"most common\n{common}", transform=ax.transAxes, ha="right", va="top", fontsize=9,
            color="tab:green", bbox=box)
    ax.text(0.98, 0.97, f"rarest\n{rare}", transform=ax.transAxes, ha="right", va="top", fontsize=9,
            color="tab:red", bbox=box)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[0, 1]
    histogram = stats["histogram"].numpy()
    k = np.arange(len(histogram))
    ax.bar(k, histogram, width=0.8, color="tab:blue")
    for kk, v in zip(k, histogram):
        if v:
            ax.text(kk, v, str(int(v)), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(k)
    mean = stats["labels_per_image"].double().mean().item()
    ax.set_xlabel("labels per image")
    ax.set_ylabel("images")
    ax.set_title(f"Labels per image (mean {mean:.2f})")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Folder names, or full paths where two runs share a name."""
    names = [Path(r).name for r in run_dirs]
    return [str(r) if names.count(n) > 1 else n for r, n in zip(run_dirs, names)]


# How the training and validation series differ, besides a run's colour: line style and marker (filled, hollow).
SERIES = {"train": dict(linestyle="-", marker="o"), "val": dict(linestyle="--", marker="s", markerfacecolor="white")}


def draw_curves(logs: dict[str, dict[str, Tensor]]) -> bytes:
    """PNG bytes of `curves_figure`."""
    return _png(curves_figure(logs))


def curves_figure(logs: dict[str, dict[str, Tensor]]):
    """Four panels against epoch: train/val loss, val per-class F1, val N+ and val mAP; one colour per run, train
    and validation told apart by line style and marker, integer epoch ticks for any run length."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(12, 8, 2, 2)
    panels = ((axes[0, 0], "loss per image"), (axes[0, 1], "val per-class F1 at 0.5"),
              (axes[1, 0], "val N+ (labels recalled at least once, at 0.5)"), (axes[1, 1], "val mAP (%)"))
    last = 1
    for i, (run, log) in enumerate(logs.items()):
        epoch = log["epoch"].numpy()
        last = max(last, int(epoch.max()))
        style = dict(color=f"C{i % 10}", markersize=4 if len(epoch) < 30 else 0)
        axes[0, 0].plot(epoch, log["train/loss"].numpy(), **style, **SERIES["train"])
        axes[0, 0].plot(epoch, log["val/loss"].numpy(), **style, **SERIES["val"])
        for ax, key in ((axes[0, 1], "val/per_class/f1"), (axes[1, 0], "val/N+"), (axes[1, 1], "val/mAP")):
            ax.plot(epoch, log[key].numpy(), **style, **SERIES["val"])
    for ax, title in panels:
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last + 0.5)  # whole epochs, also for a run of one or two
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    axes[1, 0].yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=3, label=run) for i, run in enumerate(logs)]
    handles += [Line2D([], [], color="black", label=name, **SERIES[name]) for name in ("train", "val")]
    axes[0, 0].legend(handles=handles, fontsize=8, loc="best")
    return fig


def draw_per_label(results: dict[str, dict[str, Any]], bins: dict[str, dict[str, Tensor]]) -> bytes:
    """Per-label F1 against training frequency (symlog x: 0 stays visible), binned mean F1 per run."""
    fig, axes = _figure(10, 5.5)
    ax = axes[0, 0]
    for i, (run, result) in enumerate(results.items()):
        colour = f"C{i % 10}"
        ax.scatter(result["train_frequency"].numpy(), result["f1"].numpy(), s=14, alpha=0.45, color=colour,
                   linewidths=0, label=f"{run}: one dot per label")
        b = bins[run]
        # Bin centres: the geometric middle of [low, high] (0 for the zero-frequency bin).
        centre = torch.sqrt(b["low"] * b["high"]).numpy()
        ax.plot(centre, b["mean_f1"].numpy(), color=colour, linewidth=2, marker="s",
                label=f"{run}: mean F1 per frequency bin (powers of 2)")
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    largest = max(float(torch.cat([r["train_frequency"], bins[run]["high"]]).max()) for run, r in results.items())
    ax.set_xlim(-0.3, max(largest, 1.0) * 1.4)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("training frequency of the label (images; symlog: 0 and 1 linear, log above)")
    ax.set_ylabel("test F1 (fitted thresholds)")
    ax.set_title("Per-label test F1 against training frequency (where do rare labels fail?)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


# --------------------------------------------------------------------------------------------------------------
# Files and the command line
# --------------------------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value + 0.0:.6g}"  # + 0.0 turns -0.0 into 0
    return str(value)


def csv_text(columns: dict[str, Sequence[Any]], comment: str | None = None) -> str:
    """CSV text with one column per entry of ``columns`` (equal lengths); ``comment`` becomes a leading '# ' line."""
    buffer = io.StringIO()
    if comment:
        buffer.write(f"# {comment}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(columns))
    for row in zip(*columns.values()):
        writer.writerow([_cell(v) for v in row])
    return buffer.getvalue()


def label_table_markdown(stats: dict) -> str:
    """The study's "class name | count" table, most common label first."""
    lines = ["| class name | count |", "|---|---|"]
    lines += [f"| {stats['vocabulary'][j]} | {int(stats['counts'][j])} |" for j in stats["order"].tolist()]
    return "\n".join(lines) + "\n"


def run_gradients(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    losses = gradient_losses(args.gamma, args.gamma_pos, args.gamma_neg, args.margin, args.detach_focusing)
    curves = loss_gradients(losses, probability_grid(args.points))
    for key in ("positive", "negative"):
        for name, grad in curves[key].items():
            if not bool(torch.isfinite(grad).all()):
                raise AnalysisError(f"The {key}-label gradient of {name} is not finite at some p (NaN/inf from the "
                                    f"loss's backward); focusing exponents between 0 and 1 can do this, use 0 or >= 1.")
    asl = next(loss for loss in losses.values() if hasattr(loss, "margin"))
    columns = {"p": curves["p"].tolist(), "x": curves["x"].tolist()}
    for key in ("positive", "negative"):
        columns.update({f"{name} | {key}": grad.tolist() for name, grad in curves[key].items()})
    paths = {"png": out / "gradients.png", "csv": out / "gradients.csv"}
    atomic_write_text(paths["csv"], csv_text(columns, GRADIENT_NOTE[args.detach_focusing]))
    atomic_write_bytes(paths["png"], draw_gradients(curves, asl.margin, args.detach_focusing))
    return paths


def run_labels(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    if args.top < 1:
        raise AnalysisError(f"--top must be at least 1 (got {args.top}).")
    stats = load_label_statistics(args.data, args.split)
    name = dataset_tag(str(stats["root"]))
    stem = f"labels_{name}_{args.split}"
    order = stats["order"]
    frequency = {"rank": list(range(1, len(order) + 1)), "label": [stats["vocabulary"][j] for j in order.tolist()],
                 "count": stats["counts"][order].tolist(),
                 "fraction_of_images": (stats["counts"][order].double() / len(stats["labels_per_image"])).tolist()}
    histogram = {"labels_per_image": list(range(len(stats["histogram"]))), "images": stats["histogram"].tolist()}
    paths = {"png": out / f"{stem}.png", "csv": out / f"{stem}.csv",
             "per_image_csv": out / f"{stem}_per_image.csv", "markdown": out / f"{stem}.md"}
    atomic_write_text(paths["csv"], csv_text(frequency))
    atomic_write_text(paths["per_image_csv"], csv_text(histogram))
    atomic_write_text(paths["markdown"], label_table_markdown(stats))
    atomic_write_bytes(paths["png"], draw_labels(stats, name, args.top))
    return paths


def run_curves(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    names = _run_names([Path(r) for r in args.run_dirs])
    logs = {name: read_log(r) for name, r in zip(names, args.run_dirs)}
    columns: dict[str, list] = {"run": [], "epoch": []}
    columns.update({c: [] for c in CURVE_COLUMNS})
    for name, log in logs.items():
        columns["run"] += [name] * len(log["epoch"])
        columns["epoch"] += [int(e) for e in log["epoch"].tolist()]
        for c in CURVE_COLUMNS:
            columns[c] += log[c].tolist()
    paths = {"png": out / "curves.png", "csv": out / "curves.csv"}
    atomic_write_text(paths["csv"], csv_text(columns))
    atomic_write_bytes(paths["png"], draw_curves(logs))
    return paths


def run_per_label(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    names = _run_names([Path(r) for r in args.run_dirs])
    results = {name: read_per_label(r) for name, r in zip(names, args.run_dirs)}
    bins = {name: frequency_bins(r["train_frequency"], r["f1"]) for name, r in results.items()}
    labels: dict[str, list] = {"run": [], "label": [], "train_frequency": [], "f1": []}
    table: dict[str, list] = {"run": [], "frequency_low": [], "frequency_high": [], "labels": [], "mean_f1": [],
                              "fraction_f1_zero": []}
    for name, result in results.items():
        order = torch.argsort(result["train_frequency"], stable=True)  # (C,) rarest first
        labels["run"] += [name] * len(order)
        labels["label"] += [result["labels"][j] for j in order.tolist()]
        labels["train_frequency"] += result["train_frequency"][order].long().tolist()
        labels["f1"] += result["f1"][order].tolist()
        b = bins[name]
        table["run"] += [name] * len(b["labels"])
        table["frequency_low"] += [int(v) for v in b["low"].tolist()]
        table["frequency_high"] += [int(v) for v in b["high"].tolist()]
        table["labels"] += b["labels"].tolist()
        table["mean_f1"] += b["mean_f1"].tolist()
        table["fraction_f1_zero"] += b["zero_f1"].tolist()
    paths = {"png": out / "per_label.png", "csv": out / "per_label_f1.csv", "bins_csv": out / "per_label_bins.csv"}
    atomic_write_text(paths["csv"], csv_text(labels))
    atomic_write_text(paths["bins_csv"], csv_text(table))
    atomic_write_bytes(paths["png"], draw_per_label(results, bins))
    return paths


RUNNERS = {"gradients": run_gradients, "labels": run_labels, "curves": run_curves, "per-label": run_per_label}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Plots of the study: loss gradients, label distribution, training curves, per-label results. "
                    "Each command writes a PNG and its data as CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--out", default=None, metavar="DIR",
                       help="output folder (default: <first RUN_DIR>/analysis/ for curves/per-label, runs/analysis/ "
                            "for gradients/labels)")
        return p

    p = add("gradients", "dL/dx against p for positive and negative labels: BCE, focal (gamma 2 and --gamma), ASL")
    p.add_argument("--gamma", type=float, default=None, help="focal loss gamma (default: FocalLoss's own, 3)")
    p.add_argument("--gamma-pos", type=float, default=None, help="ASL gamma+ (default: AsymmetricLoss's own, 0)")
    p.add_argument("--gamma-neg", type=float, default=None, help="ASL gamma- (default: AsymmetricLoss's own, 4)")
    p.add_argument("--margin", type=float, default=None, help="ASL probability margin m (default: 0.05)")
    p.add_argument("--points", type=int, default=999, help="number of p values in (0, 1)")
    p.add_argument("--detach-focusing", action="store_true",
                   help="plot the gradient training applies (focusing weights detached) instead of the exact "
                        "derivative of the written loss")

    p = add("labels", "label frequency (sorted, log scale) and labels-per-image histogram; 'class name | count' table")
    p.add_argument("--data", required=True,
                   help="dataset name (Corel-5k, ESP-Game, IAPR-TC-12), demo, or a folder with train.json/test.json")
    p.add_argument("--split", default="train", choices=["train", "test", "all"], help="annotations to count")
    p.add_argument("--top", type=int, default=8, help="how many most common and rarest labels to name")

    p = add("curves", "loss, per-class F1, N+ and mAP per epoch from the runs' log.csv, runs overlaid")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by main.py")

    p = add("per-label", "per-label test F1 against training frequency from per_label.csv (after --evaluate)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated run directories")
    return parser


def default_out(args: argparse.Namespace) -> Path:
    """Where a command writes when --out is not given."""
    if args.out is not None:
        return Path(args.out)
    if args.what in ("curves", "per-label"):
        return Path(args.run_dirs[0]) / "analysis"
    return Path("runs") / "analysis"  # no run to write into: beside the runs (ignored by git), not the current folder


def main(args: argparse.Namespace) -> dict[str, Path]:
    """Run the command ``args.what``; returns ``{kind: path}`` of the files written."""
    paths = RUNNERS[args.what](args, default_out(args))
    for path in paths.values():
        print(f"wrote {path}", flush=True)
    return paths


def cli(argv: Sequence[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    startup.started()
    cli()
