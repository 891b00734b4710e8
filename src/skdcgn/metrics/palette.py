"""The colours a CGN-MNIST draws for each class, and a test set rebuilt in them.

A released teacher was trained on its authors' copy of the data, whose class colours need not be
ours (the colored teacher learned a different palette; double_colored's drifted a little). A
classifier trained on that teacher's counterfactuals and tested on our data is then tested on
colours it never saw. `palette_test_set` rebuilds a split with the same digits and the same
random class draws in the teacher's colours, so the two accuracies differ only by the palette.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.variants import build_variant, check_colour_variant


@torch.no_grad()
def cgn_palette(cgn, n_per_class: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) float32 [10, 3] RGB in [0, 1]: per class, the mean foreground
    colour under the mask and the mean background colour outside it, over `n_per_class` samples."""
    g = torch.Generator().manual_seed(seed)
    fg_rgb, bg_rgb = [], []
    for k in range(cgn.n_classes):
        mask, fg, bg, _ = cgn.sample(torch.full((n_per_class,), k, dtype=torch.long), generator=g)
        mask, fg, bg = mask.float().cpu(), (fg.float().cpu() + 1) / 2, (bg.float().cpu() + 1) / 2
        fg_rgb.append((fg * mask).sum((0, 2, 3)) / mask.sum().clamp_min(1e-6))
        bg_rgb.append((bg * (1 - mask)).sum((0, 2, 3)) / (1 - mask).sum().clamp_min(1e-6))
    return (torch.stack(fg_rgb).clamp(0, 1).numpy().astype(np.float32),
            torch.stack(bg_rgb).clamp(0, 1).numpy().astype(np.float32))


def palette_test_set(variant: str, cgn, split: str = "test", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`split` of `variant` (colored or double_colored) with `cgn`'s class colours instead of ours:
    (uint8 images [N, 3, 32, 32], int64 labels [N])."""
    check_colour_variant(variant, split, seed)  # before sampling the CGN
    return build_variant(variant, split, seed, palette=cgn_palette(cgn))
