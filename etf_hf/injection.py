"""The injector: which modules a config selects (the record `patch` writes), replacing them by ETF layers,
and counting what it did.

Kept apart from `patch` (which also swaps classes and writes `config.etf`) because the ETF model
classes call `apply_etf_layers` while being constructed from a checkpoint's config.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .architectures import find_head, find_slots
from .config import ETFConfig
from .etf import slot_seed
from .ffn import fuse_feed_forwards
from .head import ETFClassifier
from .layers import ETFLinear


def etf_layers(model: nn.Module) -> list[tuple[str, ETFLinear]]:
    """(path, layer) for every ETF layer in ``model``."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ETFLinear)]


def recorded_modules(model: nn.Module, config: ETFConfig) -> list[dict[str, str]]:
    """What ``config`` replaces in ``model``, as `ETFConfig.modules` records it: the FFN projections of its
    blocks (`find_slots`), then with ``head=True`` the classifier (`find_head`)."""
    slots = [*find_slots(model, config), *([find_head(model)] if config.head else [])]
    base = getattr(model, "base_model", model)
    prefix = f"{model.base_model_prefix}." if base is not model else ""
    modules = []
    for slot in slots:
        inside = slot.role != "head" and slot.name.startswith(prefix)
        modules.append({"path": slot.name[len(prefix):] if inside else slot.name,
                        "root": "base_model" if inside else "model",
                        "role": slot.role, "layout": slot.layout, "seed_key": slot.seed_key})
    return modules


def recorded_parent(model: nn.Module, entry: Mapping[str, str]) -> tuple[nn.Module, str]:
    """(parent module, attribute) of one `ETFConfig.modules` entry in ``model``."""
    root = getattr(model, "base_model", model) if entry["root"] == "base_model" else model
    parent_path, _, attribute = entry["path"].rpartition(".")
    try:
        parent = root.get_submodule(parent_path)
        getattr(parent, attribute)
    except AttributeError:
        raise ValueError(
            f"config.etf records the module {entry['path']!r} (in the {entry['root'].replace('_', ' ')}), which "
            f"{type(model).__name__} does not have: the checkpoint was saved from a model of another structure "
            f"(another head class or transformers release)") from None
    return parent, attribute


def apply_etf_layers(model: nn.Module, etf: Mapping[str, Any]) -> None:
    """Replace the modules ``etf["modules"]`` records (a resolved `ETFConfig` as a dict, ``config.etf``) by
    `ETFLinear`s, and a ``head`` entry by an `ETFClassifier` (basis ``head_basis``); layers already fixed
    are kept. Every MLP whose projections are now all fixed computes through the fused FFN (`etf_hf.ffn`).

    This is all that loading does, which is why it reads the record and nothing else: no architecture
    lookup and no validation (`ETFConfig` validated the record when `patch` wrote it), so a checkpoint's
    remote code carries neither.
    """
    for entry in etf["modules"]:
        parent, attribute = recorded_parent(model, entry)
        current = getattr(parent, attribute)
        if isinstance(current, ETFLinear):
            continue
        options = {"seed": slot_seed(etf["seed"], entry["seed_key"]), "gain": etf["gain"],
                   "trainable_gain": etf["trainable_gain"]}
        if entry["role"] == "head":
            replacement = ETFClassifier.from_classifier(current, basis=etf["head_basis"] or etf["basis"], **options)
        else:
            replacement = ETFLinear.from_layer(current, layout=entry["layout"], basis=etf["basis"], **options)
        setattr(parent, attribute, replacement)
    fuse_feed_forwards(model, etf["recompute"])
    store_frames(model, etf["storage"])


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
