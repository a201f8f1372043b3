"""The structured basis: a seeded Walsh-Hadamard frame, exact, full-rank on an FFN, applied matrix-free."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import etf_hf  # noqa: F401  (registers the ETF model types with the Auto classes)
from etf_hf import ETFConfig, ETFLinear, etf_layers, patch
from etf_hf.etf import (BASES, REGENERABLE_BASES, simplex_etf, structured_apply, structured_apply_t,
                        structured_blocks, structured_dense, structured_isometry, structured_operator,
                        structured_plan)
from etf_hf.layers import _StructuredFrameLinear
from test_etf import assert_simplex
from tiny_models import tiny_gpt2, token_batch

# (K, D): D = K-1 (Helmert), D = K, odd D (a block of size 1), a single block, FFN-sized, and small K.
SHAPES = [(2, 1), (10, 9), (5, 5), (4, 9), (16, 64), (7, 100), (48, 192), (96, 1000), (768, 3072)]
LAYER_SHAPES = [(16, 64), (64, 16), (12, 12), (9, 4), (20, 21), (768, 3072), (3072, 768)]  # (in, out)


def structured_layer(in_features: int, out_features: int, **kwargs) -> ETFLinear:
    layer = ETFLinear(in_features, out_features, basis="structured", seed=5, gain=1.3, **kwargs)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


def test_structured_is_a_regenerable_basis() -> None:
    assert "structured" in BASES and "structured" in REGENERABLE_BASES
    assert ETFConfig(basis="structured").basis == "structured"


@pytest.mark.parametrize("num_vectors,dim", SHAPES)
def test_isometry_has_orthonormal_columns(num_vectors: int, dim: int) -> None:
    isometry = structured_isometry(structured_plan(num_vectors, dim, seed=1))
    assert isometry.shape == (dim, num_vectors)
    if dim >= num_vectors:
        assert torch.allclose(isometry.t() @ isometry, torch.eye(num_vectors, dtype=torch.float64), atol=1e-5)
    else:  # D = K-1: orthonormal rows spanning the complement of the all-ones vector
        assert torch.allclose(isometry @ isometry.t(), torch.eye(dim, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(isometry.sum(1), torch.zeros(dim, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("num_vectors,dim", SHAPES)
def test_exact_simplex_gram(num_vectors: int, dim: int) -> None:
    frame = simplex_etf(num_vectors, dim, "structured", seed=2)
    assert frame.shape == (dim, num_vectors) and frame.dtype == torch.float32
    assert_simplex(frame)
    assert torch.allclose(frame.double().sum(1), torch.zeros(dim, dtype=torch.float64), atol=1e-6)


def test_plan_stores_only_signs_indices_and_a_small_hadamard() -> None:
    plan = structured_plan(768, 3072, seed=0)
    assert plan.blocks == (2048, 1024) and structured_blocks(768) == (512, 256) and structured_blocks(5) == (4, 1)
    assert plan.index.dtype == plan.perm.dtype == torch.int64
    assert set(plan.signs.tolist()) == {-1.0, 1.0} and set(plan.hadamard.unique().tolist()) == {-1.0, 1.0}
    assert plan.hadamard.shape == (64, 64)
    assert torch.equal(plan.perm[plan.inverse], torch.arange(3072))
    stored = sum(t.numel() for t in plan[4:])
    assert stored < 0.01 * 768 * 3072
    # the inputs are spread over every block in proportion to its size
    assert (plan.index < 2048).sum() == 512 and (plan.index >= 2048).sum() == 256


def test_every_output_depends_on_the_input() -> None:
    """No dead hidden unit: every row of an FFN-shaped frame is non-zero and no two rows are equal."""
    for num_vectors, dim in [(16, 64), (48, 192), (768, 3072)]:
        frame = simplex_etf(num_vectors, dim, "structured", seed=3, dtype=torch.float64)
        assert (frame.abs().sum(1) > 1e-6).all()
        assert torch.unique(frame.round(decimals=9), dim=0).shape[0] == dim


@pytest.mark.parametrize("basis,full_rank", [("structured", True), ("orthogonal", True), ("canonical", False)])
def test_rank_of_activated_hidden_features(basis: str, full_rank: bool) -> None:
    """The finding: with U = I an up-projection d -> 4d feeds the input to only d hidden units, so the
    GELU features span about d+1 dimensions (d units plus the constant that the bias-only units give);
    a structured frame, like a dense orthogonal one, gives every hidden unit its own input direction."""
    torch.manual_seed(0)
    fc1 = ETFLinear(16, 64, basis=basis, seed=7, gain=1.0).double()
    with torch.no_grad():
        fc1.bias.normal_()
    inputs = torch.randn(2000, 16, dtype=torch.float64)
    with torch.no_grad():
        hidden = nn.functional.gelu(fc1(inputs))
    rank = int(torch.linalg.matrix_rank(hidden))
    if full_rank:
        assert rank == 64, rank
    else:
        assert rank <= 16 + 1, rank


@pytest.mark.parametrize("num_vectors,dim", SHAPES)
def test_matrix_free_apply_equals_the_dense_frame(num_vectors: int, dim: int) -> None:
    plan = structured_plan(num_vectors, dim, seed=4)
    operator = structured_operator(plan)
    op32 = operator._replace(signs=operator.signs.float(), hadamard=operator.hadamard.float())
    frame = structured_dense(plan, torch.float32)
    x = torch.randn(3, 7, num_vectors)
    y = torch.randn(3, 7, dim)
    assert torch.allclose(structured_apply(x, op32), x @ frame.t(), atol=1e-5)
    assert torch.allclose(structured_apply_t(y, op32), y @ frame, atol=1e-5)
    assert torch.equal(structured_dense(plan), simplex_etf(num_vectors, dim, "structured", seed=4, dtype=torch.float64))


@pytest.mark.parametrize("in_features,out_features", LAYER_SHAPES)
def test_layer_forward_and_backward_equal_the_dense_materialisation(in_features: int, out_features: int) -> None:
    layer = structured_layer(in_features, out_features)
    weight = layer.weight.detach()
    assert weight.shape == (out_features, in_features) and weight.dtype == torch.float32
    x = torch.randn(4, 5, in_features, requires_grad=True)
    out = layer(x)
    dense_x = x.detach().clone().requires_grad_(True)
    dense = nn.functional.linear(dense_x, weight, layer.bias)
    assert torch.allclose(out, dense, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    dense.backward(grad)
    assert torch.allclose(x.grad, dense_x.grad, atol=1e-5)
    expected_gain_grad = (grad * nn.functional.linear(x.detach(), layer.frame)).sum()
    assert torch.allclose(layer.frame_norm.grad, expected_gain_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_features,out_features", [(6, 10), (10, 6), (7, 7)])
@pytest.mark.parametrize("trainable_gain", [True, False])
def test_gradcheck_float64(in_features: int, out_features: int, trainable_gain: bool) -> None:
    layer = structured_layer(in_features, out_features, trainable_gain=trainable_gain).double()
    x = torch.randn(4, in_features, dtype=torch.float64, requires_grad=True)
    operator = layer.operator

    def function(x, gain, bias):
        return _StructuredFrameLinear.apply(x, gain, bias, *operator[1:], layer._structured_layout)

    assert torch.autograd.gradcheck(function, (x, layer.frame_norm, layer.bias))
    # and the same gradients as autograd through the dense form
    out = function(x, layer.frame_norm, layer.bias)
    dense_x = x.detach().clone().requires_grad_(True)
    gain = layer.frame_norm.detach().clone().requires_grad_(trainable_gain)
    dense = nn.functional.linear(dense_x, layer.frame * gain, layer.bias)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + [t for t in (layer.frame_norm, layer.bias) if t.requires_grad], grad)
    dense_grads = torch.autograd.grad(dense, [dense_x] + [t for t in (gain, layer.bias) if t.requires_grad], grad)
    for got, expected in zip(grads, dense_grads):
        assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("num_vectors,dim", [(6, 10), (5, 4), (3, 3)])
def test_plain_functions_are_differentiable(num_vectors: int, dim: int) -> None:
    operator = structured_operator(structured_plan(num_vectors, dim, seed=9))
    plan = operator._replace(signs=operator.signs.double(), hadamard=operator.hadamard.double())
    x = torch.randn(3, num_vectors, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: structured_apply(t, plan), (x,))
    assert torch.autograd.gradcheck(lambda t: structured_apply_t(t, plan), (y,))


@pytest.mark.parametrize("in_features,out_features", [(16, 64), (64, 16)])
def test_saves_only_the_narrow_activation(in_features: int, out_features: int) -> None:
    layer = structured_layer(in_features, out_features)
    x = torch.randn(32, in_features, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert [tuple(t.shape) for t in saved if t.numel() > 1] == [(32, min(in_features, out_features))]
    saved.clear()
    fixed = structured_layer(in_features, out_features, trainable_gain=False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fixed(x)
    assert not [t for t in saved if t.numel() > 1]


def test_no_frame_buffer_and_nothing_fixed_in_the_state_dict() -> None:
    layer = structured_layer(16, 64)
    assert "frame" not in dict(layer.named_buffers())
    assert set(layer.state_dict()) == {"frame_norm", "bias"}
    assert set(dict(layer.named_parameters())) == {"frame_norm", "bias"}
    ffn = structured_layer(768, 3072)
    assert sum(b.numel() for b in ffn.buffers()) < 0.01 * ffn.frame.numel()  # 14,080 vs 2,359,296
    assert not layer.frame.requires_grad and layer.frame.shape == (64, 16)
    assert_simplex(layer.frame)  # (out=64, in=16): the 16 columns are the frame vectors


def test_deepcopy_and_pickle_keep_the_frame(tmp_path: Path) -> None:
    import copy

    layer = structured_layer(12, 40)
    x = torch.randn(2, 12)
    torch.save(layer, tmp_path / "layer.pt")
    for other in (copy.deepcopy(layer), torch.load(tmp_path / "layer.pt", weights_only=False)):
        assert torch.equal(other(x), layer(x)) and torch.equal(other.frame, layer.frame)


def test_reset_frame_rebuilds_clobbered_plan_buffers() -> None:
    layer = structured_layer(16, 64)
    x = torch.randn(3, 16)
    expected = layer(x)
    with torch.no_grad():
        for name, buffer in layer.named_buffers():
            buffer.copy_(torch.zeros_like(buffer) if name != "plan_signs" else torch.full_like(buffer, float("nan")))
    layer.reset_frame()
    assert torch.equal(layer(x), expected)


def test_built_on_meta_then_reset() -> None:
    meta = ETFLinear.from_layer(nn.Linear(16, 64, device="meta"), layout="linear", basis="structured", seed=5)
    assert meta.plan_index.is_meta and meta.plan_spread.is_meta and "frame" not in dict(meta.named_buffers())
    real = meta.to_empty(device="cpu")
    real.reset_frame()
    reference = ETFLinear(16, 64, basis="structured", seed=5)
    assert torch.equal(real.frame, reference.frame)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_to_dtype(dtype: torch.dtype) -> None:
    layer = structured_layer(16, 64).to(dtype)
    assert layer.frame.dtype == dtype and layer.plan_index.dtype == torch.int64
    out = layer(torch.randn(2, 16, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_golden_values_pin_the_seeded_plan() -> None:
    """Checkpoints never store a structured frame: pin the draws (pure-Python SplitMix64 integers, so they
    do not depend on the torch release) and a few values of the frame they give."""
    plan = structured_plan(16, 64, seed=0)
    assert plan.index[:8].tolist() == [52, 46, 39, 58, 3, 1, 59, 23]
    assert plan.perm[:8].tolist() == [16, 1, 58, 61, 25, 7, 28, 27]
    assert plan.signs[:8].tolist() == [-1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    frame = simplex_etf(16, 64, "structured", seed=0, dtype=torch.float64)
    golden = [0.14523687548277814, 0.14523687548277814, -0.11296201426438299, -0.11296201426438299]
    assert torch.allclose(frame[0, :4], torch.tensor(golden, dtype=torch.float64), atol=1e-12)


@pytest.mark.slow  # a fresh Python process
def test_same_frame_in_a_fresh_process() -> None:
    code = ("import torch; from etf_hf.etf import structured_plan, simplex_etf; "
            "p = structured_plan(768, 3072, seed=11); "
            "print(repr([p.index.tolist(), p.signs.tolist(), p.perm.tolist(), "
            "simplex_etf(768, 3072, 'structured', seed=11, dtype=torch.float64).sum(0).tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    index, signs, perm, column_sums = eval(out.strip().splitlines()[-1])
    plan = structured_plan(768, 3072, seed=11)
    assert index == plan.index.tolist() and signs == plan.signs.tolist() and perm == plan.perm.tolist()
    here = simplex_etf(768, 3072, "structured", seed=11, dtype=torch.float64).sum(0)
    assert torch.allclose(torch.tensor(column_sums, dtype=torch.float64), here, atol=1e-12)


def test_patched_gpt2_saves_no_frame_and_reloads_identically(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = patch(tiny_gpt2(), ETFConfig(basis="structured")).eval()
    inputs = token_batch()
    with torch.no_grad():
        before = model(inputs).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert not [key for key in keys if key.endswith(".frame") or ".plan_" in key]
    assert any(key.endswith("mlp.c_fc.frame_norm") for key in keys)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    with torch.no_grad():
        after = loaded(inputs).logits
    assert torch.equal(before, after)
    for (name, layer), (_, original) in zip(etf_layers(loaded), etf_layers(model)):
        assert layer.basis == "structured" and "frame" not in dict(layer.named_buffers()), name
        assert torch.equal(layer.frame, original.frame), name



@pytest.mark.parametrize("max_factor", [2, 8, 16, 64])
@pytest.mark.parametrize("num_vectors,dim", SHAPES)
def test_fast_operator_equals_the_dense_frame_for_any_kronecker_split(num_vectors: int, dim: int, max_factor: int) -> None:
    """Sylvester blocks factorise over any split of their index bits: the fast path may choose its own
    factors (H64 = H8 (x) H8, ...) and still apply exactly the plan's frame (fp32 to 1e-5)."""
    plan = structured_plan(num_vectors, dim, seed=4)
    operator = structured_operator(plan, max_factor)
    assert all(f <= max_factor for factors in operator.layout[4] for f in factors)
    op32 = operator._replace(signs=operator.signs.float(), hadamard=operator.hadamard.float())
    frame = structured_dense(plan, torch.float32)
    x = torch.randn(11, num_vectors)
    y = torch.randn(11, dim)
    assert torch.allclose(structured_apply(x, op32), x @ frame.t(), atol=1e-5)
    assert torch.allclose(structured_apply_t(y, op32), y @ frame, atol=1e-5)


