"""Training the CGN invariant classifier on ImageNet: real images plus counterfactuals.

The recipe of the CGN paper (Sauer & Geiger, ICLR 2021; the authors' `imagenet/train_classifier.py`):
a ResNet-50 backbone (initialised from torchvision's ImageNet weights) with shape, texture and
background heads (`models.imagenet.InvariantEnsemble`). Each step takes `batch_size` real images
and `cf_ratio · batch_size` counterfactuals x = m(y_s)·f(y_t) + (1 − m(y_s))·b(y_b), their three
classes drawn independently. Loss = cross-entropy of the real images' class
  - on the mean of the three heads' logits (`real_loss=mean`, the authors'), or on each head
    (`real_loss=heads`): on real images every head learns the true class;
  + Σ_head cross-entropy of the head's own mechanism's class on the counterfactuals
    (shape head ← y_s, texture head ← y_t, background head ← y_b).
SGD (lr 0.1, momentum 0.9, weight decay 1e-4), batch norm kept in eval mode while training
(`freeze_bn`, as the authors do: the pretrained statistics stay), lr × 0.1 every `lr_step` steps.

Sources:
- real: any map-style dataset of (image uint8 [3, H, W], class int), e.g. `ImageFolderImages`
  (an ImageFolder tree by path, decoded with Pillow). Each sample gets a RandomResizedCrop to
  `image_size` and a horizontal flip drawn from a generator seeded by its global sample index
  (torch ops on tensors; no torchvision). Every real image has labels (c, c, c).
- counterfactuals, stored: `StoredCounterfactuals(dataset)` over any map-style dataset or iterable
  of (image uint8 or float in [-1, 1] [3, H, W], labels int64 [3] = shape, texture, background),
  e.g. the tar-shard reader or `TensorCounterfactuals`;
- counterfactuals, streamed: `StreamedCounterfactuals(cgn)` samples a CGN (teacher, students or a
  mix) on the training device inside every step, seeded by derive_seed(seed, "stream", step).

A run folder:
    checkpoint.safetensors   every `checkpoint_interval` steps (skdcgn.checkpoint): weights, SGD
                             state, step, log, RNG; a resumed run ends bitwise equal on CPU
    train_log.csv / .jsonl   step, losses, accuracies on the batch, lr, images/s
    config.json, model.safetensors   the InvariantEnsemble (`load_model`)
    manifest.json            written last: training is complete

Under `torchrun` (WORLD_SIZE > 1) it trains with DistributedDataParallel (nccl on CUDA, gloo on
the CPU): batch sizes are global, each rank takes its contiguous slice of the same seeded global
batch, rank 0 writes, all ranks resume from rank 0's checkpoint. Streamed noise is seeded per
rank, so a run is deterministic for a fixed world size (which is part of its identity).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import identity, resolve_device, setting, validate_config
from .distill.distributed import DistEnv, barrier, broadcast_state, init_distributed, wrap
from .errors import SkdcgnError
from .hashing import derive_seed, sha256_of
from .images import to_float
from .io import (MANIFEST, folder_lock, load_tensors, read_json, refuse_other_settings, sha256_file,
                 stage_complete, write_manifest)
from .models.cgn import CGN
from .models.imagenet.resnet import (HEADS, HeadLogits, InvariantEnsemble, InvariantEnsembleConfig,
                                     imagenet_normalize, resnet50_config, tiny_resnet_config)
from .models.pretrained import load_model
from .runlog import MetricsLog

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.csv"
LOG_FIELDS = ("step", "loss", "loss_real", "loss_cf", "acc_real", "acc_shape", "acc_texture", "acc_background",
              "lr", "images", "seconds")
ARCHS = {"resnet50": resnet50_config, "tiny": tiny_resnet_config}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")  # compared lower-case
_IMAGE_DTYPES = (torch.uint8, torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class EnsembleTrainConfig:
    """Settings of the invariant classifier's training (the CGN authors' recipe by default: SGD lr
    0.1, momentum 0.9, weight decay 1e-4, batch 256 real images + as many counterfactuals, frozen
    batch norm, loss on the mean logits for real images). Each field's range and unit is its
    `setting` metadata, checked by `validate` (raises `SkdcgnError` naming the field); `device`
    and `workers` are not part of the stage identity."""

    arch: str = setting("resnet50", choices=tuple(ARCHS), help="resnet50 | tiny (a few channels, for tests)")
    n_classes: int = setting(1000, lo=2, hi=100_000, unit="classes")
    image_size: int = setting(224, lo=32, hi=1024, unit="px", help="classifier input side")
    steps: int = setting(10_000, lo=1, hi=10**9, unit="steps")
    batch_size: int = setting(256, lo=1, hi=65_536, unit="images", help="real images per step (global, all ranks)")
    cf_ratio: float = setting(1.0, lo=0.0, hi=16.0, help="counterfactuals per real image in a step (0: real only)")
    lr: float = setting(0.1, lo=0.0, hi=10.0, lo_open=True, unit="per step", help="SGD learning rate")
    momentum: float = setting(0.9, lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = setting(1e-4, lo=0.0, hi=1.0)
    lr_step: int = setting(0, lo=0, hi=10**9, unit="steps", help="lr × 0.1 every this many steps (0: constant)")
    real_loss: str = setting("mean", choices=("mean", "heads"),
                             help="real images: cross-entropy of the heads' mean logits (the authors') or of each head")
    freeze_bn: bool = setting(True, help="batch norm in eval mode while training (the authors'; keeps pretrained statistics)")
    min_crop_scale: float = setting(0.08, lo=0.0, hi=1.0, lo_open=True, unit="fraction of the area",
                                    help="RandomResizedCrop's smallest crop")
    seed: int = setting(0, lo=0, hi=2**62)
    bf16: bool = setting(False, help="bf16 autocast (CUDA only)")
    checkpoint_interval: int = setting(1000, lo=1, hi=10**9, unit="steps")
    log_interval: int = setting(50, lo=1, hi=10**9, unit="steps")
    device: str = setting("auto", identity=False, help="auto | cpu | cuda[:N]")
    workers: int = setting(0, lo=0, hi=256, identity=False, unit="processes", help="DataLoader workers decoding real images")

    def validate(self) -> None:
        """Check every field's range and choice (`validate_config`) and bf16 only on CUDA; raises `SkdcgnError`."""
        validate_config(self)
        if self.bf16 and not self.device.startswith(("cuda", "auto")):
            raise SkdcgnError("bf16: autocast is only used on CUDA; set device to auto or cuda")

    def n_counterfactuals(self) -> int:
        """Counterfactuals per step (global): round(cf_ratio · batch_size)."""
        return int(round(self.cf_ratio * self.batch_size))

    def model_config(self) -> InvariantEnsembleConfig:
        """The `InvariantEnsembleConfig` of `arch` with `n_classes` heads."""
        return InvariantEnsembleConfig.from_resnet(ARCHS[self.arch](), self.n_classes)


