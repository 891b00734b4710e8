"""Files that cannot hurt: atomic writes, validated JSON, safetensors, stage manifests.

Every artifact is written to a temporary name in its own folder and renamed into place, so a
killed process never leaves a file that looks complete. A stage folder is complete only when
its `manifest.json` exists: the manifest is written last.
"""
from __future__ import annotations

import logging
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from ._version import __version__
from .errors import SkdcgnError, first_line
from .hashing import sha256_of

logger = logging.getLogger(__name__)

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
    text = first_line(e)
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
    return _remove_files_named(Path(folder), _TMP_NAME, depth)


def _remove_files_named(folder: Path, pattern: re.Pattern, depth: int) -> int:
    """Delete the files whose name matches `pattern` in `folder` and `depth` levels below it
    (links are never followed); return how many."""
    if not folder.is_dir() or folder.is_symlink():
        return 0
    n = 0
    for p in folder.iterdir():
        if p.is_symlink():
            continue
        if p.is_file() and pattern.match(p.name):
            p.unlink(missing_ok=True)
            n += 1
        elif p.is_dir() and depth > 0:
            n += _remove_files_named(p, pattern, depth - 1)
    return n


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (fsync'd before the rename); raises
    `SkdcgnError` naming the file when the write fails (full disk, permissions)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys (paths, tensors and numpy scalars converted),
    atomically: the same object gives the same bytes."""
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
    """A JSON object from `path` (at most 10 MB read). Raises `SkdcgnError` (one line naming the
    file) when it is missing, not valid JSON, or not an object at the top."""
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
    """Write tensors as a safetensors file, atomically, with the usual permissions (0644 under umask 022).

    The file is serialised in memory and written through `write_bytes`: safetensors' own file
    writer creates a second temporary file (`.tmpXXXXXX`, mode 0600) and renames it over ours, so
    a SIGKILL during the write would leave that file behind (never cleaned up) and the finished
    artifact would be 0600 while its JSON beside it is 0644.
    Raises SkdcgnError when the file cannot be written (full disk, permissions).
    """
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v  # safetensors refuses shared storage
        seen.add(ptr)
    data = save_safetensors(out, metadata=metadata)
    if metadata and len(metadata) > 1:
        data = _sort_metadata(data)
    write_bytes(path, data)


def _sort_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its header's metadata keys sorted (same length).

    safetensors writes metadata from a Rust HashMap, whose order changes from one process to
    the next: without this, the same tensors and metadata give different bytes in each run,
    and a resumed run could not be compared bitwise with an uninterrupted one.
    """
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode("utf-8").rstrip(" ")
    header = json.loads(text)
    if json.dumps(header, separators=(",", ":"), ensure_ascii=False) != text:
        return data  # a serialisation we do not reproduce exactly: leave the file as written
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(new) != len(text.encode("utf-8")):
        return data
    return data[:8] + new + data[8 + len(new):]


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
        raise SkdcgnError(f"{path}: refused to load ({first_line(e)})") from None
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
    """The hex sha256 of a file, read in `chunk`-byte blocks (about 0.7 s per GB here)."""
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

def stage_complete(stage_dir: str | os.PathLike, config: dict, verify: bool = True) -> bool:
    """True when `stage_dir` holds a manifest written for this exact config whose recorded files
    are all there with their recorded sha256 (`verify_manifest`).

    A finished stage whose files changed after they were written (a flipped byte, a deleted or
    replaced file) is not complete: one line naming the file goes to stderr and the caller, which
    knows how, regenerates it.
    """
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = read_json(path)
    except SkdcgnError:
        return False
    if manifest.get("config_hash") != config_hash(config):
        return False
    if verify:
        try:
            verify_manifest(stage_dir, manifest)
        except SkdcgnError as e:
            logger.warning("%s; regenerating it", e)
            return False
    return True


def write_manifest(stage_dir: str | os.PathLike, config: dict, files: Sequence[str] = (), **extra: Any) -> dict:
    """Mark a stage complete. Call it after every other file of the stage is in place.

    files: paths relative to `stage_dir` whose sha256 the manifest records (`files`), checked
    whenever the stage is found complete (`stage_complete`) and when they are loaded
    (`check_recorded`). Temporary files left in the stage folder by an earlier, killed run are
    removed first.
    """
    remove_stale_temporaries(stage_dir)
    remove_safetensors_temporaries(stage_dir)
    manifest = {"config": config, "config_hash": config_hash(config), "skdcgn_version": __version__}
    if files:
        manifest["files"] = {name: sha256_file(Path(stage_dir) / name) for name in files}
    manifest.update(extra)
    write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


# ---- integrity: recorded digests, checked where data is consumed ---------------------------------

_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # safetensors' own writer's temporary name


def remove_safetensors_temporaries(folder: str | os.PathLike, depth: int = 2) -> int:
    """Delete the `.tmpXXXXXX` files that safetensors' own file writer left when killed (skdcgn
    versions before `save_tensors` serialised in memory used it) in `folder` and its subfolders;
    return how many. Call it only while no other process writes there (under `folder_lock`)."""
    return _remove_files_named(Path(folder), _SAFETENSORS_TMP, depth)


def recorded_digests(manifest: dict) -> dict[str, str]:
    """{relative path: sha256} of every file a manifest records (its `files` and its `shards`)."""
    out: dict[str, str] = {}
    files = manifest.get("files")
    if isinstance(files, dict):
        out.update({k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)})
    shards = manifest.get("shards")
    if isinstance(shards, list):
        for s in shards:
            if isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("sha256"), str):
                out[s["file"]] = s["sha256"]
    return out


