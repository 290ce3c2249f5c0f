"""Decoded-image cache: every image of a split decoded and resized once, kept as uint8 (N, 3, S, S).

The straightforward pipeline decodes each JPEG and resizes it with PIL in every epoch; at 448 px that costs more
than the training step of a small model on a CPU. Here each image goes through `dataset.load_image` exactly once
(so the cached tensors are bit-identical to the PIL path) and the loader only gathers uint8 rows; conversion to
float, flips and normalisation stay batched on the compute device (engine.BatchPreprocessor).

Two places for the array:

* ``memory``: a plain in-process array (DataLoader workers forked afterwards share its pages copy-on-write).
* ``disk``: a memory-mapped ``.npy`` under ``cache_dir``, for datasets larger than RAM allows. Its name carries
  `cache_key`: the split's fingerprint (dataset root, split name, image names, file sizes and mtimes, image
  size; `dataset.split_fingerprint`) and the decoder's identity (the code of `load_image`, the Pillow version),
  so a cache whose images, size or decoder changed is never opened; a new one is built beside it. The file is
  written under a temporary name and renamed only once complete, so an interrupted build is never used.

``auto`` picks memory when the decoded split fits in `memory_limit_bytes`, else disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import PIL
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import AnnotationDataset, BadImageError, Split, load_image, split_fingerprint, to_rgb
from utils import UserError, atomic_write_json

MODES = ("auto", "memory", "disk", "none")
# Bump when the layout of the cached array changes: old files then get a new key and are never read.
CACHE_FORMAT = 1
# `auto` keeps a split in memory up to this many decoded bytes (Corel-5k train at 448 px is 2.4 GB).
DEFAULT_MEMORY_LIMIT = 4 * 2**30
DECODE_BATCH = 32
FIRST_FEW = 5


class CacheError(UserError, ValueError):
    """A cache request the user can fix (unknown mode, no cache folder, not enough disk space, damaged file)."""


def cache_nbytes(num_images: int, image_size: int) -> int:
    """Bytes of the decoded split: N * 3 * S * S (uint8)."""
    return num_images * 3 * image_size * image_size


def _code_fingerprint(code: types.CodeType) -> str:
    """Bytecode, names and constants of `code`, nested code objects (comprehensions, lambdas) included.

    Line numbers and addresses are left out, so the text changes when the function is edited but not when lines
    above it move or the interpreter restarts.
    """
    consts = [_code_fingerprint(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts]
    return f"{code.co_code.hex()}|{code.co_names!r}|{consts!r}"


def _decoder_identity() -> str:
    """What decides the decoded pixels besides the files: the code of load_image and to_rgb, the Pillow version."""
    return f"{_code_fingerprint(load_image.__code__)}|{_code_fingerprint(to_rgb.__code__)}|Pillow {PIL.__version__}"


def cache_key(split: Split, image_size: int) -> str:
    """'<split>-<S>px-<16 hex digits>': sha1 of (CACHE_FORMAT, decoder identity, split_fingerprint(split, S)).

    Any change of an image file (size or mtime), of the list of images, of the dataset root, of the split name,
    of the image size or of the decoder gives another key.
    """
    h = hashlib.sha1(f"{CACHE_FORMAT}|{_decoder_identity()}|{split_fingerprint(split, image_size)}".encode())
    return f"{split.name}-{image_size}px-{h.hexdigest()[:16]}"


def cache_path(cache_dir: str | os.PathLike, split: Split, image_size: int) -> Path:
    """Where the disk cache of (split, image_size) lives: <cache_dir>/<cache_key>.npy."""
    return Path(cache_dir) / f"{cache_key(split, image_size)}.npy"


def resolve_cache_mode(mode: str, num_images: int, image_size: int,
                       memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT) -> str:
    """The mode `build_cache` will use: `mode` itself, or for 'auto' 'memory' when N*3*S*S <= the limit, else 'disk'."""
    if mode not in MODES:
        raise CacheError(f"Unknown cache mode '{mode}'; choose one of {', '.join(MODES)}.")
    if mode != "auto":
        return mode
    return "memory" if cache_nbytes(num_images, image_size) <= memory_limit_bytes else "disk"


def _check_request(split: Split, image_size: int, num_workers: int, memory_limit_bytes: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise CacheError(f"image_size must be a positive integer (got {image_size!r}), e.g. 448.")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise CacheError(f"num_workers must be an integer >= 0 (got {num_workers!r}).")
    if memory_limit_bytes < 0:
        raise CacheError(f"memory_limit_bytes cannot be negative (got {memory_limit_bytes}).")
    if not isinstance(split, Split):
        raise CacheError(f"build_cache needs a dataset.Split (got {type(split).__name__}).")


def _decode_into(out: np.ndarray, split: Split, image_size: int, num_workers: int, progress: bool) -> None:
    """Fill out (N, 3, S, S) uint8 with load_image of every image, in parallel over `num_workers` processes.

    Raises BadImageError naming the unreadable images (all of them are collected first, then reported at once).
    """
    # skip_bad_images=True only to collect every unreadable image for one message; none of them is cached.
    dataset = AnnotationDataset(split, image_size, skip_bad_images=True)
    loader = DataLoader(dataset, batch_size=DECODE_BATCH, shuffle=False, num_workers=num_workers)
    bad: list[int] = []
    start = 0
    for images, _, indices, ok in tqdm(loader, desc=f"caching {split.name} at {image_size}px", unit="batch",
                                       disable=not progress, leave=False, dynamic_ncols=True):
        stop = start + images.shape[0]
        # Sequential sampling: batch k holds images start..stop-1, so a slice assignment is exact and cheap.
        out[start:stop] = images.numpy()  # (b, 3, S, S) uint8
        bad.extend(indices[~ok].tolist())
        start = stop
    if bad:
        names = [split.image_names[i] for i in bad]
        try:
            load_image(split.paths[bad[0]], image_size)
            reason = "it could not be read"
        except BadImageError as e:
            reason = str(e)
        raise BadImageError(
            f"{len(bad)} of {len(split)} images of split '{split.name}' cannot be read (first few: "
            f"{', '.join(names[:FIRST_FEW])}; first error: {reason}); the decoded-image cache needs every image: "
            f"replace them, or train without the cache (--cache none) and with --skip-bad-images.")


def _load_disk_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Open a finished cache file as a copy-on-write memmap (writes stay private to the process, never reach the file)."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as e:
        raise CacheError(f"Cache file '{path}' cannot be opened ({type(e).__name__}: {e}); delete it and it will be "
                         f"rebuilt.") from None
    if array.shape != shape or array.dtype != np.uint8:
        raise CacheError(f"Cache file '{path}' holds {array.dtype} {array.shape}, not uint8 {shape}; it is damaged: "
                         f"delete it and it will be rebuilt.")
    return array


def _build_disk_cache(path: Path, split: Split, image_size: int, num_workers: int, progress: bool) -> None:
    """Decode into <path>.<random>.tmp in path's folder, then rename it to `path` (atomic on one file system)."""
    shape = (len(split), 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = cache_nbytes(len(split), image_size)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CacheError(f"The disk cache of split '{split.name}' at {image_size}px needs {needed / 2**30:.1f} GiB but "
                         f"{path.parent} has {free / 2**30:.1f} GiB free; free some space, put the cache elsewhere "
                         f"(--save-dir), or use --cache memory / none.")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        if hasattr(os, "posix_fallocate"):
            # Reserve the blocks now: a full disk then fails here with ENOSPC instead of SIGBUS mid-decode.
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, out.offset + out.nbytes)
        _decode_into(out, split, image_size, num_workers, progress)
        out.flush()
        del out
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The temporary file is ours alone; whatever stopped the build (error, Ctrl-C), it must not stay half-written.
        tmp.unlink(missing_ok=True)
        raise


