"""Recipes (recipes.py): `--recipe study` sets every row of the study's table, an explicit flag wins, the default
recipe is what the repository did before recipes existed."""
import pytest

from config import TRAINING_DEFAULTS
from main import get_args_parser
from recipes import RECIPE_KEYS, RECIPES, resolve
from utils import UserError

# Every row of README "Differences from the study", as the study's code has it.
STUDY = {"seed": 1, "select_on_test": True, "epochs": 60, "schedule_epochs": 80.0, "detach_focusing": False,
         "loss_eps": 1e-8, "flip": True, "vertical_flip": True, "drop_last": False, "shuffle_once": True,
         "threshold_split": "train", "threshold_transform": "train", "threshold_fallback": "first",
         "threshold_compare": "gt", "metric_epsilon": 1e-7}


def parsed(*argv, model="TResNet", data="Corel-5k"):
    return resolve({**vars(get_args_parser().parse_args(list(argv))), "model": model, "data": data})


def test_the_study_recipe_sets_every_row_of_the_table():
    config = parsed("--recipe", "study")
    assert {k: config[k] for k in STUDY} == STUDY
    assert config["loss_reduction"] == "mean-all" and config["normalise"] == ["corel5k"]
    assert config["weights_tag"] == "miil_in21k_ft_in1k"  # the 2022 tresnet_m default: 83.1 %, 21K-P fine-tuned
    # fp32 NCHW and the study's cuDNN settings (main.py lines 47-48), model selection from 0 (engine.py line 54)
    assert (config["amp"], config["channels_last"], config["cudnn_deterministic"], config["cudnn_benchmark"],
            config["selection_start"]) == ("none", "off", True, False, 0.0)
    from engine import Precision, resolve_precision
    import torch

    assert resolve_precision(config["amp"], config["channels_last"], torch.device("cuda")) == Precision(None, False)


def test_the_default_recipe_keeps_its_own_precision_and_cudnn_settings():
    config = parsed()
    assert (config["amp"], config["channels_last"], config["cudnn_deterministic"], config["cudnn_benchmark"],
            config["selection_start"]) == ("auto", "auto", False, False, -1.0)
    assert parsed("--recipe", "study", "--amp", "bf16")["amp"] == "bf16"  # a flag given wins


@pytest.mark.parametrize("model, tag", [("ResNet101", "tv_in1k"), ("ResNeXt50", "tv_in1k"), ("Xception", "tf_in1k"),
                                        ("TResNet", "miil_in21k_ft_in1k"), ("TinyResNet", "r160_in1k")])
def test_the_study_recipe_loads_the_weights_the_study_loaded(model, tag):
    assert parsed("--recipe", "study", model=model)["weights_tag"] == tag


def test_the_study_recipe_follows_the_loss_and_the_dataset():
    lsep = parsed("--recipe", "study", "--loss-function", "LSEPLoss", data="data/demo")
    assert lsep["loss_reduction"] == "mean"  # the study's LSEP divides its per-image sum by B
    assert lsep["loss_eps"] is None and lsep["detach_focusing"] is None  # LSEP has neither option
    assert lsep["normalise"] == ["dataset"]  # not Corel-5k: the training split's own statistics
    assert parsed("--recipe", "study", data="/somewhere/Corel-5k/")["normalise"] == ["corel5k"]
    assert parsed("--recipe", "study", "--epochs", "3")["schedule_epochs"] == pytest.approx(4.0)


def test_an_explicit_flag_wins_over_the_recipe():
    config = parsed("--recipe", "study", "--seed", "0", "--no-vertical-flip", "--detach-focusing", "--select-on-test",
                    "--loss-reduction", "sum", "--epochs", "5", "--schedule-epochs", "5", "--normalise", "backbone",
                    "--weights-tag", "miil_in21k")
    assert (config["seed"], config["vertical_flip"], config["detach_focusing"], config["loss_reduction"]) == \
        (0, False, True, "sum")
    assert (config["epochs"], config["schedule_epochs"], config["normalise"], config["weights_tag"]) == \
        (5, 5.0, ["backbone"], "miil_in21k")
    assert parsed("--no-select-on-test", "--recipe", "study")["select_on_test"] is False


