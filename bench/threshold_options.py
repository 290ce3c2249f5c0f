"""Which per-label thresholds generalise to rare labels: every --threshold-* option on the same trained models.

    python bench/threshold_options.py                       # 5 seeds, TinyResNet, ASL, 12 epochs, 64 px (about 18 minutes a seed)
    python bench/threshold_options.py --seeds 0 --epochs 4  # a quick look

On bench/longtail.py's benchmark (Corel-5k's label sets, 4,000 training + 500 validation + 499 test images), each
seed trains one model; each option is one --evaluate of that model (cv trains its 5 fold models once per seed). The
table gives each figure's mean and standard deviation over the seeds; bench/results_thresholds.json holds every run,
and a seed already measured there with the same settings is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from longtail import generate  # noqa: E402

VAL = ["--threshold-split", "val"]
OPTIONS = {  # name -> --evaluate flags; the split is always explicit (a run stores the default it was trained under)
    "val (0.5 row)": VAL,
    "val": VAL,
    "train": ["--threshold-split", "train"],
    "train+val": ["--threshold-split", "train+val"],
    "val, min-positives 5": [*VAL, "--threshold-min-positives", "5"],
    "val, shrinkage 5": [*VAL, "--threshold-shrinkage", "5"],
    "train+val, shrinkage 5": ["--threshold-split", "train+val", "--threshold-shrinkage", "5"],
    "cv (5 folds)": ["--threshold-split", "cv", "--folds", "5"],
    "cv, shrinkage 5": ["--threshold-split", "cv", "--folds", "5", "--threshold-shrinkage", "5"],
}
FIGURES = ("per_class/f1", "N+", "N+/precision", "per_image/precision", "per_image/recall", "per_image/f1", "mAP")


def main_py(*argv: str) -> None:
    subprocess.run([sys.executable, str(REPO / "main.py"), *argv], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def trained(run: Path, epochs: int) -> bool:
    """True when `run` finished all `epochs` (log.csv has a header and one row per epoch)."""
    log = run / "log.csv"
    return (run / "best.pth").is_file() and log.is_file() and len(log.read_text().splitlines()) == epochs + 1


def study(seed: int, data: Path, save: Path, epochs: int) -> dict:
    name = f"seed{seed}"
    run = save / f"TinyResNet_AsymmetricLoss_{data.name}_{name}"
    if not trained(run, epochs):  # a finished seed is reused; cv reuses its finished folds by itself
        main_py("--data", str(data), "--model", "TinyResNet", "--no-pretrained", "--image-size", "64", "--epochs",
                str(epochs), "--batch-size", "32", "--learning-rate", "3e-3", "--loss-function", "AsymmetricLoss",
                "--seed", str(seed), "--save-dir", str(save), "--run-name", name, "--no-progress")
    rows = {}
    for option, flags in OPTIONS.items():
        start = time.perf_counter()
        main_py("--evaluate", "--checkpoint", str(run), "--no-progress", *flags)
        results = json.loads((run / "results.json").read_text())
        block = results["default"] if option.endswith("(0.5 row)") else results["mcc"]
        rows[option] = {**{k: block[k] for k in FIGURES}, "seconds": time.perf_counter() - start}
        print(f"seed {seed} {option}: " + ", ".join(f"{k} {rows[option][k]:.4g}" for k in FIGURES), flush=True)
    return rows


def settings(args) -> dict:
    """The run's settings as saved: paths relative to the repository, so the file means the same on any clone."""
    return {**vars(args), **{k: os.path.relpath(Path(getattr(args, k)).resolve(), REPO) for k in ("work", "shared")}}


def previous_runs(args) -> dict:
    """Seeds already measured with the same settings in bench/results_thresholds.json and every option: reused."""
    path = BENCH / "results_thresholds.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    same = all(saved["settings"].get(k) == settings(args)[k] for k in ("epochs", "work", "shared"))
    return {seed: rows for seed, rows in saved["runs"].items() if same and set(OPTIONS) <= set(rows)}


def table(runs: dict) -> str:
    lines = ["| thresholds fitted on | per-class F1 | N+ | P of N+ | per-image P | per-image R | per-image F1 | mAP |",
             "|---|---|---|---|---|---|---|---|"]
    for option in OPTIONS:
        cells = []
        for figure in FIGURES:
            values = [runs[seed][option][figure] for seed in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}" if figure in ("N+", "mAP")
                         else f"{statistics.mean(values):.3f} ± {sd:.3f}")
        lines.append(f"| {option.replace(' (0.5 row)', ': none (0.5)')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--work", default=str(REPO / "runs" / "thresholds"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets" / "Corel-5k"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    data = work / "longtail"
    earlier = previous_runs(args)
    if not (data / "test.json").is_file():
        generate(data, Path(args.shared))
    runs = {seed: earlier.get(str(seed)) or study(seed, data, work / "runs", args.epochs) for seed in args.seeds}
    print(table(runs))
    (BENCH / "results_thresholds.json").write_text(json.dumps({"settings": settings(args), "runs": runs}, indent=2))
    return runs


if __name__ == "__main__":
    main()
