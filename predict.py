"""--predict: annotate an image or a folder of images with a trained run or an exported ONNX file.

Images stream through the data loader in batches (decoded by `--num-workers` processes while the model runs), each row
is appended to <output>.csv as soon as its batch is done, and <output>.json is written at the end. An interrupted run
keeps what it wrote: run the same command again and it continues with the images not yet in the CSV (a marker,
<output>.partial.json, remembers the options; other options on an unfinished output are refused). Unreadable images
are skipped, listed and counted. Labels: the run's fitted thresholds (0.5 before --evaluate), or the --top-k best,
with --min-score as a floor.
"""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from dataset import AnnotationDataset, Split, make_loader
from distributed import get_device
from metrics import top_k
from utils import IMAGE_SUFFIXES, UserError, atomic_write_json, images_under

HEADER = ["image", "labels", "scores"]


def image_files(path: Path) -> list[Path]:
    """`path` itself, or every image under the folder `path` (recursively, sorted), or one sentence why not."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = images_under(path)
        if files:
            return files
        raise UserError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under '{path}'.")
    raise UserError(f"--predict path '{path}' does not exist; give an image file or a folder of images.")


def annotate(probs: torch.Tensor, thresholds: torch.Tensor, vocabulary: list[str], strict: bool = False,
             k: int | None = None, min_score: float | None = None) -> list[dict]:
    """Labels of one image (C,) scores, highest score first: those at or above their threshold (above, if `strict`),
    or with `k` its k best labels (ties to the label listed first); with `min_score`, only scores >= min_score."""
    keep = top_k(probs[None], k)[0] if k else (probs > thresholds if strict else probs >= thresholds)  # (C,)
    if min_score is not None:
        keep = keep & (probs >= min_score)
    chosen = keep.nonzero().flatten().tolist()
    chosen.sort(key=lambda j: -float(probs[j]))
    return [{"label": vocabulary[j], "score": round(float(probs[j]), 4)} for j in chosen]


@dataclass
class Predictor:
    """What --predict needs of a model: scores of uint8 batches and how to turn them into labels."""

    score: Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, 3, S, S) -> probabilities (B, C)
    vocabulary: list[str]
    thresholds: torch.Tensor  # (C,)
    compare: str  # "ge" or "gt"
    image_size: int
    source: Path  # the run directory or the .onnx file
    default_output: Path


def onnx_predictor(path: Path) -> Predictor:
    """An exported file run with ONNX Runtime (no timm, no training code)."""
    from export import OnnxAnnotator

    annotator = OnnxAnnotator(path)
    return Predictor(lambda images: torch.from_numpy(annotator.probabilities(images.numpy())), annotator.vocabulary,
                     annotator.thresholds, annotator.threshold_compare, annotator.image_size, path,
                     path.with_name(path.stem + "_predictions"))


def run_predictor(args: argparse.Namespace, defaults: dict) -> Predictor:
    """A trained run's best.pth with its fitted thresholds (0.5 for every label before --evaluate, said so)."""
    from report import load_run_model, run_directory, run_preprocessor  # the training code, only for a run directory

    run_dir = run_directory(args)
    device = get_device(args.device)
    model, ckpt, config = load_run_model(run_dir, args.model, defaults, device)
    thresholds, compare = ckpt["thresholds"], ckpt["threshold_compare"]
    if thresholds is None:
        print(f"Note: {run_dir} has no fitted thresholds yet (run --evaluate first); using 0.5 for every label.",
              flush=True)
        thresholds, compare = torch.full((len(ckpt["vocabulary"]),), 0.5), config["threshold_compare"]
    preprocess = run_preprocessor(model, ckpt, args, device)

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), preprocess.precision.autocast(device):
            return torch.sigmoid(model(preprocess(images)).float()).cpu()

    return Predictor(score, ckpt["vocabulary"], thresholds.float(), compare, config["image_size"], run_dir,
                     run_dir / "predictions")


def _options(args: argparse.Namespace, predictor: Predictor) -> dict:
    return {"source": str(predictor.source), "top_k": args.top_k, "min_score": args.min_score,
            "thresholds": [round(float(t), 6) for t in predictor.thresholds], "compare": predictor.compare}