def test_the_default_recipe_values():
    config = parsed()
    assert (config["seed"], config["epochs"], config["schedule_epochs"], config["loss_reduction"]) == (0, 40, 40.0, "sum")
    assert config["detach_focusing"] is True and config["loss_eps"] == 0.0 and config["flip"] is True
    assert config["vertical_flip"] is False and config["normalise"] == ["backbone"] and config["drop_last"] is True
    assert config["threshold_split"] == "train+val"  # chosen by bench/threshold_options.py (README); was val
    assert config["threshold_fallback"] == "default"
    assert config["threshold_compare"] == "ge" and config["metric_epsilon"] == 0.0
    assert config["weights_tag"] == "miil_in21k_ft_in1k"  # timm's default, named
    assert parsed("--select-on-test")["threshold_split"] == "train"  # as before: the study's split with its protocol


def test_resolution_is_idempotent_and_every_recipe_flag_defaults_to_none():
    defaults = TRAINING_DEFAULTS
    assert all(defaults[key] is None for key in RECIPE_KEYS)
    assert set(RECIPES["study"]) == set(RECIPE_KEYS)
    config = parsed("--recipe", "study")
    assert resolve(config) == config


def test_a_schedule_shorter_than_the_training_is_refused():
    with pytest.raises(UserError, match="--schedule-epochs 3 is shorter than --epochs 4"):
        parsed("--epochs", "4", "--schedule-epochs", "3")


def test_describe_says_every_choice_in_words_for_both_recipes():
    from recipes import describe

    study = dict(describe(parsed("--recipe", "study")))
    assert study == {
        "recipe": "study",
        "loss reduction": "mean over all images x labels (AsymmetricLoss, --loss-reduction mean-all)",
        "focusing weights": "not detached", "log of probabilities": "log(max(p, 1e-08))",
        "flips": "horizontal and vertical", "normalisation": "corel5k",
        "schedule": "OneCycleLR over 80 epochs, trained 60", "weights": "tresnet_m.miil_in21k_ft_in1k",
        "precision": "fp32, NCHW (--amp none --channels-last off)", "cuDNN": "deterministic on, benchmark off",
        "data order": "seed 1, shuffled once (scikit-learn, random_state 0), last partial batch kept",
        "thresholds": "fitted on train (train transform), fallback first, predict p > t, metric epsilon 1e-07",
        "model selection": "test set (every epoch); an epoch becomes best.pth when its per-class F1 beats 0 and every "
                           "earlier epoch's"}
    default = dict(describe(parsed("--loss-function", "LSEPLoss", "--no-flip", "--epochs", "3")))
    assert default == {
        "recipe": "default",
        "loss reduction": "sum over images and labels (LSEPLoss, --loss-reduction sum)",
        "focusing weights": "not applicable", "log of probabilities": "not applicable", "flips": "none",
        "normalisation": "backbone", "schedule": "OneCycleLR over 3 epochs, trained 3",
        "weights": "tresnet_m.miil_in21k_ft_in1k",
        "precision": "bf16 autocast on CUDA (fp16 without bf16), fp32 on CPU, channels_last on CUDA, NCHW on CPU (--amp auto "
                     "--channels-last auto)",
        "cuDNN": "deterministic off, benchmark off", "data order": "seed 0, last partial batch dropped",
        "thresholds": "fitted on train+val (eval transform), fallback default, predict p >= t, metric epsilon 0",
        "model selection": "validation split; an epoch becomes best.pth when its per-class F1 beats -1 and every "
                           "earlier epoch's"}
    assert dict(describe(parsed("--loss-reduction", "mean", "--loss-eps", "0")))["loss reduction"] == \
        "mean over images of the per-image sum (AsymmetricLoss, --loss-reduction mean)"
    assert dict(describe(parsed()))["focusing weights"] == "detached (constants for the gradient)"
    assert dict(describe(parsed()))["log of probabilities"] == "exact log-sigmoid"
    assert dict(describe(parsed("--no-pretrained")))["weights"] == \
        "tresnet_m.miil_in21k_ft_in1k, not loaded (--no-pretrained)"
    assert dict(describe(parsed("--weights", "w.pth")))["weights"] == "the file --weights w.pth"
    assert dict(describe(parsed("--vertical-flip", "--no-flip")))["flips"] == "vertical"


def _problems(**flags):
    from recipes import recipe_problems

    base = {"epochs": None, "schedule_epochs": None, "loss_eps": None, "metric_epsilon": None,
            "loss_function": "AsymmetricLoss", "detach_focusing": None, "normalise": None, "selection_start": None,
            "val_size": 500, "select_on_test": None}
    return recipe_problems({**base, **flags})


