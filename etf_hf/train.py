"""`etf-hf train`: a small YAML recipe -> the same model trained in several modes with `transformers.Trainer`.

The point of the command is a fair side-by-side: every mode starts from the same initial weights, sees
the same data in the same order and uses the same `TrainingArguments`; the only difference is whether
(and how) `etf_hf.patch` fixed the feed-forward projections. The run folder then holds what is needed
to judge the result: ``metrics.json``, ``config.yaml`` (the resolved recipe), PNG plots of the training
loss (and of test accuracy when the recipe evaluates during training), and each mode's trained model.

A recipe has these top-level keys (see ``configs/quickstart.yaml``)::

    task: image-classification
    model: {from_config: {model_type: vit, ...}}  # or {pretrained: path}
    data: {source: sklearn_digits, test_fraction: 0.2, seed: 0}
    modes: [{name: full, etf: null}, {name: etf, etf: {basis: orthogonal}}]
    training: {...}                               # passed through to TrainingArguments
    output_dir: null                              # default runs/<config-name>-<timestamp>
    torch_threads: 1                              # optional; null keeps torch's default

Mistakes raise `ConfigError` naming the key (``training.lerning_rate``, ``modes[1].etf.basis``), before
any training starts, so a typo never costs a finished baseline run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from huggingface_hub.errors import StrictDataclassError

#: The recipe `etf-hf train` runs when given no file; shipped inside the package so a plain
#: ``pip install`` has it. The top-level ``configs/quickstart.yaml`` is the same file (a test keeps them equal).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"

TOP_LEVEL_KEYS = ("task", "model", "data", "modes", "training", "output_dir", "torch_threads")
REQUIRED_KEYS = ("task", "model", "data", "modes", "training")
_MODE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: Model config keys the data decides; letting a recipe set them could only make them disagree.
_DATA_DEFINED_KEYS = ("num_labels", "id2label", "label2id")


class ConfigError(ValueError):
    """A recipe problem the user can fix; the CLI prints the message (which names the key) without a traceback."""


# --------------------------------------------------------------------------------------------------
# Loading and key=value overrides
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


# --------------------------------------------------------------------------------------------------
# Validation: the raw mapping -> a RunSpec, with every error naming its key
# --------------------------------------------------------------------------------------------------


@dataclass
class ModeSpec:
    name: str
    etf: Any  # ETFConfig | None; typed loosely to keep this module importable without etf_hf's core


@dataclass
class RunSpec:
    """A validated recipe. ``raw`` is kept verbatim for the run folder's ``config.yaml``."""

    name: str
    task: str
    model: dict[str, Any]
    data: dict[str, Any]
    modes: list[ModeSpec]
    training: dict[str, Any]
    output_dir: Path | None
    torch_threads: int | None
    raw: dict[str, Any]


def _expect(value: Any, kinds: type | tuple[type, ...], key: str, what: str) -> Any:
    """Type check that names the key and the expected form (bools are not ints here)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    is_bool_for_number = isinstance(value, bool) and bool not in kinds
    if not isinstance(value, kinds) or is_bool_for_number:
        raise ConfigError(f"{key} must be {what}, got {type(value).__name__} {value!r}")
    return value


def _reject_unknown(mapping: dict[str, Any], allowed: tuple[str, ...] | list[str], where: str,
                    allowed_text: str | None = None) -> None:
    """Unknown keys are errors, not warnings: a misspelt key would otherwise silently keep its default."""
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            prefix = f"{where}." if where else ""
            listing = allowed_text or f"allowed keys{' in ' + where if where else ''}: {', '.join(allowed)}"
            raise ConfigError(f"unknown key {prefix}{key}{hint}; {listing}")


def validate(raw: dict[str, Any], name: str = "config") -> RunSpec:
    """Check the whole recipe before anything is built or trained."""
    _reject_unknown(raw, TOP_LEVEL_KEYS, "")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}; a recipe needs {', '.join(REQUIRED_KEYS)}")
    task = _validate_task(raw["task"])
    data = _validate_data(raw["data"], task)
    output_dir = raw.get("output_dir")
    if output_dir is not None:
        output_dir = Path(_expect(output_dir, str, "output_dir", "a folder path (string) or null"))
    threads = raw.get("torch_threads")
    if threads is not None and (_expect(threads, int, "torch_threads", "a positive integer or null") < 1):
        raise ConfigError(f"torch_threads must be a positive integer or null, got {threads}")
    spec = RunSpec(
        name=name, task=task.name, model=_validate_model(raw["model"], task.sources[data["source"]].input_facts),
        data=data, modes=_validate_modes(raw["modes"]), training=_validate_training(raw["training"]),
        output_dir=output_dir, torch_threads=threads, raw=raw,
    )
    _check_modes_fit_model(spec)
    return spec


def _validate_task(value: Any) -> Task:
    _expect(value, str, "task", f"one of {', '.join(TASKS)}")
    if value not in TASKS:
        raise ConfigError(f"task {value!r} is not supported; supported tasks: {', '.join(TASKS)}")
    return TASKS[value]


def _validate_model(value: Any, input_facts: dict[str, int]) -> dict[str, Any]:
    """Check the model section, loading only configs (never weights), and that it fits the data's inputs."""
    _expect(value, dict, "model", "a mapping with 'from_config' or 'pretrained'")
    _reject_unknown(value, ("from_config", "pretrained"), "model")
    if len(value) != 1:
        raise ConfigError("model needs exactly one of model.from_config (build from a config) or model.pretrained (a path)")
    if "pretrained" in value:
        _validate_pretrained(value["pretrained"], input_facts)
    else:
        _validate_from_config(value["from_config"], input_facts)
    return value


