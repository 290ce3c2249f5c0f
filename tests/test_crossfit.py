"""Cross-fitted and steadied thresholds through --evaluate (crossfit.py, report.py): out-of-fold predictions come from
models that never saw the image, folds are reused, and every option's thresholds are recomputed from evaluation.npz."""

import numpy as np
import pytest
import torch
from sklearn.metrics import matthews_corrcoef

from conftest import evaluate, run_dirs, train_args, write_dataset
from dataset import fold_of
from components import load_data
from distributed import World
from main import cli
from runs import load_config

GRID = [round(0.05 * k, 2) for k in range(1, 15)]
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = write_dataset(tmp_path_factory.mktemp("data") / "tiny", n_train=30, n_test=10)
    save = tmp_path_factory.mktemp("runs")
    cli(train_args(data, save, "--epochs", "1"))
    (run_dir,) = run_dirs(save)
    return run_dir, data


def test_out_of_fold_predictions_never_come_from_a_model_that_saw_the_image(run, capsys):
    run_dir, data = run
    results, saved = evaluate(run_dir, "--threshold-split", "cv", "--folds", "3")
    assert results["run"]["threshold_split"] == "cv" and capsys.readouterr().out.count("Cross-fitting: fold") == 3
    config = load_config(run_dir)
    train = load_data(str(data), config, False, World()).train  # 24 training images (6 held out for validation)
    assert sorted(saved["fit_images"]) == sorted(train.image_names)  # every training image, once
    fold = fold_of(train, 3, config["seed"])
    for k in range(3):
        (fold_dir,) = (run_dir / "folds").glob(f"*_fold{k}of3")
        fold_config = load_config(fold_dir)
        assert fold_config["hold_out_fold"] == [k, 3]
        seen = set(load_data(str(data), fold_config, False, World()).train.image_names)  # what fold k trained on
        rows = np.load(run_dir / "folds" / f"fold{k}of3.npz")["rows"]
        predicted = {train.image_names[r] for r in rows}
        assert predicted and not predicted & seen, k  # by image: never a model that saw it
        assert predicted == {n for n, f in zip(train.image_names, fold.tolist()) if f == k}
    # A second --evaluate reuses the finished folds.
    again, _ = evaluate(run_dir, "--threshold-split", "cv", "--folds", "3")
    assert "Cross-fitting" not in capsys.readouterr().out and again["thresholds"] == results["thresholds"]


def _sklearn_fit(y, p):
    best = []
    for c in range(y.shape[1]):
        scores = [matthews_corrcoef(y[:, c], (p[:, c] >= t).astype(int)) for t in GRID]
        best.append(0.5 if max(abs(s) for s in scores) == 0 else GRID[int(np.argmax(scores))])
    return np.array(best)


def _pooled(y, p, labels):
    pooled_y, pooled_p = y[:, labels].reshape(-1), p[:, labels].reshape(-1)
    scores = [matthews_corrcoef(pooled_y, (pooled_p >= t).astype(int)) for t in GRID]
    return 0.5 if max(abs(s) for s in scores) == 0 else GRID[int(np.argmax(scores))]


def test_min_positives_and_shrinkage_through_evaluate_equal_a_recomputation(run):
    run_dir, _ = run
    _, saved = evaluate(run_dir, "--threshold-split", "val", "--threshold-min-positives", "3")  # val: few positives
    y, p = saved["fit_targets"].astype(int), saved["fit_probs"].astype(np.float64)
    own, positives = _sklearn_fit(y, p), y.sum(0)
    rare = positives < 3
    assert rare.any() and (~rare).any()
    expected = np.where(rare, _pooled(y, p, rare), own)
    np.testing.assert_allclose(saved["thresholds"], expected, atol=1e-6)

    _, saved = evaluate(run_dir, "--threshold-split", "val", "--threshold-shrinkage", "4")
    pooled = _pooled(y, p, np.ones(y.shape[1], dtype=bool))
    np.testing.assert_allclose(saved["thresholds"], (positives * own + 4 * pooled) / (positives + 4), atol=1e-6)


