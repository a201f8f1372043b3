"""`patch`: turn a transformers model's FFN projections into fixed simplex-ETF layers, in one call."""
from __future__ import annotations

import dataclasses
import logging

from torch import nn
from transformers import PreTrainedModel

from .architectures import Slot, find_slots
from .config import ETFConfig
from .etf import slot_seed
from .layers import ETFLinear
from .modeling_etf import etf_config_class, etf_model_class

logger = logging.getLogger("etf_hf")


def etf_layers(model: nn.Module) -> list[tuple[str, ETFLinear]]:
    """(path, layer) for every ETF layer in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ETFLinear)]


def apply_etf_layers(model: nn.Module, config: ETFConfig) -> list[Slot]:
    """Replace the projections ``config`` selects by `ETFLinear`s; projections already ETF are kept.

    This is the structural half of `patch`, shared with the ETF model classes' constructor so that a
    checkpoint rebuilds exactly the layers that were patched.
    """
    slots = find_slots(model, config)
    for slot in slots:
        current = getattr(slot.parent, slot.attribute)
        if isinstance(current, ETFLinear):
            continue
        replacement = ETFLinear.from_layer(
            current, layout=slot.layout, basis=config.basis, seed=slot_seed(config.seed, slot.seed_key),
            gain=config.gain, trainable_gain=config.trainable_gain,
        )
        setattr(slot.parent, slot.attribute, replacement)
    return slots


def _resolved(config: ETFConfig, slots: list[Slot]) -> ETFConfig:
    """The config with ``layers`` spelled out, so the checkpoint does not depend on how it was chosen."""
    blocks = sorted({s.block for s in slots if s.block >= 0})
    if not blocks or len(blocks) != len({s.block for s in slots}):
        return config
    return dataclasses.replace(config, layers=blocks)


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
    model.config.__class__ = etf_config_class(type(model.config))
    model.__class__ = etf_model_class(type(model))
    model.config.etf = _resolved(config, slots).to_dict()
    summary = parameter_summary(model)
    logger.info("etf_hf: %d projections of %s are now fixed %s ETFs; %d of %d weights trainable (%.1f%%)",
                len(slots), type(model).__name__, config.basis, summary["trainable"], summary["total"],
                100 * summary["trainable"] / summary["total"])
    return model


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Trainable, total and ETF-fixed weight counts.

    ``total`` counts every weight the model computes with, frames included even though checkpoints may
    not store them, so trainable/total compares directly with the unpatched model's 100 %.
    """
    parameters = list(model.parameters())
    fixed = [buffer for _, layer in etf_layers(model) for buffer in layer.buffers()]
    etf_fixed = sum(layer.frame.numel() for _, layer in etf_layers(model))
    return {
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "total": sum(p.numel() for p in parameters) + sum(b.numel() for b in fixed),
        "etf_fixed": etf_fixed,
    }


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT-style one-liner: ``trainable params: ... || all params: ... || trainable%: ... || ETF-fixed: ...``."""
    s = parameter_summary(model)
    print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || "
          f"trainable%: {100 * s['trainable'] / s['total']:.4f} || ETF-fixed: {s['etf_fixed']:,}")
