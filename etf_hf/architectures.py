"""The architecture registry: one `Architecture` record per model family, holding everything etf_hf knows
about it: where its feed-forward projections are, how its blocks are stacked, its classification head,
the pooling that reads its features, the PEFT (LoRA) defaults and the benchmark's inputs.

A projection is identified by the *class of the module that owns it* (its role) and the attribute
name, never by a bare name suffix: GPT-2's ``c_proj`` names both the MLP's down-projection and the
attention output, and BERT's ``output.dense`` exists in the attention block as well. A block's index
comes from the block container it sits in (the stack's ``ModuleList`` of layers), never from the last
number of a module path (T5's ``encoder.block.2.layer.1.DenseReluDense`` is block 2, not 1).
Supporting a new architecture is one `Architecture` entry (plus its tests).

Stacks: an encoder-decoder (T5, BART, Whisper) or dual-tower (CLIP) model has one block container per
stack. Its frames are seeded with the stack's name, so block *i* of the encoder and of the decoder get
different frames, and ``ETFConfig.layers`` can address each stack (``{"encoder": "last:2", "decoder":
"all"}``). A single-stack model's seeds leave the stack out, as they always did, so its checkpoints
regenerate exactly the frames they were trained with.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
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


def causal_lm_inputs(config: Any, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token ids, their own labels (a causal LM shifts them)."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids}


def sequence_classification_inputs(config: Any, batch: int, seq: int,
                                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random token ids, a full attention mask and one class label per sequence."""
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def image_classification_inputs(config: Any, batch: int, seq: int,
                                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random images of the config's size and one class label each (``seq`` does not apply)."""
    pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
    return {"pixel_values": pixels, "labels": labels}


def patch_tokens(config: Any, seq: int) -> int:
    """Tokens per example of a ViT: the patches and the CLS token (``seq`` does not apply)."""
    return (config.image_size // config.patch_size) ** 2 + 1


def sequence_tokens(config: Any, seq: int) -> int:
    return seq


@dataclass(frozen=True)
class Bench:
    """What the benchmark harness (``etf-hf bench``) builds for a family.

    model_class: the transformers class name it times (built from a config, random weights).
    presets: config kwargs per size name (``small`` is the config class's defaults).
    inputs: (config, batch, seq, generator) -> random inputs with labels, on the CPU.
    tokens: (config, seq) -> tokens per example, for throughput.
    generates: the model is a causal LM (``generate()`` for ``--inference``; no classifier head to train).
    """

    model_class: str
    presets: Mapping[str, Mapping[str, Any]]
    inputs: Callable[[Any, int, int, torch.Generator], dict[str, torch.Tensor]]
    tokens: Callable[[Any, int], int] = sequence_tokens
    generates: bool = False


#: Attributes of a classification model holding its head, tried in order: ``classifier`` (BERT, RoBERTa,
#: ViT, ``*ForTokenClassification``, the paper's MLP), ``score`` (GPT-2, Llama and other decoder models).
#: The default of a record, and what is tried on a model without one.
HEAD_ATTRIBUTES: tuple[str, ...] = ("classifier", "score")
#: Inside a head that is a small module rather than one Linear, the Linear that produces the logits:
#: RoBERTa's ``RobertaClassificationHead`` is dense -> tanh -> ``out_proj``. Fixing ``out_proj`` fixes the
#: classifier of the features that head computes (its ``dense`` layer stays trainable).
HEAD_OUTPUT_ATTRIBUTES: tuple[str, ...] = ("out_proj",)
#: The stack name of a single-stack model (its seeds and ``layers`` do not name a stack).
SINGLE = ""


@dataclass(frozen=True)
class Architecture:
    """Everything etf_hf knows about one model family.

    model_types: transformers ``model_type`` values (without the ``etf_`` prefix).
    projections: the FFN projections, by owning class and attribute.
    blocks: a regular expression for the path of the ``ModuleList`` of blocks, relative to the base model
        (it may be preceded by any prefix, so every head class finds it); a mapping names one container per
        stack.
    head: attributes holding the classification head (see `find_head`).
    pooling: how ``pooling="auto"`` reads one vector per example from a block's hidden states (``cls``,
        ``last``, ``mean``, ``flat``; see `etf_hf.collapse_report`).
    peft_targets: LoRA's default ``target_modules`` (the attention projections); None reads PEFT's own
        table (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), see `peft_targets`.
    bench: the benchmark harness's model and inputs; None: not a benchmark family.
    """

    model_types: tuple[str, ...]
    projections: tuple[Projection, ...]
    blocks: str | Mapping[str, str]
    head: tuple[str, ...] = HEAD_ATTRIBUTES
    pooling: str = "mean"
    peft_targets: str | tuple[str, ...] | None = None
    bench: Bench | None = None

    @property
    def stacks(self) -> dict[str, str]:
        """Stack name -> block container path (one stack named `SINGLE` for a single-stack family)."""
        return {SINGLE: self.blocks} if isinstance(self.blocks, str) else dict(self.blocks)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether its Linear-like layers are transformers' `Conv1D` (GPT-2), whose (in, out) weight PEFT
        must be told about (``LoraConfig(fan_in_fan_out=True)``)."""
        return any(p.layout == "conv1d" for p in self.projections)


_TINY_TEXT = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256,
              "vocab_size": 256, "max_position_embeddings": 128}
_LARGE_ENCODER = {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096}

REGISTRY: tuple[Architecture, ...] = (
    Architecture(
        ("gpt2",),
        (Projection("GPT2MLP", "c_fc", "up", "conv1d"), Projection("GPT2MLP", "c_proj", "down", "conv1d")),
        blocks="h", head=("score",), pooling="last",
        bench=Bench("GPT2LMHeadModel", {
            "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 256, "n_positions": 128},
            "small": {},
            "large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
        }, causal_lm_inputs, generates=True),
    ),
    Architecture(
        ("bert",),
        (Projection("BertIntermediate", "dense", "up", "linear"), Projection("BertOutput", "dense", "down", "linear")),
        blocks=r"encoder\.layer", head=("classifier",), pooling="cls",
        bench=Bench("BertForSequenceClassification", {"tiny": _TINY_TEXT, "small": {}, "large": _LARGE_ENCODER},
                    sequence_classification_inputs),
    ),
    Architecture(
        ("roberta",),
        (Projection("RobertaIntermediate", "dense", "up", "linear"),
         Projection("RobertaOutput", "dense", "down", "linear")),
        blocks=r"encoder\.layer", head=("classifier",), pooling="cls",
    ),
    Architecture(
        ("vit",),
        (Projection("ViTMLP", "fc1", "up", "linear"),          # transformers >= 5.17
         Projection("ViTMLP", "fc2", "down", "linear"),
         Projection("ViTIntermediate", "dense", "up", "linear"),  # older releases
         Projection("ViTOutput", "dense", "down", "linear")),
        blocks=r"layers|encoder\.layer", head=("classifier",), pooling="cls",  # 5.2x, then older releases
        peft_targets=r".*\.attention(\.attention)?\.(q_proj|v_proj|query|value)",  # 5.2x names, then older ones
        bench=Bench("ViTForImageClassification", {
            "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256,
                     "image_size": 32, "patch_size": 8},
            "small": {},
            "large": _LARGE_ENCODER,
        }, image_classification_inputs, patch_tokens),
    ),
    Architecture(
        ("llama",),
        (Projection("LlamaMLP", "gate_proj", "up", "linear"), Projection("LlamaMLP", "up_proj", "up", "linear"),
         Projection("LlamaMLP", "down_proj", "down", "linear")),
        blocks="layers", head=("score",), pooling="last",
    ),
    Architecture(
        ("qwen2",),
        (Projection("Qwen2MLP", "gate_proj", "up", "linear"), Projection("Qwen2MLP", "up_proj", "up", "linear"),
         Projection("Qwen2MLP", "down_proj", "down", "linear")),
        blocks="layers", head=("score",), pooling="last",
        bench=Bench("Qwen2ForCausalLM", {
            "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 256, "vocab_size": 256, "max_position_embeddings": 128},
            "small": {"num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2,
                      "intermediate_size": 4864, "vocab_size": 151936},  # Qwen2-0.5B's shape
            "large": {},  # the config class's defaults: Qwen2-7B's shape
        }, causal_lm_inputs, generates=True),
    ),
    Architecture(
        ("t5",),
        (Projection("T5DenseActDense", "wi", "up", "linear"), Projection("T5DenseActDense", "wo", "down", "linear"),
         Projection("T5DenseGatedActDense", "wi_0", "up", "linear"),
         Projection("T5DenseGatedActDense", "wi_1", "up", "linear"),
         Projection("T5DenseGatedActDense", "wo", "down", "linear")),
        blocks={"encoder": r"encoder\.block", "decoder": r"decoder\.block"}, head=("classification_head",),
    ),
    Architecture(
        ("bart",),
        (Projection("BartEncoderLayer", "fc1", "up", "linear"),
         Projection("BartEncoderLayer", "fc2", "down", "linear"),
         Projection("BartDecoderLayer", "fc1", "up", "linear"),
         Projection("BartDecoderLayer", "fc2", "down", "linear")),
        blocks={"encoder": r"encoder\.layers", "decoder": r"decoder\.layers"}, head=("classification_head",),
    ),
    Architecture(
        ("whisper",),
        (Projection("WhisperEncoderLayer", "fc1", "up", "linear"),
         Projection("WhisperEncoderLayer", "fc2", "down", "linear"),
         Projection("WhisperDecoderLayer", "fc1", "up", "linear"),
         Projection("WhisperDecoderLayer", "fc2", "down", "linear")),
        blocks={"encoder": r"encoder\.layers", "decoder": r"decoder\.layers"}, peft_targets=("q_proj", "v_proj"),
    ),
    Architecture(
        ("clip",),
        (Projection("CLIPMLP", "fc1", "up", "linear"), Projection("CLIPMLP", "fc2", "down", "linear")),
        blocks={"text": r"text_model\.encoder\.layers", "vision": r"vision_model\.encoder\.layers"},
        peft_targets=("q_proj", "v_proj"),
    ),
    # etf_hf.models.MLPForImageClassification, the paper's MLP: each block's square H x H hidden layer
    Architecture(("collapse_mlp",), (Projection("CollapseMLPBlock", "linear", "up", "linear"),),
                 blocks="layers", head=("classifier",), pooling="flat"),
)

#: Attribute groups that identify an FFN in architectures without an entry: a module owning every
#: attribute of a group, each a Linear/Conv1D, is taken to be an MLP.
FALLBACK_GROUPS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"up": ("fc1",), "down": ("fc2",)},
    {"up": ("gate_proj", "up_proj"), "down": ("down_proj",)},
    {"up": ("dense_h_to_4h",), "down": ("dense_4h_to_h",)},
)


@dataclass(frozen=True)
class Slot:
    """A projection found in a concrete model."""

    name: str       # module path, e.g. "transformer.h.3.mlp.c_fc"
    parent: nn.Module
    attribute: str
    block: int      # index in its stack's block container; -1 outside every block (or the head)
    role: str
    layout: str
    #: Identity that seeds the frame. Registry slots use ([stack,] block, role, attribute), not the module
    #: path, so a checkpoint regenerates the same frames whichever head class or transformers release
    #: (ViT's module paths moved in 5.2x) builds the model; target_modules slots use their path.
    seed_key: str
    stack: str = SINGLE


def architecture_for(model_type: str) -> Architecture | None:
    """The record of a ``model_type`` (``etf_`` prefix allowed), or None."""
    base = model_type.removeprefix("etf_")
    for architecture in REGISTRY:
        if base in architecture.model_types:
            return architecture
    return None


def model_architecture(model: nn.Module) -> Architecture | None:
    return architecture_for(getattr(getattr(model, "config", None), "model_type", "") or "")


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Attributes that may hold ``model``'s classification head: its record's, else `HEAD_ATTRIBUTES`."""
    architecture = model_architecture(model)
    return architecture.head if architecture else HEAD_ATTRIBUTES


def peft_targets(model_type: str) -> str | list[str] | None:
    """LoRA's default ``target_modules`` for ``model_type``: the record's, else PEFT's own table (peft is
    optional and imported only here); None when neither knows the family."""
    base = model_type.removeprefix("etf_")
    architecture = architecture_for(base)
    if architecture is not None and architecture.peft_targets is not None:
        targets = architecture.peft_targets
        return targets if isinstance(targets, str) else list(targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base)
    return list(targets) if targets is not None else None


def _layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


@dataclass(frozen=True)
class Stacks:
    """The block containers of a concrete model: stack name -> (container path, number of blocks).

    ``named``: whether seeds and ``layers`` name the stack (a family of several stacks, even in a head
    class holding one of them, such as ``T5EncoderModel``).
    """

    containers: dict[str, tuple[str, int]] = field(default_factory=dict)
    named: bool = False

    @property
    def sizes(self) -> dict[str, int]:
        return {name: size for name, (_, size) in self.containers.items()}

    def locate(self, path: str) -> tuple[str, int] | None:
        """(stack, block index) of the module at ``path``; None outside every block container."""
        for name, (container, _) in self.containers.items():
            prefix = f"{container}." if container else ""
            if path.startswith(prefix):
                index = path[len(prefix):].split(".", 1)[0]
                if index.isdigit():
                    return name, int(index)
        return None


def _matches(path: str, pattern: str) -> bool:
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path) is not None


def record_stacks(model: nn.Module, architecture: Architecture) -> Stacks:
    """The block containers a record names, as found in ``model`` (a head class may hold only some stacks)."""
    lists = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    containers = {}
    for name, suffix in architecture.stacks.items():
        found = [(path, len(module)) for path, module in lists if _matches(path, suffix)]
        if len(found) > 1:
            raise ValueError(f"{type(model).__name__}: the {name or 'block'} container {suffix!r} matches several "
                             f"module lists {[p for p, _ in found]}; its architecture record is ambiguous")
        if found:
            containers[name] = found[0]
    return Stacks(containers, named=len(architecture.stacks) > 1)


def _outermost_list(path: str, lists: dict[str, int]) -> str | None:
    parts = path.split(".")
    for end in range(len(parts)):
        candidate = ".".join(parts[:end])
        if candidate in lists and end < len(parts) and parts[end].isdigit():
            return candidate
    return None


def discovered_stacks(model: nn.Module, paths: list[str]) -> Stacks:
    """Block containers of a model without a record: the outermost ``ModuleList`` holding each of ``paths``.

    Several containers (an encoder-decoder) are named by the path parts that tell them apart
    (``model.encoder.layers`` / ``model.decoder.layers`` -> ``encoder`` / ``decoder``).
    """
    lists = {path: len(module) for path, module in model.named_modules() if isinstance(module, nn.ModuleList)}
    found = sorted({c for c in (_outermost_list(p, lists) for p in paths) if c is not None})
    if len(found) < 2:
        return Stacks({SINGLE: (found[0], lists[found[0]])} if found else {})
    split = [c.split(".") for c in found]
    head = 0
    while all(len(s) > head + 1 and s[head] == split[0][head] for s in split):
        head += 1
    tail = 0
    while all(len(s) > head + tail + 1 and s[-1 - tail] == split[0][-1 - tail] for s in split):
        tail += 1
    names = [".".join(s[head:len(s) - tail]) for s in split]
    return Stacks({name: (c, lists[c]) for name, c in zip(names, found)}, named=True)


def _slot(path: str, parent: nn.Module, attribute: str, role: str, layout: str, stacks: Stacks,
          seed_key: str | None = None) -> Slot:
    place = stacks.locate(path)
    stack, block = place if place else (SINGLE, -1)
    if seed_key is None:
        if place is None:
            raise ValueError(f"found FFN module {path!r} outside the model's block containers "
                             f"{[c for c, _ in stacks.containers.values()]}; pass ETFConfig.target_modules")
        seed_key = f"{stack}:{block}:{role}:{attribute}" if stacks.named else f"{block}:{role}:{attribute}"
    return Slot(path, parent, attribute, block, role, layout, seed_key, stack)


def _registry_slots(model: nn.Module, architecture: Architecture, stacks: Stacks) -> list[Slot]:
    slots = []
    for path, module in model.named_modules():
        names = _class_names(module)
        for projection in architecture.projections:
            if projection.parent in names and getattr(module, projection.attribute, None) is not None:
                slots.append(_slot(f"{path}.{projection.attribute}", module, projection.attribute, projection.role,
                                   projection.layout, stacks))
    return slots


def _fallback_layout(module: nn.Module | None) -> str | None:
    """`_layout`, with an `ETFLinear` counted as the Linear it replaced: a model patched before (Adaptive-ETF
    locks block by block) must still show its fixed projections, or recording the next lock would drop them.
    The generic groups are Linear layers in every family that has them (Conv1D families have records)."""
    return "linear" if isinstance(module, ETFLinear) else _layout(module) if module is not None else None


def _fallback_candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, str, str]]:
    found = []
    for path, module in model.named_modules():
        for group in FALLBACK_GROUPS:
            members = [(role, attr) for role, attrs in group.items() for attr in attrs]
            layouts = {attr: _fallback_layout(getattr(module, attr, None)) for _, attr in members}
            if all(layouts.values()):
                found += [(f"{path}.{attr}", module, attr, role, layouts[attr]) for role, attr in members]
    return found


