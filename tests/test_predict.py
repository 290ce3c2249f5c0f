"""--predict (predict.py) and --export onnx (export.py): labels from thresholds or the top k, streaming output that
survives an interruption, unreadable files skipped, and an exported ONNX file that tags like the PyTorch model."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import export
import predict
from main import cli
from utils import Interrupted, UserError


@pytest.mark.parametrize("strict, expected", [(False, ["sea", "sky", "sun"]), (True, ["sea", "sky"])])
def test_annotate_orders_by_score_and_follows_the_comparison(strict, expected):
    probs = torch.tensor([0.7, 0.9, 0.5, 0.1])
    labels = predict.annotate(probs, torch.tensor([0.5, 0.5, 0.5, 0.5]), ["sky", "sea", "sun", "moon"], strict)
    assert [x["label"] for x in labels] == expected
    assert labels[0] == {"label": "sea", "score": 0.9}
    assert predict.annotate(probs, torch.tensor([0.8, 0.95, 0.5, 0.05]), ["sky", "sea", "sun", "moon"]) == [
        {"label": "sun", "score": 0.5}, {"label": "moon", "score": 0.1}]  # p >= t by default
    assert predict.annotate(torch.tensor([0.123456]), torch.tensor([0.1]), ["sky"]) == [{"label": "sky", "score": 0.1235}]


def test_annotate_with_top_k_and_a_score_floor():
    probs, t = torch.tensor([0.7, 0.9, 0.5, 0.1, 0.5]), torch.full((5,), 0.95)
    vocabulary = ["sky", "sea", "sun", "moon", "tree"]
    assert [x["label"] for x in predict.annotate(probs, t, vocabulary, k=3)] == ["sea", "sky", "sun"]  # tie: sun first
    assert [x["label"] for x in predict.annotate(probs, t, vocabulary, k=3, min_score=0.6)] == ["sea", "sky"]
    assert [x["label"] for x in predict.annotate(probs, torch.full((5,), 0.4), vocabulary, min_score=0.6)] == \
        ["sea", "sky"]


def test_image_files_lists_images_recursively_and_refuses_nothing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "album.jpg").mkdir()  # a folder named like an image is not an image (the importer's rule too)
    for name in ("b.JPG", "a.png", "sub/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in predict.image_files(tmp_path)] == ["a.png", "b.JPG", "sub/c.webp"]
    assert predict.image_files(tmp_path / "a.png") == [tmp_path / "a.png"]
    with pytest.raises(UserError, match="does not exist"):
        predict.image_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^No images \(.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp\) found under"):
        predict.image_files(tmp_path / "empty")


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A run with thresholds.json, built without training (conftest.make_run): distinct thresholds, p >= t."""
    from conftest import make_run, write_dataset

    data = write_dataset(tmp_path_factory.mktemp("data") / "tiny")
    return make_run(tmp_path_factory.mktemp("runs"), data, thresholds=[0.35, 0.5, 0.42, 0.6, 0.28]), data


def tag(checkpoint, folder, output, *extra):
    from main import get_args_parser, main

    return main(get_args_parser().parse_args(["--predict", str(folder), "--checkpoint", str(checkpoint),
                                              "--num-workers", "0", "--no-progress", "--output", str(output), *extra]))


def test_an_interrupted_folder_run_keeps_its_rows_and_resumes_with_the_rest(evaluated_run, tmp_path, monkeypatch):
    run, data = evaluated_run
    complete = tag(run, data / "images", tmp_path / "all")
    real_append, batches = predict._append, []

    def append_then_stop(table, rows):
        real_append(table, rows)
        batches.append(len(rows))
        if len(batches) == 2:
            table.write("99999.jpeg,sky se")  # a line cut mid-write, then Ctrl-C
            table.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(predict, "_append", append_then_stop)
    with pytest.raises(Interrupted, match="^16 of 34 images are tagged in .*part.csv; run the same command again"):
        tag(run, data / "images", tmp_path / "part", "--batch-size", "8")
    kept = (tmp_path / "part.csv").read_text().splitlines()
    assert len(kept) == 1 + 16 + 1 and (tmp_path / "part.partial.json").is_file()  # header, 2 batches, a cut line
    monkeypatch.setattr(predict, "_append", real_append)
    with pytest.raises(UserError, match="unfinished --predict with other options"):
        tag(run, data / "images", tmp_path / "part", "--top-k", "2")
    resumed = tag(run, data / "images", tmp_path / "part", "--batch-size", "8")
    assert resumed == complete and not (tmp_path / "part.partial.json").exists()
    folder = sorted(str(p) for p in (data / "images").iterdir())  # counted from the folder, not from the tagger
    assert len(folder) == 34
    with (tmp_path / "part.csv").open() as f:
        tagged = [r["image"] for r in csv.DictReader(f)]
    assert sorted(tagged) == folder  # every image of the folder, each exactly once, after the resume
    assert [r["image"] for r in resumed] == folder and [r["image"] for r in complete] == folder
    assert json.loads((tmp_path / "part.json").read_text()) == complete