# ---- augmentation: RandomResizedCrop + flip on tensors ----------------------------------------------

def random_resized_crop(image: Tensor, size: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> Tensor:
    """torchvision's RandomResizedCrop (+ RandomHorizontalFlip) on a tensor, every draw from `generator`.

    image: uint8 or float [C, H, W]. A box of area U(scale) · H·W and aspect ratio log-uniform in
    `ratio` (10 tries, then the centre crop of the image clamped to `ratio`), resized to size × size
    (bilinear, antialiased), flipped left-right with probability 1/2 when `flip`. Returns the
    input's dtype, [C, size, size] (uint8 rounded and clamped to [0, 255])."""
    _, h, w = image.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        r = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * r[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * r[1])
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            box = (top, left, ch, cw)
            break
    if box is None:  # torchvision's fallback: the whole image, clamped to the ratio range, centred
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    top, left, ch, cw = box
    crop = image[:, top:top + ch, left:left + cw].float()[None]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        out = out.flip(-1)
    if image.dtype == torch.uint8:
        return out.round().clamp_(0, 255).to(torch.uint8)
    return out.to(image.dtype)


# ---- real images ------------------------------------------------------------------------------------

class ImageFolderImages(Dataset):
    """An ImageFolder tree by path: `root/<class folder>/<image>` (.jpg/.jpeg/.png, any case;
    hidden files skipped; anything else refused). Labels: the class folders' sorted positions, or
    `class_index` ({folder name: class index}, e.g. ImageNet's synset → index, JSON path or dict;
    every folder must be in it). Item i: (image uint8 [3, H, W] RGB, decoded with Pillow, label int).
    Raises `SkdcgnError` for a missing root, an empty tree, a bad class index or an unreadable image."""

    def __init__(self, root: str | os.PathLike, class_index: str | os.PathLike | dict | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SkdcgnError(f"{self.root}: image folder not found")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise SkdcgnError(f"{self.root}: no class folders (expected {self.root}/<class>/<image>)")
        if class_index is None:
            index = {c: i for i, c in enumerate(classes)}
        else:
            index = read_json(class_index) if not isinstance(class_index, dict) else dict(class_index)
            for c in classes:
                v = index.get(c)
                if c not in index or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise SkdcgnError(f"class index: folder {c!r} has no class index (a non-negative integer)")
        self.classes = classes
        self.samples: list[tuple[str, int]] = []
        for c in classes:
            for p in sorted((self.root / c).iterdir()):
                if p.name.startswith("."):
                    continue
                if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
                    raise SkdcgnError(f"{p}: not an image (expected {', '.join(IMAGE_SUFFIXES)} files only)")
                self.samples.append((f"{c}/{p.name}", int(index[c])))
        if not self.samples:
            raise SkdcgnError(f"{self.root}: no images")

    @property
    def n_classes(self) -> int:
        """1 + the largest label."""
        return 1 + max(label for _, label in self.samples)

    def identity(self) -> dict:
        """What the tree is, for a stage hash: its size and a sha256 of the (relative path, label) list
        (the files' bytes are not read: 1.28 M ImageNet files)."""
        return {"images": len(self.samples),
                "files": sha256_of("\n".join(f"{p}\t{c}" for p, c in self.samples))[:16]}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        rel, label = self.samples[i]
        path = self.root / rel
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise SkdcgnError(f"{path}: unreadable image ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), label


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "order", epoch)))


