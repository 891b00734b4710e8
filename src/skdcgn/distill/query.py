"""The transfer set: a teacher mechanism's outputs for seeded random inputs, written in shards.

Only the teacher's forward pass is used (black box, no gradients, no real images). Each shard is
one file, written atomically, in one of two formats (`shard_format`):

- `safetensors` (default): three tensors
      u    float32 (or float16) [S, latent_dim]   u ~ N(0, I)
      y    uint8 (int16 > 256 classes) [S]        y uniform over the classes
      out  uint8               [S, C, H, W]       masks: round(255·m); textures: round(127.5·(x + 1))
- `tar`: a WebDataset-style tar (`shard_00000.tar`), the same content compressed: per sample
  `<global index, 9 digits>.png` (the output; grey for masks, RGB for textures: lossless, so it
  decodes to exactly the safetensors content), `.cls` (the class as text) and `.u.npy`.
  Readable by `webdataset` and plain `tar`; for large sets (a 256-px texture sample is 197 KB raw).

A shard's content depends only on (seed, shard index), so an interrupted query resumes shard by
shard and the result is identical to an uninterrupted one. Several processes (e.g. one per GPU
under torchrun) write one set together: shard i is written by rank i % world_size, and rank 0
writes the manifest once every shard is there; the files are the same as one process would write.

`TransferSet(folder, stream_window=k)` with k > 0 streams a set larger than memory: the shards
are visited in a seeded order, k at a time, shuffled within each window, and at most 2k decoded
shards are held. With k = 0 the whole set is loaded and shuffled globally (CGN-MNIST).

`OnlineTeacher` serves the same batches without storing anything: it queries the teacher during
training (the trainer's `online` switch), with the same quantisation as a stored set. `manifest.json` (written last) lists
the shards with their SHA-256. Quantisation: the largest error is half a step, 1/510 ≈ 0.0020
for masks and 1/255 ≈ 0.0039 for textures (in their [-1, 1] range); the mean is a quarter step.
"""
from __future__ import annotations

import collections
import io
import math
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..config import resolve_device
from ..errors import SkdcgnError, first_line
from ..hashing import derive_seed, sha256_of
from ..io import (MANIFEST, atomic_path, confined, config_hash, folder_lock, make_dirs, load_tensors, read_json, recorded_digests,
                  refuse_other_settings, save_tensors, sha256_file, stage_complete, tensor_file_metadata, verify_file,
                  write_manifest)

U_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SHARD_FORMATS = ("safetensors", "tar")
SHARD = {"safetensors": "shard_{:05d}.safetensors", "tar": "shard_{:05d}.tar"}
MARKER = "skdcgn.shard"  # (config hash : shard index) in the file: a shard of another config is rewritten


def label_dtype(n_classes: int) -> torch.dtype:
    """How class indices are stored: uint8 up to 256 classes (CGN-MNIST), int16 beyond (ImageNet)."""
    return torch.uint8 if n_classes <= 256 else torch.int16


def encode(out: Tensor, is_mask: bool) -> Tensor:
    """A teacher output as stored in a transfer set: uint8, same shape. Masks [0, 1] ↦ round(255·m);
    images [-1, 1] ↦ round(127.5·(x + 1)); values outside the range are clamped. `decode` inverts it
    to within half a quantisation step: |decode(encode(x)) − x| ≤ 1/510 (masks) or 1/255 (images)."""
    x = out.float() * 255.0 if is_mask else (out.float() + 1.0) * 127.5
    return x.round().clamp(0, 255).to(torch.uint8)


def decode(q: Tensor, is_mask: bool) -> Tensor:
    """uint8 [N, C, H, W] of `encode` → float32: masks in [0, 1] (q / 255), images in [-1, 1] (q / 127.5 − 1)."""
    x = q.float()
    return x / 255.0 if is_mask else x / 127.5 - 1.0


