"""config.py: the training keys a run's config.json holds, their one set of defaults (which main.py's parser uses), and
older configurations completed: missing keys from the defaults, mode flags of older versions dropped, recipes resolved."""
import pytest

import main as main_module
from config import RECORD_KEYS, TRAINING_DEFAULTS, Runtime, complete, training_config

# Keys that runs made before the heads/recipe flags lack; evaluation and resume must still work.
NEWER_KEYS = ("head", "gcn_tau", "gcn_p", "label_embeddings", "randaugment", "cutout", "optimizer", "weight_decay")


def test_every_flag_is_a_training_key_or_belongs_to_a_mode():
    parser = main_module.get_args_parser()
    flags = {a.dest for a in parser._actions if a.dest != "help"}
    from modes import MODE_FLAGS

    mode_flags = {f for mode, names in MODE_FLAGS.items() if mode != "train" for f in names}
    unclassified = flags - set(TRAINING_DEFAULTS) - mode_flags - {"progress"}
    assert not unclassified, f"new flags must be training keys (config.py) or listed in modes.MODE_FLAGS: {unclassified}"
    assert set(TRAINING_DEFAULTS) - flags == {"hold_out_fold"}  # the one internal key: cross-fitting passes it inside


def test_the_parser_takes_its_training_defaults_from_config_py(monkeypatch):
    defaults = vars(main_module.get_args_parser().parse_args([]))
    assert {k: defaults[k] for k in TRAINING_DEFAULTS if k != "hold_out_fold"} == \
        {k: v for k, v in TRAINING_DEFAULTS.items() if k != "hold_out_fold"}
    monkeypatch.setitem(TRAINING_DEFAULTS, "dropout", 0.1)  # one home: changing it here changes the CLI
    assert main_module.get_args_parser().parse_args([]).dropout == 0.1
    assert set(NEWER_KEYS) <= TRAINING_DEFAULTS.keys()
    assert TRAINING_DEFAULTS["head"] == "fc" and TRAINING_DEFAULTS["cutout"] == 0.0
    assert TRAINING_DEFAULTS["optimizer"] == "adam"


def test_complete_fills_only_the_missing_keys_and_drops_old_mode_flags():
    saved = {"model": "TinyResNet", "loss_function": "BCELoss", "data": "x", "epochs": 3, "dropout": 0.1,
             "evaluate": True, "predict": "photos", "output": "tags", "checkpoint": "r", "progress": False,
             "resume": None, "run_dir": "runs/r", "world_size": 1}
    config = complete(saved)
    assert {k: config[k] for k in ("model", "loss_function", "epochs", "dropout", "run_dir", "world_size")} == \
        {"model": "TinyResNet", "loss_function": "BCELoss", "epochs": 3, "dropout": 0.1, "run_dir": "runs/r",
         "world_size": 1}
    assert not {"evaluate", "predict", "output", "checkpoint", "progress", "resume"} & config.keys()
    assert config["head"] == "fc" and config["image_size"] == TRAINING_DEFAULTS["image_size"]
    # recipe keys an older run lacks take its recipe's value: the default recipe's here, the study's below
    assert (config["seed"], config["threshold_split"], config["loss_reduction"]) == (0, "train+val", "sum")
    study = complete({**saved, "recipe": "study", "loss_function": "AsymmetricLoss"})
    assert (study["seed"], study["threshold_split"], study["loss_reduction"]) == (1, "train", "mean-all")
    assert study["epochs"] == 3  # a saved value always wins


def test_training_config_keeps_the_training_keys_in_order():
    flags = {**vars(main_module.get_args_parser().parse_args(["--epochs", "7"])), "evaluate": True}
    config = training_config(flags)
    assert list(config) == list(TRAINING_DEFAULTS) and config["epochs"] == 7 and "evaluate" not in config
    assert not set(RECORD_KEYS) & set(TRAINING_DEFAULTS)


@pytest.mark.parametrize("field", ["device", "batch_size", "num_workers", "amp", "channels_last", "skip_bad_images"])
def test_runtime_defaults_are_the_flags_defaults(field):
    assert getattr(Runtime(), field) == TRAINING_DEFAULTS[field]
