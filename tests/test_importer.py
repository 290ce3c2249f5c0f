"""importer.py: the three kinds of source become datasets that train and evaluate; the stratified split keeps rare
labels on both sides and is reproducible; every bad input is one sentence, a non-zero exit and no partial dataset."""
import json
from collections import Counter
from contextlib import nullcontext

import numpy as np
import pytest
from PIL import Image

import importer
from conftest import run_dirs, train_args
from main import cli

LABELS = ("sky", "sun", "water", "boat", "tree")


def draw(path, labels, size=(48, 32)):
    """A learnable stand-in photo: label j present <=> a coloured bar in slot j."""
    colours = np.random.default_rng(7).integers(0, 256, (len(LABELS), 3))
    image = np.full((size[1], size[0], 3), 20, dtype=np.uint8)
    for label in labels:
        j = LABELS.index(label)
        image[4:-4, j * 9 + 1:j * 9 + 8] = colours[j]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)


def label_sets(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[LABELS[j] for j in sorted(set(rng.choice(len(LABELS), rng.integers(1, 4), replace=False)))]
            for _ in range(n)]


def csv_source(root, n=40):
    rows = ["file,tags"]
    for i, labels in enumerate(label_sets(n)):
        draw(root / "pics" / f"{i}.jpg", labels)
        rows.append(f"pics/{i}.jpg,{' '.join(labels)}")
    (root / "photos.csv").write_text("\n".join(rows) + "\n")
    return root / "photos.csv"


def tag_source(root, n=40):
    for i, labels in enumerate(label_sets(n, seed=1)):
        draw(root / "album" / f"trip{i % 2}" / f"{i}.png", labels)
        (root / "album" / f"trip{i % 2}" / f"{i}.txt").write_text("\n".join(labels) + "\n")
    return root / "album"


def folder_source(root, n=40):
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        draw(root / "classes" / label / f"{i // len(LABELS):03d}.jpg", [label])  # the same file names in every class
    return root / "classes"


