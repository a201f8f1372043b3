"""The fused fixed-frame FFN: a block's whole feed-forward in one autograd function, when both (or, gated,
all three) of its projections are fixed ETF layers.

Why: with fixed frames the only trainable tensors of an FFN are a few gains and biases, yet autograd
through separate layers keeps the 4d-wide hidden activation of every block for backward (memory at the
level of a frozen FFN) and runs the fixed transforms eight times a step. Here forward computes

    up-frame -> gain/bias -> activation -> down-frame -> gain/bias      (gated: act(gate) * up)

and saves only the block input (n x d) and the gains. Backward recomputes the up-projection (cheap for a
structured frame) and the activation, and applies each adjoint explicitly: 5 transforms a step instead
of 8, and the hidden activation never outlives its block's forward. ``recompute`` (`ETFConfig`) trades
that memory back for compute: off, the up-projection's pre-gain output is saved as well, which is the
better choice for dense frames, whose recomputation is a full d x 4d GEMM (default: on for
``structured``, off for every dense basis).

A structured hidden activation stays feature-major (see `etf_hf.etf`) from the up- to the
down-projection, so no 4d-wide tensor is transposed or column-gathered.

Without gradients, a single row (a batch-1 decoding step) of all-structured frames takes `_row_forward`:
the same ops for that row, bit for bit, but with its constants (`_RowPlan`) looked up once per call
instead of rebuilt through the general path's per-frame set-up, which at one token cost more than the ops.

The fused module is the model's own MLP module with its class swapped to a subclass (like the model's
``ETF*`` class): same children, same state-dict keys, so every checkpoint loads either way. It falls
back to the MLP's own forward whenever fusing would change behaviour: a projection that is not an
`ETFLinear` (a partial patch, or after `materialize`), hooks on a projection or the activation, or a
forward replaced on one (the fusion would bypass them), an activation it has no exact derivative for,
or extra forward arguments.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, NamedTuple

import torch
from torch import nn

from .architectures import MLPForm, mlp_form
from .etf import (Derived, StructuredOperator, centred, collect_row, derived_of, memoised, spread_row,
                  structured_rows_apply, structured_rows_apply_t)
from .layers import ETFLinear, accumulation_dtype, affine, column_sums, in_dtype, inner_product

_SQRT_2_OVER_PI = 0.7978845608028654  # math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def activation_kind(module: nn.Module) -> str | None:
    """The activation an MLP's activation module computes, if it is one the fused FFN differentiates
    exactly: ``gelu`` (erf), ``gelu_tanh`` (torch's tanh approximation), ``gelu_new`` (the same
    approximation written out, GPT-2's default), ``silu``, ``relu``; None otherwise (no fusion)."""
    cls = type(module)
    if cls is nn.GELU:
        return "gelu" if module.approximate == "none" else "gelu_tanh"
    if cls is nn.SiLU:
        return "silu"
    if cls is nn.ReLU:
        return "relu"
    if cls.__module__ != "transformers.activations":
        return None
    act = getattr(module, "act", None)
    if cls.__name__ == "GELUActivation" and act is nn.functional.gelu:
        return "gelu"
    if cls.__name__ == "GELUTanh" and getattr(act, "func", None) is nn.functional.gelu:
        return "gelu_tanh"
    return {"NewGELUActivation": "gelu_new", "SiLUActivation": "silu"}.get(cls.__name__)


def _on_storage(function, *tensors: torch.Tensor) -> torch.Tensor:
    """function(*tensors), elementwise, evaluated on the tensors' contiguous storage when they are all
    transposed views (the feature-major hidden activation of a structured frame): torch's vectorised
    kernels (erf, tanh, ...) run only on contiguous memory, and the strided fallback rounds differently,
    which would make the fused forward differ from the per-projection one in the last bit."""
    if all(t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous() for t in tensors):
        return function(*(t.t() for t in tensors)).t()
    return function(*tensors)


#: Activations the fused FFN evaluates with torch's single kernel for the same function: GPT-2's
#: written-out tanh approximation (``gelu_new``, eight elementwise ops, each a pass over the 4d-wide hidden
#: activation) is exactly ``gelu(approximate="tanh")`` (transformers' ``gelu_pytorch_tanh``), one pass.
#: Outputs then differ from the module's own ops at float rounding (~1e-7 relative), forward and backward;
#: every other activation is computed as the module computes it (bit-identical to the unfused path).
KERNEL_KIND = {"gelu_new": "gelu_tanh"}


def kernel_kind(kind: str) -> str:
    """The activation kind the fused FFN evaluates for ``kind`` (see `KERNEL_KIND`)."""
    return KERNEL_KIND.get(kind, kind)


def _activate(kind: str, h: torch.Tensor) -> torch.Tensor:
    """The activation of ``kind`` (already mapped by `kernel_kind`), on the hidden activation's storage."""
    return _on_storage(lambda t: _activation(kind, t), h)


def _activation(kind: str, h: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return nn.functional.gelu(h)
    if kind == "gelu_tanh":
        return nn.functional.gelu(h, approximate="tanh")
    if kind == "gelu_new":
        return 0.5 * h * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (h + _GELU_TANH_CUBIC * torch.pow(h, 3.0))))
    if kind == "silu":
        return nn.functional.silu(h)
    return nn.functional.relu(h)


