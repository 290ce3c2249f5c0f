"""Small shared pieces: the user-facing error type, atomic file writes, and seeding.

Every error a user can cause (a wrong flag, a missing file, a malformed annotation file) is raised as a
`UserError` subclass whose message is one self-contained paragraph: what is wrong, where, and how to fix it.
`main.py` prints that paragraph and exits with status 2 instead of showing a traceback.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class UserError(Exception):
    """An error caused by the user's input; its message says what, where and how to fix it."""


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", durable: bool = True) -> Path:
    """Write `path` through a temporary file in the same folder, then `os.replace` it into place.

    A crash or Ctrl-C mid-write leaves the previous file (or none), never a truncated one. `durable` also fsyncs
    before the rename, so a power cut cannot leave an empty file either; it costs a disk flush per file, which
    generators writing thousands of small regenerable files (the demo images) skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file private (0600); give it the permissions an ordinary open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The temporary file is ours alone; remove it whatever stopped the write, then re-raise.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> Path:
    """Atomically write raw bytes to `path`."""
    return _atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, durable: bool = True) -> Path:
    """Atomically write UTF-8 text to `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON to `path`."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically `torch.save` `obj` to `path` (serialised in memory first, so the file is written in one go)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


# The image files --predict and importer.py look for in a folder (by suffix, any case).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def images_under(folder: Path) -> list[Path]:
    """Every image file (IMAGE_SUFFIXES) under `folder`, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that initialisation is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to a flag's help, unless the default is None, SUPPRESS or an on/off switch's bool
    (the help then says in words what happens), or the help already speaks of its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"
