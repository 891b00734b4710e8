"""Counterfactual datasets on disk: sample a CGN (teacher or students), compose, store.

Each shape sample (one mask of class `y`) is composed with `per_shape` foreground/background
pairs whose classes are drawn independently and uniformly; the label is always the shape's class
`y` (the CGN recipe: 100,000 images, 10 per shape). `counterfactual=False` ties all three
mechanisms to the shape's class (the "samples without counterfactuals" baseline).

On disk (one folder):
    shard_00000.safetensors …   images uint8 [S, 3, H, W], labels / y_fg / y_bg int64 [S]
    preview.png                  rows: shape samples; columns: their counterfactuals
    progress.json                the settings being generated (written first)
    manifest.json                written last: the dataset is complete

Shard `i` is generated from its own generator, seeded from (seed, i), so an interrupted run
resumes with the missing shards and produces exactly the files of an uninterrupted one.

Streamed counterfactuals (`CounterfactualStream`): the same recipe sampled inside the classifier's
training step instead of stored. Batch `s` is a pure function of (seed, s): drawn from a generator
seeded with `derive_seed(seed, "stream", s)`, so a resumed run draws exactly what an uninterrupted
one does, and nothing but the step counter is state. Nothing is written to disk.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .compose import COMPOSERS, compose_variant
from .errors import SkdcgnError
from .hashing import derive_seed, sha256_of
from .grids import image_grid, save_png
from .images import to_float, to_uint8
from .models.sampling import SAMPLER_MODES, CGNSampler, resolve_sampler_mode
from .io import (MANIFEST, confined, config_hash, folder_lock, load_tensors, read_json,
                 recorded_digests, refuse_other_settings, save_tensors, sha256_file, stage_complete, tensor_file_metadata,
                 verify_file, write_json, write_manifest)

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"
PREVIEW = "preview.png"
SHARD_PATTERN = "shard_{:05d}.safetensors"


def weights_hash(module: torch.nn.Module) -> str:
    """A short hash of a module's parameters and buffers (identifies the CGN in the manifest)."""
    return sha256_of(*(part for k, v in sorted(module.state_dict().items()) for part in (k, v)))[:16]


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SkdcgnError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


@torch.no_grad()
def sample_counterfactuals(cgn, n_shapes: int, per_shape: int, composer: str, counterfactual: bool,
                           generator: torch.Generator, sampler: CGNSampler | None = None) -> dict[str, Tensor]:
    """The recipe of one batch of counterfactuals (Sauer & Geiger, ICLR 2021, CGN-MNIST): `n_shapes`
    masks of uniformly drawn shape classes, each composed with `per_shape` foreground/background
    pairs whose classes are drawn independently and uniformly (`counterfactual=False`: the shape's
    class for all three mechanisms), with the study variant `composer`.

    Every draw comes from `generator` (a CPU generator), in the order: shape classes, shape noise
    (and shift), foreground classes, background classes, foreground noise, background noise,
    composer. Returns {"images": float [n_shapes · per_shape, 3, H, W] in [-1, 1] on the CGN's
    device, "labels" (the shape classes, what a classifier learns), "y_fg", "y_bg": int64
    [n_shapes · per_shape] on the CPU}. The stored datasets and the stream both sample this way.

    sampler: a `models.sampling.CGNSampler` of this CGN and `per_shape` (its forward compiled or
    captured in a CUDA graph): the same draws in the same order, the mechanisms run through it
    (equal within float tolerance; bitwise in its "eager" mode on the CPU). None: `cgn` directly.
    """
    if sampler is not None:
        return _sample_counterfactuals_with(sampler, n_shapes, per_shape, composer, counterfactual, generator)
    k = cgn.n_classes
    y_shape = torch.randint(k, (n_shapes,), generator=generator)
    mask = cgn.run_mechanism("shape", y_shape, generator)       # [n_shapes, 1, H, W]
    y = y_shape.repeat_interleave(per_shape)                     # [n_shapes · per_shape]
    if counterfactual:
        y_fg = torch.randint(k, (len(y),), generator=generator)  # independent of y and of each other
        y_bg = torch.randint(k, (len(y),), generator=generator)
    else:
        y_fg, y_bg = y, y
    fg = cgn.run_mechanism("foreground", y_fg, generator)        # [n_shapes · per_shape, 3, H, W]
    bg = cgn.run_mechanism("background", y_bg, generator)
    x = compose_variant(composer, mask.repeat_interleave(per_shape, 0), fg, bg, generator)
    return {"images": x, "labels": y, "y_fg": y_fg.cpu(), "y_bg": y_bg.cpu()}


