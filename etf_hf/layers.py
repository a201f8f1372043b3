"""`ETFLinear`: a linear layer whose weight is a fixed simplex ETF times a trainable scalar gain.

Design constraints, each from a way transformers 5.x or the optimizer could break a fixed frame:
  * the frame is a buffer, never a Parameter: the optimizer cannot see it, weight decay cannot move it,
    and reloading cannot flip it to requires_grad=True;
  * frames that can be regenerated (canonical, orthogonal) are non-persistent buffers, rebuilt from
    their recipe after loading (transformers fills non-persistent buffers with uninitialised memory),
    so checkpoints do not carry them; a ``nearest`` frame depends on the old weight and is persistent;
  * a ``structured`` layer has no frame buffer at all: it keeps only its `StructuredOperator` (O(D)
    indices, K signs, one <= 64 x 64 +-1 matrix) as non-persistent ``plan_*`` buffers and applies the
    frame matrix-free; ``layer.frame`` and ``layer.weight`` materialise the dense (out, in) matrix on demand;
  * frames are defined in float32: a regenerable dense frame cast to a narrower dtype and back (e.g.
    ``model.half().float()``) is regenerated, so the in-memory model equals its own save/reload;
  * the gain is named ``frame_norm`` (it is the norm of every frame vector), so Trainer's weight-decay
    rule exempts it like a LayerNorm scale instead of pulling it towards zero.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .controls import CONTROL_BASES, REGENERABLE_CONTROLS, control_frame
from .etf import REGENERABLE_BASES, StructuredOperator, StructuredPlan, simplex_etf, structured_apply, structured_apply_t, structured_dense, structured_operator, structured_operator_layout, structured_operator_sizes, structured_plan


#: Buffer names of a structured layer's operator, in `StructuredOperator` field order (after ``layout``).
_PLAN_BUFFERS = ("plan_spread", "plan_perm", "plan_inverse", "plan_index", "plan_signs", "plan_hadamard")
#: Every basis (ETF or control) whose frame is rebuilt from (shape, seed) instead of being stored.
REGENERABLE = REGENERABLE_BASES + REGENERABLE_CONTROLS


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype gradient sums accumulate in: float32, or wider when an operand is (float64)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def in_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, without a call when it already is: a same-dtype ``.to`` still costs a
    dispatch, and a batch-1 decoding step is made of such costs."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def affine(pre_gain: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """gain * pre_gain + bias in ``dtype``: one pass over the output (addcmul), not two (a product, then a
    sum). Every fixed-frame path (per-projection, fused forward, fused backward's recompute) computes its
    output through this one function, so they round alike."""
    if bias is None:
        return pre_gain * in_dtype(gain, dtype)
    return torch.addcmul(in_dtype(bias, dtype), pre_gain, in_dtype(gain, dtype))


def inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> summed over every element, accumulated in `accumulation_dtype`: a gain's gradient.

    One fused dot product (no a * b temporary: a pass over the 4d-wide hidden side fewer in the fused FFN)
    when both are already in that dtype and laid out alike (both contiguous, or both transposed views of
    contiguous matrices, as the fused FFN's feature-major hidden side is)."""
    dtype = accumulation_dtype(a, b)
    if a.dtype == b.dtype == dtype and a.shape == b.shape:
        if a.is_contiguous() and b.is_contiguous():
            return torch.dot(a.reshape(-1), b.reshape(-1))
        if a.dim() == 2 and a.t().is_contiguous() and b.t().is_contiguous():
            return torch.dot(a.t().reshape(-1), b.t().reshape(-1))
    return (a.to(dtype) * b.to(dtype)).sum()


def column_sums(grad: torch.Tensor) -> torch.Tensor:
    """grad summed over every leading dimension, in `accumulation_dtype`: a bias's gradient."""
    return grad.reshape(-1, grad.shape[-1]).to(accumulation_dtype(grad)).sum(0)


def _input_gain_bias_grads(ctx, grad_out: torch.Tensor, back: torch.Tensor | None, gain: torch.Tensor,
                           saved_activation: torch.Tensor | None, needs_x: bool, needs_bias: bool):
    """The gradients both fixed-frame functions share, given ``back`` = grad_out through the frame.

    The gain's gradient <grad_out, frame x> is taken on whichever side was saved in forward: the
    pre-gain output (with grad_out) or the input (with ``back``). Sums accumulate in float32, or float64
    for float64 tensors (`accumulation_dtype`).
    """
    grad_x = (back * gain.to(ctx.compute_dtype)).to(ctx.input_dtype) if needs_x else None
    grad_gain = None
    if saved_activation is not None:
        partner = grad_out if ctx.save_pre_gain else back
        grad_gain = inner_product(partner, saved_activation).to(gain.dtype).reshape(gain.shape)
    grad_bias = None
    if ctx.bias_dtype is not None and needs_bias:
        grad_bias = column_sums(grad_out).to(ctx.bias_dtype)
    return grad_x, grad_gain, grad_bias


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
            out = affine(pre_gain, gain, bias, compute_dtype)
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
        saved = ctx.saved_tensors  # unpack once: non-reentrant activation checkpointing allows one unpack
        frame, gain = saved[:2]
        compute_dtype = ctx.compute_dtype
        grad_out = grad_out.to(compute_dtype)
        frame_grad = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[2] and not ctx.save_pre_gain):
            frame_grad = grad_out @ frame.to(compute_dtype)
        grad_x, grad_gain, grad_bias = _input_gain_bias_grads(
            ctx, grad_out, frame_grad, gain, saved[2] if ctx.needs_input_grad[2] else None,
            ctx.needs_input_grad[0], ctx.needs_input_grad[3])
        return grad_x, None, grad_gain, grad_bias


