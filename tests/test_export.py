"""export.py, int8: a static quantised model calibrated on the run's training images, its test mAP and per-class F1
measured beside fp32 before anything is written, refused (nothing written) when it loses too much, tagging as the fp32
file does except within the quantisation error of a threshold, and its thresholds optionally refitted."""
import io
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import matthews_corrcoef

import export
from conftest import make_run, write_dataset
from dataset import load_image
from main import get_args_parser, main
from utils import UserError

pytest.importorskip("onnxruntime")
GRID = [round(0.05 * k, 2) for k in range(1, 15)]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    data = write_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=40, n_test=16)
    return make_run(tmp_path_factory.mktemp("runs"), data, thresholds=[0.35, 0.5, 0.42, 0.6, 0.28]), data


@pytest.fixture(scope="module")
def run_splits(exported_run):
    """The run's config and its dataset's splits (train, val, test), loaded once for the tests of the pieces."""
    from components import load_data
    from distributed import World
    from runs import load_config

    run_dir, data = exported_run
    config = load_config(run_dir)
    return config, load_data(str(data), config, False, World())


@pytest.fixture(scope="module")
def fp32_model(exported_run, tmp_path_factory):
    """The run exported to ONNX (bytes), once for the tests that feed it to the int8 pieces."""
    path = tmp_path_factory.mktemp("fp32") / "m.onnx"
    run_main("--export", "onnx", "--checkpoint", exported_run[0], "--output", path)
    return path.read_bytes()