@pytest.mark.slow
@pytest.mark.parametrize("make, kind", [(csv_source, "csv"), (tag_source, "tags"), (folder_source, "folders")])
def test_each_kind_of_source_imports_trains_and_evaluates(tmp_path, make, kind):
    source = make(tmp_path)
    assert importer.detect_format(source) == kind
    assert importer.main([str(source), str(tmp_path / "mine"), "--no-progress"]) == 0
    out = tmp_path / "mine"
    train, test = (json.loads((out / f"{s}.json").read_text()) for s in ("train", "test"))
    assert train["labels"] == test["labels"] == sorted(train["labels"])
    # About 20 % in the test set: each label's own share comes first (5 classes x 2 of 8 = 10 for the folders).
    assert len(train["samples"]) + len(test["samples"]) == 40 and 6 <= len(test["samples"]) <= 10
    names = [s["image_name"] for s in train["samples"] + test["samples"]]
    assert all((out / "images" / n).is_file() for n in names) and "/" not in "".join(names)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 40 and (out / "labels.png").stat().st_size > 0
    cli(train_args(out, tmp_path / "runs", "--epochs", "1", "--val-size", "4"))
    (run,) = run_dirs(tmp_path / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    assert json.loads((run / "results.json").read_text())["run"]["split_sizes"]["test"] == len(test["samples"])


def test_images_are_linked_or_copied_never_modified(tmp_path):
    source = csv_source(tmp_path, n=10)
    before = (tmp_path / "pics" / "0.jpg").read_bytes()
    importer.main([str(source), str(tmp_path / "linked"), "--no-progress"])
    importer.main([str(source), str(tmp_path / "copied"), "--copy", "--no-progress"])
    assert (tmp_path / "linked" / "images" / "pics__0.jpg").is_symlink()
    assert not (tmp_path / "copied" / "images" / "pics__0.jpg").is_symlink()
    assert (tmp_path / "copied" / "images" / "pics__0.jpg").read_bytes() == before
    assert (tmp_path / "pics" / "0.jpg").read_bytes() == before


def long_tail(n=300, c=40, seed=0):
    """Multi-hot (N, C) with Zipf-like label frequencies: a few common labels, many with 2-5 images."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, c + 1) ** 1.1
    y = rng.random((n, c)) < p / p.max() * 0.4
    y[np.arange(n), rng.integers(0, 3, n)] = True  # everyone has a common label
    for label, count in zip(range(c - 6, c), (2, 2, 2, 3, 3, 4)):  # the rarest: exactly 2, 3 or 4 images
        y[:, label] = False
        y[rng.choice(n, count, replace=False), label] = True
    return y


def test_the_stratified_split_keeps_every_label_with_two_images_on_both_sides():
    y = long_tail()
    test = importer.stratified_split(y, 0.2, seed=3)
    counts = y.sum(0)
    assert (counts == 2).sum() >= 3 and ((counts >= 2) & (counts <= 4)).sum() >= 6  # a real long tail
    for label in np.flatnonzero(counts >= 2):  # checked label by label, by counting
        on_test = int((y[:, label] & test).sum())
        on_train = int((y[:, label] & ~test).sum())
        assert on_test >= 1 and on_train >= 1, (label, on_train, on_test)
    assert abs(test.sum() - 0.2 * len(y)) <= 3
    assert np.array_equal(test, importer.stratified_split(y, 0.2, seed=3))
    assert not np.array_equal(test, importer.stratified_split(y, 0.2, seed=4))


def test_the_command_keeps_labels_of_two_three_and_four_images_on_both_sides_and_says_so(tmp_path):
    """End to end: a source whose rare labels have 2, 3 and 4 images goes through importer.main; every label with at
    least 2 images is in both train.json and test.json, counted from the files, and summary.json lists none as
    one-sided."""
    rows, rng = ["file,tags"], np.random.default_rng(5)
    rare = {"kite": 2, "owl": 3, "fox": 4, "eel": 2, "yak": 3}
    holders = {label: set(rng.choice(60, n, replace=False).tolist()) for label, n in rare.items()}
    for i in range(60):
        labels = [LABELS[i % 5], LABELS[(i * 7) % 5]] + [label for label, images in holders.items() if i in images]
        draw(tmp_path / "pics" / f"{i}.jpg", [label for label in labels if label in LABELS])
        rows.append(f"pics/{i}.jpg,{' '.join(dict.fromkeys(labels))}")
    (tmp_path / "photos.csv").write_text("\n".join(rows) + "\n")
    assert importer.main([str(tmp_path / "photos.csv"), str(tmp_path / "mine"), "--test-size", "0.2",
                          "--no-progress"]) == 0
    sides = {}
    for split in ("train", "test"):
        for sample in json.loads((tmp_path / "mine" / f"{split}.json").read_text())["samples"]:
            for label in sample["image_labels"]:
                sides.setdefault(label, Counter())[split] += 1
    assert {label: sum(sides[label].values()) for label in rare} == rare  # the fixture's rare labels, as planted
    for label, count in sides.items():
        assert count["train"] >= 1 and count["test"] >= 1, (label, count)
    summary = json.loads((tmp_path / "mine" / "summary.json").read_text())
    assert summary["one_sided_labels"] == [] and summary["test"] == sum(
        1 for _ in json.loads((tmp_path / "mine" / "test.json").read_text())["samples"])


def test_a_source_split_column_is_kept(tmp_path):
    source = csv_source(tmp_path, n=10)
    text = source.read_text().splitlines()
    text = ["file,tags,part"] + [f"{row},{'test' if i % 5 == 0 else 'train'}" for i, row in enumerate(text[1:])]
    source.write_text("\n".join(text) + "\n")
    importer.main([str(source), str(tmp_path / "mine"), "--split-column", "part", "--no-progress"])
    test = json.loads((tmp_path / "mine" / "test.json").read_text())["samples"]
    assert [s["image_name"] for s in test] == ["pics__0.jpg", "pics__5.jpg"]


def _broken(tmp_path, case):
    source = csv_source(tmp_path, n=12)
    rows = source.read_text().splitlines()
    if case == "missing":
        rows.append("pics/nope.jpg,sky")
    elif case == "unreadable":
        (tmp_path / "pics" / "bad.jpg").write_bytes(b"not an image")
        rows.append("pics/bad.jpg,sky")
    elif case == "duplicate":
        rows.append(rows[1])
    elif case == "case":
        rows.append("pics/0.jpg,Sky  ".replace("pics/0.jpg", "pics/11.jpg"))
        rows = [r for r in rows if not r.startswith("pics/11.jpg,") or "Sky" in r]
    elif case == "empty":
        rows[3] = rows[3].split(",")[0] + ","
    elif case in ("pipes", "slashes", "dashes"):
        mark = {"pipes": " | ", "slashes": "/", "dashes": " - "}[case]
        rows = [rows[0]] + [f"{r.split(',')[0]},{mark.join(r.split(',')[1].split())}" for r in rows[1:]]
    elif case == "short row":
        rows.append("pics/1.jpg")
    elif case == "split values":
        rows = ["file,tags,part"] + [f"{r},{'val' if i == 3 else 'train'}" for i, r in enumerate(rows[1:])]
    source.write_text("\n".join(rows) + "\n")
    return source


@pytest.mark.parametrize("case, message, fix", [
    ("missing", "1 of 13 images are missing or unreadable: pics__nope.jpg (missing);", "--skip-bad-images"),
    ("unreadable", "1 of 13 images are missing or unreadable: pics__bad.jpg (UnidentifiedImageError: cannot identify",
     "--skip-bad-images"),
    ("duplicate", "1 image names appear more than once (pics__0.jpg)", None),
    ("case", "1 label is spelled in more than one way ('sky' / 'Sky')", "--merge-case"),
    ("empty", "1 images have no label (pics__2.jpg)", "--drop-empty"),
    ("pipes", "looks like labels separated by '|'", ["--label-separator", "|"]),
    ("slashes", "looks like labels separated by '/'", ["--label-separator", "/"]),
    ("dashes", "looks like labels separated by '-'", ["--label-separator", " - "]),
    ("short row", "line 14 has 1 fields, fewer than the header's columns", None),
    ("split values", "The split column holds val; use train and test", None),
])
def test_bad_input_is_one_sentence_and_leaves_no_dataset(tmp_path, capsys, case, message, fix):
    source = _broken(tmp_path, case)
    split = ["--split-column", "part"] if case == "split values" else []
    assert importer.main([str(source), str(tmp_path / "mine"), "--no-progress", *split]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "mine").exists() and not list(tmp_path.glob(".mine.*"))
    if fix:
        fix = [fix] if isinstance(fix, str) else fix
        assert importer.main([str(source), str(tmp_path / "mine"), *fix, "--no-progress"]) == 0
        assert (tmp_path / "mine" / "train.json").is_file()
        vocabulary = json.loads((tmp_path / "mine" / "train.json").read_text())["labels"]
        assert set(vocabulary) <= set(LABELS) | {"Sky"}, vocabulary  # every label whole, none split or merged


@pytest.mark.parametrize("case, message", [
    ("missing source", "SOURCE"),
    ("test size 1.5", "--test-size must be a fraction in (0, 1) (got 1.5)"),
    ("blank separator", "--label-separator cannot be empty or blank"),
    ("OUT is a file", "is a file; give a new folder"),
    ("OUT not empty", "exists and is not empty"),
    ("OUT under a file", "is a file where a folder is needed"),
    ("unknown image column", "has no column 'photo' (--image-column)"),
    ("header only", "has no data rows under its header"),
    ("one image", "holds 1 image; a dataset needs at least 2"),
    ("folder of nothing", "has neither tag files"),
    ("unknown format", "invalid choice: 'xml'"),
    ("bad test size", "invalid float value: 'a fifth'"),
])
def test_bad_arguments_are_one_sentence_and_leave_nothing(tmp_path, capsys, case, message):
    source, out = csv_source(tmp_path, n=6), tmp_path / "mine"
    extra = {"test size 1.5": ["--test-size", "1.5"], "blank separator": ["--label-separator", " "],
             "unknown image column": ["--image-column", "photo"], "unknown format": ["--format", "xml"],
             "bad test size": ["--test-size", "a fifth"]}.get(case, [])
    if case == "missing source":
        source = tmp_path / "nowhere.csv"
    elif case == "OUT is a file":
        out.write_text("x")
    elif case == "OUT not empty":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "OUT under a file":
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" / "mine"
    elif case in ("header only", "one image"):
        lines = source.read_text().splitlines()
        source.write_text("\n".join(lines[: 1 if case == "header only" else 2]) + "\n")
    elif case == "folder of nothing":
        (tmp_path / "nothing").mkdir()
        source = tmp_path / "nothing"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) if case in ("unknown format", "bad test size") else nullcontext() as stop:
        stop = importer.main([str(source), str(out), "--no-progress", *extra])
    code = stop if isinstance(stop, int) else stop.value.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_labels_are_split_at_the_separator_taken_literally_and_names_never_hide(tmp_path):
    for i, labels in enumerate(label_sets(12)):
        draw(tmp_path / "album" / f"{i}.jpg", labels)
    rows = ["file;tags"] + [f"../album/{i}.jpg;{'[' .join(labels)}{'[polar bear' if i % 3 == 0 else ''}"
                            for i, labels in enumerate(label_sets(12))]
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "photos.csv").write_text("\n".join(rows) + "\n")
    assert importer.main([str(tmp_path / "list" / "photos.csv"), str(tmp_path / "mine"), "--delimiter", ";",
                          "--label-separator", "[", "--no-progress"]) == 0
    train = json.loads((tmp_path / "mine" / "train.json").read_text())
    assert set(train["labels"]) == set(LABELS) | {"polar bear"}  # '[' taken literally, spaces kept inside a label
    names = [s["image_name"] for s in train["samples"]]
    assert all(n.startswith("album__") for n in names)  # '../' dropped: no name that `ls` hides
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o777 & ~_umask()
    summary = json.loads((tmp_path / "mine" / "summary.json").read_text())
    per_image = sum(len(s["image_labels"]) for split in ("train", "test")
                    for s in json.loads((tmp_path / "mine" / f"{split}.json").read_text())["samples"]) / 12
    assert summary["labels_per_image"] == round(per_image, 4) and len(str(summary["labels_per_image"])) <= 6


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_merged_spellings_take_the_most_frequent_and_rare_labels_can_be_dropped(tmp_path, capsys):
    source = csv_source(tmp_path, n=30)
    rows = source.read_text().splitlines()
    rows[1] = rows[1].split(",")[0] + ",SKY moon"
    source.write_text("\n".join(rows) + "\n")
    assert importer.main([str(source), str(tmp_path / "mine"), "--merge-case", "--min-label-count", "2",
                          "--no-progress"]) == 0
    vocabulary = json.loads((tmp_path / "mine" / "train.json").read_text())["labels"]
    assert "sky" in vocabulary and "SKY" not in vocabulary and "moon" not in vocabulary
    assert "Dropped 1 labels with fewer than 2 images (--min-label-count): moon" in capsys.readouterr().out


def test_an_interrupted_import_leaves_nothing(tmp_path, monkeypatch, capsys):
    source = csv_source(tmp_path, n=10)
    calls = Counter()

    def place_then_stop(record, images, copy):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        images.mkdir(parents=True, exist_ok=True)
        (images / record.name).write_bytes(b"x")

    monkeypatch.setattr(importer, "_place", place_then_stop)
    assert importer.main([str(source), str(tmp_path / "mine"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: nothing was written") and err.count("\n") == 1
    assert not (tmp_path / "mine").exists() and not list(tmp_path.glob(".mine.*"))


def test_an_existing_dataset_is_never_overwritten(tmp_path, capsys):
    source = csv_source(tmp_path, n=10)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    assert importer.main([str(source), str(tmp_path / "mine"), "--no-progress"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "mine" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_an_imported_folder_takes_the_gan_augmentation(tmp_path):
    from DataAugmentation import cli as gan_cli

    importer.main([str(tag_source(tmp_path, n=20)), str(tmp_path / "mine"), "--no-progress"])
    assert gan_cli.main(["--data", str(tmp_path / "mine"), "--iterations", "3", "--size", "16x24", "--device", "cpu",
                         "--no-progress"]) == 0
    cli(train_args(tmp_path / "mine", tmp_path / "runs", "--epochs", "1", "--val-size", "4", "--augmentation"))
    (run,) = run_dirs(tmp_path / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    with (run / "per_label.csv").open() as f:
        import csv
        rows = list(csv.DictReader(f))
    assert sum(int(r["train_gan_copies"]) for r in rows) == 3 * sum(int(r["train_frequency"]) for r in rows)
