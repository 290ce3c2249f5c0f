"""What int8 costs in accuracy: the demo runs exported as fp32 and int8 ONNX, measured on the 500 test images.

    python bench/int8_accuracy.py          # TinyResNet 64 px, EfficientNet-Lite0 96 and 224 px (~25 CPU-minutes)

Each model trains on the demo with the README's flags (EfficientNet-Lite0 from its ImageNet weights), is evaluated
(--evaluate: thresholds fitted on train + val), then exported with `--export onnx --quantize int8` twice: with the
run's thresholds, and with thresholds re-fitted on the int8 model's own train + val predictions
(`--int8-thresholds refit`). The export itself measures fp32 and int8 on the test set (it refuses a drop of more
than --max-map-drop, 1 point); this script reads those measurements back from the files' metadata.
Results: bench/results_int8.json (finished runs and files are reused).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
COMMON = ["--data", "demo", "--batch-size", "32", "--loss-function", "AsymmetricLoss", "--no-progress"]
RUNS = {  # name: (model, image size, epochs, learning rate, pretrained)
    "TinyResNet 64 px": ("TinyResNet", 64, 4, "3e-3", False),
    "EfficientNet-Lite0 96 px": ("EfficientNetLite0", 96, 2, "1e-3", True),
    "EfficientNet-Lite0 224 px": ("EfficientNetLite0", 224, 2, "1e-3", True),
}


def main_py(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "main.py"), *argv], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def metadata(path: Path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def one(label: str, work: Path) -> dict:
    model, size, epochs, lr, pretrained = RUNS[label]
    name = f"{model}_{size}"
    run = work / f"{model}_AsymmetricLoss_demo_{name}"
    seconds = {}
    if not (run / "results.json").is_file():
        seconds["train"] = main_py(*COMMON, "--model", model, "--image-size", str(size), "--epochs", str(epochs),
                                   "--learning-rate", lr, "--save-dir", str(work), "--run-name", name,
                                   *([] if pretrained else ["--no-pretrained"]))
        seconds["evaluate"] = main_py("--evaluate", "--checkpoint", str(run), "--no-progress")
    files = {"run's thresholds": run / "model.int8.onnx", "refitted thresholds": run / "model.int8.refit.onnx"}
    for kind, path in files.items():
        if not path.is_file():
            extra = ["--int8-thresholds", "refit"] if kind == "refitted thresholds" else []
            seconds[f"export ({kind})"] = main_py("--export", "onnx", "--quantize", "int8", "--checkpoint", str(run),
                                                  "--output", str(path), *extra)
    measured = {kind: json.loads(metadata(path)["accuracy"]) for kind, path in files.items()}
    return {"run": str(run.relative_to(REPO)), "seconds": seconds, "fp32": measured["run's thresholds"]["fp32"],
            "int8": measured["run's thresholds"]["int8"], "mAP_drop": measured["run's thresholds"]["mAP_drop"],
            "int8, refitted thresholds": measured["refitted thresholds"]["int8_refit"],
            "quantization": json.loads(metadata(files["run's thresholds"])["quantization"])}


def table(results: dict) -> str:
    lines = ["| model | fp32 per-class F1 / mAP | int8 per-class F1 / mAP | mAP drop | int8, refitted thresholds: "
             "per-class F1 |", "|---|---|---|---:|---:|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['fp32']['per_class/f1']:.4f} / {r['fp32']['mAP']:.2f} | "
                     f"{r['int8']['per_class/f1']:.4f} / {r['int8']['mAP']:.2f} | {r['mAP_drop']:.2f} | "
                     f"{r['int8, refitted thresholds']['per_class/f1']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    parser.add_argument("--work", default=str(REPO / "runs" / "int8"))
    parser.add_argument("--output", default=str(BENCH / "results_int8.json"))
    args = parser.parse_args(argv)
    results = {label: one(label, Path(args.work)) for label in args.only}
    print(table(results))
    from utils import atomic_write_json

    atomic_write_json(args.output, {"command": "python bench/int8_accuracy.py", "results": results,
                                    "table_markdown": table(results)})
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