def _override_candidates(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Module, str, str, str]]:
    compiled = [re.compile(p) for p in patterns]
    found = []
    for path, module in model.named_modules():
        if not path or not any(p.fullmatch(path) for p in compiled):
            continue
        layout = _layout(module)
        if layout is None and not isinstance(module, ETFLinear):
            raise ValueError(f"target_modules matched {path!r}, a {type(module).__name__}; only Linear/Conv1D layers can become ETF layers")
        parent_path, _, attribute = path.rpartition(".")
        weight_shape = module.weight.shape if layout != "conv1d" else module.weight.t().shape
        role = "up" if weight_shape[0] >= weight_shape[1] else "down"
        found.append((path, model.get_submodule(parent_path), attribute, role, layout or "linear"))
    if not found:
        raise ValueError(f"target_modules {patterns} matched no module; module paths look like {_example_paths(model)}")
    return found


def _example_paths(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if _layout(module)][:4]


def model_stacks(model: nn.Module, config: ETFConfig | None = None) -> Stacks:
    """The block containers ``config``'s slots are counted in: the record's, else those holding the slots."""
    architecture = model_architecture(model)
    if architecture is not None:
        return record_stacks(model, architecture)
    return discovered_stacks(model, [slot.name for slot in all_slots(model, config or ETFConfig(layers="all"))])


