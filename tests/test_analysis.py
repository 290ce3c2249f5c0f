"""Tests for analysis.py: autograd gradients against hand-derived closed forms, label counts against a
collections.Counter, frequency bins against hand-computed values, and every command writing a PNG and its CSV
(curves / per-label from small hand-written run files), plus the one-sentence errors with exit status 2."""
from __future__ import annotations

import csv
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import analysis
from analysis import (frequency_bins, gradient_losses, label_statistics, loss_gradients, probability_grid,
                      read_log, read_per_label)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Sample points in (0, 1), including extremes where float32 sigmoid/logit still round-trip well.
P = torch.tensor([0.002, 0.03, 0.1, 0.25, 0.5, 0.7, 0.9, 0.97, 0.998], dtype=torch.float64)
# The header main.py writes to log.csv (copied from a real 1-epoch run), so the fake logs look like real ones.
LOG_HEADER = ("epoch,train/loss,train/images_per_s,lr,val/loss,val/per_class/precision,val/per_class/recall,"
              "val/per_class/f1,val/per_class/f1_mean_per_label,val/per_image/precision,val/per_image/recall,"
              "val/per_image/f1,val/N+,val/mAP,val/images_per_s,time_s")


def _grads(p=P, **hyper):
    """Autograd gradients at p, returned with p as float64 (the p the losses actually saw)."""
    curves = loss_gradients(gradient_losses(**hyper), p)
    return curves["p"].double(), curves["positive"], curves["negative"]


def _close(actual, expected):
    assert_close(actual.double(), expected, rtol=1e-4, atol=2e-6)


def _focal_pos(p, g):
    """d/dx of -(1-p)^g log p, with dp/dx = p(1-p):  (1-p)^g (g p log p - (1-p))."""
    return (1 - p) ** g * (g * p * torch.log(p) - (1 - p))


def _focal_neg(p, g):
    """d/dx of -p^g log(1-p):  p^g (p - g (1-p) log(1-p))."""
    return p ** g * (p - g * (1 - p) * torch.log1p(-p))


# ---------------------------------------------------------------- gradients


def test_bce_gradient_is_p_minus_y():
    p, pos, neg = _grads()
    _close(pos["BCE"], p - 1)
    _close(neg["BCE"], p)


@pytest.mark.parametrize("gamma", [1.5, 3.0])
def test_focal_gradient_matches_closed_form(gamma):
    p, pos, neg = _grads(gamma=gamma)
    for g in (2.0, gamma):  # the fixed gamma = 2 curve and the configured one
        name = f"focal gamma={g:g}"
        _close(pos[name], _focal_pos(p, g))
        _close(neg[name], _focal_neg(p, g))


def test_asl_gradient_matches_closed_form_and_is_zero_below_margin():
    m, gn = 0.1, 4.0
    # Points on both sides of the margin, close to it (p = m itself is not exact after float32 logit/sigmoid).
    sample = torch.tensor([0.002, 0.05, 0.0999, 0.1001, 0.11, 0.3, 0.6, 0.9, 0.998], dtype=torch.float64)
    p, pos, neg = _grads(sample, gamma_pos=0.0, gamma_neg=gn, margin=m)
    name = "ASL gamma+=0 gamma-=4 m=0.1"
    _close(pos[name], p - 1)  # gamma+ = 0: the BCE term for positives
    below = p <= m
    assert below.sum() == 3 and (~below).sum() == 6
    assert torch.equal(neg[name][below], torch.zeros(int(below.sum())))  # exactly 0, not merely small
    # p > m: l = -pm^g log(1-pm), pm = p - m; dl/dx = p(1-p) pm^g [1/(1-pm) - g log(1-pm)/pm].
    q, pm = p[~below], p[~below] - m
    _close(neg[name][~below], q * (1 - q) * pm ** gn * (1 / (1 - pm) - gn * torch.log1p(-pm) / pm))


def test_asl_margin_without_focusing_and_focal_positives():
    m = 0.2
    p, pos, neg = _grads(gamma_pos=1.0, gamma_neg=0.0, margin=m)
    name = "ASL gamma+=1 gamma-=0 m=0.2"
    _close(pos[name], _focal_pos(p, 1.0))
    # gamma- = 0: l = -log(1 - p + m) for p > m, so dl/dx = p(1-p)/(1-p+m); 0 for p <= m.
    expected = torch.where(p > m, p * (1 - p) / (1 - p + m), torch.zeros_like(p))
    _close(neg[name], expected)
    assert torch.equal(neg[name][p <= m], torch.zeros(int((p <= m).sum())))