def run_main(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def mcc_reference(probs, targets, grid, fallback):
    """Per-label thresholds recomputed with scikit-learn: the first grid point of highest MCC; a label whose MCC is 0
    at every point falls back to grid[0] ("first") or 0.5 ("default")."""
    chosen = []
    for c in range(targets.shape[1]):
        mcc = [matthews_corrcoef(targets[:, c], (probs[:, c] >= g).astype(int)) for g in grid]
        fallen_back = grid[0] if fallback == "first" else 0.5
        chosen.append(fallen_back if max(map(abs, mcc)) == 0 else grid[int(np.argmax(mcc))])
    return np.array(chosen)


def test_int8_tags_like_fp32_except_within_the_quantisation_error_of_a_threshold(exported_run, tmp_path):
    run_dir, data = exported_run
    run_main("--export", "onnx", "--checkpoint", run_dir, "--output", tmp_path / "model.onnx")
    done = run_main("--export", "onnx", "--quantize", "int8", "--checkpoint", run_dir, "--calibration-images", 16)
    int8_path = run_dir / "model.int8.onnx"
    assert done["path"] == str(int8_path) and int8_path.is_file()
    fp32, int8 = export.OnnxAnnotator(tmp_path / "model.onnx"), export.OnnxAnnotator(int8_path)
    assert int8.vocabulary == fp32.vocabulary and torch.equal(int8.thresholds, fp32.thresholds)
    names = sorted(p.name for p in (data / "images").iterdir())
    images = np.stack([load_image(data / "images" / n, 32).numpy() for n in names])  # (N, 3, S, S)
    p32, p8 = fp32.probabilities(images), int8.probabilities(images)
    error = float(np.abs(p8 - p32).max())
    assert 0 < error < 0.1  # quantised (not the same graph), and close
    t = fp32.thresholds.numpy()
    safe = np.abs(p32 - t) > error  # (N, C) decisions no quantisation error can flip
    assert safe.mean() > 0.5 and ((p32 >= t) != (p32 >= 0.5)).any()
    rows = {r["image"].rsplit("/", 1)[-1]: {x["label"] for x in r["labels"]}
            for r in run_main("--predict", data / "images", "--checkpoint", int8_path, "--num-workers", 0,
                              "--no-progress", "--output", tmp_path / "int8_tags")}
    for i, name in enumerate(names):
        for c, label in enumerate(fp32.vocabulary):
            if safe[i, c]:
                assert (label in rows[name]) == bool(p32[i, c] >= t[c]), (name, label)
    meta = int8.session.get_modelmeta().custom_metadata_map
    settings, measured = json.loads(meta["quantization"]), json.loads(meta["accuracy"])
    assert settings["format"] == "QDQ" and settings["calibration_images"] == 16 and settings["thresholds"] == "the run's"
    assert settings["operators"] == ["Conv", "Relu", "Clip", "Add", "MaxPool"]
    import onnx

    graph = onnx.load(str(int8_path)).graph
    initialisers = {i.name: i.data_type for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    classifier = [n for n in graph.node if n.op_type == "Gemm"]
    # Convolution weights int8 (behind a DequantizeLinear), the classifier's fp32: only QUANTIZED_OPS are quantised.
    weight_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert convs and all(initialisers.get(weight_of.get(n.input[1])) == onnx.TensorProto.INT8 for n in convs)
    assert classifier and all(initialisers.get(n.input[1]) == onnx.TensorProto.FLOAT for n in classifier)
    assert set(measured) == {"fp32", "int8", "mAP_drop"}
    assert measured["mAP_drop"] == pytest.approx(measured["fp32"]["mAP"] - measured["int8"]["mAP"])


def test_an_int8_model_that_loses_too_much_is_refused_and_nothing_is_written(exported_run, tmp_path):
    run_dir, _ = exported_run
    with pytest.raises(export.ExportError, match="more than --max-map-drop -100; nothing was written"):
        export.export_run(run_dir, tmp_path / "m.int8.onnx", quantize="int8", max_map_drop=-100, calibration_images=8)
    assert not (tmp_path / "m.int8.onnx").exists() and not list(tmp_path.iterdir())


def test_refitted_int8_thresholds_are_fitted_on_the_int8_models_own_predictions(exported_run, run_splits,
                                                                                tmp_path):
    run_dir, _ = exported_run
    export.export_run(run_dir, tmp_path / "refit.onnx", quantize="int8", calibration_images=8, refit_thresholds=True,
                      max_map_drop=100)  # 16 test images of a tiny model: the bound is not what is tested here
    int8 = export.OnnxAnnotator(tmp_path / "refit.onnx")
    val = run_splits[1].val  # thresholds.json: fitted on val
    images = np.stack([load_image(p, 32).numpy() for p in val.paths])
    p, y = int8.probabilities(images).astype(np.float64), val.targets.numpy().astype(int)
    np.testing.assert_allclose(int8.thresholds.numpy(), mcc_reference(p, y, GRID, "default"), atol=1e-6)
    meta = int8.session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["quantization"])["thresholds"] == "refitted on the int8 model's val predictions"
    assert "int8_refit" in json.loads(meta["accuracy"])


# ---------------------------------------------------------------- the fp32 file, every part (fast)

def test_the_exported_file_runs_any_batch_and_carries_what_a_user_needs(exported_run, tmp_path, capsys):
    run_dir, data = exported_run
    done = run_main("--export", "onnx", "--checkpoint", run_dir)
    path = run_dir / "model.onnx"  # the default place
    assert done["path"] == str(path) and done["images"] == 16 and 0 <= done["max_abs_difference"] < export.TOLERANCE
    out = capsys.readouterr().out
    assert f"ONNX Runtime and PyTorch agree to {done['max_abs_difference']:.1e} on 16 test images." in out
    assert out.splitlines()[-1] == f"Wrote {path}." and out.startswith("Thresholds: MCC thresholds fitted on val")
    annotator = export.OnnxAnnotator(path, threads=1)
    meta = annotator.session.get_modelmeta().custom_metadata_map
    assert meta["input"].startswith("uint8 RGB (batch, 3, 32, 32), each image resized to 32 x 32 bilinearly")
    import onnx

    assert [(o.domain, o.version) for o in onnx.load(str(path)).opset_import] == [("", 17)]  # as the README says
    assert (annotator.mean, annotator.std) == ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # TinyResNet's own
    assert annotator.thresholds.dtype == torch.float32 and annotator.image_size == 32
    images = np.stack([load_image(p, 32).numpy() for p in sorted((data / "images").iterdir())[:3]])
    three = annotator.probabilities(images)
    assert three.shape == (3, 5) and three.dtype == np.float32
    np.testing.assert_allclose(annotator.probabilities(images[1:2]), three[1:2], atol=1e-6)  # any batch size
    np.testing.assert_allclose(annotator.probabilities(images.astype(np.int64)), three, atol=1e-6)  # cast to uint8
    with pytest.raises(UserError, match="was made with TinyResNet, but ResNet18 was asked for"):
        run_main("--export", "onnx", "--checkpoint", run_dir, "--model", "ResNet18", "--output", tmp_path / "x.onnx")


def test_files_that_onnx_runtime_cannot_use_are_one_sentence(tmp_path):
    with pytest.raises(export.ExportError, match=r"^'the exported model' cannot be opened by ONNX Runtime "
                                                 r"\(InvalidProtobuf: .*protobuf parsing failed\)\.$"):
        export.OnnxAnnotator(b"not a model")
    (tmp_path / "x.onnx").write_bytes(b"not a model")
    with pytest.raises(export.ExportError, match=rf"^'{tmp_path / 'x.onnx'}' cannot be opened by ONNX Runtime \("
                                                 r"(InvalidProtobuf|Fail|RuntimeError)"):
        export.OnnxAnnotator(tmp_path / "x.onnx")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 4, 4))
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 3, 4, 4),), buffer, dynamo=False, input_names=["images"])
    with pytest.raises(export.ExportError, match=r"^This ONNX file was not exported by this repository \(no vocabulary "
                                                 r"in its metadata\); export one with --export onnx --checkpoint "
                                                 r"RUN_DIR\.$"):
        export.OnnxAnnotator(buffer.getvalue())