@pytest.mark.parametrize("max_factor", [2, 16, 64])
@pytest.mark.parametrize("num_vectors,dim", SHAPES)
def test_single_column_sandwich_equals_the_dense_frame(num_vectors: int, dim: int, max_factor: int) -> None:
    """One row (a batch-1 decoding step) takes the two-GEMM sandwich L Z H_c for all Hadamard blocks at once
    (where it applies; odd D keeps the Kronecker factors): the same frame (fp32 to 1e-5), in both
    directions, and the same as that row inside a batch."""
    plan = structured_plan(num_vectors, dim, seed=4)
    op32 = structured_operator(plan, max_factor)
    op32 = op32._replace(signs=op32.signs.float(), hadamard=op32.hadamard.float())
    frame = structured_dense(plan, torch.float32)
    x = torch.randn(5, num_vectors)
    y = torch.randn(5, dim)
    assert torch.allclose(structured_apply(x[:1], op32), x[:1] @ frame.t(), atol=1e-5)
    assert torch.allclose(structured_apply_t(y[:1], op32), y[:1] @ frame, atol=1e-5)
    assert torch.allclose(structured_apply(x[:1], op32), structured_apply(x, op32)[:1], atol=1e-5)


def test_derived_scales_and_matrices_follow_the_operator_buffers() -> None:
    """The per-operator cache of scales and factor matrices (`etf_hf.etf.derived_of`) never serves stale
    values: a buffer rewritten in place (signs negated: the frame negated) is seen at the next call, a
    second dtype gets its own entry, and an entry goes with its buffer."""
    import gc

    from etf_hf import etf

    plan = structured_plan(48, 192, seed=4)
    operator = structured_operator(plan)
    op = operator._replace(signs=operator.signs.float(), hadamard=operator.hadamard.float())
    x = torch.randn(3, 48)
    before = structured_apply(x, op)
    with torch.no_grad():
        op.signs.neg_()
    assert torch.equal(structured_apply(x, op), -before)
    assert torch.allclose(structured_apply(x.double(), op), -before.double(), atol=1e-6)
    assert {tag[1] for tag in etf._MEMO[id(op.signs)] if tag[0] == "derived"} == {torch.float32, torch.float64}
    key = id(op.signs)
    del op, operator
    gc.collect()
    assert key not in etf._MEMO


