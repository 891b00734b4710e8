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
"""
from __future__ import annotations

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
from .io import (MANIFEST, confined, config_hash, folder_lock, load_tensors, read_json,
                 recorded_digests, refuse_other_settings, save_tensors, sha256_file, stage_complete, tensor_file_metadata,
                 verify_file, write_json, write_manifest)

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
def _generate_shard(cgn, n_images: int, per_shape: int, seed: int, shard: int, composer: str,
                    counterfactual: bool, batch_shapes: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(derive_seed(seed, "shard", shard))
    n_shapes = math.ceil(n_images / per_shape)
    k = cgn.n_classes
    out: dict[str, list[Tensor]] = {"images": [], "labels": [], "y_fg": [], "y_bg": []}
    for start in range(0, n_shapes, batch_shapes):
        b = min(batch_shapes, n_shapes - start)
        y_shape = torch.randint(k, (b,), generator=g)
        mask = cgn.run_mechanism("shape", y_shape, g)           # [b, 1, H, W]
        y = y_shape.repeat_interleave(per_shape)                 # [b · per_shape]
        if counterfactual:
            y_fg = torch.randint(k, (len(y),), generator=g)      # independent of y and of each other
            y_bg = torch.randint(k, (len(y),), generator=g)
        else:
            y_fg, y_bg = y, y
        fg = cgn.run_mechanism("foreground", y_fg, g)            # [b · per_shape, 3, H, W]
        bg = cgn.run_mechanism("background", y_bg, g)
        x = compose_variant(composer, mask.repeat_interleave(per_shape, 0), fg, bg, g)
        out["images"].append(to_uint8(x))
        out["labels"].append(y)
        out["y_fg"].append(y_fg.cpu())
        out["y_bg"].append(y_bg.cpu())
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
                             overwrite: bool = False, progress: bool = True) -> Path:
    """Write a counterfactual dataset of `n` images to `out_dir` (resumable); return `out_dir`.

    cgn: any `CGN` (teacher or students), used in eval mode on its own device.
    per_shape: images per mask (each with its own random foreground/background classes).
    composer: a study variant of `compose.compose_variant`, seeded like everything else.
    shard_size: images per shard file (rounded down to a multiple of `per_shape`).
    batch_shapes: masks sampled per forward pass (part of the seeded recipe).
    overwrite: replace a dataset in `out_dir` made with other settings (otherwise an error).
    """
    n = _check_int("n", n, 1, 100_000_000)
    per_shape = _check_int("per_shape", per_shape, 1, 10_000)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    shard_size = _check_int("shard_size", shard_size, 1, 10_000_000)
    batch_shapes = _check_int("batch_shapes", batch_shapes, 1, 1_000_000)
    if composer not in COMPOSERS:
        raise SkdcgnError(f"unknown composer {composer!r}; choose one of: {', '.join(COMPOSERS)}")
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
        bar = tqdm(total=n, desc="counterfactuals", unit="img", disable=not progress, dynamic_ncols=True)
        for i in range(n_shards):
            count = min(shard_size, n - i * shard_size)
            path = out_dir / SHARD_PATTERN.format(i)
            tag = {"config_hash": chash, "shard": str(i)}
            digest = sha256_file(path) if path.is_file() else None
            if recorded.get(path.name, digest) != digest or not _shard_ok(path, count, tag):
                # shards are atomic: a tagged one is complete, unless it changed after the manifest recorded it
                tensors = _generate_shard(cgn, count, per_shape, seed, i, composer, counterfactual, batch_shapes)
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
    if not (folder / MANIFEST).is_file():
        raise SkdcgnError(f"{folder}: no {MANIFEST}; not a dataset, or its generation did not finish (run it again to resume)")
    manifest = read_json(folder / MANIFEST)
    shards, k = manifest.get("shards"), manifest.get("n_classes")
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