def all_slots(model: nn.Module, config: ETFConfig) -> list[Slot]:
    """Every FFN projection ``config``'s ``target_modules`` / ``projections`` select, in every block."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    architecture = architecture_for(model_type)
    if architecture is not None:
        stacks = record_stacks(model, architecture)
    if config.target_modules:
        found = _override_candidates(model, config.target_modules)
        if architecture is None:
            stacks = discovered_stacks(model, [path for path, *_ in found])
        return [_slot(path, parent, attr, role, layout, stacks, f"path:{path}")
                for path, parent, attr, role, layout in found]
    if architecture is not None:
        slots = _registry_slots(model, architecture, stacks)
    else:
        found = _fallback_candidates(model)
        stacks = discovered_stacks(model, [path for path, *_ in found])
        slots = [_slot(path, parent, attr, role, layout, stacks) for path, parent, attr, role, layout in found
                 if stacks.locate(path) is not None]
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
    return slots


def find_slots(model: nn.Module, config: ETFConfig) -> list[Slot]:
    """Every FFN projection of ``model`` that ``config`` selects, in module order.

    Raises ValueError naming what was looked for when the architecture is unknown, a block index is
    out of range, or nothing matches. ``layers=[]`` (a fixed head alone) selects nothing without looking.
    ``layers`` must be explicit: None (the default) and ``"auto"`` are choices `etf_hf.resolve` makes per
    model (`resolve_layers`), so ``find_slots(model, etf_hf.resolve(model, config))`` is what `patch` replaces.
    """
    if config.layers == []:
        return []
    slots = all_slots(model, config)
    if config.target_modules and any(s.block < 0 for s in slots):
        if config.layers != "all":
            raise ValueError("ETFConfig.layers can only filter target_modules that live in numbered blocks; use layers='all'")
        return slots
    stacks = model_stacks(model, config)
    wanted = resolve_layers(config.layers, stacks.sizes, type(model).__name__)
    if isinstance(wanted, list):
        wanted = {SINGLE: wanted}
    return [s for s in slots if s.block in wanted.get(s.stack, ())]


def _count_blocks(layers: str | list[int], total: int, where: str) -> list[int]:
    if layers is None:
        raise ValueError("ETFConfig.layers=None is the default that etf_hf.resolve(model, config) decides for the "
                         "model (every block of a model built from a config, the second half of a pretrained one); "
                         "resolve the config first (etf_hf.patch does), or give layers='all', 'last:N' or [i, ...]")
    if layers == "auto":
        raise ValueError("ETFConfig.layers='auto' is chosen from NCC on labelled data: call "
                         "etf_hf.patch(model, config, data=...) (or etf_hf.suggest_layers), which writes the chosen "
                         "blocks into config.etf; or give layers='all', 'last:N' or [i, ...]")
    if layers == "all":
        return list(range(total))
    if isinstance(layers, str):
        count = int(layers.split(":")[1])
        if count > total:
            raise ValueError(f"ETFConfig.layers={layers!r}, but {where} has only {total} blocks")
        return list(range(total - count, total))
    out_of_range = [i for i in layers if i >= total]
    if out_of_range:
        raise ValueError(
            f"ETFConfig.layers: block index {out_of_range} out of range for {where} with {total} blocks "
            f"(valid: 0..{total - 1}, or 'last:N')"
        )
    return list(layers)


def resolve_layers(layers: Any, sizes: int | Mapping[str, int],
                   name: str = "the model") -> list[int] | dict[str, list[int]]:
    """Block indices selected by an ``ETFConfig.layers`` value, for stacks of ``sizes`` blocks.

    A single-stack model (``sizes`` an int, or one stack named `SINGLE`) gets a list. A model of several
    stacks gets one list per stack: a plain value (``"all"``, ``"last:N"``, ``[i, ...]``) applies to each
    stack, a mapping names the stacks it patches (those it leaves out get no ETF layer). None (the
    default) and ``"auto"`` are refused: they depend on the model's weights (and data), which only
    `etf_hf.resolve` looks at.
    """
    if isinstance(sizes, int):
        sizes = {SINGLE: sizes}
    if list(sizes) == [SINGLE]:
        if isinstance(layers, Mapping):
            raise ValueError(f"ETFConfig.layers={layers!r} names stacks, but {name} has a single stack of blocks: "
                             f"give 'all', 'last:N' or [i, ...]")
        return _count_blocks(layers, sizes[SINGLE], "a model")
    if isinstance(layers, Mapping):
        unknown = sorted(set(layers) - set(sizes))
        if unknown:
            raise ValueError(f"ETFConfig.layers names stack(s) {unknown} that {name} does not have; its stacks: "
                             f"{', '.join(f'{s!r} ({n} blocks)' for s, n in sizes.items())}")
        return {stack: _count_blocks(layers[stack], size, f"the {stack} stack of {name}") if stack in layers else []
                for stack, size in sizes.items()}
    try:
        return {stack: _count_blocks(layers, size, f"the {stack} stack of {name}") for stack, size in sizes.items()}
    except ValueError as error:
        example = {stack: "all" for stack in sizes}
        raise ValueError(f"{error}; a plain value applies to every stack: give layers per stack instead, e.g. "
                         f"{example}") from None


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
    attributes = head_names(model)
    for attribute in attributes:
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
                     f"{' or '.join(attributes)}, or their {'/'.join(HEAD_OUTPUT_ATTRIBUTES)}); load a "
                     f"*ForSequenceClassification / *ForImageClassification model, or use head=False")


# ---------------------------------------------------------------------------------------------------
# Fused fixed-frame FFN facts (used by `etf_hf.ffn`): how an MLP module computes from its projections.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPForm:
    """An MLP module's forward, in the attribute names of its children: ``down(act(up(x)))``, or with
    ``gate`` ``down(act(gate(x)) * up(x))``, then ``dropout`` if named. Only modules whose forward is
    exactly this (read in transformers' source, 5.24) are listed: `etf_hf.ffn` then computes the whole
    FFN in one autograd function when its projections are fixed frames."""

    up: str
    down: str
    activation: str
    gate: str | None = None
    dropout: str | None = None


#: MLP classes (by name) whose forward is an `MLPForm`. BERT and RoBERTa are absent on purpose: their
#: FFN spans two modules (``*Intermediate`` computes up + activation, ``*Output`` down + dropout +
#: residual LayerNorm), so their projections keep the per-projection `ETFLinear` path.
MLP_FORMS: dict[str, MLPForm] = {
    "GPT2MLP": MLPForm("c_fc", "c_proj", "act", dropout="dropout"),
    "ViTMLP": MLPForm("fc1", "fc2", "activation_fn"),
    "CLIPMLP": MLPForm("fc1", "fc2", "activation_fn"),  # generic fc1/fc2 fallback
    "SiglipMLP": MLPForm("fc1", "fc2", "activation_fn"),  # generic fc1/fc2 fallback
    "LlamaMLP": MLPForm("up_proj", "down_proj", "act_fn", gate="gate_proj"),
    "MistralMLP": MLPForm("up_proj", "down_proj", "act_fn", gate="gate_proj"),  # generic gated fallback
    "Qwen2MLP": MLPForm("up_proj", "down_proj", "act_fn", gate="gate_proj"),  # generic gated fallback
}


def mlp_form(module_class: type) -> MLPForm | None:
    """The `MLPForm` of an MLP class, matched by its exact class name (a subclass may compute otherwise)."""
    return MLP_FORMS.get(module_class.__name__)
