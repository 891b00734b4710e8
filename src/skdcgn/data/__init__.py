"""MNIST and its CGN variants (colored, double_colored, wildlife), built locally and cached.

This package depends only on skdcgn's io/errors helpers, never on models or distillation.
"""
from __future__ import annotations

from .mnist import load_mnist
from .variants import SPLITS, VARIANTS, build_variant, load_variant, load_variant_uint8

__all__ = ["SPLITS", "VARIANTS", "build_variant", "load_mnist", "load_variant", "load_variant_uint8"]