def test_a_model_with_non_finite_outputs_is_not_exported(tmp_path):
    data = write_dataset(tmp_path / "tiny")
    broken = make_run(tmp_path / "runs", data, thresholds=[0.5] * 5, sharpen=float("nan"))
    with pytest.raises(export.ExportError) as error:
        export.export_run(broken, tmp_path / "nan.onnx")
    assert str(error.value).startswith("The model gives non-finite probabilities (NaN or inf) on the check images "
                                       "(PyTorch: 10, ONNX Runtime: 10 of 10); its weights may be damaged.")
    assert not (tmp_path / "nan.onnx").exists()


def test_non_finite_outputs_of_onnx_runtime_alone_are_refused_and_counted(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "tiny")
    run_dir = make_run(tmp_path / "runs", data, thresholds=[0.5] * 5)
    real = export.OnnxAnnotator.probabilities

    def two_nan_rows(self, images):
        probs = real(self, images)
        probs[[1, 4], 2] = np.nan
        return probs

    monkeypatch.setattr(export.OnnxAnnotator, "probabilities", two_nan_rows)
    with pytest.raises(export.ExportError, match=r"^The model gives non-finite probabilities \(NaN or inf\) on the "
                                                 r"check images \(PyTorch: 0, ONNX Runtime: 2 of 10\)"):
        export.export_run(run_dir, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_check_images_skip_an_unreadable_test_image(tmp_path):
    data = write_dataset(tmp_path / "tiny")
    (data / "images" / "10003.jpeg").write_bytes(b"broken")
    run_dir = make_run(tmp_path / "runs", data, thresholds=[0.5] * 5)
    assert export.export_run(run_dir, tmp_path / "m.onnx")["images"] == 9  # 10 test images, one unreadable


def test_int8_is_what_its_metadata_says_seeded_and_bounded_inclusively(exported_run, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    run_dir, _ = exported_run
    first = export.export_run(run_dir, tmp_path / "a.int8.onnx", quantize="int8", calibration_images=16,
                              max_map_drop=100)
    assert first["quantization"] == {"format": "QDQ", "operators": ["Conv", "Relu", "Clip", "Add", "MaxPool"],
                                     "weights": "int8, per channel", "activations": "uint8", "calibration": "MinMax",
                                     "calibration_images": 16, "calibration_seed": 0, "thresholds": "the run's"}
    accuracy = first["accuracy"]
    assert set(accuracy) == {"fp32", "int8", "mAP_drop"}
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Wrote {tmp_path / 'a.int8.onnx'}: test set (16 images): mAP {accuracy['fp32']['mAP']:.2f} fp32, "
        f"{accuracy['int8']['mAP']:.2f} int8; per-class F1 {accuracy['fp32']['per_class/f1']:.4f} fp32, "
        f"{accuracy['int8']['per_class/f1']:.4f} int8.")
    graph = onnx.load(str(tmp_path / "a.int8.onnx")).graph
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dequantized if values.get(n.input[0]) is not None and values[n.input[0]].ndim == 4]
    assert weights and all(values[n.input[1]].size > 1 for n in weights)  # one scale per output channel
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(values[n.input[2]].dtype == np.uint8 for n in activations)
    (output,) = graph.output
    assert output.name == "probabilities" and output.type.tensor_type.shape.dim[0].dim_param == "batch"
    # The calibration sample is seeded: a second export is the same file; a bound equal to the drop is met.
    second = export.export_run(run_dir, tmp_path / "b.int8.onnx", quantize="int8", calibration_images=16,
                               max_map_drop=accuracy["mAP_drop"])
    assert (tmp_path / "b.int8.onnx").read_bytes() == (tmp_path / "a.int8.onnx").read_bytes()
    assert second["accuracy"] == accuracy


def test_a_run_without_fitted_thresholds_is_not_exported(tmp_path):
    data = write_dataset(tmp_path / "tiny", n_train=12, n_test=4)
    run_dir = make_run(tmp_path / "runs", data)  # trained, never evaluated
    with pytest.raises(export.ExportError) as error:
        export.export_run(run_dir, tmp_path / "m.onnx")
    assert str(error.value) == (f"{run_dir} has no fitted thresholds yet; run --evaluate --checkpoint {run_dir} "
                                f"first, so that the exported annotator carries them.")
    assert not (tmp_path / "m.onnx").exists()


