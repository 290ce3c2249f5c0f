"""The study's results section in one command: its four experiments, trained and evaluated, beside its published
figures, with the seed-to-seed spread, and the same rows under this repository's honest default recipe.

    python reproduce.py --data Corel-5k                     # BCE, focal, ASL (TResNet-m, 448 px), LSEP (ResNeXt50, 224)
    python reproduce.py --data Corel-5k --seeds 3           # every experiment with seeds 1, 2, 3
    python reproduce.py --data Corel-5k --only ASL LSEP     # some rows
    python reproduce.py --data Corel-5k --gpus 4            # each training on 4 GPUs through torchrun
    python reproduce.py --data Corel-5k --dry-run           # the commands, nothing run
    python reproduce.py --quick                             # the same rows on the demo, TinyResNet, 1 epoch (CI)

Also from Spyder: `run reproduce.py --quick`. Every experiment is an ordinary run directory under <out>/runs, trained
by main.py (`--recipe study` or `--recipe default`, the study's backbone, image size and loss per row) and evaluated by
main.py --evaluate. A finished run is reused, an interrupted one resumed (Ctrl-C stops the command in flight, which
saves where it stands; the same command continues), so the whole section survives a day of GPU time in pieces. The
table, <out>/results.md and <out>/results.json, gives per row the published figure, the measured mean ± sd over the
seeds and the difference, with the epoch time and the device.
"""
from __future__ import annotations

import startup

if __name__ == "__main__":
    startup.guard()  # a Ctrl-C while torch loads: one line, not a traceback

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from utils import ArgumentParser, DefaultsHelpFormatter, Interrupted, UserError, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parent
METRICS = (("per_image/precision", "per-image P"), ("per_image/recall", "per-image R"),
           ("per_image/f1", "per-image F1"), ("per_class/precision", "per-class P"),
           ("per_class/recall", "per-class R"), ("per_class/f1", "per-class F1"), ("N+", "N+"))


@dataclass(frozen=True)
class Row:
    """One experiment of the study's README: its loss, backbone and size, and its published test figures
    ({"default": at 0.5, "mcc": with MCC thresholds}, results.json's keys) and epoch time (seconds)."""

    loss: str
    model: str
    image_size: int
    published: dict = field(default_factory=dict)
    epoch_seconds: float | None = None


# The study's README (parham1998/CNN_Image_Annotaion, "Loss Functions & Thresholding"), test set, best model per loss.
ROWS = {
    "BCE": Row("BCELoss", "TResNet", 448, {
        "default": {"per_image/precision": 0.726, "per_image/recall": 0.589, "per_image/f1": 0.650,
                    "per_class/precision": 0.453, "per_class/recall": 0.385, "per_class/f1": 0.416, "N+": 147},
        "mcc": {"per_class/precision": 0.445, "per_class/recall": 0.451, "per_class/f1": 0.448, "N+": 164}}, 135),
    "Focal": Row("FocalLoss", "TResNet", 448, {
        "default": {"per_image/precision": 0.758, "per_image/recall": 0.581, "per_image/f1": 0.658,
                    "per_class/precision": 0.452, "per_class/recall": 0.366, "per_class/f1": 0.405, "N+": 139},
        "mcc": {"per_class/precision": 0.483, "per_class/recall": 0.451, "per_class/f1": 0.466, "N+": 162}}, 135),
    "ASL": Row("AsymmetricLoss", "TResNet", 448, {
        "default": {"per_image/precision": 0.624, "per_image/recall": 0.688, "per_image/f1": 0.654,
                    "per_class/precision": 0.480, "per_class/recall": 0.522, "per_class/f1": 0.500, "N+": 179},
        "mcc": {"per_class/precision": 0.473, "per_class/recall": 0.535, "per_class/f1": 0.502, "N+": 184}}, 141),
    "LSEP": Row("LSEPLoss", "ResNeXt50", 224, {
        "default": {"per_image/precision": 0.490, "per_image/recall": 0.720, "per_image/f1": 0.583,
                    "per_class/precision": 0.403, "per_class/recall": 0.548, "per_class/f1": 0.464, "N+": 188}}, 45),
}
# --quick: every row on the built-in demo with TinyResNet from scratch, small and short, so CI runs the command.
QUICK = ["--data", "demo", "--model", "TinyResNet", "--no-pretrained", "--image-size", "32", "--epochs", "1",
         "--batch-size", "32", "--learning-rate", "3e-3"]