def _sample_counterfactuals_with(sampler: CGNSampler, n_shapes: int, per_shape: int, composer: str,
                                 counterfactual: bool, generator: torch.Generator) -> dict[str, Tensor]:
    """`sample_counterfactuals` through a sampler: every draw first, in the recipe's order, then one
    call of the sampler's forward (the standard composite comes out of it; a study variant is
    composed afterwards from its mask, foreground and background, drawing from `generator` last)."""
    if sampler.per_shape != per_shape:
        raise SkdcgnError(f"sampler: made for per_shape {sampler.per_shape}, the recipe has {per_shape}")
    k = sampler.cgn.n_classes
    y_shape = torch.randint(k, (n_shapes,), generator=generator)
    noise = {"shape": sampler.draw("shape", n_shapes, generator)}
    y = y_shape.repeat_interleave(per_shape)
    if counterfactual:
        y_fg = torch.randint(k, (len(y),), generator=generator)
        y_bg = torch.randint(k, (len(y),), generator=generator)
    else:
        y_fg, y_bg = y, y
    noise["foreground"] = sampler.draw("foreground", len(y), generator)
    noise["background"] = sampler.draw("background", len(y), generator)
    out = sampler.run(y_shape, y_fg, y_bg, noise)
    x = out.composite if composer == "standard" else \
        compose_variant(composer, out.mask.repeat_interleave(per_shape, 0), out.foreground, out.background, generator)
    return {"images": x, "labels": y, "y_fg": y_fg.cpu(), "y_bg": y_bg.cpu()}


