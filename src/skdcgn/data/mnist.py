"""MNIST from IDX files (gzip or plain), validated before use.

The full MNIST ships with the package (`assets/mnist`); `SKDCGN_MNIST_DIR` or an explicit
`mnist_dir` points elsewhere. Every load checks the IDX header (magic, count, rows, cols, size)
and the md5 of the uncompressed content against the official hashes: hashing costs ~0.1 s next
to the ~0.2 s of decompression, so it is simply done each time rather than cached in a marker.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import SkdcgnError

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "mnist"
ENV_VAR = "SKDCGN_MNIST_DIR"
SPLITS = ("train", "test")

_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
_SIDE = 28

# split → (images file, labels file, record count); file → md5 of its uncompressed content.
_FILES: dict[str, tuple[str, str, int]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
OFFICIAL_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# In-process memo keyed by (path, size, mtime): building several variants re-reads the same file.
_memo: dict[tuple[str, int, int], np.ndarray] = {}


def mnist_dir(override: str | os.PathLike | None = None) -> Path:
    """The MNIST folder: the argument, else $SKDCGN_MNIST_DIR, else the shipped copy."""
    if override is not None:
        return Path(override)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else ASSET_DIR


def mnist_files(split: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) files of a split; `.gz` preferred, plain IDX accepted."""
    if split not in _FILES:
        raise SkdcgnError(f"unknown MNIST split {split!r}; valid: {', '.join(SPLITS)}")
    root = mnist_dir(directory)
    return tuple(_find(root, name) for name in _FILES[split][:2])  # type: ignore[return-value]


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise SkdcgnError(f"{root / (name + '.gz')}: MNIST file not found (expected {name}.gz or {name} in {root})")


def _read(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise SkdcgnError(f"{path}: not a readable gzip/IDX file ({e})") from None


def _load_idx(path: Path, name: str, count: int, images: bool) -> np.ndarray:
    """Parse and validate one IDX file; returns a read-only uint8 array."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    data = _read(path)
    magic, header, shape = (_IMAGE_MAGIC, 16, (count, _SIDE, _SIDE)) if images else (_LABEL_MAGIC, 8, (count,))
    what = f"IDX {'images' if images else 'labels'} (magic {magic}, {count} records"
    what += f", {_SIDE}x{_SIDE})" if images else ")"
    if len(data) < header:
        raise SkdcgnError(f"{path}: file too short ({len(data)} bytes) for an IDX header; expected {what}")
    fields = struct.unpack(f">{header // 4}I", data[:header])
    if fields[0] != magic:
        raise SkdcgnError(f"{path}: bad magic number {fields[0]}; expected {what}")
    if fields[1:] != shape:
        raise SkdcgnError(f"{path}: header says shape {list(fields[1:])}; expected {list(shape)} for {what}")
    expected_size = header + int(np.prod(shape))
    if len(data) != expected_size:
        raise SkdcgnError(f"{path}: {len(data)} bytes (truncated or padded); expected {expected_size} for {what}")
    md5 = hashlib.md5(data).hexdigest()
    if md5 != OFFICIAL_MD5[name]:
        raise SkdcgnError(f"{path}: md5 of the uncompressed content is {md5}; expected the official {OFFICIAL_MD5[name]}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    arr.setflags(write=False)  # shared through the memo: nobody may modify it
    _memo[key] = arr
    return arr


def load_mnist(split: str, mnist_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of the official MNIST `train` or `test` split.

    Missing, truncated or corrupt files raise a one-line `SkdcgnError` naming the file.
    The image array is read-only (it is shared between calls); copy it to modify it.
    """
    img_path, lab_path = mnist_files(split, mnist_dir)
    img_name, lab_name, count = _FILES[split]
    images = _load_idx(img_path, img_name, count, images=True)
    labels = _load_idx(lab_path, lab_name, count, images=False)
    if labels.max() > 9:
        raise SkdcgnError(f"{lab_path}: label {int(labels.max())} outside 0-9")
    return images, labels.astype(np.int64)


def mnist_fingerprint(mnist_dir: str | os.PathLike | None = None) -> str:
    """A short hash of the MNIST training files in use (part of the variant cache key)."""
    h = hashlib.sha256()
    for path in mnist_files("train", mnist_dir):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:16]
