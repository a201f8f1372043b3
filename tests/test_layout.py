"""The two floors: the library (etf_hf/*.py, etf_hf/models) never imports the application (etf_hf/app)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "etf_hf"


def _imported_modules(path: Path) -> list[str]:
    """Every module an ``import`` or ``from ... import`` in ``path`` names, made absolute (etf_hf.x.y)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
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
