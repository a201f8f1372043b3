"""What each rank holds under FSDP (torch ``fully_shard``), counted from a model's shapes.

FSDP shards *parameters* (and with them gradients and optimizer state) over the ranks; it does not
shard *buffers*, which every rank keeps whole. A fixed ETF frame is a buffer (never a Parameter, see
`etf_hf.layers`), so a dense frame costs its full size on every rank however many ranks there are,
while the weight it replaces would have been split. The ``structured`` basis stores no frame, only a
seeded O(D) plan per layer, which makes it the basis to shard with.

`fsdp_rank_memory` counts the bytes from shapes alone, so it works on a model built on the meta device
(`meta_model`: a 7B config costs no memory to count); tests/test_fsdp.py checks it against the bytes
measured on each rank of a two-process ``fully_shard`` run.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

#: AdamW keeps two moments per trainable element, in the parameter's dtype, and a float32 step count per tensor.
ADAMW_STATES = 2
_STEP_BYTES = 4


def _is_etf_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "etf_hf"


def frame_buffers(model: nn.Module, named: bool = False) -> list:
    """The fixed-frame buffers of ``model``'s ETF modules (dense frames and structured plans); a fixed
    gain (``frame_norm`` stored as a buffer) is a scalar and not counted as frame.

    Any module class defined by etf_hf counts, so a module that fuses both projections of a block is
    covered too. With ``named``, (path, tensor) pairs.
    """
    found = []
    for path, module in model.named_modules():
        if not _is_etf_module(module):
            continue
        for name, tensor in module.named_buffers(recurse=False):
            if tensor is not None and name != "frame_norm":
                found.append((f"{path}.{name}" if path else name, tensor))
    return found if named else [tensor for _, tensor in found]


def buffer_bytes(tensors: Iterable) -> int:
    """Bytes of ``tensors`` (tensors or (name, tensor) pairs), each counted once."""
    seen, total = set(), 0
    for tensor in tensors:
        tensor = tensor[1] if isinstance(tensor, tuple) else tensor
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds. ``frames`` and ``other_buffers`` are replicated on every rank; the rest is
    that rank's shard (the largest one, rank 0's: FSDP pads every rank's shard to that size)."""

    parameters: int
    gradients: int
    optimizer: int
    frames: int
    other_buffers: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.frames + self.other_buffers

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _shard_bytes(parameter: torch.Tensor, world_size: int) -> int:
    """Bytes of rank 0's shard: ``fully_shard`` splits dim 0 in ``world_size`` chunks of ceil(rows / world_size)."""
    rows = parameter.shape[0]
    per_row = parameter[0].numel() if rows else 0
    return math.ceil(rows / world_size) * per_row * parameter.element_size()


def fsdp_rank_memory(model: nn.Module, world_size: int, optimizer_states: int = ADAMW_STATES) -> RankMemory:
    """The bytes per rank of ``model`` trained under ``fully_shard`` over ``world_size`` ranks, after a
    backward pass (gradients held) with an AdamW-like optimizer (``optimizer_states`` tensors per trainable
    element, in the parameter's dtype, plus a float32 step count per trainable tensor).

    Counted from shapes and dtypes, so ``model`` may live on the meta device (see `meta_model`). Not
    counted: activations, communication buffers, the transiently all-gathered full parameters of the
    block being computed, and mixed-precision copies.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be at least 1")
    if any(p.dim() == 0 for p in model.parameters()):
        raise ValueError("the model has 0-dim parameters, which fully_shard rejects")
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(_shard_bytes(p, world_size) for p in trainable)
    frames = buffer_bytes(frame_buffers(model))
    return RankMemory(
        parameters=sum(_shard_bytes(p, world_size) for p in model.parameters()),
        gradients=trainable_bytes,
        optimizer=optimizer_states * trainable_bytes + _STEP_BYTES * len(trainable),
        frames=frames,
        other_buffers=buffer_bytes(model.buffers()) - frames,
    )


def meta_model(config: PretrainedConfig, auto_class: type = AutoModelForCausalLM,
               dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """``auto_class.from_config(config)`` on the meta device: every shape and dtype, no memory, no init.

    Patch it with `etf_hf.patch` (frames on meta are shapes only) and count it with `fsdp_rank_memory`.
    The model gets a copy of ``config``: `etf_hf.patch` turns a model's config into an ETF config in place,
    which would otherwise change ``config`` for the next model built from it.
    """
    with torch.device("meta"):
        return auto_class.from_config(copy.deepcopy(config), dtype=dtype)
