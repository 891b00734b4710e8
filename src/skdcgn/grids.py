"""Image grids as PNG (Pillow only): the one place images are turned into pictures."""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .images import check_images, render_mask, to_uint8
from .io import write_bytes


def to_rgb_array(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] or uint8 (C = 3), or masks in [0, 1] (C = 1) → uint8 [N, H, W, 3].

    Images in another range are refused (`images.check_images`); masks outside [0, 1] too."""
    x = images.detach().cpu()
    x = render_mask(x) if x.ndim == 4 and x.shape[1] == 1 else check_images(x)
    return to_uint8(x).permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int, scale: int = 2, pad: int = 2,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str | None = None) -> Image.Image:
    """Tile images row by row (`nrow` per row, i.e. `nrow` columns), optionally with row/column labels
    and a title; each image is enlarged `scale` times (nearest), `pad` pixels apart, on white.

    `images` as for `to_rgb_array` (raises `SkdcgnError` for images out of range)."""
    arr = to_rgb_array(images)
    n, h, w, _ = arr.shape
    h, w = h * scale, w * scale
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    left = 16 if row_labels else 0
    top = (14 if col_labels else 0) + (16 if title else 0)
    canvas = Image.new("RGB", (left + ncol * (w + pad) + pad, top + nrows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0))
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i]).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (left + pad + c * (w + pad), top + pad + r * (h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((2, top + pad + r * (h + pad) + h // 2 - 5), str(text), fill=(0, 0, 0))
    for c, text in enumerate(col_labels or []):
        draw.text((left + pad + c * (w + pad) + w // 2 - 3, top), str(text), fill=(0, 0, 0))
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write `image` to `path` as PNG (via `io.write_bytes`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def stack_grids(grids: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Place grids side by side (e.g. teacher | student), `gap` pixels apart, top-aligned on white."""
    w = sum(g.width for g in grids) + gap * (len(grids) - 1)
    h = max(g.height for g in grids)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for g in grids:
        canvas.paste(g, (x, 0))
        x += g.width + gap
    return canvas


def counterfactual_grids(cgn, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """Two pictures of a CGN (teacher, students or any mix: anything with `n_classes` and `sample`):
    a n × n grid of composites (shape class by column, texture/background class by row), and a
    grid of n masks, foregrounds, backgrounds and composites (one per class), from `seed`."""
    n = cgn.n_classes
    g = torch.Generator().manual_seed(seed)
    y_shape = torch.arange(n).repeat(n)
    y_tex = torch.arange(n).repeat_interleave(n)
    x = cgn.sample(y_shape, y_tex, y_tex, generator=g).composite
    classes = [str(i) for i in range(n)]
    cf = image_grid(x, n, row_labels=classes, col_labels=classes, title="shape class → (columns); texture class ↓ (rows)")
    m, f, b, x = cgn.sample(torch.arange(n), generator=g)
    mech = stack_grids([image_grid(t, 1, title=name) for name, t in
                        (("mask", m), ("fg", f), ("bg", b), ("x", x))], gap=2)
    return cf, mech
