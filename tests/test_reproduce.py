"""reproduce.py: the study's results section in one command. --quick trains and evaluates every row under both
recipes on the demo and writes the table; a second call reuses every run; a Ctrl-C in the middle is continued by the
same command to the table an uninterrupted section gives."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reproduce

REPO = Path(reproduce.__file__).resolve().parent


def test_the_stage_of_an_experiment_follows_its_files(tmp_path):
    run = tmp_path / "run"
    assert reproduce.stage(run) == "train"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 2}))
    assert reproduce.stage(run) == "train"  # begun, no checkpoint: starts afresh
    (run / "last.pth").write_bytes(b"x")
    (run / "log.csv").write_text("epoch,time_s\n1,3.0\n")
    assert reproduce.stage(run) == "resume"
    (run / "best.pth").write_bytes(b"x")
    assert reproduce.stage(run) == "resume"  # one epoch of two
    (run / "log.csv").write_text("epoch,time_s\n1,3.0\n2,3.0\n")
    assert reproduce.stage(run) == "evaluate"
    (run / "results.json").write_text("{}")
    (run / "thresholds.json").write_text("{}")
    assert reproduce.stage(run) == "done"


def test_the_plan_and_its_commands(capsys, tmp_path):
    experiments = reproduce.plan(["ASL", "LSEP"], ["study", "default"], 2)
    assert [e.name for e in experiments][:3] == ["ASL_study_seed1", "ASL_study_seed2", "LSEP_study_seed1"]
    assert len(experiments) == 8
    assert reproduce.main(["--dry-run", "--only", "LSEP", "--recipes", "study", "--out", str(tmp_path)]) == 0
    train, evaluate = capsys.readouterr().out.splitlines()
    assert train.startswith("python main.py --data Corel-5k --model ResNeXt50 --image-size 224 --recipe study "
                            "--loss-function LSEPLoss --seed 1")
    assert evaluate.startswith("python main.py --evaluate --checkpoint")
    assert reproduce.main(["--gpus", "2", "--parallel", "2"]) == 2


@pytest.mark.slow
def test_quick_writes_every_row_and_a_second_call_reuses_every_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "section"
    assert reproduce.main(["--quick", "--out", str(out)]) == 0
    table = json.loads((out / "results.json").read_text())
    assert set(table["rows"]) == {"study", "default"} and all(set(r) == set(reproduce.ROWS)
                                                              for r in table["rows"].values())
    text = (out / "results.md").read_text()
    assert "NOT comparable" in text and text.count("| published |") == 16 and text.count("| measured (1 seed) |") == 16
    for recipe, rows in table["rows"].items():
        for row, entry in rows.items():
            run = reproduce.run_dir_of(reproduce.Experiment(row, recipe, 1), out, "demo", True)
            results = json.loads((run / "results.json").read_text())
            assert json.loads((run / "config.json").read_text())["recipe"] == recipe
            assert entry["mcc"]["per_class/f1"]["values"] == [results["mcc"]["per_class/f1"]]  # the run's own figure
    monkeypatch.setattr(reproduce, "launch", lambda *args, **kwargs: pytest.fail("a finished run was run again"))
    before = (out / "results.json").read_text()
    assert reproduce.main(["--quick", "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(before)["rows"]


@pytest.mark.slow
def test_a_ctrl_c_in_the_middle_is_continued_to_the_same_table(tmp_path):
    flags = ["--quick", "--only", "ASL", "--recipes", "default"]
    assert reproduce.main([*flags, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "stopped"
    command = [sys.executable, str(REPO / "reproduce.py"), *flags, "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    log = next(out.glob("runs/*"), None)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log and (log / "config.json").is_file()):
        time.sleep(0.2)
        log = next(out.glob("runs/*"), None)
    time.sleep(0.3)  # inside the epoch (on a fast CPU it may already be evaluating: any point must resume alike)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0 and "interrupted" in err.lower()
    assert not (out / "results.json").exists()
    assert reproduce.main([*flags, "--out", str(out)]) == 0
    straight, resumed = (json.loads((tmp_path / name / "results.json").read_text())["rows"] for name in
                         ("straight", "stopped"))
    for recipe in straight:
        for row in straight[recipe]:
            assert straight[recipe][row]["default"] == resumed[recipe][row]["default"]
            assert straight[recipe][row]["mcc"] == resumed[recipe][row]["mcc"]


class _Process:
    """A child that is still saving when the first Ctrl-C reaches this process, then exits with `status`."""

    def __init__(self, status: int, ctrl_c: bool):
        self.status, self.ctrl_c = status, ctrl_c

    def wait(self):
        if self.ctrl_c:
            self.ctrl_c = False
            raise KeyboardInterrupt
        return self.status


@pytest.mark.parametrize("status, ctrl_c", [(0, True), (130, True), (0, False), (1, False)])
def test_launch_waits_for_the_child_through_a_ctrl_c_and_says_it_came(monkeypatch, status, ctrl_c):
    monkeypatch.setattr(reproduce.subprocess, "Popen", lambda *args, **kwargs: _Process(status, ctrl_c))
    assert reproduce.launch(["--epochs", "1"], 1) == (status, ctrl_c)


@pytest.mark.parametrize("outcome, error", [((0, True), reproduce.Interrupted), ((130, False), reproduce.Interrupted),
                                            ((1, False), reproduce.UserError), ((0, False), None)])
def test_run_experiment_stops_on_a_ctrl_c_even_when_the_child_had_finished(monkeypatch, tmp_path, outcome, error):
    launched = []
    monkeypatch.setattr(reproduce, "launch", lambda argv, gpus, env=None: launched.append(argv) or outcome)
    experiment = reproduce.Experiment("ASL", "default", 1)
    if error is None:
        reproduce.run_experiment(experiment, tmp_path, "demo", True, 1)
        assert len(launched) == 2  # train, then evaluate
        return
    with pytest.raises(error) as caught:
        reproduce.run_experiment(experiment, tmp_path, "demo", True, 1)
    assert len(launched) == 1  # nothing after the stopped command
    assert ("exit status 1" in str(caught.value)) == (error is reproduce.UserError)


def test_run_experiment_starts_nothing_once_the_section_stopped(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "launch", lambda *args, **kwargs: pytest.fail("a command started after Ctrl-C"))
    stop = reproduce.threading.Event()
    stop.set()
    with pytest.raises(reproduce.Interrupted, match="stopped before ASL_default_seed1"):
        reproduce.run_experiment(reproduce.Experiment("ASL", "default", 1), tmp_path, "demo", True, 1, stop=stop)


def test_a_ctrl_c_anywhere_in_the_section_is_one_line_and_exit_130(monkeypatch, tmp_path, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(reproduce, "run_section", ctrl_c)
    assert reproduce.main(["--quick", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted:") and "run the same command again" in err
