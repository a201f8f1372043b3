"""A fixed simplex-ETF classification head, and the dot-regression loss that trains features towards it.

The head is the classic fixed classifier that the paper builds on: the K x hidden logit layer becomes
K fixed class vectors forming a simplex ETF (one row per class), times a trainable gain, plus the old
layer's bias. `ETFClassifier` is an `ETFLinear` whose frame vectors are *always the rows*: `ETFLinear`
puts the frame on the narrow side of the weight, which for K < hidden is the rows anyway, but for
K = hidden or hidden + 1 (still a valid simplex ETF, dimension >= K - 1) would be the columns, i.e. not
one vector per class. Everything else (frame buffers, regeneration after loading, storage, gain named
``frame_norm``) is `ETFLinear`'s, so saving, loading, materialize and parameter counts treat the head
like any FFN frame.

Dot-regression loss (Yang et al., "Inducing Neural Collapse in Imbalanced Learning: Do We Really Need a
Learnable Classifier at the End of Deep Neural Network?", NeurIPS 2022): with a fixed ETF classifier,
cross-entropy keeps pushing on feature norms and on the other classes; the dot-regression loss only pulls
each feature towards its own class vector,

    L(h, W) = 1 / (2 E_W E_H) * (w_y^T h - E_W E_H)^2,   ||w_y|| = E_W, ||h|| = E_H.

We use the paper's normalised form (features and class vectors scaled to unit norm, E_W = E_H = 1):

    L = 1/2 * (cos(h, w_y) - 1)^2

so neither the head's gain nor the features' scale enters the loss (the gain and the head's bias then
receive no gradient from it; predictions are argmax_c gain * <w_c, h> + b_c, so the head's bias must be
zero, which `DotRegressionLoss` checks).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .architectures import find_head
from .controls import CONTROL_BASES, control_frame
from .etf import simplex_etf
from .layers import REGENERABLE, ETFLinear


def classifier_frame(in_features: int, out_features: int, basis: str, seed: int,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (K, hidden) = (out, in) fixed weight of a classifier: K class vectors as rows, float32.

    For K < hidden this equals `layers.oriented_frame` (rows are the narrow side); for K in
    {hidden, hidden + 1} it keeps the rows where `ETFLinear` would switch to columns. ``weight`` is the
    old (K, hidden) classifier, needed by ``nearest`` and ``frozen``.
    """
    build = control_frame if basis in CONTROL_BASES else simplex_etf
    target = None if weight is None else weight.t()
    return build(out_features, in_features, basis, seed, target, dtype=torch.float32).t().contiguous()