def _validate_pretrained(path: Any, input_facts: dict[str, int]) -> None:
    from transformers import AutoConfig

    _expect(path, str, "model.pretrained", "a model folder path (string)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained {path!r} could not be loaded: {error}") from None
    _check_input_facts(config, input_facts, "model.pretrained")


def _validate_from_config(kwargs: Any, input_facts: dict[str, int]) -> None:
    """Every key must be a setting of the model type's config: transformers would silently keep a typo."""
    from transformers import AutoConfig

    _expect(kwargs, dict, "model.from_config", "a mapping with model_type and config kwargs")
    model_type = _expect(kwargs.get("model_type"), str, "model.from_config.model_type",
                         "a transformers model type such as 'vit'")
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError:
        raise ConfigError(f"model.from_config.model_type {model_type!r} is not a transformers model type "
                          f"(e.g. vit, bert, gpt2)") from None
    for key in kwargs:
        if key in _DATA_DEFINED_KEYS:
            raise ConfigError(f"model.from_config.{key} is set from the data's labels; remove it")
        if key != "model_type" and not hasattr(defaults, key):
            raise ConfigError(f"unknown key model.from_config.{key}: {type(defaults).__name__} has no such setting")
    try:
        config = AutoConfig.for_model(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConfigError(f"model.from_config: {type(defaults).__name__} rejected the settings: {error}") from None
    _check_input_facts(config, input_facts, "model.from_config")


def _check_input_facts(config: Any, facts: dict[str, int], where: str) -> None:
    """The model must accept what the data source produces (e.g. 8x8 single-channel images)."""
    for key, wanted in facts.items():
        have = getattr(config, key, wanted)
        values = set(have) if isinstance(have, (list, tuple)) else {have}  # image_size may be [8, 8]
        if values != {wanted}:
            raise ConfigError(f"{where}.{key} is {have!r}, but data.source gives {key}={wanted}")


def _validate_data(value: Any, task: Task) -> dict[str, Any]:
    _expect(value, dict, "data", "a mapping with 'source'")
    _reject_unknown(value, ("source", "test_fraction", "seed"), "data")
    source = _expect(value.get("source"), str, "data.source", f"one of {', '.join(task.sources)}")
    if source not in task.sources:
        raise ConfigError(f"data.source {source!r} is not available for task {task.name!r}; "
                          f"choose one of {', '.join(task.sources)}")
    fraction = _expect(value.get("test_fraction", 0.2), (int, float), "data.test_fraction", "a number in (0, 1)")
    if not 0 < fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {fraction}")
    seed = _expect(value.get("seed", 0), int, "data.seed", "an integer")
    return {"source": source, "test_fraction": float(fraction), "seed": seed}


def _validate_modes(value: Any) -> list[ModeSpec]:
    from .config import ETFConfig

    _expect(value, list, "modes", "a non-empty list of {name, etf} mappings")
    if not value:
        raise ConfigError("modes must list at least one mode, e.g. [{name: full, etf: null}, {name: etf, etf: {}}]")
    modes, etf_fields = [], [f.name for f in dataclasses.fields(ETFConfig) if f.name != "format_version"]
    for i, mode in enumerate(value):
        where = f"modes[{i}]"
        _expect(mode, dict, where, "a mapping with 'name' and 'etf'")
        _reject_unknown(mode, ("name", "etf"), where)
        name = _expect(mode.get("name"), str, f"{where}.name", "a name made of letters, digits, '_', '-', '.'")
        if not _MODE_NAME.fullmatch(name) or name in {m.name for m in modes}:
            raise ConfigError(f"{where}.name {name!r} must be unique and made of letters, digits, '_', '-', '.'")
        etf = mode.get("etf")
        if etf is not None:
            _expect(etf, dict, f"{where}.etf", "null (no ETF layers) or a mapping of ETFConfig fields")
            _reject_unknown(etf, etf_fields, f"{where}.etf")
            try:
                etf = ETFConfig(**etf)
            except ValueError as error:
                raise ConfigError(f"{where}.etf: {error}") from None
        modes.append(ModeSpec(name, etf))
    return modes


def _check_modes_fit_model(spec: RunSpec) -> None:
    """Surface patch-time errors (``layers: last:9`` on a 4-block model) now, not after the first mode trained.

    The model is built on the meta device: structure only, no memory, whatever its size.
    """
    from .architectures import find_slots

    etf_modes = [(i, mode) for i, mode in enumerate(spec.modes) if mode.etf is not None]
    if not etf_modes:
        return
    with torch.device("meta"):
        skeleton = TASKS[spec.task].auto_class.from_config(model_config(spec))
    for i, mode in etf_modes:
        try:
            slots = find_slots(skeleton, mode.etf)
        except ValueError as error:
            raise ConfigError(f"modes[{i}].etf: {error}") from None
        if not slots:
            raise ConfigError(f"modes[{i}].etf selects no feed-forward projection of {type(skeleton).__name__}")


def _validate_training(value: Any) -> dict[str, Any]:
    """Check keys and simple types against `TrainingArguments`, then build it once to surface its own errors."""
    from transformers import TrainingArguments

    _expect(value, dict, "training", "a mapping of TrainingArguments fields")
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    if "output_dir" in value:
        raise ConfigError("training.output_dir is set per mode by etf-hf; use the top-level output_dir instead")
    _reject_unknown(value, sorted(fields), "training", "allowed keys are the fields of transformers.TrainingArguments")
    training = {key: _coerce_training_value(key, val, fields[key].type) for key, val in value.items()}
    try:
        TrainingArguments(output_dir="unused", **training)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"training: TrainingArguments rejected the settings: {error}") from None
    return training


