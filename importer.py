"""Bring your own photos: turn a collection into this repository's dataset format, split and checked, in one command.

    python importer.py photos.csv data/mine                  # a CSV/TSV: an image column and a labels column
    python importer.py photos/ data/mine                     # one .txt tag file beside each image (or class folders)
    python main.py --data data/mine --model EfficientNetLite0 ...   # then train, --evaluate, --predict, --augmentation

Sources (--format auto picks by what SOURCE is):
* ``csv``: a .csv or .tsv file (or --delimiter) with an image column (--image-column, default the first) and a labels
  column (--labels-column, default the second) whose labels are separated by --label-separator (default: any run of
  spaces, commas or semicolons); image paths are relative to the file's folder (or --images-root). An optional
  --split-column holding train/test keeps the source's own split.
* ``tags``: a folder where each image has a tag file of the same stem (photo.jpg + photo.txt), one label per line or
  separated as above.
* ``folders``: a folder of class sub-folders (cat/001.jpg): one label per image, the folder's name.

OUT gets train.json, test.json (the usual format, same vocabulary), images/ (links to the originals, or copies with
--copy; never modified; one flat folder, sub-folders joined into the name: cat/001.jpg -> cat__001.jpg), summary.json and labels.png (the frequency long tail). Without a split in the source, a seeded
iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011) puts --test-size of the images in the test
set so that every label with at least 2 images is on both sides where possible. Everything is written into a
temporary folder beside OUT and renamed into place at the end: an import that stops leaves nothing half-written.
"""
from __future__ import annotations

import startup

if __name__ == "__main__":
    startup.guard()  # a Ctrl-C while torch loads: one line, not a traceback

import argparse
import csv
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dataset import image_problem
from utils import (ArgumentParser, DefaultsHelpFormatter, UserError, atomic_write_bytes, atomic_write_json, check_writable,
                   images_under)

DEFAULT_SEPARATOR = re.compile(r"[\s,;]+")  # without --label-separator: any run of spaces, commas or semicolons
# Strings that, inside a label, suggest the cell was separated by something other than the separator in use.
SEPARATOR_LOOKALIKES = ("|", "/", ";", ",", " - ")
FIRST_FEW = 5


class ImportDataError(UserError, ValueError):
    """A source collection that cannot be imported as asked."""