class ETFClassifier(ETFLinear):
    """A Linear classifier (hidden -> K) whose weight is a fixed K-row simplex ETF times a gain, plus bias."""

    def __init__(self, in_features: int, out_features: int, *, basis: str, seed: int, bias: bool = True,
                 gain: float = 1.0, trainable_gain: bool = True, frame: torch.Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if basis == "structured" and out_features >= in_features:
            raise ValueError(
                f"a structured frame puts its vectors on the narrow side of the weight, which for a head with "
                f"K={out_features} >= hidden={in_features} is not the classes: use head_basis 'orthogonal', "
                f"'canonical' or 'nearest' for this head")
        if frame is None and basis != "structured":
            if basis not in REGENERABLE:
                raise ValueError(f"basis={basis!r} cannot be regenerated: pass the frame (see ETFClassifier.from_classifier)")
            frame = classifier_frame(in_features, out_features, basis, seed)
        super().__init__(in_features, out_features, basis=basis, seed=seed, bias=bias, gain=gain,
                         trainable_gain=trainable_gain, frame=frame, device=device, dtype=dtype)

    @classmethod
    def from_classifier(cls, layer: nn.Linear, *, basis: str, seed: int, gain: str | float = "match",
                        trainable_gain: bool = True) -> ETFClassifier:
        """The fixed replacement of a Linear classifier, keeping its bias.

        ``gain="match"`` gives the fixed layer the old weight's Frobenius norm (the frame's is sqrt(K));
        for ``nearest`` and ``frozen``, the least-squares scale <W, frame> / K. On the meta device no frame
        is computed (it is loaded or regenerated afterwards).
        """
        weight = layer.weight
        classes, hidden = weight.shape
        frame = None
        scale = 1.0
        if weight.is_meta:
            frame = None if basis == "structured" else torch.empty(classes, hidden, device="meta")
        elif basis not in REGENERABLE:
            frame = classifier_frame(hidden, classes, basis, seed, weight=weight.detach())
            scale = float((weight.detach().double().cpu() * frame).sum()) / classes
        else:
            scale = float(weight.detach().double().norm()) / math.sqrt(classes)
        if gain != "match":
            scale = float(gain)
        module = cls(hidden, classes, basis=basis, seed=seed, bias=layer.bias is not None, gain=scale,
                     trainable_gain=trainable_gain, frame=frame, device=weight.device, dtype=weight.dtype)
        if layer.bias is not None and not weight.is_meta:
            with torch.no_grad():
                module.bias.copy_(layer.bias)
        return module

    def reset_frame(self) -> None:
        """Recompute a regenerable frame in place, rows = classes (a structured plan is `ETFLinear`'s)."""
        if not self.regenerable or self.structured:
            super().reset_frame()
            return
        frame = classifier_frame(self.in_features, self.out_features, self.basis, self.seed)
        with torch.no_grad():
            self.frame.copy_(frame.to(device=self.frame.device, dtype=self.frame.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, classes={self.out_features}, basis={self.basis}, frame=rows, "
                f"bias={self.bias is not None}")


def dot_regression_loss(features: torch.Tensor, labels: torch.Tensor, class_vectors: torch.Tensor,
                        num_items_in_batch: int | torch.Tensor | None = None,
                        ignore_index: int = -100) -> torch.Tensor:
    """Sum over labelled items of 1/2 (cos(h_i, w_{y_i}) - 1)^2, divided by ``num_items_in_batch``
    (default: the number of labelled items here, i.e. the mean).

    features: (..., hidden); labels: the leading shape of ``features``, ``ignore_index`` skipped;
    class_vectors: (K, hidden), one row per class. Computed in float32 at least. Dividing by
    ``num_items_in_batch`` is Trainer's contract for ``compute_loss_func`` (the count of the whole
    accumulated, and under DDP gathered, batch), which keeps gradient accumulation exact.
    """
    if tuple(features.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"dot_regression_loss needs one feature vector per label: features {tuple(features.shape)} vs labels "
            f"{tuple(labels.shape)}. A head applied to every token and pooled afterwards (GPT-2's score) is not "
            f"supported; use cross-entropy there")
    dtype = torch.promote_types(features.dtype, torch.float32)
    h = features.reshape(-1, features.shape[-1]).to(dtype)
    y = labels.reshape(-1).to(features.device)
    keep = y != ignore_index
    h, y = h[keep], y[keep].long()
    w = class_vectors.to(device=h.device, dtype=dtype)[y]
    cosine = (h * w).sum(-1) / (h.norm(dim=-1) * w.norm(dim=-1)).clamp_min(torch.finfo(dtype).tiny)
    total = 0.5 * (cosine - 1).square().sum()
    count = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
    return total / count


class DotRegressionLoss:
    """``Trainer(compute_loss_func=DotRegressionLoss(model))``: the dot-regression loss against the model's
    fixed ETF head (patch with ``ETFConfig(head=True)`` first).

    The loss needs the features the head reads, which model outputs do not carry; a forward pre-hook on
    the head captures them in each forward, and the call, which Trainer makes right after that forward
    with ``(outputs, labels, num_items_in_batch=...)``, consumes them. Call `remove` to detach the hook.

    Because the loss ignores the head's gain and bias, they receive no gradient: under DDP set
    ``ddp_find_unused_parameters=True``.
    """

    def __init__(self, model: nn.Module) -> None:
        slot = find_head(model)
        layer = getattr(slot.parent, slot.attribute)
        if not isinstance(layer, ETFLinear):
            raise ValueError(f"DotRegressionLoss trains features towards a fixed head, but {type(model).__name__}."
                             f"{slot.name} is a trainable {type(layer).__name__}: patch the model with "
                             f"etf_hf.ETFConfig(head=True) first")
        if layer.bias is not None and bool(layer.bias.detach().abs().max() > 0):
            raise ValueError(
                f"{slot.name} has a nonzero bias (max |b| = {float(layer.bias.detach().abs().max()):.3g}); the "
                f"dot-regression loss does not train it, and a fixed nonzero bias would shift the predicted class. "
                f"Zero it first: torch.nn.init.zeros_(model.{slot.name}.bias)")
        self.head = layer
        self._features: torch.Tensor | None = None
        self._hook = layer.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._features = args[0]

    def __call__(self, outputs: Any, labels: torch.Tensor | None,
                 num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("DotRegressionLoss: the head ran no forward since the last loss call; pass the "
                               "outputs of the model this loss was built for")
        if labels is None:
            raise ValueError("DotRegressionLoss needs labels: the batch has no 'labels'")
        return dot_regression_loss(features, labels, self.head.frame, num_items_in_batch)

    def remove(self) -> None:
        """Detach the feature hook from the head."""
        self._hook.remove()
