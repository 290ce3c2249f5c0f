"""torchrun on CPU with gloo: 2 processes train to the same weights as 1 process on the same global batches, and
evaluation gathers predictions so that 1 and 2 processes give exactly the same metrics on splits that do not divide
evenly. torchrun --standalone picks a free port for every launch (never a fixed one)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import write_dataset
from runs import load_config
from trainer import build_training

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(REPO / "main.py"), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def single(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_train_the_same_weights_as_one_on_the_same_global_batches(tmp_path):
    # 24 training images: 1 process takes batches of 8, 2 processes batches of 4 each (the same 8 images per step:
    # rank r takes every 2nd index of the same permutation). Per-process randomness and statistics are turned off
    # (--dropout 0, --freeze-bn), and the loss is a mean over images, so DDP's gradient average is the 8-image mean.
    data = write_dataset(tmp_path / "tiny", n_train=32, n_test=6)
    common = ["--data", str(data), "--model", "TinyResNet", "--no-pretrained", "--image-size", "32", "--epochs", "2",
              "--val-size", "8", "--num-workers", "0", "--no-progress", "--dropout", "0", "--freeze-bn",
              "--loss-reduction", "mean", "--learning-rate", "3e-3", "--run-name", "r",
              "--amp", "none", "--channels-last", "off"]  # fp32 both: --amp auto probes each batch size on its own
    single(*common, "--batch-size", "8", "--save-dir", str(tmp_path / "one"))
    torchrun(2, *common, "--batch-size", "4", "--save-dir", str(tmp_path / "two"))
    one, two = (torch.load(tmp_path / d / "TinyResNet_AsymmetricLoss_tiny_r" / "last.pth", weights_only=True)
                for d in ("one", "two"))
    assert one["epoch"] == two["epoch"] == 2
    steps = one["optimizer"]["state"][0]["step"]
    assert float(steps) == float(two["optimizer"]["state"][0]["step"]) == 6  # 3 steps per epoch in both
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=0, atol=1e-5, msg=key)
    # Training moved the weights well beyond that tolerance (so the equality above is not the initial weights').
    config = load_config(tmp_path / "one" / "TinyResNet_AsymmetricLoss_tiny_r")
    initial = build_training(config, torch.device("cpu"), 5, 3)[0].state_dict()
    assert max(float((one["model"][k] - initial[k]).abs().max()) for k in initial) > 1e-3  # 100x the tolerance


def test_two_processes_evaluate_exactly_like_one(tmp_path):
    # 31 training images -> 24 train + 7 val; 11 test images: neither divides by 2, so the sampler pads.
    data = write_dataset(tmp_path / "tiny", n_train=31, n_test=11)
    save = tmp_path / "runs"
    out = torchrun(2, "--data", str(data), "--model", "TinyResNet", "--no-pretrained", "--image-size", "32",
                   "--epochs", "1", "--batch-size", "4", "--val-size", "7", "--num-workers", "0", "--no-progress",
                   "--save-dir", str(save), "--run-name", "ddp")
    assert out.count("epoch 1/1") == 1  # rank 0 alone prints
    run = save / "TinyResNet_AsymmetricLoss_tiny_ddp"
    assert (run / "best.pth").is_file() and json.loads((run / "config.json").read_text())["world_size"] == 2

    evaluate = ["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"]
    single(*evaluate)
    alone = json.loads((run / "results.json").read_text())
    torchrun(2, *evaluate)
    double = json.loads((run / "results.json").read_text())
    assert alone["run"]["split_sizes"] == {"train": 24, "val": 7, "test": 11}
    for key in ("default", "mcc", "thresholds"):
        assert alone[key] == double[key], key
