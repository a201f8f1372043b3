"""The fused fixed-frame FFN: same outputs and gradients as the per-projection ETF layers, nothing saved
beyond the block input, compile- and checkpointing-safe, and every existing checkpoint loads into it."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import etf_hf
from etf_hf import ETFConfig, ETFLinear, materialize, patch
from etf_hf.ffn import FusedFeedForwardMixin, activation_kind, fuse_feed_forwards, kernel_kind, unfuse_feed_forwards
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_batch

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit}


def mlps(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, FusedFeedForwardMixin)]


def patched(name: str, basis: str = "structured", recompute: bool | None = None) -> nn.Module:
    model = patch(BUILDERS[name](), ETFConfig(basis=basis, recompute=recompute))
    with torch.no_grad():  # non-trivial gains and biases, so every gradient term matters
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith((".frame_norm", ".bias")) and "mlp" in parameter_name:
                parameter.mul_(1.3).add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def per_projection(model: nn.Module) -> nn.Module:
    """The same model computing through its separate ETF layers (the path a partial patch takes)."""
    reference = copy.deepcopy(model)
    unfuse_feed_forwards(reference)
    assert not mlps(reference)
    return reference


def model_inputs(name: str) -> dict[str, torch.Tensor]:
    if name == "vit":
        return {"pixel_values": torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))}
    return {"input_ids": token_batch()}


def logits_and_grads(model: nn.Module, inputs: dict[str, torch.Tensor], autocast: bool = False):
    model.zero_grad()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(**inputs).logits
    logits.float().square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert embeddings is None or any("embed" in name or "wte" in name for name in grads)
    return logits.detach(), grads


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("basis", ["orthogonal", "structured", "nearest"])
@pytest.mark.parametrize("recompute", [True, False])
def test_fused_equals_per_projection_fp32(name: str, basis: str, recompute: bool) -> None:
    model = patched(name, basis, recompute)
    assert len(mlps(model)) == 2 and all(m.etf_recompute is recompute for m in mlps(model))
    reference = per_projection(model)
    inputs = model_inputs(name)
    logits, grads = logits_and_grads(model, inputs)
    expected, expected_grads = logits_and_grads(reference, inputs)
    assert_same_forward(model, logits, expected, 1e-5)
    assert grads.keys() == expected_grads.keys()
    fixed_frame_grads = [key for key in grads if key.endswith(("frame_norm", "mlp.c_fc.bias", "fc1.bias"))]
    assert fixed_frame_grads or name == "llama"
    assert_close_grads(grads, expected_grads, 2e-5)


def assert_same_forward(model: nn.Module, logits: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Bit-identical where the fused FFN computes the activation as the module does (same operations in
    the same order); GPT-2's written-out ``gelu_new`` is evaluated by torch's one tanh-GELU kernel (same
    function, `etf_hf.ffn.KERNEL_KIND`), so there the logits agree to float rounding only, and must differ
    (the kernel really runs)."""
    kinds = {activation_kind(getattr(mlp, mlp.etf_form.activation)) for mlp in mlps(model)}
    if all(kernel_kind(kind) == kind for kind in kinds):
        assert torch.equal(logits, expected)
        return
    assert kinds == {"gelu_new"}
    assert (logits.float() - expected.float()).abs().max() <= rtol * expected.float().abs().max()


