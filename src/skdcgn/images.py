"""The one conversion between stored images (uint8 [0, 255]) and model images (float32 [-1, 1]),
and the one check that an image tensor handed to a public function is in that convention."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .errors import SkdcgnError, SkdcgnWarning

RANGE_TOLERANCE = 1e-3  # resampling and reduced precision may overshoot [-1, 1] by this much


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float → uint8, rounded to nearest (on the CPU)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_float(images: Tensor) -> Tensor:
    """uint8 → float32 in [-1, 1] (0 ↦ −1, 255 ↦ 1 exactly); float images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(127.5).sub_(1.0)
    return images.float()


def check_images(images: Tensor, what: str = "images", warn: bool = True) -> Tensor:
    """Model images float32 [N, C, H, W] in [-1, 1] from `images` as a user may hand them over:
    `validate_images`, then uint8 [0, 255] converted explicitly (`to_float`: 0 ↦ −1, 255 ↦ 1)."""
    validate_images(images, what, warn)
    return to_float(images)


def validate_images(images: Tensor, what: str = "images", warn: bool = True) -> None:
    """Check that `images` follow the convention, without converting them (no copy).

    - uint8 is taken as [0, 255] (every value is legal).
    - floating point (any precision) must lie in [-1, 1] (± `RANGE_TOLERANCE`) and be finite;
      a batch that never goes below 0 warns (`SkdcgnWarning`): it looks like [0, 1] images, whose
      features would silently differ (the same test images give FID 10.3 in [0, 1] against their
      [-1, 1] selves, while two genuinely different splits give 13.7); `warn=False` for data
      that may legitimately be all light (masks rendered as images).
    Raises `SkdcgnError` (one line naming `what`) for a non-tensor, another dtype (int, bool),
    a shape that is not [N, C, H, W], NaN or infinite values, or floats outside [-1, 1].
    """
    if not isinstance(images, Tensor):
        raise SkdcgnError(f"{what}: expected a tensor [N, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise SkdcgnError(f"{what}: expected images [N, C, H, W], got shape {list(images.shape)}")
    if images.dtype == torch.uint8 or images.numel() == 0:
        return
    if not images.is_floating_point():
        raise SkdcgnError(f"{what}: expected uint8 [0, 255] or float images in [-1, 1], got {images.dtype}")
    lo, hi = (v.item() for v in torch.aminmax(images.detach()))
    if lo != lo or hi != hi or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise SkdcgnError(f"{what}: contains NaN or infinite values")
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise SkdcgnError(f"{what}: float values span [{lo:.4g}, {hi:.4g}], expected [-1, 1] "
                          "(pass uint8 [0, 255] images as uint8; map [0, 1] images with x * 2 - 1)")
    if warn and lo >= 0:
        warnings.warn(f"{what}: no value below 0 in this batch; skdcgn expects images in [-1, 1] "
                      "(map [0, 1] images with x * 2 - 1)", SkdcgnWarning, stacklevel=3)


def render_mask(mask: Tensor) -> Tensor:
    """[N, 1, H, W] in [0, 1] → a white digit on black, float32 [N, 3, H, W] in [-1, 1].

    Raises `SkdcgnError` for masks outside [0, 1] (or not finite)."""
    if not isinstance(mask, Tensor) or mask.ndim != 4 or mask.shape[1] != 1:
        raise SkdcgnError(f"masks: expected [N, 1, H, W], got {list(getattr(mask, 'shape', []))}")
    return check_images(2 * mask.float() - 1, "masks", warn=False).expand(-1, 3, -1, -1)
