"""The one conversion between stored images (uint8 [0, 255]) and model images (float32 [-1, 1])."""
from __future__ import annotations

import torch
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float → uint8, rounded to nearest (on the CPU)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_float(images: Tensor) -> Tensor:
    """uint8 → float32 in [-1, 1] (0 ↦ −1, 255 ↦ 1 exactly); float images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(127.5).sub_(1.0)
    return images.float()