def flat_name(relative: str) -> str:
    """The image's name in the dataset: its relative path with sub-folders joined by '__' (cat/001.jpg ->
    cat__001.jpg), so that images/ is one flat folder and files of the same name in two folders stay apart. '.' and
    '..' steps are dropped and the name never starts with a dot (`ls` would hide it): ../album/x.jpg -> album__x.jpg."""
    parts = [p for p in relative.strip().replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "__".join(parts).lstrip(".") or "image"


@dataclass
class Record:
    """One image of the source: its file, its name in the dataset (a relative path), its labels, its split if given."""

    path: Path
    name: str
    labels: list[str]
    split: str | None = None
    notes: list[str] = field(default_factory=list)


def _first_few(items) -> str:
    items = list(items)
    return ", ".join(map(str, items[:FIRST_FEW])) + (" ..." if len(items) > FIRST_FEW else "")


def split_labels(text: str, separator: str | None) -> list[str]:
    """The labels of one field, in order, without empty pieces or repeats: split at `separator` taken literally
    (--label-separator), or at any run of spaces, commas or semicolons when None."""
    pieces = DEFAULT_SEPARATOR.split(text or "") if separator is None else (text or "").split(separator)
    return list(dict.fromkeys(label.strip() for label in pieces if label.strip()))


def check_separators(records: list[Record], separator: str | None, literal: bool) -> None:
    """Refuse labels that look like several labels run together ('sky|water', 'sky/sand', 'a - b', a lone '-' or
    '|'), naming the separator that would split them, unless --literal-labels says they are meant whole."""
    if literal:
        return
    covered = DEFAULT_SEPARATOR.pattern if separator is None else separator
    lookalikes = [s for s in SEPARATOR_LOOKALIKES if not (separator is None and s in ";,") and s.strip() not in covered]
    in_use = repr(separator) if separator is not None else "any run of spaces, commas or semicolons"
    for record in records:
        for label in record.labels:
            found = next((s for s in lookalikes if s in label or (label == "-" and s == " - ")), None)
            if found is not None:
                raise ImportDataError(
                    f"The label '{label}' of {record.name} looks like labels separated by '{found.strip()}', but "
                    f"the separator in use is {in_use}; pass --label-separator '{found.strip()}', or "
                    f"--literal-labels to keep such labels whole.")


# ---------------------------------------------------------------- the three kinds of source

def read_csv_source(source: Path, options: argparse.Namespace) -> list[Record]:
    """Records of a CSV/TSV file: image and labels columns by name or position, paths relative to --images-root."""
    delimiter = options.delimiter or ("\t" if source.suffix.lower() in (".tsv", ".tab") else ",")
    with source.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if len(rows) < 2:
        raise ImportDataError(f"'{source}' has no data rows under its header; it should list one image per row.")
    header, body = rows[0], rows[1:]
    column = {name: _column(header, value, flag, source) for name, value, flag in (
        ("image", options.image_column or header[0], "--image-column"),
        ("labels", options.labels_column or (header[1] if len(header) > 1 else None), "--labels-column"),
        ("split", options.split_column, "--split-column"))}
    root = Path(options.images_root) if options.images_root else source.parent
    records = []
    for line, row in enumerate(body, start=2):
        if len(row) <= max(i for i in column.values() if i is not None):
            raise ImportDataError(f"'{source}' line {line} has {len(row)} fields, fewer than the header's columns; fix "
                               f"the row or the --delimiter.")
        relative = row[column["image"]].strip()
        split = row[column["split"]].strip().lower() if column["split"] is not None else None
        records.append(Record(root / relative, flat_name(relative), split_labels(row[column["labels"]],
                                                                                 options.label_separator), split))
    return records


def _column(header: list[str], value: str | None, flag: str, source: Path) -> int | None:
    if value is None:
        if flag == "--split-column":
            return None
        raise ImportDataError(f"'{source}' has a single column; it needs an image column and a labels column.")
    if value in header:
        return header.index(value)
    raise ImportDataError(f"'{source}' has no column '{value}' ({flag}); its columns are: {', '.join(header)}.")


def read_tag_files(source: Path, options: argparse.Namespace) -> list[Record]:
    """Records of a folder with one tag file <stem>.txt beside each image (an image without one has no label)."""
    records = []
    for path in images_under(source):
        tags = path.with_suffix(".txt")
        labels = split_labels(tags.read_text(encoding="utf-8"), options.label_separator) if tags.is_file() else []
        records.append(Record(path, flat_name(path.relative_to(source).as_posix()), labels))
    return records


def read_class_folders(source: Path, options: argparse.Namespace) -> list[Record]:
    """Records of a folder of class sub-folders: each image's one label is its folder's name."""
    return [Record(path, flat_name(path.relative_to(source).as_posix()), [path.relative_to(source).parts[0]])
            for path in images_under(source) if len(path.relative_to(source).parts) > 1]


SOURCES = {"csv": read_csv_source, "tags": read_tag_files, "folders": read_class_folders}


def detect_format(source: Path) -> str:
    """csv for a file; tags for a folder with .txt files; folders for a folder of sub-folders."""
    if source.is_file():
        return "csv"
    if not source.is_dir():
        raise ImportDataError(f"SOURCE '{source}' does not exist; give a CSV/TSV file or a folder of images.")
    if any(source.rglob("*.txt")):
        return "tags"
    if any(p.is_dir() for p in source.iterdir()):
        return "folders"
    raise ImportDataError(f"'{source}' has neither tag files (.txt beside the images) nor class sub-folders; pass "
                       f"--format, or write a CSV of image,labels.")


# ---------------------------------------------------------------- checks: one sentence each, or the flag that resolves 

def check_images(records: list[Record], skip_bad: bool, progress: bool) -> list[Record]:
    """Every image opens and decodes; the missing or unreadable ones are an error, or dropped with --skip-bad-images."""
    bad = {}
    for record in tqdm(records, desc="checking images", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big, but within PIL's limit
                with Image.open(record.path) as im:
                    im.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            bad[record.name] = image_problem(e)
    listed = _first_few(f"{name} ({why})" for name, why in bad.items())
    if bad and not skip_bad:
        raise ImportDataError(f"{len(bad)} of {len(records)} images are missing or unreadable: {listed}; fix them, or "
                              f"pass --skip-bad-images to leave them out.")
    if bad:
        print(f"Left out {len(bad)} missing or unreadable images (--skip-bad-images): {listed}")
    return [r for r in records if r.name not in bad]


def check_names(records: list[Record]) -> None:
    """Image names must be unique (case-insensitively: on some file systems A.jpg and a.jpg are one file)."""
    seen = Counter(r.name.lower() for r in records)
    twice = sorted(name for name, n in seen.items() if n > 1)
    if twice:
        raise ImportDataError(f"{len(twice)} image names appear more than once ({_first_few(twice)}); list each image "
                              f"once.")


def merge_label_variants(records: list[Record], merge: bool) -> list[Record]:
    """Labels that differ only by case or spaces ('Sky', 'sky ', 'polar  bear') are one label with --merge-case (the
    most frequent spelling wins); otherwise they are an error that names them."""
    key = lambda label: re.sub(r"\s+", " ", label.strip().lower())  # noqa: E731
    spellings = defaultdict(Counter)
    for record in records:
        for label in record.labels:
            spellings[key(label)][label] += 1
    variants = {k: v for k, v in spellings.items() if len(v) > 1}
    if variants and not merge:
        examples = "; ".join(" / ".join(f"'{s}'" for s in v) for v in list(variants.values())[:FIRST_FEW])
        shown = f"the first {FIRST_FEW}: " if len(variants) > FIRST_FEW else ""
        raise ImportDataError(f"{len(variants)} label{'s are' if len(variants) > 1 else ' is'} spelled in more than "
                              f"one way ({shown}{examples}); pass --merge-case to merge each into its most frequent "
                              f"spelling, or fix the source.")
    canonical = {label: counts.most_common(1)[0][0] for counts in spellings.values() for label in counts}
    for record in records:
        record.labels = list(dict.fromkeys(canonical[label] for label in record.labels))
    return records


def apply_label_rules(records: list[Record], min_count: int, drop_empty: bool) -> list[Record]:
    """Labels on fewer than --min-label-count images are dropped (said); then images left without a label are an
    error, or dropped with --drop-empty."""
    counts = Counter(label for r in records for label in r.labels)
    rare = sorted(label for label, n in counts.items() if n < min_count)
    dropped = set(rare)
    if rare:
        print(f"Dropped {len(rare)} labels with fewer than {min_count} images (--min-label-count): {_first_few(rare)}")
        for record in records:
            record.labels = [label for label in record.labels if label not in dropped]
    empty = [r for r in records if not r.labels]
    if empty and not drop_empty:
        raise ImportDataError(f"{len(empty)} images have no label ({_first_few(r.name for r in empty)}); add labels, "
                              f"or pass --drop-empty to leave them out.")
    if empty:
        print(f"Left out {len(empty)} images without a label (--drop-empty): {_first_few(r.name for r in empty)}")
    return [r for r in records if r.labels]


# ---------------------------------------------------------------- the split

def stratified_split(targets: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Test-set membership (N,) bool by iterative stratification on multi-hot `targets` (N, C).

    Each label asks for round(test_fraction * n_c) of its n_c images in the test set, at least 1 and at most n_c - 1
    when n_c >= 2, so that it is on both sides. The label with the fewest images still unplaced goes first; each of
    its unplaced images joins the side that still wants most of that label (then the side that wants most images,
    then a seeded coin), and every label of the image counts against that side's wishes. Images without a label go
    to the side that wants most images. O(N C) with counts kept up to date; reproducible for a seed.
    """
    n, c = targets.shape
    y = targets.astype(bool)
    rng = np.random.default_rng(seed)
    counts = y.sum(0)
    test = np.rint(counts * test_fraction)
    test = np.where(counts >= 2, np.clip(test, 1, counts - 1), test)
    want = np.stack([counts - test, test]).astype(float)  # (2, C) images of each label each side still wants
    want_total = np.array([n - round(n * test_fraction), round(n * test_fraction)], dtype=float)
    side = np.full(n, -1)
    unplaced = counts.astype(float)  # (C,) images of each label not placed yet
    while (unplaced > 0).any():
        label = int(np.argmin(np.where(unplaced > 0, unplaced, np.inf)))
        for i in rng.permutation(np.flatnonzero(y[:, label] & (side < 0))):
            w = want[:, label]
            s = int(np.argmax(w)) if w[0] != w[1] else int(np.argmax(want_total)) if want_total[0] != want_total[1] \
                else int(rng.integers(2))
            side[i] = s
            want[s] -= y[i]
            want_total[s] -= 1
            unplaced -= y[i]
    for i in rng.permutation(np.flatnonzero(side < 0)):  # images without labels
        side[i] = int(np.argmax(want_total))
        want_total[side[i]] -= 1
    return side == 1


def assign_splits(records: list[Record], vocabulary: list[str], test_size: float, seed: int) -> list[str]:
    """Each record's split: the source's own (train/test) where it has one, else the stratified split."""
    given = {r.split for r in records}
    if given != {None}:
        unknown = sorted(str(s) for s in given - {"train", "test"})
        if unknown:
            raise ImportDataError(f"The split column holds {_first_few(unknown)}; use train and test.")
        return [r.split for r in records]
    index = {label: j for j, label in enumerate(vocabulary)}
    targets = np.zeros((len(records), len(vocabulary)), dtype=bool)  # (N, C)
    for i, record in enumerate(records):
        targets[i, [index[label] for label in record.labels]] = True
    return ["test" if t else "train" for t in stratified_split(targets, test_size, seed)]


# ---------------------------------------------------------------- output

def one_sided_labels(records: list[Record], splits: list[str]) -> list[tuple[str, int, int]]:
    """(label, train images, test images) of every label that is on one side only."""
    sides = defaultdict(Counter)
    for record, split in zip(records, splits):
        for label in record.labels:
            sides[label][split] += 1
    return sorted((label, c["train"], c["test"]) for label, c in sides.items() if not (c["train"] and c["test"]))


def _place(record: Record, images: Path, copy: bool) -> None:
    target = images / record.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(record.path, target)
    else:
        os.symlink(record.path.resolve(), target)


def check_out(out: Path) -> None:
    """OUT must be a new or empty folder in a place this process can write to (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise ImportDataError(f"OUT '{out}' is a file; give a new folder (nothing was written).")
    if out.exists() and any(out.iterdir()):
        raise ImportDataError(f"OUT '{out}' exists and is not empty; give a new folder (nothing was written).")
    check_writable(out.parent, "give OUT a place you can write to (nothing was written)")


def write_dataset(out: Path, records: list[Record], splits: list[str], vocabulary: list[str], copy: bool,
                  summary: dict, figure: bytes) -> None:
    """OUT/{train,test}.json, images/, summary.json and labels.png, built in a temporary folder beside OUT and renamed
    into place only when complete."""
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes it private (0700); the dataset is an ordinary folder
        for record in records:
            _place(record, temporary / "images", copy)
        for name in ("train", "test"):
            samples = [{"image_name": r.name, "image_labels": r.labels} for r, s in zip(records, splits) if s == name]
            atomic_write_json(temporary / f"{name}.json", {"samples": samples, "labels": vocabulary})
        atomic_write_json(temporary / "summary.json", summary)
        atomic_write_bytes(temporary / "labels.png", figure)
        if out.exists():
            out.rmdir()
        os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def summarise(records: list[Record], splits: list[str], vocabulary: list[str]) -> tuple[dict, bytes]:
    """The numbers a user checks first, and the long-tail picture (analysis.draw_labels)."""
    from analysis import draw_labels, label_statistics

    samples = [{"image_name": r.name, "image_labels": r.labels} for r in records]
    stats = {**label_statistics(samples, vocabulary, "the import"), "split": "train and test"}
    counts = {vocabulary[j]: int(stats["counts"][j]) for j in stats["order"].tolist()}
    summary = {"images": len(records), "train": splits.count("train"), "test": splits.count("test"),
               "labels": len(vocabulary),
               "labels_per_image": round(float(stats["labels_per_image"].double().mean()), 4),
               "label_counts": counts, "one_sided_labels": one_sided_labels(records, splits)}
    return summary, draw_labels(stats, "imported dataset", top=max(1, min(10, len(vocabulary) // 2)))


def print_summary(summary: dict, out: Path) -> None:
    counts = list(summary["label_counts"].items())
    print(f"Imported {summary['images']} images ({summary['train']} train, {summary['test']} test), "
          f"{summary['labels']} labels, {summary['labels_per_image']:.2f} labels per image into {out}.")
    print(f"Most frequent: {_first_few(f'{k} {v}' for k, v in counts)}; rarest: "
          f"{_first_few(f'{k} {v}' for k, v in reversed(counts))}. Long tail: {out / 'labels.png'}.")
    if summary["one_sided_labels"]:
        print("| label on one side only | train | test |\n|---|---|---|")
        for label, train, test in summary["one_sided_labels"]:
            print(f"| {label} | {train} | {test} |")


# ---------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python importer.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="a CSV/TSV file, or a folder of images")
    parser.add_argument("out", metavar="OUT", help="the dataset folder to create (new or empty)")
    parser.add_argument("--format", default="auto", choices=["auto", *SOURCES], help="what SOURCE is")
    parser.add_argument("--image-column", default=None, help="csv: the image column's name (default: the first)")
    parser.add_argument("--labels-column", default=None, help="csv: the labels column's name (default: the second)")
    parser.add_argument("--split-column", default=None, help="csv: a column of train/test (default: split here)")
    parser.add_argument("--delimiter", default=None,
                        help="csv: the field delimiter (default: tab for .tsv, else comma)")
    parser.add_argument("--label-separator", default=None,
                        help="the text between labels, taken literally (e.g. '|' or ', '); default: any run of "
                             "spaces, commas or semicolons")
    parser.add_argument("--literal-labels", action="store_true",
                        help="keep labels that contain |, /, ;, ',' or ' - ' whole (refused otherwise: they usually "
                             "mean the cells are separated by something else than the separator in use)")
    parser.add_argument("--images-root", default=None, help="csv: the folder image paths are relative to "
                        "(default: the file's folder)")
    parser.add_argument("--test-size", type=float, default=0.2,
                        help="fraction of images in the test set (about: each label's own share comes first)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    parser.add_argument("--min-label-count", type=int, default=1, help="drop labels on fewer images than this")
    parser.add_argument("--merge-case", action="store_true", help="merge labels that differ only by case or spaces")
    parser.add_argument("--drop-empty", action="store_true", help="leave out images without a label")
    parser.add_argument("--skip-bad-images", action="store_true", help="leave out missing or unreadable images")
    parser.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Read, check, split and write; returns the summary."""
    if not 0 < args.test_size < 1:
        raise ImportDataError(f"--test-size must be a fraction in (0, 1) (got {args.test_size}).")
    if args.label_separator is not None and not args.label_separator.strip():
        raise ImportDataError("--label-separator cannot be empty or blank; leave it out to split at any run of spaces, "
                              "commas or semicolons.")
    source, out = Path(args.source), Path(args.out)
    check_out(out)
    records = SOURCES[detect_format(source) if args.format == "auto" else args.format](source, args)
    if len(records) < 2:
        raise ImportDataError(f"'{source}' holds {len(records)} image{'s' * (len(records) != 1)}; a dataset needs at "
                              f"least 2 (one to train on, one to test).")
    check_separators(records, args.label_separator, args.literal_labels)
    check_names(records)
    records = check_images(records, args.skip_bad_images, args.progress)
    records = apply_label_rules(merge_label_variants(records, args.merge_case), args.min_label_count, args.drop_empty)
    vocabulary = sorted({label for r in records for label in r.labels})
    splits = assign_splits(records, vocabulary, args.test_size, args.seed)
    summary, figure = summarise(records, splits, vocabulary)
    write_dataset(out, records, splits, vocabulary, args.copy, summary, figure)
    print_summary(summary, out)
    return summary


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written ({args.out} was not created); run the same command again.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    startup.started()
    sys.exit(main())
