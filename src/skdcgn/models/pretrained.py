"""Models that save and load themselves: `config.json` (constructor arguments) + `model.safetensors`.

A model class declares a `Config` dataclass and takes it as its only constructor argument.
Registered classes can be loaded from a folder without knowing the class beforehand
(`load_model`); nothing in a folder is ever executed.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from ..config import config_from_dict
from ..errors import SkdcgnError
from ..io import check_recorded, check_state_dict, load_tensors, read_json, save_tensors, strip_wrapper_prefix, write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_REGISTRY: dict[str, type["PretrainedModel"]] = {}

M = TypeVar("M", bound="PretrainedModel")


def count_params(module: nn.Module) -> int:
    """Number of parameters of `module` (a tensor shared between submodules counts once): the
    one count behind `get_num_params` and the cost tables."""
    return sum(p.numel() for p in module.parameters())


def register(cls: type[M]) -> type[M]:
    """Class decorator: make `cls` loadable by name from a saved folder."""
    _REGISTRY[cls.__name__] = cls
    return cls


class PretrainedModel(nn.Module):
    """Base class of the models that save to and load from a folder.

    Subclasses set `Config` (a dataclass) and take one instance of it as their constructor argument;
    decorate them with `register` so that `load_model` can rebuild them by class name.
    """
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def get_num_params(self) -> int:
        """Number of parameter elements (tensors shared between modules count once)."""
        return count_params(self)

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the weights (float32 unless the model was cast with
        `.to(dtype)`, `.half()` or `.bfloat16()`)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def as_input(self, u: Tensor) -> Tensor:
        """Noise `u` (any float dtype, any device) on this model's device and in its dtype: noise
        is drawn in float32 on the CPU, so the same generator gives the same draws at any precision."""
        p = next(self.parameters(), None)
        return u.to(device=p.device if p is not None else u.device, dtype=self.dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `model.safetensors` (the state_dict), then `config.json` (class name + config) into `folder`.

        The config is written last, so a folder with a config has its weights.
        """
        folder = Path(folder)
        # weights first, config last: a folder with a config has its weights
        save_tensors(folder / WEIGHTS_FILE, self.state_dict())
        write_json(folder / CONFIG_FILE, {"class": type(self).__name__, "config": dataclasses.asdict(self.config)})

    @classmethod
    def from_pretrained(cls: type[M], folder: str | os.PathLike) -> M:
        """Load a saved folder with `load_model` (checked, in eval mode).

        Raises `SkdcgnError` if the folder holds a model that is not an instance of `cls`.
        """
        model = load_model(folder)
        if not isinstance(model, cls):
            raise SkdcgnError(f"{folder}: holds a {type(model).__name__}, expected a {cls.__name__}")
        return model


def load_model(folder: str | os.PathLike) -> PretrainedModel:
    """Load any registered model from `folder` (config.json + model.safetensors), validated.

    When the manifest of the stage that wrote them (in `folder` or its parent) records their
    sha256, both files must still have it. Raises SkdcgnError (one line naming the file) for a
    missing, changed, malformed or mismatched file.
    """
    folder = Path(folder)
    check_recorded(folder / CONFIG_FILE)
    check_recorded(folder / WEIGHTS_FILE)
    meta = read_json(folder / CONFIG_FILE)
    name = meta.get("class")
    if name not in _REGISTRY:
        raise SkdcgnError(f"{folder / CONFIG_FILE}: unknown model class {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[name]
    if not isinstance(meta.get("config"), dict):
        raise SkdcgnError(f"{folder / CONFIG_FILE}: 'config' must be an object")
    config = config_from_dict(cls.Config, meta["config"], str(folder / CONFIG_FILE))
    model = cls(config)
    state = strip_wrapper_prefix(load_tensors(folder / WEIGHTS_FILE), str(folder / WEIGHTS_FILE))
    check_state_dict(state, model.state_dict(), str(folder / WEIGHTS_FILE))
    model.load_state_dict(state)
    return model.eval()

