"""The one training-state format of every trainer: safetensors for the tensors, JSON for the rest.

A trainer hands over its whole state as one nested structure (model and optimizer state_dicts,
random-generator states, step, logs: dicts, lists, tuples, numbers, strings, None and tensors) and
gets the same structure back. Tensors go into a safetensors file; everything else, with a
reference to each tensor, into a JSON document in its metadata, next to the stage (the settings
the state belongs to) and its hash. Nothing is unpickled, so a checkpoint from a stranger cannot
run code, and a rerun can tell from the header alone whose checkpoint it is.

Kept our own, not `torch.save` (a pickle: `weights_only=True` makes it safe to read, but its
failures are opaque and it offers no header to check without loading), nor a library such as
accelerate's (it pickles the RNG and optimizer states): exact resume needs every generator state
bit for bit, which this format stores as plain uint8 tensors.

Format (`FORMAT`): safetensors with tensors named `t.<i>` and metadata keys `format`, `state`
(the JSON skeleton), `stage` (JSON) and `stage_hash` (`io.config_hash` of the stage). JSON keeps
Python floats exactly (`repr` round-trips), non-string dict keys and tuples are tagged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import SkdcgnError
from .io import check_finite, config_hash, load_tensors, save_tensors

FORMAT = "skdcgn-training-state-1"
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"


def pack(obj: Any, tensors: dict[str, Tensor] | None = None) -> tuple[Any, dict[str, Tensor]]:
    """(JSON-able skeleton, {name: tensor}) of a nested structure; `unpack` inverts it exactly.

    Raises `TypeError` for a value that is neither a tensor, a container nor a JSON scalar (a
    trainer's bug, not the user's input)."""
    tensors = {} if tensors is None else tensors
    if isinstance(obj, Tensor):
        name = f"t.{len(tensors)}"
        tensors[name] = obj.detach()
        return {_TENSOR: name}, tensors
    if isinstance(obj, tuple):
        return {_TUPLE: [pack(v, tensors)[0] for v in obj]}, tensors
    if isinstance(obj, list):
        return [pack(v, tensors)[0] for v in obj], tensors
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in (_TENSOR, _TUPLE, _ITEMS) for k in obj):
            return {k: pack(v, tensors)[0] for k, v in obj.items()}, tensors
        return {_ITEMS: [[pack(k, tensors)[0], pack(v, tensors)[0]] for k, v in obj.items()]}, tensors
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj, tensors
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item(), tensors
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state")


def unpack(skeleton: Any, tensors: dict[str, Tensor]) -> Any:
    """The structure that `pack` turned into (`skeleton`, `tensors`). Raises `KeyError` for a
    reference to a missing tensor."""
    if isinstance(skeleton, list):
        return [unpack(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        if set(skeleton) == {_TUPLE}:
            return tuple(unpack(v, tensors) for v in skeleton[_TUPLE])
        if set(skeleton) == {_ITEMS}:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in skeleton[_ITEMS]}
        return {k: unpack(v, tensors) for k, v in skeleton.items()}
    return skeleton


def save_checkpoint(path: str | os.PathLike, state: dict, stage: dict) -> None:
    """Write `state` (see the module doc) for the run whose settings are `stage` (JSON-able),
    atomically (`io.save_tensors`); same state and stage, same bytes."""
    skeleton, tensors = pack(state)
    save_tensors(path, {k: v.contiguous() for k, v in tensors.items()},
                 metadata={"format": FORMAT, "state": json.dumps(skeleton, sort_keys=True),
                           "stage": json.dumps(stage, sort_keys=True), "stage_hash": config_hash(stage)})


def checkpoint_stage(path: str | os.PathLike) -> dict | None:
    """The stage a checkpoint was written for, read from its header alone (no tensor is loaded);
    None when the file is not a readable checkpoint of this format."""
    meta = _metadata(Path(path))
    if meta is None or meta.get("format") != FORMAT:
        return None
    try:
        stage = json.loads(meta["stage"])
    except (KeyError, ValueError):
        return None
    return stage if isinstance(stage, dict) else None


def load_checkpoint(path: str | os.PathLike, check_values: bool = True) -> dict:
    """The state saved at `path`, tensors on the CPU, with `stage` and `stage_hash` added.

    Raises `SkdcgnError` (one line naming the file and what to do) for a file in an older skdcgn
    format (a `torch.save` pickle), a truncated or foreign file, a broken skeleton, or (unless
    `check_values=False`, for a caller that checks them itself with `io.check_finite`) NaN or
    infinite values anywhere in it (resuming would train garbage)."""
    path = Path(path)
    meta = _metadata(path)
    if meta is None or meta.get("format") != FORMAT:
        raise SkdcgnError(f"{path}: not a training state of this skdcgn version (expected {FORMAT}; "
                          "checkpoints of skdcgn 0.1.0 were torch.save pickles); delete it to start over")
    tensors = load_tensors(path)
    try:
        state = unpack(json.loads(meta["state"]), tensors)
        stage = json.loads(meta["stage"])
    except (KeyError, ValueError, TypeError) as e:
        raise SkdcgnError(f"{path}: damaged training state ({type(e).__name__}: {str(e)[:100]}); "
                          "delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(stage, dict):
        raise SkdcgnError(f"{path}: damaged training state (not an object); delete it to start over")
    if check_values:
        check_finite(state, str(path))
    return {**state, "stage": stage, "stage_hash": meta.get("stage_hash", config_hash(stage))}


def _metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global random generators' states (CPU, and the CUDA device's when on one) as tensors."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Restore what `rng_state` saved (the CUDA state only on a CUDA device, when saved)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
