"""Model registry: every backbone builds offline, gives (B, C) logits, and matches the study's parameter counts."""
import pytest
import torch

import models
from models import MODELS, ModelError, count_trainable_parameters, create_model
from utils import UserError

# The study's trainable parameter counts with 260 labels (Corel-5k).
STUDY_PARAMETERS = {"Xception": 21_339_692, "ResNeXt50": 23_512_644, "TResNet": 29_872_772, "ResNet101": 43_032_900}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_backbone_builds_and_gives_logits(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, pretrained=False).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(STUDY_PARAMETERS))
def test_parameter_counts_equal_the_study(name):
    assert count_trainable_parameters(create_model(name, num_classes=260)) == STUDY_PARAMETERS[name]


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_global_pooling(pooling):
    model = create_model("TinyResNet", 3, global_pooling=pooling).eval()
    features = torch.randn(2, model.num_features, 4, 4)
    expected = features.mean((2, 3)) if pooling == "avg" else features.amax((2, 3))
    torch.testing.assert_close(model.pool(features), expected)


def test_head_is_dropout_then_linear():
    model = create_model("TinyResNet", 5)
    assert isinstance(model.head[0], torch.nn.Dropout) and model.head[0].p == 0.3
    assert model.head[1].out_features == 5 and model.head[1].in_features == model.num_features


def test_unknown_model_lists_the_options():
    with pytest.raises(ModelError, match="ResNet101.*TResNet"):
        create_model("ResNet50x", 3)


def test_offline_pretrained_fails_with_one_sentence_naming_both_flags(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelError) as info:
        create_model("ResNet18", 3, pretrained=True)
    message = str(info.value)
    assert "--no-pretrained" in message and "--weights" in message and "\n" not in message


def test_local_weights_file_is_loaded(tmp_path):
    source = create_model("TinyResNet", 4).backbone
    path = tmp_path / "tiny.pth"
    torch.save(source.state_dict(), path)
    loaded = create_model("TinyResNet", 4, weights=path).backbone
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_missing_or_wrong_weights_file_is_one_sentence(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        create_model("TinyResNet", 4, weights=tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"not": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match="does not fit this backbone: 90 of its tensors are missing"):
        create_model("TinyResNet", 4, weights=wrong)
