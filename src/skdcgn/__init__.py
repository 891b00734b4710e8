"""skdcgn: source-free knowledge distillation of counterfactual generative networks.

`load_cgn` and `load_classifier` are imported on first use, so that `import skdcgn` (and the
command line, which must answer Ctrl-C from its first instruction) does not wait for torch.
"""
from __future__ import annotations

from ._version import __version__
__all__ = ["__version__", "load_cgn", "load_classifier"]


def __getattr__(name: str):
    if name in ("load_cgn", "load_classifier"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'skdcgn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
