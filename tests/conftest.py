"""Shared test fixtures."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point SKDCGN_CACHE at a fresh folder: tests never read or write the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKDCGN_CACHE", str(tmp_path_factory.mktemp("skdcgn-cache")))
        mp.delenv("SKDCGN_MNIST_DIR", raising=False)
        yield os.environ["SKDCGN_CACHE"]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than two, and kinder to a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
