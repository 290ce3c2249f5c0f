"""torchrun on CPU with gloo: 2 processes train on tiny data, and evaluation gathers predictions so that 1 and 2
processes give exactly the same metrics on splits that do not divide evenly."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_dataset

REPO = Path(__file__).resolve().parents[1]


def torchrun(nproc, *args, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
               str(REPO / "main.py"), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_two_processes_train_and_evaluate_exactly_like_one(tmp_path):
    # 31 training images -> 24 train + 7 val; 11 test images: neither divides by 2, so the sampler pads.
    data = write_dataset(tmp_path / "tiny", n_train=31, n_test=11)
    save = tmp_path / "runs"
    out = torchrun(2, "--data", str(data), "--model", "TinyResNet", "--no-pretrained", "--image-size", "32",
                   "--epochs", "1", "--batch-size", "4", "--val-size", "7", "--num-workers", "0", "--no-progress",
                   "--save-dir", str(save), "--run-name", "ddp", port=29531)
    assert out.count("epoch 1/1") == 1  # rank 0 alone prints
    run = save / "TinyResNet_AsymmetricLoss_tiny_ddp"
    with (run / "log.csv").open() as f:
        row = next(csv.DictReader(f))
    assert float(row["train/loss"]) > 0 and float(row["train/images_per_s"]) > 0
    assert (run / "best.pth").is_file() and json.loads((run / "config.json").read_text())["world_size"] == 2

    evaluate = ["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"]
    subprocess.run([sys.executable, str(REPO / "main.py"), *evaluate], cwd=REPO, check=True, capture_output=True)
    single = json.loads((run / "results.json").read_text())
    torchrun(2, *evaluate, port=29532)
    double = json.loads((run / "results.json").read_text())
    assert single["run"]["split_sizes"] == {"train": 24, "val": 7, "test": 11}
    for key in ("default", "mcc", "thresholds"):
        assert single[key] == double[key], key
