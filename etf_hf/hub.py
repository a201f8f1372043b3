"""What an ETF checkpoint carries besides weights: self-contained remote code and a model card.

The remote code lets ``AutoModelFor*.from_pretrained(dir, trust_remote_code=True)`` rebuild the model in
a process without etf_hf. It is *generated* from this package's own modules, so it can never drift from
the library: the top-level definitions the footer's classes reach (by name, transitively) are copied from
`SOURCE_MODULES`, in order, without docstrings, comments or relative imports; the rest of the library
(placement, collapse metrics, training callbacks, ...) stays out. Those modules therefore import only
torch, transformers, huggingface_hub and the standard library at top level.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import ETFConfig
from .controls import CONTROL_BASES
from .injection import parameter_summary

REMOTE_CODE_FILE = "modeling_etf_hf.py"
#: Vanilla classes defined in this package are inlined into the remote code, not imported.
_PACKAGE = "etf_hf"
#: Modules (under etf_hf/) whose definitions the remote code may copy, in dependency order: a module that
#: defines a name another uses at import time (a base class, a constant) comes first. A new module that
#: loading needs (a new layer type) is added here; only what the footer reaches is copied from it.
SOURCE_MODULES = ("etf", "controls", "config", "layers", "architectures", "ffn", "head", "injection", "configuration_etf",
                  "hub", "modeling_etf")
_FOOTER_MARKER = "# ---- etf_hf remote-code footer: the classes this checkpoint needs ----"
#: Code that only some checkpoints run, by the feature of ``config.etf`` that runs it (see `_features`):
#: the names through which the rest of the library enters it. A checkpoint's remote code leaves out the
#: code of the features its config does not use (and whatever only that code reaches); a name left out but
#: still named by code kept (the structured branch of `ETFLinear`, never taken by an orthogonal layer) is
#: bound to a `_LeftOut`, which fails with a clear message if it is ever used. A new entry point into one
#: of these features is added here; the remote-code tests of that feature fail until it is.
OPTIONAL_CODE = {
    "structured": ("_StructuredFrameLinear", "StructuredOperator", "StructuredPlan", "structured_apply",
                   "structured_apply_t", "structured_dense", "structured_operator", "structured_operator_layout",
                   "structured_operator_sizes", "structured_plan", "structured_rows_apply", "structured_rows_apply_t",
                   "_structured", "_row_plan", "_row_forward"),
    "controls": ("control_frame",),
    "head": ("ETFClassifier",),
}
#: The model card's ETF section lies between these markers (a later save replaces it).
_SECTION_START = "<!-- etf_hf: start of the generated ETF section -->"
_SECTION_END = "<!-- etf_hf: end of the generated ETF section -->"
#: Hub tags of every ETF model (``model.add_model_tags``, so a Trainer's card carries them too).
MODEL_TAGS = ("etf", "neural-collapse", "etf_hf")


def _defined_names(statement: ast.stmt) -> set[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
    return {node.id for target in targets if target is not None for node in ast.walk(target) if isinstance(node, ast.Name)}


def _used_names(statement: ast.stmt) -> set[str]:
    return {node.id for node in ast.walk(statement) if isinstance(node, ast.Name)}


def _without_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        node.body = node.body[1:] or [ast.Pass()]


def _for_remote_code(statement: ast.stmt) -> ast.stmt:
    """What the generated file does not need: docstrings and function annotations (``from __future__ import
    annotations`` keeps them unevaluated anyway; dataclass fields keep theirs, module constants lose
    theirs). Only top-level definitions and their methods are edited."""
    if isinstance(statement, ast.AnnAssign) and statement.value is not None:
        return ast.Assign(targets=[statement.target], value=statement.value, lineno=statement.lineno)
    functions = [statement] if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
    if isinstance(statement, ast.ClassDef):
        _without_docstring(statement)
        functions = [item for item in statement.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions:
        function.returns = None
        arguments = function.args
        for argument in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg):
            if argument is not None:
                argument.annotation = None
        _without_docstring(function)
    return statement


def _module_statements(relative_path: str) -> list[ast.stmt]:
    """The top-level statements of one package module as the remote code holds them (`_for_remote_code`),
    less the module docstring, relative imports and ``from __future__`` (the generated file has its own)."""
    tree = ast.parse((Path(__file__).resolve().parent / relative_path).read_text(), filename=relative_path)
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    return [_for_remote_code(statement) for statement in body
            if not (isinstance(statement, ast.ImportFrom) and (statement.level or statement.module == "__future__"))]


def _reachable(statements: list[ast.stmt], roots: set[str], left_out: frozenset[str] = frozenset()) -> list[ast.stmt]:
    """The statements defining ``roots`` and, transitively, every name they use (original order kept),
    except the definitions of ``left_out`` names.

    Statements that define nothing (a bare call) are kept whole; an import keeps only the names used.
    """
    definers: dict[str, list[int]] = {}
    for index, statement in enumerate(statements):
        for name in _defined_names(statement) - left_out:
            definers.setdefault(name, []).append(index)
    kept = {index for index, statement in enumerate(statements) if not _defined_names(statement)}
    needed = set(roots).union(*(_used_names(statements[index]) for index in kept))
    todo = list(needed)
    while todo:
        for index in definers.get(todo.pop(), ()):
            if index in kept:
                continue
            kept.add(index)
            statement = statements[index]
            if isinstance(statement, (ast.Import, ast.ImportFrom)):
                continue
            for name in _used_names(statement) - needed:
                needed.add(name)
                todo.append(name)
    result = []
    for index in sorted(kept):
        statement = statements[index]
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            names = [alias for alias in statement.names if (alias.asname or alias.name).split(".")[0] in needed]
            if not names:
                continue
            statement = type(statement)(**{**vars(statement), "names": names})
        result.append(statement)
    return result


class _LeftOut:
    """Stands in the remote code for a name of a feature the checkpoint does not use (see `OPTIONAL_CODE`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} is not in this checkpoint's remote code, because its config.etf does not "
                           f"use it; with etf_hf installed (pip install etf_hf; import etf_hf) it is available")

    def __getattr__(self, attribute: str):
        self()


