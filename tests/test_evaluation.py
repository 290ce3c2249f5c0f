"""evaluation.py's pure pieces without training: which settings an evaluation uses, and how the test set is scored
under the run's comparison rule and epsilon (the end-to-end figures are recomputed in test_report_numbers.py)."""
import pytest
import torch

import evaluation
from evaluation import EvaluationOptions


def test_evaluation_settings_take_each_option_given_else_the_runs():
    config = {"threshold_split": "train", "threshold_transform": "train", "threshold_fallback": "first",
              "threshold_compare": "gt", "metric_epsilon": 1e-7}
    overrides = {"threshold_split": None, "threshold_transform": "eval", "threshold_fallback": None,
                 "threshold_compare": "ge", "metric_epsilon": 0.0}
    options = EvaluationOptions("f1", (0.2, 0.4), overrides=overrides)
    settings = evaluation.evaluation_settings(options, config)
    assert {k: v for k, v in settings.items() if k != "grid"} == {
        "threshold_split": "train", "threshold_transform": "eval", "threshold_fallback": "first",
        "threshold_compare": "ge", "metric_epsilon": 0.0, "threshold_method": "f1", "top_k": 5,
        "threshold_min_positives": 0, "threshold_shrinkage": 0.0, "folds": 5}
    assert settings["grid"].tolist() == [0.2, 0.4]
    assert evaluation.evaluation_settings(EvaluationOptions("f1", None, overrides=overrides), config)[
        "grid"].tolist() == pytest.approx([0.05 * k for k in range(1, 15)])


def test_score_test_set_applies_the_comparison_and_epsilon():
    test = {"targets": torch.tensor([[1.0, 0], [0, 1]]), "probs": torch.tensor([[0.5, 0.2], [0.1, 0.5]])}
    ge = evaluation.score_test_set(test, torch.tensor([0.4, 0.4]), {"threshold_compare": "ge", "metric_epsilon": 0.0,
                                                                        "top_k": 1})
    gt = evaluation.score_test_set(test, torch.tensor([0.4, 0.4]), {"threshold_compare": "gt", "metric_epsilon": 1e-7,
                                                                        "top_k": 1})
    assert ge["top_k"]["per_image/recall"] == 1.0 and ge["ranking"]["ranking/lrap"] == 1.0
    assert ge["default"]["per_image/recall"] == 1.0 and gt["default"]["per_image/recall"] == 0.0
    assert ge["mcc"]["per_image/precision"] == 1.0 and gt["mcc"]["per_image/precision"] == 2 / (2 + 1e-7)
    eps = evaluation.score_test_set(test, torch.tensor([0.4, 0.4]), {"threshold_compare": "ge", "metric_epsilon": 1e-7,
                                                                         "top_k": 1})
    assert eps["mcc"]["per_image/precision"] == 2 / (2 + 1e-7) and eps["default"]["per_image/recall"] == 2 / (2 + 1e-7)

