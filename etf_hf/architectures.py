"""The architecture registry: where each supported model keeps its feed-forward projections and its
classification head.

A projection is identified by the *class of the module that owns it* (its role) and the attribute
name, never by a bare name suffix: GPT-2's ``c_proj`` names both the MLP's down-projection and the
attention output, and BERT's ``output.dense`` exists in the attention block as well. Supporting a new
architecture is one `Architecture` entry. The head is found by attribute (`HEAD_ATTRIBUTES`), which
every transformers classification model and the paper's MLP share.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .config import ETFConfig
from .layers import ETFLinear


@dataclass(frozen=True)
class Projection:
    """One FFN projection: owned by a module of class ``parent`` as ``parent.attribute``.

    role: ``up`` (d -> hidden; gate projections too) or ``down`` (hidden -> d).
    layout: ``linear`` for `nn.Linear`'s (out, in) weight, ``conv1d`` for transformers' `Conv1D` (in, out).
    """

    parent: str
    attribute: str
    role: str
    layout: str


@dataclass(frozen=True)
class Architecture:
    model_types: tuple[str, ...]
    projections: tuple[Projection, ...]


REGISTRY: tuple[Architecture, ...] = (
    Architecture(("gpt2",), (
        Projection("GPT2MLP", "c_fc", "up", "conv1d"),
        Projection("GPT2MLP", "c_proj", "down", "conv1d"),
    )),
    Architecture(("bert",), (
        Projection("BertIntermediate", "dense", "up", "linear"),
        Projection("BertOutput", "dense", "down", "linear"),
    )),
    Architecture(("roberta",), (
        Projection("RobertaIntermediate", "dense", "up", "linear"),
        Projection("RobertaOutput", "dense", "down", "linear"),
    )),
    Architecture(("vit",), (
        Projection("ViTMLP", "fc1", "up", "linear"),          # transformers >= 5.17
        Projection("ViTMLP", "fc2", "down", "linear"),
        Projection("ViTIntermediate", "dense", "up", "linear"),  # older releases
        Projection("ViTOutput", "dense", "down", "linear"),
    )),
    Architecture(("llama",), (
        Projection("LlamaMLP", "gate_proj", "up", "linear"),
        Projection("LlamaMLP", "up_proj", "up", "linear"),
        Projection("LlamaMLP", "down_proj", "down", "linear"),
    )),
    # etf_hf.models.MLPForImageClassification, the paper's MLP: each block's square H x H hidden layer
    Architecture(("collapse_mlp",), (
        Projection("CollapseMLPBlock", "linear", "up", "linear"),
    )),
)

#: Attribute groups that identify an FFN in architectures without an entry: a module owning every
#: attribute of a group, each a Linear/Conv1D, is taken to be an MLP.
FALLBACK_GROUPS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"up": ("fc1",), "down": ("fc2",)},
    {"up": ("gate_proj", "up_proj"), "down": ("down_proj",)},
    {"up": ("dense_h_to_4h",), "down": ("dense_4h_to_h",)},
)


#: Attributes of a classification model holding its head, tried in order: ``classifier`` (BERT, RoBERTa,
#: ViT, ``*ForTokenClassification``, the paper's MLP), ``score`` (GPT-2, Llama and other decoder models).
HEAD_ATTRIBUTES: tuple[str, ...] = ("classifier", "score")
#: Inside a head that is a small module rather than one Linear, the Linear that produces the logits:
#: RoBERTa's ``RobertaClassificationHead`` is dense -> tanh -> ``out_proj``. Fixing ``out_proj`` fixes the
#: classifier of the features that head computes (its ``dense`` layer stays trainable).
HEAD_OUTPUT_ATTRIBUTES: tuple[str, ...] = ("out_proj",)


@dataclass(frozen=True)
class Slot:
    """A projection found in a concrete model."""

    name: str       # module path, e.g. "transformer.h.3.mlp.c_fc"
    parent: nn.Module
    attribute: str
    block: int
    role: str
    layout: str
    #: Identity that seeds the frame. Registry slots use (block, role, attribute), not the module path,
    #: so a checkpoint regenerates the same frames whichever head class or transformers release
    #: (ViT's module paths moved in 5.2x) builds the model; target_modules slots use their path.
    seed_key: str


def architecture_for(model_type: str) -> Architecture | None:
    for architecture in REGISTRY:
        if model_type in architecture.model_types:
            return architecture
    return None


def _layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def _block_index(path: str) -> int | None:
    numbers = [int(part) for part in path.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _registry_slots(model: nn.Module, architecture: Architecture) -> list[Slot]:
    slots = []
    for path, module in model.named_modules():
        names = _class_names(module)
        for projection in architecture.projections:
            if projection.parent not in names:
                continue
            child = getattr(module, projection.attribute, None)
            if child is None:
                continue
            block = _block_index(path)
            if block is None:
                raise ValueError(f"found FFN module {path!r} outside a numbered block; pass ETFConfig.target_modules")
            slots.append(Slot(f"{path}.{projection.attribute}", module, projection.attribute, block,
                              projection.role, projection.layout,
                              f"{block}:{projection.role}:{projection.attribute}"))
    return slots


def _fallback_slots(model: nn.Module) -> list[Slot]:
    slots = []
    for path, module in model.named_modules():
        for group in FALLBACK_GROUPS:
            members = [(role, attr) for role, attrs in group.items() for attr in attrs]
            children = {attr: getattr(module, attr, None) for _, attr in members}
            if not all(child is not None and _layout(child) for child in children.values()):
                continue
            block = _block_index(path)
            if block is None:
                continue
            for role, attr in members:
                slots.append(Slot(f"{path}.{attr}", module, attr, block, role, _layout(children[attr]),
                                  f"{block}:{role}:{attr}"))
    return slots


def _override_slots(model: nn.Module, patterns: list[str]) -> list[Slot]:
    compiled = [re.compile(p) for p in patterns]
    slots = []
    for path, module in model.named_modules():
        if not path or not any(p.fullmatch(path) for p in compiled):
            continue
        layout = _layout(module)
        if layout is None and not isinstance(module, ETFLinear):
            raise ValueError(f"target_modules matched {path!r}, a {type(module).__name__}; only Linear/Conv1D layers can become ETF layers")
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        weight_shape = module.weight.shape if layout != "conv1d" else module.weight.t().shape
        role = "up" if weight_shape[0] >= weight_shape[1] else "down"
        block = _block_index(parent_path)
        slots.append(Slot(path, parent, attribute, -1 if block is None else block, role, layout or "linear",
                          f"path:{path}"))
    if not slots:
        raise ValueError(f"target_modules {patterns} matched no module; module paths look like {_example_paths(model)}")
    return slots


def _example_paths(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if _layout(module)][:4]


def find_slots(model: nn.Module, config: ETFConfig) -> list[Slot]:
    """Every FFN projection of ``model`` that ``config`` selects, in module order.

    Raises ValueError naming what was looked for when the architecture is unknown, a block index is
    out of range, or nothing matches. ``layers=[]`` (a fixed head alone) selects nothing without looking.
    """
    if config.layers == []:
        return []
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    base_type = model_type.removeprefix("etf_")
    if config.target_modules:
        slots = _override_slots(model, config.target_modules)
    else:
        architecture = architecture_for(base_type)
        slots = _registry_slots(model, architecture) if architecture else _fallback_slots(model)
        if not slots:
            supported = sorted(t for a in REGISTRY for t in a.model_types)
            groups = ", ".join("/".join(a for attrs in g.values() for a in attrs) for g in FALLBACK_GROUPS)
            raise ValueError(
                f"no feed-forward projections found in {type(model).__name__} (model_type={model_type!r}). "
                f"Registered architectures: {supported}; generic names tried: {groups}. "
                f"Pass ETFConfig(target_modules=[regex, ...]) naming the Linear layers to fix, e.g. {_example_paths(model)}"
            )
        if config.projections != "both":
            slots = [s for s in slots if s.role == config.projections]
    return _select_blocks(model, slots, config)


def num_blocks(model: nn.Module, slots: list[Slot]) -> int:
    configured = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = max((s.block for s in slots), default=-1) + 1
    return max(configured or 0, found)


def resolve_layers(layers: str | list[int] | None, total: int) -> list[int]:
    """Block indices selected by an ``ETFConfig.layers`` value for a model of ``total`` blocks.

    None (the default) counts as ``"all"`` here, the default of a model built from a config; `etf_hf.patch`
    resolves the default of a pretrained model (and ``"auto"``) into a list before slots are looked up.
    """
    if layers == "auto":
        raise ValueError("ETFConfig.layers='auto' is chosen from NCC on labelled data: call "
                         "etf_hf.patch(model, config, data=...) (or etf_hf.suggest_layers), which writes the chosen "
                         "blocks into config.etf; or give layers='all', 'last:N' or [i, ...]")
    if layers is None or layers == "all":
        return list(range(total))
    if isinstance(layers, str):
        count = int(layers.split(":")[1])
        if count > total:
            raise ValueError(f"ETFConfig.layers={layers!r}, but the model has only {total} blocks")
        return list(range(total - count, total))
    out_of_range = [i for i in layers if i >= total]
    if out_of_range:
        raise ValueError(
            f"ETFConfig.layers: block index {out_of_range} out of range for a model with {total} blocks "
            f"(valid: 0..{total - 1}, or 'last:N')"
        )
    return list(layers)


def _select_blocks(model: nn.Module, slots: list[Slot], config: ETFConfig) -> list[Slot]:
    if config.target_modules and any(s.block < 0 for s in slots):
        if config.layers not in (None, "all"):
            raise ValueError("ETFConfig.layers can only filter target_modules that live in numbered blocks; use layers='all'")
        return slots
    wanted = set(resolve_layers(config.layers, num_blocks(model, slots)))
    return [s for s in slots if s.block in wanted]


def _is_linear(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Linear, ETFLinear))


def find_head(model: nn.Module) -> Slot:
    """The classification head's logit layer of ``model``, as a slot (block -1, role ``head``).

    Looked up as ``model.<classifier|score>`` (a Linear), or the Linear ``out_proj`` inside such a module
    (RoBERTa). Refused, with the reason: no classification head (a base model, or a causal LM, whose
    ``lm_head`` has vocabulary-many outputs and is usually tied to the input embeddings, so fixing it
    would fix the embeddings too), a head that is neither, fewer than 2 classes (a regression head), or
    more classes than a simplex ETF fits in the hidden size (K > hidden + 1).
    """
    name = type(model).__name__
    for attribute in HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if not isinstance(head, nn.Module):
            continue
        if _is_linear(head):
            parent, child, path = model, attribute, attribute
        else:
            inner = next((a for a in HEAD_OUTPUT_ATTRIBUTES if _is_linear(getattr(head, a, None))), None)
            if inner is None:
                raise ValueError(
                    f"ETFConfig(head=True): {name}.{attribute} is a {type(head).__name__}, not a Linear, and has no "
                    f"Linear {'/'.join(HEAD_OUTPUT_ATTRIBUTES)}; etf_hf fixes a single Linear classifier. Use "
                    f"head=False, or target_modules naming the Linear that produces the logits")
            parent, child, path = head, inner, f"{attribute}.{inner}"
        layer = getattr(parent, child)
        classes, hidden = layer.out_features, layer.in_features
        if classes < 2:
            raise ValueError(f"ETFConfig(head=True): {name}.{path} has {classes} output; a simplex ETF classifier "
                             f"needs K >= 2 classes (a regression head cannot be fixed)")
        if classes > hidden + 1:
            raise ValueError(
                f"ETFConfig(head=True): {name}.{path} maps {hidden} features to K={classes} classes, but a simplex "
                f"ETF of K vectors needs dimension >= K-1={classes - 1}; use head=False for more than "
                f"hidden+1={hidden + 1} classes")
        return Slot(path, parent, child, -1, "head", "linear", "head")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = embeddings is not None and getattr(output, "weight", None) is getattr(embeddings, "weight", 1)
        raise ValueError(
            f"ETFConfig(head=True) fixes a classification head, but {name} has a language-model head "
            f"({getattr(output, 'out_features', '?')} vocabulary outputs{', tied to the input embeddings' if tied else ''}), "
            f"which cannot be a simplex ETF (K > hidden + 1{', and fixing it would fix the embeddings' if tied else ''}). "
            f"Use head=False; to measure or fix a causal LM's FFN blocks, head is not needed")
    raise ValueError(f"ETFConfig(head=True): {name} has no classification head (looked for a Linear "
                     f"{' or '.join(HEAD_ATTRIBUTES)}, or their {'/'.join(HEAD_OUTPUT_ATTRIBUTES)}); load a "
                     f"*ForSequenceClassification / *ForImageClassification model, or use head=False")
