"""The injector: replaces the projections a config selects (and the head) by ETF layers, and counts what it did.

Kept apart from `patch` (which also swaps classes and writes `config.etf`) because the ETF model
classes call it while being constructed from a checkpoint's config.
"""
from __future__ import annotations

from torch import nn

from .architectures import Slot, find_head, find_slots
from .config import ETFConfig
from .etf import slot_seed
from .ffn import fuse_feed_forwards
from .head import ETFClassifier
from .layers import ETFLinear


def etf_layers(model: nn.Module) -> list[tuple[str, ETFLinear]]:
    """(path, layer) for every ETF layer in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ETFLinear)]


def apply_etf_layers(model: nn.Module, config: ETFConfig) -> list[Slot]:
    """Replace the projections ``config`` selects by `ETFLinear`s, and with ``head=True`` the classifier by
    an `ETFClassifier` (basis ``head_basis``, default ``basis``); layers already fixed are kept.

    Every MLP whose projections are now all fixed computes through the fused FFN (`etf_hf.ffn`).
    Returns the slots, the head's last (role ``"head"``).
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
    if config.head:
        head = find_head(model)
        current = getattr(head.parent, head.attribute)
        if not isinstance(current, ETFLinear):
            setattr(head.parent, head.attribute, ETFClassifier.from_classifier(
                current, basis=config.head_basis or config.basis, seed=slot_seed(config.seed, head.seed_key),
                gain=config.gain, trainable_gain=config.trainable_gain))
        slots = [*slots, head]
    fuse_feed_forwards(model, config.recompute)
    store_frames(model, config.storage)
    return slots


def frame_is_stored(layer: ETFLinear) -> bool:
    """Whether checkpoints carry this layer's dense frame (else it is regenerated after loading).

    A ``structured`` layer has no dense frame, only a small seeded plan, which is always regenerated.
    """
    return "frame" in layer._buffers and "frame" not in layer._non_persistent_buffers_set


def store_frames(model: nn.Module, storage: str) -> None:
    """Make each dense frame buffer persistent (in state_dict and checkpoints) or not, per ``storage``.

    ``"dense"`` stores every dense frame; ``"compact"`` only those that cannot be regenerated
    (``nearest``). Structured layers have no dense frame: their small seeded plan is always regenerated.
    """
    for _, layer in etf_layers(model):
        if "frame" not in layer._buffers:
            continue
        if storage == "dense" or not layer.regenerable:
            layer._non_persistent_buffers_set.discard("frame")
        else:
            layer._non_persistent_buffers_set.add("frame")


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Trainable, total and ETF-fixed weight counts.

    ``total`` counts every weight the model computes with, frames included even though checkpoints may
    not store them (and structured layers never materialise them), so trainable/total compares directly
    with the unpatched model's 100 %.
    """
    parameters = list(model.parameters())
    layers = [layer for _, layer in etf_layers(model)]
    frames = sum(layer.in_features * layer.out_features for layer in layers)
    fixed_gains = sum(buffer.numel() for layer in layers for name, buffer in layer.named_buffers()
                      if name == "frame_norm")
    return {
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "total": sum(p.numel() for p in parameters) + frames + fixed_gains,
        "etf_fixed": frames,
    }
