"""Tiny models of every registered architecture, built from configs (no Hub access)."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification, ViTConfig,
                          ViTForImageClassification)


def tiny_gpt2(vocab_size: int = 96, layers: int = 2) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def tiny_bert(num_labels: int = 6, layers: int = 2) -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=120, max_position_embeddings=64,
                                                    num_labels=num_labels))


def tiny_roberta(num_labels: int = 2) -> RobertaForSequenceClassification:
    return RobertaForSequenceClassification(RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=120,
                                                          max_position_embeddings=70, num_labels=num_labels))


def tiny_vit(num_labels: int = 10, layers: int = 2) -> ViTForImageClassification:
    return ViTForImageClassification(ViTConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                               intermediate_size=64, image_size=28, patch_size=7, num_channels=1,
                                               num_labels=num_labels))


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=96,
                                        max_position_embeddings=64))


def token_batch(vocab_size: int = 96, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
