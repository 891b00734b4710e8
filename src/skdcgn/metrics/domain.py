"""The domain network's feature space: the shipped, checksummed model, its extractor, and the
one function that trained it (`train_domain_net`; run by `benchmarks/train_domain_net.py`).

Recipe (seeded; the shipped weights come from `train_domain_net(DomainTrainConfig())`):
- texture head (variant × colour/texture class, 30 classes): the `train` splits of colored,
  double_colored and wildlife (MNIST train 0–49,999, colours and textures tied to the label; the
  shipped weights saw data build 1, whose digits were resized bilinearly: the feature space stays
  the checksummed one, and a re-run of the recipe on today's data gives a slightly different net);
- digit head: "shape" images only, built from the same 50,000 MNIST training digits (bilinear
  28 → 32; half soft as in colored, half binarised at 0.1 as in double_colored/wildlife), with a
  foreground and a background drawn independently of the label: a random flat colour, one of the
  variants' palette colours, or a random 32 × 32 crop of one of the 20 wildlife textures; one in
  five is white on black (how masks are rendered), one in five has a black background (as in
  colored). The digit head thus never sees the train splits' colour = label shortcut and reads
  shapes; the texture head makes the shared 64-d features encode colours and textures too.
  Test splits and MNIST test images are never seen.
- optimisation: AdamW (lr 3e-3, weight decay 1e-4), one-cycle schedule, batch 256 (half variant
  images, half shape images), 6 epochs of 36,000 variant images (drawn anew each epoch from the
  three train splits pooled) + 36,000 shape images, seed 0, 1 CPU thread: 1,692 steps, about 11
  minutes on a 2-core CPU shared with other jobs.

Digit accuracy of the shipped weights (test_iid / test): colored 0.973 / 0.967, double_colored
0.930 / 0.862, wildlife 0.816 / 0.756; MNIST digits 50,000–59,999 rendered white on black: 0.975.
Texture-head accuracy on test_iid ≥ 0.998 for all three.

Accuracies of the shipped weights are recorded in `assets/domain_net/training.json`.
"""
from __future__ import annotations

import logging
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import set_threads, setting, validate_config
from ..errors import SkdcgnError
from ..images import check_images
from ..io import sha256_file, verify_sha256, write_json
from ..models.domain_net import DomainNet, DomainNetConfig
from ..models.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_model

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "domain_net"
# sha256 of the shipped files; `load_domain_net` refuses anything else.
SHIPPED_SHA256 = {
    CONFIG_FILE: "55cb764ce2c8587f6deb6b1e834c7a28b41001632c81a3eff8c69b6309a3247a",
    WEIGHTS_FILE: "ec9013fe4bdce85abb07ce8b1837b1fbcddb7a38cde6f4ddc9bf8cc0893c345f",
}
VARIANT_ORDER = ("colored", "double_colored", "wildlife")  # texture-head class = 10 × index + class


# ---- the shipped model --------------------------------------------------------------------------

def verify_domain_net(folder: str | Path = ASSET_DIR, checksums: dict[str, str] | None = None) -> None:
    """Check each file of `folder` against the shipped sha256 values (one-line error otherwise)."""
    folder = Path(folder)
    checksums = SHIPPED_SHA256 if checksums is None else checksums
    for name, digest in checksums.items():
        verify_sha256(folder / name, digest, "shipped domain network", "reinstall skdcgn")


def load_domain_net(folder: str | Path = ASSET_DIR, verify: bool = True) -> DomainNet:
    """The shipped domain network (checksums verified), in eval mode, on the CPU."""
    if verify:
        verify_domain_net(folder)
    model = load_model(folder)
    if not isinstance(model, DomainNet):
        raise SkdcgnError(f"{folder}: holds a {type(model).__name__}, expected a DomainNet")
    return model


