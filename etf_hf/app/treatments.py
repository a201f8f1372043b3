"""Modes of `etf-hf train`: how each of the side-by-side runs treats the model before training.

A mode is a mapping with a ``name`` and at most one treatment key; every mode starts from the same
initial weights, data order and `TrainingArguments`::

    - name: full                         # no treatment (or etf: null): every weight trains
    - name: etf                          # FFN projections fixed to simplex-ETF frames (or a control basis):
      etf: {layers: all, basis: orthogonal}        #   any ETFConfig field
    - name: frozen                       # the selected FFN projection weights frozen (requires_grad=False),
      frozen: {layers: all, projections: both}     #   their biases still train: what a user would do by hand
    - name: lora                         # PEFT LoRA; any peft.LoraConfig field. Defaults: r 8, alpha 2r, the
      lora: {r: 8}                                 #   attention projections of gpt2/bert/vit, heads trained
    - name: adaptive                     # Adaptive-ETF: AdaptiveETFCallback settings (probe: probe_size
      adaptive: {threshold: 0.9, patience: 3, every: epoch, basis: nearest}   #   random training examples)
    - name: lora_lr1e-3                  # any mode may override TrainingArguments fields (not the seed)
      lora: {r: 8}                                 #   for itself: adapters usually want a larger
      training: {learning_rate: 1.0e-3}            #   learning rate than full fine-tuning
    - name: etf_frozen_embeddings        # any mode but LoRA may also freeze the input embeddings
      etf: {layers: "last:3"}                      #   (``model.get_input_embeddings()``): in a pretrained text
      freeze_input_embeddings: true                #   model they can be half of all weights
    - name: dense_n_inner512             # a model built from_config may change size per mode: a dense
      model: {n_inner: 512}                        #   baseline of any size in the same run (etf_hf.app.frontier)
    - name: dense_iso_params             # ... or have a size derived: the n_inner at which this dense
      match: {mode: etf, by: params, vary: n_inner}  # model trains as many weights as mode 'etf'

An ``etf`` mode with ``layers: auto`` (or, on a pretrained model, with ``layers`` unset) has `etf_hf.patch`
choose the blocks by nearest-class-mean accuracy on `PROBE_SIZE` random training examples.

`etf-hf bench` times its ``full``, ``frozen``, ``lora`` and ``etf-<basis>`` modes through the same `ModeSpec`,
`apply_mode` and `lora_settings`; its bench-only FFN bounds live in `etf_hf.app.bounds`, and its ``dense:``
baselines of other sizes use `override_config`.

``frozen`` differs from ``etf: {basis: frozen}`` (the control): the control keeps the layer's weight as a
fixed frame *with a trainable gain*, stored like an ETF layer; ``frozen`` is plain ``requires_grad=False``.
LoRA needs the optional ``peft`` package (``pip install 'etf_hf[peft]'``). ``freeze_input_embeddings``
freezes every parameter of the input embedding module; where the output head is tied to it (GPT-2's
``lm_head``), that head is frozen with it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .recipe import ConfigError, expect, expect_positive_int, reject_unknown

TREATMENTS = ("etf", "frozen", "lora", "adaptive")
_MODE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: The ETFConfig fields that select projections; a ``frozen`` mode selects with them too.
SELECTION_KEYS = ("layers", "projections", "target_modules")
#: LoRA's default rank (alpha is twice the rank), in `etf-hf train` and `etf-hf bench` alike.
LORA_RANK = 8
#: How many training examples NCC is measured on, by Adaptive-ETF (``probe_size`` changes it) and by
#: ``etf: {layers: auto}`` placement: a seeded random subset, the same one at every check.
PROBE_SIZE = 1000
#: ETFConfig fields a recipe does not set: ``placement`` is written by `etf_hf.patch`, the version by the format.
_ETF_RECORD_FIELDS = ("format_version", "placement")


@dataclass
class ModeSpec:
    """One validated mode. At most one of ``etf`` (an `ETFConfig`), ``frozen`` (selection keys), ``lora``
    (LoraConfig kwargs, defaults filled) and ``adaptive`` (callback kwargs and ``probe_size``) is set."""

    name: str
    etf: Any = None
    frozen: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    adaptive: dict[str, Any] | None = None
    #: The mode's own TrainingArguments fields over the recipe's ``training`` (checked by `etf_hf.app.runner`).
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: ``requires_grad=False`` on the input embedding module's parameters, on top of the treatment.
    freeze_input_embeddings: bool = False
    #: The mode's own ``model.from_config`` settings over the recipe's (checked by `etf_hf.app.frontier`; a
    #: ``match`` writes the value it derives here).
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: An iso-cost match (`etf_hf.app.frontier.Match`): the size setting derived from another mode's cost.
    match: Any = None

    @property
    def kind(self) -> str:
        """``full``, or the treatment key the mode sets."""
        return next((key for key in TREATMENTS if getattr(self, key) is not None), "full")


def validate_modes(value: Any, has_labels: bool, model_type: str, training: dict[str, Any]) -> list[ModeSpec]:
    """Check ``modes:``. ``has_labels``: the task is a classification (LoRA trains its head; Adaptive-ETF
    needs classes); ``model_type`` picks LoRA's default targets; ``training`` is checked against Adaptive-ETF's
    ``every``."""
    expect(value, list, "modes", "a non-empty list of mappings with 'name' and at most one of " + ", ".join(TREATMENTS))
    if not value:
        raise ConfigError("modes must list at least one mode, e.g. [{name: full}, {name: etf, etf: {}}]")
    modes: list[ModeSpec] = []
    for i, mode in enumerate(value):
        where = f"modes[{i}]"
        expect(mode, dict, where, "a mapping with 'name' and at most one of " + ", ".join(TREATMENTS))
        reject_unknown(mode, ("name", "training", "freeze_input_embeddings", "model", "match", *TREATMENTS), where)
        name = expect(mode.get("name"), str, f"{where}.name", "a name made of letters, digits, '_', '-', '.'")
        if not _MODE_NAME.fullmatch(name) or name in {m.name for m in modes}:
            raise ConfigError(f"{where}.name {name!r} must be unique and made of letters, digits, '_', '-', '.'")
        treatments = [key for key in TREATMENTS if mode.get(key) is not None]
        if len(treatments) > 1:
            raise ConfigError(f"{where} sets {' and '.join(treatments)}; a mode takes at most one of "
                              f"{', '.join(TREATMENTS)} (make one mode for each)")
        spec = ModeSpec(name, training=_validate_mode_training(mode.get("training"), f"{where}.training"),
                        freeze_input_embeddings=_validate_freeze_embeddings(mode, where, treatments),
                        model=dict(expect(mode.get("model") or {}, dict, f"{where}.model",
                                          "a mapping of model.from_config settings for this mode")),
                        match=mode.get("match"))
        if treatments:
            key = treatments[0]
            settings = expect(mode[key], dict, f"{where}.{key}", "a mapping (may be empty: {})")
            setattr(spec, key, _VALIDATORS[key](settings, f"{where}.{key}", has_labels, model_type,
                                                {**training, **spec.training}))
        modes.append(spec)
    return modes


def _validate_mode_training(value: Any, where: str) -> dict[str, Any]:
    """A mode's ``training`` overrides; the keys and values are checked with the recipe's by `etf_hf.app.runner`.
    The seed is refused: every mode must start from the same weights and data order to be compared."""
    if value is None:
        return {}
    expect(value, dict, where, "a mapping of TrainingArguments fields that this mode uses instead of the recipe's")
    if "seed" in value or "data_seed" in value:
        raise ConfigError(f"{where} sets the seed; every mode of a run shares training.seed so that the modes start "
                          f"from the same weights and data order: run the recipe again with training.seed=N instead")
    return dict(value)


def _validate_freeze_embeddings(mode: dict[str, Any], where: str, treatments: list[str]) -> bool:
    freeze = mode.get("freeze_input_embeddings", False)
    expect(freeze, bool, f"{where}.freeze_input_embeddings", "true or false")
    if freeze and treatments == ["lora"]:
        raise ConfigError(f"{where}.freeze_input_embeddings: a LoRA mode already trains only its adapters (and the "
                          f"classifier head), so the embeddings are frozen; remove the key")
    return freeze


def _validate_etf(settings: dict[str, Any], where: str, has_labels: bool, *context: Any) -> Any:
    """Any ETFConfig field passes through (bases, controls, head, ...); ETFConfig itself validates the values."""
    from ..config import ETFConfig

    fields = [f.name for f in dataclasses.fields(ETFConfig) if f.name not in _ETF_RECORD_FIELDS]
    reject_unknown(settings, fields, where)
    try:
        config = ETFConfig(**settings)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from None
    if config.layers == "auto" and not has_labels:
        raise ConfigError(f"{where}.layers 'auto' picks blocks by nearest-class-mean accuracy on class labels, and "
                          f"this task has none: give layers ('all', 'last:N' or [i, ...])")
    return config


def _validate_frozen(settings: dict[str, Any], where: str, *context: Any) -> dict[str, Any]:
    reject_unknown(settings, SELECTION_KEYS, where)
    if settings.get("layers") == "auto":
        raise ConfigError(f"{where}.layers 'auto' is for etf modes (it places fixed frames); give 'all', 'last:N' "
                          f"or [i, ...]")
    config = _validate_etf(settings, where, False)
    return {key: getattr(config, key) for key in SELECTION_KEYS}


def _validate_lora(settings: dict[str, Any], where: str, has_labels: bool, model_type: str,
                   training: dict[str, Any]) -> dict[str, Any]:
    """LoraConfig kwargs with the defaults filled in; the config is built once to surface peft's own errors."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{where} needs the optional peft package: pip install 'etf_hf[peft]' (or pip install peft)")
    from peft import LoraConfig

    reject_unknown(settings, [f.name for f in dataclasses.fields(LoraConfig) if f.init], where,
                   "allowed keys are the fields of peft.LoraConfig")
    lora = lora_settings(model_type, has_labels, settings, where)
    try:
        LoraConfig(**lora)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: peft.LoraConfig rejected the settings: {error}") from None
    return lora