def _coerce_training_value(key: str, value: Any, annotation: Any) -> Any:
    """Type-check fields annotated as a plain bool/int/float/str.

    PyYAML reads ``1e-3`` (no dot) as a string, a classic trap for learning rates, so a numeric string
    for a float field is converted rather than passed on to fail deep inside the optimizer.
    """
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(annotation)
    if expected is not None:
        _expect(value, expected, f"training.{key}", f"a {annotation.__name__}")
    return value


# --------------------------------------------------------------------------------------------------
# Tasks and data sources
# --------------------------------------------------------------------------------------------------


class DictDataset(torch.utils.data.Dataset):
    """In-memory examples as the dicts Trainer's default collator stacks (``{input name: tensor, labels}``)."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {name: tensor[index] for name, tensor in self.inputs.items()}
        item["labels"] = self.labels[index]
        return item


@dataclass
class DataSplits:
    train: DictDataset
    test: DictDataset
    label_names: list[str]


@dataclass(frozen=True)
class DataSource:
    """A loader ``(test_fraction, seed) -> DataSplits`` and the input facts a model config must agree
    with (e.g. ``image_size``), declared up front so a mismatch is caught while validating the recipe."""

    load: Callable[[float, int], DataSplits]
    input_facts: dict[str, int]


def sklearn_digits(test_fraction: float, seed: int) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): no download, always there.

    Pixels (0..16) are scaled to [0, 1]; the split is stratified so every class is in the test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=digits.target)
    def split(idx: np.ndarray) -> DictDataset:
        index = torch.as_tensor(idx)
        return DictDataset({"pixel_values": images[index]}, labels[index])

    return DataSplits(split(train_idx), split(test_idx), [str(n) for n in digits.target_names])


@dataclass(frozen=True)
class Task:
    """What a task needs: the Auto class that builds its head and the data sources that feed it.

    Adding ``sequence-classification`` means one more entry: ``AutoModelForSequenceClassification`` and
    a source returning ``input_ids``/``attention_mask`` tensors.
    """

    name: str
    auto_class_name: str
    sources: dict[str, DataSource]

    @property
    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)


TASKS: dict[str, Task] = {
    "image-classification": Task("image-classification", "AutoModelForImageClassification",
                                 {"sklearn_digits": DataSource(sklearn_digits, {"image_size": 8, "num_channels": 1})}),
}


def load_data(spec: RunSpec) -> DataSplits:
    return TASKS[spec.task].sources[spec.data["source"]].load(spec.data["test_fraction"], spec.data["seed"])


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def model_config(spec: RunSpec, **overrides: Any) -> Any:
    """The transformers config of the recipe's model (loaded from the folder for ``pretrained``)."""
    from transformers import AutoConfig

    if "pretrained" in spec.model:
        return AutoConfig.from_pretrained(spec.model["pretrained"], **overrides)
    return AutoConfig.for_model(**spec.model["from_config"], **overrides)


