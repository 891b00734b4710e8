"""CGN-ImageNet teacher mechanisms: BigGAN-deep generators (+ U2-Net for the mask), loaded by path.

pytorch-pretrained-biggan's `BigGAN(BigGANConfig(...))` is the generator; its checkpoint format
(a folder with `config.json` + `pytorch_model.bin`) is read here with `torch.load(weights_only=True)`
and checked key by key, shape by shape, before anything is loaded. The optional dependency is
imported only when a generator is built: `import skdcgn.models` works without it.

The mechanism interface is the project's (`forward(u, y) -> Tensor`, see models/cgn.py):

    u  [N, z_dim]  standard normal (as everywhere in skdcgn: transfer sets, CGN.sample, eval)
    y  [N]         class indices in [0, 1000)
    z = truncation · T(u)   T maps N(0, 1) onto the normal truncated to [-2, 2] (inverse CDF,
                            element-wise, monotone): z is exactly BigGAN's truncated noise, drawn
                            from whatever seeded generator drew u. `input_noise="truncated"`
                            takes u as z itself (e.g. the CGN authors' fixed noise `u_fixed.pth`).
    BigGAN(z, one_hot(y), truncation)                          [N, 3, R, R] in [-1, 1]
    shape:      clamp(U2Net(BigGAN(...)), 1e-4, 0.9999)       [N, 1, R, R] in [0, 1]
    foreground, background: BigGAN(...)                        [N, 3, R, R]

As in CGN-ImageNet, textures are not shifted at composition (`shifted_texture=False`).
"""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import setting, validate_config
from ...errors import SkdcgnError
from ...io import check_state_dict, load_torch_state_dict, read_json
from ..cgn import CGN, MECHANISMS
from ..pretrained import PretrainedModel, register
from .u2net import U2Net, U2NetConfig

INSTALL_HINT = "the ImageNet teachers need pytorch-pretrained-biggan: pip install 'skdcgn[imagenet]'"
BIGGAN_WEIGHTS = "pytorch_model.bin"
BIGGAN_CONFIG = "config.json"
# BigGAN-deep layer lists (up-sample?, in, out channels as multiples of channel_width)
DEEP_128 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8), (True, 8, 4),
            (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1))
DEEP_256 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8), (True, 8, 8),
            (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1))
