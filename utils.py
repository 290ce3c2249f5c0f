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
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class UserError(Exception):
    """An error caused by the user's input; its message says what, where and how to fix it."""


class WriteError(UserError, OSError):
    """A file or folder that cannot be written where the user asked."""


class Interrupted(UserError):
    """Ctrl-C: its message says what was kept and the command that continues (the command line exits with 130)."""


class GracefulStop:
    """Ctrl-C as a request to stop at the next safe point, so that what is saved is a consistent state.

    While active (a context manager; signal handlers live in the main thread only) the first SIGINT only sets
    `requested` (and says so); `check()` raises KeyboardInterrupt at the caller's safe points. A second SIGINT raises
    at once, except inside `critical()` (a block that must finish, such as an optimiser step's bookkeeping or
    writing checkpoints), where it waits for the block's end. `agree(flag) -> flag` makes the decision collective
    (under torchrun every rank must stop at the same step).
    """

    def __init__(self, agree: Callable[[bool], bool] | None = None):
        self.requested, self.agree = False, agree or (lambda flag: flag)
        self._critical, self._pending, self._previous = 0, False, None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._pid = os.getpid()  # DataLoader workers forked meanwhile inherit the handler and ignore Ctrl-C
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a worker process: the main process decides when to stop, and stops the workers
        if not self.requested:
            self.requested = True
            print("\nCtrl-C: stopping at the end of this step (press it again to stop at once).", file=sys.stderr,
                  flush=True)
        elif self._critical:
            self._pending = True
        else:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt here if a stop was requested (on any rank, through `agree`)."""
        if self.agree(self.requested):
            raise KeyboardInterrupt

    @contextmanager
    def critical(self):
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._pending and not self._critical:
            self._pending = False
            raise KeyboardInterrupt


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", durable: bool = True) -> Path:
    """Write `path` through a temporary file in the same folder, then `os.replace` it into place.

    A crash or Ctrl-C mid-write leaves the previous file (or none), never a truncated one. `durable` also fsyncs
    before the rename, so a power cut cannot leave an empty file either; it costs a disk flush per file, which
    generators writing thousands of small regenerable files (the demo images) skip.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"Cannot write '{path}' ({e.strerror or e}); choose a folder you can write to.") from None
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
    except BaseException as e:
        # The temporary file is ours alone; remove it whatever stopped the write, then re-raise.
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a folder made read-only meanwhile, a file name that is a folder
            raise WriteError(f"Cannot write '{path}' ({e.strerror or e}); free space or choose another place.") from None
        raise
    return path


def check_writable(folder: str | os.PathLike, fix: str) -> None:
    """Before long work: `folder` (or, if it does not exist yet, the nearest folder above it, where it would be
    created) must be a folder this process can write into; else one sentence ending with `fix` (what to do)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise WriteError(f"'{path}' is a file where a folder is needed; {fix}.")
    if not os.access(path, os.W_OK | os.X_OK):
        raise WriteError(f"Cannot write into '{path}' (permission denied); {fix}.")


def first_sentence(text, limit: int = 160) -> str:
    """The first sentence of an error message's first line (without its full stop), cut at a word with an ellipsis
    when still longer than `limit` characters: a reason quoted inside one of our sentences."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    sentence = line.split(". ", 1)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ... (see --help)`, exit status 2), as every other user error here,
    instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help).\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to a flag's help, unless the default is None, SUPPRESS or an on/off switch's bool
    (the help then says in words what happens), or the help already speaks of its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"
