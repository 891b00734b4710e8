"""The transfer set: a teacher mechanism's outputs for seeded random inputs, written in shards.

Only the teacher's forward pass is used (black box, no gradients, no real images). Each shard is
a safetensors file written atomically:

    u    float32 (or float16) [S, latent_dim]   u ~ N(0, I)
    y    uint8 (int16 > 256 classes) [S]        y uniform over the classes
    out  uint8               [S, C, H, W]       masks: round(255·m); textures: round(127.5·(x + 1))

A shard's content depends only on (seed, shard index), so an interrupted query resumes shard by
shard and the result is identical to an uninterrupted one. Several processes (e.g. one per GPU
under torchrun) write one set together: shard i is written by rank i % world_size, and rank 0
writes the manifest once every shard is there; the files are the same as one process would write.

`OnlineTeacher` serves the same batches without storing anything: it queries the teacher during
training (the trainer's `online` switch), with the same quantisation as a stored set. `manifest.json` (written last) lists
the shards with their SHA-256. Quantisation: the largest error is half a step, 1/510 ≈ 0.0020
for masks and 1/255 ≈ 0.0039 for textures (in their [-1, 1] range); the mean is a quarter step.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import SkdcgnError
from ..io import MANIFEST, confined, config_hash, load_tensors, read_json, save_tensors, sha256_file, stage_complete, write_manifest

U_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SHARD = "shard_{:05d}.safetensors"


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy SeedSequence: well mixed, platform independent)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def label_dtype(n_classes: int) -> torch.dtype:
    """How class indices are stored: uint8 up to 256 classes (CGN-MNIST), int16 beyond (ImageNet)."""
    return torch.uint8 if n_classes <= 256 else torch.int16


def encode(out: Tensor, is_mask: bool) -> Tensor:
    x = out.float() * 255.0 if is_mask else (out.float() + 1.0) * 127.5
    return x.round().clamp(0, 255).to(torch.uint8)


def decode(q: Tensor, is_mask: bool) -> Tensor:
    x = q.float()
    return x / 255.0 if is_mask else x / 127.5 - 1.0


@torch.no_grad()
def teacher_fingerprint(mechanism: nn.Module, latent_dim: int, n_classes: int, device: torch.device | str = "cpu") -> str:
    """A hash of the teacher's (quantised) outputs on fixed inputs: identifies it as a black box."""
    g = torch.Generator().manual_seed(20220808)
    u = torch.randn(16, latent_dim, generator=g)
    y = torch.arange(16) % n_classes
    out = mechanism(u.to(device), y.to(device)).cpu()
    return hashlib.sha256(encode(out, out.shape[1] == 1).numpy().tobytes()).hexdigest()[:16]


def _shard_inputs(seed: int, index: int, size: int, latent_dim: int, n_classes: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(derive_seed(seed, index))  # depends on (seed, shard index) only
    y = torch.randint(0, n_classes, (size,), generator=g)
    u = torch.randn(size, latent_dim, generator=g)
    return u, y


@torch.no_grad()
def query_teacher(mechanism: nn.Module, out_dir: str | os.PathLike, n: int, shard_size: int, seed: int, *,
                  latent_dim: int | None = None, n_classes: int | None = None, batch_size: int = 1000,
                  u_dtype: str = "float32", device: torch.device | str = "cpu", progress: bool = True,
                  max_shards: int | None = None, rank: int = 0, world_size: int = 1) -> Path:
    """Write (or finish) the transfer set of one mechanism in `out_dir`; return `out_dir`.

    `mechanism` is only called: `mechanism(u, y) -> [N, C, 32, 32]`. `latent_dim` and `n_classes`
    describe its inputs (read from `mechanism.config` when left out). `max_shards` stops after
    writing that many new shards (used to simulate an interruption in tests).

    With `world_size` > 1 this process writes the shards i with i % world_size == rank; when
    torch.distributed is initialised the ranks meet at a barrier and rank 0 writes the manifest.
    Without it (independent processes), rank 0 writes the manifest once all shards exist; a
    rank that finds shards missing returns without one (call again to finish).
    """
    out_dir = Path(out_dir)
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
    was_training = mechanism.training
    mechanism.eval()
    config = {"n": n, "shard_size": shard_size, "seed": seed, "latent_dim": latent_dim, "n_classes": n_classes,
              "u_dtype": u_dtype, "teacher": teacher_fingerprint(mechanism, latent_dim, n_classes, device)}
    if stage_complete(out_dir, config):
        return out_dir
    n_shards = math.ceil(n / shard_size)
    names = [SHARD.format(i) for i in range(n_shards)]
    collective = world_size > 1 and _dist_ready()
    if rank == 0:  # one process tidies the folder; the others wait for it when they can
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)  # a manifest for another config no longer applies
        for stale in out_dir.glob(".*.tmp"):  # leftovers of a killed atomic write
            stale.unlink(missing_ok=True)
        for extra in set(p.name for p in out_dir.glob("shard_*.safetensors")) - set(names):
            (out_dir / extra).unlink()  # shards of a larger, older set
    if collective:
        torch.distributed.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    chash = config_hash(config)
    written = 0
    shape = None
    mine = [i for i in range(n_shards) if i % world_size == rank]
    for i in tqdm(mine, desc=f"transfer set {out_dir.name}", disable=not progress, unit="shard"):
        path = out_dir / names[i]
        if path.is_file() and _shard_ok(path, chash):
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
        shape = list(q.shape[1:])
        save_tensors(path, {"u": u.to(U_DTYPES[u_dtype]), "y": y.to(label_dtype(n_classes)), "out": q},
                     metadata={"shard": f"{chash}:{i}"})  # one key: the file's bytes are reproducible
        written += 1
    mechanism.train(was_training)
    if world_size > 1:
        if collective:
            torch.distributed.barrier()  # every rank's shards are written
        done = rank == 0 and all((out_dir / name).is_file() and _shard_ok(out_dir / name, chash) for name in names)
        if done:
            _finish(out_dir, config, names, n, shard_size)
        if collective:
            torch.distributed.barrier()  # the manifest is there for everyone
        return out_dir
    _finish(out_dir, config, names, n, shard_size, shape)
    return out_dir


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _finish(out_dir: Path, config: dict, names: list[str], n: int, shard_size: int, shape: list | None = None) -> None:
    """Write the manifest (last): the shards' sizes and hashes."""
    if shape is None:
        shape = list(load_tensors(out_dir / names[0])["out"].shape[1:])
    shards = [{"file": name, "size": min(shard_size, n - i * shard_size), "sha256": sha256_file(out_dir / name)}
              for i, name in enumerate(names)]
    write_manifest(out_dir, config, shards=shards, output_shape=shape, is_mask=shape[0] == 1)


