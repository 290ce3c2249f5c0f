"""A trained annotator as one ONNX file, and running it with ONNX Runtime alone.

`export_onnx` writes <run>/model.onnx (or --output): a graph from uint8 images (B, 3, S, S), RGB, resized to S x S
bilinearly (dataset.load_image does exactly this), to label probabilities (B, C); the normalisation and the sigmoid are
inside. Its metadata holds what a user needs besides the graph: the vocabulary, the fitted thresholds and their
comparison rule, the input size and the normalisation (all JSON). Before the file is written, ONNX Runtime's
probabilities are compared with PyTorch's on a batch of real images and the export is refused if any differs by
1e-4 or more.

`OnnxAnnotator` runs such a file with onnxruntime (and numpy); it needs neither timm nor the training code.
onnx and onnxruntime are optional: without them, one sentence says what to install.
"""
from __future__ import annotations

import importlib
import io
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distributed import World
from utils import UserError, atomic_write_bytes, check_writable, first_sentence

TOLERANCE = 1e-4  # max |p_onnx - p_torch| accepted on the check batch
OPSET = 17


class ExportError(UserError, RuntimeError):
    """An export or an ONNX file that cannot be used as asked."""


def _require(package: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ExportError(f"ONNX export and inference need the optional package {package.split('.')[0]}; run "
                          f"`pip install onnx onnxruntime` (both are in requirements.txt).") from None


class Annotator(nn.Module):
    """uint8 images (B, 3, S, S) -> probabilities (B, C): (x / 255 - mean) / std, the model, then the sigmoid."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        # The wrapper too: the exporter restores the wrapper's mode afterwards, which would put the model back in
        # training mode (BatchNorm on batch statistics) for the PyTorch side of the check.
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model((images.float() - self.mean) / self.std))


def onnx_bytes(annotator: Annotator, image_size: int, metadata: dict[str, str]) -> bytes:
    """The ONNX serialisation of `annotator` with a dynamic batch axis and `metadata` as metadata_props."""
    onnx = _require("onnx")
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its successor; it needs no onnxscript
        torch.onnx.export(annotator, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def export_onnx(model: nn.Module, mean, std, image_size: int, vocabulary: list[str], thresholds: torch.Tensor,
                compare: str, check_images: torch.Tensor, path: Path | None) -> dict:
    """The ONNX file of `model`, once ONNX Runtime agrees with PyTorch on `check_images` (B, 3, S, S) uint8, written
    to `path` (atomically; None: not written); returns {"path", "bytes", "max_abs_difference", "images"}."""
    annotator = Annotator(model.cpu(), mean, std)
    metadata = {"vocabulary": json.dumps(vocabulary), "thresholds": json.dumps([float(t) for t in thresholds]),
                "threshold_compare": compare, "image_size": str(image_size),
                "mean": json.dumps([float(v) for v in mean]), "std": json.dumps([float(v) for v in std]),
                "input": f"uint8 RGB (batch, 3, {image_size}, {image_size}), each image resized to "
                         f"{image_size} x {image_size} bilinearly; output: label probabilities (batch, labels)"}
    data = onnx_bytes(annotator, image_size, metadata)
    with torch.no_grad():
        expected = annotator(check_images).numpy()  # (B, C)
    got = OnnxAnnotator(data).probabilities(check_images.numpy())
    if not (np.isfinite(expected).all() and np.isfinite(got).all()):
        raise ExportError(f"The model gives non-finite probabilities (NaN or inf) on the check images (PyTorch: "
                          f"{int((~np.isfinite(expected)).any(1).sum())}, ONNX Runtime: "
                          f"{int((~np.isfinite(got)).any(1).sum())} of {len(got)}); its weights may be damaged. The "
                          f"file was not written.")
    difference = float(np.abs(got - expected).max())
    if not difference < TOLERANCE:
        raise ExportError(f"ONNX Runtime's probabilities differ from PyTorch's by {difference:.2e} (>= {TOLERANCE:g}) "
                          f"on {len(check_images)} images; the file was not written.")
    if path is not None:
        atomic_write_bytes(path, data)
    return {"path": str(path), "bytes": data, "max_abs_difference": difference, "images": len(check_images)}


# ---------------------------------------------------------------- int8: static quantisation, measured before written

class _Batches:
    """onnxruntime's CalibrationDataReader protocol over uint8 images (N, 3, S, S), `batch` at a time."""

    def __init__(self, images: np.ndarray, batch: int):
        self.batches = iter([{"images": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


# The operators quantised: the convolutions with their activations and residual additions, where the time goes. The
# rest (the input's normalisation, TF-style padding arithmetic, pooling, the classifier, the sigmoid) stays fp32:
# quantising every operator ONNX Runtime can cost the demo's EfficientNet-Lite0 (96 px) 10.5 mAP points, these 0.1
# (bench/int8_accuracy.py's run, measured when this was chosen).
QUANTIZED_OPS = ("Conv", "Relu", "Clip", "Add", "MaxPool")


def quantize_int8(model: bytes, calibration: np.ndarray, batch: int = 16) -> bytes:
    """`model` (ONNX bytes) quantised statically by ONNX Runtime: its pre-processing (shape inference and graph
    optimisation: 1.1-1.4x faster int8 on EfficientNet-Lite0 here, the same outputs), then QDQ format, per-channel int8
    weights, uint8 activations with MinMax ranges calibrated on `calibration` (N, 3, S, S) uint8 images, for the
    QUANTIZED_OPS only; the metadata kept."""
    onnx = _require("onnx")
    quantization = _require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (Path(folder) / f"{name}.onnx" for name in ("fp32", "prepared", "int8"))
        source.write_bytes(model)
        quant_pre_process(source, prepared)
        quantization.quantize_static(
            prepared, target, _Batches(calibration, batch), quant_format=quantization.QuantFormat.QDQ,
            per_channel=True, activation_type=quantization.QuantType.QUInt8, op_types_to_quantize=list(QUANTIZED_OPS),
            weight_type=quantization.QuantType.QInt8, calibrate_method=quantization.CalibrationMethod.MinMax)
        quantized = onnx.load(str(target))
    original = onnx.load_from_string(model)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(original.metadata_props)
    return quantized.SerializeToString()


def scores(model: bytes, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Probabilities (N, C) of `model` (ONNX bytes) on uint8 images (N, 3, S, S), run by ONNX Runtime."""
    annotator = OnnxAnnotator(model)
    return np.concatenate([annotator.probabilities(images[i:i + batch]) for i in range(0, len(images), batch)])


def accuracy(probs: np.ndarray, targets: np.ndarray, thresholds: torch.Tensor, compare: str) -> dict[str, float]:
    """{"mAP" (percent), "per_class/f1"} of probabilities (N, C) against targets (N, C) at the thresholds."""
    from metrics import compute_metrics

    result = compute_metrics(torch.from_numpy(targets).float(), torch.from_numpy(probs).float(), thresholds.float(),
                             strict=compare == "gt")
    return {"mAP": result["mAP"], "per_class/f1": result["per_class/f1"]}


class OnnxAnnotator:
    """An exported annotator run with ONNX Runtime: `probabilities(uint8 (B, 3, S, S)) -> (B, C)` and the metadata
    (vocabulary, thresholds, threshold_compare, image_size, mean, std)."""

    def __init__(self, source: str | Path | bytes, threads: int | None = None):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any failure to open the file becomes one sentence
            raise ExportError(f"'{source if not isinstance(source, bytes) else 'the exported model'}' cannot be "
                              f"opened by ONNX Runtime ({type(e).__name__}: {first_sentence(e)}).") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "vocabulary" not in meta:
            raise ExportError("This ONNX file was not exported by this repository (no vocabulary in its metadata); "
                              "export one with --export onnx --checkpoint RUN_DIR.")
        self.vocabulary = json.loads(meta["vocabulary"])
        self.thresholds = torch.tensor(json.loads(meta["thresholds"]), dtype=torch.float32)
        self.threshold_compare = meta["threshold_compare"]
        self.image_size = int(meta["image_size"])
        self.mean, self.std = json.loads(meta["mean"]), json.loads(meta["std"])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, S, S) -> float32 (B, C)."""
        return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]


def export_run(run_dir: Path, output: Path | None = None, data: str | None = None, model_name: str | None = None,
               quantize: str | None = None, max_map_drop: float = 1.0, calibration_images: int = 128,
               refit_thresholds: bool = False) -> dict:
    """--export onnx: the run's best.pth with the thresholds of its latest --evaluate (thresholds.json) as
    <run>/model.onnx or `output`, checked on up to 16 of the run's test images (`data`: --data, else the run's).
    With `quantize` "int8": <run>/model.int8.onnx instead (`export_int8`)."""
    # The run's model needs timm and runs.py; an exported file runs without them (OnnxAnnotator).
    from components import eval_loader, load_data
    from runs import load_run, load_thresholds, run_data, run_normalisation

    path = output if output else run_dir / ("model.int8.onnx" if quantize else "model.onnx")
    check_writable(path.parent, "give --output a place you can write to")
    model, ckpt, config = load_run(run_dir, model_name, torch.device("cpu"))
    fitted = load_thresholds(run_dir, ckpt)
    if fitted is None:
        raise ExportError(f"{run_dir} has no fitted thresholds yet; run --evaluate --checkpoint {run_dir} first, so "
                          f"that the exported annotator carries them.")
    print(f"Thresholds: {fitted['source']}.", flush=True)
    splits = load_data(run_data(run_dir, config, data), config, True, World())
    loader = eval_loader(splits.test, config["image_size"], 16, 0, World(), torch.device("cpu"), True)
    images, _, _, ok = next(iter(loader))
    stats = run_normalisation(model, ckpt)
    done = export_onnx(model, stats["mean"], stats["std"], config["image_size"], ckpt["vocabulary"],
                       fitted["thresholds"], fitted["compare"], images[ok], None if quantize else path)
    print(f"ONNX Runtime and PyTorch agree to {done['max_abs_difference']:.1e} on {done['images']} test images.",
          flush=True)
    if not quantize:
        print(f"Wrote {path}.", flush=True)
        return done
    refit = fitted_split(run_dir, fitted) if refit_thresholds else None
    return export_int8(done["bytes"], path, splits, config, fitted, max_map_drop, calibration_images, refit)


def with_metadata(model: bytes, updates: dict[str, str]) -> bytes:
    """`model` (ONNX bytes) with its metadata entries `updates` set (added or replaced)."""
    onnx = _require("onnx")
    proto = onnx.load_from_string(model)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in updates]
    del proto.metadata_props[:]
    for key, value in [*kept, *updates.items()]:
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def load_split_images(split, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, S, S) and targets (N, C) of a dataset split, unreadable images left out."""
    from dataset import BadImageError, load_image

    images, targets = [], []
    for path, target in zip(split.paths, split.targets):
        try:
            images.append(load_image(path, image_size).numpy())
            targets.append(target.numpy())
        except BadImageError:
            continue
    return np.stack(images), np.stack(targets)


def fitted_split(run_dir: Path, fitted: dict) -> dict:
    """How the run's thresholds were fitted (`fitted`: runs.load_thresholds of the run): method, split, grid,
    fallback."""
    record = fitted["fitting"]
    if not {"method", "split", "grid", "fallback"} <= record.keys() or record["split"] == "cv":
        raise ExportError(f"--int8-thresholds refit needs the thresholds.json of an --evaluate by this version, fitted "
                          f"on train, val or train+val; run --evaluate --checkpoint {run_dir} again.")
    return record


def refit_int8_thresholds(int8: bytes, refit: dict, splits) -> torch.Tensor:
    """Thresholds (C,) fitted, as the run's were (method, grid, fallback), on the int8 model's own predictions of the
    run's fitting split (`refit`: fitted_split's record with the split's images and targets)."""
    from thresholds import fit_thresholds

    parts = {"train": [splits.train], "val": [splits.val], "train+val": [splits.train, splits.val]}[refit["split"]]
    loaded = [load_split_images(part, refit["image_size"]) for part in parts]
    images, targets = np.concatenate([x for x, _ in loaded]), np.concatenate([y for _, y in loaded])
    probs = torch.from_numpy(scores(int8, images))
    return fit_thresholds(refit["method"], torch.from_numpy(targets), probs,
                          grid=torch.tensor(refit["grid"], dtype=torch.float64), fallback=refit["fallback"]).float()


def calibration_sample(splits, config: dict, count: int) -> np.ndarray:
    """uint8 images (N, 3, S, S): a seeded sample (the run's seed) of `count` training originals."""
    originals = [i for i, source in enumerate(splits.train.sources) if source is None]
    order = torch.randperm(len(originals), generator=torch.Generator().manual_seed(config["seed"]))
    chosen = splits.train.subset([originals[int(j)] for j in order[:count]], "calibration")
    return load_split_images(chosen, config["image_size"])[0]


def export_int8(fp32: bytes, path: Path, splits, config: dict, fitted: dict, max_map_drop: float,
                calibration_images: int, refit: dict | None) -> dict:
    """Quantise, measure the int8 model's test-set mAP and per-class F1 beside fp32 (the run's thresholds, or with
    `refit` thresholds fitted on its own predictions), refuse when mAP drops by more than `max_map_drop` points
    (nothing written), else write `path` with the measurements and the settings in its metadata."""
    calibration = calibration_sample(splits, config, calibration_images)
    int8 = quantize_int8(fp32, calibration)
    test_images, test_targets = load_split_images(splits.test, config["image_size"])
    before = accuracy(scores(fp32, test_images), test_targets, fitted["thresholds"], fitted["compare"])
    int8_probs = scores(int8, test_images)
    after = accuracy(int8_probs, test_targets, fitted["thresholds"], fitted["compare"])
    drop = before["mAP"] - after["mAP"]
    summary = (f"test set ({len(test_images)} images): mAP {before['mAP']:.2f} fp32, {after['mAP']:.2f} int8; "
               f"per-class F1 {before['per_class/f1']:.4f} fp32, {after['per_class/f1']:.4f} int8")
    if not drop <= max_map_drop:
        raise ExportError(f"The int8 model loses {drop:.2f} mAP points ({summary}), more than --max-map-drop "
                          f"{max_map_drop:g}; nothing was written.")
    thresholds, measured = fitted["thresholds"], {"fp32": before, "int8": after, "mAP_drop": drop}
    if refit is not None:
        thresholds = refit_int8_thresholds(int8, {**refit, "image_size": config["image_size"]}, splits)
        measured["int8_refit"] = accuracy(int8_probs, test_targets, thresholds, fitted["compare"])
        summary += f"; {measured['int8_refit']['per_class/f1']:.4f} int8 with thresholds refitted on {refit['split']}"
    settings = {"format": "QDQ", "operators": list(QUANTIZED_OPS), "weights": "int8, per channel",
                "activations": "uint8", "calibration": "MinMax",
                "calibration_images": len(calibration), "calibration_seed": config["seed"],
                "thresholds": f"refitted on the int8 model's {refit['split']} predictions" if refit else "the run's"}
    data = with_metadata(int8, {"thresholds": json.dumps([float(t) for t in thresholds]),
                                "quantization": json.dumps(settings), "accuracy": json.dumps(measured)})
    atomic_write_bytes(path, data)
    print(f"Wrote {path}: {summary}.", flush=True)
    return {"path": str(path), "quantization": settings, "accuracy": measured}
