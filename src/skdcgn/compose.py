"""Composition x = m·f + (1 − m)·b, the seeded texture shift, and the composition-study variants.

The composer never knows whether its mechanisms are a teacher's or students'.

Study variants (each a named, seeded option; docs/composition_study.md has the hypotheses and results):
- `standard`: x = m·f + (1 − m)·b.
- `rotate`: the mask rotated by a random angle in [−180°, 180°]: does the classifier rely on
  upright shapes?
- `mask_noise`: Gaussian noise (σ 0.2) added to the mask, clamped to [0, 1]: robustness to ragged
  edges.
- `opacity`: mask × 0.75, so 25% of the background shows through the digit.
- `binary`: the mask thresholded at 0.5: do soft mask edges carry texture cues the classifier
  uses? (ours)
- `swap_textures`: foreground and background exchanged, a light background texture inside a
  digit region from the other class: does the classifier read the *shape* of the mask even when
  figure and ground swap roles? (ours)
- `shape_only`: foreground and background replaced by two random flat colours per image:
  an upper bound on how much shape alone can teach. (ours)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SkdcgnError

COMPOSERS = ("standard", "rotate", "mask_noise", "opacity", "binary", "swap_textures", "shape_only")


def shift_offsets(n: int, height: int, width: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The offsets of `random_shift` for `n` textures of `height` × `width` pixels: (dy, dx), int64 [n]
    on the CPU, uniform in [0, height) and [0, width), drawn from `generator` in that order (all dy,
    then all dx)."""
    dy = torch.randint(0, height, (n,), generator=generator, device="cpu")
    dx = torch.randint(0, width, (n,), generator=generator, device="cpu")
    return dy, dx


def circular_shift(texture: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Roll each texture by its own offsets: texture [N, C, H, W], dy / dx int64 [N] (pixels, in
    [0, H) and [0, W), on the texture's device) → same shape; pixel (i, j) of the output is pixel
    ((i + dy) mod H, (j + dx) mod W) of the input."""
    n, _, h, w = texture.shape
    rows = (torch.arange(h, device=texture.device)[None, :] + dy[:, None]) % h  # [N, H]
    cols = (torch.arange(w, device=texture.device)[None, :] + dx[:, None]) % w  # [N, W]
    idx = rows[:, None, :, None] * w + cols[:, None, None, :]  # [N, 1, H, W]
    flat = texture.flatten(2)
    return flat.gather(2, idx.flatten(2).expand(-1, texture.shape[1], -1)).view_as(texture)


def random_shift(texture: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Circularly shift each texture by a random offset per axis: texture [N, C, H, W] → same shape.

    Offsets are drawn on the CPU from `generator` (`shift_offsets`), uniform in [0, H) and [0, W)
    pixels per image, then applied on the texture's device (`circular_shift`).

    The CGN-MNIST teachers tile their texture patch 2 × 2 and take a random crop of the patch's
    size; that is exactly a circular shift by an offset in [0, size). It is parameter-free, so it is
    kept out of the mechanisms and applied here, seeded, to teacher and student textures alike.
    """
    n, _, h, w = texture.shape
    dy, dx = shift_offsets(n, h, w, generator)
    return circular_shift(texture, dy.to(texture.device), dx.to(texture.device))


def compose(mask: Tensor, foreground: Tensor, background: Tensor) -> Tensor:
    """x = m·f + (1 − m)·b; the one-channel mask broadcasts over the colour channels.

    mask [N, 1, H, W] in [0, 1]; foreground, background [N, 3, H, W] in [-1, 1] → x [N, 3, H, W] in [-1, 1].
    """
    return mask * foreground + (1 - mask) * background


def rotate(mask: Tensor, max_degrees: float, generator: torch.Generator | None = None) -> Tensor:
    """Rotate each mask about its centre by its own random angle, uniform in [−max_degrees, max_degrees)
    (degrees), drawn from `generator`; bilinear sampling, zeros outside the frame.

    mask float [N, C, H, W] → same shape.
    """
    n = mask.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta.to(mask), list(mask.shape), align_corners=False)
    return F.grid_sample(mask, grid, padding_mode="zeros", align_corners=False)


def compose_variant(name: str, mask: Tensor, foreground: Tensor, background: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """The composite of one study variant `name` (one of `COMPOSERS`; see the module doc).

    Tensors as for `compose`; random variants draw from `generator`. Raises `SkdcgnError` for an
    unknown `name`.
    """
    if name == "standard":
        pass
    elif name == "rotate":
        mask = rotate(mask, 180.0, generator)
    elif name == "mask_noise":
        noise = torch.randn(mask.shape, generator=generator).to(mask)
        mask = (mask + 0.2 * noise).clamp(0, 1)
    elif name == "opacity":
        mask = mask * 0.75
    elif name == "binary":
        mask = (mask > 0.5).to(mask.dtype)
    elif name == "swap_textures":
        foreground, background = background, foreground
    elif name == "shape_only":
        n = mask.shape[0]
        foreground = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1).to(mask).expand_as(foreground)
        background = (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1).to(mask).expand_as(background)
    else:
        raise SkdcgnError(f"unknown composer {name!r}; choose one of: {', '.join(COMPOSERS)}")
    return compose(mask, foreground, background)
