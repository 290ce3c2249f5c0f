"""Which recipe trains the best annotator on a long tail: a small, deliberate search with EfficientNet-Lite0.

    python bench/recipe_search.py                      # the whole search (stages 1-3), resumable
    python bench/recipe_search.py --stage 1            # every row once (seed 0)
    python bench/recipe_search.py --dry-run            # what is left to run, and its estimated cost

On bench/longtail.py's benchmark (Corel-5k's 260 labels and label sets, 4,000 training + 500 validation + 499 test
images), EfficientNet-Lite0 from its ImageNet weights (they ship in a pip package), ASL, the default recipe and its
honest protocol (model selection on the validation split, thresholds fitted on train + val). The search:

1. every row of ROWS once (seed 0): the default; one change at a time (a label-correlation head, EMA, RandAugment +
   Cutout, ASL's focusing and margin, a larger image, a longer schedule, and each piece of the study's recipe);
2. the two best rows that beat the default in stage 1 combined (seed 0), among the affordable ones: a row that trains
   more than MAX_COST times longer than the default (the decoder head on this CPU) is measured once and reported, not
   combined or seeded;
3. seeds 1 and 2 for the default and for every candidate: the two best affordable stage-1 rows and their combination.

A candidate is recommended only if its mean per-class F1 (MCC thresholds) beats the default's by more than the larger
of the two standard deviations over seeds, and its per-image F1 does not fall below the default's by more than that
spread. Every run is an ordinary run directory under --work, reused when finished (the flags are in its name); the
table and every run's figures go to bench/results_recipes.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from longtail import generate  # noqa: E402

EPOCHS = 8
BASE = ["--model", "EfficientNetLite0", "--image-size", "64", "--batch-size", "32", "--learning-rate", "1e-3",
        "--loss-function", "AsymmetricLoss", "--val-size", "500"]
ROWS = {  # name -> the flags that change (one at a time)
    "default": [],
    "head gcn": ["--head", "gcn"],
    "head decoder": ["--head", "decoder"],
    "EMA": ["--ema"],
    "EMA, decay 0.99": ["--ema", "--ema-decay", "0.99"],  # 0.9997 averages over ~3,300 steps; 8 epochs are 1,000
    "RandAugment + Cutout 0.5": ["--randaugment", "--cutout", "0.5"],
    "ASL γ− 2": ["--gamma-neg", "2"],
    "ASL margin 0.2": ["--margin", "0.2"],
    "image 96 px": ["--image-size", "96"],
    f"{2 * EPOCHS} epochs": ["--epochs", str(2 * EPOCHS)],
    "study: loss mean over B x C": ["--loss-reduction", "mean-all"],
    "study: focusing not detached": ["--no-detach-focusing"],
    "study: vertical flips": ["--vertical-flip"],
    "study: dataset's normalisation": ["--normalise", "dataset"],
    "study: last partial batch kept": ["--no-drop-last"],
}
FIGURES = ("per_class/f1", "N+", "N+/precision", "per_image/f1", "mAP")
SEEDS = (0, 1, 2)
MAX_COST = 3.0  # a row that trains more than 3x longer than the default is measured once, not combined or seeded


def flags_of(row: str) -> list[str]:
    """A row's flags: a combination "a + b" takes the flags of each."""
    return [flag for part in row.split(" & ") for flag in ROWS[part]]


def run_name(row: str, seed: int) -> str:
    flags = "_".join(f.lstrip("-").replace(".", "p") for f in flags_of(row)) or "default"
    return f"{flags}_seed{seed}"


def epochs_of(row: str) -> int:
    flags = flags_of(row)
    return int(flags[flags.index("--epochs") + 1]) if "--epochs" in flags else EPOCHS


def one(row: str, seed: int, data: Path, work: Path) -> dict:
    """Train (unless finished) and --evaluate (unless done) one row with one seed; its test figures."""
    name = run_name(row, seed)
    run = work / f"EfficientNetLite0_AsymmetricLoss_{data.name}_{name}"
    seconds = {}
    log = run / "log.csv"
    argv = ["--data", str(data), *BASE, "--epochs", str(EPOCHS), *flags_of(row), "--seed", str(seed)]
    if (run / "config.json").is_file():
        check_settings(run, argv)
    if not (log.is_file() and len(log.read_text().splitlines()) == epochs_of(row) + 1 and (run / "best.pth").is_file()):
        start = time.perf_counter()
        main_py(*argv, "--save-dir", str(work), "--run-name", name)
        seconds["train"] = time.perf_counter() - start
    if not (run / "results.json").is_file():
        start = time.perf_counter()
        main_py("--evaluate", "--checkpoint", str(run))
        seconds["evaluate"] = time.perf_counter() - start
    results = json.loads((run / "results.json").read_text())
    figures = {k: results["mcc"][k] for k in FIGURES}
    figures["per_class/f1@0.5"] = results["default"]["per_class/f1"]
    return {**figures, "run": str(run.relative_to(REPO)), "seconds": seconds, "learning": learning(run),
            "command": "python main.py " + " ".join(["--data", "runs/recipes/longtail", *argv[2:]])}