def test_train_plus_val_fits_on_both_splits(run):
    run_dir, _ = run
    results, saved = evaluate(run_dir, "--threshold-split", "train+val")
    assert results["run"]["threshold_split"] == "train+val" and len(saved["fit_images"]) == 30
    np.testing.assert_allclose(saved["thresholds"], _sklearn_fit(saved["fit_targets"].astype(int),
                                                                 saved["fit_probs"].astype(np.float64)), atol=1e-6)


def test_fold_assignment_is_balanced_seeded_and_keeps_gan_copies_with_their_original():
    from dataset import Split

    names = [f"{i}.jpeg" for i in range(7)] + ["3_aug.jpeg", "5_aug.jpeg"]
    split = Split("train", names, [None] * 9, torch.zeros(9, 2), sources=[None] * 7 + ["3.jpeg", "5.jpeg"])
    fold = fold_of(split, 3, seed=0).tolist()
    assert sorted(np.bincount(fold[:7]).tolist()) == [2, 2, 3]
    assert fold[7] == fold[3] and fold[8] == fold[5]
    assert fold == fold_of(split, 3, seed=0).tolist() and fold != fold_of(split, 3, seed=1).tolist()


def test_a_fold_cache_interrupted_while_written_leaves_no_file_a_later_evaluate_would_trust(tmp_path, monkeypatch):
    import crossfit
    import utils

    out = {"probs": torch.rand(4, 3), "targets": torch.randint(0, 2, (4, 3)), "rows": torch.tensor([5, 1, 7, 2])}
    path = tmp_path / "run" / "folds" / "fold0of5.npz"  # neither folder exists yet
    crossfit.save_fold(path, out)
    saved = np.load(path)
    for key, value in out.items():
        np.testing.assert_array_equal(saved[key], value.numpy())

    def ctrl_c(*args):  # the write is done, the rename never happens
        raise KeyboardInterrupt

    other = tmp_path / "run" / "folds" / "fold1of5.npz"
    monkeypatch.setattr(utils.os, "replace", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        crossfit.save_fold(other, out)
    assert not other.exists() and sorted(p.name for p in path.parent.iterdir()) == ["fold0of5.npz"]


# ---------------------------------------------------------------- planted out-of-fold predictions

PLANTED = np.array([0.6, 0.45, 0.15, 0.3, 0.2])  # each label's separating grid point (label 4 is noisy)


@pytest.fixture(scope="module")
def planted(run, tmp_path_factory):
    """A copy of the run whose 3 fold caches are planted: label c's positives score just above PLANTED[c] and its
    negatives just below, except label 4, whose scores overlap; each fold's rows are written in shuffled order."""
    import shutil

    run_dir, data = run
    copy = tmp_path_factory.mktemp("planted") / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("folds"))
    train = load_data(str(data), load_config(copy), False, World()).train
    y = train.targets.numpy()  # (N, C)
    rng = np.random.default_rng(0)
    jitter = rng.uniform(0.005, 0.02, y.shape)
    probs = np.where(y == 1, PLANTED + jitter, PLANTED - 0.025 - jitter)
    noisy = rng.random(len(y)) < 0.3
    probs[noisy, 4] = rng.uniform(0.05, 0.7, noisy.sum())
    fold = fold_of(train, 3, load_config(copy)["seed"]).numpy()
    (copy / "folds").mkdir()
    for k in range(3):
        rows = rng.permutation(np.flatnonzero(fold == k))
        np.savez(copy / "folds" / f"fold{k}of3.npz", probs=probs[rows].astype(np.float32), targets=y[rows],
                 rows=rows)
    return copy, y, probs.astype(np.float32)


