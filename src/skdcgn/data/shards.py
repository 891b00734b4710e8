"""Read WebDataset-style tar shards of labelled images: counterfactual ImageNet sets, or plain ones.

A shard is an uncompressed tar whose members are grouped into samples by key, as WebDataset
does (github.com/webdataset/webdataset): the key is the member's path up to the first dot of its
file name, the extension the rest (`000000042.jpg` → key `000000042`, extension `jpg`). A sample
holds exactly one image and its labels:

    <key>.jpg | <key>.jpeg | <key>.png   the image (any PIL mode; decoded to RGB)
    <key>.json                            {"shape": int, "texture": int, "background": int}
    <key>.cls                             one class index as text (the shape class in the sets
                                          written by `skdcgn counterfactuals --format tar`)

Labels are (shape, texture, background) class indices. A sample with only `.cls` (a plain
classification shard, e.g. real ImageNet images) gets the same class three times. Other
extensions are ignored. Refused, with one line naming the shard (SkdcgnError): members that are
not regular files (links, devices), absolute or `..` paths, members over 64 MiB, an image over
64 megapixels or not JPEG/PNG, a key seen twice, a sample without an image or without labels, a
`.cls` that contradicts the `.json`, negative classes (or, with a manifest, classes outside
[0, n_classes)).

A folder written by `skdcgn counterfactuals --format tar` has a `manifest.json` that lists the
shards with their sample counts and SHA-256; reading it checks each shard's digest (`verify`),
its count and its image size. A folder without one is read as every `*.tar` in it, sorted.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from ..errors import SkdcgnError
from ..hashing import derive_seed
from ..io import MANIFEST, confined, read_json, sha256_file, verify_file

LABEL_FIELDS = ("shape", "texture", "background")  # the order of the labels tensor
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
MAX_MEMBER_BYTES = 64 << 20  # no sample image of a sane set is this large; guards memory against a hostile tar
MAX_PIXELS = 64 << 20        # likewise for a decompression bomb (checked before decoding)

Source = str | os.PathLike | Iterable[str | os.PathLike]


def _manifest_shards(folder: Path) -> tuple[list[Path], list[int], list[str | None], dict]:
    """(paths, counts, sha256s, manifest) of a folder's manifest, checked for consistency."""
    manifest = read_json(folder / MANIFEST)
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise SkdcgnError(f"{folder / MANIFEST}: expected a non-empty 'shards' list")
    paths, counts, digests = [], [], []
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or isinstance(s.get("count"), bool) \
                or not isinstance(s.get("count"), int) or s["count"] < 1:
            raise SkdcgnError(f"{folder / MANIFEST}: malformed shard entry {s!r}")
        path = confined(folder, s["file"])
        if path in paths:
            raise SkdcgnError(f"{folder / MANIFEST}: lists {s['file']} twice")
        paths.append(path)
        counts.append(s["count"])
        digests.append(s["sha256"] if isinstance(s.get("sha256"), str) else None)
    config = manifest.get("config")
    total = config.get("n") if isinstance(config, dict) else None
    if isinstance(total, int) and sum(counts) != total:
        raise SkdcgnError(f"{folder / MANIFEST}: its shards hold {sum(counts)} samples, its config says n = {total}")
    return paths, counts, digests, manifest


def shard_paths(source: Source) -> list[Path]:
    """The shard files of `source`, in order: a folder with a manifest (its listed shards), a
    folder without one (every `*.tar` in it, sorted by name), one `.tar` file, or a list of them.

    Raises SkdcgnError for a missing file, an empty folder, or a malformed manifest.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if (path / MANIFEST).is_file():
                return _manifest_shards(path)[0]
            found = sorted(path.glob("*.tar"))
            if not found:
                raise SkdcgnError(f"{path}: no manifest.json and no *.tar shards in it")
            return found
        items = [path]
    else:
        items = [Path(p) for p in source]
        if not items:
            raise SkdcgnError("no shard files given")
    for p in items:
        if not p.is_file():
            raise SkdcgnError(f"{p}: shard file not found")
    return items


def count_samples(source: str | os.PathLike) -> int | None:
    """The number of samples of a folder with a manifest (from the manifest, nothing decoded);
    None for any other source (plain shards are counted only by reading them)."""
    folder = Path(source)
    if folder.is_dir() and (folder / MANIFEST).is_file():
        return sum(_manifest_shards(folder)[1])
    return None


def _split(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, WebDataset's way; None for a name without an extension."""
    path = PurePosixPath(name)
    base, dot, ext = path.name.partition(".")
    if not base or not dot or not ext:
        return None
    return str(path.parent / base) if str(path.parent) != "." else base, ext.lower()


