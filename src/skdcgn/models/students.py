"""TinyGAN-style student mechanisms: small class-conditional generators that replace a CGN teacher.

A student has the teacher mechanism's interface, `forward(u [N, latent_dim], y [N]) -> [N, C, S, S]`
(S = `image_size`: 32 for CGN-MNIST, 128 or 256 for CGN-ImageNet, one up-block per doubling),
so a CGN of three students composes exactly like the teacher (same noise draw, same seeded
texture shift). Layout, after TinyGAN (Chang & Lu, 2020) scaled down to 32 px:

    cond = cat(s·u, class_embedding(y))           [N, latent_dim + embed_dim]; s = noise_scale (1 as trained)
    x    = Linear(cond) -> [C4, 4, 4]              a small spatial seed (no 4096-wide layer)
    x    = UpBlock(x, cond)  4 -> 8 px             conditional BN -> ReLU -> (up x2) -> separable 3x3,
    x    = UpBlock(x, cond)  8 -> 16 px            twice, plus a residual skip
    x    = Block(x, cond) x extra_blocks  16 px
    out  = PixelShuffle(Conv3x3(ReLU(BN(x))))     [N, C_out, 32, 32]: a sub-pixel conv
    mask = sigmoid(out)    texture = tanh(out)

Conditional batch norm takes its per-channel gain and bias from `cond`, so both the class and
the noise modulate every block (as in BigGAN-deep / TinyGAN).

Why the last step is a sub-pixel conv: the teacher's last stage (nearest ×2 up-sampling, then a
3x3 conv) is itself a 3x3 conv at 16 px whose 4·C_out outputs are interleaved into 32 px, so the
student keeps the teacher's expressiveness at 32 px while doing no per-channel work at 32 px,
where a CPU is bound by memory traffic. The convs run in channels-last layout (oneDNN's fast
path for depthwise convs on CPU; ~10× faster than NCHW there); outputs are returned as NCHW.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import setting, validate_config
from ..errors import SkdcgnError
from .pretrained import PretrainedModel, register

from .cgn import MECHANISMS  # noqa: E402  (shape, foreground, background)

SIZES = (32, 64, 128, 256, 512)
OUTPUT_NORMS = ("none", "instance")


@dataclasses.dataclass
class StudentConfig:
    """Architecture of one student mechanism (validated by `validate`, which the generators call).

    Fields:
        mechanism: "shape", "foreground" or "background" (`MECHANISMS`).
        n_classes: number of classes, in [1, 4096].
        latent_dim: size of the noise u, in [1, 4096].
        embed_dim: size of the class embedding fed, with u, to every conditional BN; in [1, 4096].
        widths: channels at 4, 8, ... image_size / 2 px: exactly `n_resolutions` values, each in [1, 1024].
        extra_blocks: residual blocks at image_size / 2 px after the up-sampling ones, in [0, 16].
        shifted_texture: textures get the teacher's seeded circular shift at composition; must be
            false for the shape mechanism.
        image_size: output side in pixels, one of `SIZES` (32 for MNIST, 128 or 256 for ImageNet).
        output_norm: "none", or "instance": the logits are normalised per image and channel over
            space, then scaled and shifted by learned scalars (InstanceNorm2d, affine). The
            CGN-MNIST shape teacher's mask is clamp(InstanceNorm(z), 1e-4, 0.9999) (Sauer & Geiger,
            ICLR 2021), i.e. a threshold of a per-image normalised field; this gives the student
            the same normalisation before its sigmoid.
    """
    mechanism: str = setting("shape", choices=MECHANISMS)
    n_classes: int = setting(10, lo=1, hi=4096, unit="classes")
    latent_dim: int = setting(32, lo=1, hi=4096, unit="dims")
    embed_dim: int = setting(16, lo=1, hi=4096, unit="dims", help="class embedding fed (with u) to every conditional BN")
    widths: tuple[int, ...] = (16, 48, 32)  # channels at 4, 8, 16, ... px up to image_size / 2 (checked in validate)
    extra_blocks: int = setting(1, lo=0, hi=16, unit="blocks", help="residual blocks at image_size / 2 after the up-sampling ones")
    shifted_texture: bool = False  # textures: seeded circular shift at composition (like the teacher)
    image_size: int = setting(32, choices=SIZES, unit="px", help="32 (MNIST), 128 or 256 (ImageNet); len(widths) = log2(image_size) - 2")
    output_norm: str = setting("none", choices=OUTPUT_NORMS,
                               help="'instance': logits = g·InstanceNorm(x) + b per image, as the CGN-MNIST shape teacher ends")
    noise_scale: float = setting(1.0, lo=0.0, hi=100.0, lo_open=True,
                                 help="the network reads noise_scale·u (set after training: DistillConfig.shape_noise_scale)")

    def validate(self) -> None:
        """Check every field (ranges above); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)
        k = self.n_resolutions
        if len(self.widths) != k or not all(isinstance(w, int) and 1 <= w <= 1024 for w in self.widths):
            px = ", ".join(str(4 * 2 ** i) for i in range(k))
            raise SkdcgnError(f"widths: expected {k} channel counts in [1, 1024] (for {px} px), got {list(self.widths)}")
        if self.shifted_texture and self.mechanism == "shape":
            raise SkdcgnError("shifted_texture: must be false for the shape mechanism "
                              "(textures may be shifted at composition, masks are not)")

    @property
    def n_resolutions(self) -> int:
        """Resolutions with a width: 4, 8, ... image_size / 2 px."""
        return self.image_size.bit_length() - 3

    @property
    def out_channels(self) -> int:
        """Output channels: 1 for the shape mask, 3 for an RGB texture."""
        return 1 if self.mechanism == "shape" else 3


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine; gain and bias are linear functions of the condition."""

    def __init__(self, channels: int, cond_dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.affine = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.affine.weight)
        nn.init.zeros_(self.affine.bias)  # starts as plain BN (gain 1, bias 0)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x [N, C, H, W], cond [N, cond_dim] → BN(x)·(1 + gain(cond)) + bias(cond), same shape as x."""
        gain, bias = self.affine(cond)[:, :, None, None].chunk(2, dim=1)  # [N, C, 1, 1] each
        return self.bn(x) * (1 + gain) + bias


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1: ~9·Cin + Cin·Cout weights instead of 9·Cin·Cout."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1))


