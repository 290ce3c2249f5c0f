"""Does the CPU default precision change what a run learns? fp32 NCHW against --amp auto, over seeds, on the demo.

    python bench/precision_accuracy.py                 # TinyResNet, 64 px, 4 epochs, seeds 0 1 2 (~6 CPU-minutes)

Each seed trains twice with the same flags but the precision, `--amp none --channels-last off` (fp32 NCHW) and the
defaults (`--amp auto --channels-last auto`: on a CPU with native bf16, channels_last, bf16 training where measured
faster, bf16 evaluation), then --evaluate; the table gives per-class F1 with the fitted thresholds, mAP and how many
fitted thresholds differ. Results: bench/results_precision_accuracy.json (finished runs are reused).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VARIANTS = {"fp32 NCHW": ["--amp", "none", "--channels-last", "off"], "default (auto)": []}


def main_py(*argv: str) -> None:
    subprocess.run([sys.executable, str(REPO / "main.py"), *argv], cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def one(seed: int, variant: str, save: Path, epochs: int) -> dict:
    name = f"seed{seed}_{'fp32' if variant.startswith('fp32') else 'auto'}"
    run = save / f"TinyResNet_AsymmetricLoss_demo_{name}"
    if not (run / "results.json").is_file():
        main_py("--data", "demo", "--model", "TinyResNet", "--no-pretrained", "--image-size", "64", "--epochs",
                str(epochs), "--batch-size", "32", "--learning-rate", "3e-3", "--seed", str(seed), "--save-dir",
                str(save), "--run-name", name, "--no-progress", *VARIANTS[variant])
        main_py("--evaluate", "--checkpoint", str(run), "--no-progress")
    results = json.loads((run / "results.json").read_text())
    config = json.loads((run / "config.json").read_text())
    return {"per_class_f1": results["mcc"]["per_class/f1"], "mAP": results["mcc"]["mAP"],
            "thresholds": results["thresholds"], "precision": config["precision"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--work", default=str(REPO / "runs" / "precision"))
    args = parser.parse_args(argv)
    runs = {v: {s: one(s, v, Path(args.work), args.epochs) for s in args.seeds} for v in VARIANTS}
    lines = ["| precision | per-class F1 (MCC) | mAP | trained at |", "|---|---|---|---|"]
    for variant, by_seed in runs.items():
        f1 = [r["per_class_f1"] for r in by_seed.values()]
        m = [r["mAP"] for r in by_seed.values()]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        lines.append(f"| {variant} | {statistics.mean(f1):.4f} ± {sd(f1):.4f} | {statistics.mean(m):.2f} ± "
                     f"{sd(m):.2f} | {next(iter(by_seed.values()))['precision']} |")
    differing = [sum(a != b for a, b in zip(runs["fp32 NCHW"][s]["thresholds"].values(),
                                            runs["default (auto)"][s]["thresholds"].values())) for s in args.seeds]
    lines.append(f"\nFitted thresholds that differ between the two, per seed: {differing} of "
                 f"{len(next(iter(runs['fp32 NCHW'].values()))['thresholds'])}")
    print("\n".join(lines))
    (BENCH / "results_precision_accuracy.json").write_text(json.dumps(
        {"command": "python bench/precision_accuracy.py " + " ".join(argv or sys.argv[1:]), "runs": runs,
         "thresholds_differing": differing, "table": "\n".join(lines)}, indent=2) + "\n")
    return runs


if __name__ == "__main__":
    main()