def test_unreadable_files_are_skipped_and_reported(evaluated_run, tmp_path, capsys):
    run, data = evaluated_run
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("10000.jpeg", "10001.jpeg"):
        (folder / name).write_bytes((data / "images" / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    rows = tag(run, folder, tmp_path / "out")
    out = capsys.readouterr().out
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["10000.jpeg", "10001.jpeg"]
    assert "broken.jpg  (unreadable, skipped: UnidentifiedImageError: cannot identify image file" in out
    assert "Annotated 2 images (1 unreadable, skipped)" in out


def test_an_exported_onnx_file_tags_like_the_pytorch_model(evaluated_run, tmp_path):
    pytest.importorskip("onnxruntime")
    run, data = evaluated_run
    cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "model.onnx")])
    annotator = export.OnnxAnnotator(tmp_path / "model.onnx")
    best = torch.load(run / "best.pth", weights_only=True)
    assert annotator.vocabulary == best["vocabulary"] and annotator.image_size == 32
    torch.testing.assert_close(annotator.thresholds,
                               torch.tensor(json.loads((run / "thresholds.json").read_text())["thresholds"]))
    pytorch = tag(run, data / "images", tmp_path / "torch")
    onnx = tag(tmp_path / "model.onnx", data / "images", tmp_path / "onnx")
    assert [[x["label"] for x in r["labels"]] for r in onnx] == [[x["label"] for x in r["labels"]] for r in pytorch]
    for a, b in zip(onnx, pytorch):
        assert [x["score"] for x in a["labels"]] == pytest.approx([x["score"] for x in b["labels"]], abs=2e-4)


@pytest.mark.slow
def test_tagging_with_an_onnx_file_loads_neither_timm_nor_the_training_code(evaluated_run, tmp_path):
    pytest.importorskip("onnxruntime")
    run, data = evaluated_run
    cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "model.onnx")])
    script = (
        "import sys; from pathlib import Path; import predict; from config import Runtime\n"
        f"rows = predict.predict_paths(Path({str(data / 'images')!r}), Path({str(tmp_path / 'model.onnx')!r}), "
        f"Runtime(batch_size=8, num_workers=0, progress=False), Path({str(tmp_path / 'alone')!r}))\n"
        "print(len(rows), sorted({'timm', 'trainer', 'models', 'report', 'engine'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(predict.__file__).parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "34 []"


@pytest.mark.slow
def test_tagging_with_a_run_directory_loads_neither_the_training_code_nor_the_report(evaluated_run, tmp_path):
    run, data = evaluated_run
    script = (
        "import sys; import main\n"
        f"main.cli(['--predict', {str(data / 'images')!r}, '--checkpoint', {str(run)!r}, '--output', "
        f"{str(tmp_path / 'tags')!r}, '--num-workers', '0', '--no-progress'])\n"
        "print(sorted({'trainer', 'report', 'evaluation', 'crossfit', 'augment'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(predict.__file__).parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(json.loads((tmp_path / "tags.json").read_text())) == 34


def test_an_export_that_disagrees_with_pytorch_is_not_written(evaluated_run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    run, _ = evaluated_run
    monkeypatch.setattr(export, "TOLERANCE", 0.0)
    with pytest.raises(SystemExit):
        cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "model.onnx")])
    assert not (tmp_path / "model.onnx").exists()


def test_without_onnxruntime_one_sentence_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(export.ExportError, match="pip install onnx onnxruntime"):
        export.OnnxAnnotator(tmp_path / "model.onnx")


# ---------------------------------------------------------------- ONNX: planted thresholds, the comparison rule, ties