def resume_rows(prefix: Path, options: dict) -> dict[str, dict]:
    """Rows already written by an interrupted run with the same options ({image: row}); {} to start afresh."""
    marker, table = prefix.with_suffix(".partial.json"), prefix.with_suffix(".csv")
    if not marker.is_file() or not table.is_file():
        return {}
    if json.loads(marker.read_text()) != options:
        raise UserError(f"'{table}' is from an unfinished --predict with other options (model, thresholds, --top-k or "
                        f"--min-score); delete {table} and {marker}, or give another --output.")
    text = table.read_text()
    if not text.endswith("\n"):  # the interruption cut the last line: drop it, its image is annotated again
        table.write_text(text[:text.rfind("\n") + 1])
    rows = {}
    with table.open(newline="") as f:
        for line in csv.DictReader(f):
            labels = [{"label": a, "score": float(b)} for a, b in zip(line["labels"].split(), line["scores"].split())]
            rows[line["image"]] = {"image": line["image"], "labels": labels}
    return rows


def _append(table, rows: list[dict]) -> None:
    writer = csv.writer(table)
    for row in rows:
        writer.writerow([row["image"], " ".join(x["label"] for x in row["labels"]),
                         " ".join(f"{x['score']:.4f}" for x in row["labels"])])
    table.flush()


def _tag(todo: list[Path], predictor: Predictor, args: argparse.Namespace, table) -> tuple[list[dict], list[str]]:
    """Annotate `todo` batch by batch, appending each batch's rows to `table`; returns (rows, unreadable files)."""
    split = Split("predict", [str(f) for f in todo], todo, torch.zeros(len(todo), len(predictor.vocabulary)))
    loader = make_loader(AnnotationDataset(split, predictor.image_size, skip_bad_images=True), args.batch_size,
                         args.num_workers, shuffle=False)
    rows, bad = [], []
    bar = tqdm(total=len(todo), desc="annotating", unit="img", disable=not args.progress, dynamic_ncols=True)
    for images, _, indices, ok in loader:
        bad += [str(todo[i]) for i in indices[~ok].tolist()]
        probs = predictor.score(images[ok]) if bool(ok.any()) else torch.empty(0, len(predictor.vocabulary))
        batch = [{"image": str(todo[i]), "labels": annotate(p, predictor.thresholds, predictor.vocabulary,
                                                            predictor.compare == "gt", args.top_k, args.min_score)}
                 for i, p in zip(indices[ok].tolist(), probs)]
        _append(table, batch)
        rows += batch
        bar.update(len(indices))
        if not args.progress:
            for row in batch:
                print(f"{row['image']}  " + " ".join(f"{x['label']}:{x['score']:.3f}" for x in row["labels"]), flush=True)
    bar.close()
    return rows, bad


def predict_paths(args: argparse.Namespace, defaults: dict) -> list[dict]:
    """Annotate --predict PATH; writes <output>.csv (as it goes) and <output>.json; returns the rows in file order."""
    files = image_files(Path(args.predict))
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    predictor = onnx_predictor(checkpoint) if checkpoint and checkpoint.suffix == ".onnx" else run_predictor(args, defaults)
    prefix = Path(args.output) if args.output else predictor.default_output
    options = _options(args, predictor)
    done = resume_rows(prefix, options)
    todo = [f for f in files if str(f) not in done]
    if done:
        print(f"Resuming: {len(done)} of {len(files)} images are already in {prefix.with_suffix('.csv')}.", flush=True)
    atomic_write_json(prefix.with_suffix(".partial.json"), options)
    with prefix.with_suffix(".csv").open("a" if done else "w", newline="") as table:
        if not done:
            csv.writer(table).writerow(HEADER)
        rows, bad = _tag(todo, predictor, args, table)
    by_image = {**done, **{r["image"]: r for r in rows}}
    ordered = [by_image[str(f)] for f in files if str(f) in by_image]
    atomic_write_json(prefix.with_suffix(".json"), ordered)
    prefix.with_suffix(".partial.json").unlink()
    for name in bad:
        print(f"{name}  (unreadable, skipped)", flush=True)
    print(f"Annotated {len(ordered)} images ({len(bad)} unreadable, skipped); wrote {prefix.with_suffix('.csv')} and "
          f"{prefix.with_suffix('.json')}", flush=True)
    return ordered