@dataclass(frozen=True)
class Experiment:
    """One run of the section: a row under a recipe with a seed."""

    row: str
    recipe: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.row}_{self.recipe}_seed{self.seed}"


def plan(rows: list[str], recipes: list[str], seeds: int) -> list[Experiment]:
    """Every (recipe, row, seed), the study's recipe first; seeds 1, 2, ... (the study's seed is 1)."""
    return [Experiment(row, recipe, seed) for recipe in recipes for row in rows for seed in range(1, seeds + 1)]


def model_of(experiment: Experiment, quick: bool) -> tuple[str, int]:
    row = ROWS[experiment.row]
    return ("TinyResNet", 32) if quick else (row.model, row.image_size)


def run_dir_of(experiment: Experiment, out: Path, data: str, quick: bool) -> Path:
    from runs import run_dir_name

    model, _ = model_of(experiment, quick)
    return out / "runs" / run_dir_name(model, ROWS[experiment.row].loss, "demo" if quick else data, experiment.name)


def train_argv(experiment: Experiment, out: Path, data: str, quick: bool) -> list[str]:
    """main.py's flags of the experiment's training: the recipe, the row's loss, backbone and size, the seed."""
    model, size = model_of(experiment, quick)
    where = QUICK if quick else ["--data", data, "--model", model, "--image-size", str(size)]
    return [*where, "--recipe", experiment.recipe, "--loss-function", ROWS[experiment.row].loss, "--seed",
            str(experiment.seed), "--save-dir", str(out / "runs"), "--run-name", experiment.name, "--no-progress"]


def stage(run_dir: Path) -> str:
    """How far an experiment got: done (evaluated), evaluate (trained), resume (interrupted), train (not begun)."""
    if (run_dir / "results.json").is_file() and (run_dir / "thresholds.json").is_file():
        return "done"
    try:
        epochs = json.loads((run_dir / "config.json").read_text())["epochs"]
        logged = len((run_dir / "log.csv").read_text().splitlines()) - 1 if (run_dir / "log.csv").is_file() else 0
    except (OSError, ValueError, KeyError):
        return "train"
    if (run_dir / "best.pth").is_file() and logged >= epochs:
        return "evaluate"
    return "resume" if (run_dir / "last.pth").is_file() else "train"


def commands(experiment: Experiment, out: Path, data: str, quick: bool) -> list[list[str]]:
    """main.py's commands still to run for the experiment, by its stage."""
    run_dir = run_dir_of(experiment, out, data, quick)
    evaluate = ["--evaluate", "--checkpoint", str(run_dir), "--no-progress"]
    return {"done": [], "evaluate": [evaluate], "resume": [["--resume", str(run_dir), "--no-progress"], evaluate],
            "train": [train_argv(experiment, out, data, quick), evaluate]}[stage(run_dir)]


# ---------------------------------------------------------------- running: one process per command, resumable

def launch(argv: list[str], gpus: int, env: dict | None = None) -> tuple[int, bool]:
    """main.py with `argv` in a process of its own (under torchrun on `gpus` GPUs when more than one); its exit
    status, and whether a Ctrl-C reached this process meanwhile. A Ctrl-C reaches that process too: it saves where it
    stands and exits, and this waits for it (it may also have just finished: the section stops after it)."""
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
              if gpus > 1 else [sys.executable])
    process = subprocess.Popen([*prefix, str(REPO / "main.py"), *argv], cwd=REPO, env=env)
    interrupted = False
    while True:
        try:
            return process.wait(), interrupted
        except KeyboardInterrupt:
            interrupted = True  # the command got the same Ctrl-C: let it finish saving