def lora_settings(model_type: str, has_labels: bool, settings: dict[str, Any] | None = None,
                  where: str = "lora") -> dict[str, Any]:
    """``settings`` (LoraConfig kwargs) over the defaults that `etf-hf train` and `etf-hf bench` share:
    rank `LORA_RANK`, alpha 2r, no dropout, the model type's attention projections, and (``has_labels``)
    the classifier heads trained, since they start random."""
    from ..architectures import HEAD_ATTRIBUTES, architecture_for, peft_targets

    settings = settings or {}
    rank = expect_positive_int(settings.get("r", LORA_RANK), f"{where}.r")
    defaults: dict[str, Any] = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0}
    model_type = model_type.removeprefix("etf_")  # a saved ETF checkpoint has its base type's attention
    architecture = architecture_for(model_type)
    if "target_modules" not in settings:
        targets = peft_targets(model_type)
        if targets is None:
            raise ConfigError(f"{where}.target_modules is required for model type {model_type!r} (neither etf_hf's "
                              f"architecture record nor peft knows its attention projections): name them, e.g. "
                              f"[q_proj, v_proj]")
        defaults["target_modules"] = targets
        defaults["fan_in_fan_out"] = architecture is not None and architecture.fan_in_fan_out
    if has_labels:  # a classifier starts random, so LoRA trains it; peft skips the names a model does not have
        defaults["modules_to_save"] = list(architecture.head if architecture else HEAD_ATTRIBUTES)
    return {**defaults, **settings}


