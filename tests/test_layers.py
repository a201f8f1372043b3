"""ETFLinear: a drop-in Linear/Conv1D whose frame cannot move, with exact gradients for what can."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from etf_hf import ETFLinear
from etf_hf.layers import _FixedFrameLinear, frame_orientation, oriented_frame
from test_etf import assert_simplex


#: A dense-frame basis and the matrix-free one: the two forward paths every interop test must cover.
FORWARD_PATHS = ["orthogonal", "structured"]


def make_layer(in_features: int, out_features: int, basis: str = "orthogonal", **kwargs) -> ETFLinear:
    layer = ETFLinear(in_features, out_features, basis=basis, seed=2, gain=1.7, **kwargs)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("in_features,out_features", [(8, 32), (32, 8), (12, 12)])
def test_narrow_side_carries_the_frame(in_features: int, out_features: int) -> None:
    frame = oriented_frame(in_features, out_features, "orthogonal", 0)
    assert frame.shape == (out_features, in_features)
    if frame_orientation(in_features, out_features) == "columns":
        assert out_features >= in_features
        assert_simplex(frame)
    else:
        assert out_features < in_features
        assert_simplex(frame.t())


@pytest.mark.parametrize("in_features,out_features", [(8, 32), (32, 8)])
def test_forward_equals_dense_linear(in_features: int, out_features: int) -> None:
    layer = make_layer(in_features, out_features)
    x = torch.randn(3, 5, in_features)
    dense = nn.functional.linear(x, layer.weight, layer.bias)
    assert layer.weight.shape == (out_features, in_features)
    assert torch.allclose(layer(x), dense, atol=1e-6)


@pytest.mark.parametrize("in_features,out_features", [(6, 10), (10, 6)])
@pytest.mark.parametrize("trainable_gain", [True, False])
def test_gradients_match_autograd_of_the_dense_form(in_features: int, out_features: int, trainable_gain: bool) -> None:
    layer = make_layer(in_features, out_features, trainable_gain=trainable_gain).double()
    x = torch.randn(4, in_features, dtype=torch.float64, requires_grad=True)
    inputs = (x, layer.frame, layer.frame_norm, layer.bias)
    assert torch.autograd.gradcheck(_FixedFrameLinear.apply, inputs)
    assert layer.frame.grad is None and not layer.frame.requires_grad


def test_frame_is_a_buffer_never_a_parameter() -> None:
    layer = make_layer(8, 32)
    names = dict(layer.named_parameters())
    assert set(names) == {"frame_norm", "bias"}
    assert "frame" not in layer.state_dict()  # regenerable: rebuilt from (basis, seed, shape)
    nearest = ETFLinear.from_layer(nn.Linear(8, 32), layout="linear", basis="nearest", seed=0)
    assert "frame" in nearest.state_dict() and "frame" not in dict(nearest.named_parameters())


def test_fixed_gain_is_a_buffer() -> None:
    """transformers 5.x reloads a frozen Parameter as trainable, so a fixed gain must be a buffer."""
    layer = make_layer(8, 32, trainable_gain=False)
    assert set(dict(layer.named_parameters())) == {"bias"}
    assert "frame_norm" in layer.state_dict()


@pytest.mark.parametrize("basis", ["orthogonal", "canonical", "nearest"])
def test_from_linear_and_conv1d_keep_bias_and_scale(basis: str) -> None:
    linear = nn.Linear(16, 48)
    conv = Conv1D(48, 16)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        conv.bias.copy_(linear.bias)
    from_linear = ETFLinear.from_layer(linear, layout="linear", basis=basis, seed=4)
    from_conv = ETFLinear.from_layer(conv, layout="conv1d", basis=basis, seed=4)
    x = torch.randn(5, 16)
    assert torch.equal(from_linear(x), from_conv(x))
    assert torch.equal(from_linear.bias, linear.bias)
    if basis == "nearest":
        error = (from_linear.weight - linear.weight).norm()
        matched = ETFLinear.from_layer(linear, layout="linear", basis="orthogonal", seed=4)
        assert error < (matched.weight - linear.weight).norm()
    else:
        assert torch.allclose(from_linear.weight.norm(), linear.weight.norm(), rtol=1e-5)


def test_explicit_gain_overrides_matching() -> None:
    layer = ETFLinear.from_layer(nn.Linear(8, 32), layout="linear", basis="canonical", seed=0, gain=1.0)
    assert layer.frame_norm.item() == 1.0
    assert torch.allclose(layer.weight.norm(dim=0), torch.ones(8))  # unit frame vectors, as in the paper


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_to_dtype(dtype: torch.dtype) -> None:
    layer = make_layer(8, 32).to(dtype)
    assert layer.frame.dtype == dtype and layer.frame_norm.dtype == dtype
    out = layer(torch.randn(2, 8, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("basis", FORWARD_PATHS)
@pytest.mark.parametrize("in_features,out_features", [(16, 64), (64, 16)])
def test_bf16_autocast_forward_and_backward(basis: str, in_features: int, out_features: int) -> None:
    layer = make_layer(in_features, out_features, basis)
    x = torch.randn(4, in_features, requires_grad=True)
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.frame_norm.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("in_features,out_features", [(16, 64), (64, 16)])
def test_saves_only_the_narrow_activation(in_features: int, out_features: int) -> None:
    """The fixed frame's backward needs no input; only the gain's gradient keeps one activation, the
    narrow (d-wide) side, so an ETF FFN saves less than a dense one."""
    layer = make_layer(in_features, out_features)
    x = torch.randn(32, in_features, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.dim() == 2 and t.shape[0] == 32]
    assert [t.shape[1] for t in activations] == [min(in_features, out_features)]
    saved.clear()
    fixed = make_layer(in_features, out_features, trainable_gain=False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fixed(x)
    assert not [t for t in saved if t.dim() == 2 and t.shape[0] == 32]


@pytest.mark.parametrize("basis", FORWARD_PATHS)
def test_torch_compile_fullgraph_matches_eager(basis: str) -> None:
    model = nn.Sequential(make_layer(8, 32, basis), nn.GELU(), make_layer(32, 8, basis))
    x = torch.randn(4, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-6)
    out.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for compiled_grad, param in zip(eager_grads, model.parameters()):
        assert torch.allclose(compiled_grad, param.grad, atol=1e-5)


def test_reset_frame_restores_a_clobbered_frame() -> None:
    layer = make_layer(8, 32)
    expected = layer.frame.clone()
    with torch.no_grad():
        layer.frame.fill_(float("nan"))
    layer.reset_frame()
    assert torch.equal(layer.frame, expected)


def test_wrong_frame_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"expected \(out, in\)=\(32, 8\)"):
        ETFLinear(8, 32, basis="nearest", seed=0, frame=torch.zeros(8, 32))
    with pytest.raises(ValueError, match="cannot be regenerated"):
        ETFLinear(8, 32, basis="nearest", seed=0)


@pytest.mark.parametrize("basis", ["orthogonal", "canonical", "structured", "nearest"])
def test_half_float_round_trip_keeps_the_float32_frame(tmp_path, basis: str) -> None:
    """Frames are defined in float32: after model.half().float() the in-memory model must equal its own
    save/reload (an fp16-rounded orthogonal frame moved GPT-2's logits by 1.5e-4 before)."""
    from transformers import AutoModelForCausalLM

    from etf_hf import ETFConfig, etf_layers, patch
    from tiny_models import tiny_gpt2, token_batch

    model = patch(tiny_gpt2(), ETFConfig(basis=basis)).eval()
    frames = {name: layer.frame.clone() for name, layer in etf_layers(model)}
    model.half().float()
    for name, layer in etf_layers(model):
        if layer.regenerable:
            assert torch.equal(layer.frame, frames[name]), name
        else:  # a stored frame keeps what it holds; the checkpoint stores exactly that
            assert torch.equal(layer.frame, frames[name].half().float()), name
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(token_batch()).logits, model(token_batch()).logits)