def _activation_backward(kind: str, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad * act'(h): torch's own backward kernels where they exist, so gradients match autograd's."""
    return _on_storage(lambda g, t: _derivative_times(kind, g, t), grad, h)


def _derivative_times(kind: str, grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    if kind == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad, h)
    if kind == "relu":
        return torch.where(h > 0, grad, torch.zeros_like(grad))
    raise ValueError(f"no fused derivative for activation {kind!r} (the fused FFN evaluates {sorted(KERNEL_KIND)} "
                     f"as {sorted(KERNEL_KIND.values())})")


class _Frame(NamedTuple):
    """One projection inside the fused function: static description plus its tensors."""

    kind: str  # "dense" or "structured"
    transposed: bool  # structured: W = M^T (a down-projection)
    layout: tuple | None  # structured operator layout
    gain: torch.Tensor
    bias: torch.Tensor | None
    tensors: tuple[torch.Tensor, ...]  # dense: (frame,); structured: the operator's tensors

    @property
    def operator(self) -> StructuredOperator:
        return StructuredOperator(self.layout, *self.tensors)

    def project(self, x: torch.Tensor, order: Order = None) -> torch.Tensor:
        """x @ W^T, pre-gain, (n, in) -> (n, out). A structured result is the transposed view of a
        contiguous feature-major (out, n) matrix; a structured input may be such a view (no copy then).
        ``order``: the hidden side's columns in other coordinates (see `_hidden_orders`; None: W's own)."""
        if self.kind == "dense":
            return nn.functional.linear(x, self.tensors[0].to(x.dtype))
        return _structured(self.operator, x, apply=not self.transposed, order=order)

    def adjoint(self, grad: torch.Tensor, order: Order = None) -> torch.Tensor:
        """grad @ W, pre-gain, (n, out) -> (n, in); ``order`` as in `project`."""
        if self.kind == "dense":
            return grad @ self.tensors[0].to(grad.dtype)
        return _structured(self.operator, grad, apply=self.transposed, order=order)


#: A hidden-side column order for a structured frame: None (the frame's own hidden units), HADAMARD (the
#: frame's own Hadamard coordinates: no gather at all) or an index tensor (into another frame's).
Order = torch.Tensor | str | None
HADAMARD = "hadamard"


def _structured(op: StructuredOperator, x: torch.Tensor, apply: bool, order: Order) -> torch.Tensor:
    """x @ M^T (``apply``, narrow -> hidden) or x @ M (hidden -> narrow) with the hidden side in ``order``."""
    if isinstance(order, str):
        return structured_rows_apply(x, op, hadamard_order=True) if apply else \
            structured_rows_apply_t(x, op, hadamard_order=True)
    return structured_rows_apply(x, op, order) if apply else structured_rows_apply_t(x, op, order)


class _HiddenOrders(NamedTuple):
    """Where the fused FFN keeps its hidden activation: in the Hadamard coordinates of its first
    (gate or up) frame, the *lead*, when every frame is structured. Then the lead's output permutation
    and the down-projection's input permutation (two hidden-wide gathers) become one composite gather,
    and the lead's own gathers vanish: 3 fewer passes over the n x 4d hidden side a training step
    (1 forward, 2 backward). Otherwise every frame keeps its own hidden units (all orders None)."""

    frames: list[tuple[Order, Order]]  # per frame (gate?, up, down): (project order, adjoint order)
    to_lead: torch.Tensor | None  # bias.index_select(0, to_lead): a hidden-side bias in lead coordinates
    from_lead: torch.Tensor | None  # grad.index_select(0, from_lead): a bias gradient back in hidden units


def _hidden_orders(ups: list[_Frame], down: _Frame, adjoints: bool) -> _HiddenOrders:
    """The orders for a forward (``adjoints`` False: the adjoint orders are left None, unused) or a backward,
    computed once per set of frames (`memoised`: a gather fewer per batch-1 decoding step)."""
    merged = all(f.kind == "structured" and not f.transposed for f in ups) and down.kind == "structured" \
        and down.transposed
    if not merged:
        return _HiddenOrders([(None, None)] * (len(ups) + 1), None, None)
    permutations = tuple(t for op in (frame.operator for frame in (*ups, down)) for t in (op.perm, op.inverse))
    return memoised(permutations, ("hidden orders", adjoints), lambda: _composite_orders(ups, down, adjoints))


def _composite_orders(ups: list[_Frame], down: _Frame, adjoints: bool) -> _HiddenOrders:
    lead = ups[0].operator
    # Lead coordinate j holds hidden unit lead.inverse[j]; hidden unit i sits at lead coordinate lead.perm[i].
    # A frame X writes its hidden side (spread) in lead coordinates through X.perm[lead.inverse] and reads
    # it (collect) through lead.perm[X.inverse].
    orders: list[tuple[Order, Order]] = [(HADAMARD, HADAMARD)]
    for frame in ups[1:]:
        op = frame.operator
        orders.append((op.perm.index_select(0, lead.inverse), lead.perm.index_select(0, op.inverse) if adjoints else None))
    op = down.operator
    orders.append((lead.perm.index_select(0, op.inverse), op.perm.index_select(0, lead.inverse) if adjoints else None))
    # Copies: a memoised value must not hold its own key tensors (the entry would keep them alive forever).
    return _HiddenOrders(orders, lead.inverse.clone(), lead.perm.clone())


def _to_lead(bias: torch.Tensor | None, orders: _HiddenOrders) -> torch.Tensor | None:
    return bias if bias is None or orders.to_lead is None else bias.index_select(0, orders.to_lead)


class FusedSpec(NamedTuple):
    """Static part of one fused call (hashable: torch.compile specialises on it)."""

    activation: str
    gated: bool
    recompute: bool
    frames: tuple[tuple[str, bool, tuple | None, int], ...]  # (kind, transposed, layout, number of tensors)
    structured: bool  # every frame structured: a single row may take `_row_forward`


def _unflatten(spec: FusedSpec, operands: tuple) -> tuple[list[_Frame], list[int], list[int]]:
    """The frames (gate?, up, down), and each one's gain and bias position in ``operands``."""
    frames, gain_at, bias_at, at = [], [], [], 0
    for kind, transposed, layout, count in spec.frames:
        gain_at.append(at)
        bias_at.append(at + 1)
        frames.append(_Frame(kind, transposed, layout, operands[at], operands[at + 1],
                             tuple(operands[at + 2:at + 2 + count])))
        at += 2 + count
    return frames, gain_at, bias_at


def _autocast_off(device_type: str) -> torch.autocast:
    """Autocast switched off inside the fused function (it computes in the autocast dtype itself); entered
    only when autocast is on: entering it costs ~2 us, a few per cent of a batch-1 decoding step's FFN."""
    return torch.autocast(device_type, enabled=False)


def fused_forward(x: torch.Tensor, spec: FusedSpec, operands: tuple) -> tuple[torch.Tensor, torch.dtype, list[_Frame], list]:
    """The fused FFN's output (and its compute dtype, frames and the up-projections' pre-gain outputs),
    without autograd: the whole forward when no gradient is wanted (inference, ``generate()``), where
    the autograd function's bookkeeping would be pure overhead at batch 1."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
    frames, _, _ = _unflatten(spec, operands)
    ups, down = frames[:-1], frames[-1]
    orders = _hidden_orders(ups, down, adjoints=False)
    with _autocast_off(device_type) if autocast else contextlib.nullcontext():
        flat = in_dtype(x.reshape(-1, x.shape[-1]), dtype)
        pres = [frame.project(flat, order) for frame, (order, _) in zip(ups, orders.frames)]
        hidden = [affine(pre, frame.gain, _to_lead(frame.bias, orders), dtype) for pre, frame in zip(pres, ups)]
        kind = kernel_kind(spec.activation)
        if spec.gated:
            activated = _activate(kind, hidden[0]) * hidden[1]
        else:
            activated = _activate(kind, hidden[0])
        out = affine(down.project(activated, orders.frames[-1][0]), down.gain, down.bias, dtype).contiguous()
    return out.reshape(*x.shape[:-1], out.shape[-1]), dtype, frames, pres


class _RowPlan(NamedTuple):
    """What the one-row forward (`_row_forward`) needs besides gains and biases, for one set of frames and
    dtype: per up frame (gate?, up) its derived tensors and its hidden side's order in the lead's Hadamard
    coordinates (None for the lead itself); the hidden-side bias order; the down frame's derived tensors,
    the order it reads the hidden side in, and (a copy of) its input index."""

    ups: tuple[tuple[Derived, torch.Tensor | None], ...]
    to_lead: torch.Tensor
    down: Derived
    down_source: torch.Tensor
    down_index: torch.Tensor


def _row_plan(layers: tuple[ETFLinear, ...], dtype: torch.dtype) -> _RowPlan | None:
    """The `_RowPlan` of these structured layers in ``dtype``, once per set of frame buffers (`memoised`),
    or None where the one-row forward does not apply: frames not oriented up then down, or one without the
    two-GEMM single-column transform (see `etf_hf.etf._sandwich`)."""
    transposes = tuple(layer._structured_layout[1] for layer in layers)
    if any(transposes[:-1]) or not transposes[-1]:  # not up-frames then a down-frame: no composite orders
        return None
    tensors = tuple(t for layer in layers for t in layer.operator_tensors())
    return memoised(tensors, ("row plan", dtype),
                    lambda: _make_row_plan([layer.operator for layer in layers], transposes, dtype))


def _make_row_plan(operators: list[StructuredOperator], transposes: tuple[bool, ...], dtype: torch.dtype
                   ) -> _RowPlan | None:
    derived = [derived_of(op, dtype) for op in operators]
    if any(d.sandwich is None for d in derived) or any(op.layout[2] for op in operators):
        return None
    frames = [_Frame("structured", transposed, op.layout, None, None, tuple(op[1:]))
              for op, transposed in zip(operators, transposes)]
    orders = _composite_orders(frames[:-1], frames[-1], adjoints=False)
    ups = tuple((d, None if isinstance(order, str) else order) for d, (order, _) in zip(derived[:-1], orders.frames))
    return _RowPlan(ups, orders.to_lead, derived[-1], orders.frames[-1][0], operators[-1].index.clone())


def _row_forward(x: torch.Tensor, spec: FusedSpec, layers: tuple[ETFLinear, ...], plan: _RowPlan) -> torch.Tensor:
    """The fused FFN of one row (a batch-1 decoding step) without gradients: the same ops as
    `fused_forward` takes for one row, with none of its per-call set-up. At one token that set-up, not the
    17 ops, was most of the FFN's time inside generate() (its Python runs cold between blocks)."""
    row = x.reshape(-1)
    dtype = row.dtype
    inputs = centred(row, 0)
    hidden = []
    for layer, (derived, order) in zip(layers, plan.ups):
        pre = spread_row(inputs, derived)
        bias = layer.bias
        hidden.append(affine(pre if order is None else pre.index_select(0, order), layer.frame_norm,
                             None if bias is None else bias.index_select(0, plan.to_lead), dtype))
    activated = _activation(kernel_kind(spec.activation), hidden[0])
    if spec.gated:
        activated = activated * hidden[1]
    down = layers[-1]
    out = centred(collect_row(activated, plan.down_source, plan.down_index, plan.down), 0)
    return affine(out, down.frame_norm, down.bias, dtype).view(*x.shape[:-1], -1)


class _FusedFeedForward(torch.autograd.Function):
    """out = down(act(up(x))) (gated: down(act(gate(x)) * up(x))), each projection gain * (x W^T) + bias
    with a fixed W. Saves x and the gains (and, without recompute, the up-projections' pre-gain outputs).
    Autocast is honoured like `ETFLinear`: everything is computed in the autocast dtype, frames cast per call.
    Operands: for each frame (gate?, up, down), its gain, its bias (or None), then its frame tensors."""

    @staticmethod
    def forward(ctx, x, spec, *operands):  # type: ignore[override]
        out, dtype, frames, pres = fused_forward(x, spec, operands)
        ctx.spec = spec
        ctx.dtype = dtype
        ctx.input_dtype = x.dtype
        ctx.frame_tensors = [frame.tensors for frame in frames]
        ctx.biases = [frame.bias for frame in frames]
        ctx.save_for_backward(x, *(frame.gain for frame in frames), *([] if spec.recompute else pres))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        spec, dtype = ctx.spec, ctx.dtype
        saved = ctx.saved_tensors  # unpack once: non-reentrant activation checkpointing allows one unpack
        count = len(spec.frames)
        x, gains = saved[0], saved[1:1 + count]
        operands: list[Any] = []
        for gain, bias, tensors in zip(gains, ctx.biases, ctx.frame_tensors):
            operands += [gain, bias, *tensors]
        frames, gain_at, bias_at = _unflatten(spec, tuple(operands))
        ups, down = frames[:-1], frames[-1]
        orders = _hidden_orders(ups, down, adjoints=True)
        needs = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [None] * len(operands)
        # Passes over the n x 4d hidden side: recompute (a transform), h, act(h), the down adjoint
        # (a transform), <adjoint, act(h)>, act'(h) * adjoint, its column sums, the up adjoint (a
        # transform). The down gain is factored out of the hidden gradient and applied to the narrow
        # side instead, and the up gain's gradient is <up adjoint, x> on the narrow side too.
        device_type = x.device.type
        with _autocast_off(device_type) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext():
            flat = in_dtype(x.reshape(-1, x.shape[-1]), dtype)
            if spec.recompute:
                pres = [frame.project(flat, order) for frame, (order, _) in zip(ups, orders.frames)]
            else:
                pres = list(saved[1 + count:])
            hidden = [affine(pre, frame.gain, _to_lead(frame.bias, orders), dtype) for pre, frame in zip(pres, ups)]
            grad = in_dtype(grad_out.reshape(-1, grad_out.shape[-1]), dtype)
            if down.bias is not None and needs[bias_at[-1]]:
                grads[bias_at[-1]] = column_sums(grad).to(down.bias.dtype)
            back = down.adjoint(grad, orders.frames[-1][1])
            kind = kernel_kind(spec.activation)
            gate_out = _activate(kind, hidden[0])
            activated = gate_out * hidden[1] if spec.gated else gate_out
            if needs[gain_at[-1]]:
                grads[gain_at[-1]] = inner_product(back, activated).to(down.gain.dtype).reshape(down.gain.shape)
            if spec.gated:  # d/d(hidden) / down gain
                grad_hidden = [_activation_backward(kind, back * hidden[1], hidden[0]), back * gate_out]
            else:
                grad_hidden = [_activation_backward(kind, back, hidden[0])]
            down_gain = down.gain.to(accumulation_dtype(down.gain))
            grad_x = None
            for i, frame in enumerate(ups):
                if frame.bias is not None and needs[bias_at[i]]:
                    bias_grad = column_sums(grad_hidden[i]) * down_gain
                    if orders.from_lead is not None:
                        bias_grad = bias_grad.index_select(0, orders.from_lead)
                    grads[bias_at[i]] = bias_grad.to(frame.bias.dtype)
                if not (needs[gain_at[i]] or ctx.needs_input_grad[0]):
                    continue
                back_x = frame.adjoint(grad_hidden[i], orders.frames[i][1])
                if needs[gain_at[i]]:
                    gain_grad = inner_product(back_x, flat) * down_gain
                    grads[gain_at[i]] = gain_grad.to(frame.gain.dtype).reshape(frame.gain.shape)
                if ctx.needs_input_grad[0]:
                    term = back_x * (down.gain * frame.gain).to(dtype)
                    grad_x = term if grad_x is None else grad_x + term
        if grad_x is not None:
            grad_x = grad_x.to(ctx.input_dtype).contiguous().reshape(x.shape)
        return (grad_x, None, *grads)


def _frame_static(layer: ETFLinear) -> tuple[str, bool, tuple | None, int]:
    """The static description of one ETF layer inside the fused function (part of `FusedSpec`)."""
    if layer.structured:
        layout, transposed = layer._structured_layout
        return "structured", transposed, layout, len(layer.operator_tensors())
    return "dense", False, None, 1


def _frame_values(layer: ETFLinear) -> list[torch.Tensor | None]:
    """The tensors of one ETF layer inside the fused function: gain, bias, then its frame tensors."""
    if layer.structured:
        return [layer.frame_norm, layer.bias, *layer.operator_tensors()]
    return [layer.frame_norm, layer.bias, layer.frame]


def _same_key(cached: tuple, key: tuple) -> bool:
    """Whether a kept spec's key is ``key``: the same module objects (modules compare by identity) and
    the same activation kind and recompute flag."""
    return len(cached) == len(key) and all(a is b or a == b for a, b in zip(cached, key))


def _observed(module: nn.Module) -> bool:
    """Whether something outside etf_hf watches or replaces this module's forward (hooks, or a forward
    set on the instance): the fused path would bypass it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


class FusedFeedForwardMixin:
    """Mixed into an MLP class by `fuse_feed_forwards`: its forward runs `_FusedFeedForward` while every
    projection of its `MLPForm` is an `ETFLinear` and nothing would observe the difference."""

    etf_form: MLPForm
    etf_projection_names: tuple[str, ...]  # (gate?, up, down) child names, from the form
    etf_vanilla_mlp: type
    etf_recompute: bool

    def etf_fused_projections(self) -> list[ETFLinear] | None:
        """(gate?, up, down) when the fused path applies now, else None (the MLP's own forward runs)."""
        call = self._etf_fused_call()
        return None if call is None else list(call[0])

    def _etf_fused_call(self) -> tuple[tuple[ETFLinear, ...], FusedSpec] | None:
        """The projections and the fused call's static spec when the fused path applies now, else None.

        The spec depends only on which modules are this MLP's children, their frames' layouts, the
        activation and ``etf_recompute``; it is kept with the children it was made from and rebuilt when
        any of them changes (a projection replaced, `materialize`, another activation). At batch 1 a
        decoding step's FFN costs tens of us and rebuilding it per call measured ~3 % of a token's time
        in generate(). Hooks and replaced forwards are checked on every call: they may come at any time.
        """
        modules = self._modules
        layers = tuple(modules.get(name) for name in self.etf_projection_names)
        activation = modules.get(self.etf_form.activation)
        kind = activation_kind(activation) if activation is not None else None
        key = (*layers, activation, kind, bool(self.etf_recompute))
        cached = self.__dict__.get("_etf_fused_spec")
        if cached is None or not _same_key(cached[0], key):
            fusable = kind is not None and all(isinstance(layer, ETFLinear) for layer in layers)
            frames = tuple(map(_frame_static, layers)) if fusable else ()
            spec = FusedSpec(kind, self.etf_form.gate is not None, bool(self.etf_recompute), frames,
                             all(frame[0] == "structured" for frame in frames)) if fusable else None
            cached = self.__dict__["_etf_fused_spec"] = (key, spec)
        spec = cached[1]
        if spec is None or _observed(activation) or any(map(_observed, layers)):
            return None
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return None
        return layers, spec

    def forward(self, hidden_states, *args, **kwargs):
        call = None if args or kwargs else self._etf_fused_call()
        if call is None:
            return super().forward(hidden_states, *args, **kwargs)
        layers, spec = call
        out = None
        if spec.structured and not torch.is_grad_enabled() and hidden_states.numel() == hidden_states.shape[-1] \
                and not torch.is_autocast_enabled(hidden_states.device.type):
            plan = _row_plan(layers, hidden_states.dtype)
            if plan is not None:
                out = _row_forward(hidden_states, spec, layers, plan)
        if out is None:
            operands = [value for layer in layers for value in _frame_values(layer)]
            if torch.is_grad_enabled():
                out = _FusedFeedForward.apply(hidden_states, spec, *operands)
            else:
                out = fused_forward(hidden_states, spec, tuple(operands))[0]
        dropout = self.etf_form.dropout
        if dropout is not None:
            out = self._modules[dropout](out)
        return out


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(vanilla: type, form: MLPForm) -> type:
    if vanilla not in _FUSED_CLASSES:
        name = f"ETFFused{vanilla.__name__}"
        cls = type(name, (FusedFeedForwardMixin, vanilla), {
            "etf_form": form, "etf_vanilla_mlp": vanilla, "__module__": __name__,
            "etf_projection_names": tuple(name for name in (form.gate, form.up, form.down) if name is not None),
            "__doc__": f"{vanilla.__name__} computed by the fused fixed-frame FFN when its projections are ETF layers (etf_hf).",
        })
        setattr(sys.modules[__name__], name, cls)
        _FUSED_CLASSES[vanilla] = cls
    return _FUSED_CLASSES[vanilla]


def fuse_feed_forwards(model: nn.Module, recompute: bool | None = None) -> list[str]:
    """Switch every MLP module of ``model`` with a known `MLPForm` whose projections are all ETF layers to
    the fused path; returns their paths. ``recompute`` None: on for a structured up-projection, off for a
    dense one (see the module docstring)."""
    fused = []
    for path, module in model.named_modules():
        vanilla = getattr(module, "etf_vanilla_mlp", type(module))
        form = mlp_form(vanilla)
        if form is None:
            continue
        names = [name for name in (form.gate, form.up, form.down) if name is not None]
        layers = [getattr(module, name, None) for name in names]
        if not all(isinstance(layer, ETFLinear) for layer in layers):
            continue
        module.__class__ = _fused_class(vanilla, form)
        module.etf_recompute = layers[-2].structured if recompute is None else recompute
        fused.append(path)
    return fused


def unfuse_feed_forwards(model: nn.Module) -> None:
    """Give every fused MLP module of ``model`` its vanilla class back (used by `etf_hf.materialize`)."""
    for module in model.modules():
        if isinstance(module, FusedFeedForwardMixin):
            module.__class__ = module.etf_vanilla_mlp
            del module.etf_recompute
