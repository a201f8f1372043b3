"""`etf_hf.patch` refuses, before replacing anything, targets an ETF layer would silently take the place of:
a PEFT adapter on a projection to fix (real peft), and a gain the model's dtype cannot hold."""
from __future__ import annotations

import pytest
import torch

from etf_hf import ETFConfig, etf_layers, lock_blocks, patch
from tiny_models import tiny_bert, tiny_gpt2, token_batch

peft = pytest.importorskip("peft")


def _lora_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def _untouched(model: torch.nn.Module, class_name: str) -> bool:
    return not etf_layers(model) and type(model).__name__ == class_name and getattr(model.config, "etf", None) is None


def test_lora_on_a_projection_to_fix_is_refused_naming_adapter_module_and_way_out() -> None:
    model = tiny_gpt2()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_fc"], fan_in_fan_out=True))
    lora_before = _lora_weights(model)
    with pytest.raises(ValueError) as error:
        patch(model, ETFConfig())
    message = str(error.value)
    assert "transformer.h.0.mlp.c_fc" in message and "peft.tuners.lora" in message
    assert "Patch before adding adapters" in message and "target_modules" in message
    assert _untouched(model, "GPT2LMHeadModel")  # nothing half-patched
    assert lora_before > 0 and _lora_weights(model) == lora_before
    peft_model(token_batch())  # the adapter still computes


def test_an_ia3_adapter_on_a_projection_to_fix_is_refused_too() -> None:
    model = tiny_gpt2()
    peft.get_peft_model(model, peft.IA3Config(target_modules=["c_fc"], feedforward_modules=["c_fc"],
                                              fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.mlp\.c_fc is wrapped by an adapter \(peft\.tuners\.ia3"):
        patch(model, ETFConfig())
    assert _untouched(model, "GPT2LMHeadModel")


def test_lora_on_one_selected_block_refuses_the_whole_patch() -> None:
    model = tiny_gpt2()
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=r".*h\.1\.mlp\.c_proj", fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_proj is wrapped by an adapter"):
        patch(model, ETFConfig(layers="all"))
    assert _untouched(model, "GPT2LMHeadModel")


def test_lora_elsewhere_and_lora_after_patching_both_work() -> None:
    model = tiny_gpt2()
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    lora_before = _lora_weights(model)
    patch(model, ETFConfig())
    assert len(etf_layers(model)) == 4 and _lora_weights(model) == lora_before

    patched_first = patch(tiny_gpt2(), ETFConfig())  # the way out: patch, then add the adapter
    lora = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(patched_first, lora)
    assert len(etf_layers(patched_first)) == 4 and _lora_weights(patched_first) > 0
    assert torch.isfinite(peft_model(token_batch()).logits).all()


def test_a_peft_model_itself_is_refused_with_the_order_to_follow() -> None:
    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(TypeError, match="PeftModel.*patch the base model before get_peft_model"):
        patch(peft_model, ETFConfig())


def test_a_classifier_wrapped_by_modules_to_save_is_refused_with_head_true() -> None:
    model = tiny_bert(num_labels=3)
    peft.get_peft_model(model, peft.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query"]))
    with pytest.raises(ValueError, match=r"classifier is wrapped by an adapter \(peft\..*ModulesToSaveWrapper\)"):
        patch(model, ETFConfig(layers="all", head=True))
    assert _untouched(model, "BertForSequenceClassification")


def test_lock_blocks_refuses_a_block_with_an_adapter() -> None:
    model = patch(tiny_gpt2(), ETFConfig(layers=[0], basis="nearest"))
    peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=r".*h\.1\.mlp\.c_fc", fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc is wrapped by an adapter"):
        lock_blocks(model, [1])
    assert model.config.etf["layers"] == [0] and len(etf_layers(model)) == 2


def test_a_gain_the_model_dtype_cannot_hold_is_refused_before_patching() -> None:
    model = tiny_gpt2().half()
    with pytest.raises(ValueError, match=r"ETFConfig.gain=100000.0 does not fit in torch.float16.*use 'match'"):
        patch(model, ETFConfig(gain=1e5))
    assert _untouched(model, "GPT2LMHeadModel")
    patch(model, ETFConfig(gain=100.0))
    assert all(torch.isfinite(layer.frame_norm).all() for _, layer in etf_layers(model))