def test_detach_focusing_gives_the_training_gradient():
    # With the weights w = (1-p)^g, p^g held constant: d/dx[-w log p] = -w (1-p), d/dx[-w log(1-p)] = w p.
    curves = loss_gradients(gradient_losses(gamma=3.0, detach_focusing=True), P)
    p = curves["p"].double()
    _close(curves["positive"]["focal gamma=3"], -(1 - p) ** 4)
    _close(curves["negative"]["focal gamma=3"], p ** 4)


def test_gradient_losses_names_and_defaults():
    assert list(gradient_losses()) == ["BCE", "focal gamma=2", "focal gamma=3", "ASL gamma+=0 gamma-=4 m=0.05"]
    assert list(gradient_losses(gamma=2)) == ["BCE", "focal gamma=2", "ASL gamma+=0 gamma-=4 m=0.05"]
    losses = gradient_losses()
    assert all(getattr(loss, "detach_focusing", False) is False for loss in losses.values())


def test_probability_grid_is_strictly_inside():
    p = probability_grid(9)
    _close(p, torch.arange(1, 10, dtype=torch.float64) / 10)
    with pytest.raises(analysis.AnalysisError):
        probability_grid(1)


def test_gradients_command_writes_png_and_csv(tmp_path):
    paths = analysis.main(analysis.get_args_parser().parse_args(
        ["gradients", "--points", "19", "--margin", "0.1", "--out", str(tmp_path)]))
    assert paths["png"].read_bytes().startswith(PNG_MAGIC) and paths["png"].stat().st_size > 10_000
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].startswith("# ") and "detach_focusing=False" in lines[0] and "exact derivative" in lines[0]
    rows = list(csv.DictReader(lines[1:]))
    assert len(rows) == 19
    p = torch.tensor([float(r["p"]) for r in rows], dtype=torch.float64)
    assert_close(torch.tensor([float(r["BCE | positive"]) for r in rows], dtype=torch.float64), p - 1, atol=2e-6,
                 rtol=1e-5)
    asl_neg = torch.tensor([float(r["ASL gamma+=0 gamma-=4 m=0.1 | negative"]) for r in rows])
    assert torch.all(asl_neg[p <= 0.1] == 0) and torch.all(asl_neg[p > 0.1] > 0)


# ---------------------------------------------------------------- labels


def _counter_statistics(root: Path, split: str):
    """Independent reference: label counts (once per image) and labels-per-image counts from the raw JSON."""
    files = {"train": ["train.json"], "test": ["test.json"], "all": ["train.json", "test.json"]}[split]
    samples = [s for f in files for s in json.loads((root / f).read_text())["samples"]]
    counts = Counter(label for s in samples for label in set(s["image_labels"]))
    per_image = Counter(len(set(s["image_labels"])) for s in samples)
    return counts, per_image, len(samples)


@pytest.mark.parametrize("split", ["train", "all"])
def test_label_statistics_match_counter(tiny_dataset, split):
    stats = analysis.load_label_statistics(str(tiny_dataset), split)
    counts, per_image, n = _counter_statistics(tiny_dataset, split)
    vocabulary = stats["vocabulary"]
    assert stats["counts"].tolist() == [counts[label] for label in vocabulary]
    assert len(stats["labels_per_image"]) == n
    assert stats["histogram"].tolist() == [per_image[k] for k in range(max(per_image) + 1)]
    ranked = [(-counts[vocabulary[j]], vocabulary[j]) for j in stats["order"].tolist()]
    assert ranked == sorted(ranked)  # decreasing count, ties by name


def test_label_statistics_by_hand():
    samples = [{"image_name": "a", "image_labels": ["b", "a", "b"]}, {"image_name": "b", "image_labels": []},
               {"image_name": "c", "image_labels": ["a"]}]
    stats = label_statistics(samples, ["a", "b", "c"])
    assert stats["counts"].tolist() == [2, 1, 0]  # "b" twice in one image counts once
    assert stats["labels_per_image"].tolist() == [2, 0, 1]
    assert stats["histogram"].tolist() == [1, 1, 1]
    assert stats["order"].tolist() == [0, 1, 2]


