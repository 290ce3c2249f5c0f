"""--amp auto on CPUs (engine.resolve_precision, cpu_precision.py): evaluation in bf16 + channels_last where the CPU has
native bf16, training in channels_last and in bf16 only where a probe measured it faster, the probe leaves the model
and the random streams alone, its result is cached per CPU and backbone, and a run keeps its recorded choice."""
import json

import pytest
import torch

import cpu_precision
import engine
import trainer
from conftest import run_dirs, train_args
from engine import Precision, resolve_precision
from main import cli

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, training, train_bf16, expected", [
    (True, False, False, Precision(torch.bfloat16, True)),  # evaluation, --predict: bf16 + channels_last
    (True, True, False, Precision(None, True)),  # training: channels_last, fp32 unless measured faster
    (True, True, True, Precision(torch.bfloat16, True)),
    (False, False, False, Precision(None, False)),  # no native bf16: fp32 NCHW, the fastest there
    (False, True, True, Precision(None, False)),
])
def test_auto_follows_the_cpu_and_the_mode(monkeypatch, native, training, train_bf16, expected):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", "auto", CPU, training=training, train_bf16=train_bf16) == expected
    assert resolve_precision("none", "off", CPU, training=training, train_bf16=True) == Precision(None, False)
    assert resolve_precision("bf16", "on", CPU) == Precision(torch.bfloat16, True)  # given flags always win


def test_the_probe_changes_neither_the_model_nor_the_random_streams():
    from components import loss_from_config, model_from_config
    from config import TRAINING_DEFAULTS
    from recipes import resolve

    config = resolve({**TRAINING_DEFAULTS, "model": "TinyResNet", "pretrained": False, "data": "x", "dropout": 0.5})
    model = model_from_config(config, 5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = cpu_precision.probe(model, loss_from_config(config), (0.5,) * 3, (0.5,) * 3, 32, 4, 5, steps=2)
    assert set(seconds) == {"fp32", "bf16"} and all(s > 0 for s in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():  # BatchNorm statistics included
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert model.training and not any(p.grad is not None for p in model.parameters())


def test_the_measurement_is_made_once_per_cpu_and_backbone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpu_precision, "probe", lambda *args, **kwargs: calls.append(1) or {"fp32": 1.0, "bf16": 0.5})
    config = {"model": "TinyResNet", "head": "fc", "image_size": 32, "batch_size": 8}
    assert cpu_precision.train_bf16(None, None, None, None, config, 5) is True
    assert cpu_precision.train_bf16(None, None, None, None, config, 5) is True and calls == [1]  # cached
    monkeypatch.setattr(cpu_precision, "probe", lambda *args, **kwargs: {"fp32": 1.0, "bf16": 0.97})
    assert cpu_precision.train_bf16(None, None, None, None, {**config, "image_size": 64}, 5) is False  # not clearly
    saved = json.loads((tmp_path / "image-annotation" / "precision.json").read_text())
    assert len(saved) == 2 and "trains in bf16" in capsys.readouterr().out


def test_a_run_records_its_choice_and_a_resumed_run_keeps_it(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(cpu_precision, "train_bf16", lambda *args, **kwargs: True)
    flags = [f for f in train_args(tiny_dataset, tmp_path / "runs", "--epochs", "2")
             if f not in ("--amp", "none", "--channels-last", "off")]
    real, stopped = trainer.train_one_epoch, []

    def stop_after_epoch_1(*args, **kwargs):
        if kwargs["epoch"] == 1 and not stopped:
            stopped.append(kwargs["preprocess"].precision if "preprocess" in kwargs else args[5].precision)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", stop_after_epoch_1)
    with pytest.raises(SystemExit):
        cli(flags)
    (run,) = run_dirs(tmp_path / "runs")
    assert json.loads((run / "config.json").read_text())["precision"] == {"amp": "bf16", "channels_last": True}
    assert stopped == [Precision(torch.bfloat16, True)]
    monkeypatch.setattr(cpu_precision, "train_bf16", lambda *args, **kwargs: pytest.fail("a resumed run re-probed"))
    seen = []
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **k: seen.append(a[5].precision) or real(*a, **k))
    cli(["--resume", str(run), "--num-workers", "0", "--no-progress"])
    assert seen == [Precision(torch.bfloat16, True)]
