"""The CGN-MNIST teacher (Sauer & Geiger, ICLR 2021): three small class-conditional mechanisms.

Layer layout and indices match the released checkpoints (`cgn_*_mnist.pth`), so conversion is a
renaming of keys. Each mechanism: cat([u, label_emb(y)]) (32 + 10 dims) → Linear → [64, 8, 8] →
two ×2 up-sampling conv stages → 32 × 32.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import setting, validate_config
from ..errors import SkdcgnError
from ..io import check_state_dict, load_torch_state_dict, verify_sha256
from .cgn import CGN
from .pretrained import PretrainedModel, register

ASSETS = Path(__file__).parent / "assets"
SHIPPED_TEACHERS = {  # name -> (file, sha256) of the CGN authors' released checkpoints (MIT licence)
    "colored": ("cgn_colored_mnist.pth", "6b178e7c1924b9efc532c467e7f0b77d2702efb536de9816bbd7e92c26d9b3fe"),
    "double_colored": ("cgn_double_colored_mnist.pth", "7aa06c907f099c63a26127164a38d2ab353f1cdcafabdf8ca9303a0e9197b933"),
    "wildlife": ("cgn_wildlife_mnist.pth", "db5bc3108f7bfbd74a85e2b267e65e95bd918920a02fd8de64c947fd8a0015f0"),
}
ORIGINAL_PREFIX = {"shape": "f_shape", "foreground": "f_text1", "background": "f_text2"}


@dataclasses.dataclass
class TeacherConfig:
    """One CGN-MNIST teacher mechanism (Sauer & Geiger, ICLR 2021; layout of the released checkpoints).

    Fields:
        mechanism: "shape", "foreground" or "background".
        n_classes: number of classes (also the class-embedding size), in [1, 4096].
        latent_dim: size of the noise u, in [1, 4096].
        ngf: base channel count, in [1, 4096].
        init_size: side in pixels of the first feature map, in [1, 4096]; the output is 4 · init_size px.
        shifted_texture: textures get a seeded random circular shift at composition.
    """
    mechanism: str = setting("shape", choices=tuple(ORIGINAL_PREFIX))
    n_classes: int = setting(10, lo=1, hi=4096, unit="classes")
    latent_dim: int = setting(32, lo=1, hi=4096, unit="dims")
    ngf: int = setting(32, lo=1, hi=4096, unit="channels")
    init_size: int = setting(8, lo=1, hi=4096, unit="px", help="8 → 16 → 32 px")
    shifted_texture: bool = False  # textures: random circular shift at composition

    def validate(self) -> None:
        """Check every field (ranges above); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)


def _up_conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]


@register
class TeacherMechanism(PretrainedModel):
    """A CGN-MNIST teacher mechanism; the three of a CGN may share one class embedding (`label_emb`)."""
    Config = TeacherConfig

    def __init__(self, config: TeacherConfig, label_emb: nn.Embedding | None = None) -> None:
        config.validate()
        super().__init__(config)
        c, s = config.ngf, config.init_size
        # one embedding may be shared by the three mechanisms, as in the released CGN
        self.label_emb = label_emb if label_emb is not None else nn.Embedding(config.n_classes, config.n_classes)
        if config.mechanism == "shape":
            layers = [
                nn.Linear(config.latent_dim + config.n_classes, 2 * c * s * s),  # 0
                nn.Unflatten(1, (2 * c, s, s)),                                    # 1: [64, 8, 8]
                nn.InstanceNorm2d(2 * c),                                          # 2
                *_up_conv(2 * c, c),                                               # 3-6: [32, 16, 16]
                nn.InstanceNorm2d(c),                                              # 7
                *_up_conv(c, 1),                                                   # 8-11: [1, 32, 32]
                nn.InstanceNorm2d(1),                                              # 12
            ]
        else:
            layers = [
                nn.Linear(config.latent_dim + config.n_classes, 2 * c * s * s),  # 0
                nn.Unflatten(1, (2 * c, s, s)),                                    # 1: [64, 8, 8]
                *_up_conv(2 * c, 2 * c),                                           # 2-5: [64, 16, 16]
                *_up_conv(2 * c, c),                                               # 6-9: [32, 32, 32]
                nn.Conv2d(c, 3, 3, padding=1),                                     # 10: [3, 32, 32]
                nn.BatchNorm2d(3),                                                 # 11
                nn.Tanh(),                                                         # 12
            ]
        self.net = nn.Sequential(*layers)

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        """u float [N, latent_dim]; y int64 [N] in [0, n_classes) → shape: mask [N, 1, 4s, 4s] (instance-normed
        output clamped to [1e-4, 0.9999]); textures: [N, 3, 4s, 4s] in [-1, 1] (tanh), s = init_size.
        """
        out = self.net(torch.cat([self.as_input(u), self.label_emb(y)], dim=1))
        if self.config.mechanism == "shape":
            out = out.clamp(1e-4, 0.9999)  # instance-normed logits, clamped into a mask
        return out


def teacher_mechanisms(n_classes: int = 10, latent_dim: int = 32, ngf: int = 32, init_size: int = 8) -> dict[str, TeacherMechanism]:
    """Three fresh teacher mechanisms sharing one class embedding."""
    emb = nn.Embedding(n_classes, n_classes)
    return {m: TeacherMechanism(TeacherConfig(m, n_classes, latent_dim, ngf, init_size, shifted_texture=m != "shape"), emb)
            for m in ORIGINAL_PREFIX}


def load_original_cgn_mnist(path: str | os.PathLike) -> CGN:
    """Convert a CGN-MNIST checkpoint as released by the CGN authors into a `CGN` (validated)."""
    path = Path(path)
    sd = load_torch_state_dict(path)
    mechs = teacher_mechanisms()
    expected = {"label_emb.weight": mechs["shape"].label_emb.weight}
    for name, mech in mechs.items():
        for k, v in mech.net.state_dict().items():
            expected[f"{ORIGINAL_PREFIX[name]}.{k}"] = v
    check_state_dict(sd, expected, str(path))
    with torch.no_grad():
        mechs["shape"].label_emb.weight.copy_(sd["label_emb.weight"])
        for name, mech in mechs.items():
            prefix = ORIGINAL_PREFIX[name] + "."
            mech.net.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return CGN(**mechs).eval()


def shipped_teacher_path(name: str) -> Path:
    """Path of a shipped CGN-MNIST checkpoint ("colored", "double_colored" or "wildlife"), after checking its SHA-256.

    Raises `SkdcgnError` for an unknown name or a missing / altered file.
    """
    if name not in SHIPPED_TEACHERS:
        raise SkdcgnError(f"unknown teacher {name!r}; shipped teachers: {', '.join(SHIPPED_TEACHERS)}")
    file, digest = SHIPPED_TEACHERS[name]
    return verify_sha256(ASSETS / file, digest, "shipped teacher", "reinstall skdcgn")