def test_planted_fold_caches_are_the_fitting_predictions_in_training_order(planted, capsys):
    run_dir, y, probs = planted
    _, saved = evaluate(run_dir, "--threshold-split", "cv", "--folds", "3")
    assert "Cross-fitting: fold" not in capsys.readouterr().out  # the planted folds are used, none trained
    np.testing.assert_array_equal(saved["fit_probs"], probs)
    np.testing.assert_array_equal(saved["fit_targets"], y)
    np.testing.assert_allclose(saved["thresholds"][:4], PLANTED[:4], atol=1e-7)  # each clean label at its own point
    np.testing.assert_allclose(saved["thresholds"], _sklearn_fit(y, probs.astype(np.float64)), atol=1e-6)
    assert len(set(saved["thresholds"].round(6).tolist())) == 5


def test_every_rare_label_option_gives_its_own_thresholds_equal_to_a_recomputation(planted):
    run_dir, y, probs = planted
    p = probs.astype(np.float64)
    own, positives = _sklearn_fit(y, p), y.sum(0)
    minimum = int(np.median(positives)) + 1
    rare = positives < minimum
    assert rare.any() and (~rare).any() and len(set(positives.tolist())) > 1
    cv = ("--threshold-split", "cv", "--folds", "3")
    got = {"plain": evaluate(run_dir, *cv)[1]["thresholds"],
           "min": evaluate(run_dir, *cv, "--threshold-min-positives", str(minimum))[1]["thresholds"],
           "shrunk": evaluate(run_dir, *cv, "--threshold-shrinkage", "3")[1]["thresholds"],
           "both": evaluate(run_dir, *cv, "--threshold-min-positives", str(minimum),
                            "--threshold-shrinkage", "3")[1]["thresholds"]}
    pooled_rare, pooled_all = _pooled(y, p, rare), _pooled(y, p, np.ones(5, dtype=bool))
    assert pooled_rare != pooled_all  # pooling over the rare labels alone is not pooling over all
    shrunk = (positives * own + 3 * pooled_all) / (positives + 3)
    expected = {"plain": own, "min": np.where(rare, pooled_rare, own), "shrunk": shrunk,
                "both": np.where(rare, pooled_rare, shrunk)}
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, err_msg=name)
    distinct = {name: tuple(np.round(t, 5)) for name, t in got.items()}
    assert len(set(distinct.values())) == 4, distinct  # every option changes the thresholds


# ---------------------------------------------------------------- cross-fitting without training (fast)

def test_out_of_fold_trains_each_missing_fold_once_routes_its_rows_and_reuses_it(tmp_path, capsys):
    """crossfit.out_of_fold with a `train` that builds fold runs instantly (conftest.make_run, a different head per
    fold): each fold is asked for once with the run's settings and its held-out fold, predicts exactly its rows, the
    rows come back in training order, and a second call trains nothing."""
    from pathlib import Path

    import crossfit
    from conftest import make_run
    from config import Runtime
    from runs import load_run, run_dir_name

    data = write_dataset(tmp_path / "tiny", n_train=30, n_test=6)
    run_dir = make_run(tmp_path / "runs", data)
    config = {**load_config(run_dir), "data": str(data)}
    train_split = load_data(str(data), config, False, World()).train
    asked = []

    def train(fold_config):
        k, folds = fold_config["hold_out_fold"]
        asked.append((k, folds, fold_config["resume"], fold_config["save_dir"], fold_config["run_name"],
                      fold_config["num_workers"], fold_config["device"], fold_config["progress"],
                      fold_config["learning_rate"]))
        name = run_dir_name("TinyResNet", "AsymmetricLoss", str(data), f"fold{k}of{folds}")
        return make_run(Path(fold_config["save_dir"]), data, sharpen=2.0 + 3 * k, name=name)

    runtime = Runtime(num_workers=0, batch_size=4, progress=False, device="cpu")  # the run's: 0 workers, auto
    out = crossfit.out_of_fold(run_dir, config, load_data(str(data), config, False, World()), 3, runtime, train)
    folds_dir = str(run_dir / "folds")
    assert asked == [(k, 3, None, folds_dir, f"fold{k}of3", 0, "cpu", False, config["learning_rate"])
                     for k in range(3)]
    said = capsys.readouterr().out.splitlines()
    held_out = [int((fold_of(train_split, 3, config["seed"]) == k).sum()) for k in range(3)]
    assert [line for line in said if line.startswith("Cross-fitting")] == [
        f"Cross-fitting: fold {k + 1} of 3, a model trained without {held_out[k]} of the {len(train_split)} training "
        f"images (K = 3 extra trainings in all; finished folds are reused)." for k in range(3)]
    assert out["indices"].tolist() == list(range(len(train_split)))  # every original, in training order
    torch.testing.assert_close(out["targets"], train_split.targets)
    fold = fold_of(train_split, 3, config["seed"])
    for k in range(3):  # row r comes from the model of the fold r belongs to, and from no other
        model, _, _ = load_run(run_dir / "folds" / f"TinyResNet_AsymmetricLoss_tiny_fold{k}of3", None,
                               torch.device("cpu"))
        rows = (fold == k).nonzero().flatten()
        images = torch.stack([load_image_for(train_split, int(r)) for r in rows])
        with torch.no_grad():
            expected = torch.sigmoid(model((images.float() / 255 - 0.5) / 0.5))
        torch.testing.assert_close(out["probs"][rows], expected, rtol=1e-5, atol=1e-5)
    again = crossfit.out_of_fold(run_dir, config, load_data(str(data), config, False, World()), 3, runtime, None)
    assert len(asked) == 3 and "Cross-fitting" not in capsys.readouterr().out  # reused: nothing trained
    torch.testing.assert_close(again["probs"], out["probs"])


