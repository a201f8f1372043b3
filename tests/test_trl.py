"""trl's `SFTTrainer` on a tiny ETF Llama: patch -> train -> save -> reload -> card, with the frames fixed.

trl is an optional dependency (the ``dev`` extra installs it); without it this file is skipped.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import etf_hf
from etf_hf import ETFConfig, etf_layers
from etf_hf.app.tasks import byte_level_tokenizer

trl = pytest.importorskip("trl")


def _tokenizer():
    """The offline byte-level tokenizer with an end-of-text token, which SFTTrainer pads and ends examples with."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|end|>", "pad_token": "<|end|>"})
    return tokenizer


def _patched_llama(tokenizer):
    """A tiny Llama for ``tokenizer``'s vocabulary, every FFN fixed to an ETF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(tokenizer),
                                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    return etf_hf.patch(model, ETFConfig(layers="all"))


@pytest.mark.slow
def test_sft_trainer_trains_saves_and_reloads_a_patched_llama(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer()
    model = _patched_llama(tokenizer)
    frames = {name: layer.weight.detach().clone() / layer.frame_norm.detach() for name, layer in etf_layers(model)}
    gains = {name: layer.frame_norm.detach().clone() for name, layer in etf_layers(model)}
    texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof"] * 4
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                         save_strategy="steps", save_steps=2,  # trl writes its own README.md card at each checkpoint
                         max_length=32, disable_tqdm=True,
                         bf16=False)  # SFTConfig defaults to bf16 autocast, which stays on the trained model's forward
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer)
    trainer.train()

    assert trainer.state.global_step == 4
    for name, layer in etf_layers(model):
        assert not layer.frame.requires_grad
        torch.testing.assert_close(layer.weight.detach() / layer.frame_norm.detach(), frames[name])  # frame fixed
    assert any(not torch.equal(layer.frame_norm, gains[name]) for name, layer in etf_layers(model))  # gain trained

    trainer.save_model()
    saved = Path(args.output_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert type(reloaded).__name__ == "ETFLlamaForCausalLM" and reloaded.config.etf == model.config.etf
    state = reloaded.state_dict()
    for key, value in model.state_dict().items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)
    assert (saved / "checkpoint-2").is_dir()  # trl's card was written into output_dir before the final save
    card = (saved / "README.md").read_text()
    assert "- etf_hf" in card and '"basis": "orthogonal"' in card  # ... and the final save added the ETF section


@pytest.mark.slow
def test_sft_trainer_push_to_hub_with_keep_etf_card_uploads_trls_card_with_the_etf_section(
        monkeypatch, tmp_path: Path) -> None:
    """The real `SFTTrainer.push_to_hub` (trl's own `create_model_card`), the Hub intercepted: trl's card (its
    quick start, tags) with the ETF section, tags and base_model, in the checkpoint push and the final one."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from intercepted_hub import intercept_hub

    uploads = intercept_hub(monkeypatch, tmp_path / "hub")
    tokenizer = _tokenizer()
    model = _patched_llama(tokenizer)
    model.config._name_or_path = "someone/tiny-llama"  # as if loaded from the Hub
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, save_strategy="steps", save_steps=2, max_length=32, disable_tqdm=True,
                         bf16=False, push_to_hub=True, hub_model_id="someone/etf-llama")
    texts = ["the cat sat on the mat", "a dog ran in the park"] * 4
    trainer = etf_hf.keep_etf_card(trl.SFTTrainer(model=model, args=args, processing_class=tokenizer,
                                                  train_dataset=Dataset.from_dict({"text": texts})))
    trainer.train()
    trainer.push_to_hub()
    checkpoint_push, final_push = uploads
    assert {"modeling_etf_hf.py", "README.md"} <= {p.name for p in checkpoint_push.iterdir()}
    for folder in (checkpoint_push, final_push):
        card = (folder / "README.md").read_text()
        metadata = yaml.safe_load(card.split("---")[1])
        assert {"etf", "neural-collapse", "etf_hf", "sft", "trl"} <= set(metadata["tags"])
        assert metadata["base_model"] == "someone/tiny-llama" and "Base model: `someone/tiny-llama`." in card
        assert "This model was trained with SFT" in card  # trl's text ...
        assert card.count("Fixed simplex-ETF") == 1 and '"basis": "orthogonal"' in card  # ... and the ETF section
        # trl's quick start loads the repo: without etf_hf installed that needs the remote code
        assert 'pipeline("text-generation", model="someone/etf-llama", trust_remote_code=True' in card
    assert AutoModelForCausalLM.from_pretrained(final_push).config.etf == model.config.etf