class _AugmentedReal(Dataset):
    """Global sample index i → (augmented uint8 [3, S, S], label): epoch i // n of a seeded order,
    crop and flip seeded by i. Workers hold their own copy (orders cached per epoch)."""

    def __init__(self, images: Dataset, size: int, seed: int, min_scale: float) -> None:
        self.images, self.size, self.seed, self.min_scale = images, size, seed, min_scale
        self.n = len(images)  # type: ignore[arg-type]
        self._orders: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        epoch, pos = divmod(int(i), self.n)
        if epoch not in self._orders:
            self._orders = {epoch: _epoch_order(self.n, derive_seed(self.seed, "real"), epoch)}
        image, label = self.images[int(self._orders[epoch][pos])]
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise SkdcgnError(f"real image {pos}: expected uint8 [3, H, W], got "
                              f"{getattr(image, 'dtype', type(image).__name__)} {list(getattr(image, 'shape', []))}")
        g = torch.Generator().manual_seed(derive_seed(self.seed, "augment", int(i)))
        return random_resized_crop(image, self.size, g, (self.min_scale, 1.0)), int(label)


class _StepBatches:
    """Batch sampler: for each step from `start` to `steps`, this rank's contiguous slice of the
    global indices [step · B, (step + 1) · B)."""

    def __init__(self, start: int, steps: int, batch: int, env: DistEnv) -> None:
        self.start, self.steps, self.batch, self.env = start, steps, batch, env

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        per = self.batch // self.env.world_size
        for step in range(self.start, self.steps):
            first = step * self.batch + self.env.rank * per
            yield list(range(first, first + per))


# ---- counterfactual sources ---------------------------------------------------------------------------

class CounterfactualSource(Protocol):
    """Counterfactuals for the classifier's step: `batch(step, n, seed, env, device)` returns this
    rank's slice of the step's n (global) samples: (images float [n / world, 3, H, W] in [-1, 1] on
    `device`, labels int64 [n / world, 3] = shape, texture, background class, on the CPU: checked
    there without waiting for the device); `identity()` says what the source is, for the stage hash."""

    def batch(self, step: int, n: int, seed: int, env: DistEnv, device: torch.device) -> tuple[Tensor, Tensor]: ...

    def identity(self) -> dict: ...


