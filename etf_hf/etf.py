"""Simplex equiangular tight frames (ETFs): construction and nearest-frame projection.

A simplex ETF is K unit vectors in R^D whose pairwise cosines all equal -1/(K-1), the geometry that
class means and classifier rows converge to under neural collapse (Papyan et al. 2020; arXiv 2412.00884).
Every frame here is built as

    M = sqrt(K / (K-1)) * U @ (I_K - 1 1^T / K)

with U a D x K matrix that is an isometry on the complement of the all-ones vector. Only the choice of U
differs between bases, so all of them share one exactness test: unit columns and the simplex Gram.

This module is plain tensor math (no nn.Module) so that the layers, the checkpoint code and the tests
all build frames the same way.
"""
from __future__ import annotations

import hashlib
import math

import torch

#: Bases whose frame is a pure function of (K, D, seed): they never need to be stored.
REGENERABLE_BASES: tuple[str, ...] = ("canonical", "orthogonal")
#: Every basis `simplex_etf` accepts.
BASES: tuple[str, ...] = REGENERABLE_BASES + ("nearest",)


def _check_shape(num_vectors: int, dim: int) -> None:
    if num_vectors < 2:
        raise ValueError(f"a simplex ETF needs K >= 2 vectors, got K={num_vectors}")
    if dim < num_vectors - 1:
        raise ValueError(
            f"a simplex ETF of K={num_vectors} vectors needs dimension D >= K-1={num_vectors - 1}, got D={dim}"
        )


def centering_matrix(num_vectors: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """I - 11^T/K: removes the mean vector, which is what makes the frame's vectors equiangular."""
    eye = torch.eye(num_vectors, dtype=dtype)
    return eye - torch.full((num_vectors, num_vectors), 1.0 / num_vectors, dtype=dtype)


def _helmert_rows(num_vectors: int) -> torch.Tensor:
    """(K-1) x K matrix with orthonormal rows orthogonal to the all-ones vector.

    Needed when D = K-1: there is no D x K matrix with orthonormal columns, but one whose rows span the
    complement of 1 still maps the centred simplex isometrically.
    """
    rows = torch.zeros(num_vectors - 1, num_vectors, dtype=torch.float64)
    for i in range(1, num_vectors):
        rows[i - 1, :i] = 1.0
        rows[i - 1, i] = -float(i)
        rows[i - 1] /= math.sqrt(i * (i + 1))
    return rows


def random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Seeded rows x cols (rows >= cols) matrix with orthonormal columns, float64.

    Gaussian draw from a private CPU generator, QR, then the sign fix (columns multiplied by
    sign(diag(R))) that makes Q unique, hence identical in every process and on every machine.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _isometry(num_vectors: int, dim: int, basis: str, seed: int) -> torch.Tensor:
    """The D x K matrix U of the construction, for the regenerable bases."""
    if dim >= num_vectors:
        if basis == "canonical":
            return torch.eye(dim, num_vectors, dtype=torch.float64)
        return random_orthonormal(dim, num_vectors, seed)
    # dim == num_vectors - 1: rotate the Helmert basis of the complement of 1.
    helmert = _helmert_rows(num_vectors)
    if basis == "canonical":
        return helmert
    return random_orthonormal(dim, dim, seed) @ helmert


def nearest_simplex_etf(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The simplex ETF closest to `weight` (D x K) in Frobenius norm, and the optimal scale.

    Minimising ||W - s M|| over frames M = c U P reduces to maximising <W P, U> over isometries U: the
    orthogonal Procrustes problem, solved by the polar factor of the centred weight W P. The best scale
    is then s = <W, M> / ||M||^2 = <W, M> / K. Patching a pretrained layer with this frame keeps it as
    close as an ETF can be to what the layer had learned.
    """
    dim, num_vectors = weight.shape
    _check_shape(num_vectors, dim)
    centred = weight.detach().to(device="cpu", dtype=torch.float64) @ centering_matrix(num_vectors)
    left, _, right_t = torch.linalg.svd(centred, full_matrices=False)
    isometry = left @ right_t
    frame = math.sqrt(num_vectors / (num_vectors - 1)) * isometry @ centering_matrix(num_vectors)
    scale = float((weight.detach().to(device="cpu", dtype=torch.float64) * frame).sum() / num_vectors)
    return frame, scale


def simplex_etf(
    num_vectors: int,
    dim: int,
    basis: str = "orthogonal",
    seed: int = 0,
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A D x K simplex ETF: K unit columns in R^D with pairwise cosine exactly -1/(K-1).

    basis:
      * ``canonical``  - U = eye(D, K), the construction used by the paper's code;
      * ``orthogonal`` - U a seeded random isometry (same seed, same frame, in every process);
      * ``nearest``    - the frame nearest to ``weight`` (D x K), see `nearest_simplex_etf`.
    The frame is computed in float64 and cast to ``dtype`` at the end, so the float32 Gram is exact to
    rounding.
    """
    _check_shape(num_vectors, dim)
    if basis == "nearest":
        if weight is None:
            raise ValueError("basis='nearest' needs the weight to approximate: pass weight=(D x K tensor)")
        if tuple(weight.shape) != (dim, num_vectors):
            raise ValueError(f"basis='nearest': weight has shape {tuple(weight.shape)}, expected (D, K)=({dim}, {num_vectors})")
        return nearest_simplex_etf(weight)[0].to(dtype)
    if basis not in REGENERABLE_BASES:
        raise ValueError(f"unknown ETF basis {basis!r}; choose one of {', '.join(BASES)}")
    isometry = _isometry(num_vectors, dim, basis, seed)
    frame = math.sqrt(num_vectors / (num_vectors - 1)) * isometry @ centering_matrix(num_vectors)
    return frame.to(dtype)


def slot_seed(seed: int, slot_key: str) -> int:
    """Seed of one projection's frame, derived from the user's seed and the slot's identity.

    sha256, not hash(), because it must not vary between processes.
    """
    digest = hashlib.sha256(f"etf_hf:{seed}:{slot_key}".encode()).digest()
    return int.from_bytes(digest[:7], "little")
