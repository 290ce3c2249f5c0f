"""Tests of the ML-WGAN-GP augmentation (DataAugmentation/): grouped training = per-image training, the gradient
penalty against hand-built references, the study's preprocessing and output orientation, files, JSON and resuming.

Everything runs at 16 x 24 (two upsampling stages) for a few iterations; the numerical comparisons run in float64
so that "equal" can be asserted tightly.
"""
from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

from distributed import World
from DataAugmentation import cli
from DataAugmentation.files import BadImageError, fakes_to_images, load_real_image, output_names
from DataAugmentation.models import GanConfig, GroupedCritic, GroupedGenerator, init_group_, upsampling_stages
from DataAugmentation.train import draw_randomness, gradient_penalty, image_seed, train_group, train_images


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second OpenMP thread buys nothing, and on a busy shared machine its spin-waits
    made this file more than 10x slower (measured). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = GanConfig(height=16, width=24)
TINY = GanConfig(height=16, width=24, hidden=4, noise_dim=8)
F64 = torch.float64


def grouped_models(cfg: GanConfig, seeds: list[int], dtype=F64):
    """A grouped generator and critic initialised from per-image generators (as train_group does)."""
    gen, crit = GroupedGenerator(cfg, len(seeds)), GroupedCritic(cfg, len(seeds))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    init_group_([gen, crit], generators, cfg.init_std)
    return gen.to(dtype), crit.to(dtype), generators


def reference_networks(gen: GroupedGenerator, crit: GroupedCritic, k: int):
    """The study's per-image networks (augmentation/gen_critic.py) built from torch.nn layers, with model k's weights.

    Unlike models.py, the convolutions before BatchNorm keep the study's biases (PyTorch's random default init):
    training-mode BatchNorm cancels them, so the outputs must still agree.
    """
    def block(layer, transposed, last_activation):
        kernel = tuple(layer.weight.shape[-2:])
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        conv = conv_cls(layer.c_in, layer.c_out, kernel, layer.stride, layer.padding, bias=True)
        modules = [conv]
        with torch.no_grad():
            conv.weight.copy_(layer.weight[k])
            if layer.batch_norm:
                bn = nn.BatchNorm2d(layer.c_out)
                bn.weight.copy_(layer.bn_weight[k])
                bn.bias.copy_(layer.bn_bias[k])
                modules.append(bn)
            else:
                conv.bias.copy_(layer.bias[k])
        modules.append(last_activation)
        return modules

    with torch.random.fork_rng():
        torch.manual_seed(1234)  # the pre-BatchNorm biases: random, to show that they cancel
        g_layers = [m for i, layer in enumerate(gen.layers)
                    for m in block(layer, True, nn.Tanh() if i == len(gen.layers) - 1 else nn.ReLU())]
        d_layers = [m for i, layer in enumerate(crit.layers)
                    for m in block(layer, False, nn.Flatten(1) if i == len(crit.layers) - 1 else nn.LeakyReLU(0.2))]
    return nn.Sequential(nn.Unflatten(1, (-1, 1, 1)), *g_layers).to(F64), nn.Sequential(*d_layers).to(F64)


def matching_parameters(reference: nn.Sequential) -> list[nn.Parameter]:
    """The reference's parameters in models.py's order (weight, bn_weight, bn_bias / weight, bias), minus the
    pre-BatchNorm biases that models.py leaves out."""
    layers = [m for m in reference if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d))]
    params = []
    for i, m in enumerate(layers):
        if isinstance(m, nn.BatchNorm2d):
            params += [m.weight, m.bias]
        else:
            params += [m.weight, m.bias] if i == len(layers) - 1 else [m.weight]
    return params


# ---------------------------------------------------------------------------------------------- architecture
def test_upsampling_stages_and_full_size_architecture():
    assert upsampling_stages(128, 192) == 5 and upsampling_stages(16, 24) == 2 and upsampling_stages(32, 48) == 3
    for bad in [(15, 24), (6, 6)]:
        with pytest.raises(ValueError, match="size"):
            upsampling_stages(*bad)
    # The study's network at 128 x 192: 100 -> 1024 (4x6) -> 512 -> 256 -> 128 -> 64 -> 3, and the mirror critic.
    with torch.device("meta"):  # shapes only, no memory
        gen, crit = GroupedGenerator(GanConfig(), 2), GroupedCritic(GanConfig(), 2)
    assert [tuple(layer.weight.shape) for layer in gen.layers] == [
        (2, 100, 1024, 4, 6), (2, 1024, 512, 4, 4), (2, 512, 256, 4, 4), (2, 256, 128, 4, 4), (2, 128, 64, 4, 4),
        (2, 64, 3, 4, 4)]
    assert [tuple(layer.weight.shape) for layer in crit.layers] == [
        (2, 64, 3, 4, 4), (2, 128, 64, 4, 4), (2, 256, 128, 4, 4), (2, 512, 256, 4, 4), (2, 1024, 512, 4, 4),
        (2, 1, 1024, 4, 6)]
    assert [layer.batch_norm for layer in gen.layers] == [True] * 5 + [False]


