"""bench/recipe_search.py: which rows the search combines and seeds, and the rule that turns its table into a
recommendation (README, "The best recipe on a long tail"). Hand-made results, hand-computed verdicts."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import recipe_search  # noqa: E402


def entry(f1, image_f1=0.75, seconds=100.0):
    return {"per_class/f1": f1, "per_image/f1": image_f1, "learning": {"time_s": [seconds / 2, seconds / 2]}}


def stage_one(**gains_and_costs):
    """Every row once (seed 0): the default at F1 0.5 and 100 s; the rows named get (gain, cost factor)."""
    results = {row: {0: entry(0.5 - 0.01)} for row in recipe_search.ROWS}  # all slightly worse by default
    results["default"] = {0: entry(0.5)}
    for row, (gain, factor) in gains_and_costs.items():
        results[row] = {0: entry(0.5 + gain, seconds=100.0 * factor)}
    return results


def test_stage_one_runs_every_row_first():
    assert recipe_search.stages({}) == [(row, 0) for row in recipe_search.ROWS]


def test_the_two_best_affordable_rows_are_combined_and_seeded_with_the_default():
    results = stage_one(**{"head decoder": (0.2, 11.0), "image 96 px": (0.1, 1.5), "16 epochs": (0.05, 1.8),
                           "head gcn": (0.01, 1.1)})
    todo = recipe_search.stages(results)[len(recipe_search.ROWS):]
    assert todo == [("image 96 px & 16 epochs", 0),
                    ("default", 1), ("default", 2), ("image 96 px", 1), ("image 96 px", 2),
                    ("16 epochs", 1), ("16 epochs", 2), ("image 96 px & 16 epochs", 1), ("image 96 px & 16 epochs", 2)]
    assert recipe_search.flags_of("image 96 px & 16 epochs") == ["--image-size", "96", "--epochs", "16"]
    assert recipe_search.cost(results, "head decoder") == pytest.approx(11.0)  # measured once, not combined


def test_nothing_is_combined_when_fewer_than_two_rows_beat_the_default():
    todo = recipe_search.stages(stage_one(**{"16 epochs": (0.05, 1.8)}))[len(recipe_search.ROWS):]
    assert todo == [("default", 1), ("default", 2), ("16 epochs", 1), ("16 epochs", 2)]


def seeded(f1s, image_f1s):
    return {seed: entry(f1, image) for seed, (f1, image) in enumerate(zip(f1s, image_f1s))}


def test_a_row_is_recommended_only_beyond_the_spread_and_without_losing_per_image_f1():
    results = {
        "default": seeded([0.50, 0.52, 0.51], [0.75, 0.75, 0.75]),  # per-class F1 mean 0.51, sd 0.01
        "clear": seeded([0.55, 0.56, 0.54], [0.76, 0.76, 0.76]),  # +0.04 > 0.01
        "bigger": seeded([0.60, 0.62, 0.61], [0.75, 0.75, 0.75]),  # +0.10: the best
        "within the spread": seeded([0.515, 0.525, 0.505], [0.75, 0.75, 0.75]),  # +0.005 < 0.01
        "loses per-image F1": seeded([0.70, 0.70, 0.70], [0.70, 0.70, 0.70]),  # -0.05, spread 0
        "one seed": {0: entry(0.9, 0.9)},  # not a candidate
    }
    verdict = recipe_search.recommendation(results)
    assert verdict["row"] == "bigger"
    v = verdict["verdicts"]
    assert set(v) == {"clear", "bigger", "within the spread", "loses per-image F1"}
    assert v["clear"]["gain"] == pytest.approx(0.04) and v["clear"]["spread"] == pytest.approx(0.01)
    assert [v[r]["beats"] for r in ("clear", "bigger", "within the spread", "loses per-image F1")] == \
        [True, True, False, False]
    assert v["loses per-image F1"]["per_image_change"] == pytest.approx(-0.05)
    del results["clear"], results["bigger"]
    assert recipe_search.recommendation(results)["row"] is None
