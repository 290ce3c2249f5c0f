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

import io
import json
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
        return __import__(package)
    except ImportError:
        raise ExportError(f"ONNX export and inference need the optional package {package}; run "
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
                compare: str, check_images: torch.Tensor, path: Path) -> dict:
    """Write `path` (atomically) once ONNX Runtime agrees with PyTorch on `check_images` (B, 3, S, S) uint8; returns
    {"path", "max_abs_difference", "images"}."""
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
    atomic_write_bytes(path, data)
    return {"path": str(path), "max_abs_difference": difference, "images": len(check_images)}


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


def export_run(run_dir: Path, output: Path | None = None, data: str | None = None, model_name: str | None = None) -> dict:
    """--export onnx: the run's best.pth with the thresholds of its latest --evaluate (thresholds.json) as
    <run>/model.onnx or `output`, checked on up to 16 of the run's test images (`data`: --data, else the run's)."""
    # The run's model needs timm and runs.py; an exported file runs without them (OnnxAnnotator).
    from components import eval_loader, load_data
    from runs import load_run, load_thresholds, run_data, run_normalisation

    path = output if output else run_dir / "model.onnx"
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
                       fitted["thresholds"], fitted["compare"], images[ok], path)
    print(f"Wrote {path}: ONNX Runtime and PyTorch agree to {done['max_abs_difference']:.1e} on "
          f"{done['images']} test images.", flush=True)
    return done
