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


def test_the_help_is_the_documented_one(monkeypatch):
    """`python importer.py --help` as committed in tests/help/importer.txt: every flag, default and choice a user
    reads. A change to the command line updates that file too (regenerate it with format_help() at COLUMNS=120)."""
    from pathlib import Path

    monkeypatch.setenv("COLUMNS", "120")
    expected = (Path(__file__).parent / "help" / "importer.txt").read_text()
    assert importer.get_args_parser().format_help() == expected
    args = importer.get_args_parser().parse_args(["s", "o"])
    assert (args.format, args.test_size, args.seed, args.min_label_count, args.label_separator, args.progress) == \
        ("auto", 0.2, 0, 1, None, True)
    assert not (args.merge_case or args.drop_empty or args.skip_bad_images or args.copy or args.literal_labels)


# ---------------------------------------------------------------- each step on its own (fast, exact values)

@pytest.mark.parametrize("relative, name", [
    ("cat/001.jpg", "cat__001.jpg"), ("cat\\001.jpg", "cat__001.jpg"), ("a//b.jpg", "a__b.jpg"),
    ("./x.jpg", "x.jpg"), ("../album/x.jpg", "album__x.jpg"), (".hidden.jpg", "hidden.jpg"),
    ("Xmas.jpg", "Xmas.jpg"), ("  cat/1.jpg ", "cat__1.jpg"), ("../", "image"), ("", "image"),
])
def test_flat_names(relative, name):
    assert importer.flat_name(relative) == name


def test_first_few_lists_five_then_an_ellipsis():
    assert importer._first_few(range(5)) == "0, 1, 2, 3, 4"
    assert importer._first_few(range(6)) == "0, 1, 2, 3, 4 ..."
    assert importer._first_few([]) == ""


@pytest.mark.parametrize("text, separator, labels", [
    ("sky, water;;sun  sky", None, ["sky", "water", "sun"]),  # any run of spaces, commas, semicolons; no repeats
    ("a,b", None, ["a", "b"]), ("polar bear| sky |", "|", ["polar bear", "sky"]), ("a,b", "|", ["a,b"]),
    (None, None, []), (None, "|", []), ("", "|", []),
])
def test_split_labels(text, separator, labels):
    assert importer.split_labels(text, separator) == labels


def _records(*label_lists, split=None):
    return [importer.Record(importer.Path(f"{i}.jpg"), f"{i}.jpg", list(labels), split)
            for i, labels in enumerate(label_lists)]


@pytest.mark.parametrize("labels, separator, found, in_use", [
    (["sky|water"], None, "|", "any run of spaces, commas or semicolons"),
    (["sky/sand"], None, "/", "any run of spaces, commas or semicolons"),
    (["sky;water"], "|", ";", "'|'"),  # ';' and ',' are lookalikes when the separator in use is another one
    (["sky,water"], "|", ",", "'|'"),
    (["sky - water"], "|", "-", "'|'"), (["-"], None, "-", "any run of spaces, commas or semicolons"),
])
def test_labels_that_look_run_together_are_refused_with_the_separator_in_use(labels, separator, found, in_use):
    with pytest.raises(importer.ImportDataError) as e:
        importer.check_separators(_records(["sea"], labels), separator, literal=False)
    assert str(e.value) == (f"The label '{labels[0]}' of 1.jpg looks like labels separated by '{found}', but the "
                            f"separator in use is {in_use}; pass --label-separator '{found}', or --literal-labels to "
                            f"keep such labels whole.")
    importer.check_separators(_records(["sea"], labels), separator, literal=True)  # meant whole: accepted


def test_a_separator_is_no_lookalike_of_itself():
    importer.check_separators(_records(["polar bear", "sky"]), "|", literal=False)
    importer.check_separators(_records(["a/b"]), "/", literal=False)


def _options(**kw):
    return importer.get_args_parser().parse_args(["s", "o", *[x for k, v in kw.items()
                                                               for x in (f"--{k.replace('_', '-')}", v)]])


@pytest.mark.parametrize("suffix", [".tsv", ".tab", ".TSV"])
def test_tab_separated_files_need_no_delimiter(tmp_path, suffix):
    source = tmp_path / f"photos{suffix}"
    source.write_text("file\ttags\n1.jpg\tsky, sea\n")
    (record,) = importer.read_csv_source(source, _options())
    assert (record.path, record.name, record.labels) == (tmp_path / "1.jpg", "1.jpg", ["sky", "sea"])