def test_grouped_networks_equal_the_studys_per_image_networks():
    seeds = [3, 4, 5]
    gen, crit, _ = grouped_models(SMALL, seeds)
    noise = torch.randn(1, 3, SMALL.noise_dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    images = gen(noise)  # (1, K, 3, H, W)
    assert images.shape == (1, 3, 3, 16, 24)
    scores = crit(images)  # (1, K)
    for k in range(3):
        ref_g, ref_d = reference_networks(gen, crit, k)
        ref_image = ref_g(noise[:, k])  # (1, 3, H, W): BatchNorm over this image's batch of one only
        torch.testing.assert_close(images[:, k], ref_image, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(scores[:, k], ref_d(ref_image)[:, 0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(images[:, 0], images[:, 1])  # different seeds, different models


# ---------------------------------------------------------------------------------------------- gradient penalty
def test_gradient_penalty_of_a_linear_critic_is_hand_computable():
    # D_k(x) = <w_k, x> + c has gradient w_k everywhere, so GP_k = (||w_k||_2 - 1)^2 for every eps.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, 4, 6, dtype=F64, generator=g) * 0.1  # (K, 3, H, W)

    def linear_critic(x):  # (B, K, 3, H, W) -> (B, K)
        return (x * w).sum((2, 3, 4)) + 0.5

    real, fake = torch.randn(2, 2, 3, 3, 4, 6, dtype=F64, generator=g)
    eps = torch.rand(2, 3, dtype=F64, generator=g)
    expected = ((w.flatten(1).norm(dim=1) - 1) ** 2).expand(2, 3)
    torch.testing.assert_close(gradient_penalty(linear_critic, real, fake, eps), expected)


def test_gradient_penalty_matches_autograd_reference_on_a_tiny_critic():
    seeds = [10, 11, 12]
    _, crit, _ = grouped_models(TINY, seeds)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(1, 3, 3, 16, 24, dtype=F64, generator=g) * 2 - 1  # (B=1, K, 3, H, W)
    fake = torch.rand(1, 3, 3, 16, 24, dtype=F64, generator=g) * 2 - 1
    eps = torch.rand(1, 3, dtype=F64, generator=g)
    gp = gradient_penalty(crit, real, fake, eps)  # (1, K)
    # The final bias does not reach the penalty (its gradient is 0): materialised as zeros on both sides.
    param_grads = torch.autograd.grad(gp.sum(), list(crit.parameters()), materialize_grads=True)
    for k in range(3):
        _, ref_d = reference_networks(GroupedGenerator(TINY, 3).to(F64), crit, k)
        # The study's get_gradient / gradient_penalty, on model k alone.
        mixed = (eps[0, k] * real[:, k] + (1 - eps[0, k]) * fake[:, k]).requires_grad_(True)
        scores = ref_d(mixed)
        (grad,) = torch.autograd.grad(scores, mixed, grad_outputs=torch.ones_like(scores), create_graph=True)
        ref_gp = (grad.flatten(1).norm(2, dim=1) - 1) ** 2
        torch.testing.assert_close(gp[:, k], ref_gp, rtol=1e-10, atol=1e-12)
        # d GP / d theta through the double backward: same as the reference's parameters.
        ref_grads = torch.autograd.grad(ref_gp.sum(), matching_parameters(ref_d), materialize_grads=True)
        assert len(ref_grads) == len(param_grads)
        for (name, _), ours, ref in zip(crit.named_parameters(), param_grads, ref_grads):
            torch.testing.assert_close(ours[k], ref, rtol=1e-9, atol=1e-12, msg=name)
    assert gp.min() > 0 and not torch.allclose(gp[:, 0], gp[:, 1])


# ---------------------------------------------------------------------------------------------- training
def reference_training(real: torch.Tensor, seed: int, cfg: GanConfig, iterations: int) -> torch.Tensor:
    """The study's training loop for one image (plain nn modules, .backward(), one Adam each); (3, 3, H, W) fakes."""
    gen, crit, generators = grouped_models(cfg, [seed])
    ref_g, ref_d = reference_networks(gen, crit, 0)
    rnd = draw_randomness(generators, cfg, iterations)  # after the weights, as train_group draws them
    opt_g = torch.optim.Adam(ref_g.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(ref_d.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    real, fakes = real.to(F64)[None], []  # (1, 3, H, W)
    for t in range(iterations):
        img = real.flip(-2) if rnd.flips[0, t] else real
        for s in range(cfg.n_critic):
            opt_d.zero_grad()
            fake = ref_g(rnd.critic_noise[0, t, s][None].to(F64)).detach()
            eps = rnd.eps[0, t, s].to(F64)
            mixed = (eps * img + (1 - eps) * fake).requires_grad_(True)
            mixed_scores = ref_d(mixed)
            (grad,) = torch.autograd.grad(mixed_scores, mixed, torch.ones_like(mixed_scores), create_graph=True)
            gp = (grad.flatten(1).norm(2, dim=1) - 1) ** 2
            loss = ref_d(fake) - ref_d(img) + cfg.gp_lambda * gp
            loss.sum().backward()
            opt_d.step()
        opt_g.zero_grad()
        (-ref_d(ref_g(rnd.generator_noise[0, t][None].to(F64)))).sum().backward()
        opt_g.step()
        if t >= iterations - 3:
            fakes.append(fake[0])
    return torch.stack(fakes)


def test_one_image_trains_exactly_like_the_studys_loop():
    real = torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    result = train_group(real[None], [77], SMALL, 3, dtype=F64)
    torch.testing.assert_close(result.fakes[0], reference_training(real, 77, SMALL, 3), rtol=1e-9, atol=1e-11)


def test_grouped_training_equals_training_alone():
    g = torch.Generator().manual_seed(2)
    real = torch.rand(3, 3, 16, 24, generator=g) * 2 - 1
    seeds = [image_seed(0, n) for n in ("a.jpeg", "b.jpeg", "c.jpeg")]
    # Group in a different order: position in the group must not matter either.
    order = [2, 0, 1]
    grouped = train_group(real[order], [seeds[i] for i in order], SMALL, 3, dtype=F64)
    for pos, i in enumerate(order):
        alone = train_group(real[i:i + 1], [seeds[i]], SMALL, 3, dtype=F64)
        torch.testing.assert_close(grouped.fakes[pos], alone.fakes[0], rtol=1e-9, atol=1e-11)
        for (name, p_group), p_alone in zip(grouped.generator.named_parameters(), alone.generator.parameters()):
            torch.testing.assert_close(p_group[pos], p_alone[0], rtol=1e-9, atol=1e-11, msg=name)
        for p_group, p_alone in zip(grouped.critic.parameters(), alone.critic.parameters()):
            torch.testing.assert_close(p_group[pos], p_alone[0], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(grouped.fakes[0], grouped.fakes[1])


def test_loop_backend_gives_the_grouped_backends_fakes():
    real = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    progress = []
    looped = train_images(real, [5, 6], SMALL, 3, "loop", dtype=F64, on_progress=lambda d, t: progress.append((d, t)))
    torch.testing.assert_close(looped, train_images(real, [5, 6], SMALL, 3, "grouped", dtype=F64),
                               rtol=1e-9, atol=1e-11)
    assert progress == [(i, 6) for i in range(1, 7)]
    with pytest.raises(ValueError, match="backend"):
        train_images(real, [5, 6], SMALL, 3, "vmap")


def test_bf16_autocast_runs_and_stays_finite():
    real = torch.rand(2, 3, 16, 24) * 2 - 1
    result = train_group(real, [1, 2], TINY, 3, precision="bf16")
    assert result.fakes.shape == (2, 3, 3, 16, 24) and result.fakes.dtype == torch.float32
    assert torch.isfinite(result.fakes).all() and torch.isfinite(result.critic_loss).all()


def test_image_seed_depends_on_seed_and_name_only():
    assert image_seed(0, "1000.jpeg") == image_seed(0, "1000.jpeg")
    assert len({image_seed(0, "1000.jpeg"), image_seed(1, "1000.jpeg"), image_seed(0, "1001.jpeg")}) == 3
    assert 0 <= image_seed(5, "x") < 2 ** 63


def test_train_group_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        train_group(torch.zeros(1, 3, 16, 24), [0], SMALL, 2)
    with pytest.raises(ValueError, match="shape"):
        train_group(torch.zeros(2, 3, 16, 24), [0], SMALL, 3)


# ---------------------------------------------------------------------------------------------- images
def test_real_image_preprocessing_matches_the_studys_transforms(tmp_path):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(192, 128), (128, 192), (150, 150)]):  # landscape, portrait, square (not rotated)
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        image = Image.open(path).convert("RGB")
        if image.height == 192:
            image = image.rotate(90, expand=True)
        crop = (round(image.height * 122 / 128), round(image.width * 186 / 192))  # (122, 186) on a Corel-5k image
        expected = T.Compose([T.CenterCrop(crop), T.Resize((128, 192)), T.ToTensor(),
                              T.Normalize([0.5] * 3, [0.5] * 3)])(image)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning on the way (e.g. torch's about a read-only numpy array)
            got = load_real_image(path, 128, 192)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match=r"^Image '.*broken\.jpg' cannot be read \(UnidentifiedImageError: "
                                            r"cannot identify image file .*\); replace the file or remove it from "
                                            r"train\.json\.$"):
        load_real_image(tmp_path / "broken.jpg", 128, 192)


def test_fake_pixels_saturate_beyond_the_range_instead_of_wrapping_around():
    """A fake's values past [-1, 1] (a generator without its tanh, bf16 rounding) become 0 or 255 under either
    encoding, never the other end of the uint8 range."""
    from DataAugmentation.files import fake_pixels

    x = torch.tensor([-3.0, -1.001, -1.0, 0.0, 1.0, 1.001, 3.0]).view(1, 1, 7)
    assert fake_pixels(x).flatten().tolist() == [0, 0, 0, 128, 255, 255, 255]  # round(255 (x + 1) / 2)
    assert fake_pixels(x, "study").flatten().tolist() == [0, 0, 0, 127, 255, 255, 255]  # floor(255 (x / 2 + 0.5))


def test_output_images_are_the_fake_its_mirror_and_its_clockwise_rotation():
    fakes = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain, mirrored, rotated = (np.asarray(im) for im in fakes_to_images(fakes))
    as_uint8 = ((fakes + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (3, H, W, 3)
    np.testing.assert_array_equal(plain, as_uint8[0])
    np.testing.assert_array_equal(mirrored, as_uint8[1][:, ::-1])
    np.testing.assert_array_equal(rotated, np.rot90(as_uint8[2], -1))  # the study's np.rot90(img, -1)
    assert rotated.shape == (24, 16, 3)
    assert output_names("1000.jpeg") == ("1000_aug.jpeg", "1000_aug_hor_flip.jpeg", "1000_aug_rot_90.jpeg")
    assert output_names("15001.jpg")[2] == "15001_aug_rot_90.jpg" and output_names("a.png")[0] == "a_aug.jpeg"
    assert output_names("IMG_7.JPEG")[1] == "IMG_7_aug_hor_flip.JPEG"  # a JPEG keeps its suffix as written


# ---------------------------------------------------------------------------------------------- command line
@pytest.fixture()
def dataset(tmp_path):
    """A 3-image dataset in the Corel-5k format (one portrait image)."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    labels = [["sky", "sun"], ["sea"], ["sky", "tree"]]
    samples = []
    for i, (w, h) in enumerate([(192, 128), (128, 192), (192, 128)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.jpeg")
        samples.append({"image_name": f"{i}.jpeg", "image_labels": labels[i]})
    vocabulary = ["sky", "sun", "sea", "tree"]
    (tmp_path / "train.json").write_text(json.dumps({"samples": samples, "labels": vocabulary}))
    return tmp_path


def augment(root, *extra):
    args = cli.get_args_parser().parse_args(["--data", str(root), "--iterations", "3", "--size", "16x24",
                                             "--device", "cpu", "--no-progress", *extra])
    return cli.run(args)


def test_cli_writes_images_and_json_then_skips_finished_images(dataset):
    summary = augment(dataset, "--group-size", "2", "--backend", "grouped")
    assert (summary["trained"], summary["skipped"], summary["entries"]) == (3, 0, 9)
    aug = dataset / "aug-images"
    assert sorted(os.listdir(aug)) == sorted(n for i in range(3) for n in output_names(f"{i}.jpeg"))
    for i in range(3):
        sizes = [Image.open(aug / n).size for n in output_names(f"{i}.jpeg")]
        assert sizes == [(24, 16), (24, 16), (16, 24)]  # (W, H): landscape, landscape, rotated back
    data = json.loads((dataset / "train_aug.json").read_text())
    assert data["labels"] == ["sky", "sun", "sea", "tree"]
    assert data["samples"][:3] == [{"image_name": n, "image_labels": ["sky", "sun"], "original": "0.jpeg"}
                                   for n in output_names("0.jpeg")]
    assert [s["image_labels"] for s in data["samples"]] == [["sky", "sun"]] * 3 + [["sea"]] * 3 + [["sky", "tree"]] * 3

    mtimes = {n: (aug / n).stat().st_mtime_ns for n in os.listdir(aug)}
    again = augment(dataset, "--group-size", "2")
    assert (again["trained"], again["skipped"], again["entries"]) == (0, 3, 9)
    assert {n: (aug / n).stat().st_mtime_ns for n in os.listdir(aug)} == mtimes

    # An image with a missing output is trained again (and only that one); train_aug.json is rebuilt.
    (aug / "1_aug_rot_90.jpeg").unlink()
    (dataset / "train_aug.json").unlink()
    third = augment(dataset)
    assert (third["trained"], third["skipped"], third["entries"]) == (1, 2, 9)
    assert (aug / "0_aug.jpeg").stat().st_mtime_ns == mtimes["0_aug.jpeg"]
    assert json.loads((dataset / "train_aug.json").read_text()) == data
    # --limit trains fewer images but train_aug.json still lists everything that exists.
    limited = augment(dataset, "--limit", "1")
    assert (limited["trained"], limited["skipped"], limited["entries"]) == (0, 1, 9)


def test_cli_interrupt_keeps_finished_groups(dataset, monkeypatch, capsys):
    calls = []
    real_train_images = cli.train_images

    def interrupted_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_images(*args, **kwargs)

    monkeypatch.setattr(cli, "train_images", interrupted_second_group)
    argv = ["--data", str(dataset), "--iterations", "3", "--size", "16x24", "--device", "cpu", "--no-progress",
            "--group-size", "2"]
    assert cli.main(argv) == 130
    assert "Rerun the same command" in capsys.readouterr().err
    listed = [s["image_name"] for s in json.loads((dataset / "train_aug.json").read_text())["samples"]]
    assert listed == list(output_names("0.jpeg") + output_names("1.jpeg"))
    monkeypatch.setattr(cli, "train_images", real_train_images)
    assert augment(dataset)["trained"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{root}", "--iterations", "2"], "at least 3"),
    (["--data", "{root}", "--size", "15x24"], "must both be even"),
    (["--data", "{empty}"], "No training images found"),
    (["--data", "{root}", "--device", "tpu0"], "is not a device"),
    (["--data", "{malformed}"], "is not valid JSON"),
    (["--data", "{root}/train.json"], "does not exist"),
])
def test_cli_user_errors_are_one_sentence(dataset, tmp_path_factory, capsys, argv, message):
    empty = tmp_path_factory.mktemp("empty")
    (empty / "train.json").write_text(json.dumps({"samples": [{"image_name": "x.jpeg", "image_labels": []}],
                                                  "labels": []}))
    malformed = tmp_path_factory.mktemp("malformed")
    (malformed / "train.json").write_text('{"samples": [')
    argv = [a.format(missing=dataset / "nope", root=dataset, empty=empty, malformed=malformed) for a in argv]
    device = [] if "--device" in argv else ["--device", "cpu"]
    before = sorted(dataset.rglob("*"))
    assert cli.main([*argv, *device, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
    assert sorted(dataset.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["--size", "big"], "HEIGHTxWIDTH"), (["--iterations", "0"], "'0' is not a positive integer"),
    (["--group-size", "two"], "'two' is not a positive integer"), (["--amp", "fp16"], "invalid choice: 'fp16'"),
    (["--limit", "-3"], "'-3' is not a positive integer"), (["--seed", "x"], "invalid int value"),
])
def test_cli_bad_flag_is_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_the_gan_package_does_not_depend_on_the_training_code():
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "DataAugmentation"
    imported = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert not imported & {"engine", "trainer", "main", "report"}, imported


def test_copies_of_a_png_original_name_it_and_colliding_names_are_refused(dataset, capsys):
    Image.open(dataset / "images" / "1.jpeg").save(dataset / "images" / "1.png")
    data = json.loads((dataset / "train.json").read_text())
    data["samples"][1]["image_name"] = "1.png"
    (dataset / "train.json").write_text(json.dumps(data))
    augment(dataset)
    entries = json.loads((dataset / "train_aug.json").read_text())["samples"]
    png = [e for e in entries if e["original"] == "1.png"]
    assert [e["image_name"] for e in png] == list(output_names("1.png")) == ["1_aug.jpeg", "1_aug_hor_flip.jpeg",
                                                                              "1_aug_rot_90.jpeg"]
    assert {e["original"] for e in entries} == {"0.jpeg", "1.png", "2.jpeg"}

    data["samples"].append({"image_name": "1.jpeg", "image_labels": ["sea"]})  # 1.png and 1.jpeg: same copy names
    (dataset / "train.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert cli.main(["--data", str(dataset), "--iterations", "3", "--size", "16x24", "--device", "cpu",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "'1.png' and '1.jpeg' would both write the GAN copy '1_aug.jpeg'" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- torchrun
def _gan(root, nproc, *extra):
    """python -m DataAugmentation on `root`, with torchrun --standalone (a free port) when nproc > 1."""
    import subprocess
    import sys
    from pathlib import Path

    flags = ["--data", str(root), "--iterations", "3", "--size", "16x24", "--device", "cpu", "--no-progress", *extra]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    command = [sys.executable, *launcher, "-m", "DataAugmentation", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process in every run: the same arithmetic
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _outputs(root):
    return {p.name: np.asarray(Image.open(p)) for p in sorted((root / "aug-images").iterdir())}


@pytest.fixture()
def five_images(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "images").mkdir()
    samples = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.jpeg")
        samples.append({"image_name": f"{i}.jpeg", "image_labels": [["sky"], ["sea"]][i % 2]})
    (tmp_path / "train.json").write_text(json.dumps({"samples": samples, "labels": ["sky", "sea"]}))
    return tmp_path


@pytest.mark.slow
def test_two_processes_write_the_files_of_one_and_resume_with_any_count(five_images, tmp_path_factory):
    import shutil

    copies = {}
    for name in ("one", "two", "resumed"):
        copies[name] = tmp_path_factory.mktemp(name)
        shutil.copytree(five_images, copies[name], dirs_exist_ok=True)
    _gan(copies["one"], 1)
    out = _gan(copies["two"], 2)
    assert out.count("Done:") == 2 and "rank 0/2" in out and "rank 1/2" in out
    one, two = _outputs(copies["one"]), _outputs(copies["two"])
    assert one.keys() == two.keys() and len(one) == 15
    assert all(np.array_equal(one[k], two[k]) for k in one)  # pixel for pixel
    assert (copies["one"] / "train_aug.json").read_text() == (copies["two"] / "train_aug.json").read_text()

    # Stopped after 3 images with 2 processes, one output of a finished image lost: finished with 1 process.
    _gan(copies["resumed"], 2, "--limit", "3")
    partial = json.loads((copies["resumed"] / "train_aug.json").read_text())["samples"]
    assert {e["original"] for e in partial} == {"0.jpeg", "1.jpeg", "2.jpeg"}
    (copies["resumed"] / "aug-images" / "1_aug_rot_90.jpeg").unlink()  # a half-written image does not count
    out = _gan(copies["resumed"], 1)
    assert "3 images trained, 2 already finished" in out
    resumed = _outputs(copies["resumed"])
    assert resumed.keys() == one.keys() and all(np.array_equal(one[k], resumed[k]) for k in one)
    assert (copies["one"] / "train_aug.json").read_text() == (copies["resumed"] / "train_aug.json").read_text()


def test_the_shares_are_balanced_and_cover_every_image_once():
    from distributed import World

    pending = list(range(11))
    shares = [cli.share(pending, World(rank, 3, rank)) for rank in range(3)]
    assert sorted(sum(shares, [])) == pending and [len(s) for s in shares] == [4, 4, 3]


@pytest.mark.parametrize("order", [(0, 1), (1, 0), (2, 0, 1), (0, 2, 1)])
def test_the_last_process_to_finish_writes_the_complete_train_aug_json_whatever_its_rank(five_images, tmp_path,
                                                                                          monkeypatch, order):
    """Every rank plans at the start (as under torchrun), then the ranks finish in the order the test chooses: the
    last finisher, rank 0 or not, leaves train_aug.json listing every image, as one process would."""
    import shutil

    alone = tmp_path / "alone"
    shutil.copytree(five_images, alone)
    augment(alone)
    world_size, jobs = len(order), {}
    args = cli.get_args_parser().parse_args(["--data", str(five_images), "--iterations", "3", "--size", "16x24",
                                             "--device", "cpu", "--no-progress"])
    for rank in range(world_size):  # every process plans before any finishes
        jobs[rank] = cli.plan(args, World(rank, world_size))
    assert sorted(s["image_name"] for j in jobs.values() for s in j.mine) == [f"{i}.jpeg" for i in range(5)]
    bars, real_tqdm, precisions, real_train = [], cli.tqdm, [], cli.train_images
    monkeypatch.setattr(cli, "tqdm", lambda **kw: bars.append(kw) or real_tqdm(**kw))
    monkeypatch.setattr(cli, "train_images",
                        lambda *a, **kw: precisions.append(kw["precision"]) or real_train(*a, **kw))
    for position, rank in enumerate(order):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setattr(cli, "plan", lambda args, world: jobs[world.rank])
        summary = cli.run(args)
        assert summary["complete"] is (position == world_size - 1)
        assert summary["rank"] == f"rank {rank}/{world_size}: "
        # train_aug.json's count is said by rank 0 and by the last finisher; the others say who writes it.
        assert (summary["entries"] is None) is (rank != 0 and position != world_size - 1)
    # Each process's bar says whose it is, on its own line.
    settings = f"ML-WGAN-GP K={cli.AUTO_GROUP_SIZE['cpu']} {cli.AUTO_BACKEND['cpu']} cpu"
    expected = [(f"rank {rank}/{world_size} {settings}", rank) for rank in order]
    assert [(b["desc"], b["position"]) for b in bars] == expected
    assert all(b["disable"] for b in bars) and precisions and set(precisions) == {"fp32"}  # --no-progress, no --amp
    listed = json.loads((five_images / "train_aug.json").read_text())["samples"]
    assert len(listed) == 15 and (five_images / "train_aug.json").read_text() == (alone / "train_aug.json").read_text()


def test_the_study_encoding_writes_what_the_studys_plt_imsave_wrote(tmp_path):
    """--encoding study: each file equals, byte for byte, matplotlib's plt.imsave of x / 2 + 0.5 (the study's call),
    and decodes as Pillow's quality-75 JPEG of floor(255 v) made here independently."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from DataAugmentation.files import save_outputs

    fakes = torch.tanh(torch.randn(3, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2)  # (3, 3, H, W)
    fakes[0, 0, 0, :3] = torch.tensor([-1.0, 1.0, 0.0])  # the ends of the range, and a value on a pixel boundary
    paths = save_outputs(tmp_path, "7.jpeg", fakes, "study")
    views = [fakes[0], fakes[1].flip(-1), torch.rot90(fakes[2], k=-1, dims=(1, 2))]  # the study's three views
    for path, view in zip(paths, views):
        v = (view / 2 + 0.5).permute(1, 2, 0).numpy()  # (H, W, 3) float32, the study's img
        reference = io.BytesIO()
        plt.imsave(reference, v, format="jpeg")
        assert path.read_bytes() == reference.getvalue(), path.name
        independent = io.BytesIO()
        Image.fromarray(np.floor(v * np.float32(255)).astype(np.uint8)).save(independent, "JPEG", quality=75)
        np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(independent)))
    default = save_outputs(tmp_path / "default", "7.jpeg", fakes)
    assert default[0].read_bytes() != paths[0].read_bytes()  # quality 95 of rounded pixels is another file


def test_spread_ratio_is_the_fakes_pixel_spread_over_the_real_images():
    from DataAugmentation.files import spread_ratio

    real = torch.tensor([[[0.0, 2.0], [4.0, 6.0]]]).expand(3, 2, 2)  # std of 0, 2, 4, 6 in each channel
    flat = torch.full((3, 5, 7), 0.3)
    half = real / 2 + 10
    assert float(spread_ratio(flat, real)) == 0.0
    assert float(spread_ratio(half, real)) == pytest.approx(0.5)
    assert float(spread_ratio(real, real)) == pytest.approx(1.0)
    # Channels of different spreads, all below 1 (images in [-1, 1]), against numpy: mean of the channel stds (N - 1).
    rng = np.random.default_rng(0)
    fake = rng.uniform(-0.2, 0.2, (3, 6, 5)) * np.array([1.0, 2.0, 3.0])[:, None, None]
    real = rng.uniform(-0.5, 0.5, (3, 4, 4))
    expected = np.mean([fake[c].std(ddof=1) for c in range(3)]) / np.mean([real[c].std(ddof=1) for c in range(3)])
    assert float(spread_ratio(torch.from_numpy(fake), torch.from_numpy(real))) == pytest.approx(expected, rel=1e-5)


def test_a_run_with_too_few_iterations_warns_that_its_fakes_are_flat(dataset, capsys):
    assert cli.main(["--data", str(dataset), "--iterations", "3", "--size", "16x24", "--device", "cpu",
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("Warning: --iterations 3 is far below what makes usable copies")  # said before training
    assert "Warning: the fakes of this run are flat (median pixel spread 0.0" in err  # and measured after it


def test_the_help_is_the_documented_one(monkeypatch):
    """`python -m DataAugmentation --help` as committed in tests/help/DataAugmentation.txt (regenerate it with
    format_help() at COLUMNS=120 when the command line changes), and the defaults it states."""
    from pathlib import Path

    monkeypatch.setenv("COLUMNS", "120")
    expected = (Path(__file__).parent / "help" / "DataAugmentation.txt").read_text()
    assert cli.get_args_parser().format_help() == expected
    args = cli.get_args_parser().parse_args([])
    assert (args.data, args.iterations, args.group_size, args.backend, args.limit, args.device, args.seed, args.size,
            args.amp, args.encoding, args.progress) == ("Corel-5k", 1001, None, "auto", None, "auto", 0, (128, 192),
                                                        "none", "default", True)


# ---------------------------------------------------------------- the command's flags reach the training, its bar and summary

def test_the_flags_reach_each_group_and_the_bar_and_summary_say_what_ran(dataset, monkeypatch, capsys):
    """Three images in groups of 2: two calls of train_images, each with the backend, device, precision, per-image
    seeds (seed, name) and a progress callback; the bar names the settings and counts images; the summary's spread
    is the median over every fake of every group."""
    calls, ratios = [], iter(range(1, 10))
    real_train_images = cli.train_images

    def spy(real, seeds, cfg, iterations, backend, **kw):
        calls.append({"k": len(real), "seeds": list(seeds), "backend": backend, **kw})
        kw["on_progress"](1, iterations)  # what train_images reports inside a group
        return real_train_images(real, seeds, cfg, iterations, backend, **kw)

    monkeypatch.setattr(cli, "train_images", spy)
    monkeypatch.setattr(cli, "spread_ratio", lambda fake, image: next(ratios))  # 1, 2, ..., 9 over the 9 fakes
    summary = cli.run(cli.get_args_parser().parse_args([
        "--data", str(dataset), "--iterations", "3", "--size", "16x24", "--device", "cpu", "--group-size", "2",
        "--backend", "loop", "--amp", "bf16", "--seed", "5"]))  # with the progress bar
    assert [c["k"] for c in calls] == [2, 1]
    assert {(c["backend"], str(c["device"]), c["precision"]) for c in calls} == {("loop", "cpu", "bf16")}
    seeds = [s for c in calls for s in c["seeds"]]
    assert seeds == [cli.image_seed(5, f"{i}.jpeg") for i in range(3)] and len(set(seeds)) == 3
    assert seeds != [cli.image_seed(6, f"{i}.jpeg") for i in range(3)]
    assert {k: summary[k] for k in ("trained", "group_size", "backend", "device", "root", "spread", "rank")} == {
        "trained": 3, "group_size": 2, "backend": "loop", "device": "cpu", "root": str(dataset), "spread": 5.0,
        "rank": ""}
    err = capsys.readouterr().err
    assert "3/3" in err and "img/s" in err and "rank " not in err
    assert any(line.startswith("ML-WGAN-GP K=2 loop cpu: 100%") for line in err.replace("\r", "\n").splitlines())
    assert "group it 1/3" in err
    seconds = re.findall(r"last group (\d+\.\d)s", err)  # each group's time, shown as the group ends
    assert seconds and all(0 <= float(s) < 60 for s in seconds)


def test_the_encoding_flag_reaches_the_files(dataset, tmp_path):
    import shutil

    study = tmp_path / "study"
    shutil.copytree(dataset, study)
    augment(dataset)
    augment(study, "--encoding", "study")
    default, studied = ((root / "aug-images" / "0_aug.jpeg").read_bytes() for root in (dataset, study))
    assert default != studied


def test_the_few_iterations_warning_needs_both_few_iterations_and_work(dataset, monkeypatch, capsys):
    monkeypatch.setattr(cli, "FEW_ITERATIONS", 3)
    augment(dataset)  # 3 iterations are not below 3
    monkeypatch.setattr(cli, "FEW_ITERATIONS", 4)
    augment(dataset)  # below, but nothing is left to train
    assert "Warning: --iterations" not in capsys.readouterr().err


def test_an_empty_train_json_is_one_sentence(tmp_path, capsys):
    (tmp_path / "train.json").write_text(json.dumps({"samples": [], "labels": ["sky"]}))
    assert cli.main(["--data", str(tmp_path), "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: '{tmp_path / 'train.json'}' lists no samples; nothing to augment.\n"
