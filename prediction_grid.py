"""predictions.png: a grid of test images, each with its truth and its predictions marked, read at a glance.

Under each image (tops aligned in a row): its name, its true labels, then two columns, the predictions at 0.5 and with
the fitted thresholds, highest score first: right labels green with a check mark, wrong ones red with a cross, true
labels that were not predicted grey with a circle. Colour and mark both carry the verdict, so the figure also reads in
greyscale. Each list is cut to LINES lines and says "+N more".
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset import BadImageError, to_rgb

COLOURS = {"right": "#1a7f37", "wrong": "#cf222e", "missed": "#6e7781"}
MARKS = {"right": "✓", "wrong": "✗", "missed": "○"}
LINES = 5  # label lines per column before "+N more"
TRUTH_CHARACTERS = 44  # the truth line is cut to this and says "+N more"


def label_marks(scores: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor,
                vocabulary: list[str]) -> list[tuple[str, str]]:
    """(label, "right" | "wrong") for each predicted label, highest score first, then (label, "missed") for each true
    label not predicted, in vocabulary order. `scores` (C,), `predicted` (C,) bool, `truth` (C,)."""
    chosen = sorted(predicted.nonzero().flatten().tolist(), key=lambda j: -float(scores[j]))
    missed = (truth.bool() & ~predicted).nonzero().flatten().tolist()
    return ([(vocabulary[j], "right" if truth[j] else "wrong") for j in chosen]
            + [(vocabulary[j], "missed") for j in missed])


def marks_text(marks: list[tuple[str, str]]) -> str:
    """The marks in one line of text: 'b ✓, c ✗; missed: a' ('-' when nothing is predicted)."""
    shown = ", ".join(f"{label} {MARKS[status]}" for label, status in marks if status != "missed")
    missed = [label for label, status in marks if status == "missed"]
    return (shown or "-") + (f"; missed: {', '.join(missed)}" if missed else "")


def column_lines(marks: list[tuple[str, str]], lines: int = LINES) -> list[tuple[str, str]]:
    """(text, colour) of one column: each mark on its line, at most `lines` of them, then '+N more' with the verdicts
    of those N counted (black)."""
    shown = [(f"{MARKS[status]} {label}", COLOURS[status]) for label, status in marks[:lines]]
    rest = [status for _, status in marks[lines:]]
    if rest:
        counts = ", ".join(f"{rest.count(s)} {MARKS[s]}" for s in ("right", "wrong", "missed") if s in rest)
        shown.append((f"+{len(rest)} more: {counts}", "black"))
    return shown or [("-", "black")]


def cut(words: list[str], characters: int = TRUTH_CHARACTERS) -> str:
    """The words joined by commas, as many as fit in `characters`, then '+N more'."""
    text, kept = "", 0
    for word in words:
        candidate = f"{text}, {word}" if text else word
        if len(candidate) > characters and kept:
            break
        text, kept = candidate, kept + 1
    return (text or "-") + (f" +{len(words) - kept} more" if kept < len(words) else "")


def display_image(path: Path, longest_side: int = 320):
    """The image as an RGB uint8 array (H, W, 3) at its own aspect ratio, for figures."""
    try:
        with Image.open(path) as im:
            im = to_rgb(im)
            im.thumbnail((longest_side, longest_side))
            return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"Image '{path}' cannot be read ({type(e).__name__}: {e}).") from None


def _draw_text(ax, panel: dict, method: str) -> None:
    """The text block of one panel into `ax` (axes coordinates, top down)."""
    ax.axis("off")
    ax.text(0, 1, panel["name"], fontsize=8, fontweight="bold", va="top", transform=ax.transAxes)
    ax.text(0, 0.86, "truth: " + cut(panel["truth_labels"]), fontsize=7.5, va="top", transform=ax.transAxes)
    if not panel["readable"]:
        ax.text(0, 0.7, "unreadable: skipped (--skip-bad-images)", fontsize=7.5, color=COLOURS["wrong"], va="top",
                transform=ax.transAxes)
        return
    for x, title, key in ((0, "at 0.5", "at_half_marks"), (0.52, f"{method.upper()} thresholds", "fitted_marks")):
        ax.text(x, 0.71, title, fontsize=7.5, fontstyle="italic", va="top", transform=ax.transAxes)
        for row, (text, colour) in enumerate(column_lines(panel[key])):  # at most LINES + 1 lines, all inside ax
            ax.text(x, 0.58 - 0.105 * row, text, fontsize=7.5, color=colour, va="top", transform=ax.transAxes)


def grid_figure(panels: list[dict], method: str = "mcc", columns: int = 4):
    """A matplotlib Figure of the panels (`report.figure_panels`): image on top, anchored to the top of its cell,
    the text block under it."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot alone

    rows = max(math.ceil(len(panels) / columns), 1)
    fig = Figure(figsize=(3.6 * columns, 4.4 * rows + 0.4))
    grid = fig.add_gridspec(2 * rows, columns, height_ratios=[2.5, 1.9] * rows, hspace=0.12, wspace=0.08,
                            left=0.02, right=0.98, top=1 - 0.4 / fig.get_figheight(), bottom=0.01)
    for i, panel in enumerate(panels):
        r, c = divmod(i, columns)
        image_ax, text_ax = fig.add_subplot(grid[2 * r, c]), fig.add_subplot(grid[2 * r + 1, c])
        image_ax.axis("off")
        image_ax.set_anchor("N")  # tops aligned in a row; the text blocks, axes of their own, start level too
        if panel["readable"]:
            image_ax.imshow(display_image(panel["path"]))
        _draw_text(text_ax, panel, method)
    fig.suptitle("✓ right (green)   ✗ wrong (red)   ○ true label not predicted (grey)", fontsize=9)
    return fig


def predictions_figure(panels: list[dict], method: str = "mcc", columns: int = 4) -> bytes:
    """PNG bytes of `grid_figure`."""
    buffer = io.BytesIO()
    grid_figure(panels, method, columns).savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()
