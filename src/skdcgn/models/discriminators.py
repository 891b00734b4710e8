"""Class-conditional projection discriminator (Miyato & Koyama, 2018) with spectral norm.

Used only to distil: teacher outputs are "real", student outputs "fake" (hinge loss). Returns
the logits and the activations after each block, for TinyGAN's feature-matching loss.

    x [N, C, 32, 32] -> DBlock 32->16 -> DBlock 16->8 -> DBlock 8->4     features: 3 maps
    h = sum over space of ReLU(x)                   [N, C_last]
    logit = Linear(h) + <Embedding(y), h>           [N]  (the projection term)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..config import setting, validate_config
from ..errors import SkdcgnError
from .pretrained import PretrainedModel, register


@dataclasses.dataclass
class DiscriminatorConfig:
    """Projection discriminator used in distillation.

    Fields:
        in_channels: image channels (1 for masks, 3 for textures), in [1, 4096].
        n_classes: number of classes, in [1, 4096].
        widths: channels after each `DBlock` (each halves the side): 1 to 5 values in [1, 1024].
    """
    in_channels: int = setting(1, lo=1, hi=4096, unit="channels", help="1 for masks, 3 for textures")
    n_classes: int = setting(10, lo=1, hi=4096, unit="classes")
    widths: tuple[int, ...] = (16, 32, 64)  # channels after each block (16, 8, 4 px)

    def validate(self) -> None:
        """Check every field (ranges above); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)
        if not 1 <= len(self.widths) <= 5 or not all(isinstance(w, int) and 1 <= w <= 1024 for w in self.widths):
            raise SkdcgnError(f"widths: expected 1 to 5 channel counts in [1, 1024], got {list(self.widths)}")


class DBlock(nn.Module):
    """conv3x3 -> LeakyReLU -> avg-pool /2 -> conv3x3 -> LeakyReLU, plus a pooled 1x1 skip.

    Pooling before the second conv keeps the work at full resolution to one conv (CPU-friendly).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        """x [N, Cin, H, W] → [N, Cout, H/2, W/2]."""
        h = F.avg_pool2d(F.leaky_relu(self.conv1(x), 0.2), 2)       # [N, Cout, H/2, W/2]
        h = F.leaky_relu(self.conv2(h), 0.2)
        return h + self.skip(F.avg_pool2d(x, 2))


@register
class ProjectionDiscriminator(PretrainedModel):
    """Class-conditional projection discriminator (Miyato & Koyama, 2018) with spectral norm, as in TinyGAN
    (Chang & Lu, ACCV 2020); see the module docstring for the layout.
    """
    Config = DiscriminatorConfig

    def __init__(self, config: DiscriminatorConfig) -> None:
        config.validate()
        super().__init__(config)
        chans = (config.in_channels, *config.widths)
        self.blocks = nn.ModuleList([DBlock(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.linear = spectral_norm(nn.Linear(chans[-1], 1))
        self.embed = spectral_norm(nn.Embedding(config.n_classes, chans[-1]))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x float [N, in_channels, H, W]; y int64 [N] in [0, n_classes) → (logits float [N], the output of
        each block: [N, widths[i], H / 2^(i+1), W / 2^(i+1)]).
        """
        features = []
        h = x.contiguous(memory_format=torch.channels_last)  # fast oneDNN path on CPU
        for block in self.blocks:
            h = block(h)
            features.append(h)
        h = F.relu(h).sum(dim=(2, 3))                                            # [N, C_last]
        logits = self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)       # [N]
        return logits, features