def test_a_csv_with_a_byte_order_mark_and_images_elsewhere(tmp_path):
    source = tmp_path / "photos.csv"
    source.write_bytes("file,tags\n1.jpg,sky\n".encode("utf-8-sig"))  # as Excel saves it
    (record,) = importer.read_csv_source(source, _options(image_column="file", images_root=str(tmp_path / "pics")))
    assert (record.path, record.labels) == (tmp_path / "pics" / "1.jpg", ["sky"])


@pytest.mark.parametrize("text, options, message", [
    ("file\n1.jpg\n", {}, "'{source}' has a single column; it needs an image column and a labels column."),
    ("file,tags\n1.jpg,sky\n", {"labels_column": "words"},
     "'{source}' has no column 'words' (--labels-column); its columns are: file, tags."),
    ("file,tags\n1.jpg,sky\n", {"split_column": "part"},
     "'{source}' has no column 'part' (--split-column); its columns are: file, tags."),
])
def test_csv_columns_that_are_not_there(tmp_path, text, options, message):
    source = tmp_path / "photos.csv"
    source.write_text(text)
    with pytest.raises(importer.ImportDataError) as e:
        importer.read_csv_source(source, _options(**options))
    assert str(e.value) == message.format(source=source)


def test_the_format_is_detected_from_what_source_is(tmp_path):
    (tmp_path / "flat").mkdir()
    draw(tmp_path / "flat" / "1.jpg", ["sky"])
    (tmp_path / "flat" / "1.txt").write_text("sky\n")
    draw(tmp_path / "classes" / "sky" / "1.jpg", ["sky"])
    (tmp_path / "list.csv").write_text("file,tags\n")
    assert [importer.detect_format(tmp_path / p) for p in ("flat", "classes", "list.csv")] == ["tags", "folders", "csv"]


def test_the_named_format_wins_over_detection(tmp_path, capsys):
    for i in range(4):  # class folders that also hold tag files: --format folders takes the folder names
        draw(tmp_path / "src" / LABELS[i % 2] / f"{i}.jpg", [LABELS[i % 2]])
        (tmp_path / "src" / LABELS[i % 2] / f"{i}.txt").write_text("boat\n")
    assert importer.main([str(tmp_path / "src"), str(tmp_path / "mine"), "--format", "folders", "--no-progress"]) == 0
    assert json.loads((tmp_path / "mine" / "train.json").read_text())["labels"] == ["sky", "sun"]


def test_image_checks_show_progress_skip_bad_images_and_keep_big_ones(tmp_path, capsys, monkeypatch):
    draw(tmp_path / "big.jpg", ["sky"], size=(48, 32))  # 1536 pixels
    draw(tmp_path / "bomb.jpg", ["sky"], size=(96, 64))  # 6144 pixels: over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # big.jpg warns (between 1x and 2x), bomb.jpg is refused
    records = [importer.Record(tmp_path / n, n, ["sky"]) for n in ("big.jpg", "bomb.jpg", "gone.jpg")]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escaped the check would be an exception here
        kept = importer.check_images(records, skip_bad=True, progress=True)
    assert [r.name for r in kept] == ["big.jpg"]
    out, err = capsys.readouterr()
    assert out.startswith("Left out 2 missing or unreadable images (--skip-bad-images): bomb.jpg (")
    assert "gone.jpg (missing)" in out
    assert "checking images: 100%" in err and "3/3" in err and "img/s" in err


@pytest.mark.parametrize("variants, message", [
    (1, "1 label is spelled in more than one way ('l0' / 'L0'); pass --merge-case"),
    (2, "2 labels are spelled in more than one way ('l0' / 'L0'; 'l1' / 'L1'); pass --merge-case"),
    (5, "5 labels are spelled in more than one way ('l0' / 'L0'; 'l1' / 'L1'; 'l2' / 'L2'; 'l3' / 'L3'; 'l4' / 'L4');"),
    (6, "6 labels are spelled in more than one way (the first 5: 'l0' / 'L0'; 'l1' / 'L1'; 'l2' / 'L2'; 'l3' / "
        "'L3'; 'l4' / 'L4'); pass --merge-case to merge each into its most frequent spelling, or fix the source."),
])
def test_spelling_variants_are_named(variants, message):
    records = _records(*[[f"l{j}"] for j in range(variants)], *[[f"L{j}"] for j in range(variants)])
    with pytest.raises(importer.ImportDataError) as e:
        importer.merge_label_variants(records, merge=False)
    assert str(e.value).startswith(message)