def build_model(spec: RunSpec, data: DataSplits, seed: int) -> Any:
    """A fresh model for one mode; seeded, so every mode starts from the same initial weights."""
    from transformers import set_seed

    task = TASKS[spec.task]
    labels = {"num_labels": len(data.label_names), "id2label": dict(enumerate(data.label_names)),
              "label2id": {name: i for i, name in enumerate(data.label_names)}}
    set_seed(seed)
    if "pretrained" in spec.model:
        path = spec.model["pretrained"]
        try:
            return task.auto_class.from_pretrained(path, ignore_mismatched_sizes=True, **labels)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.pretrained {path!r} could not be loaded: {error}") from None
    return task.auto_class.from_config(model_config(spec, **labels))


# --------------------------------------------------------------------------------------------------
# Training one mode, and the whole run
# --------------------------------------------------------------------------------------------------


def accuracy(eval_prediction: Any) -> dict[str, float]:
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def mode_model(spec: RunSpec, mode: ModeSpec, data: DataSplits, seed: int) -> Any:
    """The mode's model: built fresh, then patched when the mode has ETF settings."""
    from .patch import patch

    model = build_model(spec, data, seed)
    if mode.etf is not None:
        try:
            patch(model, mode.etf)
        except ValueError as error:  # e.g. a pretrained checkpoint already patched differently
            raise ConfigError(f"mode {mode.name!r}: etf_hf.patch refused its etf settings: {error}") from None
    return model


def train_mode(spec: RunSpec, mode: ModeSpec, data: DataSplits, run_dir: Path) -> dict[str, Any]:
    """Build, train, test and save one mode; returns its row of metrics.json.

    The test split is also the eval set when the recipe turns on ``eval_strategy`` (there is no separate
    validation split), so do not combine that with ``load_best_model_at_end``.
    """
    from transformers import Trainer, TrainingArguments

    from .patch import parameter_summary

    mode_dir = run_dir / mode.name
    args = TrainingArguments(output_dir=str(mode_dir), **spec.training)
    model = mode_model(spec, mode, data, args.seed)
    params = parameter_summary(model)
    print(f"\n=== mode {mode.name!r}: {params['trainable']:,} of {params['total']:,} weights trainable "
          f"({100 * params['trainable'] / params['total']:.1f}%), {params['etf_fixed']:,} fixed in ETF frames ===",
          flush=True)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      eval_dataset=data.test if args.eval_strategy != "no" else None, compute_metrics=accuracy)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    test = trainer.evaluate(eval_dataset=data.test, metric_key_prefix="test")
    trainer.save_model(str(mode_dir))
    return _mode_row(mode, params, test, train_time, trainer.state, mode_dir)