class DomainExtractor:
    """Penultimate features of the domain network (64-d) for FID/KID; images in [-1, 1]."""

    def __init__(self, model: DomainNet) -> None:
        self.model = model.eval()
        self.dim = model.config.feature_dim
        self.name = "domain_net"

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Features float32 [N, 64] of images [N, 3, 32, 32] in [-1, 1] (uint8 [0, 255] converted;
        other ranges refused, `images.check_images`)."""
        device = next(self.model.parameters()).device
        return self.model.features(check_images(images, "domain-net images").to(device))

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Digit predictions int64 [N] (on the CPU) of images as for `__call__`."""
        device = next(self.model.parameters()).device
        images = check_images(images, "domain-net images")
        return torch.cat([self.model(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])

    def to(self, device: torch.device | str) -> "DomainExtractor":
        """Move the domain network to `device`; returns self."""
        self.model.to(device)
        return self


def load_domain_extractor(device: torch.device | str = "cpu") -> DomainExtractor:
    """The extractor of the shipped domain network (checksums verified), on `device`.

    Raises `SkdcgnError` if a shipped file is missing or altered.
    """
    return DomainExtractor(load_domain_net()).to(device)


# ---- training (run once; the result ships with the package) -------------------------------------

@dataclasses.dataclass
class DomainTrainConfig:
    """Settings of `train_domain_net` (defaults: the recipe of the shipped weights). Ranges are
    each field's `setting` metadata, checked by `validate()` (`SkdcgnError` naming the field).

    Fields:
        seed: seed of the torch RNG and of every draw of images, shuffles and appearances.
        epochs: training epochs.
        batch_size: images per step (variant and shape images mixed).
        lr: peak learning rate of AdamW's one-cycle schedule.
        weight_decay: AdamW weight decay.
        n_per_variant: variant images per variant and epoch (× 3 variants), capped by the pooled train splits.
        n_shape: label-untied shape images per epoch, capped by the 50,000 MNIST training digits.
        white_on_black: fraction of shape images rendered white on black (as masks are).
        black_background: fraction of shape images with a black background behind a coloured or
            textured digit (on top of the white-on-black ones, which have one too).
        width: `DomainNetConfig.width`.
        threads: torch CPU threads during training.
    """
    seed: int = setting(0, lo=0, hi=2**62)
    epochs: int = setting(6, lo=1, hi=10_000, unit="epochs")
    batch_size: int = setting(256, lo=1, hi=65_536, unit="images")
    lr: float = setting(3e-3, lo=0.0, hi=1.0, lo_open=True, help="peak learning rate (one-cycle AdamW)")
    weight_decay: float = setting(1e-4, lo=0.0, hi=1.0, help="AdamW weight decay")
    n_per_variant: int = setting(12_000, lo=1, hi=10**7, unit="images",
                                 help="× 3 variant images per epoch, drawn anew from the pooled train splits")
    n_shape: int = setting(36_000, lo=0, hi=10**7, unit="images", help="label-untied shape images per epoch")
    white_on_black: float = setting(0.2, lo=0.0, hi=1.0, unit="fraction", help="shape images rendered as masks are")
    black_background: float = setting(0.2, lo=0.0, hi=1.0, unit="fraction", help="with a black background (as colored)")
    width: int = setting(16, lo=1, hi=1024, unit="channels")
    threads: int = setting(1, lo=0, hi=1024, unit="threads", help="one thread: on a shared 2-core machine, two stall each other")

    def validate(self) -> None:
        """Check each field's range (`validate_config`); raises `SkdcgnError`."""
        validate_config(self)


def load_textures() -> Tensor:
    """The 20 wildlife textures (object and background), resized to 150 × 150 (nearest), [0, 1]."""
    from PIL import Image

    from ..data.variants import TEXTURE_SIZE, texture_files

    out = []
    for kind in ("object", "background"):
        for path in texture_files(kind):
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB").resize((TEXTURE_SIZE, TEXTURE_SIZE), Image.NEAREST))
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def _palette() -> Tensor:
    from ..data.variants import COLORED_RGB, DOUBLE_BG_RGB

    return torch.from_numpy(np.concatenate([COLORED_RGB, DOUBLE_BG_RGB])).float()  # [20, 3]


def _appearance(n: int, g: torch.Generator, textures: Tensor, palette: Tensor) -> Tensor:
    """[n, 3, 32, 32] in [0, 1]: per image a random flat colour (1/2), a palette colour (1/4) or a
    random crop of a random texture (1/4), all independent of any label."""
    kind = torch.rand(n, generator=g)
    flat = torch.rand(n, 3, 1, 1, generator=g)
    pal = palette[torch.randint(0, len(palette), (n,), generator=g)][:, :, None, None]
    pal = (pal + 0.05 * torch.randn(n, 3, 1, 1, generator=g)).clamp(0, 1)
    colour = torch.where((kind < 0.5)[:, None, None, None], flat, pal).expand(n, 3, 32, 32)
    t = torch.randint(0, len(textures), (n,), generator=g)
    oy = torch.randint(0, textures.shape[-2] - 32 + 1, (n,), generator=g)
    ox = torch.randint(0, textures.shape[-1] - 32 + 1, (n,), generator=g)
    crops = torch.stack([textures[t[i], :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32] for i in range(n)]) if n else colour
    return torch.where((kind >= 0.75)[:, None, None, None], crops, colour)


def _shape_images(digits: Tensor, g: torch.Generator, textures: Tensor, palette: Tensor,
                  white_on_black: float, black_background: float) -> Tensor:
    """Digits [n, 1, 32, 32] in [0, 1] → label-untied composites in [-1, 1] (see the recipe)."""
    n = len(digits)
    binar = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    m = torch.where(binar, (digits > 0.1).float(), digits)
    fg = _appearance(n, g, textures, palette)
    bg = _appearance(n, g, textures, palette)
    r = torch.rand(n, 1, 1, 1, generator=g)
    wob = r < white_on_black
    black = r < white_on_black + black_background
    fg = torch.where(wob, torch.ones_like(fg), fg)
    bg = torch.where(black, torch.zeros_like(bg), bg)
    x = m * fg + (1 - m) * bg
    return (x * 255).round() / 127.5 - 1  # quantised like the variants


def mnist_digits32(start: int, stop: int) -> tuple[Tensor, Tensor]:
    """MNIST training digits [start, stop) as float [n, 1, 32, 32] in [0, 1] (bilinear), labels."""
    from ..data.mnist import load_mnist
    from ..data.variants import resize_digits

    images, labels = load_mnist("train")
    # bilinear: the recipe of the shipped weights (trained when the variants, data build 1, resized so too)
    return resize_digits(images[start:stop], "bilinear"), torch.from_numpy(labels[start:stop].copy())


def train_domain_net(cfg: DomainTrainConfig, out: str | Path) -> dict:
    """Train the domain network as documented above; save it to `out`; return the record."""
    from ..data import load_variant_uint8

    cfg.validate()
    torch.manual_seed(cfg.seed)
    set_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    var_x, var_y, var_t = [], [], []
    for i, name in enumerate(VARIANT_ORDER):
        x, y = load_variant_uint8(name, "train")
        var_x.append(x)
        var_y.append(y)
        var_t.append(y + 10 * i)
    var_x, var_y, var_t = torch.cat(var_x), torch.cat(var_y), torch.cat(var_t)
    digits, digit_y = mnist_digits32(0, 50_000)  # the same images the train splits use
    textures, palette = load_textures(), _palette()
    logger.info(f"data ready in {time.time() - t0:.0f}s: {len(var_x)} variant images, {len(digits)} digits")

    model = DomainNet(DomainNetConfig(width=cfg.width)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_var = min(cfg.n_per_variant, len(var_x) // len(VARIANT_ORDER)) * len(VARIANT_ORDER)
    n_shape = min(cfg.n_shape, len(digits))
    steps_per_epoch = math.ceil((n_var + n_shape) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    history = []
    for epoch in range(cfg.epochs):
        vi = torch.randperm(len(var_x), generator=g)[:n_var]
        si = torch.randperm(len(digits), generator=g)[:n_shape]
        # one shuffled order over both pools: index < n_var → variant image, else shape image
        order = torch.randperm(n_var + n_shape, generator=g)
        tot, correct, seen = 0.0, 0, 0
        for step, idx in enumerate(order.split(cfg.batch_size)):
            v, s = vi[idx[idx < n_var]], si[idx[idx >= n_var] - n_var]
            x = torch.cat([var_x[v].float() / 127.5 - 1,
                           _shape_images(digits[s], g, textures, palette, cfg.white_on_black, cfg.black_background)])
            # digit targets only for the label-untied shape images; texture targets only for variants
            y = torch.cat([torch.full((len(v),), -100, dtype=torch.long), digit_y[s]])
            t = torch.cat([var_t[v], torch.full((len(s),), -100, dtype=torch.long)])
            logits, tex = model.both(x)
            loss = F.cross_entropy(logits, y, ignore_index=-100) + F.cross_entropy(tex, t, ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * int((y >= 0).sum())
            correct += int((logits.argmax(1) == y).sum())
            seen += int((y >= 0).sum())
            if step % 100 == 0:
                logger.info(f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
        history.append({"epoch": epoch, "loss": tot / seen, "train_digit_acc": correct / seen})
        logger.info(f"epoch {epoch}: loss {tot / seen:.4f}, digit acc {correct / seen:.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    model.save_pretrained(out)  # saved before evaluation: a failed evaluation loses no training
    record = {"config": dataclasses.asdict(cfg), "history": history, "train_seconds": round(time.time() - t0, 1),
              "accuracy": evaluate_domain_net(model), "torch": torch.__version__}
    write_json(Path(out) / "training.json", record)
    sums = {name: sha256_file(Path(out) / name) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    logger.info(json.dumps(record["accuracy"], indent=1))
    logger.info(f"sha256: {json.dumps(sums)}")
    return {**record, "sha256": sums}


@torch.no_grad()
def evaluate_domain_net(model: DomainNet, batch_size: int = 1000) -> dict:
    """Digit accuracy on each variant's test_iid and test split, texture-head accuracy on
    test_iid, and digit accuracy on held-out MNIST digits rendered white on black (masks)."""
    from ..data import load_variant

    model.eval()
    out: dict = {}
    for i, name in enumerate(VARIANT_ORDER):
        for split in ("test_iid", "test"):
            x, y = load_variant(name, split)
            pred, tex = [], []
            for xb in x.split(batch_size):
                d, t = model.both(xb)
                pred.append(d.argmax(1))
                tex.append(t.argmax(1))
            out[f"{name}/{split}"] = float((torch.cat(pred) == y).float().mean())
            if split == "test_iid":
                out[f"{name}/{split}/texture"] = float((torch.cat(tex) == y + 10 * i).float().mean())
    digits, y = mnist_digits32(50_000, 60_000)
    pred = torch.cat([model((xb * 2 - 1).expand(-1, 3, -1, -1)).argmax(1) for xb in digits.split(batch_size)])
    out["mnist_white_on_black"] = float((pred == y).float().mean())
    return out