def _validate_adaptive(settings: dict[str, Any], where: str, has_labels: bool, model_type: str,
                       training: dict[str, Any]) -> dict[str, Any]:
    """AdaptiveETFCallback kwargs plus ``probe_size``; the callback is built once to surface its own errors."""
    from ..adaptive import AdaptiveETFCallback

    if not has_labels:
        raise ConfigError(f"{where}: Adaptive-ETF locks blocks by nearest-class-mean accuracy, which needs class "
                          f"labels; this task has none")
    arguments = [name for name in inspect.signature(AdaptiveETFCallback).parameters if name != "probe"]
    reject_unknown(settings, [*arguments, "probe_size"], where)
    probe_size = expect_positive_int(settings.get("probe_size", PROBE_SIZE), f"{where}.probe_size")
    kwargs = {key: value for key, value in settings.items() if key != "probe_size"}
    try:
        callback = AdaptiveETFCallback(None, **kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: {error}") from None
    if callback.every == "eval" and training.get("eval_strategy", "no") == "no":
        raise ConfigError(f"{where}.every is 'eval' (the default), but training.eval_strategy is 'no': set "
                          f"{where}.every to 'epoch' or a number of steps, or set training.eval_strategy")
    return {**kwargs, "probe_size": probe_size}


_VALIDATORS: dict[str, Callable[..., Any]] = {"etf": _validate_etf, "frozen": _validate_frozen,
                                              "lora": _validate_lora, "adaptive": _validate_adaptive}


def check_modes_fit_model(modes: list[ModeSpec], skeleton: Callable[[ModeSpec], torch.nn.Module]) -> None:
    """Surface apply-time errors (``layers: last:9`` on a 4-block model, a LoRA target that matches nothing)
    now, not after the first mode trained. ``skeleton(mode)`` builds the mode's model (its own ``model``
    settings over the recipe's) on the meta device (structure only, no memory); modes of one model share
    it, and LoRA gets a fresh one, since peft rewrites the model it wraps."""
    from ..architectures import find_slots
    from ..config import ETFConfig
    from ..patch import resolve

    built: dict[str, torch.nn.Module] = {}

    def shared(mode: ModeSpec) -> torch.nn.Module:
        key = repr(sorted(mode.model.items()))
        if key not in built:
            built[key] = skeleton(mode)
        return built[key]

    for i, mode in enumerate(modes):
        if mode.freeze_input_embeddings:
            _embeddings_to_freeze(shared(mode), f"modes[{i}].freeze_input_embeddings")
        if mode.lora is not None:
            _lora_model(skeleton(mode), mode.lora, f"modes[{i}].lora")
            continue
        selection = {"etf": mode.etf, "frozen": mode.frozen and ETFConfig(**mode.frozen),
                     "adaptive": mode.adaptive and ETFConfig(basis=mode.adaptive.get("basis", "nearest"))}
        config = selection.get(mode.kind)
        if config is None or config.layers == "auto":  # auto: chosen from data at patch time
            continue
        model = shared(mode)
        try:
            slots = find_slots(model, resolve(model, config))
        except ValueError as error:
            raise ConfigError(f"modes[{i}].{mode.kind}: {error}") from None
        if not slots:
            raise ConfigError(f"modes[{i}].{mode.kind} selects no feed-forward projection of {type(model).__name__}")


def _lora_model(model: torch.nn.Module, settings: dict[str, Any], where: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(**settings))
    except (ValueError, TypeError) as error:  # NoMatchingPeftModuleError is a ValueError
        raise ConfigError(f"{where}: peft could not apply it to {type(model).__name__}: {error}") from None


def apply_mode(model: torch.nn.Module, mode: ModeSpec, **placement: Any) -> torch.nn.Module:
    """The mode's model from a freshly built one (in place, except LoRA, which returns peft's wrapper).

    ``placement``: `etf_hf.patch`'s ``data=`` and probe options, for an ``etf`` mode whose layers are chosen
    from data (see `placement_data`). Adaptive-ETF changes nothing here; its callback (`adaptive_callback`)
    locks blocks during training.
    """
    from ..architectures import find_slots
    from ..config import ETFConfig
    from ..patch import patch, resolve

    if mode.etf is not None:
        try:
            patch(model, mode.etf, **placement)
        except ValueError as error:  # e.g. a pretrained checkpoint already patched differently
            raise ConfigError(f"mode {mode.name!r}: etf_hf.patch refused its etf settings: {error}") from None
    elif mode.frozen is not None:
        for slot in find_slots(model, resolve(model, ETFConfig(**mode.frozen))):  # the blocks patch would fix
            getattr(slot.parent, slot.attribute).weight.requires_grad_(False)
    elif mode.lora is not None:
        return _lora_model(model, mode.lora, f"mode {mode.name!r}: lora")
    if mode.freeze_input_embeddings:
        for parameter in _embeddings_to_freeze(model, f"mode {mode.name!r}: freeze_input_embeddings").parameters():
            parameter.requires_grad_(False)
    return model


def override_config(config: Any, overrides: dict[str, Any], where: str) -> Any:
    """A new transformers config: ``config`` with ``overrides`` (``{"n_inner": 512}``, ``{"n_layer": 2}``) set, for
    dense baselines of another size. A key the config class does not define is refused, naming it: the model
    would store it and silently ignore it."""
    import difflib

    from huggingface_hub.errors import StrictDataclassError  # transformers 5 configs validate field types

    fields = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: {type(config).__name__} has no field {key!r}{hint}")
    try:
        return type(config)(**{**config.to_diff_dict(), **overrides})
    except (TypeError, ValueError, StrictDataclassError) as error:
        raise ConfigError(f"{where}: {type(config).__name__} refused {overrides}: {error}") from None


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model.get_input_embeddings()``, or None for a model without one (the paper's MLP)."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embeddings if isinstance(embeddings, torch.nn.Module) else None


def _embeddings_to_freeze(model: torch.nn.Module, where: str) -> torch.nn.Module:
    embeddings = input_embeddings(model)
    if embeddings is None:
        raise ConfigError(f"{where}: {type(model).__name__} has no input embeddings (get_input_embeddings()); "
                          f"remove the key for this model")
    return embeddings


def probe_subset(train: torch.utils.data.Dataset, size: int, seed: int) -> torch.utils.data.Dataset:
    """``size`` random training examples (`seeded_indices`): what NCC accuracy is measured on."""
    from .tasks import seeded_indices

    if size >= len(train):
        return train
    return torch.utils.data.Subset(train, seeded_indices(len(train), size, seed))


def placement_data(mode: ModeSpec, pretrained: bool, train: torch.utils.data.Dataset, num_classes: int,
                   collator: Callable | None, seed: int) -> dict[str, Any]:
    """`etf_hf.patch`'s data arguments for an ``etf`` mode, when its blocks are chosen from data: ``layers:
    auto``, or layers unset on a pretrained model (which `patch` then places by NCC instead of taking the
    second half). Empty otherwise, and for tasks without classes."""
    if mode.etf is None or num_classes == 0:
        return {}
    if mode.etf.layers != "auto" and not (mode.etf.layers is None and pretrained):
        return {}
    return {"data": probe_subset(train, PROBE_SIZE, seed), "num_classes": num_classes, "collate_fn": collator}


def adaptive_callback(mode: ModeSpec, train: torch.utils.data.Dataset, num_classes: int, seed: int) -> Any:
    """The mode's `AdaptiveETFCallback`, probing ``probe_size`` random training examples (the same ones at
    every check). Attach it to the trainer: ``callback.attach(trainer)``."""
    from ..adaptive import AdaptiveETFCallback

    settings = dict(mode.adaptive)
    probe = probe_subset(train, settings.pop("probe_size"), seed)
    settings.setdefault("num_classes", num_classes)
    return AdaptiveETFCallback(probe, **settings)