def _plant_thresholds(run, values, compare):
    record = json.loads((run / "thresholds.json").read_text())
    (run / "thresholds.json").write_text(json.dumps({**record, "thresholds": [float(v) for v in values],
                                                     "compare": compare}))


@pytest.mark.parametrize("compare", ["gt", "ge"])
def test_onnx_carries_distinct_thresholds_in_label_order_and_applies_its_rule_at_a_tie(evaluated_run, tmp_path,
                                                                                     compare):
    pytest.importorskip("onnxruntime")
    import shutil

    import numpy as np

    run, data = evaluated_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    vocabulary = torch.load(run / "best.pth", weights_only=True)["vocabulary"]
    cli(["--export", "onnx", "--checkpoint", str(copy), "--output", str(tmp_path / "probe.onnx")])
    folder = tmp_path / "photos"
    folder.mkdir()
    names = sorted(p.name for p in (data / "images").iterdir())[:8]
    for name in names:
        (folder / name).symlink_to(data / "images" / name)
    images = torch.stack([predict.load_image(folder / n, 32) for n in names]).numpy()
    probs = export.OnnxAnnotator(tmp_path / "probe.onnx").probabilities(images)  # (8, C) float32
    # Distinct thresholds, one of which (label 1) is exactly image 0's score: a tie that only the rule decides.
    planted = np.array([0.31, probs[0, 1], 0.47, 0.22, 0.58], dtype=np.float32)
    assert len(set(planted.tolist())) == 5
    _plant_thresholds(copy, planted, compare)
    cli(["--export", "onnx", "--checkpoint", str(copy), "--output", str(tmp_path / "model.onnx")])
    annotator = export.OnnxAnnotator(tmp_path / "model.onnx")
    assert annotator.vocabulary == vocabulary and annotator.threshold_compare == compare
    np.testing.assert_array_equal(annotator.thresholds.numpy(), planted)
    rows = tag(tmp_path / "model.onnx", folder, tmp_path / "tags")
    chosen = probs > planted if compare == "gt" else probs >= planted
    assert chosen.any() and (~chosen).any()
    for row, picked in zip(rows, chosen):
        assert [x["label"] for x in row["labels"]] == \
            [vocabulary[j] for j in sorted(np.flatnonzero(picked), key=lambda j: -probs[names.index(
                Path(row["image"]).name), j])]
    tie = {x["label"] for x in next(r for r in rows if Path(r["image"]).name == names[0])["labels"]}
    assert (vocabulary[1] in tie) == (compare == "ge")


@pytest.mark.parametrize("error, written", [(1e-3, False), (1e-6, True)])
def test_the_parity_check_refuses_a_real_difference_and_accepts_float_noise(evaluated_run, tmp_path, monkeypatch,
                                                                           capsys, error, written):
    pytest.importorskip("onnxruntime")
    run, _ = evaluated_run
    real = export.OnnxAnnotator.probabilities
    monkeypatch.setattr(export.OnnxAnnotator, "probabilities", lambda self, images: real(self, images) + error)
    assert export.TOLERANCE == 1e-4  # the real tolerance, not a patched one
    if written:
        cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "model.onnx")])
    else:
        with pytest.raises(SystemExit):
            cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "model.onnx")])
        assert re.search(r"ONNX Runtime's probabilities differ from PyTorch's by 1\.0\de-03 \(>= 0\.0001\) on 10 "
                         r"images; the file was not written\.$", capsys.readouterr().err.strip())
    assert (tmp_path / "model.onnx").exists() is written


def test_the_default_output_is_tags_beside_the_run_or_the_onnx_file_and_labels_with_spaces_survive(tmp_path):
    from conftest import make_run, write_dataset

    data = write_dataset(tmp_path / "tiny", labels=("blue sky", "sea, calm", "sun", "boat", "tree"))
    run = make_run(tmp_path / "runs", data, thresholds=[0.2] * 5)  # low thresholds: several labels per image
    rows = tag_default(run, data / "images")
    assert (run / "tags.csv").is_file() and (run / "tags.json").is_file()
    assert not (run / "predictions.csv").exists() and not (run / "predictions.png").exists()
    with (run / "tags.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [json.loads(r["labels"]) for r in table] == [[x["label"] for x in r["labels"]] for r in rows]
    assert any("blue sky" in json.loads(r["labels"]) and "sea, calm" in json.loads(r["labels"]) for r in table)
    pytest.importorskip("onnxruntime")
    cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "exported" / "model.onnx")])
    tag_default(tmp_path / "exported" / "model.onnx", data / "images")
    assert (tmp_path / "exported" / "tags.csv").is_file() and (tmp_path / "exported" / "tags.json").is_file()


