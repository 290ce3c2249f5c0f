"""The study's ML-WGAN-GP generator and critic, stored as K independent models side by side.

Every parameter carries a leading group axis: parameter[k] belongs to image k's model and to no other.
Activations are laid out as (B, K*C, H, W): channels k*C .. (k+1)*C - 1 belong to model k. Then

* a convolution of K models at once is one grouped convolution (`groups=K`): the stacked weight
  (K, C_out, C_in, kh, kw) flattened to (K*C_out, C_in, kh, kw) is exactly PyTorch's grouped-weight layout,
  so group k only ever reads its own input channels with its own weights;
* BatchNorm in training mode normalises each channel over (B, H, W). A channel belongs to one model, so the
  statistics are that model's own batch statistics: with the study's batch of one, each image's BatchNorm
  sees only its own image, exactly as the per-image model does. No statistic ever mixes two images.

With K = 1 the grouped convolution is an ordinary convolution: the single-image model is the same code.

Architecture (the study's `augmentation/gen_critic.py`, generalised to smaller sizes for tests):
the image size H x W is reached from a base h0 x w0 = H / 2^s x W / 2^s with s upsampling stages
(128 x 192: s = 5, base 4 x 6). Hidden widths are `hidden * 2^i` (64 .. 1024 at full size).

    Generator: z (noise_dim, 1, 1) -ConvT(h0 x w0)-> (hidden*2^(s-1), h0, w0) -BN-ReLU-
               [ConvT(4, stride 2, pad 1) -BN-ReLU-] x (s-1) -> (hidden, H/2, W/2) -ConvT(4, 2, 1)-> (3, H, W) -Tanh
    Critic:    x (3, H, W) -Conv(4, 2, 1)-BN-LeakyReLU(0.2)-> (hidden, H/2, W/2)
               [-Conv(4, 2, 1)-BN-LeakyReLU(0.2)-] x (s-1) -> (hidden*2^(s-1), h0, w0) -Conv(h0 x w0)-> 1 score

Two deliberate differences from the study's code, neither of which changes the function computed:
* convolutions followed by BatchNorm have no bias: training-mode BatchNorm subtracts the per-channel batch
  mean, so such a bias cancels exactly and its true gradient is 0. (In floating point the gradient is
  rounding noise, which Adam would normalise into full-size random steps of a parameter with no effect.)
* BatchNorm running statistics are not tracked: the study only ever runs the networks in training mode
  (the saved fakes are the training-mode outputs), so the running averages are never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default, as in the study
LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class GanConfig:
    """Hyper-parameters of one per-image WGAN-GP (the study's values by default)."""

    height: int = 128
    width: int = 192
    noise_dim: int = 100
    hidden: int = 64
    n_critic: int = 5  # critic steps per generator step
    gp_lambda: float = 10.0  # weight of the gradient penalty
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    flip_prob: float = 0.1  # probability that an iteration sees the real image flipped vertically
    init_std: float = 0.02  # normal(0, init_std) for conv and BatchNorm weights

    def __post_init__(self) -> None:
        upsampling_stages(self.height, self.width)  # validates the size
        for name in ("noise_dim", "hidden", "n_critic"):
            if getattr(self, name) < 1:
                raise ValueError(f"GanConfig.{name} must be a positive integer, got {getattr(self, name)}.")


def upsampling_stages(height: int, width: int) -> int:
    """Number s of stride-2 stages: the largest s with H and W divisible by 2^s and min(H, W) / 2^s >= 4.

    128 x 192 -> s = 5 (base 4 x 6, the study's network); 16 x 24 -> s = 2 (base 4 x 6).
    """
    if height < 8 or width < 8:
        raise ValueError(f"Image size {height}x{width} is too small: height and width must be at least 8 "
                         f"(e.g. 16x24, 32x48 or the study's 128x192).")
    s = 0
    while height % 2 ** (s + 1) == 0 and width % 2 ** (s + 1) == 0 and min(height, width) // 2 ** (s + 1) >= 4:
        s += 1
    if s == 0:
        raise ValueError(f"Image size {height}x{width} does not fit the generator: height and width must both be "
                         f"even (and best a multiple of 4x6 times a power of two, e.g. 16x24, 32x48, 128x192).")
    return s


class GroupedConv(nn.Module):
    """K independent (transposed) convolutions, each optionally followed by its own training-mode BatchNorm.

    Input (B, K*C_in, H, W) -> output (B, K*C_out, H', W'). Per model k:
    y_k = BN_k(conv(x_k, W_k)) with BN_k(u) = gamma_k * (u - mean_{B,H,W}(u)) / sqrt(var_{B,H,W}(u) + eps) + beta_k,
    or y_k = conv(x_k, W_k) + b_k without BatchNorm.
    """

    def __init__(self, groups: int, c_in: int, c_out: int, kernel: tuple[int, int], stride: int, padding: int,
                 transposed: bool, batch_norm: bool):
        super().__init__()
        self.groups, self.c_in, self.c_out = groups, c_in, c_out
        self.stride, self.padding, self.transposed, self.batch_norm = stride, padding, transposed, batch_norm
        # PyTorch layouts: Conv2d (C_out, C_in, kh, kw), ConvTranspose2d (C_in, C_out, kh, kw); plus the group axis.
        shape = (groups, c_in, c_out, *kernel) if transposed else (groups, c_out, c_in, *kernel)
        self.weight = nn.Parameter(torch.empty(shape))
        if batch_norm:
            self.bn_weight = nn.Parameter(torch.empty(groups, c_out))  # gamma (K, C_out)
            self.bn_bias = nn.Parameter(torch.empty(groups, c_out))  # beta (K, C_out)
        else:
            self.bias = nn.Parameter(torch.empty(groups, c_out))  # (K, C_out)

    def bias_bound(self) -> float:
        """PyTorch's default conv bias init bound 1/sqrt(fan_in), fan_in = weight.size(1) * kh * kw per model.

        (For ConvTranspose2d PyTorch's weight.size(1) is C_out, so its fan_in is C_out * kh * kw; kept as is.)
        """
        _, second, kh, kw = self.weight.shape[1:]
        return float(second * kh * kw) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.flatten(0, 1)  # (K*C_out, C_in, kh, kw) or (K*C_in, C_out, kh, kw)
        bias = None if self.batch_norm else self.bias.flatten()  # (K*C_out,)
        if self.transposed:
            y = F.conv_transpose2d(x, weight, bias, self.stride, self.padding, groups=self.groups)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, groups=self.groups)
        if self.batch_norm:
            # Training-mode statistics over (B, H, W) of each channel = over model k's own batch only.
            y = F.batch_norm(y, None, None, self.bn_weight.flatten(), self.bn_bias.flatten(), training=True,
                             eps=BN_EPS)
        return y


