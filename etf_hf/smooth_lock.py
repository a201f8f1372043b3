"""Smooth Adaptive-ETF locks: replace a dense weight W by gain * frame while changing the layer's output on
the probe data as little as the frame allows.

Why: a lock that copies the frame in with a gain fitted to W alone (``nearest``'s Frobenius scale) still
moves the layer's output by about half its norm on a trained MLP (||W - g F|| / ||W|| = 0.54), and the loss
jumps (+36 % for one block of a digits MLP, +115 % for four; issue 15). Given the frame F, the output error
on inputs x with mean m and covariance S is, per example,

    (W - g F)(x - m)  +  (W - g F) m  +  (b - b')

so the bias absorbs the second term exactly (b' = b + (W - g F) m) and the gain minimising the first in
the mean square is the least-squares one, g = tr(W S F^T) / tr(F S F^T). For a ``nearest`` lock the
frame itself can be chosen in the same metric: `output_nearest_frame` (the frame nearest to W where the
probe's inputs vary, not in every direction alike) halves the output error of the Frobenius-nearest
frame on a trained Fashion-MNIST MLP (relative output error 0.47 -> 0.27 for block 3 after 3 epochs). Both need only the first two
moments of the layer's input on the probe, which `input_moments` streams (and all-reduces under DDP, so
every rank fits the same numbers). After a lock the BatchNorm running statistics describe activations the
model no longer produces: `refresh_batch_norm` re-estimates them on the probe (the cumulative average
`torch.optim.swa_utils.update_bn` uses, for dict batches).

No nn.Module lives here besides the functions' arguments; the ETF layer is reached through its public
``frame``, ``frame_norm`` and ``bias``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import math

import torch
from torch import nn

from .etf import centering_matrix

ReduceFn = Callable[[torch.Tensor], Any]


def _on(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward_all(model: nn.Module, batches: Iterable[Mapping[str, Any]], training: bool) -> None:
    """One no-grad forward of every batch with the model in train or eval mode, its mode restored after
    (what the probe statistics and the BatchNorm refresh both need)."""
    was_training = model.training
    model.train(training)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**_on(batch, _device(model)))
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def input_moments(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Mapping[str, Any]],
                  reduce_fn: ReduceFn | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (mean (in,), covariance (in, in))} of each layer's input over ``batches``, float64 on the CPU.

    One forward pass of ``model`` in eval mode (the function a lock must preserve is the model's inference
    function), without gradients; every leading dimension of an input (tokens too) counts as an example.
    ``reduce_fn`` (an in-place all-reduce sum) combines the ranks' sums, so all ranks get the same moments.
    """
    sums: dict[str, list[torch.Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
            new = [count, x.sum(0), x.t() @ x]
            if name in sums:
                sums[name] = [a + b for a, b in zip(sums[name], new)]
            else:
                sums[name] = new
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        _forward_all(model, batches, training=False)
    finally:
        for handle in handles:
            handle.remove()
    moments = {}
    for name, (count, total, outer) in sums.items():
        if reduce_fn is not None:
            for tensor in (count, total, outer):
                reduce_fn(tensor)
        mean = (total / count).cpu()
        moments[name] = (mean, (outer / count).cpu() - torch.outer(mean, mean))
    missing = set(layers) - set(moments)
    if missing:
        raise ValueError(f"the probe data never reached {sorted(missing)}: no input statistics for a smooth lock")
    return moments


def output_nearest_frame(weight: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor | None:
    """The simplex ETF F (out, in) minimising min_g E||(W - g F)(x - m)||^2 for inputs of covariance S, for an
    up-projection or square layer (out >= in: the frame's K = in vectors are its columns); None otherwise.

    With F = c U P (P = I - 11^T/K, U an isometry, c = sqrt(K / (K - 1))), ||F S^(1/2)|| does not depend on
    U, so the best U maximises tr(U^T W S P): the orthogonal Procrustes problem, solved by the polar factor
    of W S P (as `etf_hf.etf.nearest_simplex_etf` solves it for S = I). For a down-projection the frame's
    vectors are rows and ||F S^(1/2)|| depends on U: no closed form, and the caller keeps the
    Frobenius-nearest frame. Returned in float32, like every frame.
    """
    out_features, in_features = weight.shape
    if out_features < in_features:
        return None
    centring = centering_matrix(in_features)
    target = weight.detach().to(device="cpu", dtype=torch.float64) @ covariance.to(torch.float64) @ centring
    left, _, right_t = torch.linalg.svd(target, full_matrices=False)
    return (math.sqrt(in_features / (in_features - 1)) * (left @ right_t) @ centring).to(torch.float32)


def fit_gain(weight: torch.Tensor, frame: torch.Tensor, covariance: torch.Tensor) -> float:
    """The gain g minimising E||(W - g F)(x - m)||^2 for inputs of covariance S: tr(W S F^T) / tr(F S F^T).

    Falls back to the Frobenius least-squares gain <W, F> / <F, F> when the probe's inputs do not vary
    along the frame (a zero denominator).
    """
    w, f, s = (t.detach().to(device="cpu", dtype=torch.float64) for t in (weight, frame, covariance))
    projected = f @ s
    denominator = float((projected * f).sum())
    if denominator <= 1e-12 * max(float((f * f).sum()), 1e-300) * max(float(s.diagonal().abs().max()), 1e-300):
        return float((w * f).sum() / (f * f).sum())
    return float((w @ s * f).sum()) / denominator


def folded_bias(weight: torch.Tensor, bias: torch.Tensor, frame: torch.Tensor, gain: float,
                mean: torch.Tensor) -> torch.Tensor:
    """b + (W - g F) m: the bias that keeps the layer's mean output on the probe unchanged, in ``bias``'s
    dtype and device."""
    residual = weight.detach().double().cpu() - gain * frame.detach().double().cpu()
    return (bias.detach().double().cpu() + residual @ mean).to(device=bias.device, dtype=bias.dtype)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def refresh_batch_norm(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches`` (their cumulative average, as
    `torch.optim.swa_utils.update_bn` does); returns how many BatchNorm layers were refreshed.

    The forward passes run in train mode (that is what makes BatchNorm update its statistics) without
    gradients; momentum and the model's mode are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    try:
        _forward_all(model, batches, training=True)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return len(norms)


def probe_loss(model: nn.Module, batches: Iterable[Mapping[str, Any]], reduce_fn: ReduceFn | None = None) -> float | None:
    """The model's mean loss over ``batches`` in eval mode (each batch's loss weighted by its example count);
    None when the model returns no loss (the batches carry no labels)."""
    total = torch.zeros(2, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                output = model(**_on(batch, _device(model)))
                loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
                if loss is None:
                    return None
                count = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
                total += torch.tensor([float(loss) * count, count], dtype=torch.float64)
    finally:
        model.train(was_training)
    if reduce_fn is not None:
        device = _device(model)
        total = total.to(device)
        reduce_fn(total)
        total = total.cpu()
    return float(total[0] / total[1])
