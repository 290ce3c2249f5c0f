"""Tests of the generated demo dataset: format, determinism, idempotence / crash safety, label statistics
and that every listed label is really (and visibly, at 64x64) drawn. Small sizes: the file runs in seconds."""
import io
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_dataset as dd
from demo_dataset import DEMO_LABELS, ensure_demo_dataset

N_TRAIN, N_TEST = 12, 4
OLD_NS = 1_000_000_000_000_000_000  # a fixed past mtime (2001) to see whether a file was rewritten
MIN_PIXELS = 100  # a listed object shows >= 100 pixels at 192x128, i.e. >= ~16 pixels at 64x64


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _age_all(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(OLD_NS, OLD_NS))


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo"), N_TRAIN, N_TEST, seed=0, progress=False)


@pytest.fixture(scope="module")
def big_draw():
    """100k label-sampler draws (no drawing): scene (n,), labels (n, L) bool, portrait (n,) bool."""
    return dd.sample_scene_labels(np.random.default_rng(2024).random((100_000, dd.N_UNIFORMS)))


def _col(labels: np.ndarray, name: str) -> np.ndarray:
    return labels[:, DEMO_LABELS.index(name)]


# ----------------------------------------------------------------------------------------------- format


def test_format_matches_corel(demo_root):
    train = json.loads((demo_root / "train.json").read_text())
    test = json.loads((demo_root / "test.json").read_text())
    assert set(train) == set(test) == {"samples", "labels"}
    assert train["labels"] == test["labels"] == list(DEMO_LABELS)
    assert len(train["samples"]) == N_TRAIN and len(test["samples"]) == N_TEST
    assert (demo_root / "demo_vocabulary.txt").read_text().split("\n") == [*DEMO_LABELS, ""]
    train_names = {s["image_name"] for s in train["samples"]}
    test_names = {s["image_name"] for s in test["samples"]}
    assert len(train_names) == N_TRAIN and len(test_names) == N_TEST and not train_names & test_names
    sizes = Counter()
    for s in train["samples"] + test["samples"]:
        assert set(s) == {"image_name", "image_labels"} and s["image_name"].endswith(".jpeg")
        assert len(s["image_labels"]) >= 1 and len(set(s["image_labels"])) == len(s["image_labels"])
        assert set(s["image_labels"]) <= set(DEMO_LABELS)
        with Image.open(demo_root / "images" / s["image_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes[im.size] += 1
    assert set(sizes) <= {(192, 128), (128, 192)} and sizes[(192, 128)] > 0


def test_manifest_and_statistics_helper(demo_root):
    marker = json.loads((demo_root / dd.MARKER_NAME).read_text())
    assert marker["complete"] is True and marker["seed"] == 0
    assert (marker["n_train"], marker["n_test"], marker["generator_version"]) == (N_TRAIN, N_TEST, dd.GENERATOR_VERSION)
    stats = dd.demo_statistics(demo_root)
    train = json.loads((demo_root / "train.json").read_text())["samples"]
    counts = Counter(label for s in train for label in s["image_labels"])
    assert stats["train"]["images"] == N_TRAIN
    assert stats["train"]["labels_per_image"] == pytest.approx(sum(counts.values()) / N_TRAIN)
    assert stats["train"]["label_frequency"] == pytest.approx({n: counts[n] / N_TRAIN for n in DEMO_LABELS})


def test_image_sizes_follow_orientation():
    for index in range(40):
        labels, portrait = dd.image_spec(3, index)
        image, _ = dd.render_image(3, index)
        assert image.mode == "RGB" and image.size == ((128, 192) if portrait else (192, 128))


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path, demo_root):
    again = ensure_demo_dataset(tmp_path / "a", N_TRAIN, N_TEST, seed=0, progress=False)
    assert _files(again) == _files(demo_root)
    other = _files(ensure_demo_dataset(tmp_path / "b", N_TRAIN, N_TEST, seed=1, progress=False))
    reference = _files(demo_root)
    assert other["train.json"] != reference["train.json"]
    assert all(other[k] != reference[k] for k in reference if k.startswith("images/"))


def test_images_depend_only_on_seed_and_index(tmp_path, demo_root):
    """Per-image seeding: a smaller set is a prefix, and any image can be rendered alone (parallelisable)."""
    small = _files(ensure_demo_dataset(tmp_path, 5, 1, seed=0, progress=False))
    reference = _files(demo_root)
    for i in range(5):
        assert small[f"images/{i:06d}.jpeg"] == reference[f"images/{i:06d}.jpeg"]
    index = N_TRAIN + 2  # a test image, rendered out of order
    image, labels = dd.render_image(0, index)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    assert buffer.getvalue() == reference[f"images/{index:06d}.jpeg"]
    test = json.loads(reference["test.json"])["samples"]
    assert test[2] == {"image_name": f"{index:06d}.jpeg", "image_labels": list(labels)}


def test_global_rng_state_untouched(tmp_path):
    np.random.seed(7)
    random.seed(7)
    np_state, py_state = np.random.get_state(), random.getstate()
    ensure_demo_dataset(tmp_path, 3, 1, seed=0, progress=False)
    after = np.random.get_state()
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(np_state, after))


