"""Shared fixtures: tiny models built from configs, and the optional real data in ../shared/data."""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (or $ETF_HF_SHARED_DATA); None on a fresh clone."""
    candidate = Path(os.environ.get("ETF_HF_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (a fresh clone has none)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole suite: tiny models gain nothing from more on a 2-core machine
    (2 threads under load measured 15-20x slower per step), and bit-exact resume comparisons hold only
    at equal thread counts."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move everything alive after collection (torch, transformers, every test module: millions of objects)
    out of the garbage collector's reach: `gc.collect`, which the runner calls between modes to measure
    memory (and transformers calls too), otherwise traverses them all each time (~0.3 s a call here).
    Objects the tests create are collected as usual."""
    gc.freeze()
