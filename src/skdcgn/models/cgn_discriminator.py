"""Class-conditional discriminators for training CGN-MNIST teachers (LSGAN: one score per image).

Two kinds, after the CGN authors' MNIST discriminators:
- `linear`: an MLP on the flattened image concatenated with a label embedding (CGN's `DiscLin`,
  used for colored and double_colored MNIST). Cheap on a CPU.
- `conv`: four conv blocks on the image plus a one-channel label-embedding plane (CGN's
  `DiscConv`, used for wildlife MNIST, where textures need local features).

Dropout draws its masks from an explicit `torch.Generator` passed to `forward`, so a training
run is reproducible (and resumable bitwise) without touching the global RNG.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..config import setting, validate_config
from ..errors import SkdcgnError
from .pretrained import PretrainedModel, register

KINDS = ("linear", "conv")


@dataclasses.dataclass
class CGNDiscriminatorConfig:
    """A CGN-MNIST teacher discriminator (after the CGN authors' `DiscLin` / `DiscConv`).

    Fields:
        kind: "linear" (MLP) or "conv".
        n_classes: number of classes, in [1, 4096].
        ndf: hidden width (linear) or base channels (conv), in [1, 4096].
        dropout: dropout probability of the linear kind's hidden layers, in [0, 1).
        image_size: image side in pixels, in [1, 4096]; must be 32 for "conv".
        channels: image channels, in [1, 4096].
    """
    kind: str = setting("linear", choices=KINDS)
    n_classes: int = setting(10, lo=1, hi=4096, unit="classes")
    ndf: int = setting(512, lo=1, hi=4096, unit="channels", help="hidden width (linear) or base channels (conv)")
    dropout: float = setting(0.4, lo=0, hi=1, hi_open=True, help="linear only")
    image_size: int = setting(32, lo=1, hi=4096, unit="px")
    channels: int = setting(3, lo=1, hi=4096, unit="channels")

    def validate(self) -> None:
        """Check every field (ranges above); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)
        if self.kind == "conv" and self.image_size != 32:
            raise SkdcgnError(f"image_size: the conv discriminator expects 32 px images, got {self.image_size}")


def _dropout(x: Tensor, p: float, training: bool, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout whose mask comes from `generator` (drawn on the CPU, then moved)."""
    if not training or p == 0.0:
        return x
    keep = (torch.rand(x.shape, generator=generator) >= p).to(x.device, x.dtype)
    return x * keep / (1.0 - p)


@register
class CGNDiscriminator(PretrainedModel):
    """Class-conditional LSGAN discriminator for training CGN-MNIST teachers: one score per image."""
    Config = CGNDiscriminatorConfig

    def __init__(self, config: CGNDiscriminatorConfig) -> None:
        config.validate()
        super().__init__(config)
        c, n = config.ndf, config.n_classes
        act = nn.LeakyReLU(0.2)
        if config.kind == "linear":
            self.label_emb = nn.Embedding(n, n)
            d_in = config.channels * config.image_size ** 2 + n
            self.fc = nn.ModuleList([nn.Linear(d_in, c), nn.Linear(c, c), nn.Linear(c, c)])
            self.out = nn.Linear(c, 1)
        else:
            self.label_emb = nn.Embedding(n, 1)  # one extra input plane per class

            def block(cin: int, cout: int, k: int, s: int) -> list[nn.Module]:
                return [nn.Conv2d(cin, cout, k, stride=s, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

            self.net = nn.Sequential(
                *block(config.channels + 1, c, 3, 1),   # [c, 30, 30]
                *block(c, 2 * c, 3, 1),                 # [2c, 28, 28]
                *block(2 * c, 4 * c, 4, 2),             # [4c, 13, 13]
                *block(4 * c, 4 * c, 4, 2),             # [4c, 5, 5]
                nn.AvgPool2d(3),                        # [4c, 1, 1]
                nn.Conv2d(4 * c, 1, 1, bias=False),     # [1, 1, 1]
            )
        self.act = act

    def forward(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scores [N] for images x [N, C, H, W] in [-1, 1] of classes y [N]."""
        if self.config.kind == "linear":
            h = torch.cat([x.flatten(1), self.label_emb(y)], dim=1)  # [N, C*H*W + n_classes]
            h = self.act(self.fc[0](h))
            for fc in self.fc[1:]:
                h = self.act(_dropout(fc(h), self.config.dropout, self.training, generator))
            return self.out(h).view(-1)
        plane = self.label_emb(y).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:])  # [N, 1, H, W]
        return self.net(torch.cat([x, plane], dim=1)).view(-1)
