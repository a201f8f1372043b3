"""The two floors: the library (etf_hf/*.py, etf_hf/models) never imports the application (etf_hf/app)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "etf_hf"


def _imported_modules(path: Path, top_level_only: bool = False) -> list[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, made absolute (etf_hf.x.y);
    with ``top_level_only``, only those that run when the module is imported (none inside a def/class)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    roots = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nodes = [node for root in roots for node in ast.walk(root)] if top_level_only else ast.walk(tree)
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_application():
    # __main__.py is ``python -m etf_hf``, the command: an application entry point, not library code.
    library = [p for p in PACKAGE.rglob("*.py")
               if "app" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]
    assert len(library) > 10
    offenders = {str(p.relative_to(PACKAGE)): name for p in library for name in _imported_modules(p)
                 if name == "etf_hf.app" or name.startswith("etf_hf.app.")}
    assert offenders == {}


def test_the_import_scan_sees_relative_imports_of_the_application():
    """The scan above would pass vacuously if it misread relative imports: check it on the application itself."""
    names = _imported_modules(PACKAGE / "app" / "cli.py")
    assert any(name.startswith("etf_hf.app.") for name in names)
    assert "etf_hf.app.runner" in names or any(n.startswith("etf_hf.app.runner") for n in names)


HEAVY = ("torch", "transformers", "numpy", "matplotlib", "peft", "datasets", "accelerate", "sklearn", "scipy")


def _module_path(name: str) -> Path | None:
    parts = name.split(".")[1:]
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return PACKAGE / "__init__.py" if not parts else None


def test_the_command_line_parses_before_importing_torch():
    """``etf-hf --help`` and a missing recipe must not import torch or transformers (seconds): follow the
    imports that run at import time from the CLI module and the package __init__ files above it."""
    todo, seen, heavy = ["etf_hf", "etf_hf.app", "etf_hf.app.cli"], set(), {}
    while todo:
        name = todo.pop()
        path = _module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in _imported_modules(path, top_level_only=True):
            if imported.split(".")[0] in HEAVY:
                heavy[name] = imported
            elif imported.startswith("etf_hf"):
                todo.append(imported)
    assert "etf_hf.app.recipe" in seen and "etf_hf.registration" in seen  # the scan follows the real imports
    assert heavy == {}