def run_experiment(experiment: Experiment, out: Path, data: str, quick: bool, gpus: int, env=None,
                   stop: threading.Event | None = None) -> None:
    """The experiment's remaining commands; a run directory that never reached a checkpoint starts afresh. `stop`
    (set on Ctrl-C while experiments run side by side): start no further command."""
    run_dir = run_dir_of(experiment, out, data, quick)
    for argv in commands(experiment, out, data, quick):
        if stop is not None and stop.is_set():
            raise Interrupted(f"the section stopped before {experiment.name}'s next command; run the same command "
                              f"again to continue")
        if argv[:1] != ["--evaluate"] and argv[:1] != ["--resume"] and run_dir.exists():
            shutil.rmtree(run_dir)  # begun but never saved a checkpoint (stage "train"): nothing to keep
        print(f"[{experiment.name}] python main.py {' '.join(argv)}", flush=True)
        status, interrupted = launch(argv, gpus, env)
        if status == 130 or interrupted:
            raise Interrupted(f"the section stopped in {experiment.name}, whose run saved where it stood; run the "
                              f"same command again to continue")
        if status != 0:
            raise UserError(f"{experiment.name} failed (exit status {status}): python main.py {' '.join(argv)}; fix "
                            f"what it said and run the same command again (finished runs are reused)")


def run_section(experiments: list[Experiment], out: Path, data: str, quick: bool, gpus: int, parallel: int) -> None:
    """Every experiment: one after another, each on `gpus` GPUs, or `parallel` at a time, lane k on GPU k."""
    if parallel <= 1:
        for experiment in experiments:
            run_experiment(experiment, out, data, quick, gpus)
        return
    lanes = [experiments[k::parallel] for k in range(parallel)]
    env = [{**os.environ, "CUDA_VISIBLE_DEVICES": str(k)} for k in range(parallel)]
    stop = threading.Event()  # Ctrl-C: the lanes finish the command in flight (which saves) and start no other
    with ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(lambda lane, k: [run_experiment(e, out, data, quick, 1, env[k], stop) for e in lane],
                               lane, k) for k, lane in enumerate(lanes)]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            stop.set()
            raise


# ---------------------------------------------------------------- the table

def measured(experiments: list[Experiment], out: Path, data: str, quick: bool) -> dict:
    """{recipe: {row: {"seeds", "default"/"mcc": {metric: {"mean", "sd", "values"}}, "epoch_seconds"}}} from the
    runs' results.json and log.csv."""
    table: dict = {}
    for recipe in dict.fromkeys(e.recipe for e in experiments):
        for row in dict.fromkeys(e.row for e in experiments):
            runs = [run_dir_of(e, out, data, quick) for e in experiments if (e.recipe, e.row) == (recipe, row)]
            results = [json.loads((r / "results.json").read_text()) for r in runs]
            seconds = [float(line.split(",")[-1]) for r in runs for line in (r / "log.csv").read_text().splitlines()[1:]]
            entry = {"seeds": len(results), "epoch_seconds": statistics.mean(seconds)}
            for block in ("default", "mcc"):
                entry[block] = {key: _spread([r[block][key] for r in results]) for key, _ in METRICS}
            table.setdefault(recipe, {})[row] = entry
    return table


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _cell(value, key: str) -> str:
    return "" if value is None else f"{value:.0f}" if key == "N+" else f"{value:.3f}"