def build_cache(split: Split, image_size: int, mode: str = "auto", cache_dir: str | os.PathLike | None = None,
                num_workers: int = 0, progress: bool = False, *,
                memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT) -> np.ndarray | None:
    """Decode every image of `split` once: uint8 array (N, 3, S, S) with row i == load_image(split.paths[i], S).

    mode: 'none' -> None (no cache); 'memory' -> an in-process array; 'disk' -> a copy-on-write memory map of
    <cache_dir>/<cache_key>.npy, built first if absent (a finished file with the same key is reused as is);
    'auto' -> 'memory' if N*3*S*S <= memory_limit_bytes else 'disk'. Decoding runs over `num_workers`
    DataLoader processes (0 = in this process). Raises CacheError for a bad request and BadImageError if an
    image cannot be read. Pass the result as `AnnotationDataset(..., cache=...)`.
    """
    _check_request(split, image_size, num_workers, memory_limit_bytes)
    mode = resolve_cache_mode(mode, len(split), image_size, memory_limit_bytes)
    if mode == "none":
        return None
    shape = (len(split), 3, image_size, image_size)
    if len(split) == 0:
        return np.empty(shape, dtype=np.uint8)
    if mode == "memory":
        out = np.empty(shape, dtype=np.uint8)  # (N, 3, S, S)
        _decode_into(out, split, image_size, num_workers, progress)
        return out
    if cache_dir is None:
        raise CacheError(f"A disk cache of split '{split.name}' ({cache_nbytes(len(split), image_size) / 2**30:.1f} "
                         f"GiB at {image_size}px) needs a cache folder (cache_dir, e.g. <save-dir>/cache); or use "
                         f"--cache memory / none.")
    path = cache_path(cache_dir, split, image_size)
    if not path.is_file():
        _build_disk_cache(path, split, image_size, num_workers, progress)
    return _load_disk_cache(path, shape)