@torch.no_grad()
def teacher_fingerprint(mechanism: nn.Module, latent_dim: int, n_classes: int, device: torch.device | str = "cpu") -> str:
    """A hash of the teacher's (quantised) outputs on fixed inputs: identifies it as a black box."""
    return _fingerprint(_probe(mechanism, latent_dim, n_classes, device))


def _probe(mechanism: nn.Module, latent_dim: int, n_classes: int, device: torch.device | str) -> Tensor:
    """The teacher's quantised outputs on 16 fixed inputs (its fingerprint, and its output shape)."""
    g = torch.Generator().manual_seed(20220808)
    u = torch.randn(16, latent_dim, generator=g)
    y = torch.arange(16) % n_classes
    out = mechanism(u.to(device), y.to(device)).cpu()
    return encode(out, out.shape[1] == 1)


def _fingerprint(probe: Tensor) -> str:
    return sha256_of(probe)[:16]


def _shard_inputs(seed: int, index: int, size: int, latent_dim: int, n_classes: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(derive_seed(seed, index))  # depends on (seed, shard index) only
    y = torch.randint(0, n_classes, (size,), generator=g)
    u = torch.randn(size, latent_dim, generator=g)
    return u, y


@torch.no_grad()
def query_teacher(mechanism: nn.Module, out_dir: str | os.PathLike, n: int, shard_size: int, seed: int, *,
                  latent_dim: int | None = None, n_classes: int | None = None, batch_size: int = 1000,
                  u_dtype: str = "float32", device: torch.device | str = "cpu", progress: bool = True,
                  max_shards: int | None = None, rank: int = 0, world_size: int = 1,
                  shard_format: str = "safetensors", overwrite: bool = False) -> Path:
    """Write (or finish) the transfer set of one mechanism in `out_dir`; return `out_dir`.

    `mechanism` is only called: `mechanism(u, y) -> [N, C, 32, 32]`. `latent_dim` and `n_classes`
    describe its inputs (read from `mechanism.config` when left out). `max_shards` stops after
    writing that many new shards (used to simulate an interruption in tests).

    With `world_size` > 1 this process writes the shards i with i % world_size == rank; when
    torch.distributed is initialised the ranks meet at a barrier and rank 0 writes the manifest.
    Without it (independent processes), rank 0 writes the manifest once all shards exist; a
    rank that finds shards missing returns without one (call again to finish).

    A finished set whose shards changed or vanished after its manifest recorded them has those
    shards written again. overwrite: replace a finished set made with other settings (otherwise a
    one-line SkdcgnError naming the first difference). A single process holds the folder's lock
    (`io.folder_lock`) while it writes.
    """
    if world_size > 1:  # the ranks write one folder together
        return _query_teacher(mechanism, Path(out_dir), n, shard_size, seed, latent_dim, n_classes, batch_size, u_dtype,
                              device, progress, max_shards, rank, world_size, shard_format, overwrite)
    with folder_lock(out_dir):
        return _query_teacher(mechanism, Path(out_dir), n, shard_size, seed, latent_dim, n_classes, batch_size, u_dtype,
                              device, progress, max_shards, rank, world_size, shard_format, overwrite)


def transfer_config(mechanism: nn.Module, n: int, shard_size: int, seed: int, *, latent_dim: int | None = None,
                    n_classes: int | None = None, u_dtype: str = "float32", device: torch.device | str = "cpu",
                    shard_format: str = "safetensors") -> dict:
    """The config a transfer set of these settings records (and students hash), without writing it:
    one probe of the teacher (16 inputs), which also fixes the output shape."""
    cfg = getattr(mechanism, "config", None)
    latent_dim = int(latent_dim or cfg.latent_dim)
    n_classes = int(n_classes or cfg.n_classes)
    was_training = mechanism.training
    mechanism.eval()
    probe = _probe(mechanism, latent_dim, n_classes, device)
    mechanism.train(was_training)
    config = {"n": n, "shard_size": shard_size, "seed": seed, "latent_dim": latent_dim, "n_classes": n_classes,
              "u_dtype": u_dtype, "teacher": _fingerprint(probe)}
    if shard_format != "safetensors":  # absent for safetensors: sets written before tar existed keep their hash
        config["format"] = shard_format
    return config


@torch.no_grad()
def _query_teacher(mechanism: nn.Module, out_dir: Path, n: int, shard_size: int, seed: int, latent_dim: int | None,
                   n_classes: int | None, batch_size: int, u_dtype: str, device: torch.device | str, progress: bool,
                   max_shards: int | None, rank: int, world_size: int, shard_format: str, overwrite: bool) -> Path:
    cfg = getattr(mechanism, "config", None)
    latent_dim = int(latent_dim or cfg.latent_dim)
    n_classes = int(n_classes or cfg.n_classes)
    if not 1 <= n <= 100_000_000:
        raise SkdcgnError(f"n_transfer: {n} is outside [1, 100000000]")
    if not 1 <= shard_size <= 10_000_000:
        raise SkdcgnError(f"shard_size: {shard_size} is outside [1, 10000000]")
    if u_dtype not in U_DTYPES:
        raise SkdcgnError(f"u_dtype: {u_dtype!r} is not one of {', '.join(U_DTYPES)}")
    if not 0 <= rank < world_size:
        raise SkdcgnError(f"rank: {rank} is outside [0, world_size={world_size})")
    if shard_format not in SHARD_FORMATS:
        raise SkdcgnError(f"shard_format: {shard_format!r} is not one of {', '.join(SHARD_FORMATS)}")
    was_training = mechanism.training
    mechanism.eval()
    probe = _probe(mechanism, latent_dim, n_classes, device)
    shape = list(probe.shape[1:])  # every shard's output shape, known without decoding one
    config = {"n": n, "shard_size": shard_size, "seed": seed, "latent_dim": latent_dim, "n_classes": n_classes,
              "u_dtype": u_dtype, "teacher": _fingerprint(probe)}
    if shard_format != "safetensors":  # absent for safetensors: sets written before tar existed keep their hash
        config["format"] = shard_format
    if stage_complete(out_dir, config):
        mechanism.train(was_training)
        return out_dir
    n_shards = math.ceil(n / shard_size)
    names = [SHARD[shard_format].format(i) for i in range(n_shards)]
    collective = world_size > 1 and _dist_ready()
    recorded: dict[str, str] = {}  # digests of a finished set of this config: a changed shard is written again
    if (out_dir / MANIFEST).is_file():
        manifest = read_json(out_dir / MANIFEST)
        old = manifest.get("config")
        refuse_other_settings(out_dir, "a transfer set", old if isinstance(old, dict) else {}, config, overwrite)
        if config_hash(old) == config_hash(config):
            recorded = recorded_digests(manifest)
    if rank == 0:  # one process tidies the folder; the others wait for it when they can
        make_dirs(out_dir)
        (out_dir / MANIFEST).unlink(missing_ok=True)  # a manifest for another config no longer applies
        for stale in out_dir.glob(".*.tmp"):  # leftovers of a killed atomic write
            stale.unlink(missing_ok=True)
        for extra in set(p.name for p in out_dir.glob("shard_*.*")) - set(names):
            (out_dir / extra).unlink()  # shards of a larger, older set
    if collective:
        torch.distributed.barrier()
    make_dirs(out_dir)
    chash = config_hash(config)
    written = 0
    mine = [i for i in range(n_shards) if i % world_size == rank]
    for i in tqdm(mine, desc=f"transfer set {out_dir.name}", disable=not progress, unit="shard"):
        path = out_dir / names[i]
        if path.is_file() and _shard_ok(path, chash, i) and (names[i] not in recorded
                                                            or sha256_file(path) == recorded[names[i]]):
            continue
        if max_shards is not None and written >= max_shards:
            mechanism.train(was_training)
            return out_dir  # interrupted on purpose; the manifest is not written
        size = min(shard_size, n - i * shard_size)
        u, y = _shard_inputs(seed, i, size, latent_dim, n_classes)
        outs = []
        for s in range(0, size, batch_size):
            out = mechanism(u[s:s + batch_size].to(device), y[s:s + batch_size].to(device)).float().cpu()
            outs.append(encode(out, out.shape[1] == 1))
        q = torch.cat(outs)
        if list(q.shape[1:]) != shape:
            raise SkdcgnError(f"teacher output shape {list(q.shape[1:])} differs from its probe's {shape}")
        _write_shard(path, shard_format, u.to(U_DTYPES[u_dtype]), y.to(label_dtype(n_classes)), q,
                     f"{chash}:{i}", first=i * shard_size)
        written += 1
    mechanism.train(was_training)
    if world_size > 1:
        if collective:
            torch.distributed.barrier()  # every rank's shards are written
        done = rank == 0 and all((out_dir / name).is_file() and _shard_ok(out_dir / name, chash, i)
                                 for i, name in enumerate(names))
        if done:
            _finish(out_dir, config, names, n, shard_size, shape)
        if collective:
            torch.distributed.barrier()  # the manifest is there for everyone
        return out_dir
    _finish(out_dir, config, names, n, shard_size, shape)
    return out_dir


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _finish(out_dir: Path, config: dict, names: list[str], n: int, shard_size: int, shape: list) -> None:
    """Write the manifest (last): the shards' sizes and hashes."""
    shards = [{"file": name, "size": min(shard_size, n - i * shard_size), "sha256": sha256_file(out_dir / name)}
              for i, name in enumerate(names)]
    write_manifest(out_dir, config, shards=shards, output_shape=shape, is_mask=shape[0] == 1)


def _shard_ok(path: Path, chash: str, index: int) -> bool:
    """A complete shard of this config (atomic writes: a file that exists is whole, unless foreign)."""
    try:
        if path.suffix == ".tar":
            with tarfile.open(path, "r:") as tar:  # the marker is the archive's global pax header
                marker = tar.pax_headers.get(MARKER)
        else:
            marker = tensor_file_metadata(path).get("shard")
        return marker == f"{chash}:{index}"
    except Exception:  # noqa: BLE001  (any unreadable file is simply rewritten)
        return False


def _write_shard(path: Path, fmt: str, u: Tensor, y: Tensor, out: Tensor, marker: str, first: int) -> None:
    if fmt == "safetensors":
        save_tensors(path, {"u": u, "y": y, "out": out}, metadata={"shard": marker})  # one key: reproducible bytes
        return
    from PIL import Image

    images = out.permute(0, 2, 3, 1).numpy()
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, pax_headers={MARKER: marker}) as tar:
        for j in range(len(y)):
            png = io.BytesIO()
            image = images[j, :, :, 0] if images.shape[-1] == 1 else images[j]
            Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(png, format="PNG")
            npy = io.BytesIO()
            np.save(npy, u[j].numpy(), allow_pickle=False)
            for ext, data in (("png", png.getvalue()), ("cls", str(int(y[j])).encode()), ("u.npy", npy.getvalue())):
                info = tarfile.TarInfo(f"{first + j:09d}.{ext}")  # mtime, owner 0: the bytes are reproducible
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