def test_refitting_needs_to_know_how_the_run_was_fitted(tmp_path):
    data = write_dataset(tmp_path / "tiny", n_train=12, n_test=4)
    run_dir = make_run(tmp_path / "runs", data, thresholds=[0.35, 0.5, 0.42, 0.6, 0.28])
    record = json.loads((run_dir / "thresholds.json").read_text())
    (run_dir / "thresholds.json").write_text(json.dumps({**record, "split": "cv", "folds": 5}))
    with pytest.raises(export.ExportError, match=r"^--int8-thresholds refit needs the thresholds.json of an --evaluate "
                                                 r"by this version, fitted on train, val or train\+val; run --evaluate "
                                                 rf"--checkpoint {run_dir} again\.$"):
        export.export_run(run_dir, tmp_path / "m.int8.onnx", quantize="int8", refit_thresholds=True)
    assert not (tmp_path / "m.int8.onnx").exists()


# ---------------------------------------------------------------- the int8 pieces, each on its own (fast)

@pytest.mark.parametrize("compare", ["ge", "gt"])
def test_accuracy_is_sklearns_under_the_runs_rule_at_a_tie(compare):
    from sklearn.metrics import average_precision_score, precision_score, recall_score

    rng = np.random.default_rng(3)
    targets = (rng.random((40, 4)) < 0.4).astype(np.float32)
    targets[0], targets[1] = 1, 0  # every label has positives and negatives
    probs = rng.random((40, 4)).astype(np.float32)
    thresholds = torch.tensor([0.3, 0.45, 0.6, 0.7])
    # Ties at a threshold, one per label, on positives (labels 1, 3) and negatives (labels 0, 2).
    tie_rows = [int(np.flatnonzero(targets[:, c] == (c % 2))[0]) for c in range(4)]
    for c, row in enumerate(tie_rows):
        probs[row, c] = thresholds[c].item()
    predicted = probs > thresholds.numpy() if compare == "gt" else probs >= thresholds.numpy()
    other = probs >= thresholds.numpy() if compare == "gt" else probs > thresholds.numpy()
    assert (predicted != other).sum() == 4  # the rule decides the four ties
    p = precision_score(targets, predicted, average=None, zero_division=0).mean()
    r = recall_score(targets, predicted, average=None, zero_division=0).mean()
    got = export.accuracy(probs, targets, thresholds, compare)
    assert got["per_class/f1"] == pytest.approx(2 * p * r / (p + r), abs=1e-6)
    assert got["mAP"] == pytest.approx(100 * average_precision_score(targets, probs, average="macro"), abs=1e-4)


def test_calibration_batches_give_every_image_once_in_order():
    images = np.arange(7 * 3 * 2 * 2, dtype=np.uint8).reshape(7, 3, 2, 2)
    reader = export._Batches(images, 3)
    batches = [b["images"] for b in iter(reader.get_next, None)]
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert reader.get_next() is None


def test_split_images_leave_out_an_unreadable_one_and_keep_the_targets_in_step(tmp_path):
    from dataset import Split

    data = write_dataset(tmp_path / "tiny", n_train=6, n_test=2)
    paths = sorted((data / "images").iterdir())[:5]
    paths[1].write_bytes(b"broken")
    targets = torch.arange(5 * 2, dtype=torch.float32).view(5, 2)  # row i is (2i, 2i + 1): rows are told apart
    images, kept = export.load_split_images(Split("part", [p.name for p in paths], paths, targets), 32)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(kept, targets[[0, 2, 3, 4]].numpy())
    np.testing.assert_array_equal(images[1], load_image(paths[2], 32).numpy())


@pytest.mark.parametrize("split", ["train", "val", "train+val"])
def test_refitting_uses_the_runs_split_method_grid_and_fallback(fp32_model, run_splits, split):
    model, (_, splits) = fp32_model, run_splits
    parts = {"train": [splits.train], "val": [splits.val], "train+val": [splits.train, splits.val]}[split]
    images = np.concatenate([np.stack([load_image(p, 32).numpy() for p in part.paths]) for part in parts])
    targets = torch.cat([part.targets for part in parts]).numpy().astype(int)
    probs = export.OnnxAnnotator(model).probabilities(images)
    grid = [0.2, 0.35, 0.55, 0.9]  # not the default grid
    record = {"method": "mcc", "split": split, "grid": grid, "fallback": "first", "image_size": 32}
    got = export.refit_int8_thresholds(model, record, splits).numpy()
    expected = mcc_reference(probs, targets, grid, "first")
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert len(set(expected.tolist())) > 1 and not set(expected.tolist()) <= {0.5}
    assert not np.allclose(expected, mcc_reference(probs, targets, [round(0.05 * k, 2) for k in range(1, 20)],
                                                   "default"))


