"""Shared fixtures: tiny models built from configs, and the optional real data in ../shared/data."""
from __future__ import annotations

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