def test_merged_spellings_take_the_most_frequent_one_across_spaces_and_case():
    records = _records(["polar  bear", "sky"], ["Polar bear"], ["polar bear"], ["polar bear", "Sky"], ["SKY"], ["sky"])
    merged = importer.merge_label_variants(records, merge=True)
    assert [r.labels for r in merged] == [["polar bear", "sky"], ["polar bear"], ["polar bear"], ["polar bear", "sky"],
                                          ["sky"], ["sky"]]


def test_rare_labels_drop_below_the_count_and_empty_images_are_said(capsys):
    records = _records(["sky", "owl"], ["sky", "owl"], ["sky", "eel"], ["eel"], ["yak"])
    kept = importer.apply_label_rules(records, min_count=2, drop_empty=True)
    assert [r.labels for r in kept] == [["sky", "owl"], ["sky", "owl"], ["sky", "eel"], ["eel"]]  # 2 images: kept
    assert capsys.readouterr().out == ("Dropped 1 labels with fewer than 2 images (--min-label-count): yak\n"
                                       "Left out 1 images without a label (--drop-empty): 4.jpg\n")


def reference_stratified_split(y, fraction, seed):
    """The docstring of importer.stratified_split, written out with Python lists and the same random draws."""
    rng = np.random.default_rng(seed)
    n, c = len(y), len(y[0])
    counts = [sum(row[j] for row in y) for j in range(c)]
    want = [[0.0] * c, [0.0] * c]
    for j, count in enumerate(counts):
        on_test = float(np.rint(count * fraction))
        if count >= 2:
            on_test = min(max(on_test, 1), count - 1)
        want[0][j], want[1][j] = count - on_test, on_test
    total = [n - round(n * fraction), round(n * fraction)]
    side, unplaced = [None] * n, list(counts)
    while any(u > 0 for u in unplaced):
        label = min((u, j) for j, u in enumerate(unplaced) if u > 0)[1]
        for i in rng.permutation([i for i in range(n) if y[i][label] and side[i] is None]):
            if want[0][label] != want[1][label]:
                s = 0 if want[0][label] > want[1][label] else 1
            elif total[0] != total[1]:
                s = 0 if total[0] > total[1] else 1
            else:
                s = int(rng.integers(2))
            side[i] = s
            total[s] -= 1
            for j in range(c):
                want[s][j] -= y[i][j]
                unplaced[j] -= y[i][j]
    for i in rng.permutation([i for i in range(n) if side[i] is None]):
        side[i] = 0 if total[0] >= total[1] else 1
        total[side[i]] -= 1
    return np.array([s == 1 for s in side])


@pytest.mark.parametrize("seed, fraction", [(0, 0.2), (1, 0.25), (2, 0.5), (3, 0.9), (4, 0.1)])
def test_the_stratified_split_is_the_documented_procedure(seed, fraction):
    y = long_tail(n=80, c=16, seed=seed)
    y[:6] = False  # images without a label
    y[6, -1] = True  # a label of one image
    y[:, -1] &= np.arange(len(y)) == 6
    test = importer.stratified_split(y, fraction, seed)
    assert np.array_equal(test, reference_stratified_split(y.astype(int).tolist(), fraction, seed))


def test_the_stratified_split_on_hand_made_cases():
    y = np.zeros((10, 3), dtype=bool)
    y[[0, 1], 0] = True  # 2 images: one on each side, even at a 90 % test size
    y[[2, 3, 4], 1] = True  # 3 images at 10 %: still one on the test side
    y[5, 2] = True  # 1 image: round(fraction * 1) of it on the test side (none at 10 %, it at 90 %)
    for fraction in (0.1, 0.9):
        test = importer.stratified_split(y, fraction, seed=0)
        assert test[[0, 1]].sum() == 1 and test[5] == (fraction == 0.9)
        assert test[[2, 3, 4]].sum() == (1 if fraction == 0.1 else 2)
    # Label 2 (one image) goes first and places image 1; label 0 then has one image left, which its own wishes place:
    # on the test side, so that label 0 is on both sides (not on the side that wants most images).
    y = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 0]], dtype=bool)
    assert importer.stratified_split(y, 0.2, seed=0).tolist() == [True, False, False]
    unlabelled = importer.stratified_split(np.zeros((10, 2), dtype=bool), 0.3, seed=0)
    assert unlabelled.sum() == 3  # images without labels fill the test set to its size


