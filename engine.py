"""Training and evaluation loops.

Functions take explicit objects (model, loader, loss, optimiser, device) and return dicts of floats (or tensors
of predictions); they never read or change the command-line arguments. Batches arrive as uint8 (B, 3, S, S) and
are converted, flipped and normalised on the compute device, so the loader moves 4x fewer bytes than float32.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from distributed import gather_predictions
from losses import reduction_factor
from metrics import compute_metrics
from utils import GracefulStop, UserError


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteOutputError(UserError, FloatingPointError):
    """A model's scores are NaN or infinite (damaged weights, or a diverged run)."""


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and memory format."""

    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), as torch detects them."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # an older torch, or a CPU it cannot query
        return False


def resolve_precision(amp: str, channels_last: str, device: torch.device, training: bool = False,
                      train_bf16: bool = False) -> Precision:
    """Turn the --amp / --channels-last choices into a Precision for `device`.

    'auto' means, as bench/run.py measured: on CUDA bf16 (fp16 where bf16 is unsupported) and channels_last. On a CPU
    with native bf16 (`cpu_has_native_bf16`): channels_last, with bf16 autocast for evaluation and prediction (about
    2x) and for `training` only when `train_bf16` (measured faster on this CPU: cpu_precision.train_bf16). On other
    CPUs fp32 NCHW, the fastest there.
    """
    cuda = device.type == "cuda"
    native = not cuda and cpu_has_native_bf16()
    if amp == "auto":
        if cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if native and (train_bf16 or not training) else None
    else:
        dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if dtype is torch.float16 and not cuda:
        raise UserError("--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none.")
    cl = (cuda or native) if channels_last == "auto" else channels_last == "on"
    return Precision(dtype, cl)


class BatchPreprocessor:
    """uint8 (B, 3, S, S) on any device -> normalised float (B, 3, S, S) on `device`, optionally flipped.

    Flips are given per batch as a bool mask (see `epoch_flips`): (B, 2) = (horizontal, vertical) per image, or
    (B,) horizontal only. They depend only on (seed, epoch, image), not on batch order, worker count, device or
    where an interrupted run resumed.
    """

    def __init__(self, mean, std, device: torch.device, precision: Precision = Precision()):
        self.device = device
        self.precision = precision
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0  # (1, 3, 1, 1), on the uint8 scale
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()  # (B, 3, S, S) in [0, 255]
        if flip is not None:
            flip = flip.to(self.device).view(x.shape[0], -1)  # (B, 1) or (B, 2)
            x = torch.where(flip[:, 0].view(-1, 1, 1, 1), x.flip(3), x)  # horizontal: reverse the columns
            if flip.shape[1] > 1 and bool(flip[:, 1].any()):
                x = torch.where(flip[:, 1].view(-1, 1, 1, 1), x.flip(2), x)  # vertical: reverse the rows
        x = (x - self.mean) / self.std
        if self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def epoch_flips(num_images: int, seed: int, epoch: int, horizontal: bool = True,
                vertical: bool = False) -> torch.Tensor:
    """Flip decisions of every training image in `epoch`: bool (N, 2) = (horizontal, vertical), each p = 0.5 when
    enabled (all False otherwise), from (seed, epoch) alone; the two columns are independent draws."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    h = torch.rand(num_images, generator=generator) < 0.5  # the first draw: the horizontal flips
    v = torch.rand(num_images, generator=generator) < 0.5
    return torch.stack([h & horizontal, v & vertical], dim=1)  # (N, 2)


@dataclass
class EpochProgress:
    """Where an epoch stands: batches done and the running loss; saved in mid-epoch checkpoints."""

    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0


def _split_batch(batch):
    images, targets, indices, ok = batch
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        keep = ok.nonzero().flatten()
        return images[keep], targets[keep], indices[keep], indices[bad].tolist()
    return images, targets, indices, []


