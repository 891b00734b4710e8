"""The invariant classifier: [N, 3, 32, 32] in [-1, 1] → logits [N, 10].

Two architectures, picked by `ClassifierNetConfig.arch`:
- `cgn` (default): the CNN the CGN authors trained on their MNIST counterfactuals
  (`mnists/models/classifier.py` of autonomousvision/counterfactual_generative_networks):
  an input BatchNorm, four convolutions, a 7 × 7 average pool and one linear layer (~68k params).
  Kept as released: on 32 px inputs the last feature map is 8 × 8, and the 7 × 7 pool (stride 7)
  averages its top-left 7 × 7 window. The released net ends in LogSoftmax; we return the logits
  (cross-entropy on them is the same loss as NLL on the log-softmax).
- `mnist_example`: the PyTorch MNIST example CNN, adapted to 3 × 32 × 32 (conv 3→32, conv
  32→64, max-pool, dropout .25, fc 64·14·14 = 12544 → 128, dropout .5, fc → 10; ~1.6M params).
"""
from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..config import setting, validate_config
from ..errors import SkdcgnError
from .pretrained import PretrainedModel, register

ARCHS = ("cgn", "mnist_example")


@dataclasses.dataclass
class ClassifierNetConfig:
    """The invariant classifier's architecture.

    Fields:
        arch: "cgn" (the CGN authors' MNIST classifier) or "mnist_example" (PyTorch MNIST example CNN).
        n_classes: number of classes, in [2, 10000].
        in_channels: image channels, in [1, 16].
        image_size: image side in pixels, in [25, 64].
    """
    arch: str = setting("cgn", choices=ARCHS)
    n_classes: int = setting(10, lo=2, hi=10_000, unit="classes")
    in_channels: int = setting(3, lo=1, hi=16, unit="channels")
    image_size: int = setting(32, lo=25, hi=64, unit="px", help="the cgn net's 7 × 7 pool needs a ≥ 7 × 7 map")

    def validate(self) -> None:
        """Check every field (ranges above); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)


def _cgn_feature_size(s: int) -> int:
    s = (s - 1) // 2 + 1  # max-pool 3, stride 2, pad 1: 32 → 16
    s = (s - 1) // 2 + 1  # conv 3, stride 2, pad 1: 16 → 8
    return (s - 7) // 7 + 1  # avg-pool 7, stride 7: 8 → 1


@register
class Classifier(PretrainedModel):
    """Image classifier (architecture chosen by `config.arch`); returns logits."""
    Config = ClassifierNetConfig

    def __init__(self, config: ClassifierNetConfig) -> None:
        config.validate()
        super().__init__(config)
        c, s, k = config.in_channels, config.image_size, config.n_classes
        if config.arch == "cgn":
            f = _cgn_feature_size(s)
            self.features = nn.Sequential(
                nn.BatchNorm2d(c),
                nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(inplace=True),             # [32, 32, 32]
                nn.MaxPool2d(3, stride=2, padding=1),                               # [32, 16, 16]
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),            # [32, 16, 16]
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),  # [64, 8, 8]
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),            # [64, 8, 8]
                nn.AvgPool2d(7),                                                    # [64, 1, 1]
                nn.Flatten(),                                                       # [64]
            )
            self.head = nn.Linear(64 * f * f, k)
        else:
            f = (s - 4) // 2  # two valid 3 × 3 convs, then max-pool 2: 32 → 30 → 28 → 14
            self.features = nn.Sequential(
                nn.Conv2d(c, 32, 3), nn.ReLU(inplace=True),   # [32, 30, 30]
                nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True),  # [64, 28, 28]
                nn.MaxPool2d(2),                              # [64, 14, 14]
                nn.Dropout(0.25),
                nn.Flatten(),                                 # [12544]
            )
            self.head = nn.Sequential(
                nn.Linear(64 * f * f, 128), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(128, k))

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, H, W] in [-1, 1] → logits [N, n_classes]."""
        c, s = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise SkdcgnError(f"classifier input: expected [N, {c}, {s}, {s}], got {list(x.shape)}")
        return self.head(self.features(x))
