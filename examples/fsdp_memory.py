"""Per-rank memory of a model under FSDP, by counting: full training, frozen FFNs, and ETF bases.

    python examples/fsdp_memory.py                              # Llama-7B shapes, bf16, 8 ranks
    python examples/fsdp_memory.py --world-size 64
    python examples/fsdp_memory.py --config path/to/config.json --world-size 16

The model is built on the meta device (shapes only, no memory, a fraction of a second for 7B) and counted
with `etf_hf.memory.fsdp_rank_memory`: each rank's shard of parameters, gradients and AdamW state, plus
the buffers it keeps whole. tests/test_fsdp.py checks the count against the bytes measured on each rank
of a two-process ``fully_shard`` run. Everything is counted in the model's dtype (no float32 master copy,
no activations): the differences between rows are what matters.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig

import etf_hf
from etf_hf.architectures import find_slots
from etf_hf.memory import RankMemory, fsdp_rank_memory, meta_model

LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
ROWS = ("full", "frozen FFN (requires_grad=False)", "etf orthogonal", "etf nearest", "etf structured")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def count(config, row: str, world_size: int, dtype: torch.dtype) -> RankMemory:
    """One row: every FFN projection of every block fixed (ETF), frozen, or nothing (full)."""
    model = meta_model(config, dtype=dtype)
    basis = row.split()[-1] if row.startswith("etf") else "orthogonal"  # frozen and full only select with it
    selection = etf_hf.ETFConfig(layers="all", projections="both", basis=basis)
    if row.startswith("frozen"):
        for slot in find_slots(model, selection):
            getattr(slot.parent, slot.attribute).weight.requires_grad_(False)
    elif row.startswith("etf"):
        etf_hf.patch(model, selection)
    return fsdp_rank_memory(model, world_size=world_size)


def memory_table(config, world_size: int, dtype: torch.dtype = torch.bfloat16) -> str:
    """A Markdown table of GB per rank (1 GB = 1e9 bytes), one row per `ROWS` entry."""
    lines = [f"| per rank, {world_size} ranks, {str(dtype).removeprefix('torch.')} | parameters | gradients | "
             f"AdamW state | frame buffers | total |", "|---|---:|---:|---:|---:|---:|"]
    for row in ROWS:
        memory = count(config, row, world_size, dtype)
        cells = [memory.parameters, memory.gradients, memory.optimizer, memory.frames, memory.total]
        lines.append(f"| {row} | " + " | ".join(f"{value / 1e9:.3f}" for value in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="a transformers config.json (default: Llama-7B shapes)")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(args.config) if args.config else LLAMA_7B
    print(memory_table(config, args.world_size, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
