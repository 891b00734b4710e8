"""Calibrating a trained shape student's noise scale to its teacher's mask diversity (issue #20).

A student fitted to the teacher's masks with a pixel loss (BCE or L1) predicts, where it cannot
tell from u exactly how the teacher's shape varies, something nearer the class's typical shape:
its masks are a contracted copy of the teacher's, each class's shapes varying less across the
noise u. Measured on the shipped colored teacher (docs/shape_distribution_colored.md): the default
student's masks vary 3–4% less, they lie closer to the teacher's masks than the teacher's own
masks under other noise do, and the counterfactuals they make train classifiers about a point
worse. Reading s·u instead of u (`StudentConfig.noise_scale`) widens the student's shapes;
`match_noise_scale` finds the s at which the student's diversity equals the teacher's, from the
teacher's outputs alone (its transfer set: source-free, no new query). Measured at the quick
protocol (docs/distillation.md, docs/noise_scale/): that s (≈ 1.05–1.08) recovers little of the
accuracy; a wider s = 1.3 recovers all of it on colored and double_colored.

diversity(masks, y) = mean over classes k of the mean over pixels of the variance, across the
masks of class k, of the masks thresholded at 0.5. Nothing here is from a paper: the contraction
of a regression-fitted generator is the known effect of a mean-squared or cross-entropy fit on
an uncertain target (the fit is the conditional mean); the remedy is the inverse of BigGAN's
truncation trick (Brock et al., ICLR 2019), which trades variety for typicality with s < 1.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import SkdcgnError

SCALE_RANGE = (1.0, 2.0)  # the scales searched: the contraction never makes a student vary *more*
ITERATIONS = 14            # bisection steps: the scale to ±6e-5, below what the diversity estimate resolves


def diversity(masks: Tensor, y: Tensor) -> float:
    """Shape variety of masks [N, 1, H, W] in [0, 1] with classes y (int64 [N]): the mean over the
    classes present (each with ≥ 2 masks) of the per-pixel variance of the masks thresholded at
    0.5, averaged over pixels. In [0, 0.25]; 0 when every mask of a class is the same.
    Raises `SkdcgnError` for masks of another shape or no class with two masks."""
    if masks.ndim != 4 or masks.shape[1] != 1 or len(masks) != len(y):
        raise SkdcgnError(f"masks: expected [N, 1, H, W] with N = len(y) = {len(y)}, got {list(masks.shape)}")
    hard = (masks > 0.5).float()
    per_class = [hard[y == k].var(0).mean() for k in y.unique() if int((y == k).sum()) > 1]
    if not per_class:
        raise SkdcgnError("masks: diversity needs at least two masks of one class")
    return float(torch.stack(per_class).mean())


@torch.no_grad()
def match_noise_scale(student: nn.Module, u: Tensor, y: Tensor, teacher_masks: Tensor,
                      batch_size: int = 1000) -> float:
    """The noise scale s in [1, 2] at which `student`'s masks (its forward at s·u, y) are as diverse
    as `teacher_masks` [N, 1, H, W] (the teacher's masks for the same u [N, latent_dim], y [N]), by
    bisection on s (diversity grows with s). Rounded to 4 decimals; 1.0 when the student already
    varies as much as the teacher, 2.0 when even that is not enough. `student` is called in eval
    mode with its own `noise_scale`, which should be 1 (an already scaled student multiplies).
    Raises `SkdcgnError` as `diversity` does."""
    target = diversity(teacher_masks, y)
    device = next(student.parameters()).device

    def student_diversity(scale: float) -> float:
        masks = torch.cat([student((scale * ub).to(device), yb.to(device)).float().cpu()
                           for ub, yb in zip(u.split(batch_size), y.split(batch_size))])
        return diversity(masks, y)

    lo, hi = SCALE_RANGE
    if student_diversity(lo) >= target:
        return lo
    if student_diversity(hi) <= target:
        return hi
    for _ in range(ITERATIONS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_diversity(mid) < target else (lo, mid)
    return round((lo + hi) / 2, 4)