def _features(etf: dict) -> frozenset[str]:
    """The `OPTIONAL_CODE` features a checkpoint's ``config.etf`` uses."""
    bases = {etf["basis"], etf["head_basis"]}
    return frozenset(feature for feature, used in (("structured", "structured" in bases),
                                                   ("controls", bool(bases & set(CONTROL_BASES))),
                                                   ("head", etf["head"])) if used)


@functools.cache
def _generated_library(own_modules: tuple[str, ...], roots: frozenset[str], features: frozenset[str]) -> str:
    """The generated file up to the footer: what ``roots`` reach in `SOURCE_MODULES` and ``own_modules``
    (dotted etf_hf module names defining the vanilla classes, inlined because the loading process need
    not have etf_hf), less the `OPTIONAL_CODE` of features not in ``features``."""
    statements = [statement for name in SOURCE_MODULES for statement in _module_statements(f"{name}.py")]
    for module in own_modules:
        statements += _module_statements("/".join(module.split(".")[1:]) + ".py")
    left_out = frozenset(name for feature, names in OPTIONAL_CODE.items() if feature not in features for name in names)
    kept = _reachable(statements, set(roots), left_out)
    stand_ins = sorted(left_out & set().union(*(_used_names(statement) for statement in kept)))
    if stand_ins:
        kept = _reachable(statements, {*roots, "_LeftOut"}, left_out)
    lines = ["from __future__ import annotations",
             '"""Self-contained etf_hf modeling code (generated by etf_hf); needs only torch and transformers."""']
    seen: dict[str, str] = {}
    for statement in kept:
        source = ast.unparse(statement)
        for name in _defined_names(statement) - {"logger"}:
            if seen.setdefault(name, source) != source and not isinstance(statement, (ast.Import, ast.ImportFrom)):
                raise RuntimeError(f"{name!r} is defined twice in the remote-code modules; rename one")
        if source not in lines:
            lines.append(source)
    lines += [f"{name} = _LeftOut({name!r})" for name in stand_ins]
    return "\n".join(lines) + "\n"


def etf_class_name(model) -> str:
    """The name of ``model``'s ETF class (``ETFGPT2LMHeadModel``), also when a wrapper subclassed it:
    torch's ``fully_shard`` swaps the class for a generated ``FSDP<name>`` subclass. Checkpoint metadata
    (``auto_map``, the remote code, the card) must name the class that defines ``etf_vanilla_class``, as
    transformers' ``config.architectures`` does, not a class that exists only in the training process."""
    return next(cls for cls in type(model).__mro__ if "etf_vanilla_class" in vars(cls)).__name__


