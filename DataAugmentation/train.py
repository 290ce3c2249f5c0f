"""Training K per-image WGAN-GPs at once, with per-image random streams so that grouping changes nothing.

Per image (the study's `ML-WGAN-GP`): every iteration flips the real image vertically with probability
`flip_prob`, then runs `n_critic` critic steps and one generator step, batch of one:

    critic step:    z ~ N(0, I), x~ = G(z) (no gradient to G), eps ~ U(0, 1), x^ = eps x + (1 - eps) x~
                    L_D = D(x~) - D(x) + lambda (||d D(x^) / d x^||_2 - 1)^2            -> Adam step on D
    generator step: z' ~ N(0, I),  L_G = -D(G(z'))                                     -> Adam step on G

The fakes of the last critic step of the last three iterations are the three outputs (the study saves at
iterations 998, 999 and 1000 of 1001).

Grouping: the K models live in one GroupedGenerator / GroupedCritic (models.py), whose layers never mix
models, and the group's loss is the sum of the K per-image losses, so d(sum_j L_j)/d theta_k = d L_k / d theta_k.
Adam is element-wise, so one Adam over the stacked parameters is K independent Adams. Every random number
(initial weights, flips, noise, interpolation eps) comes from a per-image torch.Generator seeded by
`image_seed(seed, image_name)` and is drawn in a fixed order before training, so image k receives the same
numbers whether it is trained alone or in any group, at any position.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from .models import GanConfig, GroupedCritic, GroupedGenerator, init_group_

N_OUTPUTS = 3  # fakes kept per image: <name>_aug, <name>_aug_hor_flip, <name>_aug_rot_90
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("grouped", "loop")


def image_seed(seed: int, image_name: str) -> int:
    """Seed of one image's random stream: the first 63 bits of sha256(f"{seed}:{image_name}").

    Depends only on the run's seed and the image's name, so neither the group size nor --limit changes it.
    """
    digest = hashlib.sha256(f"{seed}:{image_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


@dataclass
class Randomness:
    """All random draws of a group's training, stacked over the K images (on the generators' device)."""

    flips: torch.Tensor  # (K, T) bool: real image flipped vertically in iteration t
    critic_noise: torch.Tensor  # (K, T, n_critic, noise_dim)
    eps: torch.Tensor  # (K, T, n_critic) interpolation weights of the gradient penalty
    generator_noise: torch.Tensor  # (K, T, noise_dim)

    def to(self, device: torch.device, dtype: torch.dtype) -> "Randomness":
        return Randomness(self.flips.to(device), self.critic_noise.to(device, dtype), self.eps.to(device, dtype),
                          self.generator_noise.to(device, dtype))


def draw_randomness(generators: Sequence[torch.Generator], cfg: GanConfig, iterations: int) -> Randomness:
    """Draw every image's training randomness from its own generator (on its device), in a fixed order per image.

    flips ~ Bernoulli(flip_prob) (T,), critic noise ~ N(0, 1) (T, n_critic, noise_dim), eps ~ U(0, 1)
    (T, n_critic), generator noise ~ N(0, 1) (T, noise_dim); each stacked over the K images.
    """
    flips, critic_noise, eps, generator_noise = [], [], [], []
    for gen in generators:
        device = gen.device
        flips.append(torch.rand(iterations, generator=gen, device=device) < cfg.flip_prob)
        critic_noise.append(torch.randn(iterations, cfg.n_critic, cfg.noise_dim, generator=gen, device=device))
        eps.append(torch.rand(iterations, cfg.n_critic, generator=gen, device=device))
        generator_noise.append(torch.randn(iterations, cfg.noise_dim, generator=gen, device=device))
    return Randomness(torch.stack(flips), torch.stack(critic_noise), torch.stack(eps), torch.stack(generator_noise))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 (autocast outputs); fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample WGAN-GP penalty (B, K): (||d D_k(x^) / d x^||_2 - 1)^2 with x^ = eps x + (1 - eps) x~.

    real, fake: (B, K, 3, H, W); eps: (B, K). The graph is kept (create_graph) so that the penalty can be
    differentiated with respect to the critic's parameters. Summing the scores before differentiating is exact:
    score[b, k] depends on sample b of image k only (grouped layers; BatchNorm statistics are per model, and the
    study's batch is one sample), so d(sum scores)/d x^[b, k] = d score[b, k] / d x^[b, k].
    """
    e = eps[:, :, None, None, None]  # (B, K, 1, 1, 1)
    mixed = (e * real + (1 - e) * fake).detach().requires_grad_(True)  # (B, K, 3, H, W)
    scores = critic(mixed)  # (B, K)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)  # (B, K, 3, H, W)
    # The norm in fp32 even under bf16 autocast: (||g|| - 1)^2 is a small difference of O(1) numbers.
    norm = _at_least_fp32(grad).flatten(2).norm(2, dim=2)  # (B, K)
    return (norm - 1) ** 2


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor,
                gp_lambda: float) -> torch.Tensor:
    """Per-image critic loss (K,): mean_b [D(x~) - D(x) + lambda GP]; real, fake (B, K, 3, H, W), eps (B, K).

    The three critic calls stay separate (as in the study): a training-mode BatchNorm over a concatenated
    batch would mix the statistics of the fake, real and interpolated images.
    """
    d_fake = _at_least_fp32(critic(fake))  # (B, K)
    d_real = _at_least_fp32(critic(real))  # (B, K)
    gp = gradient_penalty(critic, real, fake, eps)  # (B, K)
    return (d_fake - d_real + gp_lambda * gp).mean(0)