def test_assign_splits_is_seeded():
    records = _records(*[[LABELS[j] for j in range(5) if (i >> j) & 1] or ["sky"] for i in range(40)])
    vocabulary = sorted(LABELS)
    first = importer.assign_splits(records, vocabulary, 0.25, seed=3)
    assert first == importer.assign_splits(records, vocabulary, 0.25, seed=3) and set(first) == {"train", "test"}
    assert first != importer.assign_splits(records, vocabulary, 0.25, seed=4)


def test_one_sided_labels_are_counted():
    records = _records(["a", "c"], ["a"], ["b", "c"], ["c"])
    assert importer.one_sided_labels(records, ["train", "train", "test", "test"]) == [("a", 2, 0), ("b", 0, 1)]


def test_the_summary_counts_and_prints(tmp_path, capsys):
    records = _records(["a", "c"], ["a"], ["b", "c"], ["c"], ["c"])
    summary, figure = importer.summarise(records, ["train", "train", "test", "train", "test"], ["a", "b", "c"])
    assert figure.startswith(b"\x89PNG")
    assert {k: summary[k] for k in ("images", "train", "test", "labels", "labels_per_image", "label_counts",
                                    "one_sided_labels")} == {
        "images": 5, "train": 3, "test": 2, "labels": 3, "labels_per_image": 1.4,
        "label_counts": {"c": 4, "a": 2, "b": 1}, "one_sided_labels": [("a", 2, 0), ("b", 0, 1)]}
    importer.print_summary(summary, tmp_path / "mine")
    assert capsys.readouterr().out == (
        f"Imported 5 images (3 train, 2 test), 3 labels, 1.40 labels per image into {tmp_path / 'mine'}.\n"
        f"Most frequent: c 4, a 2, b 1; rarest: b 1, a 2, c 4. Long tail: {tmp_path / 'mine' / 'labels.png'}.\n"
        "| label on one side only | train | test |\n|---|---|---|\n| a | 2 | 0 |\n| b | 0 | 1 |\n")


