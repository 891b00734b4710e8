"""Mask health per class: is each digit's mask there, binary, and the right digit?

A known failure of CGN training is that some classes' masks collapse (empty or full frame) or
turn into the wrong digit. For each class k we sample masks m = shape(u, k) and report
- `area`: mean of m (MNIST digits at 32 px cover about 0.10–0.20 of the frame);
- `binariness`: 1 − mean(4·m·(1 − m)): 1 for a perfectly binary mask, 0 for m ≡ 0.5;
- `soft_fraction`: fraction of pixels with 0.1 < m < 0.9;
- `readable`: fraction of masks that the domain network, shown the mask as a white digit on
  black (the composite with a white foreground and a black background, x = 2m − 1), reads as k.

Flags (thresholds in `MaskHealthThresholds`): `empty` (area < 0.02), `full` (area > 0.6),
`blurry` (binariness < 0.5), `wrong_digit` (readable < 0.5). A flagged class is listed in
`flagged` with its reasons.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..errors import SkdcgnError
from ..images import render_mask  # noqa: F401  (re-exported: masks are rendered for the digit reader)


@dataclasses.dataclass(frozen=True)
class MaskHealthThresholds:
    """Per-class flag thresholds of the mask health check.

    Fields:
        min_area: a class whose mean mask value is below this is flagged `empty` (fraction of the frame).
        max_area: above this, `full` (fraction of the frame).
        min_binariness: below this binariness (1 − mean 4·m·(1 − m), in [0, 1]), `blurry`.
        min_readable: below this fraction of masks read as their class, `wrong_digit`.
    """
    min_area: float = 0.02
    max_area: float = 0.6
    min_binariness: float = 0.5
    min_readable: float = 0.5


def sharpness(masks: Tensor) -> dict[str, float]:
    """How binary masks [N, 1, H, W] in [0, 1] are: {"binariness": 1 − mean 4·m·(1 − m) (1 for
    0/1 masks, 0 for m ≡ 0.5), "soft_fraction": fraction of pixels with 0.1 < m < 0.9}."""
    m = masks.float()
    return {"binariness": float(1 - (4 * m * (1 - m)).mean()), "soft_fraction": float(((m > 0.1) & (m < 0.9)).float().mean())}


@torch.no_grad()
def mask_health_from_masks(masks: Tensor, labels: Tensor, predict: Callable[[Tensor], Tensor],
                           n_classes: int = 10, thresholds: MaskHealthThresholds = MaskHealthThresholds()) -> dict:
    """Mask health of given masks [N, 1, H, W] with their classes; `predict` maps images in
    [-1, 1] to digit predictions [N] (e.g. `DomainExtractor.predict`)."""
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise SkdcgnError(f"masks: expected [N, 1, H, W], got {list(masks.shape)}")
    masks = masks.detach().float().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    pred = predict(render_mask(masks)).cpu()
    per_class, flagged = [], {}
    for k in range(n_classes):
        sel = labels == k
        if not sel.any():
            continue
        m = masks[sel]
        row = {
            "class": k,
            "n": int(sel.sum()),
            "area": float(m.mean()),
            **sharpness(m),
            "readable": float((pred[sel] == k).float().mean()),
        }
        reasons = []
        if row["area"] < thresholds.min_area:
            reasons.append("empty")
        if row["area"] > thresholds.max_area:
            reasons.append("full")
        if row["binariness"] < thresholds.min_binariness:
            reasons.append("blurry")
        if row["readable"] < thresholds.min_readable:
            reasons.append("wrong_digit")
        row["flags"] = reasons
        if reasons:
            flagged[k] = reasons
        per_class.append(row)
    if not per_class:
        raise SkdcgnError(f"labels: no mask has a class in [0, {n_classes})")
    mean = {key: sum(r[key] for r in per_class) / len(per_class) for key in ("area", "binariness", "soft_fraction", "readable")}
    return {"per_class": per_class, "mean": mean, "flagged": flagged,
            "thresholds": dataclasses.asdict(thresholds)}


@torch.no_grad()
def sample_masks(cgn, n_per_class: int = 100, seed: int = 0, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Masks of a CGN (teacher or students), `n_per_class` per class, from a generator seeded by `seed`.

    Returns (masks float32 [n_per_class · n_classes, 1, H, W] in [0, 1] on the CPU, labels int64
    [same N], cycling 0, 1, ..., n_classes − 1); `batch_size` masks are generated per call.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(cgn.n_classes).repeat(n_per_class)
    masks = torch.cat([cgn.run_mechanism("shape", y, g).float().cpu() for y in labels.split(batch_size)])
    return masks, labels


def mask_health(cgn, predict: Callable[[Tensor], Tensor], n_per_class: int = 100, seed: int = 0,
                thresholds: MaskHealthThresholds = MaskHealthThresholds()) -> dict:
    """Mask health of a CGN's shape mechanism (see the module doc)."""
    masks, labels = sample_masks(cgn, n_per_class, seed)
    return mask_health_from_masks(masks, labels, predict, cgn.n_classes, thresholds)