# ------------------------------------------------------------------------- idempotence and crash safety


def test_second_call_rewrites_nothing(tmp_path):
    root = ensure_demo_dataset(tmp_path, 6, 2, seed=0, progress=False)
    _age_all(root)
    assert ensure_demo_dataset(root, 6, 2, seed=0, progress=False) == root
    assert set(_mtimes(root).values()) == {OLD_NS}


@pytest.mark.parametrize("damage", ["delete_marker", "truncate_train", "delete_image"])
def test_damaged_set_is_regenerated(tmp_path, damage):
    root = ensure_demo_dataset(tmp_path, 6, 2, seed=0, progress=False)
    before = _files(root)
    if damage == "delete_marker":
        (root / dd.MARKER_NAME).unlink()
    elif damage == "truncate_train":
        (root / "train.json").write_bytes(before["train.json"][: len(before["train.json"]) // 2])
    else:
        (root / "images" / "000003.jpeg").unlink()
    _age_all(root)
    ensure_demo_dataset(root, 6, 2, seed=0, progress=False)
    assert _files(root) == before
    assert _mtimes(root)["train.json"] != OLD_NS and _mtimes(root)[dd.MARKER_NAME] != OLD_NS


def test_other_parameters_regenerate_and_drop_stale_images(tmp_path):
    root = ensure_demo_dataset(tmp_path, 8, 2, seed=0, progress=False)
    ensure_demo_dataset(root, 4, 2, seed=0, progress=False)
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:06d}.jpeg" for i in range(6)]
    assert len(json.loads((root / "train.json").read_text())["samples"]) == 4
    assert json.loads((root / dd.MARKER_NAME).read_text())["n_train"] == 4


def test_interrupted_run_is_not_taken_as_complete(tmp_path, monkeypatch):
    real = dd.render_image

    def crash_at_five(seed, index):
        if index == 5:
            raise KeyboardInterrupt
        return real(seed, index)

    monkeypatch.setattr(dd, "render_image", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(tmp_path / "x", 6, 2, seed=0, progress=False)
    assert json.loads((tmp_path / "x" / dd.MARKER_NAME).read_text())["complete"] is False
    assert not (tmp_path / "x" / "train.json").exists()
    monkeypatch.setattr(dd, "render_image", real)
    ensure_demo_dataset(tmp_path / "x", 6, 2, seed=0, progress=False)
    assert _files(tmp_path / "x") == _files(ensure_demo_dataset(tmp_path / "y", 6, 2, seed=0, progress=False))


def test_refuses_to_overwrite_another_dataset(tmp_path):
    foreign = json.dumps({"samples": [{"image_name": "1.jpeg", "image_labels": ["tiger"]}], "labels": ["tiger"]})
    (tmp_path / "train.json").write_text(foreign)
    with pytest.raises(FileExistsError, match="another dataset"):
        ensure_demo_dataset(tmp_path, 2, 1, progress=False)
    assert (tmp_path / "train.json").read_text() == foreign


@pytest.mark.parametrize("kwargs", [{"n_train": 0}, {"n_test": -1}, {"seed": -3}, {"seed": 2**32}, {"n_train": 2.5},
                                    {"seed": True}])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError, match="must be an integer in"):
        ensure_demo_dataset(tmp_path, **{"n_train": 2, "n_test": 1, "progress": False, **kwargs})
    assert not any(tmp_path.iterdir())


def test_progress_bar_only_when_asked(tmp_path, capsys):
    ensure_demo_dataset(tmp_path / "quiet", 2, 1, progress=False)
    assert "Generating demo dataset" not in capsys.readouterr().err
    ensure_demo_dataset(tmp_path / "loud", 2, 1, progress=True)
    assert "Generating demo dataset" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- label statistics


def test_scene_and_orientation_rates(big_draw):
    scene, _, portrait = big_draw
    np.testing.assert_allclose(np.bincount(scene, minlength=len(dd.SCENES)) / len(scene), dd.SCENE_PROBS, atol=0.005)
    assert abs(portrait.mean() - dd.PORTRAIT_RATE) < 0.005


def test_long_tail_and_labels_per_image(big_draw):
    _, labels, _ = big_draw
    freq = labels.mean(axis=0)  # (L,)
    assert len(DEMO_LABELS) >= 20
    assert 0.40 <= freq.max() <= 0.60 and 0.01 <= freq.min() <= 0.03
    assert freq.max() / freq.min() >= 10
    assert 3.0 <= labels.sum(axis=1).mean() <= 4.5
    assert labels.any(axis=1).all()


def test_constraints_match_closed_form_rates(big_draw):
    """P(label) from the tables by hand: independent Bernoullis per scene, times the parent's rate."""
    _, labels, _ = big_draw
    rates, probs = dd.SCENE_LABEL_RATES, dict(zip(dd.SCENES, dd.SCENE_PROBS))
    n = len(labels)

    def closed(child, parent):
        return sum(p * rates[s].get(child, 0) * rates[s].get(parent, 0) for s, p in probs.items())

    expected = {"sun": closed("sun", "sky"), "boat": closed("boat", "water"), "car": closed("car", "road"),
                "stars": closed("stars", "night"),
                "grass": sum(p * rates[s].get("grass", 0) * (1 - rates[s].get("snow", 0)) for s, p in probs.items())}
    for name, value in expected.items():
        sd = np.sqrt(value * (1 - value) / n)
        assert abs(_col(labels, name).mean() - value) < 5 * sd, name


def test_co_occurrence(big_draw):
    _, labels, _ = big_draw
    c = {name: _col(labels, name) for name in DEMO_LABELS}
    implications = [("sun", "sky"), ("clouds", "sky"), ("rainbow", "sky"), ("bird", "sky"), ("boat", "water"),
                    ("bridge", "water"), ("sand", "water"), ("fish", "water"), ("coral", "fish"), ("car", "road"),
                    ("stars", "night"), ("moon", "night"), ("flowers", "grass")]
    for child, parent in implications:
        assert c[child].sum() > 100, child
        assert c[parent][c[child]].all(), f"P({parent} | {child}) != 1"
    assert not (c["sky"] & c["night"]).any() and not (c["grass"] & c["snow"]).any()
    others = [name for name in DEMO_LABELS if name not in ("fish", "water", "coral")]
    assert not labels[c["fish"]][:, [DEMO_LABELS.index(o) for o in others]].any()
    assert c["mountain"][c["snow"]].mean() > 2 * c["mountain"].mean()  # soft co-occurrence via scenes
    assert c["sun"][c["sand"]].mean() > 1.5 * c["sun"].mean()


def test_dataset_labels_per_image_and_implications():
    specs = [dd.image_spec(0, i)[0] for i in range(400)]
    sizes = np.array([len(s) for s in specs])
    assert sizes.min() >= 1 and 2.5 <= sizes.mean() <= 4.5
    for labels in specs:
        assert "sun" not in labels or "sky" in labels
        assert "boat" not in labels or "water" in labels
        assert "car" not in labels or "road" in labels


def test_sampler_and_label_checks_reject_bad_input():
    with pytest.raises(ValueError, match="uniforms"):
        dd.sample_scene_labels(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="uniforms"):
        dd.sample_scene_labels(np.ones((2, dd.N_UNIFORMS)))
    with pytest.raises(ValueError, match="Unknown demo labels"):
        dd.render_scene(["sky", "tiger"], False, (0, 0))
    with pytest.raises(ValueError, match="'sun' needs one of"):
        dd.render_scene(["sun"], False, (0, 0))
    with pytest.raises(ValueError, match="cannot be drawn with"):
        dd.render_scene(["water", "fish", "sky"], False, (0, 0))
    with pytest.raises(ValueError, match="at least one label"):
        dd.check_label_set([])


# -------------------------------------------------------------------------- labels are what is drawn


def _removable(labels: tuple[str, ...]) -> list[str]:
    """Labels whose removal leaves a valid scene (not e.g. sky under a sun)."""
    out = []
    for name in labels:
        try:
            dd.check_label_set([other for other in labels if other != name])
            out.append(name)
        except ValueError:
            pass
    return out


def _covering_scenes(per_label: int, removable: bool = False) -> list[tuple[tuple[str, ...], bool, int]]:
    """Scenes of seed 0 in index order until every label appeared (or was removable) `per_label` times."""
    seen, picked = Counter(), []
    for index in range(20_000):
        labels, portrait = dd.image_spec(0, index)
        counted = _removable(labels) if removable else labels
        if any(seen[name] < per_label for name in counted):
            picked.append((labels, portrait, index))
            seen.update(counted)
        if all(seen[name] >= per_label for name in DEMO_LABELS):
            return picked
    raise AssertionError(f"labels never sampled: {[n for n in DEMO_LABELS if seen[n] < per_label]}")


def test_listed_iff_visible_in_owner_map():
    for labels, portrait, index in _covering_scenes(per_label=4):
        image, owner = dd.render_scene(labels, portrait, (0, index), return_owner=True)
        assert owner.shape == (image.size[1], image.size[0])
        counts = dd.visible_pixels(owner)
        for name in DEMO_LABELS:
            if name in labels:
                assert counts[name] >= MIN_PIXELS, (index, name, counts[name])
            else:
                assert counts[name] == 0, (index, name)


def _small(image: Image.Image) -> np.ndarray:
    return np.asarray(image.resize((64, 64), Image.BILINEAR), dtype=np.int16)  # (64, 64, 3)


def test_each_label_changes_the_64px_image():
    """Independent of the owner bookkeeping: dropping one label visibly changes the 64x64 downscale."""
    for labels, portrait, index in _covering_scenes(per_label=2, removable=True):
        full = _small(dd.render_scene(labels, portrait, (0, index)))
        for name in _removable(labels):
            rest = [other for other in labels if other != name]
            changed = np.abs(full - _small(dd.render_scene(rest, portrait, (0, index)))).max(axis=2) > 30  # (64, 64)
            assert changed.sum() >= 20, (index, name, int(changed.sum()))  # real cues: >= 25 in 1500 scenes