def _check_cf(image: Any, labels: Any, where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3 or image.dtype not in _IMAGE_DTYPES:
        raise SkdcgnError(f"counterfactual {where}: expected an image uint8 or float [3, H, W], got "
                          f"{getattr(image, 'dtype', type(image).__name__)} {list(getattr(image, 'shape', []))}")
    labels = torch.as_tensor(labels)
    if labels.dtype != torch.int64 or labels.shape != (3,):
        raise SkdcgnError(f"counterfactual {where}: expected labels int64 [3] (shape, texture, background), got "
                          f"{labels.dtype} {list(labels.shape)}")
    return image, labels


class TensorCounterfactuals(Dataset):
    """Stored counterfactuals in memory: images uint8 [N, 3, H, W] (or float in [-1, 1]) and labels
    int64 [N, 3] (shape, texture, background class). Raises `SkdcgnError` for other shapes."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4 or labels.shape != (len(images), 3) or labels.dtype != torch.int64:
            raise SkdcgnError(f"counterfactuals: expected images [N, 3, H, W] and labels int64 [N, 3], got "
                              f"{list(images.shape)} and {labels.dtype} {list(labels.shape)}")
        if len(images) == 0:
            raise SkdcgnError("counterfactuals: no samples")
        self.images, self.labels = images, labels

    def identity(self) -> dict:
        """sha256 of the images and labels (dtype, shape and bytes)."""
        return {"samples": len(self.labels),
                "data": sha256_of(f"{self.images.dtype}{list(self.images.shape)}", self.images, self.labels)[:16]}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.images[i], self.labels[i]


def load_counterfactual_tensors(path: str | os.PathLike) -> TensorCounterfactuals:
    """A safetensors file with `images` (uint8 [N, 3, H, W]) and `labels` (int64 [N, 3]) as a
    `TensorCounterfactuals`; one-line `SkdcgnError` for a missing key or wrong shape."""
    t = load_tensors(path)
    if set(t) != {"images", "labels"}:
        raise SkdcgnError(f"{path}: expected the tensors 'images' and 'labels', found {sorted(t)}")
    return TensorCounterfactuals(t["images"], t["labels"])


def _resize(images: Tensor, size: int) -> Tensor:
    """Float images [N, 3, H, W] → [N, 3, size, size] (bilinear, antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=images.shape[-1] > size).clamp_(-1, 1)


class StoredCounterfactuals:
    """Stored counterfactuals from `dataset`: a map-style dataset (`__len__` + `__getitem__`), read in
    a seeded order per epoch (sample i of the run: epoch i // N), or any iterable, read in its own
    order (a resumed run re-reads and skips the samples already used: exact when the iterable
    repeats itself, e.g. shards read in a fixed order). Items: (image uint8 or float in [-1, 1]
    [3, H, W], labels int64 [3]); images are resized to the classifier's input size.
    `identity`: what the data is, for the stage hash (default: the dataset's own `identity()` if
    it has one, else its type and length)."""

    def __init__(self, dataset: Dataset | Iterable, size: int, identity: dict | None = None) -> None:
        self.dataset, self.size = dataset, size
        self.indexed = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        if self.indexed and len(dataset) == 0:  # type: ignore[arg-type]
            raise SkdcgnError("counterfactuals: no samples")
        self._identity = identity
        self._iter: Any = None
        self._consumed = 0
        self._orders: dict[int, Tensor] = {}

    def identity(self) -> dict:
        """The data's identity (see the class doc)."""
        if self._identity is not None:
            return self._identity
        if hasattr(self.dataset, "identity"):
            return {"stored": self.dataset.identity()}  # type: ignore[union-attr]
        return {"stored": type(self.dataset).__name__, "samples": len(self.dataset) if self.indexed else None}  # type: ignore[arg-type]

    def _item(self, i: int, seed: int) -> tuple[Tensor, Tensor]:
        if self.indexed:
            n = len(self.dataset)  # type: ignore[arg-type]
            epoch, pos = divmod(i, n)
            if epoch not in self._orders:
                self._orders = {epoch: _epoch_order(n, derive_seed(seed, "counterfactuals"), epoch)}
            return _check_cf(*self.dataset[int(self._orders[epoch][pos])], f"{pos}")  # type: ignore[index]
        if self._iter is None or i < self._consumed:
            self._iter, self._consumed = iter(self.dataset), 0
        while self._consumed < i:  # a resumed run: skip what the steps before it used
            next(self._iter)
            self._consumed += 1
        try:
            item = next(self._iter)
        except StopIteration:
            raise SkdcgnError(f"counterfactuals: the iterable ended after {i} samples") from None
        self._consumed += 1
        return _check_cf(*item, f"{i}")

    def batch(self, step: int, n: int, seed: int, env: DistEnv, device: torch.device) -> tuple[Tensor, Tensor]:
        """This rank's slice of step `step`'s n samples (see `CounterfactualSource`)."""
        per = n // env.world_size
        first = step * n + env.rank * per
        if not self.indexed:  # an iterable is read in full by every rank; each keeps its slice
            items = [self._item(step * n + j, seed) for j in range(n)][env.rank * per:(env.rank + 1) * per]
        else:
            items = [self._item(first + j, seed) for j in range(per)]
        labels = torch.stack([y for _, y in items])
        if len({(x.dtype, tuple(x.shape)) for x, _ in items}) == 1:  # one batch: converted and resized on the device
            return _resize(to_float(torch.stack([x for x, _ in items]).to(device, non_blocking=True)), self.size), labels
        images = torch.stack([_resize(to_float(x)[None], self.size)[0] for x, _ in items])
        return images.to(device, non_blocking=True), labels


class StreamedCounterfactuals:
    """Counterfactuals sampled from `cgn` (teacher, students or a hybrid) inside every step, on the
    CGN's device. Step s: the global batch's classes (y_shape, y_texture, y_background), each
    uniform over the CGN's classes and independent, from a generator seeded by
    derive_seed(seed, "stream", s); this rank's slice of them is sampled with noise from
    derive_seed(seed, "stream", s, rank) (`CGN.sample`) and resized to `size` (bilinear,
    antialiased). Images float in [-1, 1], labels int64 [n, 3]. `autocast`: a context manager the
    sampling runs under (e.g. bf16 autocast on CUDA)."""

    def __init__(self, cgn: CGN, size: int, identity: dict | None = None) -> None:
        self.cgn, self.size = cgn.eval(), size
        self._identity = identity
        self.autocast: Callable[[], Any] = contextlib.nullcontext

    def identity(self) -> dict:
        """The CGN's identity: a sha256 of its weights (or the `identity` given)."""
        if self._identity is None:
            from .io import tensor_digest

            self._identity = {"streamed": tensor_digest({k: v for k, v in self.cgn.state_dict().items()})[:16],
                              "classes": self.cgn.n_classes}
        return self._identity

    @torch.no_grad()
    def batch(self, step: int, n: int, seed: int, env: DistEnv, device: torch.device) -> tuple[Tensor, Tensor]:
        """This rank's slice of step `step`'s n samples (see `CounterfactualSource`)."""
        g = torch.Generator().manual_seed(derive_seed(seed, "stream", step))
        y = torch.randint(0, self.cgn.n_classes, (n, 3), generator=g)
        per = n // env.world_size
        y = y[env.rank * per:(env.rank + 1) * per]
        noise = torch.Generator().manual_seed(derive_seed(seed, "stream", step, env.rank))
        with self.autocast():
            x = self.cgn.sample(y[:, 0], y[:, 1], y[:, 2], generator=noise).composite
        x = _resize(x.float(), self.size)
        return x.to(device, non_blocking=True), y


# ---- training ---------------------------------------------------------------------------------------

def ensemble_stage(config: EnsembleTrainConfig, real: Dataset, counterfactuals: CounterfactualSource | None,
                   backbone: str | os.PathLike | None, env: DistEnv) -> dict:
    """What a trained classifier is (hashed into its checkpoint and manifest): the config's identity,
    the real images', the counterfactuals', the backbone file's sha256 and the world size."""
    real_id = real.identity() if hasattr(real, "identity") else {"real": type(real).__name__, "images": len(real)}  # type: ignore[arg-type]
    return {"stage": "imagenet_classifier", "train": identity(config), "real": real_id,
            "counterfactuals": counterfactuals.identity() if counterfactuals is not None and config.cf_ratio > 0 else None,
            "backbone": sha256_file(backbone)[:16] if backbone else None, "world_size": env.world_size}


def train_ensemble(real: Dataset, counterfactuals: CounterfactualSource | None, config: EnsembleTrainConfig,
                   out_dir: str | os.PathLike | None = None, *, backbone: str | os.PathLike | None = None,
                   progress: bool = True, stop_after: int | None = None, overwrite: bool = False,
                   on_step: Callable[[int], None] | None = None) -> InvariantEnsemble | None:
    """Train (or resume, or skip when finished) the CGN invariant classifier; see the module doc.

    real: a dataset of (uint8 [3, H, W], class int in [0, n_classes)), e.g. `ImageFolderImages`.
    counterfactuals: a `CounterfactualSource` (`StoredCounterfactuals`, `StreamedCounterfactuals`),
    or None with cf_ratio 0. backbone: a torchvision-layout ResNet file to start from
    (`load_torchvision_resnet`; its sha256 is part of the stage). out_dir: the run folder (None:
    train in memory, nothing written). stop_after: end after this many steps as a kill would
    (tests; returns None). on_step(step): called after every optimizer step (benchmarks).
    overwrite: replace a run in `out_dir` made with other settings (else a one-line refusal).
    Returns the trained `InvariantEnsemble` in eval mode (every rank holds rank 0's weights).
    Raises `SkdcgnError` for bad settings, bad data, a batch not divisible by WORLD_SIZE, an
    unusable checkpoint or a folder of other settings."""
    env, _ = init_distributed(resolve_device(config.device))
    if out_dir is None or env.enabled:  # the ranks write one folder together (rank 0 its files)
        return _train(real, counterfactuals, config, None if out_dir is None else Path(out_dir), backbone, progress,
                      stop_after, overwrite, on_step)
    with folder_lock(out_dir):
        return _train(real, counterfactuals, config, Path(out_dir), backbone, progress, stop_after, overwrite, on_step)


def _recorded(out: Path, state: dict | None) -> dict | None:
    if (out / MANIFEST).is_file():
        rec = read_json(out / MANIFEST).get("config")
        return rec if isinstance(rec, dict) else {}
    return None if state is None else state["stage"]


def _train(real: Dataset, cf: CounterfactualSource | None, config: EnsembleTrainConfig, out: Path | None,
           backbone: str | os.PathLike | None, progress: bool, stop_after: int | None, overwrite: bool,
           on_step: Callable[[int], None] | None) -> InvariantEnsemble | None:
    config.validate()
    env, device = init_distributed(resolve_device(config.device))
    n_cf = config.n_counterfactuals()
    if n_cf and cf is None:
        raise SkdcgnError(f"cf_ratio: {config.cf_ratio} asks for counterfactuals, but no source was given")
    for name, n in (("batch_size", config.batch_size), ("counterfactuals per step", n_cf)):
        if n % env.world_size:
            raise SkdcgnError(f"{name}: {n} (global) is not divisible by WORLD_SIZE={env.world_size}")
    if len(real) == 0:  # type: ignore[arg-type]
        raise SkdcgnError("real images: none")
    stage = ensemble_stage(config, real, cf, backbone, env)
    if out is not None and stage_complete(out, stage):
        return load_model(out).to(device)  # type: ignore[return-value]
    ckpt = out / CHECKPOINT if out is not None else None
    state = load_checkpoint(ckpt) if ckpt is not None and ckpt.is_file() else None
    if out is not None and refuse_other_settings(out, "a classifier", _recorded(out, state), stage, overwrite):
        if env.is_main:
            for name in (MANIFEST, CHECKPOINT, LOG, "train_log.jsonl", "model.safetensors", "config.json"):
                (out / name).unlink(missing_ok=True)
        barrier(env)
        state = None

    torch.manual_seed(derive_seed(config.seed, "init"))
    model = InvariantEnsemble(config.model_config())
    if backbone:
        model.load_backbone(backbone)
    model.to(device)
    if device.type == "cuda":  # the fast layout for convolutions under cuDNN; the same weights
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    step, rows, elapsed = 0, [], 0.0
    if state is not None:
        try:
            step, rows, elapsed = int(state["step"]), [dict(r) for r in state["rows"]], float(state["elapsed"])
            if not 0 <= step <= config.steps:
                raise ValueError(f"step {step} is outside [0, {config.steps}]")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optim"])
            set_rng_state(state["rng"], device)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise SkdcgnError(f"{ckpt}: not a usable checkpoint for this run ({first}); delete it to start over") from None
        logger.info("resuming %s at step %d", out, step)
    net: nn.Module = wrap(model, env, device) if env.enabled else model
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if config.bf16 and device.type == "cuda"
                else contextlib.nullcontext)
    if isinstance(cf, StreamedCounterfactuals):
        cf.cgn.to(device)
        cf.autocast = autocast
    metrics = MetricsLog(out / LOG, LOG_FIELDS, "step", resumed_at=step) if out is not None and env.is_main else None
    loader = DataLoader(_AugmentedReal(real, config.image_size, config.seed, config.min_crop_scale),
                        batch_sampler=_StepBatches(step, config.steps, config.batch_size, env),
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    sums = torch.zeros(8, dtype=torch.float64, device=device)  # loss, real, cf, acc real/shape/texture/bg, count
    bar = tqdm(total=config.steps, initial=step, desc="classifier", unit="step", disable=not (progress and env.is_main),
               dynamic_ncols=True)
    t_start = time.perf_counter() - elapsed
    images_per_step = config.batch_size + n_cf
    for x_real, y_real in loader:
        lr = config.lr * (0.1 ** (step // config.lr_step) if config.lr_step else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        if config.freeze_bn:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if int(y_real.max()) >= config.n_classes or int(y_real.min()) < 0:  # on the CPU: no wait for the device
            raise SkdcgnError(f"real image classes must lie in [0, {config.n_classes}); found {int(y_real.max())}")
        x = to_float(x_real.to(device, non_blocking=True))
        y = y_real.to(device, non_blocking=True)
        b = len(y)
        if n_cf:
            x_cf, y_cf = cf.batch(step, n_cf, config.seed, env, device)  # type: ignore[union-attr]
            if int(y_cf.max()) >= config.n_classes or int(y_cf.min()) < 0:
                raise SkdcgnError(f"counterfactual classes must lie in [0, {config.n_classes})")
            x = torch.cat([x, x_cf.float()])
            y_cf = y_cf.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out_ = net(imagenet_normalize(x))
            logits = {h: getattr(out_, h).float() for h in (*HEADS, "mean")}
            if config.real_loss == "mean":
                loss_real = F.cross_entropy(logits["mean"][:b], y)
            else:
                loss_real = sum(F.cross_entropy(logits[h][:b], y) for h in HEADS)
            loss_cf = (sum(F.cross_entropy(logits[h][b:], y_cf[:, k]) for k, h in enumerate(HEADS))
                       if n_cf else torch.zeros((), device=device))
            loss = loss_real + loss_cf
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        with torch.no_grad():
            acc = [(logits["mean"][:b].argmax(1) == y).double().mean()]
            acc += [(logits[h][b:].argmax(1) == y_cf[:, k]).double().mean() if n_cf else torch.zeros((), device=device)
                    for k, h in enumerate(HEADS)]
            sums += torch.stack([loss.detach().double(), loss_real.detach().double(), torch.as_tensor(loss_cf).detach().double(),
                                 *acc, torch.ones((), dtype=torch.float64, device=device)])
        bar.update(1)
        if on_step is not None:
            on_step(step)
        if step % config.log_interval == 0 or step == config.steps:
            s = (sums / sums[-1]).tolist()
            rows.append({"step": step, **dict(zip(LOG_FIELDS[1:8], s[:7])), "lr": lr, "images": step * images_per_step,
                         "seconds": round(time.perf_counter() - t_start, 3)})
            bar.set_postfix(loss=f"{s[0]:.3f}", acc=f"{s[3]:.3f}")
            sums.zero_()
        if out is not None and (step % config.checkpoint_interval == 0 or step == config.steps):
            if env.is_main:
                save_checkpoint(ckpt, {"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "rows": rows,
                                       "elapsed": time.perf_counter() - t_start, "rng": rng_state(device)}, stage)
                metrics.write(rows)  # type: ignore[union-attr]
            barrier(env)
        if stop_after is not None and step >= stop_after and step < config.steps:
            bar.close()
            return None
    bar.close()
    model.eval()
    broadcast_state(model, env)
    if out is not None and env.is_main:
        metrics.write(rows)  # type: ignore[union-attr]
        metrics.close()  # type: ignore[union-attr]
        model.save_pretrained(out)
        write_manifest(out, stage, files=("config.json", "model.safetensors"), n_params=model.get_num_params(),
                       steps=step, train_seconds=round(time.perf_counter() - t_start, 2),
                       final=rows[-1] if rows else None)
    barrier(env)
    return model


# ---- evaluation beside the paper ------------------------------------------------------------------

# The CGN paper's numbers for its IN + CGN classifier (Sauer & Geiger, ICLR 2021, as printed in
# Bagad et al., ReScience C 2022, Tables 4 and 5; see docs/imagenet_ood.md), in percent.
PAPER_IN9 = {"original": 94.2, "mixed_same": 83.4, "mixed_rand": 80.1, "bg_gap": 3.3}
PAPER_SHAPE_BIAS = {"shape": 54.8, "texture": 16.7, "background": 22.9}
PAPER_TOP1 = 74.0
PAPER_SOURCE = "CGN paper (Sauer & Geiger, ICLR 2021), IN + CGN, as quoted by Bagad et al. 2022"


def load_ensemble(folder: str | os.PathLike) -> InvariantEnsemble:
    """The `InvariantEnsemble` a training run (or `save_pretrained`) wrote to `folder`; one-line
    `SkdcgnError` when it holds something else or files changed since its manifest."""
    return InvariantEnsemble.from_pretrained(folder)


def evaluate_in9(ensemble: InvariantEnsemble, root: str | os.PathLike, mapping: str | os.PathLike,
                 heads: Iterable[str] = ("mean",), **kwargs: Any) -> dict:
    """ImageNet-9 accuracies and BG-gap (`metrics.ood.imagenet9_accuracy`, fractions in [0, 1]) of
    each readout in `heads` (`models.imagenet.resnet.READOUTS`: "shape", "texture", "background",
    "mean", "shape_texture", the last the authors' BG-gap readout); kwargs go to the scorer
    (variants, batch_size, device, preprocess, progress). Returns {readout: result}."""
    from .metrics.ood import imagenet9_accuracy

    return {h: imagenet9_accuracy(HeadLogits(ensemble, h), root, mapping, **kwargs) for h in heads}


def evaluate_cue_conflict(ensemble: InvariantEnsemble, root: str | os.PathLike, mapping: str | os.PathLike,
                          heads: Iterable[str] = (*HEADS, "mean"), **kwargs: Any) -> dict:
    """Cue-conflict shape bias (`metrics.ood.cue_conflict_shape_bias`) of each head in `heads`, as
    the CGN authors score each head on the shared backbone. Returns {head: result}."""
    from .metrics.ood import cue_conflict_shape_bias

    return {h: cue_conflict_shape_bias(HeadLogits(ensemble, h), root, mapping, **kwargs) for h in heads}


def in9_table(results: dict) -> str:
    """A markdown table of `evaluate_in9`'s results in percent, one row per head, beside the paper's row."""
    cols = ("original", "mixed_same", "mixed_rand")
    lines = ["| classifier | IN-9 (original) | Mixed-Same | Mixed-Rand | BG-gap |", "|---|---:|---:|---:|---:|"]
    for head, r in results.items():
        v = r["variants"]
        cells = [f"{100 * v[c]['accuracy']:.1f}" if c in v else "–" for c in cols]
        gap = f"{100 * r['bg_gap']:.1f}" if r["bg_gap"] is not None else "–"
        lines.append(f"| this classifier, {head} | {' | '.join(cells)} | {gap} |")
    lines.append(f"| {PAPER_SOURCE} | {' | '.join(f'{PAPER_IN9[c]:.1f}' for c in cols)} | {PAPER_IN9['bg_gap']:.1f} |")
    return "\n".join(lines)


def cue_conflict_table(results: dict) -> str:
    """A markdown table of `evaluate_cue_conflict`'s shape biases in percent beside the paper's per head."""
    lines = ["| head | shape bias | shape / texture decisions | paper |", "|---|---:|---:|---:|"]
    for head, r in results.items():
        sb = f"{100 * r['shape_bias']:.1f}" if r["shape_bias"] is not None else "–"
        paper = f"{PAPER_SHAPE_BIAS[head]:.1f}" if head in PAPER_SHAPE_BIAS else "–"
        lines.append(f"| {head} | {sb} | {r['shape_decisions']} / {r['texture_decisions']} | {paper} |")
    lines.append(f"\npaper: {PAPER_SOURCE}; its ImageNet top-1 of the whole classifier: {PAPER_TOP1:.1f}")
    return "\n".join(lines)