def markdown(table: dict, device: str, quick: bool) -> str:
    """results.md: per recipe and row, at 0.5 and with MCC thresholds, published / measured (mean ± sd) /
    difference, the study's columns, and the epoch time."""
    header = "| row | thresholds | | " + " | ".join(name for _, name in METRICS) + " | epoch |"
    lines = [f"Device: {device}." + (" --quick: the demo with TinyResNet at 32 px for 1 epoch; the published figures are "
                                     "Corel-5k's and NOT comparable." if quick else "")]
    for recipe, rows in table.items():
        lines += ["", f"## --recipe {recipe}", "", header, "|" + "---|" * (len(METRICS) + 4)]
        for row, entry in rows.items():
            published = ROWS[row].published
            for block, name in (("default", "0.5"), ("mcc", "MCC")):
                ours, theirs = entry[block], published.get(block, {})
                lines.append(f"| {row} | {name} | published | " + " | ".join(_cell(theirs.get(k), k) for k, _ in METRICS)
                             + f" | {ROWS[row].epoch_seconds:g} s |")
                lines.append(f"| | | measured ({entry['seeds']} seed{'s' * (entry['seeds'] > 1)}) | " + " | ".join(
                    f"{_cell(ours[k]['mean'], k)} ± {_cell(ours[k]['sd'], k)}" for k, _ in METRICS)
                    + f" | {entry['epoch_seconds']:.0f} s |")
                lines.append("| | | difference | " + " | ".join(
                    "" if theirs.get(k) is None else f"{ours[k]['mean'] - theirs[k]:+.3f}".replace("+0.000", "0")
                    if k != "N+" else f"{ours[k]['mean'] - theirs[k]:+.0f}" for k, _ in METRICS) + " | |")
    return "\n".join(lines) + "\n"


def device_name() -> str:
    import torch

    from cpu_precision import cpu_model

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({cpu_model()})"


# ---------------------------------------------------------------- command line

def get_args_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python reproduce.py", description=__doc__.split("\n\n")[0],
                            formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--data", default="Corel-5k", help="the dataset (Corel-5k for the study's figures)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per experiment: 1, 2, ... (the study's is 1)")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                        help=f"rows to run: {', '.join(ROWS)}")
    parser.add_argument("--recipes", nargs="+", choices=["study", "default"], default=["study", "default"],
                        help="the study's recipe, and this repository's default (its honest protocol's cost)")
    parser.add_argument("--out", default=None, help="where the runs and the table go (default: reproduce/, "
                                                    "reproduce/quick/ with --quick)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per training, through torchrun")
    parser.add_argument("--parallel", type=int, default=1,
                        help="experiments at once, experiment lane k on GPU k (instead of --gpus)")
    parser.add_argument("--quick", action="store_true", help="the demo, TinyResNet at 32 px, 1 epoch (CI)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    return parser


def run(args: argparse.Namespace) -> dict:
    if args.seeds < 1 or args.gpus < 1 or args.parallel < 1 or (args.gpus > 1 and args.parallel > 1):
        raise UserError(f"--seeds, --gpus and --parallel must be at least 1, and --gpus and --parallel cannot be "
                        f"combined (got {args.seeds}, {args.gpus}, {args.parallel}).")
    out = Path(args.out or ("reproduce/quick" if args.quick else "reproduce"))
    experiments = plan(args.only, args.recipes, args.seeds)
    if args.dry_run:
        for e in experiments:
            for argv in commands(e, out, args.data, args.quick):
                print(f"python main.py {' '.join(argv)}")
        return {}
    run_section(experiments, out, args.data, args.quick, args.gpus, args.parallel)
    table = measured(experiments, out, args.data, args.quick)
    device = device_name()
    atomic_write_json(out / "results.json", {"device": device, "quick": args.quick, "seeds": args.seeds,
                                             "published": {r: ROWS[r].published for r in args.only}, "rows": table})
    text = markdown(table, device, args.quick)
    atomic_write_text(out / "results.md", text)
    print(text + f"Wrote {out / 'results.md'} and {out / 'results.json'}.", flush=True)
    return table


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the section stopped; every run saved where it stood (results.md is written at the end); "
              "run the same command again to continue", file=sys.stderr)
        return 130
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    startup.started()
    sys.exit(main())
