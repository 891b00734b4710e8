"""The public loaders: one way to get a CGN (teacher or students) and a classifier."""
from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from torch import nn

from .errors import SkdcgnError

if TYPE_CHECKING:
    from .models.cgn import CGN


def load_cgn(name_or_path: str | os.PathLike) -> CGN:
    """A CGN from a shipped teacher name, `students:<run dir>`, or a saved CGN folder.

    - `colored`, `double_colored`, `wildlife`: the released CGN-MNIST teachers (shipped).
    - `students:<dir>`: distilled students; `<dir>` is a run directory, its `distill/` folder, or
      a folder holding `shape/`, `foreground/` and `background/` student folders.
    - a path to a folder written by `CGN.save_pretrained`, or an original CGN-MNIST `.pth` file.
    - `imagenet-biggan:<dir>`: the CGN-ImageNet initialisation, a BigGAN-deep checkpoint folder
      (config.json + pytorch_model.bin) for all three mechanisms, with U2-Net's `u2net.pth` in it.
    - `imagenet-cgn:<file>`: a trained CGN-ImageNet state_dict (f_shape, f_text, f_bg, biggan_GT, u2net).
    - `hybrid:<base>,<mechanism>=<spec>,...`: a hybrid CGN, any mix of mechanisms: those named are
      taken from their own spec, the others from `<base>` (any spec above; no commas in paths), e.g.
      `hybrid:students:runs/dc,shape=double_colored` (the teacher's shape, the students' textures).
    (The ImageNet teachers need `pip install 'skdcgn[imagenet]'`; see docs/imagenet.md.)

    Raises `SkdcgnError` (one line) for an unknown name, a missing or invalid file or folder, or
    a hybrid whose mechanisms disagree on the number of classes.
    """
    from .models.cgn import CGN, MECHANISMS
    from .models.cgn_mnist import SHIPPED_TEACHERS, load_original_cgn_mnist, shipped_teacher_path
    from .models.pretrained import load_model

    spec = str(name_or_path)
    if spec.startswith("hybrid:"):
        return _hybrid(spec[len("hybrid:"):])
    if spec.startswith(("imagenet-biggan:", "imagenet-cgn:")):
        from .models.imagenet import load_biggan_folder, load_cgn_imagenet

        kind, _, target = spec.partition(":")
        if kind == "imagenet-cgn":
            return load_cgn_imagenet(target)
        u2net = Path(target) / "u2net.pth"
        if not u2net.is_file():
            raise SkdcgnError(f"{u2net}: file not found (put U2-Net's u2net.pth beside the BigGAN checkpoint)")
        return load_biggan_folder(target, u2net=u2net)
    if spec in SHIPPED_TEACHERS:
        return load_original_cgn_mnist(shipped_teacher_path(spec))
    if spec.startswith("students:"):
        root = Path(spec[len("students:"):])
        for folder in (root / "distill" / "students", root / "students", root):
            if all((folder / m / "config.json").is_file() for m in MECHANISMS):
                return CGN(*(load_model(folder / m) for m in MECHANISMS)).eval()
        raise SkdcgnError(f"{root}: no distilled students found (expected shape/, foreground/ and background/ folders)")
    path = Path(spec)
    if path.is_file() and path.suffix in (".pth", ".pt"):
        return load_original_cgn_mnist(path)
    if path.is_dir():
        return CGN.from_pretrained(path)
    raise SkdcgnError(f"{spec!r}: not a shipped teacher ({', '.join(SHIPPED_TEACHERS)}), 'students:<run dir>', a CGN folder or a .pth file")


def _hybrid(text: str) -> "CGN":
    """`<base>,<mechanism>=<spec>,...` → a CGN of the base's mechanisms with the named ones replaced."""
    from .models.cgn import CGN, MECHANISMS

    base, *overrides = [part.strip() for part in text.split(",")]
    picked: dict[str, str] = {}
    for item in overrides:
        mech, eq, sub = item.partition("=")
        if not eq or mech not in MECHANISMS or not sub:
            raise SkdcgnError(f"hybrid: {item!r} is not <mechanism>=<spec> with a mechanism of {', '.join(MECHANISMS)}")
        if mech in picked:
            raise SkdcgnError(f"hybrid: {mech} given twice")
        picked[mech] = sub
    if not base or "=" in base.split(":", 1)[0]:
        raise SkdcgnError("hybrid: expected hybrid:<base spec>,<mechanism>=<spec>,... (the base first)")
    loaded = {s: load_cgn(s) for s in {base, *picked.values()}}  # each spec loaded once
    return CGN(**{m: getattr(loaded[picked.get(m, base)], m) for m in MECHANISMS}).eval()


def load_classifier(path: str | os.PathLike) -> nn.Module:
    """A trained invariant classifier (a folder of `Classifier.save_pretrained`): images
    float [N, 3, 32, 32] in [-1, 1] → logits float32 [N, n_classes], in eval mode. Raises
    `SkdcgnError` for a folder that holds another kind of model, or an invalid one."""
    from .models.classifier import Classifier

    return Classifier.from_pretrained(path)
