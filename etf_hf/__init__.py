"""etf_hf: fix transformer feed-forward layers to simplex equiangular tight frames (arXiv 2412.00884).

Importing the package registers the ETF model types (``etf_gpt2``, ``etf_bert``, ...) with the
transformers Auto classes, so patched checkpoints load with ``AutoModelFor*.from_pretrained``. The import
itself is cheap: the registration waits for transformers' AutoConfig (`etf_hf.registration`), and every
name below is imported on first access, so ``etf-hf --help`` never imports torch.
"""
from __future__ import annotations

import importlib
import sys
import types

from .registration import register_when_transformers_loads

__version__ = "0.1.0"

#: public name -> the module (under etf_hf) that defines it
_EXPORTS = {
    "FORMAT_VERSION": "config", "ETFConfig": "config", "CONTROL_BASES": "controls", "BASES": "etf",
    "simplex_etf": "etf", "ETFLinear": "layers", "register_model_type": "modeling_etf",
    "CollapseMLPConfig": "models", "MLPForImageClassification": "models", "etf_layers": "injection",
    "parameter_summary": "injection", "DotRegressionLoss": "head", "ETFClassifier": "head",
    "dot_regression_loss": "head", "Placement": "placement", "suggest_layers": "placement",
    "lock_blocks": "patch", "materialize": "patch", "patch": "patch", "print_trainable_parameters": "patch",
    "resolve": "patch",
    "CollapseReport": "collapse", "collapse_report": "collapse", "plot_collapse": "collapse",
    "CollapseMetrics": "trainer_metrics", "AdaptiveETFCallback": "adaptive", "keep_etf_card": "trainer_hub",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """``etf_hf.patch`` is the function: importing the ``etf_hf.patch`` submodule (which Python binds as an
    attribute of the package) must not replace it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
register_when_transformers_loads()
