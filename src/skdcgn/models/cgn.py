"""A CGN: three interchangeable mechanisms (shape, foreground, background) plus the composer.

Every mechanism, teacher or student, has the same interface

    forward(u: Tensor[N, latent_dim], y: LongTensor[N]) -> Tensor[N, C, H, W]

`shape` returns a one-channel mask in [0, 1]; `foreground` and `background` return images in
[-1, 1]. A mechanism whose config says `shifted_texture` gets a seeded random circular shift at
composition time (the CGN-MNIST tile-and-crop step, see `compose.random_shift`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..compose import compose, random_shift
from ..errors import SkdcgnError
from ..io import read_json, write_json
from .pretrained import PretrainedModel, count_params, load_model

MECHANISMS = ("shape", "foreground", "background")
INDEX_FILE = "cgn.json"


class CGNSample(NamedTuple):
    """What `CGN.sample` returns, by name (it still unpacks as `mask, fg, bg, x`). N images of
    H × W pixels, on the CGN's device, in its dtype."""

    mask: Tensor        # [N, 1, H, W] in [0, 1]: the shape mechanism's output m
    foreground: Tensor  # [N, 3, H, W] in [-1, 1]: f (texture-shifted where the mechanism says so)
    background: Tensor  # [N, 3, H, W] in [-1, 1]: b (likewise)
    composite: Tensor   # [N, 3, H, W] in [-1, 1]: x = m·f + (1 − m)·b


class CGN(nn.Module):
    """A Counterfactual Generative Network (Sauer & Geiger, ICLR 2021): three class-conditional
    mechanisms (`shape` → mask m, `foreground` → f, `background` → b) and the composer
    x = m·f + (1 − m)·b. Any mechanism may be a teacher's or a student's (a hybrid); drawing them
    from different classes gives counterfactual images.

    Raises `SkdcgnError` when the mechanisms disagree on the number of classes.
    """

    def __init__(self, shape: PretrainedModel, foreground: PretrainedModel, background: PretrainedModel) -> None:
        super().__init__()
        self.shape, self.foreground, self.background = shape, foreground, background
        n = {m.config.n_classes for m in self.mechanisms().values()}
        if len(n) != 1:
            raise SkdcgnError(f"mechanisms disagree on the number of classes: {sorted(n)}")
        self.n_classes = n.pop()

    def mechanisms(self) -> dict[str, PretrainedModel]:
        """{"shape", "foreground", "background"} → the mechanism modules (in that order)."""
        return {"shape": self.shape, "foreground": self.foreground, "background": self.background}

    def get_num_params(self) -> int:
        """Parameters of the three mechanisms; tensors they share (an embedding) count once."""
        return count_params(self)

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (the mechanisms are moved together with `.to`)."""
        return next(self.parameters()).device

    def run_mechanism(self, name: str, y: Tensor, generator: torch.Generator | None = None,
                      u: Tensor | None = None) -> Tensor:
        """One mechanism's output for classes `y`, with noise (and texture shift) from `generator`."""
        mech = self.mechanisms()[name]
        if u is None:
            u = torch.randn(len(y), mech.config.latent_dim, generator=generator)
        out = mech(u.to(self.device), y.to(self.device))
        if getattr(mech.config, "shifted_texture", False):
            out = random_shift(out, generator)
        return out

    def classes(self, y_shape: Tensor, y_fg: Tensor | None = None, y_bg: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """The class indices of a `sample` call, checked: (y_shape, y_fg, y_bg), int64 [N] each, the
        texture classes left out taken from the shape's. Raises `SkdcgnError` for indices of another
        length or outside [0, n_classes)."""
        y_shape = torch.as_tensor(y_shape, dtype=torch.long)
        y_fg = y_shape if y_fg is None else torch.as_tensor(y_fg, dtype=torch.long)
        y_bg = y_shape if y_bg is None else torch.as_tensor(y_bg, dtype=torch.long)
        for name, y in (("y_shape", y_shape), ("y_fg", y_fg), ("y_bg", y_bg)):
            if y.ndim != 1 or len(y) != len(y_shape) or (len(y) and (y.min() < 0 or y.max() >= self.n_classes)):
                raise SkdcgnError(f"{name}: expected {len(y_shape)} class indices in [0, {self.n_classes})")
        return y_shape, y_fg, y_bg

    @torch.no_grad()
    def sample(self, y_shape: Tensor, y_fg: Tensor | None = None, y_bg: Tensor | None = None,
               generator: torch.Generator | None = None) -> CGNSample:
        """Mask, foreground, background and composite (`CGNSample`) for the given classes.

        `y_shape`, `y_fg`, `y_bg`: int64 [N] class indices in [0, n_classes); classes left out are
        those of the shape (no counterfactual). Noise for each mechanism is drawn independently from
        `generator` (float32 on the CPU, then cast to the model's device and dtype), in the order
        shape, foreground, background. Raises `SkdcgnError` for class indices of another length
        or out of range.
        """
        y_shape, y_fg, y_bg = self.classes(y_shape, y_fg, y_bg)
        mask = self.run_mechanism("shape", y_shape, generator)
        fg = self.run_mechanism("foreground", y_fg, generator)
        bg = self.run_mechanism("background", y_bg, generator)
        return CGNSample(mask, fg, bg, compose(mask, fg, bg))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `folder/{shape,foreground,background}/` (each config.json + model.safetensors) and
        `folder/cgn.json` last, so a folder with `cgn.json` is complete."""
        folder = Path(folder)
        for name, mech in self.mechanisms().items():
            mech.save_pretrained(folder / name)
        write_json(folder / INDEX_FILE, {"mechanisms": list(MECHANISMS)})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "CGN":
        """Load what `save_pretrained` wrote (validated; nothing executed), in eval mode. Raises
        `SkdcgnError` for a missing or foreign `cgn.json` or an invalid mechanism folder."""
        folder = Path(folder)
        index = read_json(folder / INDEX_FILE)
        if index.get("mechanisms") != list(MECHANISMS):
            raise SkdcgnError(f"{folder / INDEX_FILE}: expected mechanisms {list(MECHANISMS)}")
        return cls(*(load_model(folder / name) for name in MECHANISMS)).eval()
