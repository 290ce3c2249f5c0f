"""Ctrl-C while a command loads its libraries (torch, timm: a few seconds) is one line and exit status 130, as a
Ctrl-C anywhere later says, never a traceback. Each command-line entry point calls `guard()` before its heavy imports
and `started()` once they are loaded; this module imports nothing heavy."""
from __future__ import annotations

import signal
import sys

MESSAGE = "interrupted while starting: nothing was done yet; run the same command again."


def _interrupted_while_starting(signum, frame) -> None:
    print(MESSAGE, file=sys.stderr)
    raise SystemExit(130)


def guard() -> None:
    """Until `started()`: a Ctrl-C prints MESSAGE and exits with status 130."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def started() -> None:
    """Ctrl-C raises KeyboardInterrupt again, for the command's own handling (what it kept, how to continue)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