class _StructuredFrameLinear(torch.autograd.Function):
    """y = gain * (x @ W^T) + bias with W the (out, in) orientation of a structured frame, matrix-free.

    Same contract as `_FixedFrameLinear`: nothing is saved for the fixed transform (its operator is a
    set of constant buffers, kept on ctx by reference, not saved activations) and at most one
    activation, the narrow one, for the gain's gradient. ``static`` = (operator layout, transposed);
    ``transposed`` means W = M^T (a down-projection, D -> K), else W = M (an up-projection, K -> D).
    """

    @staticmethod
    def forward(ctx, x, gain, bias, spread, perm, inverse, index, signs, hadamard, static):  # type: ignore[override]
        layout, transposed = static
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = x.dtype
        op = StructuredOperator(layout, spread, perm, inverse, index, signs, hadamard)
        with torch.autocast(device_type, enabled=False):
            apply = structured_apply_t if transposed else structured_apply
            pre_gain = apply(x.to(compute_dtype), op)
            out = affine(pre_gain, gain, bias, compute_dtype)
        ctx.op = op
        ctx.transposed = transposed
        ctx.compute_dtype = compute_dtype
        ctx.input_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # out <= in: the output (pre-gain) side is the narrow one.
        ctx.save_pre_gain = transposed or layout[0] == layout[1]
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(gain, pre_gain if ctx.save_pre_gain else x)
        else:
            ctx.save_for_backward(gain)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors  # unpack once: non-reentrant activation checkpointing allows one unpack
        gain = saved[0]
        compute_dtype = ctx.compute_dtype
        grad_out = grad_out.to(compute_dtype)
        back = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[1] and not ctx.save_pre_gain):
            apply = structured_apply if ctx.transposed else structured_apply_t
            with torch.autocast(grad_out.device.type, enabled=False):
                back = apply(grad_out, ctx.op)
        grad_x, grad_gain, grad_bias = _input_gain_bias_grads(
            ctx, grad_out, back, gain, saved[1] if ctx.needs_input_grad[1] else None,
            ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_x, grad_gain, grad_bias, None, None, None, None, None, None, None


def frame_orientation(in_features: int, out_features: int) -> str:
    """Which side of the (out, in) weight carries the K frame vectors: the narrow side.

    An up-projection (out >= in) has ETF *columns* (K = in vectors in R^out); a down-projection
    (out < in) has ETF *rows* (K = out vectors in R^in), like a fixed classifier.
    """
    return "columns" if out_features >= in_features else "rows"


def oriented_frame(in_features: int, out_features: int, basis: str, seed: int,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (out, in) fixed weight of an ETF layer (or of a control, see `controls`), in float32.

    Frames are *defined* in float32 (computed in float64, rounded once): a lower-precision model holds
    their rounding from float32 whether the frame was cast with the model or regenerated after loading.
    """
    build = control_frame if basis in CONTROL_BASES else simplex_etf
    if frame_orientation(in_features, out_features) == "columns":
        return build(in_features, out_features, basis, seed, weight, dtype=torch.float32)
    target = None if weight is None else weight.t()
    return build(out_features, in_features, basis, seed, target, dtype=torch.float32).t().contiguous()


class ETFLinear(nn.Module):
    """Drop-in for `nn.Linear` / transformers `Conv1D` with a fixed simplex-ETF weight.

    ``weight`` is a read-only dense (out, in) view ``frame_norm * frame`` for interop; the layer itself
    never stores more than the frame (and not even that in checkpoints of regenerable bases).

    ``frame`` is the fixed (out, in) matrix: a buffer for the dense bases; for ``structured`` a tensor
    materialised on each access (O(K D log D) work, a fresh (out, in) tensor in the plan's dtype and
    device, never a buffer, never in ``state_dict``), while the layer stores only ``plan_*`` buffers.
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
        if basis == "structured":
            if frame is not None and not frame.is_meta:
                raise ValueError("basis='structured' is regenerated from (shape, seed) and never stored: pass no frame")
            on_meta = frame is not None and frame.is_meta
            on_meta = on_meta or (device is not None and torch.device(device).type == "meta")
            self._init_structured(device="meta" if on_meta else device, dtype=dtype)
            frame = None
        elif frame is None:
            if basis not in REGENERABLE:
                raise ValueError(f"basis={basis!r} cannot be regenerated: pass the frame (see ETFLinear.from_layer)")
            frame = oriented_frame(in_features, out_features, basis, seed)
        elif tuple(frame.shape) != (out_features, in_features):
            raise ValueError(f"frame has shape {tuple(frame.shape)}, expected (out, in)=({out_features}, {in_features})")
        if frame is not None:
            self.register_buffer("frame", frame.to(device=device, dtype=dtype),
                                 persistent=basis not in REGENERABLE)
        # Shape (1,), not 0-dim: FSDP2's fully_shard rejects scalar parameters.
        gain_tensor = torch.full((1,), float(gain), device=device, dtype=dtype)
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
            frame = None if basis == "structured" else torch.empty(out_features, in_features, device="meta")
        elif basis not in REGENERABLE:
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
        return self.basis in REGENERABLE

    def reset_frame(self) -> None:
        """Recompute a regenerable frame in place (after loading, which leaves such buffers undefined)."""
        if not self.regenerable:
            return
        if self.structured:
            operator = structured_operator(structured_plan(*self._structured_layout[0][:2], self.seed))
            with torch.no_grad():
                for name, value in zip(_PLAN_BUFFERS, operator[1:]):
                    buffer = self._buffers[name]
                    buffer.copy_(value.to(device=buffer.device, dtype=buffer.dtype))
            return
        frame = oriented_frame(self.in_features, self.out_features, self.basis, self.seed)
        with torch.no_grad():
            self.frame.copy_(frame.to(device=self.frame.device, dtype=self.frame.dtype))

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply` (behind ``.to``, ``.half()``, ``.float()``, ...), then regenerate a regenerable
        dense frame whose dtype became more precise: its values are defined in float32, and a cast back up
        from a narrower dtype would otherwise keep the narrow rounding (an fp16 round trip moved an
        orthogonal-frame GPT-2's logits by 1.5e-4 against its own save/reload). Regenerating costs a QR
        per frame for ``orthogonal``, paid only on such upcasts; keeping a float32 copy instead would cost
        memory and a cast on every call. Stored frames (``nearest``, ``frozen``) are saved as they are, so
        the model and its checkpoint agree anyway; structured operators are exact (+-1) in every dtype."""
        frame = self._buffers.get("frame")
        before = None if frame is None else frame.dtype
        result = super()._apply(fn, recurse)
        frame = self._buffers.get("frame")
        if (before is not None and frame is not None and self.regenerable and not frame.is_meta
                and frame.is_floating_point() and torch.finfo(frame.dtype).eps < torch.finfo(before).eps):
            self.reset_frame()
        return result

    def _init_structured(self, device: torch.device | str | None, dtype: torch.dtype) -> None:
        num_vectors = min(self.in_features, self.out_features)
        dim = max(self.in_features, self.out_features)
        # (operator layout, transposed): D >= K always, since K is the narrow side.
        layout = structured_operator_layout(num_vectors, dim)
        self._structured_layout = (layout, frame_orientation(self.in_features, self.out_features) == "rows")
        if device is not None and torch.device(device).type == "meta":
            sizes = structured_operator_sizes(layout)
            values = [torch.empty(sizes[name.removeprefix("plan_")], device="meta",
                                  dtype=dtype if name in ("plan_signs", "plan_hadamard") else torch.int64)
                      for name in _PLAN_BUFFERS]
        else:
            values = structured_operator(structured_plan(num_vectors, dim, self.seed))[1:]
        for name, value in zip(_PLAN_BUFFERS, values):
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device=device)
            self.register_buffer(name, value, persistent=False)

    @property
    def structured(self) -> bool:
        return self.basis == "structured"

    @property
    def operator(self) -> StructuredOperator:
        """The structured frame's fast operator, made of this layer's buffers (``structured`` basis only)."""
        if not self.structured:
            raise AttributeError(f"a {self.basis!r} ETFLinear has a dense frame, no structured operator")
        return StructuredOperator(self._structured_layout[0], *self.operator_tensors())

    def operator_tensors(self) -> list[torch.Tensor]:
        """The structured operator's tensors (its fields after ``layout``; ``structured`` basis only),
        without building the operator: the fused FFN reads them on every call."""
        return [self._buffers[name] for name in _PLAN_BUFFERS]

    @property
    def plan(self) -> StructuredPlan:
        """The structured frame's seeded plan, regenerated (on the CPU; ``structured`` basis only)."""
        if not self.structured:
            raise AttributeError(f"a {self.basis!r} ETFLinear has a dense frame, no structured plan")
        return structured_plan(*self._structured_layout[0][:2], self.seed)

    @property
    def frame(self) -> torch.Tensor:
        buffers = self.__dict__.get("_buffers", {})
        if "frame" in buffers:
            return buffers["frame"]
        if self.__dict__.get("basis") == "structured":
            signs = self._buffers["plan_signs"]
            dense = structured_dense(self.plan).to(device=signs.device, dtype=signs.dtype)  # D x K
            columns = frame_orientation(self.in_features, self.out_features) == "columns"
            return dense if columns else dense.t().contiguous()
        raise AttributeError(f"'{type(self).__name__}' object has no attribute 'frame'")

    @property
    def weight(self) -> torch.Tensor:
        return self.frame * self.frame_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.basis == "structured":
            return _StructuredFrameLinear.apply(
                x, self.frame_norm, self.bias, self.plan_spread, self.plan_perm, self.plan_inverse,
                self.plan_index, self.plan_signs, self.plan_hadamard, self._structured_layout)
        return _FixedFrameLinear.apply(x, self.frame, self.frame_norm, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, basis={self.basis}, "
                f"frame={frame_orientation(self.in_features, self.out_features)}, bias={self.bias is not None}")
