"""startup.py: a Ctrl-C while a command is still loading torch is one line and exit status 130, for every entry point
(it was a raw traceback from inside `import torch`)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import startup

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [
    ["main.py", "--data", "nowhere"], ["importer.py", "nowhere.csv", "out"], ["reproduce.py", "--quick", "--dry-run"],
    ["analysis.py", "gradients"], ["-m", "DataAugmentation", "--data", "nowhere"],
], ids=["main", "importer", "reproduce", "analysis", "gan"])
def test_a_ctrl_c_while_loading_is_one_line(argv, tmp_path):
    process = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    maps, deadline = Path(f"/proc/{process.pid}/maps"), time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # torch (over a second) is loading:
        time.sleep(0.01)                                                      # guard() ran, started() not yet
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (130, startup.MESSAGE + "\n")


def test_after_starting_a_ctrl_c_is_a_keyboard_interrupt_again():
    startup.guard()
    assert signal.getsignal(signal.SIGINT) is startup._interrupted_while_starting
    startup.started()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
