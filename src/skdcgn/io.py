"""Files that cannot hurt: atomic writes, validated JSON, safetensors, stage manifests.

Every artifact is written to a temporary name in its own folder and renamed into place, so a
killed process never leaves a file that looks complete. A stage folder is complete only when
its `manifest.json` exists: the manifest is written last.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import SkdcgnError

MANIFEST = "manifest.json"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise SkdcgnError(f"could not write {path}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read(10_000_000))
    except FileNotFoundError:
        raise SkdcgnError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise SkdcgnError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise SkdcgnError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SkdcgnError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SkdcgnError(f"{path}: not a valid safetensors file ({e})") from None


def check_state_dict(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys, shapes or values do not fit `expected` (names the first problem)."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        raise SkdcgnError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing); expected keys like '{next(iter(expected))}'")
    if extra:
        raise SkdcgnError(f"{source}: unexpected key '{extra[0]}' ({len(extra)} unexpected)")
    for k, ref in expected.items():
        t = found[k]
        if not isinstance(t, torch.Tensor):
            raise SkdcgnError(f"{source}: '{k}' is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise SkdcgnError(f"{source}: '{k}' has shape {list(t.shape)}, expected {list(ref.shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SkdcgnError(f"{source}: '{k}' contains NaN or infinite values")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able configuration (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where derived data (built variants) is cached: $SKDCGN_CACHE or ~/.cache/skdcgn."""
    root = os.environ.get("SKDCGN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "skdcgn")
    return Path(root)


# ---- stages -------------------------------------------------------------------------------------

def stage_complete(stage_dir: str | os.PathLike, config: dict) -> bool:
    """True when `stage_dir` holds a manifest written for this exact config."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = read_json(path)
    except SkdcgnError:
        return False
    return manifest.get("config_hash") == config_hash(config)


def write_manifest(stage_dir: str | os.PathLike, config: dict, **extra: Any) -> dict:
    """Mark a stage complete. Call it after every other file of the stage is in place."""
    manifest = {"config": config, "config_hash": config_hash(config), "skdcgn_version": __version__, **extra}
    write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def confined(root: str | os.PathLike, relative: str) -> Path:
    """Resolve a path read from a manifest; refuse one that escapes `root`."""
    root = Path(root).resolve()
    p = (root / relative).resolve()
    if root != p and root not in p.parents:
        raise SkdcgnError(f"{relative}: path leaves its folder {root}")
    return p


def finite_float(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    """Validate a numeric config value (one-line error naming the field)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise SkdcgnError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise SkdcgnError(f"{name}: {value!r} is outside [{lo}, {hi}]")
    return v