# what a CGN-ImageNet state_dict (torch.save(cgn.state_dict())) holds, by prefix
TINY_LAYERS = {32: ((False, 16, 16), (True, 16, 8), (False, 8, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1)),
               64: ((False, 16, 16), (True, 16, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
                    (False, 2, 2), (True, 2, 1)),
               128: DEEP_128, 256: DEEP_256}
CGN_IMAGENET_PREFIX = {"shape": "f_shape", "foreground": "f_text", "background": "f_bg"}
TRUNC_LO, TRUNC_HI = -2.0, 2.0  # BigGAN's truncated normal (scipy truncnorm(-2, 2)), scaled by `truncation`


def _biggan_module():
    try:
        import pytorch_pretrained_biggan as ppb
    except ImportError:
        raise SkdcgnError(INSTALL_HINT) from None
    return ppb


@dataclasses.dataclass
class ImageNetMechanismConfig:
    """One CGN-ImageNet mechanism: a BigGAN-deep generator (Brock et al., ICLR 2019, as implemented in
    pytorch-pretrained-biggan), plus a U2-Net masker for the shape mechanism.

    Fields:
        mechanism: "shape", "foreground" or "background".
        truncation: BigGAN truncation, in (0, 1]; scales the truncated noise and is passed to BigGAN.
        input_noise: "normal" (u ~ N(0, I) is mapped to truncated noise) or "truncated" (u is used as z).
        output_dim, z_dim, class_embed_dim, channel_width, num_classes, layers,
        attention_layer_position, eps, n_stats: the fields of pytorch_pretrained_biggan.BigGANConfig
            (defaults: biggan-deep-256). z_dim, class_embed_dim, channel_width, num_classes and n_stats
            are in [1, 100000]; class_embed_dim must equal z_dim; n_stats >= 2; `layers` are
            (up_sample, in, out) channel multiples that chain from 16 down to 1.
        u2net_encoder, u2net_decoder: (mid, out) channel pairs of the U2-Net (shape only; see `U2NetConfig`).
        shifted_texture: must be false (CGN-ImageNet textures are not shifted).
    """
    mechanism: str = setting("foreground", choices=MECHANISMS)
    truncation: float = setting(0.5, lo=0.0, hi=1.0, lo_open=True, help="BigGAN truncation")
    input_noise: str = setting("normal", choices=("normal", "truncated"),
                               help="normal: u ~ N(0, I) is mapped to truncated noise; truncated: u is used as is")
    # BigGAN-deep, the fields of pytorch_pretrained_biggan.BigGANConfig (defaults: biggan-deep-256)
    output_dim: int = 256
    z_dim: int = setting(128, lo=1, hi=100_000, unit="dims")
    class_embed_dim: int = setting(128, lo=1, hi=100_000, unit="dims")
    channel_width: int = setting(128, lo=1, hi=100_000, unit="channels")
    num_classes: int = setting(1000, lo=1, hi=100_000, unit="classes")
    layers: tuple[tuple, ...] = DEEP_256
    attention_layer_position: int = 8
    eps: float = 1e-4
    n_stats: int = setting(51, lo=1, hi=100_000)
    # U2-Net masker (shape only; defaults: the full U2-Net)
    u2net_encoder: tuple[tuple, ...] = U2NetConfig.encoder
    u2net_decoder: tuple[tuple, ...] = U2NetConfig.decoder
    shifted_texture: bool = False

    @property
    def n_classes(self) -> int:
        """Number of classes (BigGAN's `num_classes`)."""
        return self.num_classes

    @property
    def latent_dim(self) -> int:
        """Size of the noise u (BigGAN's `z_dim`)."""
        return self.z_dim

    @property
    def image_size(self) -> int:
        """Output side in pixels: 4 · 2^(number of up-sampling layers)."""
        return 4 * 2 ** sum(bool(l[0]) for l in self.layers)

    def biggan_config(self) -> dict:
        """The BigGAN fields as a dict for `BigGANConfig.from_dict` / its config.json."""
        return {"output_dim": self.output_dim, "z_dim": self.z_dim, "class_embed_dim": self.class_embed_dim,
                "channel_width": self.channel_width, "num_classes": self.num_classes,
                "layers": [list(l) for l in self.layers], "attention_layer_position": self.attention_layer_position,
                "eps": self.eps, "n_stats": self.n_stats}

    def validate(self) -> None:
        """Check every field (ranges in the class docstring); raises `SkdcgnError` naming the first bad field."""
        validate_config(self)
        if self.class_embed_dim != self.z_dim:
            raise SkdcgnError(f"class_embed_dim: BigGAN-deep needs class_embed_dim == z_dim ({self.z_dim}), got {self.class_embed_dim}")
        if self.n_stats < 2:
            raise SkdcgnError("n_stats: BigGAN's batch-norm statistics need n_stats >= 2")
        prev = 16
        for i, l in enumerate(self.layers):
            if len(l) != 3 or not isinstance(l[0], bool) or not all(isinstance(c, int) and c >= 1 for c in l[1:]):
                raise SkdcgnError(f"layers[{i}]: expected [up_sample (bool), in, out], got {l!r}")
            if l[1] != prev or l[2] not in (l[1], l[1] // 2) or (self.channel_width * l[1]) % 4:
                raise SkdcgnError(f"layers[{i}]: {list(l)} does not chain (in must be {prev}, out in or in/2, "
                                  "channel_width·in divisible by 4)")
            prev = l[2]
        if prev != 1 or self.channel_width < 3:
            raise SkdcgnError("layers: the last layer must end at 1·channel_width (>= 3 channels for RGB)")
        if 0 <= self.attention_layer_position < len(self.layers):
            if (self.channel_width * self.layers[self.attention_layer_position][1]) % 8:
                raise SkdcgnError("attention_layer_position: self-attention needs channel_width·in divisible by 8")
        if self.mechanism == "shape":
            U2NetConfig(tuple(self.u2net_encoder), tuple(self.u2net_decoder)).validate()
        if self.shifted_texture:
            raise SkdcgnError("shifted_texture: CGN-ImageNet textures are not shifted (must be false)")


def tiny_config(mechanism: str, image_size: int = 32, channel_width: int = 8, n_classes: int = 1000,
                z_dim: int = 16, **overrides) -> ImageNetMechanismConfig:
    """A BigGAN-deep of the same topology with a few channels (tests, smoke runs)."""
    layers = TINY_LAYERS.get(image_size)
    if layers is None:
        raise SkdcgnError(f"image_size: {image_size} is not one of {', '.join(map(str, TINY_LAYERS))}")
    from .u2net import tiny_u2net_config

    u2 = tiny_u2net_config()
    cfg = ImageNetMechanismConfig(mechanism=mechanism, output_dim=image_size, z_dim=z_dim, class_embed_dim=z_dim,
                                  channel_width=channel_width, num_classes=n_classes, layers=tuple(layers),
                                  attention_layer_position=len(layers) - 2, u2net_encoder=u2.encoder,
                                  u2net_decoder=u2.decoder, **overrides)
    cfg.validate()
    return cfg


def truncate_normal(u: Tensor, truncation: float) -> Tensor:
    """Map standard-normal `u` element-wise onto truncation · N(0, 1) truncated to [-2, 2]."""
    lo, hi = torch.special.ndtr(torch.tensor(TRUNC_LO, dtype=torch.float64)), torch.special.ndtr(torch.tensor(TRUNC_HI, dtype=torch.float64))
    p = lo + torch.special.ndtr(u.double()) * (hi - lo)
    return (truncation * torch.special.ndtri(p).clamp(TRUNC_LO, TRUNC_HI)).to(u.dtype)


def truncated_noise(n: int, dim: int = 128, truncation: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """BigGAN's truncated noise [n, dim], seeded by `generator` (the z that a mechanism computes from u)."""
    return truncate_normal(torch.randn(n, dim, generator=generator), truncation)


def build_biggan(config: ImageNetMechanismConfig) -> nn.Module:
    """A fresh pytorch-pretrained-biggan `BigGAN` for `config`, with its last batch norm's affine set to
    identity and its spectral-norm vectors converged to the random weights.

    Raises `SkdcgnError` if pytorch-pretrained-biggan is not installed.
    """
    ppb = _biggan_module()
    model = ppb.BigGAN(ppb.BigGANConfig.from_dict(config.biggan_config()))
    with torch.no_grad():  # the library leaves the last (unconditional) batch norm's affine uninitialised
        model.generator.bn.weight.fill_(1.0)
        model.generator.bn.bias.zero_()
        _settle_spectral_norm(model)
    return model


@torch.no_grad()
def _settle_spectral_norm(model: nn.Module, iters: int = 10) -> None:
    """Converge the power-iteration vectors (u, v) of every spectral norm to the current weights.

    In eval mode the library's (old-style) spectral norm divides by u·W·v with the stored vectors;
    the random vectors of a fresh module give a meaningless σ (even ≤ 0). Released checkpoints
    carry converged vectors, and loading them replaces these.
    """
    for module in model.modules():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_u") and hasattr(module, "weight_v"):
            w = module.weight_orig.reshape(module.weight_orig.size(0), -1)
            u, v = module.weight_u, module.weight_v
            for _ in range(iters):
                v.copy_(F.normalize(w.t() @ u, dim=0, eps=1e-12))
                u.copy_(F.normalize(w @ v, dim=0, eps=1e-12))


@register
class ImageNetMechanism(PretrainedModel):
    """One CGN-ImageNet mechanism: BigGAN-deep, followed by U2-Net for the shape mechanism."""

    Config = ImageNetMechanismConfig

    def __init__(self, config: ImageNetMechanismConfig) -> None:
        config.validate()
        super().__init__(config)
        self.biggan = build_biggan(config)
        self.u2net = (U2Net(U2NetConfig(tuple(config.u2net_encoder), tuple(config.u2net_decoder)))
                      if config.mechanism == "shape" else None)
        self.eval()  # BigGAN's batch norms use stored statistics; U2-Net is frozen in CGN

    def biggan_inputs(self, u: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(z [N, z_dim], one-hot classes [N, num_classes]), both in the model's dtype, from u float
        [N, z_dim] and y int [N] in [0, num_classes); z = `truncate_normal(u, truncation)`, or u
        itself when `input_noise` is "truncated".
        """
        z = u if self.config.input_noise == "truncated" else truncate_normal(u, self.config.truncation)
        z = self.as_input(z)  # truncated in float64 first: the same z at any precision
        return z, F.one_hot(y.long(), self.config.num_classes).to(z.dtype)   # [N, z_dim], [N, 1000]

    def forward(self, u: Tensor, y: Tensor) -> Tensor:
        """u float [N, z_dim]; y int [N] in [0, num_classes) → texture [N, 3, R, R] in [-1, 1], or for the
        shape mechanism a mask [N, 1, R, R] in [1e-4, 0.9999] (R = image_size).
        """
        z, onehot = self.biggan_inputs(u, y)
        x = self.biggan(z, onehot, self.config.truncation)                    # [N, 3, R, R] in [-1, 1]
        if self.u2net is None:
            return x
        return self.u2net(x).clamp(1e-4, 0.9999)                              # [N, 1, R, R] mask


# ---- foreign checkpoints ------------------------------------------------------------------------

def _load_checked(module: nn.Module, sd: dict, source: str) -> None:
    """Load `sd` into `module` after checking every key and shape.

    Tolerated: missing BatchNorm `num_batches_tracked` counters (older files) and missing
    spectral-norm `weight_v` vectors, which are recomputed from `weight_orig` and `weight_u`
    exactly as pytorch-pretrained-biggan's converter does.
    """
    expected = module.state_dict()
    sd = dict(sd)
    for k in expected:
        if k not in sd and k.endswith("num_batches_tracked"):
            sd[k] = expected[k]
    derive_v = [k for k in expected if k not in sd and k.endswith(".weight_v")
                and k[:-1] + "u" in sd and k[:-len("weight_v")] + "weight_orig" in sd]
    for k in derive_v:
        sd[k] = expected[k]  # placeholder, replaced below once shapes are checked
    check_state_dict(sd, expected, source)
    module.load_state_dict(sd)
    with torch.no_grad():
        for k in derive_v:
            owner = module.get_submodule(k.rsplit(".", 1)[0])
            w = owner.weight_orig.reshape(owner.weight_orig.size(0), -1)
            owner.weight_v.copy_(F.normalize(w.t() @ owner.weight_u, dim=0, eps=1e-12))


def _config_from_biggan_json(path: Path, mechanism: str, **overrides) -> ImageNetMechanismConfig:
    raw = read_json(path)
    known = {f.name for f in dataclasses.fields(ImageNetMechanismConfig)}
    values = {k: v for k, v in raw.items() if k in known}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SkdcgnError(f"{path}: unknown BigGAN config field {unknown[0]!r}")
    if "layers" in values:
        if not isinstance(values["layers"], list):
            raise SkdcgnError(f"{path}: 'layers' must be a list of [up_sample, in, out]")
        values["layers"] = tuple(tuple(l) if isinstance(l, list) else l for l in values["layers"])
    for k in ("eps",):
        if isinstance(values.get(k), int):
            values[k] = float(values[k])
    try:
        cfg = ImageNetMechanismConfig(mechanism=mechanism, **values, **overrides)
    except TypeError as e:
        raise SkdcgnError(f"{path}: bad BigGAN config ({e})") from None
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.type in ("int", "float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise SkdcgnError(f"{path}: field '{f.name}' should be a number, got {v!r}")
    cfg.validate()
    return cfg


def load_biggan_folder(folder: str | os.PathLike, u2net: str | os.PathLike | None = None, truncation: float = 0.5,
                       u2net_config: U2NetConfig | None = None) -> CGN:
    """The CGN initialisation: one BigGAN-deep checkpoint folder (config.json + pytorch_model.bin)
    for all three mechanisms, plus U2-Net weights (`u2net.pth`, a state_dict) for the mask.

    Without `u2net`, the masker keeps random weights (useful for cost measurements only).
    """
    folder = Path(folder)
    u2 = u2net_config or U2NetConfig()
    sd = load_torch_state_dict(folder / BIGGAN_WEIGHTS)
    mechs = {}
    for m in MECHANISMS:
        cfg = _config_from_biggan_json(folder / BIGGAN_CONFIG, m, truncation=truncation,
                                       u2net_encoder=tuple(u2.encoder), u2net_decoder=tuple(u2.decoder))
        mech = ImageNetMechanism(cfg)
        _load_checked(mech.biggan, sd, str(folder / BIGGAN_WEIGHTS))
        mechs[m] = mech
    if u2net is not None:
        _load_checked(mechs["shape"].u2net, load_torch_state_dict(Path(u2net)), str(u2net))
    return CGN(**mechs).eval()


def load_cgn_imagenet(path: str | os.PathLike, biggan_config: str | os.PathLike | None = None,
                      truncation: float = 0.5, u2net_config: U2NetConfig | None = None,
                      return_gt: bool = False):
    """A trained CGN-ImageNet checkpoint (`torch.save(cgn.state_dict())` of the CGN authors' code).

    Expected layout, one state_dict:
        f_shape.{embeddings,generator}.*    -> shape mechanism's BigGAN   (shape.biggan.*)
        u2net.*                             -> shape mechanism's U2-Net    (shape.u2net.*)
        f_text.*                            -> foreground BigGAN           (foreground.biggan.*)
        f_bg.*                              -> background BigGAN           (background.biggan.*)
        biggan_GT.*                         -> the frozen, unconstrained BigGAN (not a mechanism;
                                               returned as a 4th value with `return_gt=True`)
    BigGAN architecture: biggan-deep-256 unless `biggan_config` (a config.json) says otherwise.
    """
    path = Path(path)
    sd = load_torch_state_dict(path)
    prefixes = {*CGN_IMAGENET_PREFIX.values(), "biggan_GT", "u2net"}
    stray = sorted(k for k in sd if not isinstance(k, str) or k.split(".", 1)[0] not in prefixes)
    if stray:
        raise SkdcgnError(f"{path}: unexpected key {stray[0]!r} (a CGN-ImageNet state_dict has prefixes {', '.join(sorted(prefixes))})")
    u2 = u2net_config or U2NetConfig()

    def config(m: str) -> ImageNetMechanismConfig:
        extra = {"truncation": truncation, "u2net_encoder": tuple(u2.encoder), "u2net_decoder": tuple(u2.decoder)}
        if biggan_config is not None:
            return _config_from_biggan_json(Path(biggan_config), m, **extra)
        cfg = ImageNetMechanismConfig(mechanism=m, **extra)
        cfg.validate()
        return cfg

    def part(prefix: str) -> dict:
        return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}

    mechs = {}
    for m, prefix in CGN_IMAGENET_PREFIX.items():
        mech = ImageNetMechanism(config(m))
        _load_checked(mech.biggan, part(prefix), f"{path} [{prefix}]")
        if m == "shape":
            _load_checked(mech.u2net, part("u2net"), f"{path} [u2net]")
        mechs[m] = mech
    cgn = CGN(**mechs).eval()
    if not return_gt:
        return cgn
    gt = ImageNetMechanism(config("foreground"))
    _load_checked(gt.biggan, part("biggan_GT"), f"{path} [biggan_GT]")
    return cgn, gt.eval()


def save_biggan_folder(biggan: nn.Module, config: ImageNetMechanismConfig, folder: str | os.PathLike) -> None:
    """Write a BigGAN in pytorch-pretrained-biggan's format (config.json + pytorch_model.bin)."""
    from ...io import write_bytes, write_json

    folder = Path(folder)
    buf = io.BytesIO()
    torch.save(biggan.state_dict(), buf)
    write_bytes(folder / BIGGAN_WEIGHTS, buf.getvalue())
    write_json(folder / BIGGAN_CONFIG, config.biggan_config())


def random_cgn(config_for: Callable[[str], ImageNetMechanismConfig], seed: int = 0) -> CGN:
    """A CGN of random-weight ImageNet mechanisms; `config_for(mechanism)` gives each config."""
    torch.manual_seed(seed)
    return CGN(**{m: ImageNetMechanism(config_for(m)) for m in MECHANISMS}).eval()