def remote_code_source(model) -> str:
    """The remote-code module for ``model``'s class: what loading needs from the library (`ETFModelBase`
    and what it reaches), then the two classes ``auto_map`` names.

    A vanilla class from transformers is imported in the footer. One that etf_hf defines itself (the
    paper's MLP, ``etf_hf.models.mlp``) cannot be: its module is inlined into the library part instead,
    so the file still needs only torch and transformers.
    """
    vanilla_model = model.etf_vanilla_class
    vanilla_config = type(model.config).etf_vanilla_class
    own_modules: list[str] = []
    footer = [_FOOTER_MARKER]
    for vanilla in (vanilla_config, vanilla_model):
        module = vanilla.__module__
        if module.split(".")[0] != _PACKAGE:
            footer.append(f"from {module} import {vanilla.__name__}")
        elif module not in own_modules:
            own_modules.append(module)
    config_class = type(model.config).__name__
    footer += [
        "_SELF_CONTAINED = True",  # an inlined etf_hf config (the MLP's) registers no classes: auto_map does
        f"class {config_class}({vanilla_config.__name__}):",
        f"    model_type = {type(model.config).model_type!r}",
        f"    etf_vanilla_class = {vanilla_config.__name__}",
        f"class {etf_class_name(model)}(ETFModelBase, {vanilla_model.__name__}):",
        f"    config_class = {config_class}",
        f"    etf_vanilla_class = {vanilla_model.__name__}",
    ]
    roots = {"ETFModelBase", vanilla_config.__name__, vanilla_model.__name__}
    library = _generated_library(tuple(own_modules), frozenset(roots), _features(model.config.etf))
    return library + "\n".join(footer) + "\n"


@functools.cache
def auto_classes() -> tuple[type, ...]:
    """transformers' ``AutoModel*`` classes, read from the module that defines them (``dir(transformers)``
    costs ~0.2 s a call, and any other attribute of the lazy transformers package would import that part of it)."""
    from transformers.models.auto import modeling_auto

    return tuple(value for name, value in vars(modeling_auto).items()
                 if name.startswith("AutoModel") and isinstance(value, type) and hasattr(value, "_model_mapping"))


def auto_map(model) -> dict[str, str]:
    """``config.auto_map`` entries: AutoConfig and every Auto class that maps to the model's vanilla class."""
    return dict(_auto_map(type(model.config), etf_class_name(model), model.etf_vanilla_class))


@functools.cache
def _auto_map(config_class: type, model_class_name: str, vanilla_model: type) -> tuple[tuple[str, str], ...]:
    module = REMOTE_CODE_FILE.removesuffix(".py")
    entries = [("AutoConfig", f"{module}.{config_class.__name__}")]
    for auto_class in auto_classes():
        try:
            if auto_class._model_mapping[config_class.etf_vanilla_class] is vanilla_model:
                entries.append((auto_class.__name__, f"{module}.{model_class_name}"))
        except (KeyError, ValueError):
            continue
    return tuple(entries)


#: Auto classes that map many task models (GPT-2's LM head model is also its "pre-training" model): a card
#: names them only when no task-specific Auto class maps the model.
_GENERIC_AUTO_CLASSES = ("AutoModelForPreTraining", "AutoModelWithLMHead", "AutoModel")


def _task_auto_class(entries: dict[str, str]) -> str:
    """The Auto class a card's loading code names: the task's own (``AutoModelForCausalLM`` for
    ``GPT2LMHeadModel``, not ``AutoModelForPreTraining``, which happens to map it too)."""
    names = [name for name in entries if name != "AutoConfig"]
    specific = [name for name in names if name not in _GENERIC_AUTO_CLASSES]
    generic = [name for name in _GENERIC_AUTO_CLASSES if name in names]
    return (specific or generic or ["AutoModel"])[0]


def _hub_model_id(name_or_path: str) -> str | None:
    """``config._name_or_path`` when it names a Hub repo rather than a local folder."""
    if not name_or_path or os.path.isdir(name_or_path) or name_or_path.startswith((".", "/")):
        return None
    return name_or_path if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) else None


