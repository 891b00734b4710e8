"""Counterfactual ImageNet at scale: a CGN's counterfactuals as WebDataset-style tar shards.

The CGN recipe (Sauer & Geiger, ICLR 2021; the authors' `imagenet/generate_data.py`): sample a
shape (mask) of class y_shape, a texture (foreground) of class y_texture and a background of class
y_background, drawn independently and uniformly from the classes (all 1000, or a subset), and
compose x = m·f + (1 − m)·b. As for CGN-MNIST (`counterfactuals.py`), each mask is reused for
`per_shape` images, each with its own texture and background (classes and noise). BigGAN
truncation (`truncation`, in (0, 1]) is the mechanisms' own (`ImageNetMechanism`, default 0.5);
a distilled student learned its teacher's truncation and has none to set.

On disk (one folder, any number of processes writing it together):
    shard-000000.tar …  samples <key>.jpg (or .png), <key>.json = {"shape", "texture",
                        "background"} class indices, <key>.cls = the shape class as text;
                        keys are global sample indices, 9 digits; JPEG/PNG via PIL
    progress.json       the settings being written (written first: a rerun with others is refused)
    preview.png         rows: masks; columns: their counterfactuals (first shard)
    manifest.json       written last: shards with sample counts and SHA-256, config, CGN name

Shard i is a pure function of (seed, i, config): its classes and noise are drawn up front from a
generator seeded by derive_seed(seed, "imagenet-counterfactuals", i), then the mechanisms run in
batches of about `batch_size` images (the bytes are those of any run on the same kind of device
with the same batch size). So any process can write any shard: under torchrun, rank r writes the
shards i with i % world_size == r, and rank 0 writes the preview and the manifest once every rank
is done; the files equal those of one process. A shard is written to a temporary file and renamed
(never half there); it carries (config hash : index) in its tar header, so a resumed run keeps
the shards of its own config and writes the others.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .compose import compose
from .counterfactuals import weights_hash
from .data.shards import LABEL_FIELDS, read_shard
from .errors import SkdcgnError
from .grids import image_grid, save_png
from .hashing import derive_seed
from .images import to_float, to_uint8
from .io import (MANIFEST, atomic_path, config_hash, folder_lock, make_dirs, read_json, recorded_digests,
                 refuse_other_settings, sha256_file, stage_complete, write_json, write_manifest)

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_NAME = re.compile(r"^shard-\d{6}\.tar$")
KEY_DIGITS = 9
MAX_SHARDS = 1_000_000
IMAGE_FORMATS = ("jpg", "png")
PROGRESS = "progress.json"
PREVIEW = "preview.png"
MARKER = "skdcgn.shard"  # pax header: (config hash : shard index); a shard of another config is rewritten
STAGE = "counterfactuals-tar"


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise SkdcgnError(f"{name}: expected an integer in [{lo}, {hi}], got {value!r}")
    return value


def parse_classes(spec: str | os.PathLike | Sequence[int] | None, n_classes: int) -> list[int] | None:
    """A class subset: None (all classes), a sequence of ints, or text: indices and ranges
    separated by commas or whitespace ("1,5,9", "0-9 207"), or the path of a file holding such
    text (`#` starts a comment). Returns the sorted, distinct indices, each in [0, n_classes);
    None for None. Raises SkdcgnError for an empty subset, a bad token or an index out of range.
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        text, where = str(spec), "classes"
        if Path(text).is_file():
            where = text
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise SkdcgnError(f"{where}: could not read the class list ({e})") from None
        tokens = [t for line in text.splitlines() for t in re.split(r"[,\s]+", line.split("#", 1)[0]) if t]
        values: list[int] = []
        for t in tokens:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", t)
            if m is None:
                raise SkdcgnError(f"{where}: {t!r} is not a class index or a range a-b")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                raise SkdcgnError(f"{where}: range {t!r} is empty")
            if hi >= n_classes:
                raise SkdcgnError(f"{where}: class {hi} is outside [0, {n_classes})")
            values.extend(range(lo, hi + 1))
    else:
        where, values = "classes", list(spec)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < n_classes:
                raise SkdcgnError(f"classes: {v!r} is not a class index in [0, {n_classes})")
    if not values:
        raise SkdcgnError(f"{where}: no classes given")
    return sorted({int(v) for v in values})


