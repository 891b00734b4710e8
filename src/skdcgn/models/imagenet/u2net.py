"""U^2-Net (Qin et al., 2020), compact: one residual U-block class (RSU) for every height.

Module and parameter names match the released `u2net.pth` (and the CGN authors' copy of it),
so a state_dict loads with a check of keys and shapes only. The full net (`U2NET_FULL`, 44.0M
parameters) is what CGN-ImageNet uses to turn BigGAN pre-masks into masks; `tiny_u2net_config`
builds the same topology with a few channels for tests.

    x [N, 3, H, W] in [-1, 1]  (a BigGAN image, fed as is, as in CGN)
    encoder: RSU7 -> /2 -> RSU6 -> /2 -> RSU5 -> /2 -> RSU4 -> /2 -> RSU4F -> /2 -> RSU4F
    decoder: RSU4F, RSU4, RSU5, RSU6, RSU7 on cat(upsampled deeper output, skip)
    d0 = outconv(cat(side1..side6 upsampled to H x W))      mask = sigmoid(d0)  [N, 1, H, W]
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import SkdcgnError

ENC_HEIGHTS = (7, 6, 5, 4, 0, 0)  # 0: RSU-4F (dilated, no pooling)
DEC_HEIGHTS = (0, 4, 5, 6, 7)     # stage5d .. stage1d
# (mid, out) channels per stage, as in the released U2NET and U2NETP
U2NET_FULL = {"encoder": ((32, 64), (32, 128), (64, 256), (128, 512), (256, 512), (256, 512)),
              "decoder": ((256, 512), (128, 256), (64, 128), (32, 64), (16, 64))}
U2NET_SMALL = {"encoder": ((16, 64),) * 6, "decoder": ((16, 64),) * 5}


@dataclasses.dataclass
class U2NetConfig:
    """Channels of a U2-Net (Qin et al., Pattern Recognition 2020).

    Fields:
        encoder: (mid, out) channels of stage1 .. stage6: 6 pairs of ints in [1, 4096].
        decoder: (mid, out) channels of stage5d .. stage1d: 5 pairs of ints in [1, 4096].
    """
    encoder: tuple = U2NET_FULL["encoder"]  # (mid, out) of stage1 .. stage6
    decoder: tuple = U2NET_FULL["decoder"]  # (mid, out) of stage5d .. stage1d

    def validate(self) -> None:
        """Check both channel lists; raises `SkdcgnError` if one is malformed."""
        for name, n in (("encoder", 6), ("decoder", 5)):
            v = getattr(self, name)
            if len(v) != n or not all(len(p) == 2 and all(isinstance(c, int) and 1 <= c <= 4096 for c in p) for p in v):
                raise SkdcgnError(f"u2net {name}: expected {n} (mid, out) channel pairs in [1, 4096], got {v!r}")


def tiny_u2net_config(width: int = 4) -> U2NetConfig:
    """The U2-Net topology with (width, 2·width) channels at every stage (tests, smoke runs)."""
    return U2NetConfig(encoder=((width, 2 * width),) * 6, decoder=((width, 2 * width),) * 5)


class REBNCONV(nn.Sequential):
    """conv3x3 (dilated) -> BN -> ReLU, with the released names conv_s1, bn_s1."""

    def __init__(self, cin: int, cout: int, dirate: int = 1) -> None:
        super().__init__()
        self.add_module("conv_s1", nn.Conv2d(cin, cout, 3, padding=dirate, dilation=dirate))
        self.add_module("bn_s1", nn.BatchNorm2d(cout))
        self.add_module("relu_s1", nn.ReLU(inplace=True))


def _up_like(src: Tensor, tar: Tensor) -> Tensor:
    return F.interpolate(src, size=tar.shape[2:], mode="bilinear", align_corners=True)


class RSU(nn.Module):
    """Residual U-block of height L (RSU-L), or RSU-4F (`height=0`: dilations 1, 2, 4, 8, no pooling)."""

    def __init__(self, height: int, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.fused = height == 0
        self.depth = 4 if self.fused else height
        dil = (lambda i: 2 ** (i - 1)) if self.fused else (lambda i: 2 if i == self.depth else 1)
        self.rebnconvin = REBNCONV(cin, cout)
        for i in range(1, self.depth + 1):
            setattr(self, f"rebnconv{i}", REBNCONV(cout if i == 1 else mid, mid, dil(i)))
        for i in range(self.depth - 1, 0, -1):
            setattr(self, f"rebnconv{i}d", REBNCONV(2 * mid, cout if i == 1 else mid, 2 ** (i - 1) if self.fused else 1))

    def forward(self, x: Tensor) -> Tensor:
        """x [N, cin, H, W] → [N, cout, H, W]."""
        hxin = self.rebnconvin(x)
        skips, h = [], hxin
        for i in range(1, self.depth):
            h = getattr(self, f"rebnconv{i}")(h)
            skips.append(h)
            if not self.fused and i < self.depth - 1:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        h = getattr(self, f"rebnconv{self.depth}")(h)            # the dilated bottom
        for i in range(self.depth - 1, 0, -1):
            skip = skips[i - 1]
            h = getattr(self, f"rebnconv{i}d")(torch.cat((h, skip), 1))
            if not self.fused and i > 1:
                h = _up_like(h, skips[i - 2])
        return h + hxin


class U2Net(nn.Module):
    """Saliency network: image [N, 3, H, W] -> foreground probability [N, 1, H, W]."""

    def __init__(self, config: U2NetConfig | None = None) -> None:
        super().__init__()
        config = config or U2NetConfig()
        config.validate()
        self.config = config
        cin = 3
        for i, (h, (mid, out)) in enumerate(zip(ENC_HEIGHTS, config.encoder), start=1):
            setattr(self, f"stage{i}", RSU(h, cin, mid, out))
            cin = out
        deeper = config.encoder[5][1]
        for k, (h, (mid, out)) in zip(range(5, 0, -1), zip(DEC_HEIGHTS, config.decoder)):
            setattr(self, f"stage{k}d", RSU(h, deeper + config.encoder[k - 1][1], mid, out))
            deeper = out
        side_in = [config.decoder[4 - i][1] for i in range(5)] + [config.encoder[5][1]]  # stage1d..5d, stage6
        for i, c in enumerate(side_in, start=1):
            setattr(self, f"side{i}", nn.Conv2d(c, 1, 3, padding=1))
        self.outconv = nn.Conv2d(6, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x float [N, 3, H, W] → foreground probability [N, 1, H, W] in (0, 1) (sigmoid of the fused side outputs)."""
        enc = []
        h = x
        for i in range(1, 7):
            h = getattr(self, f"stage{i}")(h)
            enc.append(h)                                           # hx1 .. hx6
            if i < 6:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        dec = {6: enc[5]}
        for k in range(5, 0, -1):
            dec[k] = getattr(self, f"stage{k}d")(torch.cat((_up_like(dec[k + 1], enc[k - 1]), enc[k - 1]), 1))
        d1 = self.side1(dec[1])                                     # [N, 1, H, W]
        sides = [d1] + [_up_like(getattr(self, f"side{i}")(dec[i]), d1) for i in range(2, 7)]
        return torch.sigmoid(self.outconv(torch.cat(sides, 1)))