def _etf_section(model, base_model: str | list[str] | None, repo_id: str | None = None) -> str:
    """The card's ETF part (between `_SECTION_START` and `_SECTION_END`): config, parameter counts, how to load
    (from ``repo_id`` when known)."""
    where = json.dumps(repo_id) if repo_id else '"REPO_OR_FOLDER"'
    etf = ETFConfig.from_dict(model.config.etf)
    summary = parameter_summary(model)
    auto_class = _task_auto_class(auto_map(model))
    share = 100 * summary["trainable"] / summary["total"]
    vanilla = model.etf_vanilla_class.__name__
    return f"""{_SECTION_START}
## Fixed simplex-ETF feed-forward layers (etf_hf)

A `{vanilla}` whose feed-forward projections are fixed **simplex equiangular tight frames** (ETFs), made
with [etf_hf](https://arxiv.org/abs/2412.00884) ("Leveraging Intermediate Neural Collapse with Simplex ETFs").
Fixed frames are not trained; each ETF layer keeps a trainable gain and bias.
{_base_model_line(base_model)}

| | parameters |
|---|---|
| trainable | {summary['trainable']:,} ({share:.1f} %) |
| total (ETF frames included) | {summary['total']:,} |
| ETF-fixed | {summary['etf_fixed']:,} |

Basis: `{etf.basis}`{' (a control: these weights are fixed but are not ETFs)' if etf.basis in CONTROL_BASES else ''} · layers: `{etf.layers}` · projections: `{etf.projections}` · storage: `{etf.storage}`

```json
{json.dumps(etf.to_dict(), indent=2)}
```

### Load it

With the plugin (`pip install etf_hf`):

```python
import etf_hf  # registers the etf_* model types
from transformers import {auto_class}
model = {auto_class}.from_pretrained({where})
```

Without the plugin (the checkpoint ships `{REMOTE_CODE_FILE}`, which needs only torch and transformers):

```python
from transformers import {auto_class}
model = {auto_class}.from_pretrained({where}, trust_remote_code=True)
```

A plain `{vanilla}` (for serving or export) is one call away:
`etf_hf.materialize(model)` writes each frame times its gain back into ordinary dense layers.
{_SECTION_END}"""


def _base_model_line(base_model: str | list[str] | None) -> str:
    if not base_model:
        return ""
    names = [base_model] if isinstance(base_model, str) else base_model
    return f"Base model: {', '.join(f'`{name}`' for name in names)}."


def model_card(model, base_model: str | None = None, existing: str | None = None,
               repo_id: str | None = None) -> ModelCard:
    """README.md for the Hub: ``existing`` (a card already in the folder, e.g. the one
    ``Trainer.create_model_card`` writes) with the ETF tags and section added, or a new card.

    The section sits between HTML-comment markers, so a later save replaces it instead of adding a second
    one; everything else in ``existing`` (its text, license, model-index, ...) is kept. ``base_model``, when
    given, is written into the metadata and the section; without it the card's own ``base_model`` stands
    (a Trainer writes its ``finetuned_from`` there), else where the model was loaded from, if a Hub id.
    ``repo_id``: the Hub repo the card is uploaded to, named in the loading code.
    """
    if existing is not None:
        card = ModelCard(existing)
        data, text = card.data, card.text
    else:
        data, text = ModelCardData(), f"# {etf_class_name(model)}\n"
    data.library_name = data.library_name or "transformers"
    data.tags = [*(data.tags or []), *(tag for tag in MODEL_TAGS if tag not in (data.tags or []))]
    data.base_model = base_model or data.base_model or _hub_model_id(getattr(model.config, "_name_or_path", ""))
    before, start, rest = text.partition(_SECTION_START)
    after = rest.partition(_SECTION_END)[2] if start else ""
    text = f"{before.rstrip()}\n\n{_etf_section(model, data.base_model, repo_id)}\n{after.lstrip()}"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip()}")


def write_model_card(model, directory: str | os.PathLike, base_model: str | None = None,
                     repo_id: str | None = None) -> None:
    """Write ``directory``/README.md: a new card, or the ETF section added to the card already there (a
    Trainer's, or the user's own)."""
    card = Path(directory) / "README.md"
    existing = card.read_text(encoding="utf-8") if card.exists() else None
    card.write_text(str(model_card(model, base_model, existing, repo_id)), encoding="utf-8")


def write_hub_files(model, save_directory: str | os.PathLike, base_model: str | None = None,
                    repo_id: str | None = None) -> None:
    """Write the remote-code module and the model card (`write_model_card`)."""
    (Path(save_directory) / REMOTE_CODE_FILE).write_text(remote_code_source(model))
    write_model_card(model, save_directory, base_model, repo_id)