def _shard_ok(path: Path, chash: str) -> bool:
    """A complete shard of this config (atomic writes: a file that exists is whole, unless foreign)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("shard") == f"{chash}:{path.stem.split('_')[-1].lstrip('0') or '0'}"
    except Exception:  # noqa: BLE001  (any unreadable file is simply rewritten)
        return False


class TransferSet:
    """A finished transfer set, loaded into memory and validated; serves seeded training batches.

    The order is a fresh permutation per epoch, seeded by (seed, epoch); batch `step` is a pure
    function of `step`, so a resumed run reads exactly the batches it would have read.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        manifest = read_json(self.folder / MANIFEST)
        cfg = manifest.get("config")
        shards = manifest.get("shards")
        if not isinstance(cfg, dict) or not isinstance(shards, list) or not shards:
            raise SkdcgnError(f"{self.folder / MANIFEST}: not a transfer-set manifest (no config or shards)")
        self.config = cfg
        self.is_mask = bool(manifest.get("is_mask"))
        latent_dim, n_classes = int(cfg["latent_dim"]), int(cfg["n_classes"])
        us, ys, outs = [], [], []
        for entry in shards:
            path = confined(self.folder, str(entry.get("file")))
            t = load_tensors(path)
            if set(t) != {"u", "y", "out"}:
                raise SkdcgnError(f"{path}: expected tensors u, y, out; found {sorted(t)}")
            u, y, out = t["u"], t["y"], t["out"]
            s = len(y)
            if s != entry.get("size") or u.shape != (s, latent_dim) or u.dtype not in U_DTYPES.values():
                raise SkdcgnError(f"{path}: u has shape {list(u.shape)} ({u.dtype}), expected [{entry.get('size')}, {latent_dim}]")
            if y.dtype != label_dtype(n_classes) or y.ndim != 1 or (s and (int(y.min()) < 0 or int(y.max()) >= n_classes)):
                raise SkdcgnError(f"{path}: y must be {label_dtype(n_classes)} class indices in [0, {n_classes})")
            if out.dtype != torch.uint8 or list(out.shape) != [s, *manifest.get("output_shape", [])]:
                raise SkdcgnError(f"{path}: out has shape {list(out.shape)} ({out.dtype}), expected uint8 {[s, *manifest.get('output_shape', [])]}")
            us.append(u.float()), ys.append(y.long()), outs.append(out)
        self.u, self.y, self.out = torch.cat(us), torch.cat(ys), torch.cat(outs)
        if len(self.y) != cfg["n"]:
            raise SkdcgnError(f"{self.folder}: holds {len(self.y)} samples, manifest says {cfg['n']}")
        self._perm: tuple[int, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def targets(self, index: Tensor) -> Tensor:
        return decode(self.out[index], self.is_mask)

    def batch(self, step: int, batch_size: int, seed: int, part: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor, Tensor]:
        """(u, y, teacher output) of training step `step` (epochs of `len // batch_size` batches).

        `part=(rank, world_size)`: this rank's contiguous slice of the global batch (data parallel).
        """
        per_epoch = max(1, len(self) // batch_size)
        epoch, pos = divmod(step, per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(seed, epoch))
            self._perm = (epoch, torch.randperm(len(self), generator=g))
        idx = self._perm[1][pos * batch_size:(pos + 1) * batch_size]
        idx = idx[rank_slice(len(idx), *part)]
        return self.u[idx], self.y[idx], self.targets(idx)

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        step = start
        while True:
            yield self.batch(step, batch_size, seed)
            step += 1


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
        self.device = torch.device(device)
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
        return self._query(self.u[index], self.y[index]).cpu()

    def batch(self, step: int, batch_size: int, seed: int, part: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(derive_seed(seed, step))
        y = torch.randint(0, self.n_classes, (batch_size,), generator=g)
        u = torch.randn(batch_size, self.latent_dim, generator=g)
        sl = rank_slice(batch_size, *part)
        u, y = u[sl], y[sl]
        return u, y, self._query(u, y)