def verify_file(path: str | os.PathLike, expected: str, manifest: str | os.PathLike) -> None:
    """Refuse a file recorded in `manifest` that is missing or whose sha256 is not `expected`.

    Raises SkdcgnError, one line naming the file (a mismatch also names both digests).
    """
    path = Path(path)
    if not path.is_file():
        raise SkdcgnError(f"{path}: file missing (recorded in {manifest})")
    found = sha256_file(path)
    if found != expected:
        raise SkdcgnError(f"{path}: sha256 {found[:12]}… differs from the {expected[:12]}… recorded in {manifest} "
                          "(changed or damaged after it was written)")


def verify_manifest(stage_dir: str | os.PathLike, manifest: dict | None = None) -> None:
    """Check every file recorded in a stage's manifest (see `recorded_digests`).

    Raises SkdcgnError naming the first missing or changed file, or a path escaping the folder.
    """
    stage_dir = Path(stage_dir)
    manifest = read_json(stage_dir / MANIFEST) if manifest is None else manifest
    for name, digest in recorded_digests(manifest).items():
        verify_file(confined(stage_dir, name), digest, stage_dir / MANIFEST)


def check_recorded(path: str | os.PathLike, levels: int = 2) -> None:
    """Before loading `path`: if the manifest of its folder (or of a folder up to `levels` above)
    records its sha256, the file must still have it.

    Raises SkdcgnError (one line naming the file) on a mismatch; a file that no manifest records
    (a model saved by hand, an unfinished stage) is not checked.
    """
    path = Path(path)
    folder = path.parent
    for _ in range(levels):
        manifest_path = folder / MANIFEST
        if manifest_path.is_file():
            try:
                manifest = read_json(manifest_path)
            except SkdcgnError:
                manifest = {}
            rel = path.relative_to(folder).as_posix()
            digest = recorded_digests(manifest).get(rel)
            if digest is not None:
                verify_file(path, digest, manifest_path)
                return
        folder = folder.parent


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors' dtypes, shapes and bytes (in key order): the digest a cache file
    carries in its own metadata, since a file cannot record its own file hash."""
    return sha256_of(*(part for k in sorted(tensors)  # the buffers themselves: no copy of a 150 MB set
                       for part in (f"{k}:{tensors[k].dtype}:{list(tensors[k].shape)};", tensors[k])))


# ---- rerun rule: other settings are refused in one line, unless asked to overwrite -----------------

def first_difference(old: Any, new: Any, where: str = "") -> str:
    """The first setting (dotted path, keys sorted) whose value differs: 'lr_g: 0.001 there, 0.01 now'."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
            if json.dumps(a, sort_keys=True, default=_jsonable) != json.dumps(b, sort_keys=True, default=_jsonable):
                return first_difference(a, b, f"{where}.{key}" if where else str(key))
        return "unknown difference"
    return f"{where or 'settings'}: {old!r} there, {new!r} now"


def refuse_other_settings(folder: str | os.PathLike, what: str, recorded: dict | None, config: dict,
                          overwrite: bool) -> bool:
    """The one rule for a rerun into a folder holding work made with other settings.

    recorded: the settings the folder's work was made with (from its manifest or checkpoint;
    None when it holds no work). Returns False when there is nothing to replace (no work, or work
    with these very settings); True when the work has other settings and `overwrite` is set (the
    caller then removes it). Raises SkdcgnError naming the first differing setting otherwise: a
    finished result or a checkpoint is never discarded silently.
    """
    if recorded is None or config_hash(recorded) == config_hash(config):
        return False
    if overwrite:
        return True
    raise SkdcgnError(f"{folder} holds {what} made with other settings ({first_difference(recorded, config)}); "
                      "choose another folder or overwrite it (--overwrite)")


# ---- a lock per folder that a process writes ------------------------------------------------------

LOCK = ".skdcgn.lock"
_HELD: dict[str, list] = {}  # resolved lock path -> [fd, depth]: a process may re-enter its own lock


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on `folder` (its `.skdcgn.lock` file) for the block.

    `fcntl.flock` from the standard library: the kernel releases the lock when the process
    ends in any way, SIGKILL included, so a lock left by a dead process is stale by
    construction and is simply taken over (no PID guessing, no timeout); the file only records
    who holds it, for the message. The lock file is removed on release. Re-entrant within a
    process. With `wait`, block until the holder is done; otherwise a second process gets
    SkdcgnError: one line naming the folder and the holder. On systems without `fcntl` (Windows)
    no lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(folder)
    created = []  # folders made for the lock: removed again if the block leaves them empty (a refused run writes nothing)
    parent = folder
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    make_dirs(folder)
    path = folder / LOCK
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                yield  # a folder no one here can write to: nothing to protect (a finished stage is only read)
                return
            raise SkdcgnError(f"could not lock {folder}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise SkdcgnError(f"{folder} is being written by {holder}; wait for it to finish "
                              "or use another folder") from None
        try:  # the holder before us may have removed the file between our open and our lock
            mine, there = os.fstat(fd), os.stat(path)
            same = (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        import socket
        import time as _time

        os.ftruncate(fd, 0)
        os.write(fd, f"skdcgn pid {os.getpid()} on {socket.gethostname()} since "
                     f"{_time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    except OSError:
        pass  # who holds it is only for the message (a full disk must not stop the run here)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        for d in created:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break  # not empty: it holds what the block wrote


def confined(root: str | os.PathLike, relative: str) -> Path:
    """Resolve a path read from a manifest; refuse one that escapes `root`."""
    root = Path(root).resolve()
    p = (root / relative).resolve()
    if root != p and root not in p.parents:
        raise SkdcgnError(f"{relative}: path leaves its folder {root}")
    return p