def test_the_dataset_is_built_beside_out_and_renamed_into_nested_new_folders(tmp_path, monkeypatch):
    source, out = csv_source(tmp_path, n=6), tmp_path / "new" / "deeper" / "mine"
    seen = []
    place = importer._place
    monkeypatch.setattr(importer, "_place", lambda record, images, copy: (seen.append(images), place(record, images,
                                                                                                     copy)))
    assert importer.main([str(source), str(out), "--no-progress", "--seed", "1"]) == 0
    assert {p.parent.parent for p in seen} == {out.parent} and all(p.parent.name.startswith(".mine.") for p in seen)
    assert sorted(p.name for p in out.iterdir()) == ["images", "labels.png", "summary.json", "test.json", "train.json"]
    assert (out / "labels.png").read_bytes().startswith(b"\x89PNG") and not list(out.parent.glob(".mine.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"] == len(json.loads((out / "train.json").read_text())["samples"])


@pytest.mark.parametrize("extra, message", [
    (["--test-size", "0"], "--test-size must be a fraction in (0, 1) (got 0.0)."),
    (["--test-size", "1"], "--test-size must be a fraction in (0, 1) (got 1.0)."),
    (["--label-separator", ""], "--label-separator cannot be empty or blank; leave it out to split at any run of "
                                "spaces, commas or semicolons."),
])
def test_run_refuses_with_the_whole_sentence(tmp_path, capsys, extra, message):
    assert importer.main([str(csv_source(tmp_path, n=3)), str(tmp_path / "mine"), "--no-progress", *extra]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_two_images_are_enough_and_none_is_said(tmp_path, capsys):
    source = csv_source(tmp_path, n=2)
    assert importer.main([str(source), str(tmp_path / "two"), "--no-progress"]) == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("sky\n")  # a tag file, no image
    assert importer.main([str(tmp_path / "empty"), str(tmp_path / "none"), "--no-progress"]) == 2
    assert f"'{tmp_path / 'empty'}' holds 0 images; a dataset needs at least 2" in capsys.readouterr().err


def test_the_command_passes_its_options_on(tmp_path, capsys):
    source = csv_source(tmp_path, n=12)
    rows = source.read_text().splitlines()
    rows[-1] = rows[-1].split(",")[0] + ",sky;water"
    source.write_text("\n".join([rows[0], *(r.replace(" ", "|") for r in rows[1:])]))
    # '|' separates, so 'x;y' looks run together: refused, and accepted whole with --literal-labels
    assert importer.main([str(source), str(tmp_path / "a"), "--label-separator", "|", "--no-progress"]) == 2
    assert "looks like labels separated by ';'" in capsys.readouterr().err
    for out in ("b", "c"):
        assert importer.main([str(source), str(tmp_path / out), "--label-separator", "|", "--literal-labels",
                              "--seed", "7"]) == 0
    assert "checking images: 100%" in capsys.readouterr().err  # the progress bar, unless --no-progress
    assert (tmp_path / "b" / "test.json").read_text() == (tmp_path / "c" / "test.json").read_text()  # seeded


def test_tag_files_and_class_folders_are_read_image_by_image(tmp_path):
    album = tag_source(tmp_path)
    draw(album / "untagged.png", [])  # no .txt beside it: an image without labels
    (album / "trip0" / "0.txt").write_text("sky;  sun\n\n", encoding="utf-8")  # ; is a separator too
    options = importer.get_args_parser().parse_args([str(album), str(tmp_path / "out")])
    records = {r.name: (r.path, r.labels) for r in importer.SOURCES["tags"](album, options)}
    expected = {f"trip{i % 2}__{i}.png": (album / f"trip{i % 2}" / f"{i}.png", labels)
                for i, labels in enumerate(label_sets(40, seed=1))}
    expected["trip0__0.png"] = (album / "trip0" / "0.png", ["sky", "sun"])
    expected["untagged.png"] = (album / "untagged.png", [])
    assert records == expected
    (album / "trip0" / "0.txt").write_text("blue sky|sun\n", encoding="utf-8")
    options = importer.get_args_parser().parse_args([str(album), str(tmp_path / "out"), "--label-separator", "|"])
    records = {r.name: r.labels for r in importer.SOURCES["tags"](album, options)}
    assert records["trip0__0.png"] == ["blue sky", "sun"]  # --label-separator reaches the tag files
    classes = folder_source(tmp_path)
    draw(classes / "loose.jpg", ["sky"])  # not in a class folder: not an image of any class
    options = importer.get_args_parser().parse_args([str(classes), str(tmp_path / "out2")])
    records = {r.name: (r.path, r.labels) for r in importer.SOURCES["folders"](classes, options)}
    assert records == {f"{LABELS[i % 5]}__{i // 5:03d}.jpg": (classes / LABELS[i % 5] / f"{i // 5:03d}.jpg",
                                                              [LABELS[i % 5]]) for i in range(40)}


def test_the_seed_chooses_the_split_and_an_unwritable_out_names_the_fix(tmp_path, capsys):
    rows = ["file,tags"]
    for i in range(20):  # one label on every image: which 4 go to the test set is the seed's choice alone
        draw(tmp_path / "pics" / f"{i}.jpg", ["sky"])
        rows.append(f"pics/{i}.jpg,sky")
    (tmp_path / "photos.csv").write_text("\n".join(rows) + "\n")

    def test_set(out, seed):
        assert importer.main([str(tmp_path / "photos.csv"), str(tmp_path / out), "--seed", str(seed),
                              "--no-progress"]) == 0
        return sorted(s["image_name"] for s in json.loads((tmp_path / out / "test.json").read_text())["samples"])

    first, again, other = test_set("a", 7), test_set("b", 7), test_set("c", 8)
    assert len(first) == 4 and first == again and other != first
    chosen = importer.stratified_split(np.ones((20, 1), dtype=bool), 0.2, seed=7)  # the seed given, not another
    assert first == sorted(f"pics__{i}.jpg" for i in np.flatnonzero(chosen))
    (tmp_path / "a_file").write_text("x")
    assert importer.main([str(tmp_path / "photos.csv"), str(tmp_path / "a_file" / "out")]) == 2
    assert capsys.readouterr().err.strip().endswith("is a file where a folder is needed; give OUT a place you can "
                                                    "write to (nothing was written).")


def test_merge_case_keeps_spellings_apart_that_differ_by_more_than_case(tmp_path):
    """'Fluss' and 'Fluß' are two spellings, not one label in two cases ('ß'.upper() is 'SS'): not refused as
    variants, and both kept."""
    rows = ["file,tags"]
    for i in range(12):
        draw(tmp_path / "pics" / f"{i}.jpg", ["sky"])
        rows.append(f"pics/{i}.jpg,sky {'Fluss' if i % 2 else 'Fluß'}")
    (tmp_path / "photos.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    assert importer.main([str(tmp_path / "photos.csv"), str(tmp_path / "out"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "train.json").read_text())["labels"] == ["Fluss", "Fluß", "sky"]
