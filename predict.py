"""--predict: annotate an image or a folder of images with a trained run or an exported ONNX file.

Images stream through the data loader in batches (decoded by `--num-workers` processes while the model runs), each row
is appended to <output>.csv (image, labels and scores as JSON lists) as soon as its batch is done, and <output>.json is
written at the end; <output> defaults to tags beside the run's files or the .onnx file. An interrupted run
keeps what it wrote: run the same command again and it continues with the images not yet in the CSV (a marker,
<output>.partial.json, remembers the options; other options on an unfinished output are refused). Unreadable images
are skipped, listed and counted. Labels: the run's fitted thresholds (0.5 before --evaluate), or the --top-k best,
with --min-score as a floor.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from config import Runtime
from dataset import AnnotationDataset, BadImageError, Split, load_image, make_loader
from distributed import get_device
from metrics import top_k
from utils import IMAGE_SUFFIXES, Interrupted, UserError, atomic_write_json, check_writable, images_under

HEADER = ["image", "labels", "scores"]
# The default output, beside the run's files or the .onnx file: tags.csv and tags.json (not --evaluate's
# predictions.png, which is about the test set).
OUTPUT_NAME = "tags"


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
                     path.parent / OUTPUT_NAME)


def run_predictor(run_dir: Path, model_name: str | None, runtime: Runtime) -> Predictor:
    """A trained run's best.pth with the thresholds of its latest --evaluate (thresholds.json), saying which; 0.5
    for every label before any --evaluate, said so."""
    # runs.py brings timm and the model code: only a run directory needs them, an .onnx file does not.
    from runs import load_run, load_thresholds, run_preprocessor

    device = get_device(runtime.device)
    model, ckpt, config = load_run(run_dir, model_name, device)
    fitted = load_thresholds(run_dir, ckpt)
    if fitted is None:
        print(f"Note: {run_dir} has no fitted thresholds yet (run --evaluate first); using 0.5 for every label.",
              flush=True)
        fitted = {"thresholds": torch.full((len(ckpt["vocabulary"]),), 0.5), "compare": config["threshold_compare"]}
    else:
        print(f"Thresholds: {fitted['source']}.", flush=True)
    preprocess = run_preprocessor(model, ckpt, runtime, device, config)

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), preprocess.precision.autocast(device):
            return torch.sigmoid(model(preprocess(images)).float()).cpu()

    return Predictor(score, ckpt["vocabulary"], fitted["thresholds"].float(), fitted["compare"], config["image_size"],
                     run_dir, run_dir / OUTPUT_NAME)


def _options(predictor: Predictor, top_k: int | None, min_score: float | None) -> dict:
    return {"source": str(predictor.source), "top_k": top_k, "min_score": min_score,
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
            labels = [{"label": a, "score": float(b)}
                      for a, b in zip(json.loads(line["labels"]), json.loads(line["scores"]))]
            rows[line["image"]] = {"image": line["image"], "labels": labels}
    return rows


def _append(table, rows: list[dict]) -> None:
    writer = csv.writer(table)
    for row in rows:
        # Each cell a JSON list: labels may hold spaces, commas or any other character.
        writer.writerow([row["image"], json.dumps([x["label"] for x in row["labels"]], ensure_ascii=False),
                         json.dumps([round(x["score"], 4) for x in row["labels"]])])
    table.flush()


def _tag(todo: list[Path], predictor: Predictor, runtime: Runtime, top_k: int | None, min_score: float | None,
         table, rows: list[dict], bad: list[str]) -> None:
    """Annotate `todo` batch by batch, appending each batch's rows to `table` and to `rows`, unreadable files to
    `bad` (so that an interruption knows how far it got). Non-finite scores are an error naming the source."""
    split = Split("predict", [str(f) for f in todo], todo, torch.zeros(len(todo), len(predictor.vocabulary)))
    loader = make_loader(AnnotationDataset(split, predictor.image_size, skip_bad_images=True), runtime.batch_size,
                         runtime.num_workers, shuffle=False)
    bar = tqdm(total=len(todo), desc="annotating", unit="img", disable=not runtime.progress, dynamic_ncols=True)
    for images, _, indices, ok in loader:
        bad += [str(todo[i]) for i in indices[~ok].tolist()]
        probs = predictor.score(images[ok]) if bool(ok.any()) else torch.empty(0, len(predictor.vocabulary))
        finite = torch.isfinite(probs).all(dim=1)  # (B,)
        if not bool(finite.all()):
            names = [todo[i].name for i in indices[ok][~finite].tolist()]
            raise UserError(f"'{predictor.source}' gives non-finite scores (NaN or inf) for {len(names)} of "
                            f"{len(probs)} images of a batch ({', '.join(names[:3])}); the model file may be damaged: "
                            f"export or train it again. Nothing of that batch was written.")
        batch = [{"image": str(todo[i]), "labels": annotate(p, predictor.thresholds, predictor.vocabulary,
                                                            predictor.compare == "gt", top_k, min_score)}
                 for i, p in zip(indices[ok].tolist(), probs)]
        _append(table, batch)
        rows += batch
        bar.update(len(indices))
        if not runtime.progress:
            for row in batch:
                print(f"{row['image']}  " + " ".join(f"{x['label']}:{x['score']:.3f}" for x in row["labels"]), flush=True)
    bar.close()


def unreadable_reason(path: Path) -> str:
    """Why `path` could not be tagged, in a few words."""
    try:
        load_image(path, 8)
    except BadImageError as e:
        return e.reason
    return "unreadable"


def check_output(prefix: Path, overwrite: bool) -> None:
    """The output may be written: its folder is writable, and it is not a finished --predict (unless `overwrite`:
    then that one is removed first). An unfinished one (with <output>.partial.json) is continued by the caller."""
    check_writable(prefix.parent, "give --output a place you can write to")
    finished = prefix.with_suffix(".json")
    if finished.exists() and not prefix.with_suffix(".partial.json").exists():
        if not overwrite:
            raise UserError(f"'{finished}' is a finished --predict output; give another --output, or add --overwrite "
                            f"to replace it.")
        for suffix in (".json", ".csv"):
            prefix.with_suffix(suffix).unlink(missing_ok=True)


def predict_paths(path: Path, source: Path, runtime: Runtime, output: Path | None = None, top_k: int | None = None,
                  min_score: float | None = None, model_name: str | None = None, overwrite: bool = False) -> list[dict]:
    """Annotate the image or folder `path` with `source`, a run directory or an exported .onnx file (`model_name`:
    --model, which a run must match); writes <output>.csv (as it goes) and <output>.json, output defaulting to
    beside the source; returns the rows in file order. An interrupted output is continued, a finished one is never
    replaced unless `overwrite`."""
    files = image_files(path)
    predictor = onnx_predictor(source) if source.suffix == ".onnx" else run_predictor(source, model_name, runtime)
    prefix = output if output else predictor.default_output
    check_output(prefix, overwrite)
    options = _options(predictor, top_k, min_score)
    done = resume_rows(prefix, options)
    todo = [f for f in files if str(f) not in done]
    if done:
        print(f"Resuming: {len(done)} of {len(files)} images are already in {prefix.with_suffix('.csv')}.", flush=True)
    atomic_write_json(prefix.with_suffix(".partial.json"), options)
    rows, bad = [], []
    try:
        with prefix.with_suffix(".csv").open("a" if done else "w", newline="") as table:
            if not done:
                csv.writer(table).writerow(HEADER)
            _tag(todo, predictor, runtime, top_k, min_score, table, rows, bad)
    except KeyboardInterrupt:
        kept = max(prefix.with_suffix(".csv").read_text().count("\n") - 1, 0)  # complete lines under the header
        raise Interrupted(f"{kept} of {len(files)} images are tagged in {prefix.with_suffix('.csv')}; run the same "
                          f"command again to continue with the rest.") from None
    except UserError:
        if not (done or rows):  # failed before a row was kept: leave no output behind
            for suffix in (".csv", ".partial.json"):
                prefix.with_suffix(suffix).unlink(missing_ok=True)
        raise
    by_image = {**done, **{r["image"]: r for r in rows}}
    ordered = [by_image[str(f)] for f in files if str(f) in by_image]
    atomic_write_json(prefix.with_suffix(".json"), ordered)
    prefix.with_suffix(".partial.json").unlink()
    for name in bad:
        print(f"{name}  (unreadable, skipped: {unreadable_reason(Path(name))})", flush=True)
    print(f"Annotated {len(ordered)} images ({len(bad)} unreadable, skipped); wrote {prefix.with_suffix('.csv')} and "
          f"{prefix.with_suffix('.json')}", flush=True)
    return ordered
