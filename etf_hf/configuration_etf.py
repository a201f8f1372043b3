"""ETF config classes (``etf_<type>``), and model classes registered with the Auto classes on first use.

Kept apart from `modeling_etf` because a config is cheap and a model class is not: registering
``ETFGPT2Config`` with AutoConfig imports only ``configuration_gpt2``, while the model classes of every
Auto head import the architecture's modeling module. So ``import etf_hf`` registers the config types
(see `etf_hf.registration`), and the first ETF config *instance* registers its model classes — which
``AutoModel*.from_pretrained`` and ``from_config`` always build before they look a model class up.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import AutoConfig

_CONFIG_CLASSES: dict[type, type] = {}
_AUTO_REGISTERED: set[type] = set()


def etf_model_type(model_type: str) -> str:
    return model_type if model_type.startswith("etf_") else f"etf_{model_type}"


def register_auto_models(config_class: type) -> None:
    """Register the model classes of ``config_class`` (and of the configs it derives from) once.

    Each class along the MRO that defines ``auto_registration = (module, function)`` names the function
    that registers its models. Remote code that inlines such a config (the paper's MLP) skips this
    (``_SELF_CONTAINED``): its footer defines the classes and transformers maps them through ``auto_map``.
    """
    if globals().get("_SELF_CONTAINED"):
        return
    for cls in reversed(config_class.__mro__):
        if cls in _AUTO_REGISTERED or "auto_registration" not in vars(cls):
            continue
        _AUTO_REGISTERED.add(cls)
        module, function = cls.auto_registration
        getattr(importlib.import_module(module), function)(cls)


class AutoRegisteredConfig:
    """Config mixin: building the first instance of a class registers its model classes (see module docstring)."""

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        register_auto_models(type(self))


def etf_config_class(vanilla: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """The ``etf_<type>`` config subclass of a vanilla config class, registered with AutoConfig."""
    if getattr(vanilla, "etf_vanilla_class", None) is not None:
        return vanilla
    if vanilla not in _CONFIG_CLASSES:
        name = f"ETF{vanilla.__name__}"
        bases = (vanilla,) if issubclass(vanilla, AutoRegisteredConfig) else (AutoRegisteredConfig, vanilla)
        cls = type(name, bases, {
            "model_type": etf_model_type(vanilla.model_type),
            "etf_vanilla_class": vanilla,
            "auto_registration": ("etf_hf.modeling_etf", "register_model_classes"),
            "__module__": __name__,
            "__doc__": f"{vanilla.__name__} of a model patched by etf_hf; `config.etf` says how.",
        })
        setattr(sys.modules[__name__], name, cls)  # pickles by name
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
        _CONFIG_CLASSES[vanilla] = cls
    return _CONFIG_CLASSES[vanilla]


def __getattr__(name: str) -> type:
    """Config classes by name (unpickling), made on demand like their registration."""
    if name.startswith("ETF"):
        from .registration import make_announced_types

        make_announced_types()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