def _mode_row(mode: ModeSpec, params: dict[str, int], test: dict[str, float], train_time: float, state: Any,
              mode_dir: Path) -> dict[str, Any]:
    history = state.log_history
    return {
        "name": mode.name,
        "etf": None if mode.etf is None else mode.etf.to_dict(),
        "test_accuracy": test["test_accuracy"],
        "test_loss": test["test_loss"],
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "etf_fixed_params": params["etf_fixed"],
        "trainable_percent": 100 * params["trainable"] / params["total"],
        "train_time_s": train_time,
        "steps": state.global_step,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_accuracy": [{"step": h["step"], "accuracy": h["eval_accuracy"]} for h in history if "eval_accuracy" in h],
        "model_dir": str(mode_dir),
    }


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<timestamp>``, with a counter if two runs start in the same second."""
    base = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    candidate, counter = base, 1
    while candidate.exists():
        candidate, counter = base.with_name(f"{base.name}-{counter}"), counter + 1
    return candidate


def run(spec: RunSpec) -> dict[str, Any]:
    """Train every mode, write metrics.json, config.yaml and the plots; returns the metrics.

    ``torch_threads`` applies for the run only. Small models want 1: their matmuls gain little from
    splitting, and with other processes sharing a 2-core machine, 2 threads measured over ten times
    slower per step than 1 (threads spin-wait for each other instead of yielding the core).
    """
    previous_threads = torch.get_num_threads()
    if spec.torch_threads is not None:
        torch.set_num_threads(spec.torch_threads)
    try:
        return _run(spec)
    finally:
        torch.set_num_threads(previous_threads)


def _run(spec: RunSpec) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_data(spec)
    run_dir = spec.output_dir or default_run_dir(spec.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False), encoding="utf-8")
    modes = [train_mode(spec, mode, data, run_dir) for mode in spec.modes]
    metrics = {
        "config_name": spec.name,
        "run_dir": str(run_dir),
        "created": datetime.now().isoformat(timespec="seconds"),
        "task": spec.task,
        "data": {**spec.data, "train_examples": len(data.train), "test_examples": len(data.test),
                 "num_labels": len(data.label_names)},
        "environment": _environment(),
        "total_time_s": time.perf_counter() - started,
        "plots": [str(path) for path in write_plots(modes, run_dir)],
        "modes": modes,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def _environment() -> dict[str, Any]:
    import transformers

    from . import __version__

    return {"etf_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine()}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def write_plots(modes: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """training_loss.png (every mode), plus eval_accuracy.png when the recipe evaluated during training.

    Uses matplotlib's object API (Figure + Agg canvas), not pyplot, so no display or global backend is touched.
    """
    paths = [_line_plot(modes, "train_loss", "loss", "training loss", run_dir / "training_loss.png")]
    if any(mode["eval_accuracy"] for mode in modes):
        paths.append(_line_plot(modes, "eval_accuracy", "accuracy", "test accuracy", run_dir / "eval_accuracy.png"))
    return paths


def _line_plot(modes: list[dict[str, Any]], series: str, value: str, label: str, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for mode in modes:
        points = mode[series]
        axes.plot([p["step"] for p in points], [p[value] for p in points], marker=".", label=mode["name"])
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(label)
    axes.set_title(f"{label} per mode")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def format_table(modes: list[dict[str, Any]]) -> str:
    """The summary printed at the end of a run: one row per mode."""
    header = ("mode", "test acc", "trainable", "trainable %", "ETF-fixed", "train time")
    rows = [(m["name"], f"{100 * m['test_accuracy']:.1f}%", f"{m['trainable_params']:,}",
             f"{m['trainable_percent']:.1f}%", f"{m['etf_fixed_params']:,}", f"{m['train_time_s']:.1f} s")
            for m in modes]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:  # mode names left-aligned, numbers right-aligned
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def summary(metrics: dict[str, Any]) -> str:
    data = metrics["data"]
    return (f"\n{metrics['config_name']}: {metrics['task']} on {data['source']} "
            f"({data['train_examples']} train / {data['test_examples']} test examples), "
            f"{math.ceil(metrics['total_time_s'])} s in all\n\n{format_table(metrics['modes'])}\n\n"
            f"run folder: {metrics['run_dir']} (metrics.json, config.yaml, {', '.join(Path(p).name for p in metrics['plots'])})")