def check_settings(run: Path, argv: list[str]) -> None:
    """A run directory is reused only if it trained what `argv` asks: every flag the row sets (or BASE) in its
    config.json; otherwise stop with a sentence (another search left it, or ROWS changed)."""
    from main import get_args_parser

    parser = get_args_parser()
    wanted, default = vars(parser.parse_args(argv)), vars(parser.parse_args([]))
    saved = json.loads((run / "config.json").read_text())
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} wanted" for k, v in wanted.items()
              if v != default[k] and k != "data" and saved.get(k) != v]
    if differ:
        raise SystemExit(f"error: {run} was trained with other settings ({'; '.join(differ)}); move it away or pass "
                         f"another --work")


def learning(run: Path) -> dict:
    """Whether a run learned: its first and last training loss and validation per-class F1 (0.5) and mAP, per epoch."""
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [round(float(r[k]), 4) for r in rows] for k in ("train/loss", "val/per_class/f1", "val/mAP", "time_s")}


def label_graph(run: Path, train_json: Path) -> dict:
    """The GCN head's label graph as trained (best.pth's adjacency buffer): how many labels it links, overall and
    among the rare ones (fewer than 5 images in train.json), and how many receive their neighbours' features into
    their own classifier (a row of Â with an off-diagonal entry), i.e. whether the long tail gets anything from it."""
    import numpy as np
    import torch

    state = torch.load(run / "best.pth", map_location="cpu", weights_only=False)["model"]
    (adjacency,) = [v for k, v in state.items() if k.endswith("adjacency")]  # (C, C), normalised, identity added
    linked = (adjacency.numpy() * (1 - np.eye(len(adjacency)))) > 0  # (C, C): an edge either way
    data = json.loads(train_json.read_text())
    counts = np.zeros(len(data["labels"]), int)
    index = {label: j for j, label in enumerate(data["labels"])}
    for sample in data["samples"]:
        counts[[index[label] for label in sample["image_labels"]]] += 1
    receives = linked.any(1)  # row i of Â mixes other labels into label i's classifier (W = Â H)
    either = receives | linked.any(0)  # linked either way
    rare = counts < 5
    return {"labels": int(len(either)), "edges": int(linked.sum()), "labels_linked": int(either.sum()),
            "labels_receiving": int(receives.sum()), "rare_labels": int(rare.sum()),
            "rare_labels_linked": int(either[rare].sum()), "rare_labels_receiving": int(receives[rare].sum())}


