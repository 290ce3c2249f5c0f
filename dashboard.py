"""TensorBoard events of a run, to watch training live and overlay runs: `tensorboard --logdir runs`.

Training writes, per epoch, every number of its log.csv row (training loss, learning rate, every validation metric,
images/s, seconds) as a scalar at step = epoch, into <run>/tensorboard/ (rank 0 only; --no-tensorboard turns it off).
A resumed run first drops the events of the epochs it trains again, as log.csv does. --evaluate adds, at step = the
best epoch: the test metrics, the per-label table (training images, test images, threshold, precision, recall, F1)
as text, and the precision-recall curves of the most frequent test labels.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

EVENTS_DIR = "tensorboard"
PR_CURVE_LABELS = 6  # the most frequent test labels get a precision-recall curve


def writer(run_dir: Path, purge_step: int | None = None):
    """A SummaryWriter into <run>/tensorboard/; `purge_step` drops the events at and after that step (a resume)."""
    from torch.utils.tensorboard import SummaryWriter  # tensorboard: only where a run writes events

    return SummaryWriter(log_dir=str(Path(run_dir) / EVENTS_DIR), purge_step=purge_step)


class TrainingEvents:
    """The per-epoch scalars of a training run; a no-op when `enabled` is False (--no-tensorboard, ranks > 0). The
    events file is opened at the first epoch's end, so a run that fails before it leaves no tensorboard/ folder."""

    def __init__(self, run_dir: Path, enabled: bool, first_epoch: int = 1):
        self.run_dir, self.enabled, self.first_epoch, self.events = run_dir, enabled, first_epoch, None

    def epoch(self, row: dict) -> None:
        """Every finite number of a log.csv row but the epoch, at step = row["epoch"]."""
        if not self.enabled:
            return
        if self.events is None:  # a resumed run (first_epoch > 1) drops its events from that epoch on
            self.events = writer(self.run_dir, purge_step=self.first_epoch if self.first_epoch > 1 else None)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.events.add_scalar(key, value, global_step=row["epoch"])
        self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def per_label_markdown(vocabulary: list[str], table: dict[str, list]) -> str:
    """The per-label table as markdown (TensorBoard's text tab renders it), most frequent test label first."""
    order = sorted(range(len(vocabulary)), key=lambda j: -table["test_frequency"][j])
    lines = ["| label | train | test | threshold | precision | recall | F1 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {vocabulary[j]} | {table['train_frequency'][j]} | {table['test_frequency'][j]} | "
              f"{table['threshold'][j]:.2f} | {table['precision'][j]:.3f} | {table['recall'][j]:.3f} | "
              f"{table['f1'][j]:.3f} |" for j in order]
    return "\n".join(lines)


def write_evaluation(run_dir: Path, step: int, results: dict, vocabulary: list[str], table: dict[str, list],
                     test: dict) -> None:
    """--evaluate's events: test metrics (0.5 and fitted thresholds), the per-label table, PR curves (B = test
    images: `test["targets"]`, `test["probs"]` (B, C))."""
    events = writer(run_dir)
    for block in ("default", "mcc"):
        for key, value in results[block].items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                events.add_scalar(f"test_{block}/{key}", value, global_step=step)
    events.add_text("per-label", per_label_markdown(vocabulary, table), global_step=step)
    counts = test["targets"].sum(0)  # (C,)
    for j in torch.argsort(-counts, stable=True)[:PR_CURVE_LABELS].tolist():
        if counts[j] > 0:
            events.add_pr_curve(f"pr/{vocabulary[j]}", test["targets"][:, j].int(), test["probs"][:, j].float(),
                                global_step=step)
    events.close()