def test_labels_command_needs_no_images(tiny_dataset, tmp_path):
    shutil.rmtree(tiny_dataset / "images")
    out = tmp_path / "out"
    paths = analysis.main(analysis.get_args_parser().parse_args(
        ["labels", "--data", str(tiny_dataset), "--top", "2", "--out", str(out)]))
    assert paths["png"].read_bytes().startswith(PNG_MAGIC) and paths["png"].stat().st_size > 10_000
    counts, per_image, _ = _counter_statistics(tiny_dataset, "train")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {r["label"]: int(r["count"]) for r in rows} == dict(counts)
    assert [int(r["count"]) for r in rows] == sorted(counts.values(), reverse=True)
    hist = {int(r["labels_per_image"]): int(r["images"]) for r in csv.DictReader(paths["per_image_csv"].open())}
    assert {k: v for k, v in hist.items() if v} == dict(per_image)
    table = paths["markdown"].read_text().splitlines()
    assert table[:2] == ["| class name | count |", "|---|---|"] and len(table) == 2 + len(counts)
    assert table[2] == f"| {rows[0]['label']} | {rows[0]['count']} |"


def test_label_statistics_on_real_corel5k(shared_datasets):
    root = shared_datasets / "Corel-5k"
    stats = analysis.load_label_statistics(str(root), "train")
    counts, _, n = _counter_statistics(root, "train")
    assert len(stats["labels_per_image"]) == n
    assert dict(zip(stats["vocabulary"], stats["counts"].tolist())) == {v: counts[v] for v in stats["vocabulary"]}


# ---------------------------------------------------------------- curves and per-label


def _fake_run(root: Path, name: str, rows: list[tuple]) -> Path:
    """A run directory with a log.csv in main.py's format; rows are (epoch, train_loss, val_loss, f1, n_plus, map)."""
    run = root / name
    run.mkdir(parents=True)
    lines = [LOG_HEADER]
    for epoch, tl, vl, f1, n_plus, m in rows:
        lines.append(f"{epoch},{tl},100.0,0.0001,{vl},0.3,0.2,{f1},0.2,0.4,0.3,0.35,{n_plus},{m},200.0,12.5")
    (run / "log.csv").write_text("\n".join(lines) + "\n")
    return run


def test_curves_command_overlays_runs(tmp_path):
    a = _fake_run(tmp_path, "A", [(2, 1.5, 1.7, 0.25, 7, 30.0), (1, 2.0, 1.9, 0.1, 3, 20.0)])  # out of order
    b = _fake_run(tmp_path, "B", [(1, 3.0, 2.9, 0.05, 1, 10.0)])
    log = read_log(a)
    assert log["epoch"].tolist() == [1.0, 2.0] and log["val/N+"].tolist() == [3.0, 7.0]
    paths = analysis.main(analysis.get_args_parser().parse_args(["curves", str(a), str(b)]))
    assert paths["png"] == a / "analysis" / "curves.png"  # default: the first run's analysis/ folder
    assert paths["png"].read_bytes().startswith(PNG_MAGIC) and paths["png"].stat().st_size > 10_000
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["run"], r["epoch"], r["val/mAP"]) for r in rows] == [("A", "1", "20"), ("A", "2", "30"),
                                                                      ("B", "1", "10")]


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_curves_have_whole_epoch_ticks_and_tell_train_from_validation_for_any_run_length(tmp_path, epochs):
    run = _fake_run(tmp_path, "A", [(e, 2.0 / e, 1.9 / e, 0.1 * e, e, 10.0 * e) for e in range(1, epochs + 1)])
    fig = analysis.curves_figure({"A": read_log(run)})
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks) and min(ticks) >= 1 and max(ticks) <= epochs
    train, val = fig.axes[0].lines[:2]
    assert (train.get_linestyle(), train.get_marker()) != (val.get_linestyle(), val.get_marker())
    assert train.get_color() == val.get_color()  # one colour per run; the style tells train from validation
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["A", "train", "val"]


