"""ResNet-50 with torchvision's state_dict layout, and the CGN invariant classifier on top of it.

`ResNet` is the bottleneck ResNet of He et al. (CVPR 2016) as torchvision builds it ("ResNet
v1.5": the stride of a down-sampling block sits on its 3 × 3 convolution). Its parameter and
buffer names are exactly torchvision's `resnet50()` ones (conv1, bn1, layer1.0.conv1 …
layer4.2.bn3, layerN.0.downsample.0/.1, fc), so torchvision's ImageNet weights load into it by
path (`load_torchvision_resnet`) without torchvision installed. `resnet50_config()` is the real
network (25,557,032 parameters with a 1000-class fc); `tiny_resnet_config()` the same topology a
few channels wide, for tests.

`InvariantEnsemble` is the classifier of the CGN paper (Sauer & Geiger, ICLR 2021; the authors'
`imagenet/models/classifier_ensemble.py`): a ResNet backbone without its fc, and three linear
heads (shape, texture, background) on its pooled features, whose logits are averaged. The
authors initialise the backbone from torchvision's ImageNet weights and build each head as a
fresh, randomly initialised fc (`cut=1`): the pretrained fc is dropped, and so it is here.

Inputs are float images [N, 3, H, W] normalised with the ImageNet mean/std (torchvision's
convention, what `metrics.ood.Preprocess` produces); `imagenet_normalize` turns skdcgn's
[-1, 1] images into that.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ...config import setting, validate_config
from ...errors import SkdcgnError
from ...io import check_state_dict, load_torch_state_dict
from ..pretrained import PretrainedModel, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPANSION = 4  # a bottleneck block's output channels = 4 × its width
HEADS = ("shape", "texture", "background")  # the ensemble's heads, in this order


def imagenet_normalize(x: Tensor) -> Tensor:
    """skdcgn images (float [N, 3, H, W] in [-1, 1]) → the ImageNet-normalised input of a
    torchvision-style network: ((x + 1) / 2 − mean) / std per channel; same shape and dtype."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x + 1) * 0.5 - mean) / std


@dataclasses.dataclass
class ResNetConfig:
    """A bottleneck ResNet. Defaults: ResNet-50 (blocks 3, 4, 6, 3; widths 64–512; stem 64).

    Fields:
        blocks: bottleneck blocks per stage (layer1 … layer4), each in [1, 64].
        widths: inner channels of each stage's blocks (outputs are 4 × these), each in [1, 4096].
        stem_width: channels of the 7 × 7 stem convolution, in [1, 4096].
        n_classes: outputs of `fc`; 0 builds no fc (a backbone: `forward` returns the pooled features).
    """
    blocks: tuple[int, ...] = setting((3, 4, 6, 3), lo=1, hi=64, unit="blocks")
    widths: tuple[int, ...] = setting((64, 128, 256, 512), lo=1, hi=4096, unit="channels")
    stem_width: int = setting(64, lo=1, hi=4096, unit="channels")
    n_classes: int = setting(1000, lo=0, hi=100_000, unit="classes")

    def validate(self) -> None:
        """Check ranges (`validate_config`) and that blocks and widths name four stages; raises `SkdcgnError`."""
        validate_config(self)
        if len(self.blocks) != 4 or len(self.widths) != 4:
            raise SkdcgnError(f"blocks, widths: expected 4 stages each, got {len(self.blocks)} and {len(self.widths)}")

    @property
    def features(self) -> int:
        """Channels of the pooled features (2048 for ResNet-50)."""
        return self.widths[-1] * EXPANSION


def resnet50_config(n_classes: int = 1000) -> ResNetConfig:
    """torchvision's `resnet50()` architecture."""
    return ResNetConfig(n_classes=n_classes)


def tiny_resnet_config(n_classes: int = 1000) -> ResNetConfig:
    """The ResNet-50 topology (with a down-sampling block per stage) one block per stage and a few
    channels wide: for tests on a CPU."""
    return ResNetConfig(blocks=(1, 1, 1, 1), widths=(4, 8, 8, 16), stem_width=8, n_classes=n_classes)


