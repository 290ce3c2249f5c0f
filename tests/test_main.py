"""End-to-end runs of main.py on a tiny generated dataset: train, evaluate, predict, compare, and the reliability
guarantees (resume = uninterrupted, Ctrl-C, non-finite loss, incompatible checkpoints, bad arguments, bad images,
same seed = same metrics)."""
import csv
import json

import pytest
import torch

import main as main_module
from main import cli



def base_args(data, save_dir, *extra):
    return ["--data", str(data), "--model", "TinyResNet", "--no-pretrained", "--image-size", "32", "--batch-size", "8",
            "--val-size", "6", "--num-workers", "0", "--no-progress", "--save-dir", str(save_dir),
            "--loss-function", "AsymmetricLoss", "--learning-rate", "3e-3", *extra]


def run_dirs(save_dir):
    return sorted(p for p in save_dir.iterdir() if p.is_dir())


def log_rows(run_dir):
    with (run_dir / "log.csv").open() as f:
        # Wall-clock columns (images/s, seconds) differ between runs by nature; everything else must not.
        return [{k: v for k, v in row.items() if not k.endswith(("images_per_s", "time_s"))} for row in csv.DictReader(f)]


def model_weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_train_evaluate_predict_compare(tiny_dataset, tmp_path, capsys):
    save = tmp_path / "runs"
    cli(base_args(tiny_dataset, save, "--epochs", "1", "--run-name", "a"))
    (run,) = run_dirs(save)
    assert {"config.json", "last.pth", "best.pth", "log.csv"} <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "TinyResNet" and config["epochs"] == 1
    assert len(log_rows(run)) == 1

    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    for name in ("results.json", "results.md", "per_label.csv", "predictions.png"):
        assert (run / name).stat().st_size > 0, name
    results = json.loads((run / "results.json").read_text())
    keys = {"per_class/precision", "per_class/recall", "per_class/f1", "per_image/precision", "per_image/recall",
            "per_image/f1", "N+", "mAP"}
    assert keys <= results["default"].keys() and keys <= results["mcc"].keys()
    assert list(results["thresholds"]) == ["sky", "sun", "water", "boat", "tree"]
    assert results["run"]["threshold_split"] == "val" and results["run"]["split_sizes"]["test"] == 10
    assert "Per-class F1" in (run / "results.md").read_text()
    with (run / "per_label.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["sky", "sun", "water", "boat", "tree"]
    assert sum(int(r["test_frequency"]) for r in rows) == int(results["run"]["split_sizes"]["test"] and
                                                               sum(len(s["image_labels"]) for s in json.loads(
                                                                   (tiny_dataset / "test.json").read_text())["samples"]))
    # The fitted thresholds travel with the weights, and --predict applies them.
    assert torch.load(run / "best.pth", weights_only=True)["thresholds"].shape == (5,)
    capsys.readouterr()
    cli(["--predict", str(tiny_dataset / "images"), "--checkpoint", str(run), "--num-workers", "0", "--no-progress",
         "--output", str(tmp_path / "tags")])
    printed = capsys.readouterr().out
    assert "10003.jpeg" in printed
    assert len(json.loads((tmp_path / "tags.json").read_text())) == 34
    assert (tmp_path / "tags.csv").read_text().startswith("image,labels,scores")

    cli(["--compare", str(run), str(run)])
    table = capsys.readouterr().out
    assert table.count("| a |") == 0 and table.count("TinyResNet_AsymmetricLoss_tiny_a") == 2


def test_evaluate_finds_the_latest_matching_run(tiny_dataset, tmp_path):
    save = tmp_path / "runs"
    cli(base_args(tiny_dataset, save, "--epochs", "1", "--run-name", "only"))
    results = main_module.main(main_module.get_args_parser().parse_args(
        ["--evaluate", "--model", "TinyResNet", "--loss-function", "AsymmetricLoss", "--data", str(tiny_dataset),
         "--save-dir", str(save), "--num-workers", "0", "--no-progress"]))
    assert results["run"]["run_dir"].endswith("TinyResNet_AsymmetricLoss_tiny_only")


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch, capsys):
    common = ("--epochs", "3", "--ema", "--ema-decay", "0.9")
    cli(base_args(tiny_dataset, tmp_path / "straight", *common))
    (straight,) = run_dirs(tmp_path / "straight")

    # Interrupt once in epoch 2 after one batch (mid-epoch), and once at the start of epoch 3.
    real_train = main_module.train_one_epoch
    interrupts = {(1, 1), (2, 0)}

    def interrupted(*args, **kwargs):
        epoch = kwargs["epoch"]
        for when in sorted(interrupts):
            if when[0] == epoch:
                interrupts.discard(when)
                loader = args[1]
                batches = iter(loader)
                if when[1] == 0:
                    raise KeyboardInterrupt

                class FirstBatches:  # the loader cut after when[1] batches, then Ctrl-C
                    def __len__(self):
                        return len(loader)

                    def __iter__(self):
                        for _ in range(when[1]):
                            yield next(batches)
                        raise KeyboardInterrupt
                return real_train(args[0], FirstBatches(), *args[2:], **kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(main_module, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli(base_args(tiny_dataset, tmp_path / "resumed", *common))
    assert stop.value.code == 130
    (resumed,) = run_dirs(tmp_path / "resumed")
    assert f"python main.py --resume {resumed}" in capsys.readouterr().out
    assert torch.load(resumed / "last.pth", weights_only=True)["epoch_progress"]["step"] == 1
    while True:
        try:
            cli(["--resume", str(resumed), "--num-workers", "0", "--no-progress"])
            break
        except SystemExit as e:
            assert e.code == 130
    assert not interrupts
    assert_same_weights(model_weights(straight / "last.pth"), model_weights(resumed / "last.pth"))
    assert_same_weights(model_weights(straight / "best.pth"), model_weights(resumed / "best.pth"))
    assert log_rows(straight) == log_rows(resumed)


def test_same_seed_twice_gives_identical_metrics_and_another_seed_differs(tiny_dataset, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        cli(base_args(tiny_dataset, tmp_path / name, "--epochs", "2", "--seed", seed, "--num-workers", "2"))
    a, b, c = (log_rows(run_dirs(tmp_path / n)[0]) for n in "abc")
    assert a == b
    assert a != c


def test_non_finite_loss_stops_naming_epoch_and_batch(tiny_dataset, tmp_path, monkeypatch, capsys):
    real_create = main_module.create_loss

    def exploding_loss(*args, **kwargs):
        loss = real_create(*args, **kwargs)
        calls = {"n": 0}

        class Exploding(type(loss)):
            def forward(self, logits, targets):
                calls["n"] += 1
                value = super().forward(logits, targets)
                # Epoch 1 makes 2 training calls (18 images, batches of 8, last partial batch dropped) and 1
                # validation call; so call 5 is the 2nd batch of epoch 2, which goes NaN.
                return value * float("nan") if calls["n"] == 5 else value

        exploding = Exploding.__new__(Exploding)
        exploding.__dict__ = loss.__dict__
        return exploding

    monkeypatch.setattr(main_module, "create_loss", exploding_loss)
    with pytest.raises(SystemExit) as stop:
        cli(base_args(tiny_dataset, tmp_path / "runs", "--epochs", "2"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "epoch 2, batch 2" in err and "last good checkpoint" in err
    (run,) = run_dirs(tmp_path / "runs")
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1


def test_checkpoint_of_another_model_or_vocabulary_is_refused(tiny_dataset, tmp_path, capsys):
    cli(base_args(tiny_dataset, tmp_path / "runs", "--epochs", "1"))
    (run,) = run_dirs(tmp_path / "runs")
    with pytest.raises(SystemExit):
        cli(["--evaluate", "--checkpoint", str(run), "--model", "ResNet18", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert "TinyResNet" in err and "ResNet18" in err and err.count("\n") == 1

    other = tmp_path / "other"
    other.mkdir()
    for f in ("train.json", "test.json"):
        data = json.loads((tiny_dataset / f).read_text())
        data["labels"] = data["labels"] + ["moon"]
        (other / f).write_text(json.dumps(data))
    (other / "images").symlink_to(tiny_dataset / "images")
    with pytest.raises(SystemExit):
        cli(["--evaluate", "--checkpoint", str(run), "--data", str(other), "--num-workers", "0"])
    err = capsys.readouterr().err
    assert "vocabulary of 5 labels" in err and "6" in err and "moon" in err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--image-size", "100"], "--image-size must be a positive multiple of 32"),
    (["--learning-rate", "-1"], "--learning-rate must be a positive number"),
    (["--weights", "x.pth", "--no-pretrained"], "contradict"),
])
def test_nonsense_arguments_are_rejected_before_any_work(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        cli(["--data", str(tmp_path / "missing"), "--save-dir", str(tmp_path / "runs"), *flags])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_unknown_choice_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli(["--model", "ResNet50"])
    assert "TResNet" in capsys.readouterr().err


def test_corrupt_image_is_reported_by_name_or_skipped_and_counted(tiny_dataset, tmp_path, capsys):
    for name in ("3.jpeg", "4.jpeg", "7.jpeg", "11.jpeg", "12.jpeg", "13.jpeg", "14.jpeg"):
        (tiny_dataset / "images" / name).write_bytes(b"not an image")
    with pytest.raises(SystemExit) as stop:
        cli(base_args(tiny_dataset, tmp_path / "a", "--epochs", "1", "--num-workers", "1"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ".jpeg' cannot be read" in err and "Traceback" not in err
    cli(base_args(tiny_dataset, tmp_path / "b", "--epochs", "1", "--skip-bad-images"))
    out = capsys.readouterr().out
    assert "Epoch 1: skipped" in out and "unreadable training images" in out


def test_data_root_dir_alias_is_accepted(tiny_dataset, tmp_path):
    args = main_module.get_args_parser().parse_args(["--data-root-dir", str(tiny_dataset)])
    assert args.data == str(tiny_dataset)


def test_select_on_test_says_so(tiny_dataset, tmp_path, capsys):
    cli(base_args(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--select-on-test"))
    assert "TEST set" in capsys.readouterr().out
    (run,) = run_dirs(tmp_path / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    results = json.loads((run / "results.json").read_text())
    assert results["run"]["protocol"] == "study" and results["run"]["threshold_split"] == "train"


def test_plot_passes_through_to_analysis(tmp_path):
    cli(["--plot", "gradients", "--out", str(tmp_path)])
    assert (tmp_path / "gradients.png").stat().st_size > 0 and (tmp_path / "gradients.csv").stat().st_size > 0