def test_plot_writes_into_the_run_it_reads_never_the_current_folder(tmp_path, monkeypatch):
    run = _fake_run(tmp_path / "runs", "A", [(1, 2.0, 1.9, 0.1, 3, 20.0)])
    _fake_per_label(run, [5, 1], [0.5, 0.0])
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    for command in ("curves", "per-label"):
        analysis.main(analysis.get_args_parser().parse_args([command, str(run)]))
    written = sorted(set(p for p in tmp_path.rglob("*") if p.is_file()) - set(before))
    assert written and all(p.parent == run / "analysis" for p in written)
    assert not any(here.iterdir())  # nothing in the folder the command ran from
    analysis.main(analysis.get_args_parser().parse_args(["gradients"]))
    assert sorted(p.name for p in (here / "runs" / "analysis").iterdir()) == ["gradients.csv", "gradients.png"]


def _fake_per_label(run: Path, frequencies, f1s) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = ["label,train_frequency,test_frequency,threshold,precision,recall,f1,ap"]
    lines += [f"l{j},{n},1,0.50,0.5,0.5,{f},0.5" for j, (n, f) in enumerate(zip(frequencies, f1s))]
    (run / "per_label.csv").write_text("\n".join(lines) + "\n")
    return run


def test_frequency_bins_by_hand():
    n = torch.tensor([0, 1, 2, 3, 4, 7, 8, 100], dtype=torch.float64)
    f1 = torch.tensor([0.0, 0.5, 1.0, 0.0, 0.2, 0.4, 0.9, math.nan], dtype=torch.float64)
    bins = frequency_bins(n, f1)
    # Bins {0}, {1}, {2, 3}, {4..7}, {8..15}; the NaN label (n = 100) is left out.
    assert bins["low"].tolist() == [0, 1, 2, 4, 8] and bins["high"].tolist() == [0, 1, 3, 7, 15]
    assert bins["labels"].tolist() == [1, 1, 2, 2, 1]
    _close(bins["mean_f1"], torch.tensor([0.0, 0.5, 0.5, 0.3, 0.9], dtype=torch.float64))
    _close(bins["zero_f1"], torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_per_label_command_writes_png_and_csv(tmp_path):
    run = _fake_per_label(tmp_path / "run", [5, 0, 40, 1, 300], [0.5, 0.0, 0.8, 0.0, 0.9])
    result = read_per_label(run)
    assert result["labels"] == ["l0", "l1", "l2", "l3", "l4"]
    out = tmp_path / "plots"
    paths = analysis.main(analysis.get_args_parser().parse_args(["per-label", str(run), "--out", str(out)]))
    assert paths["png"].read_bytes().startswith(PNG_MAGIC) and paths["png"].stat().st_size > 10_000
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [(r["label"], r["train_frequency"], r["f1"]) for r in rows] == [
        ("l1", "0", "0"), ("l3", "1", "0"), ("l0", "5", "0.5"), ("l2", "40", "0.8"), ("l4", "300", "0.9")]
    bins = list(csv.DictReader(paths["bins_csv"].open()))
    assert [(r["frequency_low"], r["frequency_high"], r["labels"]) for r in bins] == [
        ("0", "0", "1"), ("1", "1", "1"), ("4", "7", "1"), ("32", "63", "1"), ("256", "511", "1")]


# ---------------------------------------------------------------- errors


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        analysis.cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_run_directory(tmp_path, capsys):
    err = _cli_error(capsys, ["curves", str(tmp_path / "nope")])
    assert "does not exist" in err and "nope" in err


def test_run_without_log_or_per_label(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert "no log.csv" in _cli_error(capsys, ["curves", str(tmp_path / "run")])
    assert "--evaluate" in _cli_error(capsys, ["per-label", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "analysis").exists()  # nothing written on error


def test_malformed_log(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch,train/loss\n1,0.5\n")
    assert "lacks the column(s)" in _cli_error(capsys, ["curves", str(run)])
    (run / "log.csv").write_text(LOG_HEADER + "\n")
    assert "no rows" in _cli_error(capsys, ["curves", str(run)])
    (run / "log.csv").write_text(LOG_HEADER + "\n1,abc" + ",1" * 15 + "\n")
    assert "is not a number" in _cli_error(capsys, ["curves", str(run)])


def test_unknown_dataset_and_bad_hyper_parameters(tmp_path, capsys):
    assert "does not exist" in _cli_error(capsys, ["labels", "--data", str(tmp_path / "no-such-dataset")])
    assert "margin" in _cli_error(capsys, ["gradients", "--margin", "1.5", "--out", str(tmp_path)])
    assert "gamma" in _cli_error(capsys, ["gradients", "--gamma", "-1", "--out", str(tmp_path)])