class Bottleneck(nn.Module):
    """1 × 1 (in → w), 3 × 3 with `stride` (w → w), 1 × 1 (w → 4w), each followed by batch norm;
    the input (down-sampled by a strided 1 × 1 convolution + BN when its shape changes) is added
    before the last ReLU. torchvision's names: conv1-3, bn1-3, downsample.0/.1."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                           if stride != 1 or in_ch != out else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


@register
class ResNet(PretrainedModel):
    """A bottleneck ResNet (`ResNetConfig`) with torchvision's module names.

    forward: ImageNet-normalised float images [N, 3, H, W] (H, W ≥ 32 keep every stage non-empty;
    224 for ImageNet) → logits [N, n_classes], or the pooled features [N, 4 · widths[-1]] when
    `n_classes` is 0. Initialised as torchvision does (Kaiming-normal convolutions, fan-out; BN
    weight 1, bias 0; PyTorch's default fc).
    """
    Config = ResNetConfig

    def __init__(self, config: ResNetConfig) -> None:
        config.validate()
        super().__init__(config)
        self.conv1 = nn.Conv2d(3, config.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = config.stem_width
        for i, (n, w) in enumerate(zip(config.blocks, config.widths)):
            stage = []
            for j in range(n):
                stage.append(Bottleneck(in_ch, w, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = w * EXPANSION
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, config.n_classes) if config.n_classes else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features [N, 4 · widths[-1]] of images [N, 3, H, W]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))           # [N, stem, H/4, W/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))     # [N, 4·w4, H/32, W/32]
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        return f if self.fc is None else self.fc(f)


def _fill_batch_counters(state: dict, expected: dict) -> dict:
    """torchvision's older weight files (e.g. resnet50-19c8e357.pth) predate BatchNorm's
    `num_batches_tracked` counters; an absent counter is 0, as a fresh BatchNorm has it."""
    out = dict(state)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = torch.zeros_like(v)
    return out


def load_torchvision_resnet(path: str | os.PathLike, backbone: ResNet, keep_fc: bool = False) -> None:
    """Load a torchvision-layout ResNet state_dict file (`torch.save(model.state_dict())`, e.g.
    torchvision's `resnet50-11ad3fa6.pth` / `resnet50-0676ba61.pth`) into `backbone`, in place.

    Read with `io.load_torch_state_dict` (weights_only=True: data, never code; the pre-1.6 format;
    a `module.` / `_orig_mod.` prefix on every key is removed). Every key and shape is checked
    against `backbone` (one-line `SkdcgnError` naming the first difference); missing BatchNorm
    `num_batches_tracked` counters are tolerated. The file's `fc.weight` / `fc.bias` are required
    to be a pair and are dropped unless `keep_fc` (the CGN ensemble re-initialises its heads, as
    the authors' `cut=1` does)."""
    source = str(path)
    state = load_torch_state_dict(path)
    expected = backbone.state_dict()
    fc = {k for k in state if k.startswith("fc.")}
    if fc and fc != {"fc.weight", "fc.bias"}:
        raise SkdcgnError(f"{source}: unexpected fc keys {sorted(fc)}; expected fc.weight and fc.bias")
    if not keep_fc or backbone.fc is None:
        state = {k: v for k, v in state.items() if k not in fc}
    state = _fill_batch_counters(state, expected)
    check_state_dict(state, expected, source)
    backbone.load_state_dict(state)


@dataclasses.dataclass
class InvariantEnsembleConfig:
    """The CGN invariant classifier: a ResNet backbone (`ResNetConfig` fields, without fc) and
    three linear heads of `n_classes` outputs each.

    Fields: blocks, widths, stem_width as in `ResNetConfig` (defaults: ResNet-50); n_classes in
    [2, 100000] (1000 for ImageNet)."""
    blocks: tuple[int, ...] = setting((3, 4, 6, 3), lo=1, hi=64, unit="blocks")
    widths: tuple[int, ...] = setting((64, 128, 256, 512), lo=1, hi=4096, unit="channels")
    stem_width: int = setting(64, lo=1, hi=4096, unit="channels")
    n_classes: int = setting(1000, lo=2, hi=100_000, unit="classes")

    def backbone_config(self) -> ResNetConfig:
        """The backbone's `ResNetConfig` (no fc)."""
        return ResNetConfig(blocks=tuple(self.blocks), widths=tuple(self.widths), stem_width=self.stem_width,
                            n_classes=0)

    def validate(self) -> None:
        """Check every field (`validate_config`, and the backbone's four stages); raises `SkdcgnError`."""
        validate_config(self)
        self.backbone_config().validate()

    @classmethod
    def from_resnet(cls, config: ResNetConfig, n_classes: int | None = None) -> "InvariantEnsembleConfig":
        """The ensemble on the backbone of `config` (n_classes defaults to its fc's, else 1000)."""
        return cls(blocks=tuple(config.blocks), widths=tuple(config.widths), stem_width=config.stem_width,
                   n_classes=n_classes or config.n_classes or 1000)


class EnsembleOutput(NamedTuple):
    """What `InvariantEnsemble.forward` returns: logits [N, n_classes] per head and their mean."""

    shape: Tensor
    texture: Tensor
    background: Tensor
    mean: Tensor  # (shape + texture + background) / 3: the classifier's prediction


@register
class InvariantEnsemble(PretrainedModel):
    """Backbone + shape, texture and background heads (Sauer & Geiger, ICLR 2021).

    forward: ImageNet-normalised images float [N, 3, H, W] → `EnsembleOutput` (logits [N,
    n_classes] of each head and their mean). Trained on real images every head learns the true
    class; on counterfactuals each head learns its own mechanism's class (`imagenet_classifier`).
    Module names: `backbone.<torchvision resnet names without fc>`, `heads.{shape,texture,background}`.
    """
    Config = InvariantEnsembleConfig

    def __init__(self, config: InvariantEnsembleConfig) -> None:
        config.validate()
        super().__init__(config)
        self.backbone = ResNet(config.backbone_config())
        d = config.backbone_config().features
        self.heads = nn.ModuleDict({h: nn.Linear(d, config.n_classes) for h in HEADS})

    def forward(self, x: Tensor) -> EnsembleOutput:
        f = self.backbone.features(x)                                  # [N, 2048] for ResNet-50
        s, t, b = (self.heads[h](f) for h in HEADS)                   # [N, n_classes] each
        return EnsembleOutput(s, t, b, (s + t + b) / 3)

    def load_backbone(self, path: str | os.PathLike) -> None:
        """Initialise the backbone from a torchvision-layout ResNet file (`load_torchvision_resnet`;
        its fc dropped, the heads untouched)."""
        load_torchvision_resnet(path, self.backbone)


# what `HeadLogits` can read out: a head, the mean of all three, or the mean of shape and texture
# (the authors' `shape_texture_preds`, "the prediction without the background signal", on which
# their IN-9 evaluation computes the BG-gap)
READOUTS = (*HEADS, "mean", "shape_texture")


class HeadLogits(nn.Module):
    """One readout of an `InvariantEnsemble` (`READOUTS`: a head, "mean", or "shape_texture" =
    (shape + texture) / 2) as a plain classifier: images → logits [N, n_classes]; what
    `metrics.ood`'s scoring functions take. Raises `SkdcgnError` for another name."""

    def __init__(self, ensemble: InvariantEnsemble, head: str = "mean") -> None:
        super().__init__()
        if head not in READOUTS:
            raise SkdcgnError(f"head: {head!r} is not one of {', '.join(READOUTS)}")
        self.ensemble, self.head = ensemble, head

    def forward(self, x: Tensor) -> Tensor:
        out = self.ensemble(x)
        return (out.shape + out.texture) / 2 if self.head == "shape_texture" else getattr(out, self.head)
