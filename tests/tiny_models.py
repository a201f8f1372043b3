"""Tiny models of every registered architecture, built from configs (no Hub access)."""
from __future__ import annotations

import torch
from transformers import (BartConfig, BartForSequenceClassification, BertConfig, BertForSequenceClassification,
                          CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaForSequenceClassification, T5Config,
                          T5ForConditionalGeneration, ViTConfig, ViTForImageClassification, WhisperConfig,
                          WhisperForConditionalGeneration)


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


def tiny_qwen2() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=96,
                                        max_position_embeddings=64))


# Encoder-decoder and dual-tower models: stacks of different depths, so a block index that is valid in one
# stack and not in the other shows which stack a layer selection addressed.
def tiny_t5() -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=3, d_model=32, d_ff=64, num_heads=2,
                                               d_kv=16, vocab_size=96, decoder_start_token_id=0))


def tiny_bart(num_labels: int = 3) -> BartForSequenceClassification:
    return BartForSequenceClassification(BartConfig(
        encoder_layers=2, decoder_layers=3, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=96, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, num_labels=num_labels))


def tiny_whisper() -> WhisperForConditionalGeneration:
    return WhisperForConditionalGeneration(WhisperConfig(
        encoder_layers=2, decoder_layers=3, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=96, num_mel_bins=8,
        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))


def tiny_clip() -> CLIPModel:
    return CLIPModel(CLIPConfig(
        text_config={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                     "vocab_size": 96, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 2},
        vision_config={"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8}, projection_dim=16))


def token_batch(vocab_size: int = 96, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