def test_downcast_still_rounds_and_upcast_to_float64_holds_float32_values() -> None:
    layer = make_layer(16, 48)
    frame = layer.frame.clone()
    assert torch.equal(layer.half().frame, frame.half())
    assert torch.equal(layer.double().frame, frame.double())


@pytest.mark.parametrize("basis", FORWARD_PATHS)
@pytest.mark.parametrize("in_features,out_features", [(8, 32), (32, 8)])
def test_float64_gain_and_bias_gradients_accumulate_in_float64(basis: str, in_features: int, out_features: int) -> None:
    """Float64 in, float64 sums: the gain and bias gradients agree with autograd through the dense form to
    1e-12 (summed in float32 over 20,000 rows they were off by ~1e-6)."""
    layer = make_layer(in_features, out_features, basis=basis).double()
    x = torch.randn(20_000, in_features, dtype=torch.float64) * 10
    grad = torch.randn(20_000, out_features, dtype=torch.float64) * 10
    layer(x).backward(grad)
    gain = layer.frame_norm.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x, layer.frame * gain, bias).backward(grad)
    assert torch.allclose(layer.bias.grad, bias.grad, rtol=0, atol=1e-9)
    assert torch.allclose(layer.frame_norm.grad, gain.grad, rtol=1e-12, atol=1e-9)
