"""Files that cannot hurt: atomic writes, validated JSON, safetensors, stage manifests.

Every artifact is written to a temporary name in its own folder and renamed into place, so a
killed process never leaves a file that looks complete. A stage folder is complete only when
its `manifest.json` exists: the manifest is written last.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__
from .errors import SkdcgnError

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"  # atomic writes go to ".<name>.<random>.tmp" beside their target
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failed write (full disk, quota, permissions: an OSError, or a SafetensorError from
    safetensors' own writer) becomes a one-line `SkdcgnError` naming the file; whatever goes
    wrong, the temporary file is removed and the file at `path`, if any, is left as it was.
    torch.save reports a full disk as a bare RuntimeError: serialise to memory and use
    `write_bytes` instead of torch.save'ing into the temporary path.
    """
    path = Path(path)
    tmp: Path | None = None
    make_dirs(path.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
        yield tmp
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise SkdcgnError(f"could not write {path}: {_write_failure(e, path.parent)}") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def make_dirs(folder: str | os.PathLike) -> Path:
    """Create `folder` and its parents as needed. Raises `SkdcgnError` (one line) when the folder
    or one of its parents exists as a file, or cannot be created (permissions, full disk)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        for p in (folder, *folder.parents):
            if p.exists() and not p.is_dir():
                need = "a folder is needed here" if p == folder else f"{folder} needs it to be a folder"
                raise SkdcgnError(f"{p}: is a file, but {need}; choose another path or move the file") from None
        raise SkdcgnError(f"could not create folder {folder}: {e.strerror or e}") from None
    return folder


def _tmp_prefix(path: Path) -> str:
    """`.<name>.` for the temporary file beside `path`, cut short where the whole temporary name
    (prefix, mkstemp's 8 random characters, `.tmp`) would exceed the file system's name limit:
    any name the target itself may have can be written atomically."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    room = max(1, min(limit, 255) - len(TMP_SUFFIX) - 8 - 2)  # 2: the dots around the name
    name = path.name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore") or "x"
    return f".{name}."


def _write_failure(e: BaseException, folder: Path) -> str:
    """A short reason for a failed write; safetensors and torch.save hide ENOSPC in their messages."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    if "No space left" in text:
        return os.strerror(errno.ENOSPC)
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return f"{os.strerror(errno.ENOSPC)} ({text})"
    except OSError:
        pass
    return text


_TMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX) + "$")  # what atomic_path creates


def remove_stale_temporaries(folder: str | os.PathLike, depth: int = 2) -> int:
    """Delete temporary files that killed atomic writes left in `folder` and its subfolders
    (`depth` levels deep); return how many were removed."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return 0
    for p in folder.iterdir():
        if p.is_symlink():
            continue
        if p.is_file() and _TMP_NAME.match(p.name):
            p.unlink(missing_ok=True)
            n += 1
        elif p.is_dir() and depth > 0:
            n += remove_stale_temporaries(p, depth - 1)
    return n


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]],
              lineterminator: str = "\r\n") -> None:
    """Write a CSV file (a header row, then `rows`) atomically; `lineterminator` as in `csv.writer`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator=lineterminator)
    w.writerow(header)
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


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
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v  # safetensors refuses shared storage
        seen.add(ptr)
    tensors = out
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place (same length).

    safetensors writes metadata from a Rust HashMap, whose order changes from one process to
    the next: without this, the same tensors and metadata give different bytes in each run,
    and a resumed run could not be compared bitwise with an uninterrupted one.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.decode("utf-8").rstrip(" ")
        header = json.loads(text)
        if json.dumps(header, separators=(",", ":"), ensure_ascii=False) != text:
            return  # a serialisation we do not reproduce exactly: leave the file as written
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) == len(text.encode("utf-8")):
            f.seek(8)
            f.write(new)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SkdcgnError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SkdcgnError(f"{path}: not a valid safetensors file ({e})") from None


def tensor_file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, read from its header alone; {} for an unreadable file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001  (missing, truncated, foreign: no metadata to trust)
        return {}


# Key prefixes that wrap a whole state_dict without changing the network: nn.DataParallel and
# DistributedDataParallel (`module.`, the CGN authors' checkpoints) and torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# A pre-1.6 torch.save file starts with its magic number pickled (protocol 2): a plain pickle
# is not a PyTorch checkpoint.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def load_torch_state_dict(path: str | os.PathLike) -> dict:
    """A foreign PyTorch checkpoint (`torch.save` of a state_dict) read as data, never as code.

    Accepts what the field publishes: the zip format of `torch.save` (PyTorch >= 1.6) and the
    pre-1.6 pickle format (BigGAN-deep `pytorch_model.bin`, U2-Net `u2net.pth`), both read with
    `torch.load(weights_only=True)`, which builds tensors and plain containers only; a state_dict
    wrapped as `{"state_dict": {...}}`; and keys that all carry a wrapper prefix (`module.` from
    nn.DataParallel, `_orig_mod.` from torch.compile), which is removed (`strip_wrapper_prefix`).

    Returns the state_dict (a dict, tensors on the CPU). Raises `SkdcgnError` (one line naming
    the file) for a missing file, a file in neither format, a pickle that would run code, a
    truncated file, a top level that is not a dict, or a prefix carried by only some keys.
    """
    import pickle
    import struct
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise SkdcgnError(f"{path}: file not found")
    with open(path, "rb") as f:
        legacy = f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    if not legacy and not zipfile.is_zipfile(path):
        raise SkdcgnError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format "
                          "nor its pre-1.6 format)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, struct.error, zipfile.BadZipFile, io.UnsupportedOperation) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SkdcgnError(f"{path}: refused to load ({first[:200]})") from None
    if isinstance(sd, dict) and set(sd) == {"state_dict"} and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise SkdcgnError(f"{path}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
    return strip_wrapper_prefix(sd, str(path))


def strip_wrapper_prefix(state: dict, source: str) -> dict:
    """Remove a wrapper prefix (`WRAPPER_PREFIXES`) that every key carries, repeatedly (a
    DataParallel of a compiled model); refuse one carried by some keys only (one line naming it
    and a key). Other state_dicts are returned unchanged."""
    while state:
        for prefix in WRAPPER_PREFIXES:
            carrying = [k for k in state if isinstance(k, str) and k.startswith(prefix)]
            if not carrying:
                continue
            if len(carrying) < len(state):
                other = next(k for k in state if not (isinstance(k, str) and k.startswith(prefix)))
                raise SkdcgnError(f"{source}: {len(carrying)} of {len(state)} keys carry the wrapper prefix "
                                  f"'{prefix}' (e.g. '{carrying[0]}') but '{other}' does not; "
                                  "expected all keys or none")
            state = {k[len(prefix):]: v for k, v in state.items()}
            break
        else:
            return state
    return state


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


def check_finite(state: Any, source: str, _where: str = "") -> None:
    """Refuse a checkpoint whose floating-point tensors (at any depth of dicts, lists and tuples)
    hold NaN or infinite values: resuming from one would silently train garbage."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not torch.isfinite(state).all():
            raise SkdcgnError(f"{source}: '{_where or 'tensor'}' contains NaN or infinite values; delete it to start over")
    elif isinstance(state, dict):
        for k, v in state.items():
            check_finite(v, source, f"{_where}.{k}" if _where else str(k))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            check_finite(v, source, f"{_where}[{i}]")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str, remedy: str) -> Path:
    """Refuse a shipped file that is missing or whose sha256 is not `expected` (one-line error)."""
    path = Path(path)
    if not path.is_file():
        raise SkdcgnError(f"{path}: {what} missing; {remedy}")
    found = sha256_file(path)
    if found != expected:
        raise SkdcgnError(f"{path}: sha256 {found[:12]}… does not match the {what} "
                          f"({expected[:12] or 'none recorded'}…); refusing to load; {remedy}")
    return path


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
    """Mark a stage complete. Call it after every other file of the stage is in place.

    Temporary files left in the stage folder by an earlier, killed run are removed first.
    """
    remove_stale_temporaries(stage_dir)
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