def load_image_for(split, row):
    from dataset import load_image

    return load_image(split.paths[row], 32)


def test_a_fold_with_a_last_checkpoint_is_resumed_and_folds_of_another_dataset_are_refused(tmp_path):
    from pathlib import Path

    import crossfit
    from conftest import make_run
    from config import Runtime
    from utils import UserError

    data = write_dataset(tmp_path / "tiny", n_train=30, n_test=6)
    run_dir = make_run(tmp_path / "runs", data)
    config = {**load_config(run_dir), "data": str(data)}
    splits = load_data(str(data), config, False, World())
    runtime = Runtime(num_workers=0, batch_size=4, progress=False, device="cpu")
    fold_dir = make_run(run_dir / "folds", data, name="TinyResNet_AsymmetricLoss_tiny_fold0of2")
    (fold_dir / "last.pth").write_bytes(b"interrupted")  # a fold stopped mid-training: resumed, not started again
    asked = []

    def train(fold_config):
        asked.append((fold_config["resume"], fold_config.get("hold_out_fold")))
        return Path(fold_config["resume"]) if fold_config["resume"] else make_run(
            Path(fold_config["save_dir"]), data, name=f"TinyResNet_AsymmetricLoss_tiny_{fold_config['run_name']}")

    with pytest.raises(UserError, match=r"^Fold 1 of 2 of .* is not trained yet, and this command cannot train"):
        crossfit.out_of_fold(run_dir, config, splits, 2, runtime, None)
    crossfit.out_of_fold(run_dir, config, splits, 2, runtime, train)
    assert asked == [(str(fold_dir), None), (None, [1, 2])]
    saved = np.load(run_dir / "folds" / "fold0of2.npz")
    assert str(saved["data"]) == str(data.resolve())
    older = dict(np.load(run_dir / "folds" / "fold1of2.npz"))
    np.savez(run_dir / "folds" / "fold1of2.npz", **{**older, "data": np.array("")})  # older caches name no dataset
    crossfit.out_of_fold(run_dir, config, splits, 2, runtime, train)  # accepted
    other = write_dataset(tmp_path / "other" / "tiny", n_train=30, n_test=6, seed=9)
    moved = load_data(str(other), config, False, World())
    with pytest.raises(UserError, match="holds predictions of the dataset"):
        crossfit.out_of_fold(run_dir, config, moved, 2, runtime, train)