def tag_default(checkpoint, folder):
    from main import get_args_parser, main

    return main(get_args_parser().parse_args(["--predict", str(folder), "--checkpoint", str(checkpoint),
                                              "--num-workers", "0", "--no-progress"]))


# ---------------------------------------------------------------- every piece of --predict, on runs built instantly

@pytest.fixture
def fast(tmp_path):
    """A tiny dataset and a run of it with distinct thresholds (conftest.make_run): no training."""
    from conftest import make_run, write_dataset

    data = write_dataset(tmp_path / "tiny", labels=("sky", "café", "water", "boat", "tree"))
    return make_run(tmp_path / "runs", data, thresholds=[0.35, 0.5, 0.42, 0.6, 0.28]), data


def _predict(checkpoint, folder, *extra):
    from main import get_args_parser, main

    return main(get_args_parser().parse_args(["--predict", str(folder), "--checkpoint", str(checkpoint),
                                              "--num-workers", "0", "--no-progress", *map(str, extra)]))


def test_the_csv_row_by_row_the_options_file_and_the_printed_lines(fast, tmp_path, capsys):
    run, data = fast
    rows = _predict(run, data / "images", "--batch-size", "5")
    out = capsys.readouterr().out
    with (run / "tags.csv").open(encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "image,labels,scores"
    table = list(csv.reader(lines[1:]))
    assert [r[0] for r in table] == [r["image"] for r in rows] == sorted(str(p) for p in (data / "images").iterdir())
    for (image, labels, scores), row in zip(table, rows):
        assert json.loads(labels) == [x["label"] for x in row["labels"]] and "\\u" not in labels  # café as is
        assert scores == json.dumps([round(x["score"], 4) for x in row["labels"]])
        assert all(len(s.split(".")[1]) <= 4 for s in scores.strip("[]").split(", ") if "." in s)
        printed = f"{image}  " + " ".join(f"{x['label']}:{x['score']:.3f}" for x in row["labels"])
        assert printed in out.splitlines()  # without a progress bar, one line per image
    assert any("café" in json.loads(r[1]) for r in table)
    assert out.splitlines()[-1] == (f"Annotated 34 images (0 unreadable, skipped); wrote {run / 'tags.csv'} and "
                                    f"{run / 'tags.json'}")
    assert out.splitlines()[0] == f"Thresholds: MCC thresholds fitted on val by --evaluate at 2026-01-01T00:00:00+00:00 " \
                                  f"({run / 'thresholds.json'})."


def interrupt_after_first_batch(monkeypatch):
    """Make --predict stop with a Ctrl-C right after its first batch is written (the table then ends with a complete
    line); returns the real predict._append, to put back."""
    real = predict._append

    def append_then_stop(table, rows):
        real(table, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "_append", append_then_stop)
    return real


def test_the_options_of_an_unfinished_output_are_its_marker_and_each_refuses_another(fast, tmp_path, monkeypatch):
    run, data = fast
    real = interrupt_after_first_batch(monkeypatch)
    with pytest.raises(Interrupted, match="^8 of 34 images are tagged"):
        _predict(run, data / "images", "--output", tmp_path / "o", "--batch-size", "8", "--min-score", "0.1")
    monkeypatch.setattr(predict, "_append", real)
    marker = json.loads((tmp_path / "o.partial.json").read_text())
    assert marker == {"source": str(run), "top_k": None, "min_score": 0.1,
                      "thresholds": [0.35, 0.5, 0.42, 0.6, 0.28], "compare": "ge"}
    for other in (["--min-score", "0.2"], ["--min-score", "0.1", "--top-k", "2"], []):
        with pytest.raises(UserError, match="is from an unfinished --predict with other options"):
            _predict(run, data / "images", "--output", tmp_path / "o", *other)
    from conftest import make_run

    twin = make_run(tmp_path / "twin", data, thresholds=[0.35, 0.5, 0.42, 0.6, 0.28])  # same thresholds, other run
    with pytest.raises(UserError, match="is from an unfinished --predict with other options"):
        _predict(twin, data / "images", "--output", tmp_path / "o", "--min-score", "0.1")


def test_a_resumed_output_keeps_its_complete_lines_and_says_how_many(fast, tmp_path, monkeypatch, capsys):
    run, data = fast
    complete = _predict(run, data / "images", "--output", tmp_path / "all")
    real = predict._append

    def cut_after_two(table, rows):
        real(table, rows)
        if len((tmp_path / "part.csv").read_text().splitlines()) > 16:
            table.write("cut mid-li")
            table.flush()
            raise KeyboardInterrupt

    monkeypatch.setattr(predict, "_append", cut_after_two)
    with pytest.raises(Interrupted, match="^16 of 34"):
        _predict(run, data / "images", "--output", tmp_path / "part", "--batch-size", "8")
    monkeypatch.setattr(predict, "_append", real)
    capsys.readouterr()
    assert _predict(run, data / "images", "--output", tmp_path / "part", "--batch-size", "8") == complete
    assert f"Resuming: 16 of 34 images are already in {tmp_path / 'part.csv'}." in capsys.readouterr().out  # cut line dropped
    (tmp_path / "part.partial.json").write_text((tmp_path / "all.json").read_text())  # a marker without its table
    (tmp_path / "lonely.partial.json").write_text("{}")
    assert _predict(run, data / "images", "--output", tmp_path / "lonely") == complete  # starts afresh


def test_a_finished_output_is_refused_unless_overwritten_and_an_interruption_before_any_row(fast, tmp_path,
                                                                                           monkeypatch):
    run, data = fast
    (tmp_path / "old.json").write_text("[]")
    (tmp_path / "old.csv").write_text("image,labels,scores\nghost.jpg,[],[]\n")
    with pytest.raises(UserError, match=r"old.json' is a finished --predict output; give another --output, or add "
                                        r"--overwrite to replace it\.$"):
        _predict(run, data / "images", "--output", tmp_path / "old")
    _predict(run, data / "images", "--output", tmp_path / "old", "--overwrite")
    assert "ghost.jpg" not in (tmp_path / "old.csv").read_text()
    (tmp_path / "busy.json").write_text("[]")
    (tmp_path / "busy.partial.json").write_text("{}")  # unfinished: continued, not refused
    (tmp_path / "busy.csv").write_text("image,labels,scores\n")
    with pytest.raises(UserError, match="unfinished --predict with other options"):
        _predict(run, data / "images", "--output", tmp_path / "busy")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=r"is a file where a folder is needed; give --output a place you can write "
                                        r"to\.$"):
        _predict(run, data / "images", "--output", tmp_path / "a_file" / "o")
    monkeypatch.setattr(predict, "_append", lambda table, rows: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(Interrupted, match="^0 of 34 images are tagged"):
        _predict(run, data / "images", "--output", tmp_path / "none")


def test_without_thresholds_the_run_uses_one_half_under_its_own_rule_and_says_so(tmp_path, capsys):
    from conftest import make_run, write_dataset

    data = write_dataset(tmp_path / "tiny")
    flat = make_run(tmp_path / "runs", data, sharpen=0.0)  # a zero head: every score exactly 0.5
    for compare, labels in (("ge", 5), ("gt", 0)):
        config = json.loads((flat / "config.json").read_text())
        (flat / "config.json").write_text(json.dumps({**config, "threshold_compare": compare}))
        rows = _predict(flat, data / "images" / "10000.jpeg", "--output", tmp_path / compare)
        assert len(rows[0]["labels"]) == labels and all(x["score"] == 0.5 for x in rows[0]["labels"])
        assert "has no fitted thresholds yet (run --evaluate first); using 0.5 for every label" in capsys.readouterr().out
    with pytest.raises(UserError, match="was made with TinyResNet, but ResNet18 was asked for"):
        _predict(flat, data / "images", "--model", "ResNet18", "--output", tmp_path / "m")


def test_a_model_with_non_finite_scores_names_three_images_and_leaves_nothing(tmp_path):
    from conftest import make_run, write_dataset

    data = write_dataset(tmp_path / "tiny")
    broken = make_run(tmp_path / "runs", data, sharpen=float("nan"))
    with pytest.raises(UserError) as error:
        _predict(broken, data / "images", "--output", tmp_path / "nan", "--batch-size", "5")
    assert str(error.value) == (f"'{broken}' gives non-finite scores (NaN or inf) for 5 of 5 images of a batch "
                                f"(0.jpeg, 1.jpeg, 10.jpeg); the model file may be damaged: export or train it again. "
                                f"Nothing of that batch was written.")
    assert not list(tmp_path.glob("nan*"))


def test_a_batch_of_unreadable_images_only_and_a_score_floor_at_the_score(fast, tmp_path, capsys):
    run, data = fast
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpeg").write_bytes((data / "images" / "10000.jpeg").read_bytes())
    (folder / "b.jpg").write_bytes(b"broken")
    rows = _predict(run, folder, "--batch-size", "1", "--output", tmp_path / "t")
    assert [Path(r["image"]).name for r in rows] == ["a.jpeg"]
    assert f"{folder / 'b.jpg'}  (unreadable, skipped: UnidentifiedImageError" in capsys.readouterr().out
    probs = torch.tensor([0.3, 0.6])
    assert predict.annotate(probs, torch.tensor([0.1, 0.1]), ["x", "y"], min_score=0.3) == [
        {"label": "y", "score": 0.6}, {"label": "x", "score": 0.3}]  # a score equal to the floor is kept


def test_top_k_and_a_score_floor_reach_every_row_of_a_folder(fast, tmp_path):
    run, data = fast
    every = _predict(run, data / "images", "--top-k", "5", "--output", tmp_path / "all")  # every label, by score
    assert all(len(r["labels"]) == 5 and [x["score"] for x in r["labels"]] ==
               sorted((x["score"] for x in r["labels"]), reverse=True) for r in every)
    tops = sorted(r["labels"][0]["score"] for r in every)
    floor = (tops[8] + tops[9]) / 2  # a floor above the best label of 9 images
    two = _predict(run, data / "images", "--top-k", "2", "--output", tmp_path / "two")
    assert [r["labels"] for r in two] == [r["labels"][:2] for r in every]
    floored = _predict(run, data / "images", "--top-k", "3", "--min-score", floor, "--output", tmp_path / "floor")
    expected = [[x for x in r["labels"][:3] if x["score"] >= floor] for r in every]
    assert [r["labels"] for r in floored] == expected
    assert min(map(len, expected)) == 0 < max(map(len, expected))  # the floor empties some images, not all


def test_overwrite_of_an_output_that_does_not_exist_yet_and_refusal_by_default(fast, tmp_path):
    run, data = fast
    rows = _predict(run, data / "images", "--output", tmp_path / "new", "--overwrite")  # nothing to replace: fine
    assert len(rows) == 34 and (tmp_path / "new.json").is_file()
    (tmp_path / "stale.csv").write_text("image,labels,scores\nghost.jpg,[],[]\n")  # no marker: not a resume
    assert _predict(run, data / "images", "--output", tmp_path / "stale") == rows
    assert "ghost.jpg" not in (tmp_path / "stale.csv").read_text()
    (tmp_path / "new.csv").unlink()  # a finished output whose table the user deleted: still replaced
    assert _predict(run, data / "images", "--output", tmp_path / "new", "--overwrite") == rows
    runtime = predict.Runtime(num_workers=0, progress=False)
    with pytest.raises(UserError, match="is a finished --predict output"):
        predict.predict_paths(data / "images", run, runtime, tmp_path / "new")  # overwrite is off unless asked


def test_a_resumed_output_whose_continuation_fails_keeps_its_rows(fast, tmp_path, monkeypatch):
    run, data = fast
    interrupt_after_first_batch(monkeypatch)
    with pytest.raises(Interrupted, match="^8 of 34"):
        _predict(run, data / "images", "--output", tmp_path / "part", "--batch-size", "8")
    kept = (tmp_path / "part.csv").read_text()

    def fails(*args, **kwargs):
        raise UserError("the model gives non-finite scores")

    monkeypatch.setattr(predict, "_tag", fails)
    with pytest.raises(UserError, match="non-finite"):
        _predict(run, data / "images", "--output", tmp_path / "part", "--batch-size", "8")
    assert (tmp_path / "part.csv").read_text() == kept and (tmp_path / "part.partial.json").is_file()


def test_the_progress_bar_counts_every_image_of_the_folder(fast, capsys):
    from main import get_args_parser, main

    run, data = fast
    main(get_args_parser().parse_args(["--predict", str(data / "images"), "--checkpoint", str(run),
                                       "--num-workers", "0", "--batch-size", "8"]))
    captured = capsys.readouterr()
    bar = captured.err.replace("\r", "\n").splitlines()
    assert any(line.startswith("annotating: 100%") and "34/34" in line and "img/s" in line for line in bar)
    assert not any(" 35/34" in line or "/None" in line for line in bar)
    assert "café" not in captured.out  # with a bar, no line per image
    _predict(run, data / "images", "--output", run / "quiet")  # --no-progress: no bar at all
    assert "annotating" not in capsys.readouterr().err
    folder = run / "mixed"  # an unreadable file counts on the bar too: it ends at the folder's count
    folder.mkdir()
    for name in sorted(p.name for p in (data / "images").iterdir())[:3]:
        (folder / name).symlink_to(data / "images" / name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    main(get_args_parser().parse_args(["--predict", str(folder), "--checkpoint", str(run), "--num-workers", "0",
                                       "--output", str(run / "mixed_tags")]))
    assert any(line.startswith("annotating: 100%") and "4/4" in line
               for line in capsys.readouterr().err.replace("\r", "\n").splitlines())
    # The reason given for a file that fails in the loader but reads when asked again (a copy still being written).
    assert predict.unreadable_reason(data / "images" / "10000.jpeg") == "unreadable"


def test_an_interruption_between_batches_resumes_after_its_last_complete_line(fast, tmp_path, monkeypatch, capsys):
    run, data = fast
    real = predict._append

    def stop_after_two(table, rows):
        real(table, rows)
        if (tmp_path / "o.csv").read_text().count("\n") > 16:
            raise KeyboardInterrupt  # the table ends with a complete line: nothing of it is dropped

    monkeypatch.setattr(predict, "_append", stop_after_two)
    with pytest.raises(Interrupted, match="^16 of 34"):
        _predict(run, data / "images", "--output", tmp_path / "o", "--batch-size", "8")
    monkeypatch.setattr(predict, "_append", real)
    capsys.readouterr()
    rows = _predict(run, data / "images", "--output", tmp_path / "o", "--batch-size", "8")
    assert f"Resuming: 16 of 34 images are already in {tmp_path / 'o.csv'}." in capsys.readouterr().out
    assert len(rows) == 34 and len((tmp_path / "o.csv").read_text().splitlines()) == 1 + 34


def test_an_interrupted_overwrite_leaves_no_stale_finished_output(fast, tmp_path, monkeypatch):
    run, data = fast
    (tmp_path / "old.json").write_text("[]")
    (tmp_path / "old.csv").write_text("image,labels,scores\nghost.jpg,[],[]\n")
    monkeypatch.setattr(predict, "_append", lambda table, rows: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(Interrupted, match="^0 of 34 images are tagged"):
        _predict(run, data / "images", "--output", tmp_path / "old", "--overwrite")
    # The old output was removed before tagging began: what is left is the new, unfinished one, which a rerun continues.
    assert not (tmp_path / "old.json").exists() and (tmp_path / "old.partial.json").is_file()
    assert "ghost.jpg" not in (tmp_path / "old.csv").read_text()


def test_an_unfinished_onnx_output_is_continued_by_that_file_only(evaluated_run, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import shutil

    run, data = evaluated_run
    cli(["--export", "onnx", "--checkpoint", str(run), "--output", str(tmp_path / "a.onnx")])
    shutil.copy(tmp_path / "a.onnx", tmp_path / "b.onnx")  # same model and thresholds, another file
    real = interrupt_after_first_batch(monkeypatch)
    with pytest.raises(Interrupted, match="^8 of 34"):
        tag(tmp_path / "a.onnx", data / "images", tmp_path / "o", "--batch-size", "8")
    monkeypatch.setattr(predict, "_append", real)
    assert json.loads((tmp_path / "o.partial.json").read_text())["source"] == str(tmp_path / "a.onnx")
    with pytest.raises(UserError, match="is from an unfinished --predict with other options"):
        tag(tmp_path / "b.onnx", data / "images", tmp_path / "o")
    assert len(tag(tmp_path / "a.onnx", data / "images", tmp_path / "o")) == 34
