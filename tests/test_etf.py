"""The frame math: exact simplex geometry for every basis, reproducibility, and the nearest frame."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from etf_hf import simplex_etf
from etf_hf.etf import BASES, nearest_simplex_etf, slot_seed

SHAPES = [(2, 1), (3, 2), (5, 5), (4, 9), (16, 64), (10, 9)]  # (K, D), including D = K-1 and D = K


def assert_simplex(frame: torch.Tensor) -> None:
    frame = frame.double()
    num_vectors = frame.shape[1]
    gram = frame.t() @ frame
    expected = torch.full_like(gram, -1.0 / (num_vectors - 1))
    expected.fill_diagonal_(1.0)
    assert torch.allclose(gram, expected, atol=1e-6), (gram - expected).abs().max()


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("num_vectors,dim", SHAPES)
def test_every_basis_is_an_exact_simplex_etf(basis: str, num_vectors: int, dim: int) -> None:
    weight = torch.randn(dim, num_vectors) if basis == "nearest" else None
    frame = simplex_etf(num_vectors, dim, basis, seed=3, weight=weight)
    assert frame.shape == (dim, num_vectors) and frame.dtype == torch.float32
    assert_simplex(frame)
    assert torch.allclose(frame.double().sum(1), torch.zeros(dim, dtype=torch.float64), atol=1e-6)


def test_canonical_is_the_papers_construction() -> None:
    frame = simplex_etf(4, 6, "canonical", dtype=torch.float64)
    centring = torch.eye(4, dtype=torch.float64) - 1 / 4
    expected = math.sqrt(4 / 3) * torch.eye(6, 4, dtype=torch.float64) @ centring
    assert torch.equal(frame, expected)


def test_orthogonal_golden_values_pin_the_seeded_frame() -> None:
    """Checkpoints do not store orthogonal frames: a change in how they are drawn would silently
    change every saved model, so the exact values of one frame are pinned here."""
    frame = simplex_etf(4, 6, "orthogonal", seed=0, dtype=torch.float64)
    golden = torch.tensor([
        [-0.8380109688867021, 0.47455933058610195, 0.10065430810705138, 0.26279733019354873],
        [0.1914442135816526, -0.16546324450765937, 0.03435862078040991, -0.06033958985440313],
        [0.06100211447286754, 0.4524857266182082, -0.5716922790411947, 0.0582044379501189],
    ], dtype=torch.float64)
    assert torch.allclose(frame[:3], golden, atol=1e-12)
    assert slot_seed(0, "3:up:c_fc") == 42379390428009734


def test_seed_determines_the_frame() -> None:
    assert torch.equal(simplex_etf(8, 32, seed=5), simplex_etf(8, 32, seed=5))
    assert not torch.allclose(simplex_etf(8, 32, seed=5), simplex_etf(8, 32, seed=6))
    assert len({slot_seed(0, "1:up:fc1"), slot_seed(0, "2:up:fc1"), slot_seed(1, "1:up:fc1")}) == 3


@pytest.mark.slow  # a fresh Python process
def test_same_frame_in_a_fresh_process() -> None:
    code = ("import torch; from etf_hf.etf import simplex_etf; "
            "print(repr(simplex_etf(16, 64, 'orthogonal', seed=11, dtype=torch.float64).sum(0).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = simplex_etf(16, 64, "orthogonal", seed=11, dtype=torch.float64).sum(0).tolist()
    assert eval(out.strip().splitlines()[-1]) == here


def test_nearest_recovers_a_scaled_frame_and_its_scale() -> None:
    true_frame = simplex_etf(8, 20, "orthogonal", seed=1, dtype=torch.float64)
    noisy = 2.5 * true_frame + 0.01 * torch.randn(20, 8, dtype=torch.float64)
    frame, scale = nearest_simplex_etf(noisy)
    assert abs(scale - 2.5) < 0.05
    assert (frame - true_frame).norm() / true_frame.norm() < 0.02


def test_nearest_is_closer_than_other_frames() -> None:
    weight = torch.randn(24, 6, dtype=torch.float64)
    frame, scale = nearest_simplex_etf(weight)
    best = (weight - scale * frame).norm()
    for seed in range(20):
        other = simplex_etf(6, 24, "orthogonal", seed=seed, dtype=torch.float64)
        other_scale = (weight * other).sum() / 6
        assert best <= (weight - other_scale * other).norm() + 1e-12


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_vectors=1, dim=4), "K >= 2"),
    (dict(num_vectors=6, dim=4), "D >= K-1"),
    (dict(num_vectors=4, dim=6, basis="hadamard"), "unknown ETF basis 'hadamard'"),
    (dict(num_vectors=4, dim=6, basis="nearest"), "needs the weight"),
    (dict(num_vectors=4, dim=6, basis="nearest", weight=torch.zeros(4, 6)), "expected (D, K)=(6, 4)"),
])
def test_bad_arguments_name_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        simplex_etf(**kwargs)