@pytest.mark.parametrize("flags, message", [
    ({"epochs": 0}, "--epochs must be at least 1 (got 0)"),
    ({"schedule_epochs": 0.0}, "--schedule-epochs must be a positive number of epochs (got 0.0)"),
    ({"loss_eps": -0.1}, "--loss-eps must be in [0, 0.5) (got -0.1; the study uses 1e-8)"),
    ({"loss_eps": 0.5}, "--loss-eps must be in [0, 0.5) (got 0.5; the study uses 1e-8)"),
    ({"metric_epsilon": -1e-9}, "--metric-epsilon must be in [0, 0.01) (got -1e-09; the study uses 1e-7)"),
    ({"metric_epsilon": 0.01}, "--metric-epsilon must be in [0, 0.01) (got 0.01; the study uses 1e-7)"),
    ({"loss_function": "BCELoss", "loss_eps": 0.0, "detach_focusing": False},
     "--loss-eps and --detach-focusing apply to FocalLoss and AsymmetricLoss, not BCELoss"),
    ({"loss_function": "LSEPLoss", "detach_focusing": True},
     "--detach-focusing apply to FocalLoss and AsymmetricLoss, not LSEPLoss"),
    ({"normalise": ["imagenet"]}, "--normalise takes backbone, corel5k, dataset or six numbers MEAN_R MEAN_G MEAN_B "
                                  "STD_R STD_G STD_B with positive stds (got imagenet)"),
    ({"normalise": ["0.5", "0.5", "0.5", "1", "0", "1"]}, "(got 0.5 0.5 0.5 1 0 1)"),
    ({"normalise": ["0.5", "0.5", "0.5", "0", "1", "1"]}, "(got 0.5 0.5 0.5 0 1 1)"),  # the first std
    ({"normalise": ["0.5", "0.5", "0.5", "a", "1", "1"]}, "(got 0.5 0.5 0.5 a 1 1)"),  # not a number
    ({"selection_start": 1.0}, "--selection-start must be in [-1, 1) (got 1.0; the study: 0)"),
    ({"selection_start": -1.5}, "--selection-start must be in [-1, 1) (got -1.5; the study: 0)"),
    ({"val_size": 0, "select_on_test": False}, "--val-size must be at least 1 (got 0); or use --select-on-test"),
])
def test_each_recipe_flag_out_of_range_is_one_sentence(flags, message):
    (problem,) = _problems(**flags)
    assert problem.startswith(message) if not message.startswith("(") else problem.endswith(message), problem


@pytest.mark.parametrize("flags", [
    {"epochs": 1}, {"schedule_epochs": 0.5}, {"loss_eps": 0.0}, {"loss_eps": 0.49}, {"metric_epsilon": 0.0},
    {"metric_epsilon": 0.0099}, {"loss_function": "BCELoss"}, {"loss_function": "FocalLoss", "loss_eps": 1e-8},
    {"normalise": ["corel5k"]}, {"normalise": ["0.5", "0.5", "0.5", "0.2", "0.2", "0.2"]},
    {"selection_start": -1.0}, {"selection_start": 0.99}, {"val_size": 1, "select_on_test": False},
    {"val_size": 0, "select_on_test": True}, {"val_size": 0},
])
def test_values_at_the_edges_of_their_ranges_are_accepted(flags):
    assert _problems(**flags) == []


def test_the_focusing_and_corel_rules_of_the_study_recipe():
    bce = parsed("--recipe", "study", "--loss-function", "BCELoss")
    assert bce["detach_focusing"] is None and bce["loss_eps"] is None  # not applicable to BCE
    focal = parsed("--recipe", "study", "--loss-function", "FocalLoss")
    assert focal["detach_focusing"] is False and focal["loss_eps"] == 1e-8
    assert parsed("--recipe", "study", data="/data/Corel-5k/")["normalise"] == ["corel5k"]  # a path ending in it
    assert parsed("--recipe", "study", data="/data/corel")["normalise"] == ["dataset"]
    assert parsed("--recipe", "study", data="Corel-5k/x")["normalise"] == ["dataset"]
    with pytest.raises(UserError, match=r"^Unknown recipe 'mine'; choose one of: default, study\.$"):
        resolve({**parsed(), "recipe": "mine"})
    from recipes import describe

    assert dict(describe({**parsed(), "model": "Mine", "weights_tag": "t"}))["weights"] == "Mine.t"
    assert dict(describe({**parsed(), "cudnn_benchmark": True}))["cuDNN"] == "deterministic off, benchmark on"
    assert dict(describe({**parsed(), "normalise": ["0.5", "0.4"]}))["normalisation"] == "0.5 0.4"
    pretrained_missing = {k: v for k, v in parsed().items() if k != "pretrained"}
    assert dict(describe(pretrained_missing))["weights"] == "tresnet_m.miil_in21k_ft_in1k"  # older configs: loaded
