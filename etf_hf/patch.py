"""`patch`: turn a transformers model's FFN projections (and optionally its classifier) into fixed
simplex-ETF layers, in one call; `materialize` and `lock_blocks`."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .architectures import find_slots, head_names, model_stacks
from .config import LAYER_CHOICES, ETFConfig
from .controls import CONTROL_BASES
from .ffn import unfuse_feed_forwards
from .injection import apply_etf_layers, parameter_summary, recorded_modules, recorded_parent
from .layers import ETFLinear
from .hub import MODEL_TAGS
from .modeling_etf import etf_config_class, etf_model_class
from .placement import choose_placement

logger = logging.getLogger("etf_hf")


def _set_config_class(config, config_class: type) -> None:
    """Swap a config's class, and with it its ``model_type``.

    A config read from config.json also holds ``model_type`` as an instance attribute, which would hide
    the new class's value in memory (the saved file uses the class's).
    """
    config.__class__ = config_class
    vars(config).pop("model_type", None)


def _with_head_basis(config: ETFConfig) -> ETFConfig:
    """``head_basis`` spelled out: the FFN basis at patch time, so a later FFN lock with another basis
    leaves the head's recipe intact."""
    if config.head and config.head_basis is None:
        return dataclasses.replace(config, head_basis=config.basis)
    return config


def _recorded_layers(model: PreTrainedModel, config: ETFConfig) -> ETFConfig:
    """``config`` with ``layers`` spelled out as the blocks whose projections it selects: a list, or on a
    model of several stacks one list per stack (every stack named, ``[]`` where none is fixed), so the
    checkpoint records exactly what was patched, whatever the request looked like.

    ``layers`` is left as given when target_modules matched modules outside numbered blocks (block -1).
    """
    slots = find_slots(model, config)
    if any(s.block < 0 for s in slots):
        return config
    stacks = model_stacks(model, config)
    if not stacks.named:
        return dataclasses.replace(config, layers=sorted({s.block for s in slots}))
    return dataclasses.replace(config, layers={stack: sorted({s.block for s in slots if s.stack == stack})
                                               for stack in stacks.containers})


def _recorded(model: PreTrainedModel, config: ETFConfig) -> ETFConfig:
    """`_recorded_layers`, and the modules they select recorded in ``modules`` (what loading rebuilds), once
    `_check_targets` has found nothing in them that an ETF layer cannot replace."""
    config = _recorded_layers(model, config)
    _check_targets(model, config, head=config.head)
    return dataclasses.replace(config, modules=recorded_modules(model, config))


def _placed(model: PreTrainedModel, config: ETFConfig, data: Any, probe_options: dict[str, Any]) -> ETFConfig:
    """``config`` with ``layers`` None (the default) or ``"auto"`` resolved to block indices, the decision
    recorded in ``placement`` (see `etf_hf.placement`). Explicit module paths are an explicit choice:
    with ``target_modules`` the default is ``"all"`` of them, and ``"auto"`` is refused."""
    if config.layers not in LAYER_CHOICES:
        if data is not None or probe_options:
            raise ValueError(f"data= (and its options {sorted(probe_options)}) only choose layers, but "
                             f"ETFConfig.layers={config.layers!r} is given: drop data=, or use layers='auto'")
        return config
    if data is None and probe_options:
        raise ValueError(f"{sorted(probe_options)} are options of the NCC measurement on data=; pass data= too")
    if config.target_modules:
        if config.layers == "auto":
            raise ValueError("ETFConfig(layers='auto') chooses registry FFN blocks; target_modules names the modules "
                             "itself: drop one of them")
        return dataclasses.replace(config, layers="all")
    placement = choose_placement(model, config.layers, data, probe_options)
    return dataclasses.replace(config, layers=placement.layers, placement=placement.record())


def _adapter(module: nn.Module) -> str | None:
    """The class of the adapter wrapping a layer, when ``module`` is one: PEFT's tuner layers (LoRA, IA3, ...)
    keep the layer they wrap as ``base_layer``, its ``modules_to_save`` wrapper as ``original_module``."""
    if isinstance(getattr(module, "base_layer", None), nn.Module) or isinstance(
            getattr(module, "original_module", None), nn.Module):
        return f"{type(module).__module__}.{type(module).__qualname__}"
    return None


