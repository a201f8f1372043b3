"""`ETFLinear`: a linear layer whose weight is a fixed simplex ETF times a trainable scalar gain.

Design constraints, each from a way transformers 5.x or the optimizer could break a fixed frame:
  * the frame is a buffer, never a Parameter: the optimizer cannot see it, weight decay cannot move it,
    and reloading cannot flip it to requires_grad=True;
  * frames that can be regenerated (canonical, orthogonal) are non-persistent buffers, rebuilt from
    their recipe after loading (transformers fills non-persistent buffers with uninitialised memory),
    so checkpoints do not carry them; a ``nearest`` frame depends on the old weight and is persistent;
  * the gain is named ``frame_norm`` (it is the norm of every frame vector), so Trainer's weight-decay
    rule exempts it like a LayerNorm scale instead of pulling it towards zero.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .etf import REGENERABLE_BASES, simplex_etf


class _FixedFrameLinear(torch.autograd.Function):
    """y = gain * (x @ frame^T) + bias with a fixed frame.

    The frame needs no gradient, so backward needs no input for grad_x; only the gain's gradient,
    <grad_y, x @ frame^T> = <grad_y @ frame, x>, needs an activation. We keep whichever of x or the
    pre-gain output is narrower (the d side of a d <-> 4d projection), and nothing at all when the gain
    is fixed. Autocast is honoured explicitly: the frame is cast to the compute dtype per call.
    """

    @staticmethod
    def forward(ctx, x, frame, gain, bias):  # type: ignore[override]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = x.dtype
        with torch.autocast(device_type, enabled=False):
            pre_gain = torch.nn.functional.linear(x.to(compute_dtype), frame.to(compute_dtype))
            out = pre_gain * gain.to(compute_dtype)
            if bias is not None:
                out = out + bias.to(compute_dtype)
        ctx.compute_dtype = compute_dtype
        ctx.input_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_pre_gain = frame.shape[0] <= frame.shape[1]
        if ctx.needs_input_grad[2]:
            ctx.save_for_backward(frame, gain, pre_gain if ctx.save_pre_gain else x)
        else:
            ctx.save_for_backward(frame, gain)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        frame, gain = ctx.saved_tensors[:2]
        compute_dtype = ctx.compute_dtype
        grad_out = grad_out.to(compute_dtype)
        grad_x = grad_gain = grad_bias = None
        frame_grad = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[2] and not ctx.save_pre_gain):
            frame_grad = grad_out @ frame.to(compute_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (frame_grad * gain.to(compute_dtype)).to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            saved = ctx.saved_tensors[2]
            partner = grad_out if ctx.save_pre_gain else frame_grad
            grad_gain = (partner.float() * saved.float()).sum().to(gain.dtype).reshape(gain.shape)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_gain, grad_bias


def frame_orientation(in_features: int, out_features: int) -> str:
    """Which side of the (out, in) weight carries the K frame vectors: the narrow side.

    An up-projection (out >= in) has ETF *columns* (K = in vectors in R^out); a down-projection
    (out < in) has ETF *rows* (K = out vectors in R^in), like a fixed classifier.
    """
    return "columns" if out_features >= in_features else "rows"


def oriented_frame(in_features: int, out_features: int, basis: str, seed: int,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) fixed weight of an ETF layer, in float64."""
    if frame_orientation(in_features, out_features) == "columns":
        return simplex_etf(in_features, out_features, basis, seed, weight, dtype=torch.float64)
    target = None if weight is None else weight.t()
    return simplex_etf(out_features, in_features, basis, seed, target, dtype=torch.float64).t().contiguous()


class ETFLinear(nn.Module):
    """Drop-in for `nn.Linear` / transformers `Conv1D` with a fixed simplex-ETF weight.

    ``weight`` is a read-only dense (out, in) view ``frame_norm * frame`` for interop; the layer itself
    never stores more than the frame (and not even that in checkpoints of regenerable bases).
    """

    def __init__(self, in_features: int, out_features: int, *, basis: str, seed: int, bias: bool = True,
                 gain: float = 1.0, trainable_gain: bool = True, frame: torch.Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.basis = basis
        self.seed = seed
        dtype = dtype or torch.get_default_dtype()
        if frame is None:
            if basis not in REGENERABLE_BASES:
                raise ValueError(f"basis={basis!r} cannot be regenerated: pass the frame (see ETFLinear.from_layer)")
            frame = oriented_frame(in_features, out_features, basis, seed)
        elif tuple(frame.shape) != (out_features, in_features):
            raise ValueError(f"frame has shape {tuple(frame.shape)}, expected (out, in)=({out_features}, {in_features})")
        self.register_buffer("frame", frame.to(device=device, dtype=dtype),
                             persistent=basis not in REGENERABLE_BASES)
        gain_tensor = torch.tensor(float(gain), device=device, dtype=dtype)
        if trainable_gain:
            self.frame_norm = nn.Parameter(gain_tensor)
        else:
            self.register_buffer("frame_norm", gain_tensor)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_layer(cls, layer: nn.Module, *, layout: str, basis: str, seed: int, gain: str | float = "match",
                   trainable_gain: bool = True) -> ETFLinear:
        """Build the ETF replacement of an `nn.Linear` (layout ``linear``) or `Conv1D` (``conv1d``).

        Keeps the bias, takes the gain from the old weight's scale (``gain="match"``) and, for
        ``nearest``, the frame closest to the old weight. On the meta device (transformers builds models
        there before loading) no frame is computed: it is loaded or regenerated afterwards.
        """
        weight = layer.weight.t() if layout == "conv1d" else layer.weight
        out_features, in_features = weight.shape
        on_meta = weight.is_meta
        frame = None
        scale = 1.0
        if on_meta:
            frame = torch.empty(out_features, in_features, device="meta")
        elif basis not in REGENERABLE_BASES:
            frame = oriented_frame(in_features, out_features, basis, seed, weight=weight.detach())
            scale = float((weight.detach().double().cpu() * frame).sum()) / min(in_features, out_features)
        else:
            scale = float(weight.detach().double().norm()) / math.sqrt(min(in_features, out_features))
        if gain != "match":
            scale = float(gain)
        module = cls(in_features, out_features, basis=basis, seed=seed, bias=layer.bias is not None,
                     gain=scale, trainable_gain=trainable_gain, frame=frame,
                     device=weight.device, dtype=weight.dtype)
        if layer.bias is not None and not on_meta:
            with torch.no_grad():
                module.bias.copy_(layer.bias)
        return module

    @property
    def regenerable(self) -> bool:
        return self.basis in REGENERABLE_BASES

    def reset_frame(self) -> None:
        """Recompute a regenerable frame in place (after loading, which leaves such buffers undefined)."""
        if not self.regenerable:
            return
        frame = oriented_frame(self.in_features, self.out_features, self.basis, self.seed)
        with torch.no_grad():
            self.frame.copy_(frame.to(device=self.frame.device, dtype=self.frame.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.frame * self.frame_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FixedFrameLinear.apply(x, self.frame, self.frame_norm, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, basis={self.basis}, "
                f"frame={frame_orientation(self.in_features, self.out_features)}, bias={self.bias is not None}")