def _pixel_batches(split: Split, image_size: int, cache: np.ndarray | None, num_workers: int, progress: bool):
    """uint8 (b, 3, S, S) batches of every readable image of `split`: slices of `cache`, else decoded."""
    if cache is not None:
        for start in tqdm(range(0, len(split), DECODE_BATCH), desc=f"statistics of {split.name}", disable=not progress,
                          leave=False, dynamic_ncols=True):
            yield np.asarray(cache[start:start + DECODE_BATCH])
        return
    loader = DataLoader(AnnotationDataset(split, image_size, skip_bad_images=True), batch_size=DECODE_BATCH,
                        shuffle=False, num_workers=num_workers)
    for images, _, _, ok in tqdm(loader, desc=f"statistics of {split.name}", disable=not progress, leave=False,
                                 dynamic_ncols=True):
        yield images[ok].numpy()


def channel_statistics(split: Split, image_size: int, cache: np.ndarray | None = None, num_workers: int = 0,
                       cache_dir: str | os.PathLike | None = None, progress: bool = False) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of the split's pixels on the [0, 1] scale, after the resize to S x S.

    Population statistics over every pixel n of every readable image: mean_k = sum x / n, std_k = sqrt(sum x^2 / n -
    mean_k^2), accumulated in float64 (the study averaged per-batch means of 224 px images instead). With
    `cache_dir` the result is kept in <cache_dir>/stats-<cache_key>.json and reused while the split is unchanged.
    """
    path = Path(cache_dir) / f"stats-{cache_key(split, image_size)}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        return saved["mean"], saved["std"]
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for batch in _pixel_batches(split, image_size, cache, num_workers, progress):
        x = batch.astype(np.float64) / 255.0  # (b, 3, S, S)
        total += x.sum(axis=(0, 2, 3))
        squares += np.square(x).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        raise CacheError(f"Split '{split.name}' has no readable image to compute normalisation statistics from.")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    result = ([round(float(v), 6) for v in mean], [round(float(v), 6) for v in std])
    if path is not None:
        atomic_write_json(path, {"mean": result[0], "std": result[1], "images": len(split), "image_size": image_size})
    return result
