"""What every training loop shares, so that each loop reads as its maths.

The three trainers (`teacher_training.train_teacher`, `distill.trainer.train_student`,
`invariance.train_classifier`) keep their losses behind one interface in the manner of
stylegan2-ada's `loss.accumulate_gradients(phase, ...)` (each phase computes its loss and calls
backward; the loop zeroes and steps the optimizers) and take the rest from here:

- `restore`: load a checkpoint's parts (models, optimizers, schedulers, generator states) into
  their objects, turning any mismatch into one line naming the checkpoint (`usable_checkpoint`);
- `due`: whether a periodic action (log, samples, checkpoint) falls on this step;
- `cosine_scale` / `set_lr`: the learning-rate schedule, written once (nanoGPT's `get_lr`);
- `update_ema`: the EMA copy of a generator (stylegan2-ada's `G_ema`).

Saving goes through `skdcgn.checkpoint` (the one training-state format); metrics through
`skdcgn.runlog.MetricsLog`. None of these helpers draws a random number or changes the order of
floating-point operations: a trainer moved onto them computes bitwise what it computed before.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .errors import SkdcgnError, first_line

# what a state_dict that does not fit its object raises (PyTorch and our own checks)
STATE_ERRORS = (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError)


@contextlib.contextmanager
def usable_checkpoint(path: str | os.PathLike, hint: str = "delete it to start over") -> Iterator[None]:
    """Run the block that reads a checkpoint's state; a state that does not fit (a missing key, a
    wrong shape, a bad value: `STATE_ERRORS`) becomes one `SkdcgnError`:
    "<path>: not a usable checkpoint for this run (<first line>); <hint>"."""
    try:
        yield
    except STATE_ERRORS as e:
        raise SkdcgnError(f"{path}: not a usable checkpoint for this run ({first_line(e)}); {hint}") from None


def restore(state: Mapping[str, Any], parts: Mapping[str, Any], path: str | os.PathLike,
            hint: str = "delete it to start over") -> None:
    """Load `state[name]` into each of `parts` ({name: object}): an object with `load_state_dict`
    (module, optimizer, scheduler), a `torch.Generator` (its `set_state`), or a callable taking
    the value; a part that is None is skipped. Raises `SkdcgnError` (see `usable_checkpoint`)
    when the state lacks a part or a part does not fit."""
    with usable_checkpoint(path, hint):
        for name, part in parts.items():
            if part is None:
                continue
            value = state[name]
            if isinstance(part, torch.Generator):
                part.set_state(value)
            elif hasattr(part, "load_state_dict"):
                part.load_state_dict(value)
            elif callable(part):
                part(value)
            else:
                raise TypeError(f"cannot restore {name!r} into a {type(part).__name__}")


def due(step: int, every: int, last: int) -> bool:
    """True on the steps (counted from 1) where an action repeated `every` steps falls, and on the
    last step; `every` ≤ 0 means only the last."""
    return step == last or (every > 0 and step % every == 0)


def cosine_scale(step: int, total: int) -> float:
    """Learning-rate factor in [0, 1] at `step` of `total`: ½(1 + cos(π·step/total)), from 1 down
    to 0 (the cosine schedule without warm-up, Loshchilov & Hutter, ICLR 2017)."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def set_lr(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    """Set the learning rate of every parameter group of `optimizer` (None: nothing to do)."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr


@torch.no_grad()
def update_ema(ema: nn.Module | None, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for parameters (`lerp_`); buffers (BatchNorm
    statistics) are copied. `ema` None: nothing to do."""
    if ema is None:
        return
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


__all__ = ["STATE_ERRORS", "usable_checkpoint", "restore", "due", "cosine_scale", "set_lr", "update_ema"]
