"""The three MNIST variants of the CGN paper, built vectorised, deterministically, and cached.

- `colored`: the grey digit (MNIST resized to 32x32) multiplied by a colour, black background.
  Colour = class colour (`COLORED_RGB`) + N(0, variance 0.02) per channel, clamped.
- `double_colored`: digit binarised (> 0.1); background colour `DOUBLE_BG_RGB[k]`, digit colour
  `DOUBLE_FG_RGB[k] = DOUBLE_BG_RGB[(k - 6) % 10]`, each + N(0, std 0.01) jitter per channel.
- `wildlife`: as `double_colored`, with textures instead of colours: each texture resized to
  150x150 (nearest), reflect-padded by 3 pixels, and a random 32x32 crop taken per image.

The 28 → 32 px resize is nearest-neighbour, as in the CGN authors' loaders: torchvision's
`Resize(NEAREST)` for colored (= torch's `nearest-exact`), `F.interpolate`'s default (`nearest`)
for the two others. (Data build 1 resized bilinearly, which thickens the binarised strokes: the
classifiers trained on the released teachers' counterfactuals scored 0.5-2.6 points lower OOD.)

Splits: `train` = MNIST training images 0-49,999, colours/textures tied to the label; `test` =
training images 50,000-59,999 with colours/textures drawn uniformly at random, independently of
the label and of each other (out of distribution); `test_iid` = the same images, label-tied.

Images are quantised to uint8 once and converted back, so a cached and a freshly built set are
bitwise identical. Randomness comes only from a `numpy.random.Generator` seeded by
(seed, variant, split): no global RNG is touched.
"""
from __future__ import annotations

import logging
import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from .._version import __version__
from ..errors import SkdcgnError
from ..images import to_float
from ..io import (cache_dir, config_hash, folder_lock, load_tensors, remove_safetensors_temporaries,
                  remove_stale_temporaries, save_tensors, tensor_digest)
from .mnist import load_mnist, mnist_fingerprint

logger = logging.getLogger(__name__)

VARIANTS = ("colored", "double_colored", "wildlife")
SPLITS = ("train", "test", "test_iid")
DIGIT_SOURCES = ("train", "t10k")  # which MNIST images a split is drawn on (`build_variant`)

# Bump when the generation procedure changes: it is part of the cache key, and run records carry it.
# 1: bilinear digit resize; 2: nearest, as the authors' loaders.
BUILD_VERSION = 2
SIZE = 32
TRAIN_RANGE = (0, 50_000)
TEST_RANGE = (50_000, 60_000)

# colored: 10 saturated colours, pairwise >= 0.5 apart in RGB (7 corners of the colour cube
# without black, which is the background, plus orange, violet and light green). The jitter
# (std ~0.14) rarely pushes a colour nearer to another class's.
COLORED_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange", "violet", "lightgreen")
COLORED_RGB = np.array([
    [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
    [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0], [0.5, 0.0, 1.0], [0.5, 1.0, 0.5],
], dtype=np.float32)
COLORED_JITTER_STD = float(np.sqrt(0.02))

# double_colored: the CGN authors' palette; the digit colour list is the same shifted by 6.
DOUBLE_BG_NAMES = ("darkgreen", "darkblue", "#b03060", "orangered", "yellow",
                   "burlywood", "lime", "aqua", "fuchsia", "#6495ed")
DOUBLE_BG_RGB = np.array([ImageColor.getrgb(c) for c in DOUBLE_BG_NAMES], dtype=np.float32) / 255.0
DOUBLE_FG_RGB = DOUBLE_BG_RGB[[(k - 6) % 10 for k in range(10)]]
# The README writes N(0, 0.01); the authors' code calls torch.normal(0, 0.01), i.e. std 0.01.
DOUBLE_JITTER_STD = 0.01
BINARY_THRESHOLD = 0.1

TEXTURE_DIR = Path(__file__).resolve().parent / "assets" / "textures"
TEXTURE_SIZE = 150
TEXTURE_PAD = 3

_CHUNK = 10_000  # images per vectorised step: bounds peak memory to a few hundred MB


def _check(name: str, split: str, seed: int) -> None:
    if name not in VARIANTS:
        raise SkdcgnError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    if split not in SPLITS:
        raise SkdcgnError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SkdcgnError(f"seed must be a non-negative integer, got {seed!r}")


def _mnist_range(split: str) -> tuple[int, int]:
    """Which MNIST training images a split uses (the authors' protocol)."""
    return TRAIN_RANGE if split == "train" else TEST_RANGE


def _rng(name: str, split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), VARIANTS.index(name), SPLITS.index(split)]))


