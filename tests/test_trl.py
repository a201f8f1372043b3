"""trl's `SFTTrainer` on a tiny ETF Llama: patch -> train -> save -> reload -> card, with the frames fixed.

trl is an optional dependency (the ``dev`` extra installs it); without it this file is skipped.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import etf_hf
from etf_hf import ETFConfig, etf_layers
from etf_hf.app.tasks import byte_level_tokenizer
from tiny_models import tiny_llama

trl = pytest.importorskip("trl")


def _tokenizer():
    """The offline byte-level tokenizer with an end-of-text token, which SFTTrainer pads and ends examples with."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|end|>", "pad_token": "<|end|>"})
    return tokenizer


@pytest.mark.slow
def test_sft_trainer_trains_saves_and_reloads_a_patched_llama(tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(tokenizer),
                                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    etf_hf.patch(model, ETFConfig(layers="all"))
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
