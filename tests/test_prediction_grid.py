"""prediction_grid.py: predictions.png marks every label right (green, ✓), wrong (red, ✗) or missed (grey, ○), cuts
long lists with "+N more", aligns the images' tops, and keeps each image's aspect ratio."""
import io
import math

import matplotlib.colors as mcolors
import pytest
import torch
from PIL import Image

import prediction_grid as grid
import report
from dataset import BadImageError, Split

GREEN, RED, GREY = (mcolors.to_hex(grid.COLOURS[k]) for k in ("right", "wrong", "missed"))


def _texts(ax, x=None):
    """(text, colour) of every text in `ax` (at horizontal position `x` only, if given), top down."""
    texts = [t for t in ax.texts if x is None or t.get_position()[0] == x]
    return [(t.get_text(), mcolors.to_hex(t.get_color())) for t in sorted(texts, key=lambda t: -t.get_position()[1])]


def test_every_label_is_drawn_in_the_colour_of_its_verdict(tmp_path):
    Image.new("RGB", (60, 40), (10, 20, 30)).save(tmp_path / "a.png")
    vocabulary = ["sky", "sea", "sand", "boat", "tree", "sun", "moon", "cloud", "bird"]
    truth = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    split = Split("test", ["a.png"], [tmp_path / "a.png"], truth[None].float())
    # at 0.5: sky (right), boat (wrong); fitted: sky, sea (right), boat, tree, sun, moon, cloud (wrong); sand missed.
    probs = torch.tensor([[0.9, 0.45, 0.1, 0.6, 0.4, 0.35, 0.34, 0.33, 0.05]])
    thresholds = torch.tensor([0.5, 0.4, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3])
    (panel,) = report.figure_panels(split, probs, torch.tensor([0]), thresholds, vocabulary)
    fig = grid.grid_figure([panel])
    image_ax, text_ax = fig.axes
    texts = _texts(text_ax)
    assert _texts(text_ax, 0)[3:] == [("✓ sky", GREEN), ("✗ boat", RED), ("○ sea", GREY), ("○ sand", GREY)]
    # the fitted column: 2 right and 5 wrong by score, 1 missed: 5 lines shown, then "+3 more" counted, in black
    assert _texts(text_ax, 0.52) == [("MCC thresholds", "#000000"), ("✓ sky", GREEN), ("✗ boat", RED),
                                     ("✓ sea", GREEN), ("✗ tree", RED), ("✗ sun", RED), ("+3 more: 2 ✗, 1 ○", "#000000")]
    assert ("a.png", "#000000") in texts and ("truth: sky, sea, sand", "#000000") in texts
    assert image_ax.get_anchor() == "N" and image_ax.images  # the image drawn, anchored at the top of its cell


def test_long_truths_are_cut_and_unreadable_images_say_so(tmp_path):
    assert grid.cut(["alpha", "beta", "gamma"], characters=12) == "alpha, beta +1 more"
    assert grid.cut(["averyveryverylongword"], characters=5) == "averyveryverylongword"  # one word always shown
    assert grid.cut([]) == "-"
    assert grid.column_lines([]) == [("-", "black")]
    panel = {"name": "b.png", "path": None, "truth": "sea", "truth_labels": ["sea"], "readable": False}
    (text_ax,) = grid.grid_figure([panel]).axes[1:]
    assert ("unreadable: skipped (--skip-bad-images)", RED) in _texts(text_ax)


def test_the_figure_is_a_png_and_display_keeps_the_aspect_ratio(tmp_path):
    Image.new("RGB", (400, 200), (10, 20, 30)).save(tmp_path / "a.png")
    image = grid.display_image(tmp_path / "a.png", longest_side=100)
    assert image.shape == (50, 100, 3) and image[0, 0].tolist() == [10, 20, 30]
    assert grid.display_image(tmp_path / "a.png").shape == (160, 320, 3)
    panels = [{"name": "a.png", "path": tmp_path / "a.png", "truth_labels": ["sky"], "readable": True,
               "at_half_marks": [("sky", "right")], "fitted_marks": []},
              {"name": "b.png", "path": None, "truth_labels": ["sea"], "readable": False}]
    png = grid.predictions_figure(panels, "mcc")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and math.prod(Image.open(io.BytesIO(png)).size) > 0
    (tmp_path / "bad.png").write_bytes(b"no")
    with pytest.raises(BadImageError, match=r"^Image '.*bad.png' cannot be read \(UnidentifiedImageError: "):
        grid.display_image(tmp_path / "bad.png")
