"""Whether bf16 autocast trains faster on this CPU: measured on the run's own model, cached per CPU and backbone.

On CPUs with native bf16 (AVX-512 BF16, AMX; engine.cpu_has_native_bf16) evaluation always gains from bf16 autocast
+ channels_last (about 2x), but training does not: bench/run.py measured bf16 training 1.5-2x faster on an AMD EPYC
with AVX-512 BF16 and 0.3-0.8x on an Intel Xeon with AMX. So `--amp auto` decides training per CPU and model: before
the first epoch `probe` times a few forward + backward steps of a copy of the model in fp32 and in bf16 (both
channels_last) on synthetic batches of the run's size, and bf16 is used only when it is clearly faster. The probe
changes neither the model nor the random number streams; the result is cached per machine in
$XDG_CACHE_HOME/image-annotation/precision.json (default ~/.cache; key: CPU model, torch version, backbone, head, image
and batch size), and the run records its choice in config.json so that a resumed run keeps it.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from distributed import say
from engine import BatchPreprocessor, Precision
from utils import atomic_write_json

CLEARLY_FASTER = 0.95  # bf16 must take at most this fraction of fp32's time per step
PROBE_STEPS = 3


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(model: torch.nn.Module, criterion, mean, std, image_size: int, batch: int, num_classes: int,
          steps: int = PROBE_STEPS) -> dict[str, float]:
    """Seconds per training step (forward + backward, no optimiser step) of a copy of `model` in fp32 and in bf16
    autocast, both channels_last, on a synthetic uint8 batch: {"fp32": s, "bf16": s}, the median of `steps` steps
    each after one warm-up, fp32 and bf16 interleaved. The model, its buffers and the RNG are left as they were."""
    cpu = torch.device("cpu")
    state = torch.get_rng_state()
    clone = copy.deepcopy(model).to(cpu).train().to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    targets = (torch.rand(batch, num_classes, generator=generator) < 0.05).float()  # (B, C)
    variants = {"fp32": Precision(None, True), "bf16": Precision(torch.bfloat16, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(1 + steps):
            for name, precision in variants.items():
                preprocess = BatchPreprocessor(mean, std, cpu, precision)
                start = time.perf_counter()
                with precision.autocast(cpu):
                    logits = clone(preprocess(images))  # (B, C)
                criterion(logits.float(), targets).backward()
                clone.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_rng_state(state)
    return {name: sorted(values[1:])[len(values[1:]) // 2] for name, values in times.items()}


def cache_dir() -> Path:
    """Where this machine's measurements are kept: $XDG_CACHE_HOME/image-annotation (default ~/.cache/...)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image-annotation"


def train_bf16(model: torch.nn.Module, criterion, mean, std, config: dict, num_classes: int) -> bool:
    """Whether the run trains in bf16 on this CPU: from the cache, else `probe` (saying what it measured)."""
    key = (f"{cpu_model()} | torch {torch.__version__} | {config['model']} | {config['head']} | "
           f"{config['image_size']} px | batch {config['batch_size']}")
    path = cache_dir() / "precision.json"
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cached = {}
    if key not in cached:
        seconds = probe(model, criterion, mean, std, config["image_size"], config["batch_size"], num_classes)
        cached[key] = {**seconds, "use_bf16": seconds["bf16"] < CLEARLY_FASTER * seconds["fp32"]}
        atomic_write_json(path, cached)
    choice = cached[key]
    say(f"--amp auto on this CPU ({cpu_model()}, native bf16): a training step takes {choice['fp32']:.3f} s in fp32 "
          f"and {choice['bf16']:.3f} s in bf16, so this run trains in {'bf16' if choice['use_bf16'] else 'fp32'} "
          f"(channels_last either way; measured once, cached in {path}).")
    return bool(choice["use_bf16"])
