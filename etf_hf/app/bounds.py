"""The benchmark's two FFN bounds: replacements for every FFN projection that no fixed-frame FFN can undercut.

``ffn-free`` (`BiasOnly` everywhere, the MLP's activation an identity): each projection returns only its
bias, so the FFN costs nothing but the bias gradients, and the activation is not computed either: the loose
bound. (The identity matters: an MLP's forward still calls its activation on the up-projection's output, and
GPT-2's written-out GELU would materialise eight hidden-wide tensors from the broadcast bias.)

``ffn-activation-only`` (`BroadcastHidden` up, `LeadingUnits` down): the FFN still applies its own
activation at the full hidden width, forward and backward, keeping what the activation saves for backward,
and only its projections cost nothing: the tight bound, what any FFN whose projections are fixed frames must
still pay in time.

The activation is evaluated as the fused fixed-frame FFN evaluates it (`etf_hf.ffn.KERNEL_KIND`: GPT-2's
written-out ``gelu_new`` by torch's one tanh-GELU kernel, the same function), so the tight bound stays a
bound for it.

Both act on exactly the slots `etf_hf.patch` replaces under the default `ETFConfig` and keep the replaced
layers' biases trainable: they train what ``frozen`` trains (where every projection has a bias).
"""
from __future__ import annotations

import torch
from torch import nn

from ..architectures import Slot, find_slots, mlp_form
from ..config import ETFConfig
from ..ffn import activation_kind, kernel_kind
from ..patch import resolve

ACTIVATION_ONLY, FFN_FREE = "ffn-activation-only", "ffn-free"
BOUNDS = (ACTIVATION_ONLY, FFN_FREE)


class BiasOnly(nn.Module):
    """The FFN-free bound: a projection that ignores its input and returns its bias broadcast to
    ``(*input.shape[:-1], out_features)`` (zeros when the layer had no bias).

    The result is an expanded view (no copy). Under autocast it comes out in the autocast dtype, like a
    real Linear would, so downstream ops run in the same precision as in the other modes.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_layer(cls, layer: nn.Module, layout: str) -> BiasOnly:
        out_features, in_features = _weight_shape(layer, layout)
        return cls(in_features, out_features, getattr(layer, "bias", None))

    def _output_dtype(self, x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._output_dtype(x)
        shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x.new_zeros((), dtype=dtype).expand(shape)
        return self.bias.to(dtype).expand(shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class BroadcastHidden(BiasOnly):
    """``ffn-activation-only``'s up-projection: its bias broadcast to the full hidden width and *materialised*.

    The FFN's own activation then runs on a real hidden-wide tensor and keeps what it needs for backward,
    as in every FFN whose projections are fixed frames: the frames can be made cheap, the activation at
    hidden width cannot. A layer without a bias gets a zero one, so that the activation has a trainable
    input and autograd keeps its tensors. (A fused FFN that recomputes the activation in backward can save
    less memory than this bound; it cannot spend less time.)
    """

    @classmethod
    def from_layer(cls, layer: nn.Module, layout: str) -> BroadcastHidden:
        out_features, in_features = _weight_shape(layer, layout)
        bias = getattr(layer, "bias", None)
        return cls(in_features, out_features, torch.zeros(out_features) if bias is None else bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous()


class LeadingUnits(nn.Module):
    """``ffn-activation-only``'s down-projection: the first ``out_features`` hidden units plus the bias.

    A view and an add: the cheapest map from the hidden width back to the model width that still sends a
    gradient through the activation (its backward runs at full hidden width, on a zero-padded gradient).
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        if in_features < out_features:
            raise ValueError(f"ffn-activation-only: a down-projection from {in_features} to {out_features} "
                             f"features widens, so it cannot hand on the first {out_features} hidden units")
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_layer(cls, layer: nn.Module, layout: str) -> LeadingUnits:
        out_features, in_features = _weight_shape(layer, layout)
        return cls(in_features, out_features, getattr(layer, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        units = x[..., : self.out_features]
        return units if self.bias is None else units + self.bias.to(units.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _weight_shape(layer: nn.Module, layout: str) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or of transformers' Conv1D, which stores (in, out)."""
    weight = layer.weight.t() if layout == "conv1d" else layer.weight
    return tuple(weight.shape)


def ffn_slots(model: nn.Module) -> list[Slot]:
    """The FFN projections every mode treats: those `etf_hf.patch` replaces under the default `ETFConfig`
    (resolved for this model, as `patch` resolves it)."""
    return find_slots(model, resolve(model, ETFConfig()))


def replace_ffn(model: nn.Module, mode: str) -> list[Slot]:
    """Replace every FFN projection of ``model`` in place by ``mode``'s bound (``ffn-free``: `BiasOnly`
    everywhere; ``ffn-activation-only``: `BroadcastHidden` up, `LeadingUnits` down); returns the slots."""
    if mode not in BOUNDS:
        raise ValueError(f"unknown bound {mode!r}: choose {' or '.join(BOUNDS)}")
    slots = ffn_slots(model)
    for slot in slots:
        layer = getattr(slot.parent, slot.attribute)
        if mode == FFN_FREE:
            replacement = BiasOnly.from_layer(layer, slot.layout)
        else:
            kind = BroadcastHidden if slot.role == "up" else LeadingUnits
            replacement = kind.from_layer(layer, slot.layout)
        setattr(slot.parent, slot.attribute, replacement)
        _bound_activation(slot.parent, mode)
    return slots


def _bound_activation(mlp: nn.Module, mode: str) -> None:
    """Give an MLP with a known `MLPForm` its bound's activation: an identity for ``ffn-free``; for
    ``ffn-activation-only`` the module the fused FFN evaluates in its place (GPT-2's ``gelu_new`` becomes
    ``nn.GELU(approximate="tanh")``, the same function in one kernel), other activations as they are.
    (BERT's FFN spans two modules and has no `MLPForm`: its activation stays, and so does its cost.)"""
    form = mlp_form(type(mlp))
    if form is None:
        return
    if mode == FFN_FREE:
        setattr(mlp, form.activation, nn.Identity())
        return
    kind = activation_kind(getattr(mlp, form.activation))
    if kind is not None and kernel_kind(kind) != kind:
        setattr(mlp, form.activation, _KERNEL_MODULES[kernel_kind(kind)]())


#: The module computing each kernel kind `etf_hf.ffn.KERNEL_KIND` maps an activation to.
_KERNEL_MODULES = {"gelu_tanh": lambda: nn.GELU(approximate="tanh")}
