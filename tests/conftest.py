"""Shared test fixtures."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point SKDCGN_CACHE at a fresh folder: tests never read or write the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKDCGN_CACHE", str(tmp_path_factory.mktemp("skdcgn-cache")))
        mp.delenv("SKDCGN_MNIST_DIR", raising=False)
        yield os.environ["SKDCGN_CACHE"]