_TAR_MEMBER = re.compile(r"^(\d{9})\.(png|cls|u\.npy)$")
_MAX_MEMBER = 64 << 20  # no sample of a sane set is this large; guards memory against a hostile tar


def _read_shard(path: Path) -> tuple[Tensor, Tensor, Tensor]:
    """(u, y, out) of one shard file, either format; the caller checks shapes against the manifest."""
    if path.suffix != ".tar":
        t = load_tensors(path)
        if set(t) != {"u", "y", "out"}:
            raise SkdcgnError(f"{path}: expected tensors u, y, out; found {sorted(t)}")
        return t["u"], t["y"], t["out"]
    from PIL import Image, UnidentifiedImageError

    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                m = _TAR_MEMBER.match(member.name)
                if not member.isfile() or m is None or member.size > _MAX_MEMBER:
                    raise SkdcgnError(f"{path}: unexpected member {member.name!r} (expected NNNNNNNNN.png|cls|u.npy files)")
                samples.setdefault(m.group(1), {})[m.group(2)] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as e:
        raise SkdcgnError(f"{path}: not a readable tar shard ({e})") from None
    keys = sorted(samples)
    if not keys or [int(k) for k in keys] != list(range(int(keys[0]), int(keys[0]) + len(keys))):
        raise SkdcgnError(f"{path}: sample keys are not consecutive")
    for k in keys:
        if set(samples[k]) != {"png", "cls", "u.npy"}:
            raise SkdcgnError(f"{path}: sample {k} has {sorted(samples[k])}, expected cls, png, u.npy")

    def unreadable(k: str, e: Exception) -> SkdcgnError:
        return SkdcgnError(f"{path}: sample {k} is unreadable ({first_line(e)})")

    def decode_png(k: str) -> Tensor:
        try:
            with Image.open(io.BytesIO(samples[k]["png"])) as im:
                if im.format != "PNG" or im.mode not in ("L", "RGB"):
                    raise ValueError(f"the image is {im.format} {im.mode}, expected a grey or RGB PNG")
                image = np.asarray(im)
        except (ValueError, OSError, UnidentifiedImageError) as e:
            raise unreadable(k, e) from None
        out = torch.from_numpy(image.copy())
        return out.unsqueeze(0) if image.ndim == 2 else out.permute(2, 0, 1)

    us, ys = [], []
    for k in keys:  # in this thread: np.load parses headers with `ast`, not thread-safe in CPython 3.11 (seen: SystemError)
        try:
            u = np.load(io.BytesIO(samples[k]["u.npy"]), allow_pickle=False)
            ys.append(int(samples[k]["cls"].decode("ascii")))
        except (ValueError, OSError) as e:
            raise unreadable(k, e) from None
        if u.dtype not in (np.float32, np.float16) or u.ndim != 1:
            raise SkdcgnError(f"{path}: sample {k}: u is {u.dtype} {list(u.shape)}, expected a float vector")
        us.append(torch.from_numpy(u.copy()))
    # PNG decoding releases the GIL: threads keep a streamed 256-px set ahead of a GPU (~1 ms an image)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        outs = list(pool.map(decode_png, keys))
    try:
        u_all, out_all = torch.stack(us), torch.stack(outs)
    except RuntimeError:
        raise SkdcgnError(f"{path}: samples differ in shape") from None
    return u_all, torch.tensor(ys, dtype=torch.int64), out_all


