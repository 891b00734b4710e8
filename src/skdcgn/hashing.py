"""The one home of the project's digests and derived seeds.

- `sha256_of`: the hasher behind every digest of tensors (a dataset's identity, a model's
  weights, a teacher's fingerprint, a cache file's content): text, bytes and tensors (their raw
  bytes, read in place) fed to one sha256.
- `derive_seed`: a 63-bit seed from a run's seed and the coordinates of a draw (shard, step,
  purpose), so that every random draw comes from its own seeded generator and a resumed run draws
  exactly what an uninterrupted one does.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor


def sha256_of(*parts: str | bytes | Tensor) -> str:
    """Hex sha256 of `parts` in order: str as UTF-8, bytes as they are, a tensor as its raw bytes
    (contiguous, on the CPU; no copy when it already is). Dtype and shape are not included: pass
    them as text where they matter."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Tensor):
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(p, str):
            h.update(p.encode())
        else:
            h.update(p)
    return h.hexdigest()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from `parts`, stable across runs, processes and platforms.

    Integer parts only (the distillation's (seed, mechanism, shard/epoch/step)): numpy's
    SeedSequence, well mixed. Any text part (the counterfactual sets' and classifiers'
    (seed, "shard", i), (seed, "order", epoch)): sha256 of the parts joined by ':'. The two
    recipes are kept because stored transfer sets, datasets and classifiers were drawn with them;
    a call site keeps its recipe by keeping its kind of parts.
    """
    if all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in parts):
        return int(np.random.SeedSequence([int(k) for k in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
