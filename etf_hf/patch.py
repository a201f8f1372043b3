"""`patch`: turn a transformers model's FFN projections into fixed simplex-ETF layers, in one call."""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .architectures import Slot, find_slots
from .config import ETFConfig
from .controls import CONTROL_BASES
from .injection import apply_etf_layers, parameter_summary
from .layers import ETFLinear
from .modeling_etf import etf_config_class, etf_model_class

logger = logging.getLogger("etf_hf")


def _set_config_class(config, config_class: type) -> None:
    """Swap a config's class, and with it its ``model_type``.

    A config read from config.json also holds ``model_type`` as an instance attribute, which would hide
    the new class's value in memory (the saved file uses the class's).
    """
    config.__class__ = config_class
    vars(config).pop("model_type", None)


def _resolved(config: ETFConfig, slots: list[Slot]) -> ETFConfig:
    """The config with ``layers`` spelled out, so the checkpoint does not depend on how it was chosen.

    Left as given when target_modules matched modules outside numbered blocks (block -1).
    """
    if any(s.block < 0 for s in slots):
        return config
    return dataclasses.replace(config, layers=sorted({s.block for s in slots}))


def patch(model: PreTrainedModel, config: ETFConfig | None = None) -> PreTrainedModel:
    """Fix the selected FFN projections of ``model`` to simplex ETFs, in place; returns the model.

    The model's class becomes its registered ETF variant (``GPT2LMHeadModel`` -> ``ETFGPT2LMHeadModel``,
    ``model_type`` ``etf_gpt2``) and ``config.etf`` records the patch, so ``save_pretrained`` and
    ``AutoModel*.from_pretrained`` rebuild exactly this model. Patching again with the same config is a
    no-op; with a different one it raises (a frame is never silently replaced).
    """
    config = config or ETFConfig()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"etf_hf.patch expects a transformers PreTrainedModel, got {type(model).__name__}")
    existing = getattr(model.config, "etf", None)
    if existing is not None:
        previous = ETFConfig.from_dict(existing)
        if _resolved(config, find_slots(model, config)) == previous:
            return model
        raise ValueError(
            f"this model is already patched with {previous}; patching it again with {config} would "
            f"replace fixed frames. Start from the unpatched model to use a different ETF config."
        )
    slots = apply_etf_layers(model, config)
    if not slots:
        raise ValueError(f"ETFConfig {config} selects no projection of {type(model).__name__}")
    _set_config_class(model.config, etf_config_class(type(model.config)))
    model.__class__ = etf_model_class(type(model))
    model.config.etf = _resolved(config, slots).to_dict()
    summary = parameter_summary(model)
    kind = f"{config.basis!r} control weights (not ETFs)" if config.basis in CONTROL_BASES else f"{config.basis} ETFs"
    logger.info("etf_hf: %d projections of %s are now fixed %s; %d of %d weights trainable (%.1f%%)",
                len(slots), type(model).__name__, kind, summary["trainable"], summary["total"],
                100 * summary["trainable"] / summary["total"])
    return model


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT-style one-liner: ``trainable params: ... || all params: ... || trainable%: ... || ETF-fixed: ...``."""
    s = parameter_summary(model)
    print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || "
          f"trainable%: {100 * s['trainable'] / s['total']:.4f} || ETF-fixed: {s['etf_fixed']:,}")


def _dense_layer(layer: ETFLinear, layout: str) -> nn.Module:
    """An ordinary Linear/Conv1D computing exactly what ``layer`` computes (frame times gain, bias)."""
    weight = layer.weight.detach().clone()
    has_bias = layer.bias is not None
    if layout == "conv1d":
        dense = Conv1D(layer.out_features, layer.in_features)
        dense.to(device=weight.device, dtype=weight.dtype)
        dense.weight = nn.Parameter(weight.t().contiguous())
        dense.bias = nn.Parameter(layer.bias.detach().clone() if has_bias else torch.zeros_like(weight[:, 0]))
        return dense
    dense = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)
    dense.weight = nn.Parameter(weight)
    if has_bias:
        dense.bias = nn.Parameter(layer.bias.detach().clone())
    return dense


def materialize(model: PreTrainedModel) -> PreTrainedModel:
    """Turn a patched model back into its vanilla transformers class, in place; returns it.

    Each ETF layer becomes an ordinary dense layer holding the weight the ETF layer computes with
    (frame times gain) and its bias, so outputs are unchanged and plain transformers saves, loads,
    serves and exports it. This is not an "unpatch": the weights the model had before `patch` are not
    restored (an ETF patch keeps only the frame), and every weight is trainable again.
    """
    if getattr(model.config, "etf", None) is None:
        raise ValueError(f"{type(model).__name__} is not patched by etf_hf (no config.etf): nothing to materialize")
    for slot in find_slots(model, ETFConfig.from_dict(model.config.etf)):
        layer = getattr(slot.parent, slot.attribute)
        if isinstance(layer, ETFLinear):
            setattr(slot.parent, slot.attribute, _dense_layer(layer, slot.layout))
    del model.config.etf
    _set_config_class(model.config, type(model.config).etf_vanilla_class)
    model.__class__ = model.etf_vanilla_class
    return model


def lock_blocks(model: PreTrainedModel, blocks: list[int], config: ETFConfig | None = None) -> list[int]:
    """Fix the FFN projections of more blocks, keeping those already fixed: Adaptive-ETF's lock.

    An unpatched model is patched with ``config`` (default: the frame nearest to the current weights)
    restricted to ``blocks``; a patched one extends its ``config.etf`` so save and load keep every lock.
    Returns the blocks that are now fixed.
    """
    existing = getattr(model.config, "etf", None)
    if existing is None:
        base = config or ETFConfig(basis="nearest")
        patch(model, dataclasses.replace(base, layers=sorted(set(blocks))))
        return list(model.config.etf["layers"])
    current = ETFConfig.from_dict(existing)
    if not isinstance(current.layers, list):
        raise ValueError("this model's ETF layers were chosen by target_modules outside numbered blocks; "
                         "blocks cannot be added to it")
    if config is not None and dataclasses.replace(config, layers=current.layers) != current:
        raise ValueError(f"lock_blocks: {config} differs from the model's config.etf {current} in more than layers")
    merged = dataclasses.replace(current, layers=sorted(set(current.layers) | set(blocks)))
    model.config.etf = _resolved(merged, apply_etf_layers(model, merged)).to_dict()
    return list(model.config.etf["layers"])