def _check_targets(model: PreTrainedModel, config: ETFConfig, head: bool) -> None:
    """Refuse, before anything is replaced, targets that an ETF layer cannot silently take the place of.

    An adapter on a projection to fix would be dropped with the layer it wraps (its weights gone, an empty
    adapter saved); a numeric gain beyond the projection's dtype would become inf in the gain tensor.
    """
    targets = [(slot.name, getattr(slot.parent, slot.attribute)) for slot in find_slots(model, config)]
    heads = [name for name in head_names(model) if isinstance(getattr(model, name, None), nn.Module)]
    if head and heads:  # the head module and what it holds (RoBERTa's out_proj), before find_head looks inside
        head_modules = getattr(model, heads[0]).named_modules()
        targets += [(f"{heads[0]}.{path}".rstrip("."), module) for path, module in head_modules]
    for path, module in targets:
        if isinstance(module, ETFLinear):
            continue
        adapter = _adapter(module)
        if adapter is not None:
            raise ValueError(
                f"etf_hf.patch: {path} is wrapped by an adapter ({adapter}); replacing it by an ETF layer would "
                f"silently drop the adapter and its weights. Patch before adding adapters (etf_hf.patch(model, "
                f"config), then get_peft_model), or leave this module out of the adapter's target_modules")
        weight = getattr(module, "weight", None)
        if isinstance(config.gain, (int, float)) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
            largest = torch.finfo(weight.dtype).max
            if config.gain > largest:
                raise ValueError(f"ETFConfig.gain={config.gain!r} does not fit in {weight.dtype}, the dtype of {path} "
                                 f"(largest {largest:.6g}): use 'match' (the replaced weight's norm) or a smaller gain")


def resolve(model: PreTrainedModel, config: ETFConfig | None = None, data: Any = None,
            **probe_options: Any) -> ETFConfig:
    """The config `patch` applies and records: ``config`` + ``model`` (+ ``data``) with every choice made.

    ``layers`` becomes the blocks actually patched (a list, or one list per stack; the default None and
    ``"auto"`` decided as `etf_hf.placement` says, the decision kept in ``placement``; with
    ``target_modules`` outside numbered blocks, ``"all"`` of them), ``head_basis`` is spelled out, and
    ``modules`` lists the modules replaced. `patch`, `lock_blocks`, ``save_pretrained`` and loading all
    work from this one object, so a checkpoint never depends on data, defaults or how the blocks were named.
    """
    config = config if config is not None else ETFConfig()
    return _recorded(model, _with_head_basis(_placed(model, config, data, probe_options)))