def assert_close_grads(grads: dict, expected: dict, rtol: float) -> None:
    """Each gradient (input side through every earlier block, gains, biases) within rtol of its own scale;
    a gain's gradient is one sum with cancellation, so it may also be off by rtol/20 of the largest one."""
    largest = max(g.abs().max().item() for g in expected.values())
    for key, grad in grads.items():
        error = (grad - expected[key]).abs().max().item()
        assert error <= rtol * expected[key].abs().max().item() + rtol / 20 * largest, key


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("recompute", [True, False])
def test_fused_equals_per_projection_under_bf16_autocast(name: str, recompute: bool) -> None:
    model = patched(name, "structured", recompute)
    reference = per_projection(model)
    inputs = model_inputs(name)
    logits, grads = logits_and_grads(model, inputs, autocast=True)
    expected, expected_grads = logits_and_grads(reference, inputs, autocast=True)
    assert logits.dtype == expected.dtype
    assert_same_forward(model, logits, expected, 2e-2)
    assert_close_grads(grads, expected_grads, 2e-2)
    for _, layer in etf_hf.etf_layers(model):  # frames untouched by autocast
        assert layer.frame_norm.dtype == torch.float32


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_float64(gated: bool) -> None:
    """The explicit adjoints are the exact derivative: float64 gradcheck through one fused MLP."""
    model = patched("llama" if gated else "gpt2", "structured").double()
    mlp = mlps(model)[0]
    names = [name for name, _ in mlp.named_parameters()]
    assert len(names) == (3 if gated else 4)
    leaves = [p.detach().clone().requires_grad_(True) for _, p in mlp.named_parameters()]
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)

    def function(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(mlp, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(function, (x, *leaves))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_saves_only_the_block_input_and_gains(name: str, recompute: bool) -> None:
    model = patched(name, "structured", recompute)  # eval: GPT-2's dropout (after the FFN) saves no mask
    mlp = mlps(model)[0]
    hidden = mlp.etf_fused_projections()[0].out_features
    x = torch.randn(4, 6, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    gains = [layer.frame_norm for layer in mlp.children() if isinstance(layer, ETFLinear)]
    shapes = sorted(tuple(t.shape) for t in saved)
    ups = len(gains) - 1
    expected = [(1,)] * len(gains) + [(4, 6, 32)] + ([] if recompute else [(24, hidden)] * ups)
    assert shapes == sorted(expected)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    # the per-projection layers keep the hidden activation: what the fusion removes
    unfused = per_projection(model)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        [m for m in unfused.modules() if type(m).__name__.endswith("MLP")][0](x)
    assert any(t.shape[-1] == hidden for t in saved)


def test_gpt2_dropout_still_applies_after_the_fused_ffn() -> None:
    model = patched("gpt2").train()
    mlp = mlps(model)[0]
    mlp.dropout.p = 0.5
    x = torch.randn(2, 8, 32)
    torch.manual_seed(4)
    out = mlp(x)
    torch.manual_seed(4)
    assert torch.equal(out, mlp.dropout(mlp.c_proj(gelu_tanh(mlp.c_fc(x)))))
    assert (out == 0).float().mean() > 0.2


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


@pytest.mark.parametrize("basis", ["structured", "orthogonal"])
def test_gpt2_gelu_new_runs_as_torchs_tanh_gelu_kernel(basis: str) -> None:
    """GPT-2's written-out gelu_new is evaluated by torch's one-pass tanh-GELU kernel: bit-identical to
    the per-projection layers around ``gelu(approximate="tanh")``, and only close to the module's own ops."""
    mlp = mlps(patched("gpt2", basis))[0]
    assert activation_kind(mlp.act) == "gelu_new" and kernel_kind("gelu_new") == "gelu_tanh"
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = mlp(x)
        assert torch.equal(out, mlp.c_proj(gelu_tanh(mlp.c_fc(x))))
        assert torch.allclose(out, mlp.c_proj(mlp.act(mlp.c_fc(x))), rtol=1e-5, atol=1e-6)


def test_falls_back_where_fusing_would_change_behaviour() -> None:
    model = patched("gpt2")
    mlp = mlps(model)[0]
    x = torch.randn(2, 5, 32)
    assert mlp.etf_fused_projections() is not None
    calls = []
    handle = mlp.c_fc.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    assert mlp.etf_fused_projections() is None
    mlp(x)
    assert calls == [(2, 5, 128)]  # the hook fired: the per-projection path ran
    handle.remove()
    mlp.c_proj.forward = lambda x: torch.zeros(*x.shape[:-1], 32)  # a replaced forward is honoured
    assert mlp.etf_fused_projections() is None and not mlp(x).any()
    del mlp.c_proj.forward
    assert mlp.etf_fused_projections() is not None
    mlp.act = nn.Tanh()  # no exact derivative known for it
    assert activation_kind(mlp.act) is None and mlp.etf_fused_projections() is None
    assert torch.equal(mlp(x), mlp.c_proj(torch.tanh(mlp.c_fc(x))))


def test_partial_patch_and_bert_keep_per_projection_layers() -> None:
    up_only = patch(tiny_gpt2(), ETFConfig(projections="up"))
    assert not mlps(up_only) and isinstance(up_only.transformer.h[0].mlp.c_fc, ETFLinear)
    bert = patch(tiny_bert(), ETFConfig(basis="structured"))  # FFN split over two modules: not fused
    assert not mlps(bert) and len(etf_hf.etf_layers(bert)) == 4


def test_materialize_restores_the_vanilla_mlp_class() -> None:
    model = patched("gpt2", "orthogonal")
    inputs = token_batch()
    with torch.no_grad():
        before = model(inputs).logits
    materialize(model)
    assert not mlps(model) and type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"
    with torch.no_grad():
        assert torch.allclose(model(inputs).logits, before, atol=1e-5)


def test_config_recompute_is_validated_and_recorded() -> None:
    with pytest.raises(ValueError, match="ETFConfig.recompute='yes'"):
        ETFConfig(recompute="yes")
    model = patch(tiny_gpt2(), ETFConfig(basis="orthogonal"))
    assert model.config.etf["recompute"] is None
    assert [m.etf_recompute for m in mlps(model)] == [False, False]  # dense frames: no recompute by default
    structured = patch(tiny_gpt2(), ETFConfig(basis="structured"))
    assert [m.etf_recompute for m in mlps(structured)] == [True, True]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradient_checkpointing_unaffected(name: str) -> None:
    model = patched(name, "structured").train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    inputs = model_inputs(name)
    _, expected = logits_and_grads(model, inputs)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    calls = [0]
    for mlp in mlps(model):
        mlp.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    _, grads = logits_and_grads(model, inputs)
    assert calls[0] == 4  # 2 blocks, each forward run twice (recomputed in backward), fused both times
    for key, grad in grads.items():
        assert torch.allclose(grad, expected[key], rtol=1e-5, atol=1e-7), key


BASES_AND_STORAGES = [(basis, storage) for basis in ("orthogonal", "canonical", "structured", "nearest")
                      for storage in ("compact", "dense")]


@pytest.mark.parametrize("basis,storage", BASES_AND_STORAGES)
def test_checkpoints_written_per_projection_load_into_the_fused_path(tmp_path: Path, basis: str, storage: str) -> None:
    """A checkpoint saved by a model computing per projection (the state-dict format every earlier
    release wrote: the MLP's own keys) loads into fused MLPs with identical logits."""
    model = patch(tiny_gpt2(), ETFConfig(basis=basis, storage=storage)).eval()
    unfuse_feed_forwards(model)
    keys = set(model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(mlps(loaded)) == 2 and set(loaded.state_dict()) == keys
    fuse_feed_forwards(model)  # the same computation on both sides (GPT-2's GELU runs as torch's kernel)
    inputs = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(inputs).logits, model(inputs).logits)


def test_vit_checkpoint_loads_into_the_fused_path(tmp_path: Path) -> None:
    model = patched("vit", "structured")
    inputs = model_inputs("vit")
    with torch.no_grad():
        expected = per_projection(model)(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert len(mlps(loaded)) == 2
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compile_fullgraph(name: str) -> None:
    """No graph break in the fused FFN, forward and backward (aot_eager traces the autograd function's
    backward too; inductor was checked by hand: same values to 3e-9)."""
    model = patched(name, "structured")
    mlp = mlps(model)[0]
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = mlp(x)
    expected.square().sum().backward()
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(grad, x.grad, atol=1e-6)


def test_training_after_inference_mode() -> None:
    """generate() (inference_mode, one-token steps) before training: the values the FFN caches on that first
    call are ordinary tensors, so the training step that follows runs and gives the gradients a model that
    never ran in inference mode gives."""
    inputs = model_inputs("gpt2")
    fresh = patched("gpt2", "structured")
    used = copy.deepcopy(fresh)
    with torch.inference_mode():
        used(**inputs)
        used(input_ids=inputs["input_ids"][:1, :1])
    for model in (fresh, used):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for (name, a), (_, b) in zip(fresh.named_parameters(), used.named_parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


@pytest.mark.slow
def test_compile_fullgraph_one_token_decoding() -> None:
    """A batch-1 decoding step (one row: the single-column transform, its matrices from `etf.memoised`,
    which computes them in the graph while compiling) compiles without a graph break and gives the eager
    values; eager calls before and after it use the cache."""
    model = patched("gpt2", "structured")
    mlp = mlps(model)[0]
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        expected = mlp(x)
        out = torch.compile(mlp, fullgraph=True, backend="aot_eager")(x)
        assert torch.allclose(out, expected, atol=1e-6) and torch.equal(mlp(x), expected)


def test_cached_orders_and_scales_go_with_the_model() -> None:
    """What the fused FFN caches per buffer (`etf.memoised`: composite hidden orders, scales, factor
    matrices, the one-row plan) is dropped with the model: no cached value holds its own key buffers (the hidden orders
    once held two, and every model's entries outlived it)."""
    import gc

    from etf_hf import etf

    gc.collect()
    before = set(etf._MEMO)
    model = patched("gpt2")
    inputs = model_inputs("gpt2")
    model(**inputs).logits.sum().backward()
    with torch.no_grad():
        model(**inputs)
        model(input_ids=inputs["input_ids"][:1, :1])  # one row: the row plan
    tags = {tag[0] for key in set(etf._MEMO) - before for tag in etf._MEMO[key]}
    assert tags == {"derived", "hidden orders", "row plan"}
    del model
    gc.collect()
    assert set(etf._MEMO) <= before


def test_kept_spec_follows_the_children_and_their_tensors() -> None:
    """The fused call's static spec is kept between calls (`_etf_fused_call`); whatever it describes
    changing makes it anew: the recompute flag, a projection replaced (by another basis's ETF layer, or by
    a dense layer: the per-projection path then), and the tensors are read afresh each call (a dtype
    change is computed in the new dtype, equal to the per-projection path)."""
    model = patched("gpt2")
    mlp = mlps(model)[0]
    x = torch.randn(2, 5, 32)
    spec = mlp._etf_fused_call()[1]
    assert spec.recompute and mlp._etf_fused_call()[1] is spec  # kept
    fuse_feed_forwards(model, recompute=False)
    assert mlp._etf_fused_call()[1].recompute is False
    other = patched("gpt2", basis="orthogonal")
    mlp.c_fc = mlps(other)[0].c_fc
    assert [frame[0] for frame in mlp._etf_fused_call()[1].frames] == ["dense", "structured"]
    reference = per_projection(model)
    with torch.no_grad():
        assert torch.allclose(mlp(x), reference.transformer.h[0].mlp(x), atol=1e-6)
    model.double()
    reference.double()
    with torch.no_grad():
        out = mlp(x.double())
        assert out.dtype == torch.float64
        assert torch.allclose(out, reference.transformer.h[0].mlp(x.double()), atol=1e-12)
    mlp.c_proj = nn.Linear(128, 32).double()
    assert mlp._etf_fused_call() is None and mlp.etf_fused_projections() is None
    with torch.no_grad():
        assert torch.equal(mlp(x.double()), mlp.c_proj(mlp.act(mlp.c_fc(x.double()))))


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("basis", ["structured", "orthogonal"])
def test_one_row_forward_is_the_fused_forward_of_that_row(name: str, basis: str, monkeypatch) -> None:
    """A single row without gradients (a batch-1 decoding step) takes `_row_forward` where every frame is
    structured, and gives bit for bit what `fused_forward` gives for that row (gated, biasless and GELU/SiLU
    MLPs among the builders); a dense frame keeps `fused_forward`. A batch never takes the row path."""
    model = patched(name, basis)
    taken = []
    row_forward = etf_hf.ffn._row_forward
    monkeypatch.setattr(etf_hf.ffn, "_row_forward", lambda *a: taken.append(1) or row_forward(*a))
    for mlp in mlps(model):
        layers, spec = mlp._etf_fused_call()
        operands = tuple(value for layer in layers for value in etf_hf.ffn._frame_values(layer))
        width = layers[0].in_features
        for shape in [(1, 1, width), (1, width), (3, width)]:
            x = torch.randn(*shape)
            taken.clear()
            with torch.no_grad():
                out = mlp(x)
                expected = etf_hf.ffn.fused_forward(x, spec, operands)[0]
            if mlp.etf_form.dropout is not None:
                expected = getattr(mlp, mlp.etf_form.dropout)(expected)
            assert torch.equal(out, expected), (name, shape)
            assert bool(taken) == (basis == "structured" and x.numel() == width), (name, shape)


def test_one_token_ffn_call_dispatches_few_compute_ops() -> None:
    """At batch 1 a decoding step's FFN cost is its op count (each op a few us of dispatch on a few KB of
    data). The fused GPT-2 FFN at one token, no grad: up frame: centring (sum, subtract), one gather and
    multiplication by the scales, the two-GEMM single-column transform (its output stays in Hadamard
    coordinates); its bias gathered into them and gain/bias; the activation; down frame: one gather (the
    composite order), the two GEMMs, one gather and multiplication by the scales, centring, gain/bias.
    17 compute ops, views aside (29 top-level ops with them; the first fused version took 40).
    The values are the batch path's row (test_single_column_sandwich_equals_the_dense_frame)."""
    from torch.profiler import profile

    mlp = mlps(patched("gpt2", "structured"))[0]
    x = torch.randn(1, 1, 32)
    views = {"aten::view", "aten::reshape", "aten::t", "aten::transpose", "aten::as_strided", "aten::dropout"}
    with torch.no_grad():
        mlp(x)  # the operators' derived tensors are computed once, on the first call
        with profile() as profiler:
            mlp(x)
    top = [event.name for event in profiler.events() if event.cpu_parent is None]
    compute = sorted(name for name in top if name not in views)
    assert compute == sorted(["aten::sum", "aten::sub", "aten::index_select", "aten::mul", "aten::mm", "aten::mm",
                              "aten::addcmul", "aten::gelu",
                              "aten::index_select", "aten::mm", "aten::mm", "aten::index_select", "aten::mul",
                              "aten::sum", "aten::sub", "aten::addcmul", "aten::index_select"]), top


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_no_grad_forward_skips_autograd_and_equals_the_training_forward(name: str, monkeypatch) -> None:
    """Inference (no_grad / inference_mode, e.g. generate()) runs the same forward without the autograd
    function: bit-identical outputs, and the function is not entered."""
    model = patched(name, "structured")
    inputs = model_inputs(name)
    expected = model(**inputs).logits.detach()
    monkeypatch.setattr(etf_hf.ffn._FusedFeedForward, "apply", staticmethod(lambda *a: pytest.fail("autograd")))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, expected)
