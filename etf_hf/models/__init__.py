"""Model architectures shipped with etf_hf (for reproducing the paper), registered with the Auto classes.

Loaded on attribute access: `etf_hf.registration` imports the config module while transformers is
still importing itself, when the model module (which needs ``PreTrainedModel``) cannot be imported yet.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"CollapseMLPConfig": "configuration_mlp", "CollapseMLPBlock": "mlp", "CollapseMLPPreTrainedModel": "mlp",
            "MLPForImageClassification": "mlp", "register_auto_classes": "mlp"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