def patch(model: PreTrainedModel, config: ETFConfig | None = None, data: Any = None,
          **probe_options: Any) -> PreTrainedModel:
    """Fix the selected FFN projections of ``model`` (and with ``head=True`` its classifier) to simplex
    ETFs, in place; returns the model.

    data: labelled examples, used only to choose the blocks when ``config.layers`` is ``"auto"``, or left
        unset on a model loaded with pretrained weights (see `etf_hf.placement`); ``probe_options`` are
        `etf_hf.suggest_layers`'s keywords (``threshold``, ``num_classes``, ``pooling``, ``batch_size``,
        ``collate_fn``, ``label_key``). The choice is logged in one line and recorded in ``config.etf``
        (``layers`` resolved, ``placement`` saying why).

    The model's class becomes its registered ETF variant (``GPT2LMHeadModel`` -> ``ETFGPT2LMHeadModel``,
    ``model_type`` ``etf_gpt2``) and ``config.etf`` records the patch, so ``save_pretrained`` and
    ``AutoModel*.from_pretrained`` rebuild exactly this model. Patching again with the same config is a
    no-op (with ``layers`` unset or ``"auto"``, the blocks chosen the first time stand); with a different
    one it raises (a frame is never silently replaced). A projection (or, with ``head=True``, a classifier)
    wrapped by a PEFT adapter is refused before anything changes: patch first, then add adapters elsewhere.
    """
    config = config if config is not None else ETFConfig()
    if not isinstance(model, PreTrainedModel):
        wrapped = " (a PEFT wrapper: patch the base model before get_peft_model)" if hasattr(model, "get_base_model") \
            else ""
        raise TypeError(f"etf_hf.patch expects a transformers PreTrainedModel, got {type(model).__name__}{wrapped}")
    existing = getattr(model.config, "etf", None)
    if existing is not None:
        previous = ETFConfig.from_dict(existing)
        if config.layers in LAYER_CHOICES:
            same = _with_head_basis(dataclasses.replace(config, layers=previous.layers)) == previous
        else:
            same = _recorded_layers(model, _with_head_basis(config)) == previous
        if same:
            return model
        raise ValueError(
            f"this model is already patched with {previous}; patching it again with {config} would "
            f"replace fixed frames. Start from the unpatched model to use a different ETF config."
        )
    config = resolve(model, config, data, **probe_options)
    if not config.modules:
        raise ValueError(f"ETFConfig {config} selects no projection of {type(model).__name__}")
    apply_etf_layers(model, config.to_dict())
    _set_config_class(model.config, etf_config_class(type(model.config)))
    model.__class__ = etf_model_class(type(model))
    model.add_model_tags(list(MODEL_TAGS))  # Trainer.create_model_card writes them into its card
    model.config.etf = config.to_dict()
    summary = parameter_summary(model)
    kind = f"{config.basis!r} control weights (not ETFs)" if config.basis in CONTROL_BASES else f"{config.basis} ETFs"
    ffn = sum(entry["role"] != "head" for entry in config.modules)
    head = f" and its classifier ({model.config.etf['head_basis']})" if config.head else ""
    logger.info("etf_hf: %d FFN projections of %s%s are now fixed %s; %d of %d weights trainable (%.1f%%)",
                ffn, type(model).__name__, head, kind, summary["trainable"], summary["total"],
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
    for entry in model.config.etf["modules"]:
        parent, attribute = recorded_parent(model, entry)
        layer = getattr(parent, attribute)
        if isinstance(layer, ETFLinear):
            setattr(parent, attribute, _dense_layer(layer, entry["layout"]))
    unfuse_feed_forwards(model)
    del model.config.etf
    model.model_tags = [tag for tag in model.model_tags or () if tag not in MODEL_TAGS] or None
    _set_config_class(model.config, type(model.config).etf_vanilla_class)
    model.__class__ = model.etf_vanilla_class
    return model


def lock_blocks(model: PreTrainedModel, blocks: list[int], config: ETFConfig | None = None) -> list[int]:
    """Fix the FFN projections of more blocks, keeping those already fixed: Adaptive-ETF's lock.

    An unpatched model is patched with ``config`` (default: the frame nearest to the current weights)
    restricted to ``blocks``; a patched one extends its ``config.etf`` so save and load keep every lock.
    ``config`` must then match ``config.etf`` except in ``layers`` and its head fields (a lock never
    touches the head); while no FFN block is fixed yet (a head-only patch), it may also set the FFN
    ``basis`` and ``projections``, which is how a fixed classifier and Adaptive-ETF's nearest-frame locks
    combine. Returns the blocks that are now fixed.
    """
    existing = getattr(model.config, "etf", None)
    stacks = model_stacks(model, config)
    if stacks.named:
        raise ValueError(f"lock_blocks locks blocks of a single stack, but {type(model).__name__} has stacks "
                         f"{sorted(stacks.containers)}: patch it with ETFConfig(layers={{stack: [...], ...}}) instead")
    if existing is None:
        base = config or ETFConfig(basis="nearest")
        patch(model, dataclasses.replace(base, layers=sorted(set(blocks))))
        return list(model.config.etf["layers"])
    current = ETFConfig.from_dict(existing)
    if not isinstance(current.layers, list):
        raise ValueError("this model's ETF layers were chosen by target_modules outside numbered blocks; "
                         "blocks cannot be added to it")
    if config is not None:
        no_ffn_yet = not current.layers
        comparable = dataclasses.replace(config, layers=current.layers, head=current.head, head_basis=current.head_basis)
        if no_ffn_yet:
            comparable = dataclasses.replace(comparable, basis=current.basis, projections=current.projections)
        if comparable != current:
            allowed = "layers, or (no FFN block being fixed yet) basis and projections" if no_ffn_yet else "layers"
            raise ValueError(f"lock_blocks: {config} differs from the model's config.etf {current} in more than {allowed}")
        if no_ffn_yet:
            current = dataclasses.replace(current, basis=config.basis, projections=config.projections)
    merged = _recorded(model, _with_head_basis(dataclasses.replace(current, layers=sorted(set(current.layers) | set(blocks)))))
    apply_etf_layers(model, merged.to_dict())
    model.config.etf = merged.to_dict()
    return list(model.config.etf["layers"])
