"""`etf-hf train`: a small YAML recipe -> the same model trained in several modes with `transformers.Trainer`.

The point of the command is a fair side-by-side: every mode starts from the same initial weights, sees
the same data in the same order and uses the same `TrainingArguments`; the only difference is how the
mode treats the feed-forward layers (fixed ETFs, frozen, LoRA, Adaptive-ETF, or nothing). The run folder
then holds what is needed to judge the result: ``metrics.json``, ``config.yaml`` (the recipe as given),
PNG plots of the training loss (and of the test metric when the recipe evaluates during training), and
each mode's trained model (with its tokenizer for text tasks).

A recipe has these top-level keys (see ``configs/*.yaml``)::

    task: image-classification        # or sequence-classification, causal-lm (etf_hf.app.tasks)
    model: {from_config: {model_type: vit, ...}}   # or {pretrained: folder | package:NAME}; tokenizer: ...
    data: {source: sklearn_digits, test_fraction: 0.2, seed: 0}      # sources: etf_hf.app.data
    modes: [{name: full}, {name: etf, etf: {basis: orthogonal}}]     # treatments: etf_hf.app.treatments
    training: {...}                   # passed through to TrainingArguments
    output_dir: null                  # default runs/<config-name>-<timestamp>
    torch_threads: 1                  # optional; null keeps torch's default

The metric is the task's: test accuracy for classification, test perplexity (exp of the mean token loss)
for a causal LM. Mistakes raise `ConfigError` naming the key (``training.lerning_rate``,
``modes[1].etf.basis``, ``data.text_column``), before any mode trains, so a typo never costs a
finished baseline run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub.errors import StrictDataclassError

from ..controls import CONTROL_BASES
from .data import validate_data
from .frontier import CostMeter, validate_mode_models
from .treatments import (ModeSpec, adaptive_callback, apply_mode, check_modes_fit_model, input_embeddings, placement_data,
                    validate_modes)
from .recipe import (DEFAULT_CONFIG, TOP_LEVEL_KEYS, ConfigError, apply_overrides, expect, load_config, reject_unknown,
                     resolve_folder)
from .tasks import TASKS, DataSplits, Task, load_tokenizer, perplexity, prepare_data

__all__ = ["ConfigError", "DEFAULT_CONFIG", "DataSplits", "ModeSpec", "RunSpec", "TASKS", "apply_overrides",
           "build_model", "load_config", "load_data", "run", "select_modes", "summary", "validate"]

REQUIRED_KEYS = ("task", "model", "data", "modes", "training")
MODEL_KEYS = ("from_config", "pretrained", "tokenizer")
#: Model config keys the data decides; letting a recipe set them could only make them disagree.
_DATA_DEFINED_KEYS = ("num_labels", "id2label", "label2id")


# --------------------------------------------------------------------------------------------------
# Validation: the raw mapping -> a RunSpec, with every error naming its key
# --------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """A validated recipe. ``raw`` is kept verbatim for the run folder's ``config.yaml``; ``model`` has
    ``pretrained: package:NAME`` resolved to the folder, ``data`` every default filled in."""

    name: str
    task: str
    model: dict[str, Any]
    data: dict[str, Any]
    modes: list[ModeSpec]
    training: dict[str, Any]
    output_dir: Path | None
    torch_threads: int | None
    raw: dict[str, Any]


def validate(raw: dict[str, Any], name: str = "config") -> RunSpec:
    """Check the whole recipe before anything is built or trained (model configs and tokenizers are read;
    weights and data files are not, beyond checking that the files exist)."""
    reject_unknown(raw, TOP_LEVEL_KEYS, "")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ConfigError(f"missing required key {key!r}; a recipe needs {', '.join(REQUIRED_KEYS)}")
    task = _validate_task(raw["task"])
    output_dir = raw.get("output_dir")
    if output_dir is not None:
        output_dir = Path(expect(output_dir, str, "output_dir", "a folder path (string) or null"))
    threads = raw.get("torch_threads")
    if threads is not None and (expect(threads, int, "torch_threads", "a positive integer or null") < 1):
        raise ConfigError(f"torch_threads must be a positive integer or null, got {threads}")
    training = _validate_training(raw["training"])
    model, config = _validate_model(raw["model"], task)
    data = validate_data(raw["data"], task.name, task.data_keys)
    task.check(data, config, load_tokenizer(model, task) if task.needs_tokenizer else None, _model_key(model))
    modes = validate_modes(raw["modes"], task.has_labels, config.model_type, training)
    for i, mode in enumerate(modes):
        mode.training = _validate_training(mode.training, f"modes[{i}].training", training)
    spec = RunSpec(name=name, task=task.name, model=model, data=data, modes=modes, training=training,
                   output_dir=output_dir, torch_threads=threads, raw=raw)

    def skeleton(mode: ModeSpec) -> torch.nn.Module:
        with torch.device("meta"):
            return task.auto_class.from_config(model_config(spec, mode))

    validate_mode_models(model, modes, skeleton)
    check_modes_fit_model(spec.modes, skeleton)
    return spec


def _validate_task(value: Any) -> Task:
    expect(value, str, "task", f"one of {', '.join(TASKS)}")
    if value not in TASKS:
        raise ConfigError(f"task {value!r} is not supported; supported tasks: {', '.join(TASKS)}")
    return TASKS[value]


def _model_key(model: dict[str, Any]) -> str:
    return "model.pretrained" if "pretrained" in model else "model.from_config"


def _validate_model(value: Any, task: Task) -> tuple[dict[str, Any], Any]:
    """Check the model section, loading only its config (never weights); returns (resolved section, config)."""
    expect(value, dict, "model", "a mapping with 'from_config' or 'pretrained' (and optionally 'tokenizer')")
    reject_unknown(value, MODEL_KEYS, "model")
    if ("from_config" in value) == ("pretrained" in value):
        raise ConfigError("model needs exactly one of model.from_config (build from a config) or model.pretrained "
                          "(a folder, a Hub name, or package:NAME)")
    if value.get("tokenizer") is not None and not task.needs_tokenizer:
        raise ConfigError(f"model.tokenizer is only read by text tasks; task {task.name!r} has no text: remove it")
    model = dict(value)
    if "pretrained" in model:
        model["pretrained"] = resolve_folder(expect(model["pretrained"], str, "model.pretrained",
                                                    "a model folder, a Hub name or package:NAME"), "model.pretrained")
        return model, _pretrained_config(model["pretrained"], value["pretrained"])
    return model, _validate_from_config(model["from_config"])


def _pretrained_config(path: str, given: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.pretrained {given!r} could not be loaded: {error}") from None


def _validate_from_config(kwargs: Any) -> Any:
    """Every key must be a setting of the model type's config: transformers would silently keep a typo."""
    from transformers import AutoConfig

    expect(kwargs, dict, "model.from_config", "a mapping with model_type and config kwargs")
    model_type = expect(kwargs.get("model_type"), str, "model.from_config.model_type",
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
        return AutoConfig.for_model(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConfigError(f"model.from_config: {type(defaults).__name__} rejected the settings: {error}") from None


def _validate_training(value: Any, where: str = "training", base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check ``training:`` with transformers' and torch's own code, before any model or data work: keys against
    `TrainingArguments`' fields, each value parsed as `HfArgumentParser` parses it from a command line, the real
    `TrainingArguments` built (over ``base``, the recipe's validated settings, for a mode's overrides), and the
    optimizer and learning-rate schedule those arguments describe created the way `Trainer` creates them.

    `TrainingArguments` alone checks neither types nor a negative learning rate; the optimizer does, but only
    once `Trainer` builds it, after the model and the data (and a partial run folder).
    """
    from transformers import TrainingArguments

    expect(value, dict, where, "a mapping of TrainingArguments fields")
    fields = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    if "output_dir" in value:
        raise ConfigError(f"{where}.output_dir is set per mode by etf-hf; use the top-level output_dir instead")
    reject_unknown(value, sorted(fields), where, "allowed keys are the fields of transformers.TrainingArguments")
    training = {key: _parsed_training_value(key, val, where) for key, val in value.items()}
    try:
        args = TrainingArguments(output_dir="unused", **{**(base or {}), **training})
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: TrainingArguments rejected the settings: {error}") from None
    _check_optimizer_and_schedule(args, where)
    return training


@functools.lru_cache(maxsize=1)
def _training_parser() -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser(TrainingArguments, exit_on_error=False)


def _parsed_training_value(key: str, value: Any, where: str) -> Any:
    """A scalar as `HfArgumentParser` reads ``--key=value``: typed, and an enum field checked against its
    choices. PyYAML reads ``1e-3`` (no dot) as a string, which becomes the float the field wants; mappings,
    lists and null are passed on as given."""
    import argparse

    if value is None or isinstance(value, (dict, list)):
        return value
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        namespace, _ = _training_parser().parse_known_args([f"--{key}={text}"])
    except argparse.ArgumentError as error:
        quote = f" (YAML reads an unquoted yes/no as a boolean: quote it, e.g. {key}: \"no\")" \
            if isinstance(value, bool) else ""
        raise ConfigError(f"{where}.{key}={value!r} is not valid for TrainingArguments.{key}: "
                          f"{error.message}{quote}") from None
    return getattr(namespace, key)


def _check_optimizer_and_schedule(args: Any, where: str) -> None:
    """Create ``args``' optimizer on one dummy weight, with `Trainer`'s own choice of class and keywords and its
    weight-decay group, and its learning-rate schedule: what they refuse (a negative learning rate, betas
    outside [0, 1), unknown scheduler keywords) is refused now, naming the settings it comes from.

    Optimizers built from the model itself (GaLore and APOLLO on ``optim_target_modules``, LOMO) cannot be
    built without it: plain SGD at the same learning rate stands in, so that the schedule is still checked.
    """
    from transformers import Trainer, get_scheduler

    weight = torch.nn.Parameter(torch.zeros(1))
    try:
        if args.optim_target_modules is not None or "lomo" in args.optim.value:
            optimizer = torch.optim.SGD([weight], lr=args.learning_rate)
        else:
            optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
            optimizer = optimizer_class([{"params": [weight], "weight_decay": args.weight_decay}], **optimizer_kwargs)
    except (ValueError, TypeError, ImportError) as error:
        raise ConfigError(f"{where}: the optimizer ({where}.optim={args.optim.value!r}) refused its settings "
                          f"(learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay, optim_args): "
                          f"{error}") from None
    steps = args.max_steps if args.max_steps > 0 else 1000  # the real count depends on the data
    try:
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                      num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}: the learning-rate schedule ({where}.lr_scheduler_type="
                          f"{args.lr_scheduler_type.value!r}) refused its settings (lr_scheduler_kwargs, "
                          f"warmup_steps): {error}") from None


def select_modes(spec: RunSpec, names: list[str]) -> RunSpec:
    """The recipe with only the modes ``names`` (in the recipe's order). config.yaml still records every
    mode: `etf_hf.app.report` pairs folders of one seed that trained different modes of one recipe."""
    known = [mode.name for mode in spec.modes]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ConfigError(f"--only {','.join(unknown or names) or '(nothing)'}: not a mode of this recipe; its modes "
                          f"are {', '.join(known)}")
    return dataclasses.replace(spec, modes=[mode for mode in spec.modes if mode.name in names])


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------


def load_data(spec: RunSpec) -> DataSplits:
    """The recipe's data, prepared for its task and model (images sized for it, text tokenized for it)."""
    task = TASKS[spec.task]
    tokenizer = load_tokenizer(spec.model, task) if task.needs_tokenizer else None
    return prepare_data(task, spec.data, model_config(spec), tokenizer)


def model_config(spec: RunSpec, mode: ModeSpec | None = None, **overrides: Any) -> Any:
    """The transformers config of the recipe's model (loaded from the folder for ``pretrained``), with
    ``mode``'s own ``model`` settings (a dense baseline of another size) when given."""
    from transformers import AutoConfig

    if "pretrained" in spec.model:
        return AutoConfig.from_pretrained(spec.model["pretrained"], **overrides)
    return AutoConfig.for_model(**{**spec.model["from_config"], **(mode.model if mode else {}), **overrides})


def build_model(spec: RunSpec, data: DataSplits, seed: int, mode: ModeSpec | None = None) -> Any:
    """A fresh model for one mode; seeded, so every mode of one size starts from the same initial weights."""
    from transformers import set_seed

    task = TASKS[spec.task]
    kwargs = task.model_kwargs(data)
    set_seed(seed)
    if "pretrained" in spec.model:
        path = spec.model["pretrained"]
        try:
            return task.auto_class.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
        except (OSError, ValueError) as error:
            raise ConfigError(f"model.pretrained {spec.raw['model']['pretrained']!r} could not be loaded: {error}") from None
    return task.auto_class.from_config(model_config(spec, mode, **kwargs))


# --------------------------------------------------------------------------------------------------
# Training one mode, and the whole run
# --------------------------------------------------------------------------------------------------


def train_mode(spec: RunSpec, mode: ModeSpec, data: DataSplits, run_dir: Path) -> dict[str, Any]:
    """Build, treat, train, test and save one mode; returns its row of metrics.json.

    The test split is also the eval set when the recipe turns on ``eval_strategy`` (there is no separate
    validation split), so do not combine that with ``load_best_model_at_end``.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator

    from ..patch import parameter_summary

    task = TASKS[spec.task]
    mode_dir = run_dir / mode.name
    args = TrainingArguments(output_dir=str(mode_dir), **{**spec.training, **mode.training})
    num_classes = len(data.label_names)
    placement = placement_data(mode, "pretrained" in spec.model, data.train, num_classes, data.collator,
                               spec.data["seed"])
    cost = CostMeter(args.device)  # before the model is built: its memory counts from here
    model = apply_mode(build_model(spec, data, args.seed, mode), mode, **placement)
    params = parameter_summary(model)
    print(f"\n=== mode {mode.name!r} ({_kind_in_words(mode)}): {params['trainable']:,} of {params['total']:,} "
          f"weights trainable ({100 * params['trainable'] / params['total']:.1f}%), {params['etf_fixed']:,} fixed in "
          f"ETF frames ===", flush=True)
    trainer = Trainer(model=model, args=args, train_dataset=data.train,
                      eval_dataset=data.test if args.eval_strategy != "no" else None,
                      data_collator=data.collator or default_data_collator, processing_class=data.tokenizer,
                      compute_metrics=task.compute_metrics())
    trainer.add_callback(cost)
    callback = None
    if mode.adaptive is not None:
        callback = adaptive_callback(mode, data.train, num_classes, spec.data["seed"]).attach(trainer)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    if not any("loss" in entry for entry in trainer.state.log_history):
        print(f"note: mode {mode.name!r} logged no training loss: it ran {trainer.state.global_step} optimizer steps, "
              f"fewer than logging_steps={args.logging_steps}; set training.logging_steps lower for a loss curve",
              flush=True)
    test = trainer.evaluate(eval_dataset=data.test, metric_key_prefix="test")
    trainer.save_model(str(mode_dir))
    row = _mode_row(task, mode, model, params, parameter_summary(model)["trainable"], test, train_time,
                    trainer.state, callback, mode_dir)
    return {**row, **cost.record(mode)}


def _kind_in_words(mode: ModeSpec) -> str:
    """The treatment as the log shows it: a control basis at an ETF placement says it is a control, not an ETF."""
    if mode.etf is not None and mode.etf.basis in CONTROL_BASES:
        return f"control: {mode.etf.basis}, not an ETF"
    return mode.kind


def trainable_input_embeddings(model: Any) -> int:
    """Trainable weights of the input embedding matrix: in a pretrained text model it can be half of all
    weights (MiniLM: 11.7 M of 22.7 M), which hides what fixing FFNs saves; tables also show the count
    without it."""
    embeddings = input_embeddings(model)
    if embeddings is None:  # e.g. the paper's MLP: no embedding matrix
        return 0
    return sum(p.numel() for p in embeddings.parameters() if p.requires_grad)


def _mode_row(task: Task, mode: ModeSpec, model: Any, params: dict[str, int], trainable_end: int,
              test: dict[str, float], train_time: float, state: Any, callback: Any, mode_dir: Path) -> dict[str, Any]:
    """One mode's results. ``etf`` is the trained model's ``config.etf`` (blocks resolved, placement
    recorded; Adaptive-ETF's locks), None when no layer is fixed; ``trainable_params`` is counted before
    training, ``trainable_params_end`` after it (they differ when Adaptive-ETF locked blocks);
    ``trainable_params_excl_embeddings`` is the latter without the input embedding matrix."""
    metric = task.metric
    history = state.log_history
    if task.has_labels:
        value = test["test_accuracy"]
        evals = [{"step": h["step"], metric: h["eval_accuracy"]} for h in history if "eval_accuracy" in h]
    else:
        value = perplexity(test["test_loss"])
        evals = [{"step": h["step"], metric: perplexity(h["eval_loss"])} for h in history if "eval_loss" in h]
    adaptive = None
    if callback is not None:
        adaptive = {"settings": mode.adaptive, "locked": callback.locked,
                    "lock_steps": {str(block): step for block, step in callback.lock_steps.items()},
                    "ncc_history": callback.history, "lock_losses": callback.lock_losses,
                    "late_locks": callback.late_locks}
    return {
        "name": mode.name,
        "kind": mode.kind,
        "etf": getattr(model.config, "etf", None),
        "frozen": mode.frozen,
        "lora": mode.lora,
        "adaptive": adaptive,
        "training": mode.training,
        "freeze_input_embeddings": mode.freeze_input_embeddings,
        f"test_{metric}": value,
        "test_loss": test["test_loss"],
        "trainable_params": params["trainable"],
        "trainable_params_end": trainable_end,
        "trainable_params_excl_embeddings": trainable_end - trainable_input_embeddings(model),
        "total_params": params["total"],
        "etf_fixed_params": params["etf_fixed"],
        "trainable_percent": 100 * params["trainable"] / params["total"],
        "train_time_s": train_time,
        "steps": state.global_step,
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        f"eval_{metric}": evals,
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
    task = TASKS[spec.task]
    data = load_data(spec)
    run_dir = spec.output_dir or default_run_dir(spec.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False), encoding="utf-8")
    _prime_runtime(spec, data)
    modes = [train_mode(spec, mode, data, run_dir) for mode in spec.modes]
    labels = {"num_labels": len(data.label_names), "label_names": data.label_names} if task.has_labels else {}
    metrics = {
        "config_name": spec.name,
        "run_dir": str(run_dir),
        "created": datetime.now().isoformat(timespec="seconds"),
        "task": spec.task,
        "metric": {"name": task.metric, "key": f"test_{task.metric}", "higher_is_better": task.higher_is_better},
        "data": {**spec.data, "train_examples": len(data.train), "test_examples": len(data.test), **labels},
        "environment": _environment(),
        "total_time_s": time.perf_counter() - started,
        "plots": [str(path) for path in write_plots(modes, run_dir)],
        "modes": modes,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def _prime_runtime(spec: RunSpec, data: DataSplits) -> None:
    """One forward and backward pass of the recipe's model on one training batch, discarded, before the first
    mode: one-off costs (kernel selection, allocator arenas, lazily loaded libraries) would otherwise land in
    the first mode's measured step time and peak memory (`etf_hf.app.frontier.CostMeter`) alone."""
    from transformers import default_data_collator

    size = min(int(spec.training.get("per_device_train_batch_size", 8)), len(data.train))
    batch = (data.collator or default_data_collator)([data.train[i] for i in range(size)])
    model = build_model(spec, data, int(spec.training.get("seed", 42)))
    model(**batch).loss.backward()


def _environment() -> dict[str, Any]:
    import transformers

    from .. import __version__

    return {"etf_hf": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine()}


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _row_metric(row: dict[str, Any]) -> str:
    """The metric a metrics.json row reports: ``perplexity`` for a causal LM, else ``accuracy``."""
    return "perplexity" if "test_perplexity" in row else "accuracy"


def unlogged_modes(modes: list[dict[str, Any]]) -> list[str]:
    """Modes that logged no training loss: they ran fewer optimizer steps than ``training.logging_steps``."""
    return [mode["name"] for mode in modes if not mode["train_loss"]]


def write_plots(modes: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """training_loss.png (the modes that logged a loss; none when no mode did), plus eval_<metric>.png when the
    recipe evaluated during training.

    Drawn with `etf_hf.plotting` (no pyplot: no display or global backend is touched).
    """
    paths = []
    if any(mode["train_loss"] for mode in modes):
        paths.append(_line_plot(modes, "train_loss", "loss", "training loss", run_dir / "training_loss.png"))
    metric = _row_metric(modes[0])
    if any(mode[f"eval_{metric}"] for mode in modes):
        paths.append(_line_plot(modes, f"eval_{metric}", metric, f"test {metric}", run_dir / f"eval_{metric}.png"))
    return paths


def _line_plot(modes: list[dict[str, Any]], series: str, value: str, label: str, path: Path) -> Path:
    from ..plotting import new_figure, save_figure

    figure = new_figure(6, 4)
    axes = figure.add_subplot()
    for mode in modes:
        points = mode[series]
        if not points:  # said in the run's summary; an empty line would only clutter the legend
            continue
        axes.plot([p["step"] for p in points], [p[value] for p in points], marker=".", label=mode["name"])
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(label)
    axes.set_title(f"{label} per mode")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


def format_table(modes: list[dict[str, Any]]) -> str:
    """The summary printed at the end of a run: one row per mode, with the task's metric.

    ``trainable`` reads ``before -> after`` when training changed it (Adaptive-ETF locks).
    """
    metric = _row_metric(modes[0])
    header = ("mode", "test acc" if metric == "accuracy" else "test ppl", "trainable", "trainable %", "ETF-fixed",
              "train time")

    def shown(row: dict[str, Any]) -> str:
        value = row[f"test_{metric}"]
        return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.2f}"

    def trainable(row: dict[str, Any]) -> str:
        before, after = row["trainable_params"], row["trainable_params_end"]
        return f"{before:,}" if before == after else f"{before:,} -> {after:,}"

    rows = [(m["name"], shown(m), trainable(m), f"{m['trainable_percent']:.1f}%", f"{m['etf_fixed_params']:,}",
             f"{m['train_time_s']:.1f} s") for m in modes]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:  # mode names left-aligned, numbers right-aligned
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def summary(metrics: dict[str, Any]) -> str:
    data = metrics["data"]
    files = ", ".join(["metrics.json", "config.yaml", *(Path(p).name for p in metrics["plots"])])
    unlogged = unlogged_modes(metrics["modes"])
    note = ""
    if unlogged:
        left_out = "no loss plot" if len(unlogged) == len(metrics["modes"]) else \
            f"the loss plot leaves {'it' if len(unlogged) == 1 else 'them'} out"
        note = (f"no training loss logged by {', '.join(unlogged)} (fewer optimizer steps than "
                f"training.logging_steps), so {left_out}\n")
    return (f"\n{metrics['config_name']}: {metrics['task']} on {data['source']} "
            f"({data['train_examples']} train / {data['test_examples']} test examples), "
            f"{math.ceil(metrics['total_time_s'])} s in all\n\n{format_table(metrics['modes'])}\n\n{note}"
            f"run folder: {metrics['run_dir']} ({files})")
