"""Checkpoints (checkpoint.py): training-state round trips, compatibility refusals, the epoch log, and runs older
than the newer flags still evaluating and resuming."""
import json

import pytest
import torch

from checkpoint import (CheckpointError, CSVLogger, check_model, check_vocabulary, load_checkpoint,
                        restore_training_state, save_checkpoint, training_state)
from conftest import run_dirs, train_args
from main import cli

# Keys that runs made before the heads/recipe flags lack; evaluation and resume must still work.
NEWER_KEYS = ("head", "gcn_tau", "gcn_p", "label_embeddings", "randaugment", "cutout", "optimizer", "weight_decay")


def test_a_run_older_than_the_newer_flags_still_evaluates_and_resumes(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1"))
    (run,) = run_dirs(tmp_path / "runs")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in NEWER_KEYS}))
    for name in ("best.pth", "last.pth"):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in NEWER_KEYS}
        torch.save(ckpt, run / name)
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    assert json.loads((run / "results.json").read_text())["run"]["head"] == "fc"
    cli(["--resume", str(run), "--num-workers", "0", "--no-progress"])  # finished: nothing left, no error


def _parts(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    return model, optimizer, scheduler, ema


def test_training_state_round_trip_restores_every_part_and_the_rng(tmp_path):
    model, optimizer, scheduler, ema = _parts(0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)
    state = training_state(model, optimizer, scheduler, scaler=None, ema=ema, epoch=2,
                           epoch_progress={"step": 1, "loss_sum": 0.5, "seen": 8}, best_metric=0.25, best_epoch=1,
                           config={"model": "x"}, vocabulary=["a", "b", "c"], device=torch.device("cpu"))
    save_checkpoint(tmp_path / "last.pth", state)
    expected_draw = torch.rand(3)  # the draw that follows the saved RNG state

    fresh = _parts(1)
    assert not torch.equal(fresh[0].weight, model.weight)
    restored = restore_training_state(load_checkpoint(tmp_path / "last.pth"), *fresh[:3], scaler=None, ema=fresh[3],
                                      device=torch.device("cpu"))
    assert restored == (2, {"step": 1, "loss_sum": 0.5, "seen": 8}, 0.25, 1)
    assert torch.equal(torch.rand(3), expected_draw)
    torch.testing.assert_close(fresh[0].state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(fresh[3].state_dict(), ema.state_dict(), rtol=0, atol=0)
    assert fresh[1].state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    assert fresh[2].last_epoch == scheduler.last_epoch == 3


def test_load_checkpoint_refuses_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pth")
    torch.save({"version": 1, "model": {}}, tmp_path / "ok.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "ok.pth").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "cut.pth")
    torch.save({"weights": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pth")


def test_compatibility_checks_name_both_sides():
    check_model("TinyResNet", "TinyResNet", "best.pth")
    with pytest.raises(CheckpointError, match="made with TinyResNet, but ResNet18"):
        check_model("TinyResNet", "ResNet18", "best.pth")
    check_vocabulary(["a", "b"], ["a", "b"], "best.pth")
    with pytest.raises(CheckpointError, match=r"labels in one but not the other: \['c'\]"):
        check_vocabulary(["a", "b"], ["a", "b", "c"], "best.pth")
    with pytest.raises(CheckpointError, match="same labels in another order"):
        check_vocabulary(["a", "b"], ["b", "a"], "best.pth")


def test_csv_logger_keeps_the_first_header_and_truncates_for_a_resumed_run(tmp_path):
    logger = CSVLogger(tmp_path / "log.csv")
    for epoch in (1, 2, 3):
        logger.log({"epoch": epoch, "loss": epoch / 10, **({"extra": 1} if epoch == 2 else {})})
    logger.truncate_after(3)
    assert (tmp_path / "log.csv").read_text().splitlines() == ["epoch,loss", "1,0.1", "2,0.2"]
