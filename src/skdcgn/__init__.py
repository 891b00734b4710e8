"""skdcgn: source-free knowledge distillation of counterfactual generative networks."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import load_cgn, load_classifier  # noqa: E402

__all__ = ["__version__", "load_cgn", "load_classifier"]