def main_py(*argv: str) -> None:
    subprocess.run([sys.executable, str(REPO / "main.py"), "--no-progress", *argv], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gain(results: dict, row: str) -> float:
    """Mean per-class F1 of `row` minus the default's, over the seeds both have."""
    seeds = sorted(set(results[row]) & set(results["default"]))
    return statistics.mean(results[row][s]["per_class/f1"] - results["default"][s]["per_class/f1"] for s in seeds)


def cost(results: dict, row: str) -> float:
    """Seconds of training (log.csv's epochs) of the row's seed-0 run, relative to the default's."""
    def seconds(r):
        return sum(float(t) for t in r["learning"]["time_s"])
    return seconds(results[row][0]) / seconds(results["default"][0])


def affordable(results: dict, row: str) -> bool:
    """Within reach of this 2-core CPU: at most MAX_COST times the default's training time."""
    return cost(results, row) <= MAX_COST


def stages(results: dict) -> list[tuple[str, int]]:
    """(row, seed) pairs to run, in order, given what is measured so far."""
    todo = [(row, 0) for row in ROWS]
    if not all(row in results and 0 in results[row] for row in ROWS):
        return todo
    better = sorted((r for r in ROWS if r != "default" and gain(results, r) > 0 and affordable(results, r)),
                    key=lambda r: -gain(results, r))
    combined = [" & ".join(better[:2])] if len(better) >= 2 else []
    todo += [(row, 0) for row in combined]
    candidates = ["default", *better[:2], *combined]  # the two best affordable single changes and their combination
    todo += [(row, seed) for row in candidates for seed in SEEDS[1:]]
    return todo


def recommendation(results: dict) -> dict:
    """The best candidate that beats the default by more than the spread without losing per-image F1, or None."""
    def stats(row, figure):
        return mean_sd([r[figure] for r in results[row].values()])

    base_f1, base_sd = stats("default", "per_class/f1")
    base_image, base_image_sd = stats("default", "per_image/f1")
    verdicts = {}
    for row, by_seed in results.items():
        if row == "default" or len(by_seed) < len(SEEDS):
            continue
        f1, sd = stats(row, "per_class/f1")
        image, image_sd = stats(row, "per_image/f1")
        spread = max(sd, base_sd)
        verdicts[row] = {"gain": f1 - base_f1, "spread": spread, "per_image_change": image - base_image,
                         "beats": f1 - base_f1 > spread and image - base_image >= -max(image_sd, base_image_sd)}
    winners = sorted((r for r, v in verdicts.items() if v["beats"]), key=lambda r: -verdicts[r]["gain"])
    return {"row": winners[0] if winners else None, "verdicts": verdicts}


def table(results: dict) -> str:
    lines = ["| row | flags (besides the base command) | seeds | per-class F1 @0.5 | per-class F1 | N+ | P of N+ | "
             "per-image F1 | mAP | train s (fastest seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(results, key=lambda r: (r != "default", -statistics.mean(x["per_class/f1"] for x in results[r].values())))
    for row in order:
        by_seed = results[row]
        cells = []
        for figure in ("per_class/f1@0.5", "per_class/f1", "N+", "N+/precision", "per_image/f1", "mAP"):
            m, sd = mean_sd([r[figure] for r in by_seed.values()])
            cells.append(f"{m:.1f} ± {sd:.1f}" if figure in ("N+", "mAP") else f"{m:.3f} ± {sd:.3f}")
        train = [r["seconds"]["train"] for r in by_seed.values() if "train" in r["seconds"]]
        cells.append(f"{min(train):.0f}" if train else "")  # the fastest seed: the CPU was shared at times
        flags = " ".join(flags_of(row)) or "(none)"
        lines.append(f"| {row} | `{flags}` | {len(by_seed)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(path: Path) -> dict:
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    results = {row: {int(s): r for s, r in by_seed.items()} for row, by_seed in saved["results"].items()}
    for by_seed in results.values():
        for r in by_seed.values():
            r["learning"] = learning(REPO / r["run"])
            r["command"] = r["command"].replace("--data longtail ", "--data runs/recipes/longtail ")
    return results


def save(path: Path, results: dict, started: float, spent: float, data: Path) -> None:
    from utils import atomic_write_json

    atomic_write_json(path, {"command": "python bench/recipe_search.py", "epochs": EPOCHS, "base": BASE,
                             "results": results, "table_markdown": table(results),
                             "recommendation": recommendation(results) if "default" in results and
                             len(results["default"]) == len(SEEDS) else None,
                             "label_graph": {row: label_graph(REPO / by_seed[0]["run"], data / "train.json")
                                             for row, by_seed in results.items() if "head gcn" in row and 0 in by_seed},
                             "cpu_seconds_spent": spent + time.perf_counter() - started})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="stop after this stage")
    parser.add_argument("--dry-run", action="store_true", help="print what is left to run")
    parser.add_argument("--work", default=str(REPO / "runs" / "recipes"))
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets" / "Corel-5k"))
    parser.add_argument("--output", default=str(BENCH / "results_recipes.json"))
    args = parser.parse_args(argv)
    work, output = Path(args.work), Path(args.output)
    data = work / "longtail"
    if not (data / "test.json").is_file():
        generate(data, Path(args.shared))
    results = load(output)
    spent = json.loads(output.read_text()).get("cpu_seconds_spent", 0.0) if output.is_file() else 0.0
    started = time.perf_counter()
    limit = {1: len(ROWS), 2: len(ROWS) + 1, 3: None}[args.stage]
    while True:
        todo = [(r, s) for r, s in stages(results)[:limit] if s not in results.get(r, {})]
        if not todo or args.dry_run:
            break
        row, seed = todo[0]
        per_run = [r["seconds"].get("train", 0) + r["seconds"].get("evaluate", 0)
                   for by_seed in results.values() for r in by_seed.values() if r["seconds"]]
        left = f", about {len(todo) * statistics.mean(per_run) / 60:.0f} min left" if per_run else ""
        print(f"[{len(todo)} runs to go{left}] {row}, seed {seed} ...", flush=True)
        results.setdefault(row, {})[seed] = one(row, seed, data, work)
        save(output, results, started, spent, data)
    if results and not args.dry_run:
        save(output, results, started, spent, data)  # the table and verdicts by this version's rules
    for row, seed in (todo if args.dry_run else []):
        print(f"to run: {row}, seed {seed}")
    if results:
        print(table(results))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