# ---- textures -----------------------------------------------------------------------------------

def texture_files(kind: str) -> list[Path]:
    """The 10 texture files of `kind` ('object' or 'background'), sorted: index = class."""
    folder = TEXTURE_DIR / kind
    files = sorted(folder.glob("*.jpg"), key=lambda p: p.name)
    if len(files) != 10:
        raise SkdcgnError(f"{folder}: expected 10 texture files '<digit>_*.jpg', found {len(files)}")
    for k, path in enumerate(files):
        if not path.name.startswith(f"{k}_"):
            raise SkdcgnError(f"{path}: expected the texture of class {k} (a name starting with '{k}_')")
    return files


def _open_texture(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SkdcgnError(f"{path}: not a readable image ({e})") from None
    w, h = rgb.size
    if not (SIZE <= w <= 8192 and SIZE <= h <= 8192):
        raise SkdcgnError(f"{path}: image is {w}x{h}; expected each side between {SIZE} and 8192 pixels")
    return rgb


@lru_cache(maxsize=2)
def _textures(kind: str) -> torch.Tensor:
    """uint8 [10, 3, 156, 156]: resized to 150x150 (nearest, as the authors' torchvision Resize)
    and reflect-padded, so a 32x32 crop at offsets 0..124 equals RandomCrop(32, padding=3)."""
    out = []
    for path in texture_files(kind):
        arr = np.asarray(_open_texture(path).resize((TEXTURE_SIZE, TEXTURE_SIZE), Image.NEAREST))
        arr = np.pad(arr, ((TEXTURE_PAD, TEXTURE_PAD), (TEXTURE_PAD, TEXTURE_PAD), (0, 0)), mode="reflect")
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out).contiguous()