def make_sampler(cgn, mode: str, batch_shapes: int, per_shape: int) -> CGNSampler | None:
    """The `CGNSampler` that makes this module's counterfactuals in bulk for `mode` (one of
    `models.sampling.SAMPLER_MODES`) on the CGN's device, or None where `mode` resolves to
    "eager" (the CGN is then called directly, as it always was: the CPU bytes of every stored set
    and stream stay those of `CGN.run_mechanism`). Its fixed batch is `batch_shapes` masks of
    `per_shape` composites (at most 2²⁰ composites; larger calls are chunked). Raises
    `SkdcgnError` for an unknown mode or "graph" off CUDA."""
    if resolve_sampler_mode(mode, cgn.device) == "eager":
        return None
    shapes = max(1, min(batch_shapes, 2**20 // per_shape))
    sampler = CGNSampler(cgn, shapes * per_shape, mode, per_shape=per_shape)
    logger.info(f"counterfactuals: sampling through {sampler}")
    return sampler


@torch.no_grad()
def _generate_shard(cgn, n_images: int, per_shape: int, seed: int, shard: int, composer: str,
                    counterfactual: bool, batch_shapes: int, sampler: CGNSampler | None = None) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(derive_seed(seed, "shard", shard))
    n_shapes = math.ceil(n_images / per_shape)
    out: dict[str, list[Tensor]] = {"images": [], "labels": [], "y_fg": [], "y_bg": []}
    for start in range(0, n_shapes, batch_shapes):
        part = sample_counterfactuals(cgn, min(batch_shapes, n_shapes - start), per_shape, composer, counterfactual, g,
                                      sampler)
        part["images"] = to_uint8(part["images"])
        for name, t in part.items():
            out[name].append(t)
    return {name: torch.cat(ts)[:n_images].contiguous() for name, ts in out.items()}


def _clear(out_dir: Path) -> None:
    """Remove the files this module writes (and nothing else)."""
    for p in out_dir.glob("shard_*.safetensors"):
        p.unlink()
    for name in (PREVIEW, PROGRESS, MANIFEST):
        (out_dir / name).unlink(missing_ok=True)


def generate_counterfactuals(cgn, out_dir: str | os.PathLike, n: int, per_shape: int = 10, seed: int = 0,
                             composer: str = "standard", counterfactual: bool = True, *,
                             shard_size: int = 10_000, batch_shapes: int = 100, cgn_name: str | None = None,
                             overwrite: bool = False, progress: bool = True, sampler: str = "auto") -> Path:
    """Write a counterfactual dataset of `n` images to `out_dir` (resumable); return `out_dir`.

    cgn: any `CGN` (teacher or students), used in eval mode on its own device.
    per_shape: images per mask (each with its own random foreground/background classes).
    composer: a study variant of `compose.compose_variant`, seeded like everything else.
    shard_size: images per shard file (rounded down to a multiple of `per_shape`).
    batch_shapes: masks sampled per forward pass (part of the seeded recipe).
    overwrite: replace a dataset in `out_dir` made with other settings (otherwise an error).
    sampler: how the CGN's forward runs (`models.sampling`): "auto" (a CUDA graph on a GPU, eager
    on the CPU), "eager", "compile" or "graph". Like the device, not part of the dataset's identity:
    the draws are the same, the images equal within float tolerance (on the CPU, "auto" is eager
    and the bytes are those of every earlier version); the mode used is logged.
    """
    n = _check_int("n", n, 1, 100_000_000)
    per_shape = _check_int("per_shape", per_shape, 1, 10_000)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    shard_size = _check_int("shard_size", shard_size, 1, 10_000_000)
    batch_shapes = _check_int("batch_shapes", batch_shapes, 1, 1_000_000)
    if composer not in COMPOSERS:
        raise SkdcgnError(f"unknown composer {composer!r}; choose one of: {', '.join(COMPOSERS)}")
    resolve_sampler_mode(sampler, cgn.device)  # a bad mode is one line before anything is written
    out_dir = Path(out_dir)
    shard_size = max(per_shape, shard_size // per_shape * per_shape)
    n_shards = math.ceil(n / shard_size)
    config = {"stage": "counterfactuals", "cgn_weights": weights_hash(cgn), "n": n, "per_shape": per_shape,
              "seed": seed, "composer": composer, "counterfactual": bool(counterfactual),
              "shard_size": shard_size, "batch_shapes": batch_shapes}
    with folder_lock(out_dir):  # two processes never write one dataset at once
        if stage_complete(out_dir, config):
            return out_dir
        recorded: dict[str, str] = {}  # shard digests of a finished dataset of this config: a changed shard is rewritten
        for marker in (MANIFEST, PROGRESS):
            path = out_dir / marker
            if path.is_file():
                record = read_json(path)
                old = record.get("config", {})
                if refuse_other_settings(out_dir, "a dataset", old, config, overwrite):
                    _clear(out_dir)
                    break
                if marker == MANIFEST:
                    recorded = recorded_digests(record)
        write_json(out_dir / PROGRESS, {"config": config, "cgn": cgn_name})

        cgn.eval()
        t0 = time.perf_counter()
        shards, chash = [], config_hash(config)
        fast: list[CGNSampler | None] = []  # built (compiled / captured) at the first shard to write
        bar = tqdm(total=n, desc="counterfactuals", unit="img", disable=not progress, dynamic_ncols=True)
        for i in range(n_shards):
            count = min(shard_size, n - i * shard_size)
            path = out_dir / SHARD_PATTERN.format(i)
            tag = {"config_hash": chash, "shard": str(i)}
            digest = sha256_file(path) if path.is_file() else None
            if recorded.get(path.name, digest) != digest or not _shard_ok(path, count, tag):
                # shards are atomic: a tagged one is complete, unless it changed after the manifest recorded it
                if not fast:
                    fast.append(make_sampler(cgn, sampler, batch_shapes, per_shape))
                tensors = _generate_shard(cgn, count, per_shape, seed, i, composer, counterfactual, batch_shapes,
                                          fast[0])
                save_tensors(path, tensors, metadata=tag)
                digest = sha256_file(path)
            shards.append({"file": path.name, "count": count, "sha256": digest})
            bar.update(count)
        bar.close()
        _finish(out_dir, config, shards, cgn, cgn_name, per_shape, counterfactual, composer, t0)
    return out_dir


def _finish(out_dir: Path, config: dict, shards: list[dict], cgn, cgn_name: str | None, per_shape: int,
            counterfactual: bool, composer: str, t0: float) -> None:
    """The preview, then the manifest (last): the dataset is complete."""
    first = load_tensors(out_dir / shards[0]["file"])
    rows = min(10, math.ceil(shards[0]["count"] / per_shape))
    cols = min(per_shape, 10)
    idx = torch.tensor([r * per_shape + c for r in range(rows) for c in range(cols)
                        if r * per_shape + c < shards[0]["count"]])
    title = f"{'counterfactuals' if counterfactual else 'samples'} ({composer}): one shape per row"
    save_png(image_grid(to_float(first["images"][idx]), cols, title=title,
                        row_labels=[str(int(first["labels"][r * per_shape])) for r in range(rows)]), out_dir / PREVIEW)

    labels = torch.cat([load_tensors(out_dir / s["file"])["labels"] for s in shards])
    write_manifest(out_dir, config, cgn=cgn_name, shards=shards, n_classes=cgn.n_classes,
                   image_shape=list(first["images"].shape[1:]), preview=PREVIEW,
                   label_counts=torch.bincount(labels, minlength=cgn.n_classes).tolist(),
                   seconds=round(time.perf_counter() - t0, 2))


def _shard_ok(path: Path, count: int, tag: dict[str, str]) -> bool:
    """Shard `tag["shard"]` of this dataset's recipe, whole: a foreign or damaged file is rewritten."""
    if tensor_file_metadata(path) != tag:
        return False
    try:
        t = load_tensors(path)
    except SkdcgnError:
        return False
    return set(t) == {"images", "labels", "y_fg", "y_bg"} and len(t["labels"]) == count


def load_image_dataset(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, with_classes: bool = False
                       ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(images [N, 3, H, W], labels int64 [N]) of a complete dataset written by this module.

    dtype: float32 (in [-1, 1], the default) or uint8 (as stored, 4× smaller).
    with_classes: also return (y_fg, y_bg), the texture classes each image was composed with.
    Every shard is validated (keys, dtypes, shapes, label range) and must lie inside `folder`,
    must have the sha256 the manifest records for it (when it records one), and may be listed
    only once; the counts must add up to the manifest's `n`. Raises SkdcgnError naming the file.
    """
    folder = Path(folder)
    if dtype not in (torch.float32, torch.uint8):
        raise SkdcgnError(f"dtype: expected torch.float32 or torch.uint8, got {dtype}")
    if not folder.is_dir():
        raise SkdcgnError(f"{folder}: no such folder")
    if not (folder / MANIFEST).is_file():
        raise SkdcgnError(f"{folder}: no {MANIFEST}; not a dataset, or its generation did not finish (run it again to resume)")
    manifest = read_json(folder / MANIFEST)
    shards, k = manifest.get("shards"), manifest.get("n_classes")
    if isinstance(shards, list) and any(isinstance(s, dict) and str(s.get("file", "")).endswith(".tar") for s in shards):
        raise SkdcgnError(f"{folder}: a tar set (`skdcgn counterfactuals --format tar`, read by skdcgn.data.shards); "
                          "this needs a safetensors counterfactual set")
    if not isinstance(shards, list) or not shards or not isinstance(k, int) or k < 1:
        raise SkdcgnError(f"{folder / MANIFEST}: expected a non-empty 'shards' list and 'n_classes'")
    parts: dict[str, list[Tensor]] = {"images": [], "labels": [], "y_fg": [], "y_bg": []}
    image_shape = None
    seen: set[Path] = set()
    total = manifest.get("config", {}).get("n") if isinstance(manifest.get("config"), dict) else None
    counts = [s.get("count") if isinstance(s, dict) else None for s in shards]
    if isinstance(total, int) and all(isinstance(c, int) for c in counts) and sum(counts) != total:
        raise SkdcgnError(f"{folder / MANIFEST}: its shards hold {sum(counts)} images, its config says n = {total}")
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not isinstance(s.get("count"), int):
            raise SkdcgnError(f"{folder / MANIFEST}: malformed shard entry {s!r}")
        path = confined(folder, s["file"])
        if path in seen:
            raise SkdcgnError(f"{folder / MANIFEST}: lists {s['file']} twice")
        seen.add(path)
        if isinstance(s.get("sha256"), str):
            verify_file(path, s["sha256"], folder / MANIFEST)
        t = load_tensors(path)
        x, y = t.get("images"), t.get("labels")
        if x is None or y is None:
            raise SkdcgnError(f"{path}: expected tensors 'images' and 'labels'")
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise SkdcgnError(f"{path}: 'images' should be uint8 [N, 3, H, W], got {x.dtype} {list(x.shape)}")
        if image_shape is None:
            image_shape = tuple(x.shape[1:])
        if tuple(x.shape[1:]) != image_shape:
            raise SkdcgnError(f"{path}: image shape {list(x.shape[1:])} differs from {list(image_shape)}")
        for name in ("labels", "y_fg", "y_bg"):
            v = t.get(name, y)
            if v.dtype != torch.int64 or v.ndim != 1 or len(v) != len(x):
                raise SkdcgnError(f"{path}: '{name}' should be int64 [{len(x)}], got {v.dtype} {list(v.shape)}")
            if len(v) and (v.min() < 0 or v.max() >= k):
                raise SkdcgnError(f"{path}: '{name}' holds classes outside [0, {k})")
            parts[name].append(v)
        if len(x) != s["count"]:
            raise SkdcgnError(f"{path}: holds {len(x)} images, the manifest says {s['count']}")
        parts["images"].append(x if dtype == torch.uint8 else to_float(x))
    images, labels = torch.cat(parts["images"]), torch.cat(parts["labels"])
    if with_classes:
        return images, labels, (torch.cat(parts["y_fg"]), torch.cat(parts["y_bg"]))
    return images, labels


# ---- streamed counterfactuals ---------------------------------------------------------------------

STREAM_PREFIX = "stream:"


def _on_uint8_grid(images: Tensor) -> Tensor:
    """Float images in [-1, 1] rounded to the 256 levels a stored dataset keeps, on their own device:
    bitwise `to_float(to_uint8(images))` without the round trip through the CPU."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round_().div_(127.5).sub_(1.0)


class CounterfactualStream:
    """Counterfactuals sampled at every classifier step instead of stored: the recipe of the stored
    datasets (`sample_counterfactuals`: `per_shape` composites per mask, texture classes drawn
    independently of the shape's, label = the shape's class), `batch_size` composites per step.

    Batch `step` is drawn from its own CPU generator seeded with `derive_seed(seed, "stream", step)`
    (sha256 of "seed:stream:step"), then computed on the CGN's device: a pure function of
    (seed, step), so a run resumed at any step sees the batches of an uninterrupted one and the
    stream has no state to save. No composite is shown twice: every step has its own seed (a
    training run visits each step once), and within a batch every composite has its own
    foreground and background noise and texture shift (the `per_shape` composites of one mask
    share only the mask). Images come rounded to the uint8 grid of a stored dataset, so a stream
    and a stored set of the same CGN differ only in how often a composite recurs.

    An "epoch" is `steps_per_epoch` steps (the classifier's StepLR decays per epoch and a checkpoint
    is written per epoch); the CGN paper's 100,000 images at batch 64 are 1,563 steps.

    cgn: any `CGN` (teacher, students or a hybrid), used in eval mode; `.to(device)` moves it.
    per_shape: composites per mask in [1, 10,000]; composer: one of `compose.COMPOSERS`;
    counterfactual: False ties the texture classes to the shape's; seed in [0, 2⁶³ − 1];
    cgn_name: what the CGN was loaded as (recorded, not part of the identity: its weights are).
    sampler: how the CGN's forward runs (`models.sampling`, one of `SAMPLER_MODES`): "auto" is a
    CUDA graph captured once per batch size on a GPU and the CGN called directly on the CPU (the
    CPU bytes of every earlier version). Not part of the identity, like the device: the draws are
    the same, the images equal within float tolerance; "graph" is refused (one line) at the first
    batch when the CGN is not on a CUDA device.
    Raises `SkdcgnError` (one line) for a bad setting.
    """

    def __init__(self, cgn, per_shape: int = 10, composer: str = "standard", seed: int = 0,
                 steps_per_epoch: int = 1563, counterfactual: bool = True, cgn_name: str | None = None,
                 sampler: str = "auto") -> None:
        self.per_shape = _check_int("per_shape", per_shape, 1, 10_000)
        self.seed = _check_int("seed", seed, 0, 2**63 - 1)
        self.steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1, 10**9)
        if composer not in COMPOSERS:
            raise SkdcgnError(f"unknown composer {composer!r}; choose one of: {', '.join(COMPOSERS)}")
        self.composer, self.counterfactual, self.cgn_name = composer, bool(counterfactual), cgn_name
        if sampler not in SAMPLER_MODES:
            raise SkdcgnError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLER_MODES)}")
        self.sampler = sampler
        self._samplers: dict[tuple[str, int], CGNSampler | None] = {}  # (device, masks per call) → sampler
        self.cgn = cgn.eval()
        self.weights = weights_hash(cgn)
        with torch.no_grad():  # one mask from a throw-away generator: the image side, nothing drawn from the stream
            self.image_size = int(cgn.run_mechanism("shape", torch.zeros(1, dtype=torch.long),
                                                    torch.Generator().manual_seed(0)).shape[-1])

    def identity(self) -> dict:
        """What the stream draws, as the dict a classifier's stage records and hashes instead of a data hash."""
        return {"cgn_weights": self.weights, "per_shape": self.per_shape, "composer": self.composer,
                "counterfactual": self.counterfactual, "seed": self.seed, "steps_per_epoch": self.steps_per_epoch}

    def to(self, device: torch.device | str) -> "CounterfactualStream":
        """Move the CGN to `device` (where the batches are computed); returns the stream."""
        self.cgn.to(device)
        self._samplers.clear()  # a CUDA graph holds its device's buffers: captured again where needed
        return self

    def _sampler_for(self, n_shapes: int) -> CGNSampler | None:
        """The sampler of calls of up to `n_shapes` masks on the CGN's current device (made at the first such call)."""
        key = (str(self.cgn.device), n_shapes)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(self.cgn, self.sampler, n_shapes, self.per_shape)
        return self._samplers[key]

    @torch.no_grad()
    def batch(self, step: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Batch `step` (≥ 0): (images float32 [batch_size, 3, H, W] in [-1, 1], on the uint8 grid,
        labels int64 [batch_size], the shape classes), both on the CGN's device."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "stream", step))
        n_shapes = math.ceil(batch_size / self.per_shape)
        part = sample_counterfactuals(self.cgn, n_shapes, self.per_shape, self.composer, self.counterfactual, g,
                                      self._sampler_for(n_shapes))
        x = _on_uint8_grid(part["images"][:batch_size])
        return x, part["labels"][:batch_size].to(x.device)

    def sample(self, n: int, purpose: str = "eval", batch_size: int = 1000) -> tuple[Tensor, Tensor]:
        """`n` composites of the stream's recipe that training never sees (their generators are seeded
        with (seed, purpose, i), not (seed, "stream", step)): e.g. the in-distribution accuracy of a
        streamed classifier. Returns (images uint8 [n, 3, H, W] on the CPU, labels int64 [n])."""
        n = _check_int("n", n, 1, 10**8)
        sampler = self._sampler_for(math.ceil(min(batch_size, n) / self.per_shape))  # the last call padded
        xs, ys = [], []
        for i, start in enumerate(range(0, n, batch_size)):
            g = torch.Generator().manual_seed(derive_seed(self.seed, purpose, i))
            m = min(batch_size, n - start)
            part = sample_counterfactuals(self.cgn, math.ceil(m / self.per_shape), self.per_shape, self.composer,
                                          self.counterfactual, g, sampler)
            xs.append(to_uint8(part["images"][:m]))
            ys.append(part["labels"][:m])
        return torch.cat(xs), torch.cat(ys)


def parse_stream_spec(spec: str) -> str:
    """The CGN spec of `stream:<cgn spec>` (a `skdcgn.load_cgn` name: a shipped teacher,
    `students:<run dir>`, `hybrid:...`, a CGN folder). Raises `SkdcgnError` for an empty one."""
    cgn_spec = spec[len(STREAM_PREFIX):].strip() if spec.startswith(STREAM_PREFIX) else ""
    if not cgn_spec:
        raise SkdcgnError(f"{spec!r}: expected stream:<cgn> (a shipped teacher name, students:<run dir>, "
                          "hybrid:... or a CGN folder)")
    return cgn_spec
