"""The patcher: the registry finds exactly the FFN projections, selection works, bad input is refused."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertModel, DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM,
                          T5Config, T5Model, ViTConfig, ViTForImageClassification)

import etf_hf
from etf_hf import ETFConfig, ETFLinear, etf_layers, lock_blocks, parameter_summary, patch
from etf_hf.architectures import find_slots
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta, tiny_t5, tiny_vit, token_batch

FFN_PATHS = {
    "gpt2": {"transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_proj"},
    "bert": {"bert.encoder.layer.{i}.intermediate.dense", "bert.encoder.layer.{i}.output.dense"},
    "roberta": {"roberta.encoder.layer.{i}.intermediate.dense", "roberta.encoder.layer.{i}.output.dense"},
    "llama": {"model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"},
}
BUILDERS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama, "vit": tiny_vit}


@pytest.mark.parametrize("model_type", sorted(FFN_PATHS))
def test_registry_patches_exactly_the_ffn_projections(model_type: str) -> None:
    model = BUILDERS[model_type]()
    patch(model)
    expected = {p.format(i=i) for p in FFN_PATHS[model_type] for i in range(2)}
    assert {name for name, _ in etf_layers(model)} == expected
    assert model.config.model_type == f"etf_{model_type}"
    assert type(model).__name__ == "ETF" + model.etf_vanilla_class.__name__
    assert model.etf_vanilla_class in type(model).__mro__


def test_attention_projections_sharing_ffn_names_are_untouched() -> None:
    """GPT-2's attention also has `c_proj`, BERT's attention also has `output.dense`: matching on the
    parent module's class, not the name, must leave them alone."""
    gpt2, bert = patch(tiny_gpt2()), patch(tiny_bert())
    assert type(gpt2.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    assert isinstance(bert.bert.encoder.layer[0].attention.output.dense, nn.Linear)


def test_vit_ffn_of_the_installed_transformers_release() -> None:
    model = patch(tiny_vit())
    names = {name for name, _ in etf_layers(model)}
    assert len(names) == 4
    assert all(name.endswith((".mlp.fc1", ".mlp.fc2", ".intermediate.dense", ".output.dense")) for name in names)
    assert not any(".attention." in name for name in names)


def test_patched_model_computes_with_the_frames() -> None:
    model = tiny_gpt2().eval()
    x = token_batch()
    before = model(x).logits
    patch(model, ETFConfig(basis="orthogonal"))
    after = model(x).logits
    assert not torch.allclose(before, after)
    for _, layer in etf_layers(model):
        layer.frame_norm.data.zero_()
        layer.bias.data.zero_()
    # With every FFN projection's gain and bias at zero the MLPs output exactly zero.
    mlp_out = model.transformer.h[0].mlp(torch.randn(1, 3, 32))
    assert torch.equal(mlp_out, torch.zeros_like(mlp_out))


@pytest.mark.parametrize("projections,roles", [("up", {"c_fc"}), ("down", {"c_proj"}), ("both", {"c_fc", "c_proj"})])
def test_projection_selection(projections: str, roles: set[str]) -> None:
    model = patch(tiny_gpt2(), ETFConfig(projections=projections))
    assert {name.rsplit(".", 1)[1] for name, _ in etf_layers(model)} == roles


@pytest.mark.parametrize("layers,blocks", [("all", {0, 1, 2, 3}), ("last:2", {2, 3}), ([0, 2], {0, 2})])
def test_layer_selection_and_recorded_config(layers, blocks: set[int]) -> None:
    model = patch(tiny_gpt2(layers=4), ETFConfig(layers=layers))
    assert {int(name.split(".")[2]) for name, _ in etf_layers(model)} == blocks
    assert model.config.etf["layers"] == sorted(blocks)


@pytest.mark.parametrize("layers,message", [
    ([4], r"block index \[4\] out of range for a model with 4 blocks \(valid: 0..3"),
    ("last:5", "has only 4 blocks"),
])
def test_out_of_range_layers_are_refused(layers, message: str) -> None:
    model = tiny_gpt2(layers=4)
    with pytest.raises(ValueError, match=message):
        patch(model, ETFConfig(layers=layers))
    assert not etf_layers(model) and model.config.model_type == "gpt2"


def test_unsupported_architecture_says_what_was_looked_for() -> None:
    distilbert = DistilBertModel(DistilBertConfig(n_layers=1, dim=16, hidden_dim=32, n_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="no feed-forward projections found in DistilBertModel.*target_modules"):
        patch(distilbert)
    assert not etf_layers(distilbert)


def test_target_modules_override_patches_an_unknown_architecture() -> None:
    def build() -> T5Model:
        return T5Model(T5Config(num_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8, vocab_size=50))

    t5 = patch(build(), ETFConfig(target_modules=[r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.w[io]"]))
    assert len(etf_layers(t5)) == 4
    with pytest.raises(ValueError, match="matched no module"):
        patch(build(), ETFConfig(target_modules=["nothing"]))


def test_generic_fallback_and_registration_of_its_type(tmp_path) -> None:
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                   vocab_size=50, max_position_embeddings=32, word_embed_proj_dim=16)).eval()
    patch(opt)
    assert {name.rsplit(".", 1)[1] for name, _ in etf_layers(opt)} == {"fc1", "fc2"}
    etf_hf.register_model_type("opt")
    opt.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(0, 50, (1, 6))
    assert torch.equal(loaded(x).logits, opt(x).logits)


def test_patching_twice_is_idempotent_or_refused() -> None:
    model = patch(tiny_gpt2(), ETFConfig(seed=1))
    frames = [layer.frame.clone() for _, layer in etf_layers(model)]
    assert patch(model, ETFConfig(seed=1)) is model
    assert all(torch.equal(a, layer.frame) for a, (_, layer) in zip(frames, etf_layers(model)))
    with pytest.raises(ValueError, match="already patched"):
        patch(model, ETFConfig(seed=2))


def test_non_transformers_model_is_refused() -> None:
    with pytest.raises(TypeError, match="PreTrainedModel"):
        patch(nn.Sequential(nn.Linear(2, 2)))


def _ffn_weight_count(hidden: int, inner: int, layers: int) -> int:
    return layers * 2 * hidden * inner


@pytest.mark.parametrize("build,hidden_inner_layers,percent", [
    (lambda: GPT2LMHeadModel(GPT2Config()), (768, 3072, 12), 54.5),
    (lambda: BertModel(BertConfig()), (768, 3072, 12), 48.3),
    (lambda: ViTForImageClassification(ViTConfig()), (768, 3072, 12), 34.0),
])
def test_trainable_share_of_full_size_models(build, hidden_inner_layers, percent: float) -> None:
    """Counts derived from the shapes: every FFN weight becomes ETF-fixed, everything else stays."""
    with torch.device("meta"):
        model = build()
        before = sum(p.numel() for p in model.parameters())
        patch(model)
    summary = parameter_summary(model)
    ffn = _ffn_weight_count(*hidden_inner_layers)
    gains = 2 * hidden_inner_layers[2]
    assert summary["etf_fixed"] == ffn
    assert summary["trainable"] == before - ffn + gains
    assert summary["total"] == before + gains
    assert round(100 * summary["trainable"] / summary["total"], 1) == percent


def test_print_trainable_parameters(capsys) -> None:
    model = patch(tiny_gpt2())
    etf_hf.print_trainable_parameters(model)
    summary = parameter_summary(model)
    line = capsys.readouterr().out
    assert f"trainable params: {summary['trainable']:,}" in line and f"ETF-fixed: {summary['etf_fixed']:,}" in line
    assert summary["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(not isinstance(m, ETFLinear) or not m.frame.requires_grad for m in model.modules())


def test_lock_blocks_patches_then_extends_keeping_earlier_frames() -> None:
    """Adaptive-ETF's lock: the first call patches (nearest frames by default), later calls add blocks
    without touching frames already fixed, and config.etf always lists every locked block."""
    model = tiny_gpt2(layers=4)
    assert lock_blocks(model, [3]) == [3]
    assert model.config.etf["basis"] == "nearest"
    first = model.transformer.h[3].mlp.c_fc.frame.clone()
    assert lock_blocks(model, [1, 3]) == [1, 3]
    assert model.config.etf["layers"] == [1, 3]
    assert {int(name.split(".")[2]) for name, _ in etf_layers(model)} == {1, 3}
    assert torch.equal(model.transformer.h[3].mlp.c_fc.frame, first)


def test_lock_blocks_refuses_a_different_config_or_a_bad_index() -> None:
    model = tiny_gpt2(layers=4)
    lock_blocks(model, [2], ETFConfig(basis="orthogonal"))
    with pytest.raises(ValueError, match="differs from the model's config.etf"):
        lock_blocks(model, [3], ETFConfig(basis="canonical"))
    with pytest.raises(ValueError, match=r"block index \[7\] out of range"):
        lock_blocks(model, [7])
    assert model.config.etf["layers"] == [2]


def test_etf_hf_patch_stays_the_function_when_the_submodule_is_bound() -> None:
    """The package loads its names lazily; importing the ``etf_hf.patch`` submodule makes Python bind it as an
    attribute of the package, which must not replace the function ``etf_hf.patch``."""
    import importlib

    module = importlib.import_module("etf_hf.patch")
    setattr(etf_hf, "patch", module)  # what the import system does on a first import of the submodule
    assert etf_hf.patch is module.patch and callable(etf_hf.patch)
    assert set(etf_hf.__all__) <= set(dir(etf_hf))
    assert all(getattr(etf_hf, name) is not None for name in etf_hf.__all__)


def test_layers_none_means_let_resolve_choose_and_nothing_else() -> None:
    """None (the default) is decided by etf_hf.resolve for the model at hand; the block selectors refuse it
    instead of reading it as "all", and every resolved config (config.etf) holds explicit blocks."""
    from_config = tiny_gpt2(layers=4)
    for request in (ETFConfig(), ETFConfig(layers="auto")):
        with pytest.raises(ValueError, match=r"etf_hf\.resolve|etf_hf\.patch\(model, config, data="):
            find_slots(from_config, request)
    assert etf_hf.resolve(from_config, ETFConfig()).layers == [0, 1, 2, 3]  # built from a config: every block
    pretrained = tiny_gpt2(layers=4)
    pretrained.config._name_or_path = "some/checkpoint"  # what from_pretrained records
    assert etf_hf.resolve(pretrained, ETFConfig()).layers == [2, 3]  # pretrained, no data: the second half
    assert patch(pretrained).config.etf["layers"] == [2, 3]
    outside_blocks = etf_hf.resolve(tiny_gpt2(), ETFConfig(target_modules=["lm_head"]))
    assert outside_blocks.layers == "all" and [m["path"] for m in outside_blocks.modules] == ["lm_head"]
    assert etf_hf.resolve(tiny_t5(), ETFConfig()).layers == {"encoder": [0, 1], "decoder": [0, 1, 2]}


def test_locks_of_a_fallback_architecture_keep_the_blocks_locked_before(tmp_path) -> None:
    """OPT has no record: its MLPs are found by their fc1/fc2 children, which a first lock has made ETF layers.
    A second lock must still see them, so config.etf keeps every locked block and the model reloads as it is."""
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=3, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                     vocab_size=64, word_embed_proj_dim=32))
    assert lock_blocks(model, [2]) == [2]
    assert lock_blocks(model, [1]) == [1, 2]
    assert [entry["path"] for entry in model.config.etf["modules"]] == [
        f"decoder.layers.{block}.{name}" for block in (1, 2) for name in ("fc1", "fc2")]
    model.save_pretrained(tmp_path)
    etf_hf.register_model_type("opt")
    reloaded = etf_hf.modeling_etf.etf_model_class(OPTForCausalLM).from_pretrained(tmp_path).eval()
    ids = token_batch(vocab_size=64)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)
