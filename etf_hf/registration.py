"""``import etf_hf`` makes ``etf_*`` checkpoints loadable through the Auto classes without importing torch.

Registering a config class needs the vanilla config class (``GPT2Config``), and importing any of them
imports torch and transformers' Auto machinery (seconds): ``etf-hf --help``, or a user who only wants
`etf_hf.ETFConfig`, should not pay that. So ``import etf_hf`` only *announces* the ``etf_<type>`` names
to AutoConfig's registry, and each class is made on the first lookup of its name (by
``AutoConfig.from_pretrained``, ``for_model``, ...). The announcement needs transformers'
``configuration_auto``: it is made at once when that module is already imported, otherwise right after
transformers imports it (a one-shot import hook; nothing is imported from there, because transformers
may be half-way through importing itself). Model classes follow on first use (`etf_hf.configuration_etf`).

The lazy names live in AutoConfig's ``CONFIG_MAPPING._extra_content``, the dict that
``AutoConfig.register`` writes to and that every lookup reads (transformers 5.17-5.24; tests/test_loading.py
checks the Auto paths).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Iterator
from importlib.machinery import ModuleSpec
from types import ModuleType

AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
#: config types etf_hf defines itself: model type -> (module, config class)
OWN_CONFIG_TYPES = {"collapse_mlp": ("etf_hf.models.configuration_mlp", "CollapseMLPConfig")}


def announced_types() -> dict[str, Callable[[], type]]:
    """``collapse_mlp`` and ``etf_<type>`` for every registry architecture, each with its class maker."""
    from .architectures import REGISTRY

    types = {model_type: _own_config(*where) for model_type, where in OWN_CONFIG_TYPES.items()}
    for architecture in REGISTRY:
        types.update({f"etf_{model_type}": _etf_config(model_type) for model_type in architecture.model_types})
    return types


class LazyConfigTypes(dict):
    """AutoConfig's dict of registered config classes, plus names whose class is made on first lookup.

    ``announce()`` returns, on the first lookup (not earlier: it imports the architecture registry, and
    the dict is installed while transformers may be half-way through importing itself), each announced
    model type with a function that makes its class and registers it (``AutoConfig.register`` stores it
    here as a plain entry).
    """

    def __init__(self, registered: dict, announce: Callable[[], dict[str, Callable[[], type]]]) -> None:
        super().__init__(registered)
        self.announce = announce
        self._pending: dict[str, Callable[[], type]] | None = None

    @property
    def pending(self) -> dict[str, Callable[[], type]]:
        if self._pending is None:
            self._pending = {key: make for key, make in self.announce().items() if not dict.__contains__(self, key)}
        return self._pending

    def _make(self, key: str) -> None:
        make = self.pending.pop(key, None)
        if make is not None:
            cls = make()
            dict.__setitem__(self, key, cls)

    def make_all(self) -> None:
        for key in list(self.pending):
            self._make(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or key in self.pending

    def __getitem__(self, key: str) -> type:
        self._make(key)
        return dict.__getitem__(self, key)

    def get(self, key: str, default: object = None) -> object:
        return self[key] if key in self else default

    def __iter__(self) -> Iterator[str]:
        self.make_all()
        return dict.__iter__(self)

    def keys(self):
        self.make_all()
        return dict.keys(self)

    def values(self):
        self.make_all()
        return dict.values(self)

    def items(self):
        self.make_all()
        return dict.items(self)


def _own_config(module: str, name: str) -> Callable[[], type]:
    def make() -> type:
        from transformers.models.auto.configuration_auto import AutoConfig

        cls = getattr(importlib.import_module(module), name)
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
        return cls
    return make


def _etf_config(vanilla_type: str) -> Callable[[], type]:
    def make() -> type:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from .configuration_etf import etf_config_class

        return etf_config_class(CONFIG_MAPPING[vanilla_type])
    return make


def announce_config_types() -> None:
    """Put `LazyConfigTypes` in place of AutoConfig's registered-config dict (keeping what it holds)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(CONFIG_MAPPING._extra_content, LazyConfigTypes):
        CONFIG_MAPPING._extra_content = LazyConfigTypes(CONFIG_MAPPING._extra_content, announced_types)


def make_announced_types() -> None:
    """Make every announced class now (unpickling a class by name needs it to exist)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    announce_config_types()
    CONFIG_MAPPING._extra_content.make_all()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after the module ``name`` has executed (wherever it is imported from)."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module
        callback = self.callback

        def exec_module(module: ModuleType) -> None:
            execute(module)
            callback()

        spec.loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    if AUTO_CONFIG_MODULE in sys.modules:
        announce_config_types()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(AUTO_CONFIG_MODULE, announce_config_types))
