"""Out-of-distribution evaluation of 1000-class ImageNet classifiers on user-provided test sets.

Two benchmarks that the CGN paper (Sauer & Geiger, ICLR 2021) reports on ImageNet:

- ImageNet-9 / Backgrounds Challenge (Xiao et al., 2020): `imagenet9_accuracy`. Folder layout
  `ROOT/<variant>/val/<NN_class>/<image>` with the nine class folders `00_dog` … `08_fish`.
  A 1000-class model is scored as the challenge's `in9_eval.py` scores it: the argmax of the
  1000 logits is mapped through `in_to_in9.json` (ImageNet class → IN-9 class, or -1) and is
  correct iff it equals the folder's label. Reports accuracy per variant and
  BG-gap = acc(mixed_same) − acc(mixed_rand).
- Cue-conflict shape bias (Geirhos et al., ICLR 2019): `cue_conflict_shape_bias`. Layout
  `ROOT/<shape>/<shape><i>-<texture><j>.png`, 16 categories. Decision rule of model-vs-human's
  `ImageNetProbabilitiesTo16ClassesMapping`: softmax over 1000 logits, mean probability over
  each category's ImageNet classes, argmax over the 16 categories. Shape bias =
  shape decisions / (shape + texture decisions) over images whose shape and texture differ.

Nothing is downloaded: the images and both class mappings are files the user provides (see
docs/imagenet_ood.md). Models are `nn.Module`s mapping float images [N, 3, H, W] to logits
[N, 1000]. Images are read with Pillow, converted to RGB and preprocessed by a `Preprocess`
(or any callable PIL image → [3, H, W] tensor); bad input is a one-line `SkdcgnError`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ..config import resolve_device
from ..errors import SkdcgnError, first_line
from ..io import read_json

NUM_IMAGENET_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # compared lower-case

# The released IN-9 class folders; the label of a folder is its position (= its number prefix),
# as torchvision's ImageFolder assigns it in the challenge's own evaluation.
IN9_CLASSES = ("00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore",
               "05_insect", "06_musical instrument", "07_primate", "08_fish")
# Variants of the released test data, in the order the challenge's README lists them; any other
# `ROOT/<name>/val` folder is evaluated too. `fg_mask` holds foreground masks, not images.
IN9_VARIANTS = ("original", "mixed_same", "mixed_rand", "mixed_next", "only_fg", "no_fg",
                "only_bg_b", "only_bg_t")
IN9_NOT_IMAGES = ("fg_mask",)

# The 16 entry-level categories of the cue-conflict stimuli (model-vs-human's sorted order).
CUE_CONFLICT_CATEGORIES = ("airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat",
                           "chair", "clock", "dog", "elephant", "keyboard", "knife", "oven", "truck")
_CUE_NAME = re.compile(r"^([a-z]+)(\d+)-([a-z]+)(\d+)\.[A-Za-z]+$")  # e.g. airplane1-bicycle2.png

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR  # Pillow >= 9.1 moved the constants


# ---- preprocessing -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preprocess:
    """PIL RGB image → normalised float tensor [3, H, W], torchvision-style, without torchvision.

    `resize`: scale the shorter side to this many pixels (bilinear; the longer side is
    int(resize · long / short), as torchvision's Resize computes it); None keeps the size.
    `crop`: centre crop to crop × crop (offsets round((size − crop) / 2)); None keeps the frame.
    Then scale to [0, 1] and normalise per channel with `mean` and `std`.
    """
    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise SkdcgnError(f"{name}: expected a positive integer or None, got {v!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise SkdcgnError(f"mean/std: expected 3 values each, std > 0; got {self.mean}, {self.std}")

    def __call__(self, image: Image.Image) -> Tensor:
        if self.resize is not None:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            if short != self.resize:  # torchvision leaves an image of the right size untouched
                new_long = int(self.resize * long / short)
                size = (self.resize, new_long) if w <= h else (new_long, self.resize)
                image = image.resize(size, _BILINEAR)
        if self.crop is not None:
            w, h = image.size
            if w < self.crop or h < self.crop:
                raise ValueError(f"image is {w}x{h}, smaller than the {self.crop}-pixel centre crop")
            top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
            image = image.crop((left, top, left + self.crop, top + self.crop))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


# The standard ImageNet evaluation transform (Resize(256), CenterCrop(224), ToTensor, Normalize):
# what the CGN authors' cue-conflict loader uses, and the default of `cue_conflict_shape_bias`.
IMAGENET_PREPROCESS = Preprocess()
# ToTensor + Normalize only, for sets released at the input size (224 x 224): what the Backgrounds Challenge's
# in9_eval.py does (ImageNet mean/std inside its model wrapper), and the default of
# `imagenet9_accuracy`; model-vs-human feeds the cue-conflict images this way too.
NO_RESIZE_PREPROCESS = Preprocess(resize=None, crop=None)


def load_image(path: str | Path, preprocess: Callable[[Image.Image], Tensor] = IMAGENET_PREPROCESS) -> Tensor:
    """Read one image as RGB and preprocess it; a file Pillow cannot read is a one-line error."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")  # also forces the decode: a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SkdcgnError(f"{path}: unreadable image ({first_line(e)})") from None
    try:
        x = preprocess(image)
    except (ValueError, OSError) as e:
        raise SkdcgnError(f"{path}: cannot preprocess ({first_line(e)})") from None
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != 3 or not x.is_floating_point():
        raise SkdcgnError(f"{path}: preprocess must return a float tensor [3, H, W], got "
                          f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
    return x


# ---- mappings ------------------------------------------------------------------------------------

def load_in9_mapping(path: str | Path) -> tuple[int, ...]:
    """Read the challenge's `in_to_in9.json`: {"0": c, ..., "999": c}, c in -1..8 (-1: no IN-9 class).

    Returns a tuple of 1000 ints: entry i is the IN-9 class of ImageNet class i.
    """
    return _in9_from_json(read_json(path), str(path))


def _in9_from_json(obj: Mapping[str, object], source: str) -> tuple[int, ...]:
    expected = {str(i) for i in range(NUM_IMAGENET_CLASSES)}
    if set(obj) != expected:
        odd = sorted(set(obj) - expected)[:3]
        missing = sorted(expected - set(obj), key=int)[:3]
        raise SkdcgnError(f"{source}: expected keys '0' … '999' (ImageNet indices); "
                          f"{len(obj)} keys, unexpected {odd}, missing {missing}")
    return _check_in9_mapping([obj[str(i)] for i in range(NUM_IMAGENET_CLASSES)], source)


def _check_in9_mapping(values: Sequence[object], source: str) -> tuple[int, ...]:
    if len(values) != NUM_IMAGENET_CLASSES:
        raise SkdcgnError(f"{source}: expected {NUM_IMAGENET_CLASSES} ImageNet classes, got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not -1 <= v <= len(IN9_CLASSES) - 1:
            raise SkdcgnError(f"{source}: ImageNet class {i} maps to {v!r}; expected an integer in -1..8")
    mapped = {int(v) for v in values}
    absent = [c for c in range(len(IN9_CLASSES)) if c not in mapped]
    if absent:  # such a class could never be predicted: not the challenge's file
        raise SkdcgnError(f"{source}: no ImageNet class maps to IN-9 class(es) {absent}")
    return tuple(int(v) for v in values)


def load_category_mapping(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Read a 16-class mapping {category: [ImageNet indices]} (model-vs-human's 16-class-ImageNet).

    All 16 cue-conflict categories, each a non-empty list of distinct indices in 0..999, no index
    in two categories. Returns the categories in `CUE_CONFLICT_CATEGORIES` order.
    """
    return _check_category_mapping(read_json(path), str(path))


def _check_category_mapping(obj: Mapping[str, object], source: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(obj, Mapping):
        raise SkdcgnError(f"{source}: expected a mapping {{category: [ImageNet indices]}}")
    unknown = sorted(set(obj) - set(CUE_CONFLICT_CATEGORIES))
    missing = [c for c in CUE_CONFLICT_CATEGORIES if c not in obj]
    if unknown or missing:
        raise SkdcgnError(f"{source}: expected the 16 categories {', '.join(CUE_CONFLICT_CATEGORIES)}; "
                          f"unknown {unknown}, missing {missing}")
    owner: dict[int, str] = {}
    out: dict[str, tuple[int, ...]] = {}
    for cat in CUE_CONFLICT_CATEGORIES:
        idx = obj[cat]
        if not isinstance(idx, (list, tuple)) or not idx:
            raise SkdcgnError(f"{source}: {cat}: expected a non-empty list of ImageNet indices")
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < NUM_IMAGENET_CLASSES:
                raise SkdcgnError(f"{source}: {cat}: {i!r} is not an ImageNet index in 0..999")
            if int(i) in owner:  # an index in two categories would make the decision ambiguous
                where = "twice" if owner[int(i)] == cat else f"also in {owner[int(i)]}"
                raise SkdcgnError(f"{source}: {cat}: ImageNet index {i} listed {where}")
            owner[int(i)] = cat
        out[cat] = tuple(int(i) for i in idx)
    return out


# ---- shared plumbing -----------------------------------------------------------------------------

def _folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise SkdcgnError(f"{path}: {what} folder not found")
    return path


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """The images of one folder, sorted by name; hidden files are skipped, anything else refused."""
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
            raise SkdcgnError(f"{p}: not an image (expected {', '.join(IMAGE_SUFFIXES)} files only)")
        files.append(p)
    return files


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SkdcgnError(f"batch_size: expected a positive integer, got {batch_size!r}")


@torch.no_grad()
def _logits(model: nn.Module, files: Sequence[Path], preprocess: Callable[[Image.Image], Tensor],
            batch_size: int, device: torch.device, bar: tqdm) -> Iterable[Tensor]:
    """Yield the model's logits [B, 1000] (on the CPU) for `files`, batch by batch, in order."""
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        xs = [load_image(f, preprocess) for f in chunk]
        for f, x in zip(chunk, xs):  # torch.stack's own message would not name the file
            if x.shape != xs[0].shape:
                raise SkdcgnError(f"{f}: preprocessed to {list(x.shape)}, but {chunk[0].name} to "
                                  f"{list(xs[0].shape)}; use a preprocess that gives one size")
        out = model(torch.stack(xs).to(device))
        if not isinstance(out, Tensor) or out.shape != (len(chunk), NUM_IMAGENET_CLASSES):
            raise SkdcgnError(f"model returned {list(getattr(out, 'shape', []))}; expected logits "
                              f"[{len(chunk)}, {NUM_IMAGENET_CLASSES}]")
        bar.update(len(chunk))
        yield out.float().cpu()


class _EvalMode:
    """Put `model` on `device` in eval mode for the block; restore its train/eval flag afterwards."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device, self.was_training = model, device, model.training

    def __enter__(self) -> nn.Module:
        return self.model.to(self.device).eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


# ---- ImageNet-9 / Backgrounds Challenge ----------------------------------------------------------

def in9_variants(root: str | Path) -> list[str]:
    """The IN-9 variants under `root` (folders with a `val` subfolder), known ones first."""
    root = _folder(root, "IN-9")
    found = [v for v in _subfolders(root) if (root / v / "val").is_dir() and v not in IN9_NOT_IMAGES]
    return [v for v in IN9_VARIANTS if v in found] + [v for v in found if v not in IN9_VARIANTS]


def in9_images(root: str | Path, variant: str) -> list[tuple[Path, int]]:
    """(image, IN-9 label) pairs of one variant, class by class, files sorted by name."""
    root = _folder(root, "IN-9")
    if not variant or Path(variant).name != variant or variant in (".", ".."):
        raise SkdcgnError(f"variant {variant!r} is not a folder name")
    if variant in IN9_NOT_IMAGES:
        raise SkdcgnError(f"variant {variant!r} holds foreground masks, not images")
    val = root / variant / "val"
    if not val.is_dir():
        raise SkdcgnError(f"{val}: variant folder not found (variants here: "
                          f"{', '.join(in9_variants(root)) or 'none'})")
    folders = _subfolders(val)
    for name in folders:
        if name not in IN9_CLASSES:
            raise SkdcgnError(f"{val / name}: unknown class folder (expected {IN9_CLASSES[0]!r} … {IN9_CLASSES[-1]!r})")
    for name in IN9_CLASSES:
        if name not in folders:
            raise SkdcgnError(f"{val / name}: class folder missing")
    pairs = [(f, label) for label, name in enumerate(IN9_CLASSES) for f in _image_files(val / name)]
    if not pairs:
        raise SkdcgnError(f"{val}: no images")
    return pairs


def imagenet9_accuracy(model: nn.Module, root: str | Path,
                       mapping: str | Path | Mapping[str, int] | Sequence[int],
                       variants: Sequence[str] | None = None, batch_size: int = 64,
                       device: str | torch.device = "cpu",
                       preprocess: Callable[[Image.Image], Tensor] | None = None,
                       progress: bool = True) -> dict:
    """Accuracy of a 1000-class model on ImageNet-9 variants, scored as the Backgrounds Challenge does.

    `mapping`: the path of `in_to_in9.json`, its JSON object, or what `load_in9_mapping` returned.
    `variants`: names under `root` (default: every variant present; `in9_variants(root)`).
    `preprocess`: default `NO_RESIZE_PREPROCESS` (the challenge feeds its 224 x 224 images
    as they are, normalised with the ImageNet mean/std).
    The model is moved to `device` and evaluated in eval mode; its train/eval flag is restored.

    Returns {"variants": {name: {"accuracy", "correct", "images"}}, "bg_gap": acc(mixed_same) −
    acc(mixed_rand), or None unless both were evaluated}. Accuracies are fractions in [0, 1].
    """
    if isinstance(mapping, (str, Path)):
        table = torch.tensor(load_in9_mapping(mapping))
    elif isinstance(mapping, Mapping):  # the JSON object itself
        table = torch.tensor(_in9_from_json(mapping, "IN-9 mapping"))
    else:
        table = torch.tensor(_check_in9_mapping(list(mapping), "IN-9 mapping"))
    _check_batch_size(batch_size)
    names = in9_variants(root) if variants is None else list(variants)
    if not names:
        raise SkdcgnError(f"{root}: no IN-9 variants (expected {Path(root) / '<variant>' / 'val' / IN9_CLASSES[0]})")
    data = {v: in9_images(root, v) for v in names}  # check every folder before the first forward pass
    preprocess = NO_RESIZE_PREPROCESS if preprocess is None else preprocess
    dev = resolve_device(device)
    results: dict[str, dict] = {}
    with _EvalMode(model, dev) as m:
        for v, pairs in data.items():
            labels = torch.tensor([label for _, label in pairs])
            with tqdm(total=len(pairs), desc=f"IN-9 {v}", unit="img", disable=not progress, leave=False) as bar:
                preds = torch.cat([logits.argmax(1) for logits in
                                   _logits(m, [f for f, _ in pairs], preprocess, batch_size, dev, bar)])
            correct = int((table[preds] == labels).sum())  # -1 (not an IN-9 class) is never correct
            results[v] = {"accuracy": correct / len(pairs), "correct": correct, "images": len(pairs)}
    gap = (results["mixed_same"]["accuracy"] - results["mixed_rand"]["accuracy"]
           if "mixed_same" in results and "mixed_rand" in results else None)
    return {"variants": results, "bg_gap": gap}


# ---- cue-conflict shape bias ---------------------------------------------------------------------

def cue_conflict_images(root: str | Path) -> list[tuple[Path, str, str]]:
    """(image, shape category, texture category) triples; shape from the folder, texture from the name."""
    root = _folder(root, "cue-conflict")
    folders = _subfolders(root)
    for name in folders:
        if name not in CUE_CONFLICT_CATEGORIES:
            raise SkdcgnError(f"{root / name}: unknown category folder (expected the 16: "
                              f"{', '.join(CUE_CONFLICT_CATEGORIES)})")
    for name in CUE_CONFLICT_CATEGORIES:
        if name not in folders:
            raise SkdcgnError(f"{root / name}: category folder missing")
    out = []
    for shape in CUE_CONFLICT_CATEGORIES:
        for f in _image_files(root / shape):
            m = _CUE_NAME.match(f.name)
            if m is None or m.group(1) != shape or m.group(3) not in CUE_CONFLICT_CATEGORIES:
                raise SkdcgnError(f"{f}: expected a name '{shape}<i>-<texture><j>.png' with a texture "
                                  f"among the 16 categories")
            out.append((f, shape, m.group(3)))
    if not out:
        raise SkdcgnError(f"{root}: no images")
    return out


def cue_conflict_shape_bias(model: nn.Module, root: str | Path,
                            mapping: str | Path | Mapping[str, Sequence[int]], batch_size: int = 64,
                            device: str | torch.device = "cpu",
                            preprocess: Callable[[Image.Image], Tensor] | None = None,
                            progress: bool = True) -> dict:
    """Shape bias of a 1000-class model on the cue-conflict stimuli (Geirhos et al., 2019).

    `mapping`: the path of a JSON {category: [ImageNet indices]}, or what
    `load_category_mapping` returned. Decision per image: softmax over the 1000 logits, mean
    probability over each category's indices, argmax over the 16 categories (model-vs-human).
    `preprocess`: default `IMAGENET_PREPROCESS` (resize 256, centre crop 224: the CGN
    authors' cue-conflict loader); `NO_RESIZE_PREPROCESS` feeds them as model-vs-human does.

    Returns counts and ratios, following model-vs-human's ShapeBias analysis:
    images whose shape and texture category coincide are excluded from the decisions
    (`excluded`); `shape_bias` = shape / (shape + texture) decisions (None if both are 0);
    `shape_accuracy` / `texture_accuracy` = shape / texture decisions over all `images`
    (the excluded ones included in the denominator); `per_category`: shape bias by shape category.
    """
    cats = (load_category_mapping(mapping) if isinstance(mapping, (str, Path))
            else _check_category_mapping(mapping, "16-class mapping"))
    _check_batch_size(batch_size)
    triples = cue_conflict_images(root)
    preprocess = IMAGENET_PREPROCESS if preprocess is None else preprocess
    dev = resolve_device(device)
    decisions: list[str] = []
    with _EvalMode(model, dev) as m:
        with tqdm(total=len(triples), desc="cue-conflict", unit="img", disable=not progress, leave=False) as bar:
            for logits in _logits(m, [f for f, _, _ in triples], preprocess, batch_size, dev, bar):
                probs = logits.double().softmax(1)  # model-vs-human averages probabilities, not logits
                scores = torch.stack([probs[:, list(cats[c])].mean(1) for c in CUE_CONFLICT_CATEGORIES], 1)
                decisions += [CUE_CONFLICT_CATEGORIES[i] for i in scores.argmax(1).tolist()]
    per_cat = {c: [0, 0] for c in CUE_CONFLICT_CATEGORIES}  # shape, texture decisions by shape category
    excluded = 0
    for (_, shape, texture), d in zip(triples, decisions):
        if shape == texture:  # no cue conflict
            excluded += 1
        elif d == shape:
            per_cat[shape][0] += 1
        elif d == texture:
            per_cat[shape][1] += 1
    n_shape = sum(s for s, _ in per_cat.values())
    n_texture = sum(t for _, t in per_cat.values())
    return {
        "images": len(triples),
        "excluded": excluded,
        "shape_decisions": n_shape,
        "texture_decisions": n_texture,
        "shape_bias": n_shape / (n_shape + n_texture) if n_shape + n_texture else None,
        "shape_accuracy": n_shape / len(triples),
        "texture_accuracy": n_texture / len(triples),
        "per_category": {c: (s / (s + t) if s + t else None) for c, (s, t) in per_cat.items()},
    }