class TransferSet:
    """A finished transfer set, validated; serves seeded training batches.

    `stream_window=0` loads the whole set into memory; batches follow a fresh permutation of all
    samples per epoch, seeded by (seed, epoch). `stream_window=k` keeps at most 2k decoded shards:
    each epoch visits the shards in a seeded order, k at a time, each window shuffled. Either way,
    batch `step` is a pure function of `step`, so a resumed run reads exactly the batches it would
    have read.
    """

    def __init__(self, folder: str | os.PathLike, stream_window: int = 0) -> None:
        self.folder = Path(folder)
        manifest = read_json(self.folder / MANIFEST)
        cfg = manifest.get("config")
        shards = manifest.get("shards")
        if not isinstance(cfg, dict) or not isinstance(shards, list) or not shards:
            raise SkdcgnError(f"{self.folder / MANIFEST}: not a transfer-set manifest (no config or shards)")
        if not 0 <= stream_window <= 100_000:
            raise SkdcgnError(f"stream_window: {stream_window} is outside [0, 100000]")
        self.config = cfg
        self.is_mask = bool(manifest.get("is_mask"))
        self._output_shape = list(manifest.get("output_shape", []))
        self._paths = [confined(self.folder, str(e.get("file"))) for e in shards]
        if len(set(self._paths)) != len(self._paths):
            raise SkdcgnError(f"{self.folder / MANIFEST}: lists a shard file more than once")
        self._digests = [e.get("sha256") if isinstance(e.get("sha256"), str) else None for e in shards]
        sizes = [e.get("size") for e in shards]
        if not all(isinstance(x, int) and x > 0 for x in sizes) or sum(sizes) != cfg.get("n"):
            raise SkdcgnError(f"{self.folder / MANIFEST}: shard sizes {sizes[:4]}… do not add up to n = {cfg.get('n')}")
        self._sizes = sizes
        self._offsets = torch.tensor([0, *np.cumsum(sizes).tolist()])
        self.stream_window = stream_window
        self._cache: collections.OrderedDict[int, tuple[Tensor, Tensor, Tensor]] = collections.OrderedDict()
        self._order_cache: tuple[int, int, Tensor] | None = None
        if stream_window == 0:
            us, ys, outs = zip(*(self._load(i) for i in range(len(shards))))
            self.u, self.y, self.out = torch.cat(us), torch.cat(ys), torch.cat(outs)
        else:
            missing = [p.name for p in self._paths if not p.is_file()]
            if missing:
                raise SkdcgnError(f"{self.folder}: {len(missing)} shard file(s) missing, e.g. {missing[0]}")

    def _load(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Shard i, read and checked against the manifest: (u float32, y int64, out uint8)."""
        path, s = self._paths[i], self._sizes[i]
        latent_dim, n_classes = int(self.config["latent_dim"]), int(self.config["n_classes"])
        if self._digests[i] is not None:
            verify_file(path, self._digests[i], self.folder / MANIFEST)
        u, y, out = _read_shard(path)
        if len(y) != s or u.shape != (s, latent_dim) or u.dtype not in U_DTYPES.values():
            raise SkdcgnError(f"{path}: u has shape {list(u.shape)} ({u.dtype}), expected [{s}, {latent_dim}]")
        if (path.suffix != ".tar" and y.dtype != label_dtype(n_classes)) or y.ndim != 1 \
                or int(y.min()) < 0 or int(y.max()) >= n_classes:
            raise SkdcgnError(f"{path}: y must be {label_dtype(n_classes)} class indices in [0, {n_classes})")
        if out.dtype != torch.uint8 or list(out.shape) != [s, *self._output_shape]:
            raise SkdcgnError(f"{path}: out has shape {list(out.shape)} ({out.dtype}), expected uint8 {[s, *self._output_shape]}")
        return u.float(), y.long(), out

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _shard(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """Shard i from the cache of decoded shards (least recently used evicted beyond 2·window)."""
        if i in self._cache:
            self._cache.move_to_end(i)
        else:
            self._cache[i] = self._load(i)
            while len(self._cache) > 2 * self.stream_window:
                self._cache.popitem(last=False)
        return self._cache[i]

    def sample(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(u, y, decoded teacher output) of the samples `index` (global indices)."""
        if self.stream_window == 0:
            return self.u[index], self.y[index], decode(self.out[index], self.is_mask)
        shard = torch.searchsorted(self._offsets, index, right=True) - 1
        u = torch.empty(len(index), int(self.config["latent_dim"]))
        y = torch.empty(len(index), dtype=torch.long)
        out = torch.empty(len(index), *self._output_shape, dtype=torch.uint8)
        for i in shard.unique().tolist():
            at = (shard == i).nonzero().squeeze(1)
            su, sy, so = self._shard(i)
            local = index[at] - self._offsets[i]
            u[at], y[at], out[at] = su[local], sy[local], so[local]
        return u, y, decode(out, self.is_mask)

    def targets(self, index: Tensor) -> Tensor:
        """The decoded teacher outputs float32 [len(index), C, H, W] of samples `index` (int64)."""
        return self.sample(index)[2]

    def _order(self, epoch: int, seed: int) -> Tensor:
        """The sample order of one epoch (cached: consecutive steps share it)."""
        if self._order_cache is not None and self._order_cache[:2] == (epoch, seed):
            return self._order_cache[2]
        g = torch.Generator().manual_seed(derive_seed(seed, epoch))
        if self.stream_window == 0:
            order = torch.randperm(len(self), generator=g)
        else:
            shards, k, parts = torch.randperm(len(self._sizes), generator=g).tolist(), self.stream_window, []
            for w in range(0, len(shards), k):
                idx = torch.cat([torch.arange(int(self._offsets[i]), int(self._offsets[i + 1])) for i in shards[w:w + k]])
                parts.append(idx[torch.randperm(len(idx), generator=g)])
            order = torch.cat(parts)
        self._order_cache = (epoch, seed, order)
        return order

    def batch(self, step: int, batch_size: int, seed: int, part: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor, Tensor]:
        """(u, y, teacher output) of training step `step` (epochs of `len // batch_size` batches).

        `part=(rank, world_size)`: this rank's contiguous slice of the global batch (data parallel).
        """
        per_epoch = max(1, len(self) // batch_size)
        epoch, pos = divmod(step, per_epoch)
        idx = self._order(epoch, seed)[pos * batch_size:(pos + 1) * batch_size]
        return self.sample(idx[rank_slice(len(idx), *part)])


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """The contiguous part of a global batch of `n` that `rank` of `world_size` trains on."""
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


class OnlineTeacher:
    """The transfer set's interface without the set: each batch queries the teacher.

    Batch `step` is (u, y) drawn from a generator seeded by (seed, step), with the teacher's
    outputs quantised as in a stored set (`encode` -> `decode`), so the trainer sees the same
    kind of targets either way; it is a pure function of (seed, step), so resume stays exact. A
    rank of a data-parallel run queries the teacher for its own slice of the batch only.
    `u`, `y` and `targets` serve a fixed preview set (the trainer's sample grids).
    """

    def __init__(self, mechanism: nn.Module, latent_dim: int | None = None, n_classes: int | None = None,
                 device: torch.device | str = "cpu", n_preview: int = 16, preview_seed: int = 20220808) -> None:
        cfg = getattr(mechanism, "config", None)
        self.mechanism = mechanism.eval()
        self.latent_dim = int(latent_dim or cfg.latent_dim)
        self.n_classes = int(n_classes or cfg.n_classes)
        self.device = resolve_device(device)
        fingerprint = teacher_fingerprint(mechanism, self.latent_dim, self.n_classes, device)
        self.config = {"online": True, "latent_dim": self.latent_dim, "n_classes": self.n_classes, "teacher": fingerprint}
        g = torch.Generator().manual_seed(preview_seed)
        self.y = torch.randint(0, self.n_classes, (n_preview,), generator=g)
        self.u = torch.randn(n_preview, self.latent_dim, generator=g)
        self.is_mask = self._query(self.u[:1], self.y[:1]).shape[1] == 1

    def __len__(self) -> int:
        return len(self.y)  # the preview set; training batches are unlimited

    @torch.no_grad()
    def _query(self, u: Tensor, y: Tensor) -> Tensor:
        out = self.mechanism(u.to(self.device), y.to(self.device)).float()
        is_mask = out.shape[1] == 1
        return decode(encode(out, is_mask), is_mask)

    def targets(self, index: Tensor) -> Tensor:
        """The teacher's outputs (quantised as in a stored set) for preview samples `index`, on the CPU."""
        return self._query(self.u[index], self.y[index]).cpu()

    def sample(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(u, y, teacher output) of preview samples `index`."""
        return self.u[index], self.y[index], self.targets(index)

    def batch(self, step: int, batch_size: int, seed: int, part: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor, Tensor]:
        """(u float32 [B, latent], y int64 [B] in [0, n_classes), teacher output) of training step
        `step`, drawn fresh from a generator seeded by (seed, step); `part` as in `TransferSet.batch`
        (B = batch_size // world_size)."""
        g = torch.Generator().manual_seed(derive_seed(seed, step))
        y = torch.randint(0, self.n_classes, (batch_size,), generator=g)
        u = torch.randn(batch_size, self.latent_dim, generator=g)
        sl = rank_slice(batch_size, *part)
        u, y = u[sl], y[sl]
        return u, y, self._query(u, y)