class GroupedGenerator(nn.Module):
    """K generators: noise (B, K, noise_dim) -> images (B, K, 3, H, W) in [-1, 1]."""

    def __init__(self, cfg: GanConfig, groups: int):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        s = upsampling_stages(cfg.height, cfg.width)
        base = (cfg.height // 2 ** s, cfg.width // 2 ** s)
        widths = [cfg.hidden * 2 ** i for i in range(s - 1, -1, -1)]  # e.g. 1024, 512, 256, 128, 64
        layers = [GroupedConv(groups, cfg.noise_dim, widths[0], base, 1, 0, transposed=True, batch_norm=True)]
        layers += [GroupedConv(groups, a, b, (4, 4), 2, 1, transposed=True, batch_norm=True)
                   for a, b in zip(widths[:-1], widths[1:])]
        layers.append(GroupedConv(groups, widths[-1], 3, (4, 4), 2, 1, transposed=True, batch_norm=False))
        self.layers = nn.ModuleList(layers)

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        b, k, d = noise.shape
        x = noise.reshape(b, k * d, 1, 1)  # (B, K*noise_dim, 1, 1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = torch.tanh(self.layers[-1](x))  # (B, K*3, H, W)
        return x.view(b, k, 3, self.cfg.height, self.cfg.width)


class GroupedCritic(nn.Module):
    """K critics: images (B, K, 3, H, W) -> scores (B, K); score[:, k] depends on image k and model k only."""

    def __init__(self, cfg: GanConfig, groups: int):
        super().__init__()
        self.cfg, self.groups = cfg, groups
        s = upsampling_stages(cfg.height, cfg.width)
        base = (cfg.height // 2 ** s, cfg.width // 2 ** s)
        widths = [cfg.hidden * 2 ** i for i in range(s)]  # e.g. 64, 128, 256, 512, 1024
        layers = [GroupedConv(groups, 3, widths[0], (4, 4), 2, 1, transposed=False, batch_norm=True)]
        layers += [GroupedConv(groups, a, b, (4, 4), 2, 1, transposed=False, batch_norm=True)
                   for a, b in zip(widths[:-1], widths[1:])]
        layers.append(GroupedConv(groups, widths[-1], 1, base, 1, 0, transposed=False, batch_norm=False))
        self.layers = nn.ModuleList(layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, k = images.shape[:2]
        x = images.reshape(b, k * 3, self.cfg.height, self.cfg.width)  # (B, K*3, H, W)
        for layer in self.layers[:-1]:
            x = F.leaky_relu(layer(x), LEAKY_SLOPE)
        return self.layers[-1](x).view(b, k)  # (B, K, 1, 1) -> (B, K)


@torch.no_grad()
def init_group_(modules: list[nn.Module], generators: list[torch.Generator], std: float) -> None:
    """Initialise model k of every module from `generators[k]` alone (the study's `weights_init`).

    Conv and BatchNorm weights ~ normal(0, std), BatchNorm biases = 0, the two plain conv biases ~
    uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default, which the study leaves in place).
    Draws are made in fp32 on each generator's device, in a fixed order (module, layer, parameter), so model k's
    initial weights depend only on its own generator's seed - not on K or on its position in the group.
    """
    for k, gen in enumerate(generators):
        def draw(shape, uniform=False):
            return (torch.rand if uniform else torch.randn)(shape, generator=gen, device=gen.device)

        for module in modules:
            for layer in module.layers:
                layer.weight[k].copy_(draw(layer.weight.shape[1:]) * std)
                if layer.batch_norm:
                    layer.bn_weight[k].copy_(draw(layer.c_out) * std)
                    layer.bn_bias[k].zero_()
                else:
                    layer.bias[k].copy_((draw(layer.c_out, uniform=True) * 2 - 1) * layer.bias_bound())