def test_int8_measures_every_score_under_the_runs_rule_and_says_the_refit(fp32_model, run_splits, tmp_path,
                                                                         monkeypatch, capsys):
    config, splits = run_splits
    monkeypatch.setattr(export, "quantize_int8", lambda model, calibration: model)  # the pieces around it
    rules = []
    real = export.accuracy
    monkeypatch.setattr(export, "accuracy", lambda *a: rules.append(a[3]) or real(*a))
    fitted = {"thresholds": torch.tensor([0.35, 0.5, 0.42, 0.6, 0.28]), "compare": "gt"}
    refit = {"method": "mcc", "split": "val", "grid": GRID, "fallback": "default"}
    done = export.export_int8(fp32_model, tmp_path / "m.int8.onnx", splits, config, fitted, 100, 8, refit)
    assert rules == ["gt", "gt", "gt"]  # fp32, int8, int8 refitted
    measured = done["accuracy"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Wrote {tmp_path / 'm.int8.onnx'}: test set (16 images): mAP {measured['fp32']['mAP']:.2f} fp32, "
        f"{measured['int8']['mAP']:.2f} int8; per-class F1 {measured['fp32']['per_class/f1']:.4f} fp32, "
        f"{measured['int8']['per_class/f1']:.4f} int8; {measured['int8_refit']['per_class/f1']:.4f} int8 with "
        f"thresholds refitted on val.")


def test_a_missing_onnxruntime_quantization_names_the_package_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)  # import fails as if not installed
    with pytest.raises(export.ExportError, match=r"^ONNX export and inference need the optional package onnxruntime; "
                                                 r"run `pip install onnx onnxruntime`"):
        export._require("onnxruntime.quantization")


def test_the_check_images_come_from_data_when_given_up_to_16_and_a_missing_one_is_skipped(tmp_path):
    run_dir = make_run(tmp_path / "runs", write_dataset(tmp_path / "tiny", n_train=12, n_test=10),
                       thresholds=[0.5] * 5)
    other = write_dataset(tmp_path / "other", n_train=12, n_test=20, seed=1)
    (other / "images" / "10004.jpeg").unlink()  # listed in test.json, missing: skipped, as --evaluate skips it
    assert export.export_run(run_dir, tmp_path / "own.onnx")["images"] == 10
    assert export.export_run(run_dir, tmp_path / "other.onnx", data=str(other))["images"] == 16  # of 19


def test_the_library_defaults_are_the_commands_and_errors_name_the_fix(tmp_path):
    import inspect

    parameters = inspect.signature(export.export_run).parameters
    defaults = get_args_parser().parse_args([])
    assert parameters["max_map_drop"].default == defaults.max_map_drop == 1.0
    assert parameters["calibration_images"].default == defaults.calibration_images == 128
    run_dir = make_run(tmp_path / "runs", write_dataset(tmp_path / "tiny", n_train=12, n_test=4),
                       thresholds=[0.5] * 5)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match=r"is a file where a folder is needed; give --output a place you can write "
                                        r"to\.$"):
        export.export_run(run_dir, tmp_path / "a_file" / "m.onnx")


def test_the_calibration_sample_is_seeded_by_the_runs_seed(run_splits):
    config, splits = run_splits
    for seed in (0, 3):
        got = export.calibration_sample(splits, {**config, "seed": seed}, 5)  # (5, 3, S, S)
        order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))[:5]
        expected = np.stack([load_image(splits.train.paths[int(i)], 32).numpy() for i in order])
        np.testing.assert_array_equal(got, expected)  # no GAN copies here: every training image is an original
    assert not np.array_equal(export.calibration_sample(splits, {**config, "seed": 3}, 5),
                              export.calibration_sample(splits, {**config, "seed": 0}, 5))


def test_a_missing_or_folder_onnx_path_says_what_it_is(tmp_path):
    with pytest.raises(export.ExportError, match=r"^'.*missing\.onnx' cannot be opened by ONNX Runtime "
                                                 r"\(FileNotFoundError: "):
        export.OnnxAnnotator(tmp_path / "missing.onnx")
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(export.ExportError, match=r"\(IsADirectoryError: "):
        export.OnnxAnnotator(tmp_path / "folder.onnx")