class UndoPoint:
    """What a batch changes before its optimiser step, kept so that an interrupted batch can be undone: the
    BatchNorm running statistics (updated by the forward pass) and the RNG (dropout draws from it). `mark()` before
    each batch (one fused copy), `undo()` puts them back."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.device = device
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]
        self.saved = [torch.empty_like(b) for b in self.buffers]

    def mark(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def undo(self) -> None:
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.saved)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device, preprocess: BatchPreprocessor, *, epoch: int,
                    flips: torch.Tensor | None = None, scheduler=None, scaler: torch.amp.GradScaler | None = None,
                    ema=None, state: EpochProgress | None = None, progress: bool = True,
                    bad_images: list | None = None, freeze_bn: bool = False,
                    stop: GracefulStop | None = None) -> dict[str, float]:
    """One pass over `loader`; returns {'train/loss': mean loss per image, 'train/images_per_s', 'lr'}.

    `flips` (N,) bool: per-image horizontal flips for this epoch (None = no flips). `state` is updated after
    every batch, so a caller that catches KeyboardInterrupt knows how far the epoch got; a resumed epoch passes
    the saved state and a loader that starts at `state.step`. Steps the scheduler per batch (OneCycleLR).
    Indices of unreadable images skipped by the loader are appended to `bad_images`. Raises
    NonFiniteLossError naming the epoch and batch if the loss is NaN or infinite. `freeze_bn` keeps the BatchNorm
    layers in eval mode (running statistics fixed and used; their affine parameters still train).

    Ctrl-C: `stop` (a GracefulStop) is checked before each batch, and a batch's optimiser step and bookkeeping run as
    one critical block; a KeyboardInterrupt raised inside a batch before its step undoes what the batch changed
    (UndoPoint), so `state` and the model are always those before the batch: a resumed epoch is bit-identical.
    """
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    state = state if state is not None else EpochProgress()
    start, seen_before = time.perf_counter(), state.seen
    bar = tqdm(loader, desc=f"epoch {epoch + 1} train", leave=False, disable=not progress, dynamic_ncols=True,
               initial=state.step, total=state.step + len(loader))
    undo = UndoPoint(model, device)
    for batch in bar:
        if stop is not None:
            stop.check()
        images, targets, indices, bad = _split_batch(batch)
        loss = None
        if images.shape[0] > 0:
            undo.mark()
            try:
                loss = _forward_backward(model, criterion, optimizer, preprocess, scaler, images, targets,
                                         flips[indices] if flips is not None else None, device)
            except KeyboardInterrupt:
                undo.undo()
                raise
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"The training loss became {loss.item()} at epoch {epoch + 1}, batch {state.step + 1}; the last "
                    f"good checkpoint is kept. Lower --learning-rate, or check the data and the loss settings.")
        with stop.critical() if stop is not None else nullcontext():
            if loss is not None:
                _optimiser_step(optimizer, scaler)
                if ema is not None:
                    ema.update_parameters(model)
                # Accumulate the batch's summed loss, whatever the reduction, to report a per-image mean.
                state.loss_sum += loss.item() * reduction_factor(criterion.reduction, *targets.shape)
                state.seen += images.shape[0]
            if bad_images is not None:
                bad_images.extend(bad)
            # The schedule advances once per batch even for an all-bad batch, so its length stays as planned.
            if scheduler is not None:
                scheduler.step()
            state.step += 1
        if state.seen:
            bar.set_postfix(loss=f"{state.loss_sum / state.seen:.4f}")
    elapsed = time.perf_counter() - start
    return {"train/loss": state.loss_sum / max(state.seen, 1),
            "train/images_per_s": (state.seen - seen_before) / max(elapsed, 1e-9),
            "lr": optimizer.param_groups[0]["lr"]}


def _forward_backward(model, criterion, optimizer, preprocess, scaler, images, targets, flips, device) -> torch.Tensor:
    """One batch's loss (a 0-d float32 tensor), its gradients left in the parameters (scaled under fp16)."""
    x = preprocess(images, flips)
    targets = targets.to(device, non_blocking=True)
    with preprocess.precision.autocast(device):
        logits = model(x)  # (B, C)
    loss = criterion(logits.float(), targets)
    if torch.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss


def _optimiser_step(optimizer, scaler) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, preprocess: BatchPreprocessor, *,
            desc: str = "predict", progress: bool = True, flips: torch.Tensor | None = None,
            stop: GracefulStop | None = None, source: str = "The model") -> dict[str, torch.Tensor]:
    """Run `model` over `loader`; returns {'logits': (N, C), 'probs': (N, C), 'targets': (N, C), 'indices': (N,)} on CPU, float32.

    Rows are in dataset-index order, one per sample; under torchrun every rank's rows are gathered (each rank
    then holds all of them) and the sampler's padding is removed. Unreadable images (skipped by the loader) are
    left out and listed in 'bad' (N_bad,). `flips` (N, 2), indexed by dataset index, flips the images as in
    training (the study fits its thresholds on training images through the training transform).
    """
    model.eval()
    logits, targets, indices, bad = [], [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        if stop is not None:
            stop.check()
        images, target, index, bad_here = _split_batch(batch)
        bad.extend(bad_here)
        if images.shape[0] == 0:
            continue
        with preprocess.precision.autocast(device):
            out = model(preprocess(images, flips[index] if flips is not None else None))
        logits.append(out.float().cpu())
        targets.append(target.float())
        indices.append(index)
    num_classes = loader.dataset.split.targets.shape[1]
    out = gather_predictions({
        "logits": torch.cat(logits) if logits else torch.empty(0, num_classes),  # (N, C)
        "targets": torch.cat(targets) if targets else torch.empty(0, num_classes),
        "indices": torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
        "bad": torch.tensor(bad, dtype=torch.long)})
    if out["logits"].shape[0] == 0:
        raise UserError("No readable images were left to evaluate; check the images of this split.")
    bad_rows = ~torch.isfinite(out["logits"]).all(dim=1)  # (N,)
    if bool(bad_rows.any()):
        raise NonFiniteOutputError(f"{source} gives non-finite scores (NaN or inf) for {int(bad_rows.sum())} of "
                                   f"{len(bad_rows)} images of {desc}; its weights may be damaged (train again, or "
                                   f"resume from an earlier last.pth).")
    out["probs"] = torch.sigmoid(out["logits"])
    return out


def evaluate(model: nn.Module, loader, criterion: nn.Module, device: torch.device, preprocess: BatchPreprocessor, *,
             thresholds: float | torch.Tensor = 0.5, prefix: str = "val", progress: bool = True,
             strict: bool = False, epsilon: float = 0.0, stop: GracefulStop | None = None) -> dict[str, float]:
    """Loss per image and the metrics of metrics.compute_metrics (`strict`, `epsilon` as there) on `loader`, keys
    prefixed with `prefix/`; `stop` as in `predict`."""
    start = time.perf_counter()
    out = predict(model, loader, device, preprocess, desc=prefix, progress=progress, stop=stop)
    n = out["targets"].shape[0]
    loss = criterion(out["logits"], out["targets"]).item()
    # Report the loss per image whatever the criterion's reduction, so runs with other batch sizes compare.
    per_image = loss * reduction_factor(criterion.reduction, *out["targets"].shape) / n
    result = {f"{prefix}/loss": per_image if math.isfinite(per_image) else float("nan")}
    metrics = compute_metrics(out["targets"], out["probs"], thresholds, strict=strict, epsilon=epsilon)
    result.update({f"{prefix}/{k}": v for k, v in metrics.items()})
    result[f"{prefix}/images_per_s"] = n / max(time.perf_counter() - start, 1e-9)
    return result