def _read_members(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of one tar shard as (key, {extension: bytes}), in file order, members validated."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = member.name
                where = f"{path}: member {name!r}"
                if not member.isfile():
                    raise SkdcgnError(f"{where} is not a regular file (links and devices are refused)")
                if name.startswith("/") or ".." in PurePosixPath(name).parts:
                    raise SkdcgnError(f"{where} has an absolute or '..' path")
                if member.size > MAX_MEMBER_BYTES:
                    raise SkdcgnError(f"{where} is {member.size} bytes (over {MAX_MEMBER_BYTES >> 20} MiB)")
                parts = _split(name)
                if parts is None:
                    raise SkdcgnError(f"{where} has no extension (expected <key>.<ext>, WebDataset style)")
                key, ext = parts
                if not samples or samples[-1][0] != key:
                    if key in seen:
                        raise SkdcgnError(f"{path}: sample key {key!r} appears twice")
                    seen.add(key)
                    samples.append((key, {}))
                if ext in samples[-1][1]:
                    raise SkdcgnError(f"{path}: sample {key!r} has two .{ext} members")
                samples[-1][1][ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SkdcgnError(f"{path}: not a readable tar shard ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    return samples


def _labels(path: Path, key: str, parts: dict[str, bytes], n_classes: int | None) -> Tensor:
    """int64 [3] (shape, texture, background) of one sample, from its .json (or .cls alone)."""
    where = f"{path}: sample {key!r}"

    def as_class(value: object, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 \
                or (n_classes is not None and value >= n_classes):
            bound = f"[0, {n_classes})" if n_classes is not None else ">= 0"
            raise SkdcgnError(f"{where}: {what} {value!r} is not a class index {bound}")
        return value

    cls = None
    if "cls" in parts:
        try:
            cls = as_class(int(parts["cls"].decode("ascii").strip()), "cls")
        except (UnicodeDecodeError, ValueError):
            raise SkdcgnError(f"{where}: .cls is not an integer") from None
    if "json" in parts:
        try:
            record = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise SkdcgnError(f"{where}: .json is not valid JSON") from None
        if not isinstance(record, dict) or any(f not in record for f in LABEL_FIELDS):
            raise SkdcgnError(f"{where}: .json should hold {', '.join(LABEL_FIELDS)}")
        labels = [as_class(record[f], f) for f in LABEL_FIELDS]
        if cls is not None and cls != labels[0]:
            raise SkdcgnError(f"{where}: .cls {cls} contradicts the shape class {labels[0]} of its .json")
    elif cls is not None:
        labels = [cls, cls, cls]
    else:
        raise SkdcgnError(f"{where}: no labels (.json or .cls)")
    return torch.tensor(labels, dtype=torch.int64)


def decode_image(data: bytes, where: str) -> Tensor:
    """JPEG or PNG bytes → uint8 [3, H, W] (RGB, values 0–255). Raises SkdcgnError naming `where`
    for another format, an image over `MAX_PIXELS`, or undecodable bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ("JPEG", "PNG"):
                raise SkdcgnError(f"{where}: the image is {im.format}, expected JPEG or PNG")
            if im.width * im.height > MAX_PIXELS:
                raise SkdcgnError(f"{where}: the image is {im.width}×{im.height} pixels (over {MAX_PIXELS} pixels)")
            array = np.asarray(im.convert("RGB"))
    except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise SkdcgnError(f"{where}: unreadable image ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # [3, H, W]


def read_shard(path: str | os.PathLike, n_classes: int | None = None) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(key, image uint8 [3, H, W], labels int64 [3] = (shape, texture, background)) of every
    sample of one tar shard, in file order. The members are read and validated first (see the
    module doc), the images decoded one at a time as they are yielded. `n_classes`: refuse
    classes >= it. Raises SkdcgnError naming the shard and sample."""
    path = Path(path)
    yield from _decode_samples(path, _read_members(path), n_classes, None, None)


def _decode_samples(path: Path, samples: list[tuple[str, dict[str, bytes]]], n_classes: int | None,
                    order: list[int] | None, image_size: int | None) -> Iterator[tuple[str, Tensor, Tensor]]:
    checked = []
    for key, parts in samples:  # labels and the one image of every sample, before yielding any
        images = [ext for ext in IMAGE_EXTENSIONS if ext in parts]
        if len(images) != 1:
            raise SkdcgnError(f"{path}: sample {key!r} has {len(images)} images (.jpg, .jpeg or .png); expected one")
        checked.append((key, parts[images[0]], _labels(path, key, parts, n_classes)))
    for i in order if order is not None else range(len(checked)):
        key, data, labels = checked[i]
        image = decode_image(data, f"{path}: sample {key!r}")
        if image_size is not None and tuple(image.shape[1:]) != (image_size, image_size):
            raise SkdcgnError(f"{path}: sample {key!r} is {image.shape[2]}×{image.shape[1]} pixels; "
                              f"the manifest says {image_size}×{image_size}")
        yield key, image, labels


def iter_shard_samples(source: Source, *, rank: int = 0, world_size: int = 1, seed: int | None = None,
                       verify: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate the samples of a tar set: (image uint8 [3, H, W] in 0–255, labels int64 [3] =
    (shape, texture, background) class indices).

    source: a folder written by `skdcgn counterfactuals --format tar` (read through its manifest),
        a folder of `*.tar` shards, one shard file or a list of them (plain WebDataset tars with
        `.jpg`/`.png` + `.json` or `.cls`; see the module doc).
    rank, world_size: data-parallel reading: this rank reads the shards at positions
        rank, rank + world_size, … of the (possibly shuffled) shard order, so the ranks read
        disjoint shards that together cover the set once. Ranks get unequal sample counts unless
        the shard count is a multiple of `world_size` and the shards are of equal size.
    seed: None reads in order; an integer shuffles the shard order and the samples within each
        shard with generators seeded by (seed, ...): the same seed gives the same order on every
        run. Pass a different seed per epoch (e.g. `hashing.derive_seed(seed, epoch)`).
    verify: check each shard's SHA-256 against the manifest (when there is one) before reading it.

    With a manifest, each shard must hold the manifest's count of samples of its image size,
    with classes in [0, n_classes). Raises SkdcgnError (one line, naming the shard) otherwise.
    Each shard's encoded members are held in memory while it is read (a 1,000-image 256-px JPEG
    shard is ~20 MB); images are decoded one at a time.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise SkdcgnError(f"world_size: expected an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise SkdcgnError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
    folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
    counts: list[int | None]
    if folder is not None and folder.is_dir() and (folder / MANIFEST).is_file():
        paths, counts_known, digests, manifest = _manifest_shards(folder)
        counts = list(counts_known)
        n_classes = manifest.get("n_classes") if isinstance(manifest.get("n_classes"), int) else None
        image_size = manifest.get("image_size") if isinstance(manifest.get("image_size"), int) else None
    else:
        paths = shard_paths(source)
        counts, digests, n_classes, image_size = [None] * len(paths), [None] * len(paths), None, None
    order = list(range(len(paths)))
    if seed is not None:
        g = torch.Generator().manual_seed(derive_seed(seed, "shard order"))
        order = torch.randperm(len(paths), generator=g).tolist()
    for i in order[rank::world_size]:
        path = paths[i]
        if verify and digests[i] is not None:
            verify_file(path, digests[i], folder / MANIFEST)  # type: ignore[operator]
        samples = _read_members(path)
        if counts[i] is not None and len(samples) != counts[i]:
            raise SkdcgnError(f"{path}: holds {len(samples)} samples, the manifest says {counts[i]}")
        within = None
        if seed is not None:
            g = torch.Generator().manual_seed(derive_seed(seed, "samples", i))
            within = torch.randperm(len(samples), generator=g).tolist()
        for _, image, labels in _decode_samples(path, samples, n_classes, within, image_size):
            yield image, labels



class ShardEpochs:
    """A tar set as an endless, repeatable iterable for training: epoch e reads every shard once, in
    the order `iter_shard_samples(source, seed=derive_seed(seed, "epoch", e))` gives, then epoch
    e + 1 follows. Iterating again starts again at epoch 0 with the same samples, so a resumed
    trainer that skips the samples it used (`imagenet_classifier.StoredCounterfactuals`) reads on
    exactly where it stopped. Items as `iter_shard_samples`; raises SkdcgnError for a set without
    samples, and (with `verify`, for a set with a manifest) at construction for a shard whose
    SHA-256 differs from the one recorded."""

    def __init__(self, source: Source, seed: int = 0, verify: bool = True) -> None:
        self.source, self.seed, self.verify = source, seed, verify
        self.paths = shard_paths(source)  # a bad source fails now, not at the first step
        folder = Path(source) if isinstance(source, (str, os.PathLike)) else None
        # the recorded digests (a set with a manifest), read once: checked here, named by `identity`
        self._digests: list[str | None] = [None] * len(self.paths)
        if folder is not None and folder.is_dir() and (folder / MANIFEST).is_file():
            self.paths, _, self._digests, _ = _manifest_shards(folder)
            if verify:  # a damaged shard is named before training starts, not when an epoch reaches it
                for path, digest in zip(self.paths, self._digests):
                    if digest is not None:
                        verify_file(path, digest, folder / MANIFEST)

    def identity(self) -> dict:
        """What the set is, for a stage hash: its shards' names and SHA-256 (from the manifest when
        there is one, else computed) and the order seed."""
        return {"shards": [[p.name, d or sha256_file(p)] for p, d in zip(self.paths, self._digests)],
                "order_seed": self.seed}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = 0
        while True:
            n = 0
            for item in iter_shard_samples(self.source, seed=derive_seed(self.seed, "epoch", epoch), verify=self.verify):
                n += 1
                yield item
            if n == 0:
                raise SkdcgnError(f"{self.source}: no samples in its shards")
            epoch += 1
