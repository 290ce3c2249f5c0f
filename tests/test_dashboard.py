"""dashboard.py: the TensorBoard events of a run, read back with TensorBoard's own reader, equal its log.csv (every
scalar of every epoch, once, also after a resume) and its results.json; --no-tensorboard writes none."""
import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainer
from conftest import run_dirs, train_args
from main import cli


def events_of(run_dir):
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator):
    """{tag: {step: value}}, each step once (a second value for a step would be a purge that failed)."""
    out = {}
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        assert len({e.step for e in events}) == len(events), tag
        out[tag] = {e.step: e.value for e in events}
    return out


def log_csv(run_dir):
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def assert_events_equal_log_csv(run_dir):
    rows, got = log_csv(run_dir), scalars(events_of(run_dir))
    columns = [k for k in rows[0] if k != "epoch"]
    assert set(got) == set(columns) and "val/per_class/f1" in got and "train/loss" in got and "lr" in got
    for key in columns:
        assert got[key] == {int(r["epoch"]): pytest.approx(float(r[key]), rel=1e-6) for r in rows}, key


def test_a_training_runs_events_equal_its_log_csv_also_after_a_resume(tiny_dataset, tmp_path, monkeypatch):
    real, calls = trainer.train_one_epoch, []

    def stop_in_epoch_2(*args, **kwargs):
        calls.append(kwargs["epoch"])
        if kwargs["epoch"] == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", stop_in_epoch_2)
    with pytest.raises(SystemExit):
        cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "3"))
    (run,) = run_dirs(tmp_path / "runs")
    assert list(scalars(events_of(run))["train/loss"]) == [1]  # epoch 1 written, epoch 2 interrupted
    cli(["--resume", str(run), "--num-workers", "0", "--no-progress"])
    assert [int(r["epoch"]) for r in log_csv(run)] == [1, 2, 3]
    assert_events_equal_log_csv(run)


def test_evaluate_adds_the_test_metrics_the_per_label_table_and_pr_curves(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "2"))
    (run,) = run_dirs(tmp_path / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    results = json.loads((run / "results.json").read_text())
    accumulator = events_of(run)
    got, step = scalars(accumulator), results["run"]["best_epoch"]
    for block in ("default", "mcc"):
        for key in ("per_class/f1", "per_image/f1", "mAP", "N+"):
            assert got[f"test_{block}/{key}"] == {step: pytest.approx(results[block][key], rel=1e-6)}
    tensors = accumulator.Tags()["tensors"]
    assert any(t.startswith("per-label") for t in tensors)
    test = json.loads((tiny_dataset / "test.json").read_text())["samples"]
    present = {label for s in test for label in s["image_labels"]}
    assert {t.split("/", 1)[1] for t in tensors if t.startswith("pr/")} == present  # 5 labels <= 6 curves
    table = accumulator.Tensors([t for t in tensors if t.startswith("per-label")][0])[0].tensor_proto.string_val[0]
    assert b"| label | train | test | threshold | precision | recall | F1 |" in table


def test_no_tensorboard_writes_no_events(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--no-tensorboard"))
    (run,) = run_dirs(tmp_path / "runs")
    assert not (run / "tensorboard").exists() and json.loads((run / "config.json").read_text())["tensorboard"] is False
