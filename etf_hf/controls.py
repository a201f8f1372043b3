"""Control frames: fixed weights that are *not* ETFs, placed exactly where an ETF would go.

A good number for a fixed-ETF layer can mean three different things: the simplex geometry helps, the
layer was dispensable, or only its weight scale mattered. The controls separate them at the same
placement (same ``layers``, ``projections``, gain rule and save/load path as the ETF modes):

  * ``gaussian`` - a seeded Gaussian matrix rescaled to the ETF's Frobenius norm (sqrt(K) for K unit
    frame vectors): same scale, no geometry. Regenerated from its seed like an orthogonal frame;
  * ``zero``     - an all-zero weight: the projection keeps only its (trainable) bias, i.e. the layer's
    weight is dispensed with altogether;
  * ``frozen``   - the layer's own current weight (pretrained, or the random initial one), rescaled to
    the ETF's norm so that ``gain="match"`` restores it exactly: what plain freezing would do. It
    depends on the old weight, so checkpoints store it (like ``nearest``).

Plain tensor math in the ETF frame's D x K orientation (see `etf.simplex_etf`), no nn.Module.
"""
from __future__ import annotations

import math

import torch

#: Bases that are controls, not ETFs; tables label them as such.
CONTROL_BASES: tuple[str, ...] = ("gaussian", "zero", "frozen")
#: Controls that are a pure function of (K, D, seed), so they are regenerated instead of stored.
REGENERABLE_CONTROLS: tuple[str, ...] = ("gaussian", "zero")


def control_frame(num_vectors: int, dim: int, basis: str, seed: int = 0, weight: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The D x K control matrix standing in for a K-vector simplex ETF in R^D.

    ``gaussian`` and ``frozen`` have the ETF's Frobenius norm sqrt(K), so the layer's gain plays the same
    role as for an ETF; ``zero`` has norm 0 (its gain then has no effect and receives no gradient).
    Computed in float64 from a private CPU generator, so the same seed gives the same matrix everywhere.
    """
    if num_vectors < 1 or dim < 1:
        raise ValueError(f"a control frame needs K >= 1 and D >= 1, got K={num_vectors}, D={dim}")
    if basis == "zero":
        return torch.zeros(dim, num_vectors, dtype=dtype)
    if basis == "gaussian":
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        matrix = torch.randn(dim, num_vectors, generator=generator, dtype=torch.float64)
    elif basis == "frozen":
        if weight is None:
            raise ValueError("basis='frozen' keeps the layer's own weight: pass weight=(D x K tensor)")
        if tuple(weight.shape) != (dim, num_vectors):
            raise ValueError(f"basis='frozen': weight has shape {tuple(weight.shape)}, expected (D, K)=({dim}, {num_vectors})")
        matrix = weight.detach().to(device="cpu", dtype=torch.float64)
        if not bool(matrix.abs().sum() > 0):
            raise ValueError("basis='frozen' got an all-zero weight: use basis='zero' for the zeroed control")
    else:
        raise ValueError(f"unknown control basis {basis!r}; choose one of {', '.join(CONTROL_BASES)}")
    return (matrix * (math.sqrt(num_vectors) / matrix.norm())).to(dtype)
