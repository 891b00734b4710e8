"""The domain network: a small CNN over the MNIST variants whose penultimate features define the
FID/KID space of the project (see `skdcgn.metrics.domain` for how it is trained and shipped).

Two heads on one 64-d feature vector:
- `digit`: the digit class (shape), trained to hold under any colours, so that masks rendered as
  white digits on black and counterfactuals are read by their shape;
- `texture`: which variant and which class's colours/textures an image carries (3 × 10 classes),
  so that the features also encode colour and texture, not shape alone.
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..config import setting, validate_config
from .pretrained import PretrainedModel, register


@dataclasses.dataclass
class DomainNetConfig:
    """The domain network's size.

    Fields:
        n_classes: digit classes, in [1, 1024].
        n_texture_classes: texture classes (3 variants × 10 class-tied colour/texture sets), in [1, 1024].
        width: channels of the first stage (then 2×, 4×, 4×), in [1, 1024].
    """
    n_classes: int = setting(10, lo=1, hi=1024, unit="classes")
    n_texture_classes: int = setting(30, lo=1, hi=1024, unit="classes", help="3 variants × 10 class-tied colour/texture sets")
    width: int = setting(16, lo=1, hi=1024, unit="channels", help="channels of the first stage; then 2×, 4×, 4×")

    def validate(self) -> None:
        """Check every field (ranges above); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)

    @property
    def feature_dim(self) -> int:
        """Size of the feature vector: 4 · width."""
        return 4 * self.width


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register
class DomainNet(PretrainedModel):
    """CNN over [N, 3, 32, 32] images in [-1, 1] with a digit head and a texture head on shared features."""
    Config = DomainNetConfig

    def __init__(self, config: DomainNetConfig) -> None:
        config.validate()
        super().__init__(config)
        w = config.width
        self.body = nn.Sequential(
            *_conv(3, w), nn.MaxPool2d(2),           # [w, 16, 16]
            *_conv(w, 2 * w), nn.MaxPool2d(2),       # [2w, 8, 8]
            *_conv(2 * w, 4 * w),                    # [4w, 8, 8]
            *_conv(4 * w, 4 * w),                    # [4w, 8, 8]
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),   # [4w]: the feature space
        )
        self.digit = nn.Linear(4 * w, config.n_classes)
        self.texture = nn.Linear(4 * w, config.n_texture_classes)

    def features(self, x: Tensor) -> Tensor:
        """[N, 3, 32, 32] in [-1, 1] → [N, feature_dim] (after ReLU and global average pooling)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Digit logits [N, n_classes]."""
        return self.digit(self.body(x))

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, 3, 32, 32] in [-1, 1] → (digit logits [N, n_classes], texture logits [N, n_texture_classes])."""
        h = self.body(x)
        return self.digit(h), self.texture(h)