def test_values_cached_under_inference_mode_serve_a_later_backward() -> None:
    """The cache's first call may come from generate() (inference_mode); a later differentiable call (a
    training step, the plain functions) must still be able to save what it reads for backward."""
    operator = structured_operator(structured_plan(16, 64, seed=1))
    op = operator._replace(signs=operator.signs.float(), hadamard=operator.hadamard.float())
    with torch.inference_mode():
        structured_apply(torch.randn(3, 16), op)
        structured_apply(torch.randn(1, 16), op)
    x = torch.randn(3, 16, requires_grad=True)
    one = torch.randn(1, 16, requires_grad=True)
    (structured_apply(x, op).square().sum() + structured_apply(one, op).square().sum()).backward()
    frame = structured_dense(structured_plan(16, 64, seed=1), torch.float32)
    assert torch.allclose(x.grad, 2 * x @ frame.t() @ frame, atol=1e-5)
    assert torch.allclose(one.grad, 2 * one @ frame.t() @ frame, atol=1e-5)


def test_fast_path_activates_every_hidden_unit_at_ffn_size() -> None:
    """Measured with the fast path itself: a 512 -> 2048 up-projection (one 2048-wide Hadamard block, no
    narrow blocks) gives every hidden unit input (no unit sees only its bias), and GELU of the hidden
    features has full rank 2048 over enough inputs."""
    layer = ETFLinear(512, 2048, basis="structured", seed=1, gain=1.0)
    with torch.no_grad():
        layer.bias.normal_()
        columns = layer(torch.eye(512)) - layer.bias  # row i: the frame's response to input i
        assert (columns.abs().sum(0) > 1e-3).all()  # every hidden unit depends on the input
        hidden = nn.functional.gelu(layer(torch.randn(4096, 512)))
    assert int(torch.linalg.matrix_rank(hidden.double())) == 2048


def test_frame_values_are_bit_for_bit_those_of_earlier_releases() -> None:
    """The fast path changed how activations are transformed, never the frame: sha256 of the float32
    frames, computed with the code before the fast operator existed (commit c302e56)."""
    import hashlib

    def digest(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16]

    frames = [simplex_etf(k, d, "structured", seed=3) for k, d in [(64, 256), (48, 192), (96, 1000)]]
    assert [digest(f) for f in frames] == ["2464b95e526c9724", "079117feb79a895c", "f0f22092c32fbeb4"]
    assert digest(ETFLinear(768, 3072, basis="structured", seed=11).frame) == "d5a0e4355c76f00e"
    assert digest(ETFLinear(3072, 768, basis="structured", seed=11).frame) == "1305a482bee1c9d4"