class Block(nn.Module):
    """Residual generator block (BigGAN / TinyGAN), separable convs, optional x2 up-sampling."""

    def __init__(self, cin: int, cout: int, cond_dim: int, upsample: bool) -> None:
        super().__init__()
        self.scale = 2.0 if upsample else 1.0
        self.bn1 = ConditionalBatchNorm2d(cin, cond_dim)
        self.conv1 = SeparableConv2d(cin, cout)
        self.bn2 = ConditionalBatchNorm2d(cout, cond_dim)
        self.conv2 = SeparableConv2d(cout, cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """x [N, Cin, H, W], cond [N, cond_dim] → [N, Cout, 2H, 2W] when up-sampling, else [N, Cout, H, W]."""
        h = F.relu(self.bn1(x, cond))
        if self.scale != 1.0:
            h = F.interpolate(h, scale_factor=self.scale, mode="nearest")   # [N, Cin, 2H, 2W]
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        h = self.conv1(h)                                                   # [N, Cout, 2H, 2W]
        h = self.conv2(F.relu(self.bn2(h, cond)))
        return h + self.skip(x)


class StudentGenerator(PretrainedModel):
    """The shared body of both students; subclasses choose the output activation."""

    Config = StudentConfig

    def __init__(self, config: StudentConfig) -> None:
        config.validate()
        super().__init__(config)
        w = config.widths  # (c4, c8, c16) at 32 px; (c4, ..., c128) at 256 px
        cond_dim = config.latent_dim + config.embed_dim
        self.embed = nn.Embedding(config.n_classes, config.embed_dim)
        self.seed = nn.Linear(cond_dim, w[0] * 4 * 4)
        self.blocks = nn.ModuleList([*(Block(a, b, cond_dim, upsample=True) for a, b in zip(w[:-1], w[1:])),
                                     *(Block(w[-1], w[-1], cond_dim, upsample=False) for _ in range(config.extra_blocks))])
        self.out_bn = nn.BatchNorm2d(w[-1])
        self.out_conv = nn.Conv2d(w[-1], 4 * config.out_channels, 3, padding=1)  # 4 sub-pixels per last-stage pixel
        self.out_norm = nn.InstanceNorm2d(config.out_channels, affine=True) if config.output_norm == "instance" else None

    def pre_activation(self, u: Tensor, y: Tensor) -> Tensor:
        """Logits of the output (before sigmoid / tanh): [N, C_out, S, S], S = image_size."""
        u = self.as_input(u)
        if self.config.noise_scale != 1.0:  # (skipped at 1: the trained student's bytes stay as they were)
            u = u * self.config.noise_scale
        cond = torch.cat([u, self.embed(y)], dim=1)            # [N, latent + embed]
        x = self.seed(cond).view(len(u), -1, 4, 4)             # [N, C4, 4, 4]
        x = x.contiguous(memory_format=torch.channels_last)    # oneDNN's fast layout for (depthwise) convs on CPU
        for block in self.blocks:
            x = block(x, cond)                                 # [N, C8, 8, 8], [N, C16, 16, 16], ... S/2 px
        x = self.out_conv(F.relu(self.out_bn(x)))              # [N, 4 * C_out, S/2, S/2]
        x = F.pixel_shuffle(x.contiguous(), 2)                 # [N, C_out, S, S], plain NCHW
        return x if self.out_norm is None else self.out_norm(x)


@register
class ShapeStudent(StudentGenerator):
    """Student of the shape mechanism: a one-channel mask in [0, 1] (sigmoid)."""

    def __init__(self, config: StudentConfig) -> None:
        if config.mechanism != "shape":
            raise SkdcgnError(f"mechanism: a ShapeStudent is for 'shape', got {config.mechanism!r}")
        super().__init__(config)

    def activate(self, logits: Tensor) -> Tensor:
        """Mask from logits: sigmoid, values in (0, 1), same shape."""
        return torch.sigmoid(logits)

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        """u float [N, latent_dim] standard normal; y int64 [N] in [0, n_classes)
        → mask float [N, 1, S, S] in (0, 1), S = image_size."""
        return self.activate(self.pre_activation(u, y))


@register
class TextureStudent(StudentGenerator):
    """Student of a texture mechanism (foreground or background): an RGB texture in [-1, 1] (tanh).

    It learns the teacher's un-shifted texture; the random circular shift stays a seeded step
    of composition (`shifted_texture=True`), exactly as for the teacher.
    """

    def __init__(self, config: StudentConfig) -> None:
        if config.mechanism == "shape":
            raise SkdcgnError("mechanism: a TextureStudent is for 'foreground' or 'background', got 'shape'")
        super().__init__(config)

    def activate(self, logits: Tensor) -> Tensor:
        """Texture from logits: tanh, values in (-1, 1), same shape."""
        return torch.tanh(logits)

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        """u float [N, latent_dim] standard normal; y int64 [N] in [0, n_classes)
        → texture float [N, 3, S, S] in (-1, 1), S = image_size.

        The output is un-shifted; a `shifted_texture` shift is applied by `CGN.run_mechanism`.
        """
        return self.activate(self.pre_activation(u, y))


# TinyGAN-style ImageNet students (1000 classes, BigGAN's 128-d noise), each ≤ 1/15 of a
# BigGAN-deep-256 (55,880,833 parameters): see docs/imagenet.md for counts and speed.
IMAGENET_WIDTHS = {128: (256, 192, 128, 64, 32), 256: (256, 192, 128, 64, 32, 16)}


def imagenet_student_config(mechanism: str, image_size: int = 256, n_classes: int = 1000, latent_dim: int = 128,
                            **overrides) -> StudentConfig:
    """A validated TinyGAN-style student config for a CGN-ImageNet mechanism.

    Defaults follow BigGAN (1000 classes, 128-d noise, 128-d class embedding); widths come from
    `IMAGENET_WIDTHS` unless given in `overrides`; no extra blocks, no texture shift.
    Raises `SkdcgnError` if `image_size` is not 128 or 256 and no `widths` are given, or if the
    resulting config does not validate.
    """
    if image_size not in IMAGENET_WIDTHS and "widths" not in overrides:
        raise SkdcgnError(f"image_size: ImageNet students come at {', '.join(map(str, IMAGENET_WIDTHS))} px, got {image_size}")
    values = {"embed_dim": 128, "extra_blocks": 0, "widths": IMAGENET_WIDTHS.get(image_size), **overrides}
    cfg = StudentConfig(mechanism=mechanism, n_classes=n_classes, latent_dim=latent_dim, image_size=image_size,
                        shifted_texture=False, **values)
    cfg.validate()
    return cfg


def make_student(config: StudentConfig) -> StudentGenerator:
    """A fresh (randomly initialised) `ShapeStudent` or `TextureStudent` for `config.mechanism`."""
    return ShapeStudent(config) if config.mechanism == "shape" else TextureStudent(config)