@contextlib.contextmanager
def _truncation(cgn, truncation: float | None) -> Iterator[dict[str, float | None]]:
    """Run the block with every mechanism's truncation set to `truncation` (None: as loaded);
    yield {mechanism: its truncation, or None for a mechanism without one (a student)}."""
    mechs = cgn.mechanisms()
    if truncation is None:
        yield {m: getattr(mech.config, "truncation", None) for m, mech in mechs.items()}
        return
    if isinstance(truncation, bool) or not isinstance(truncation, (int, float)) or not 0 < truncation <= 1:
        raise SkdcgnError(f"truncation: expected a number in (0, 1], got {truncation!r}")
    lacking = [m for m, mech in mechs.items() if not hasattr(mech.config, "truncation")]
    if lacking:
        raise SkdcgnError(f"truncation: the {lacking[0]} mechanism ({type(mechs[lacking[0]]).__name__}) has none to set "
                          "(a student reproduces its teacher's); leave --truncation out")
    saved = {m: mech.config for m, mech in mechs.items()}
    try:
        for mech in mechs.values():
            mech.config = dataclasses.replace(mech.config, truncation=float(truncation))
        yield {m: float(truncation) for m in mechs}
    finally:
        for m, mech in mechs.items():
            mech.config = saved[m]


@torch.no_grad()
def _shard_batches(cgn, seed: int, index: int, count: int, per_shape: int, classes: Tensor, counterfactual: bool,
                   batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(images uint8 [b, 3, H, W], labels int64 [b, 3]) of shard `index`, batch by batch."""
    g = torch.Generator().manual_seed(derive_seed(seed, "imagenet-counterfactuals", index))
    n_shapes = math.ceil(count / per_shape)
    m = n_shapes * per_shape
    dims = {name: mech.config.latent_dim for name, mech in cgn.mechanisms().items()}
    y_shape = classes[torch.randint(len(classes), (n_shapes,), generator=g)]       # [n_shapes]
    if counterfactual:  # independent of the shape's class and of each other
        y_texture = classes[torch.randint(len(classes), (m,), generator=g)]        # [m]
        y_background = classes[torch.randint(len(classes), (m,), generator=g)]
    else:
        y_texture = y_background = y_shape.repeat_interleave(per_shape)
    u_shape = torch.randn(n_shapes, dims["shape"], generator=g)
    u_texture = torch.randn(m, dims["foreground"], generator=g)
    u_background = torch.randn(m, dims["background"], generator=g)
    step = max(1, batch_size // per_shape)  # masks per forward pass
    for s in range(0, n_shapes, step):
        e = min(n_shapes, s + step)
        lo, hi = s * per_shape, min(count, e * per_shape)
        mask = cgn.run_mechanism("shape", y_shape[s:e], u=u_shape[s:e])                      # [b, 1, H, W]
        fg = cgn.run_mechanism("foreground", y_texture[lo:hi], u=u_texture[lo:hi])           # [b·k, 3, H, W]
        bg = cgn.run_mechanism("background", y_background[lo:hi], u=u_background[lo:hi])
        mask = mask.repeat_interleave(per_shape, 0)[:hi - lo]
        if mask.shape[2:] != fg.shape[2:] or fg.shape != bg.shape:
            raise SkdcgnError(f"the mechanisms' outputs do not compose: mask {list(mask.shape[1:])}, "
                              f"foreground {list(fg.shape[1:])}, background {list(bg.shape[1:])}")
        x = compose(mask, fg.to(mask.dtype), bg.to(mask.dtype))                              # [b·k, 3, H, W] in [-1, 1]
        labels = torch.stack([y_shape.repeat_interleave(per_shape)[lo:hi], y_texture[lo:hi], y_background[lo:hi]], 1)
        yield to_uint8(x), labels


def _encode(image: np.ndarray, image_format: str, quality: int) -> bytes:
    """uint8 [H, W, 3] → JPEG (4:2:0, `quality`) or PNG bytes, reproducible for one PIL version."""
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
    else:
        Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_shard(path: Path, batches: Iterator[tuple[Tensor, Tensor]], first: int, image_format: str, quality: int,
                 marker: str, pool: ThreadPoolExecutor, bar) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, pax_headers={MARKER: marker}) as tar:
        key = first
        for images, labels in batches:
            arrays = images.permute(0, 2, 3, 1).contiguous().numpy()  # [b, H, W, 3]
            encoded = list(pool.map(lambda a: _encode(a, image_format, quality), arrays))  # PIL encodes without the GIL
            for data, (s, t, b) in zip(encoded, labels.tolist()):
                name = f"{key:0{KEY_DIGITS}d}"
                record = json.dumps({"shape": s, "texture": t, "background": b}).encode()
                for ext, blob in ((image_format, data), ("cls", str(s).encode()), ("json", record)):
                    info = tarfile.TarInfo(f"{name}.{ext}")  # mtime 0, owner 0: reproducible bytes
                    info.size, info.mode = len(blob), 0o644
                    tar.addfile(info, io.BytesIO(blob))
                key += 1
            bar.update(len(labels))


def _shard_ok(path: Path, marker: str, recorded: str | None) -> bool:
    """A whole shard of this config (written atomically, so a file with our marker is complete),
    unchanged since a manifest recorded its digest."""
    try:
        with tarfile.open(path, "r:") as tar:
            if tar.pax_headers.get(MARKER) != marker:
                return False
    except Exception:  # noqa: BLE001  (any unreadable file is simply written again)
        return False
    return recorded is None or sha256_file(path) == recorded


def _clear(out_dir: Path) -> None:
    """Remove the files this module writes (and nothing else)."""
    for p in out_dir.glob("shard-*.tar"):
        if SHARD_NAME.match(p.name):
            p.unlink()
    for name in (PREVIEW, PROGRESS, MANIFEST):
        (out_dir / name).unlink(missing_ok=True)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def write_counterfactual_tars(cgn, out_dir: str | os.PathLike, n: int, per_shape: int = 10, seed: int = 0, *,
                              truncation: float | None = None, classes: Sequence[int] | str | None = None,
                              image_format: str = "jpg", jpeg_quality: int = 95, counterfactual: bool = True,
                              shard_size: int = 1000, batch_size: int = 32, cgn_name: str | None = None,
                              overwrite: bool = False, progress: bool = True, rank: int = 0,
                              world_size: int = 1) -> Path:
    """Write (or finish) a counterfactual tar set of `n` images in `out_dir`; return `out_dir`.

    cgn: a `CGN` (teacher, students or a hybrid) whose textures are not shifted (CGN-ImageNet;
        CGN-MNIST's shifted textures: use `counterfactuals.generate_counterfactuals`), on its device.
    per_shape: images per mask, each with its own texture and background classes and noise.
    truncation: BigGAN truncation in (0, 1] for every mechanism (None: as loaded, 0.5 for the
        loaders); refused for a CGN with a mechanism without one (a student).
    classes: the class subset to draw from (see `parse_classes`); labels keep the original indices.
    image_format: "jpg" (quality `jpeg_quality` in [1, 100], 4:2:0) or "png" (lossless).
    counterfactual: False ties texture and background to the shape's class (no counterfactuals).
    shard_size: images per shard (rounded down to a multiple of `per_shape`: a mask's images stay
        in one shard). batch_size: images per forward pass (not part of the config).
    rank, world_size: this process writes shards i with i % world_size == rank. With torch.distributed
        initialised, the ranks meet at barriers and rank 0 tidies the folder, then writes the preview
        and manifest; without it, rank 0 writes them only if every shard is there (call again).
    overwrite: replace a set (finished or not) made with other settings; otherwise a one-line
        SkdcgnError naming the first difference. Bad arguments raise SkdcgnError (one line).
    """
    n = _check_int("n", n, 1, 100_000_000)
    per_shape = _check_int("per_shape", per_shape, 1, 10_000)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    shard_size = _check_int("shard_size", shard_size, 1, 10_000_000)
    batch_size = _check_int("batch_size", batch_size, 1, 1_000_000)
    jpeg_quality = _check_int("jpeg_quality", jpeg_quality, 1, 100)
    world_size = _check_int("world_size", world_size, 1, 100_000)
    rank = _check_int("rank", rank, 0, world_size - 1)
    if image_format not in IMAGE_FORMATS:
        raise SkdcgnError(f"image_format: {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    shifted = [m for m, mech in cgn.mechanisms().items() if getattr(mech.config, "shifted_texture", False)]
    if shifted:
        raise SkdcgnError(f"the {shifted[0]} mechanism shifts its texture at composition (CGN-MNIST); "
                          "tar sets are for CGN-ImageNet mechanisms (use --format safetensors)")
    subset = parse_classes(classes, cgn.n_classes)
    shard_size = max(per_shape, shard_size // per_shape * per_shape)
    n_shards = math.ceil(n / shard_size)
    if n_shards > MAX_SHARDS:
        raise SkdcgnError(f"shard_size: {n} images in shards of {shard_size} make {n_shards} shards (at most {MAX_SHARDS})")
    with _truncation(cgn, truncation) as truncations:
        config = {"stage": STAGE, "cgn_weights": weights_hash(cgn), "truncation": truncations, "n": n,
                  "per_shape": per_shape, "seed": seed, "classes": subset, "counterfactual": bool(counterfactual),
                  "image_format": image_format, "shard_size": shard_size}
        if image_format == "jpg":
            config["jpeg_quality"] = jpeg_quality
        job = _Job(cgn, Path(out_dir), config, n_shards, batch_size, cgn_name, overwrite, progress, rank, world_size)
        if world_size > 1:  # the ranks write one folder together
            job.run()
        else:
            with folder_lock(out_dir):  # two processes never write one set at once
                job.run()
    return Path(out_dir)


@dataclasses.dataclass
class _Job:
    cgn: torch.nn.Module
    out_dir: Path
    config: dict
    n_shards: int
    batch_size: int
    cgn_name: str | None
    overwrite: bool
    progress: bool
    rank: int
    world_size: int

    def run(self) -> None:
        out_dir, config, rank = self.out_dir, self.config, self.rank
        collective = self.world_size > 1 and _dist_ready()
        if stage_complete(out_dir, config):
            return
        replace, recorded = False, {}
        for marker in (MANIFEST, PROGRESS):  # every rank checks (read only): all refuse alike
            path = out_dir / marker
            if path.is_file():
                record = read_json(path)
                old = record.get("config")
                if refuse_other_settings(out_dir, "a counterfactual set", old if isinstance(old, dict) else {},
                                         config, self.overwrite):
                    replace = True
                    break
                if marker == MANIFEST:
                    recorded = recorded_digests(record)  # a shard changed since: written again
        unknown = not any((out_dir / m).is_file() for m in (MANIFEST, PROGRESS)) and out_dir.is_dir() \
            and any(SHARD_NAME.match(p.name) for p in out_dir.glob("shard-*.tar"))
        if unknown:  # progress.json comes before any shard: these are someone else's
            if not self.overwrite:
                raise SkdcgnError(f"{out_dir} holds shard-*.tar files without a {PROGRESS} or {MANIFEST} (not written by "
                                  "this command); choose another folder or overwrite them (--overwrite)")
            replace = True
        if collective:
            torch.distributed.barrier()  # nobody reads the markers while rank 0 rewrites them
        n_shards, names = self.n_shards, [SHARD_PATTERN.format(i) for i in range(self.n_shards)]
        if rank == 0:
            make_dirs(out_dir)
            if replace:
                _clear(out_dir)
            (out_dir / MANIFEST).unlink(missing_ok=True)  # incomplete until written again
            for stale in out_dir.glob(".*.tmp"):  # leftovers of a killed atomic write
                stale.unlink(missing_ok=True)
            for p in out_dir.glob("shard-*.tar"):
                if SHARD_NAME.match(p.name) and p.name not in names:
                    p.unlink()  # not part of this set (left by one whose records were removed)
            write_json(out_dir / PROGRESS, {"config": config, "cgn": self.cgn_name})
        if collective:
            torch.distributed.barrier()
        make_dirs(out_dir)

        cfg, chash = config, config_hash(config)
        shard_size, n = cfg["shard_size"], cfg["n"]
        classes = torch.tensor(cfg["classes"]) if cfg["classes"] is not None else torch.arange(self.cgn.n_classes)
        mine = [i for i in range(n_shards) if i % self.world_size == rank]
        todo = [i for i in mine if not _shard_ok(out_dir / names[i], f"{chash}:{i}", recorded.get(names[i]))]
        images = sum(min(shard_size, n - i * shard_size) for i in todo)
        logger.info("rank %d/%d: %d of its %d shards to write (%d images) in %s", rank, self.world_size, len(todo),
                    len(mine), images, out_dir)
        self.cgn.eval()
        t0 = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(total=images, desc=f"counterfactuals {out_dir.name}", unit="img", dynamic_ncols=True,
                   disable=not self.progress or rank != 0)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for i in todo:
                count = min(shard_size, n - i * shard_size)
                batches = _shard_batches(self.cgn, cfg["seed"], i, count, cfg["per_shape"], classes,
                                         cfg["counterfactual"], self.batch_size)
                _write_shard(out_dir / names[i], batches, i * shard_size, cfg["image_format"],
                             cfg.get("jpeg_quality", 95), f"{chash}:{i}", pool, bar)
        bar.close()
        seconds = time.perf_counter() - t0
        if images:
            logger.info("rank %d: %d images in %.1f s (%.2f images/s)", rank, images, seconds, images / seconds)
        # each rank hashes its own shards (in parallel, just written: from the page cache)
        digests = {names[i]: sha256_file(out_dir / names[i]) for i in mine if (out_dir / names[i]).is_file()}
        if collective:
            gathered: list[dict] = [{} for _ in range(self.world_size)]
            torch.distributed.all_gather_object(gathered, digests)  # also: every rank's shards are written
            digests = {k: v for d in gathered for k, v in d.items()}
        if rank == 0 and all(_shard_ok(out_dir / names[i], f"{chash}:{i}", None) for i in range(n_shards)):
            self._finish(names, {name: digests.get(name) or sha256_file(out_dir / name) for name in names}, seconds)
        elif rank == 0:
            logger.warning("%s: shards of other ranks are missing; run again to finish the set", out_dir)
        if collective:
            torch.distributed.barrier()  # the manifest is there for everyone

    def _finish(self, names: list[str], digests: dict[str, str], seconds: float) -> None:
        """The preview grid, then the manifest (last): the set is complete."""
        out_dir, cfg = self.out_dir, self.config
        per_shape, first_count = cfg["per_shape"], min(cfg["shard_size"], cfg["n"])
        rows, cols = min(8, math.ceil(first_count / per_shape)), min(per_shape, 8)
        wanted = {r * per_shape + c for r in range(rows) for c in range(cols) if r * per_shape + c < first_count}
        picked, row_labels = [], []
        for j, (_, image, labels) in enumerate(read_shard(out_dir / names[0])):
            if j in wanted:
                picked.append(image)
            if j % per_shape == 0 and j // per_shape < rows:
                row_labels.append(str(int(labels[0])))
            if j >= max(wanted):
                break
        size = int(picked[0].shape[-1])
        title = f"{'counterfactuals' if cfg['counterfactual'] else 'samples'}: one shape per row"
        grid = image_grid(to_float(torch.stack(picked)), cols, scale=2 if size <= 64 else 1, title=title,
                          row_labels=row_labels)
        save_png(grid, out_dir / PREVIEW)
        shards = [{"file": name, "count": min(cfg["shard_size"], cfg["n"] - i * cfg["shard_size"]),
                   "sha256": digests[name]} for i, name in enumerate(names)]
        write_manifest(out_dir, cfg, cgn=self.cgn_name, shards=shards, n_classes=self.cgn.n_classes,
                       classes=cfg["classes"], image_size=size, image_format=cfg["image_format"],
                       label_fields=list(LABEL_FIELDS), members=[cfg["image_format"], "cls", "json"],
                       preview=PREVIEW, seconds=round(seconds, 2))