def _textures_fingerprint() -> str:
    h = hashlib.sha256()
    for kind in ("object", "background"):
        for path in texture_files(kind):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _crops(textures: torch.Tensor, classes: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """uint8 [n, 3, 32, 32]: textures[classes[i]] cropped at offsets[i] = (y, x), by gathering."""
    ar = torch.arange(SIZE)
    off = torch.from_numpy(offsets)
    rows = (off[:, 0:1] + ar)[:, :, None]  # [n, 32, 1]
    cols = (off[:, 1:2] + ar)[:, None, :]  # [n, 1, 32]
    k = torch.from_numpy(classes)[:, None, None]
    return textures[k, :, rows, cols].permute(0, 3, 1, 2)  # advanced dims come first: [n,32,32,3]


# ---- building -----------------------------------------------------------------------------------

# The authors' resize per variant (see the module docstring).
RESIZE_MODE = {"colored": "nearest-exact", "double_colored": "nearest", "wildlife": "nearest"}


def resize_digits(images: np.ndarray, mode: str) -> torch.Tensor:
    """uint8 [n, 28, 28] → float [n, 1, 32, 32] in [0, 1], resized by `F.interpolate`'s `mode`."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    extra = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=(SIZE, SIZE), mode=mode, **extra).clamp_(0, 1)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats → uint8 (round to nearest)."""
    return x.clamp(0, 1).mul(255).round_().to(torch.uint8)


def _classes(labels: np.ndarray, tied: bool, rng: np.random.Generator) -> np.ndarray:
    return labels.copy() if tied else rng.integers(0, 10, size=labels.shape[0])


def nominal_palette(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Our (foreground, background) class colours [10, 3]: colored has no background colour (black)."""
    check_colour_variant(name)
    return (COLORED_RGB, None) if name == "colored" else (DOUBLE_FG_RGB, DOUBLE_BG_RGB)


def check_colour_variant(name: str, split: str = "test", seed: int = 0) -> None:
    """A palette (class colours) exists for colored and double_colored, not for wildlife's textures;
    `split` and `seed` are checked too, so a caller can fail before costly work (sampling a CGN)."""
    _check(name, split, seed)
    if name == "wildlife":
        raise SkdcgnError("wildlife has textures, not colours: a palette applies to colored and double_colored")


def check_palette(name: str, palette: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, background) class colours as float32 [10, 3] in [0, 1], or a one-line error."""
    check_colour_variant(name)
    if not isinstance(palette, (tuple, list)) or len(palette) != 2:
        raise SkdcgnError("palette: expected (foreground, background), each 10 RGB colours")
    out = []
    for what, rgb in zip(("foreground", "background"), palette):
        rgb = np.asarray(rgb, dtype=np.float32)
        if rgb.shape != (10, 3) or not np.isfinite(rgb).all() or rgb.min() < 0 or rgb.max() > 1:
            raise SkdcgnError(f"{what} palette: expected 10 RGB colours in [0, 1], got shape {rgb.shape}")
        out.append(rgb)
    return out[0], out[1]


def build_variant(name: str, split: str, seed: int = 0, mnist_dir: str | os.PathLike | None = None,
                  palette: tuple[np.ndarray, np.ndarray] | None = None, digits: str = "train"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Build a variant without the cache: (uint8 images [N, 3, 32, 32], int64 labels [N]).

    `palette` = (foreground, background) RGB [10, 3] in [0, 1] replaces the class colours of
    colored (which uses the foreground only) or double_colored; everything else, the random
    draws included, stays as without it (e.g. to test a classifier in a teacher's colours).
    `digits`: "train" (the authors' protocol, see the module docstring) or, for the test splits,
    "t10k": MNIST's official 10,000 test digits with the same random draws (the LNTL colored MNIST
    that the released colored teacher learned from tests on these).
    """
    _check(name, split, seed)
    if digits not in DIGIT_SOURCES:
        raise SkdcgnError(f"unknown digits {digits!r}; valid: {', '.join(DIGIT_SOURCES)}")
    if digits == "t10k" and split == "train":
        raise SkdcgnError("digits 't10k' are MNIST's test digits: for the test splits, not train")
    if palette is not None:
        fg_rgb, bg_rgb = check_palette(name, palette)
    elif name != "wildlife":
        fg_rgb, bg_rgb = nominal_palette(name)
    if digits == "t10k":
        images, labels = load_mnist("test", mnist_dir)
    else:
        images, labels = load_mnist("train", mnist_dir)
        lo, hi = _mnist_range(split)
        images, labels = images[lo:hi], labels[lo:hi]
    n = labels.shape[0]
    tied = split != "test"
    rng = _rng(name, split, seed)

    # All random draws happen up front, in a fixed order, so the result does not depend on _CHUNK.
    if name == "colored":
        cls = _classes(labels, tied, rng)
        colors = np.clip(fg_rgb[cls] + rng.normal(0.0, COLORED_JITTER_STD, (n, 3)), 0, 1)
    else:
        bg_cls = _classes(labels, tied, rng)
        fg_cls = _classes(labels, tied, rng)
        if name == "double_colored":
            bg = np.clip(bg_rgb[bg_cls] + rng.normal(0.0, DOUBLE_JITTER_STD, (n, 3)), 0, 1)
            fg = np.clip(fg_rgb[fg_cls] + rng.normal(0.0, DOUBLE_JITTER_STD, (n, 3)), 0, 1)
        else:
            span = TEXTURE_SIZE + 2 * TEXTURE_PAD - SIZE + 1
            bg_off = rng.integers(0, span, size=(n, 2))
            fg_off = rng.integers(0, span, size=(n, 2))
            bg_tex, fg_tex = _textures("background"), _textures("object")

    out = torch.empty((n, 3, SIZE, SIZE), dtype=torch.uint8)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        digit = resize_digits(images[s:e], RESIZE_MODE[name])
        if name == "colored":
            c = torch.from_numpy(colors[s:e].astype(np.float32))[:, :, None, None]
            out[s:e] = _quantise(digit * c)
            continue
        mask = digit > BINARY_THRESHOLD  # [n, 1, 32, 32]
        if name == "double_colored":
            b = torch.from_numpy(bg[s:e].astype(np.float32))[:, :, None, None]
            f = torch.from_numpy(fg[s:e].astype(np.float32))[:, :, None, None]
            out[s:e] = _quantise(torch.where(mask, f, b))
        else:
            out[s:e] = torch.where(mask, _crops(fg_tex, fg_cls[s:e], fg_off[s:e]),
                                   _crops(bg_tex, bg_cls[s:e], bg_off[s:e]))
    return out, torch.from_numpy(labels.copy())


# ---- cache --------------------------------------------------------------------------------------

def variant_cache_path(name: str, split: str, seed: int = 0, mnist_dir: str | os.PathLike | None = None) -> Path:
    """Where `load_variant` caches this set; the key covers everything the images depend on."""
    _check(name, split, seed)
    key = {
        "variant": name, "split": split, "seed": int(seed), "version": __version__,
        "build": BUILD_VERSION, "mnist": mnist_fingerprint(mnist_dir),
        "textures": _textures_fingerprint() if name == "wildlife" else None,
    }
    return cache_dir() / "variants" / f"{name}-{split}-seed{int(seed)}-{config_hash(key)}.safetensors"


def _read_cache(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cached set, or None (with one line on stderr naming the file) when it must be rebuilt:
    unreadable, of unexpected shape or dtype, labels outside [0, 10), or content that no longer
    has the sha256 recorded in its own metadata (a flipped byte, edited labels)."""
    if not path.is_file():
        return None
    try:
        t = load_tensors(path)
    except SkdcgnError as e:
        logger.warning(f"rebuilding unreadable cache file: {e}")
        return None
    images, labels = t.get("images"), t.get("labels")
    if (images is None or labels is None or images.dtype != torch.uint8 or labels.dtype != torch.int64
            or tuple(images.shape) != (n, 3, SIZE, SIZE) or tuple(labels.shape) != (n,)):
        logger.warning(f"rebuilding cache file with unexpected content: {path}")
        return None
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= 10):
        logger.warning(f"rebuilding cache file with labels outside [0, 10): {path}")
        return None
    from ..io import tensor_file_metadata

    recorded = tensor_file_metadata(path).get("sha256")
    if recorded != tensor_digest({"images": images, "labels": labels}):
        logger.warning(f"rebuilding cache file whose content does not match its recorded sha256: {path}")
        return None
    return images, labels


def load_variant_uint8(name: str, split: str, seed: int = 0, mnist_dir: str | os.PathLike | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """As `load_variant`, but images stay uint8 [N, 3, 32, 32] (4x less memory).

    A cache file is used only when its content has the sha256 it records; otherwise it is rebuilt
    (bitwise the same set) and replaced. Writers of the cache folder take its lock in turn
    (`io.folder_lock`, waiting) and remove what killed writers left there.
    """
    path = variant_cache_path(name, split, seed, mnist_dir)
    lo, hi = _mnist_range(split)
    n = hi - lo
    cached = _read_cache(path, n)
    if cached is not None:
        return cached
    images, labels = build_variant(name, split, seed, mnist_dir)
    with folder_lock(path.parent, wait=True):
        remove_stale_temporaries(path.parent, depth=0)  # no one else writes here now: any temporary is a killed write's
        remove_safetensors_temporaries(path.parent, depth=0)
        save_tensors(path, {"images": images, "labels": labels},
                     metadata={"variant": name, "split": split, "seed": str(seed), "skdcgn_version": __version__,
                               "sha256": tensor_digest({"images": images, "labels": labels})})
    return images, labels


def load_variant(name: str, split: str, seed: int = 0, mnist_dir: str | os.PathLike | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 images [N, 3, 32, 32] in [-1, 1], int64 labels [N]) of an MNIST variant.

    `name` in VARIANTS, `split` in SPLITS. Built on first use (seconds), then cached under
    `cache_dir()/variants/`; the same arguments always give bitwise identical tensors.
    """
    images, labels = load_variant_uint8(name, split, seed, mnist_dir)
    return to_float(images), labels