@dataclass
class GroupResult:
    """Outcome of training one group of K images."""

    fakes: torch.Tensor  # (K, 3, 3, H, W) in [-1, 1], on the CPU (fp32 or fp64): the last three iterations' fakes
    critic_loss: torch.Tensor  # (K,) critic loss of the last critic step
    generator_loss: torch.Tensor  # (K,) generator loss of the last iteration
    generator: GroupedGenerator
    critic: GroupedCritic


def _adam(module: nn.Module, cfg: GanConfig, device: torch.device) -> torch.optim.Adam:
    # fused=True: one kernel for all parameters on CUDA (the step is launch-bound); the CPU keeps the default
    # single-tensor path. Either is element-wise, so it is the same per-image Adam for any K.
    return torch.optim.Adam(module.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=True if device.type == "cuda" else None)


def train_group(real: torch.Tensor, seeds: Sequence[int], cfg: GanConfig, iterations: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, precision: str = "fp32",
                on_iteration: Callable[[int], None] | None = None) -> GroupResult:
    """Train K per-image WGAN-GPs simultaneously and return the fakes of their last three iterations.

    real: (K, 3, H, W) images in [-1, 1] (already rotated/cropped/resized, see files.load_real_image);
    seeds: K per-image seeds (image_seed). Image k's result depends only on real[k], seeds[k], cfg, iterations,
    dtype and precision - not on K or on the other images (up to floating-point rounding of grouped kernels).
    precision "bf16" runs the forward passes under bf16 autocast (CUDA); the penalty's norm and all losses stay
    fp32. `on_iteration(t)` is called after each iteration (for progress display; it must not synchronise).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if iterations < N_OUTPUTS:
        raise ValueError(f"iterations must be at least {N_OUTPUTS} (the fakes of the last {N_OUTPUTS} iterations "
                         f"are saved), got {iterations}.")
    k = len(seeds)
    if real.shape != (k, 3, cfg.height, cfg.width):
        raise ValueError(f"real images must have shape ({k}, 3, {cfg.height}, {cfg.width}) for {k} seeds, "
                         f"got {tuple(real.shape)}.")
    device = torch.device(device)
    # Per-image streams live on the training device: drawing K x 25M weights with CPU generators would cost ~8 s
    # per group of 32 on a GPU run. (So a CPU run and a CUDA run draw different numbers; each is reproducible.)
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    with torch.device(device):
        gen, crit = GroupedGenerator(cfg, k).to(dtype), GroupedCritic(cfg, k).to(dtype)
    init_group_([gen, crit], generators, cfg.init_std)  # first draws of each stream: the weights
    rnd = draw_randomness(generators, cfg, iterations).to(device, dtype)  # then the training randomness
    opt_g, opt_d = _adam(gen, cfg, device), _adam(crit, cfg, device)
    g_params, d_params = list(gen.parameters()), list(crit.parameters())

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    real = real.to(device, dtype)  # (K, 3, H, W)
    real_flipped = real.flip(-2)  # vertical flip = reverse the rows
    fakes = []
    loss_d = loss_g = torch.zeros(k)
    for t in range(iterations):
        x = torch.where(rnd.flips[:, t, None, None, None], real_flipped, real).unsqueeze(0)  # (1, K, 3, H, W)
        for step in range(cfg.n_critic):
            with torch.no_grad(), autocast():
                fake = gen(rnd.critic_noise[None, :, t, step]).to(dtype)  # (1, K, 3, H, W)
            with autocast():
                loss_d = critic_loss(crit, x, fake, rnd.eps[None, :, t, step], cfg.gp_lambda)  # (K,)
            opt_d.zero_grad(set_to_none=True)
            loss_d.sum().backward(inputs=d_params)
            opt_d.step()
        with autocast():
            loss_g = -_at_least_fp32(crit(gen(rnd.generator_noise[None, :, t]))).mean(0)  # (K,)
        opt_g.zero_grad(set_to_none=True)
        # inputs=: gradients for G only; the critic's weight gradients would be computed and thrown away.
        loss_g.sum().backward(inputs=g_params)
        opt_g.step()
        if t >= iterations - N_OUTPUTS:
            fakes.append(fake[0].detach())  # (K, 3, H, W)
        if on_iteration is not None:
            on_iteration(t)
    fakes_cpu = _at_least_fp32(torch.stack(fakes, 1)).cpu()  # (K, 3 outputs, 3, H, W)
    return GroupResult(fakes_cpu, loss_d.detach().cpu(), loss_g.detach().cpu(), gen, crit)


def train_images(real: torch.Tensor, seeds: Sequence[int], cfg: GanConfig, iterations: int, backend: str = "grouped",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, precision: str = "fp32",
                 on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The three fakes of each of K images, (K, 3, 3, H, W) on the CPU, trained with `backend`:

    "grouped": all K at once (train_group); "loop": one after another, each alone (train_group with K = 1).
    Both give the same fakes (the per-image streams make grouping invisible); they differ only in speed - the
    loop is what a CPU wants (bench/gan.py). `on_progress(done, total)` counts iterations of this call.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "grouped":
        callback = None if on_progress is None else (lambda t: on_progress(t + 1, iterations))
        return train_group(real, seeds, cfg, iterations, device, dtype, precision, callback).fakes
    total, fakes = len(seeds) * iterations, []
    for i, seed in enumerate(seeds):
        callback = None if on_progress is None else (lambda t, i=i: on_progress(i * iterations + t + 1, total))
        fakes.append(train_group(real[i:i + 1], [seed], cfg, iterations, device, dtype, precision, callback).fakes)
    return torch.cat(fakes)
