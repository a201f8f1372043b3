"""`etf-hf report`: one or more `etf-hf train` run folders -> a markdown comparison table and plots.

Several run folders are read as several seeds of *one* recipe (``etf-hf train my.yaml training.seed=1``,
``... training.seed=2``): rows are grouped by mode name, and each mode gets its metric's mean ± sd over
seeds and a *paired* difference to a baseline mode, matched by seed, with a 95 % t-interval. Pairing by
seed is what makes a handful of seeds informative: every mode of a seed starts from the same initial
weights and sees the same data order, so seed-to-seed variation largely cancels in the difference.
An interval that contains 0 is marked "(within noise)", so a table never reads a 3-example difference as
a win. Control modes (frozen Gaussian, zeroed or frozen-as-is weights at an ETF's placement, see
`etf_hf.controls`) are labelled as controls, not ETFs: they are what tells ETF geometry apart from "these
layers were dispensable".

Mixing recipes is an error, not a footnote: folders whose ``config.yaml`` differ in anything but seeds,
output folders and the list of modes would be averaged into a meaningless mean, and a mode name defined
differently in two folders is refused. Rows can be added to a finished table: add modes to the recipe and
run only those (``etf-hf train my.yaml --only new_mode training.seed=N``) for each seed; folders of one seed
then hold different modes and are paired as one.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ..plotting import new_figure, save_figure


def _control_bases() -> tuple[str, ...]:
    """`etf_hf.controls.CONTROL_BASES`, imported when a row is described: that module imports torch, and a
    missing run folder should be reported without it."""
    from ..controls import CONTROL_BASES

    return CONTROL_BASES

#: TrainingArguments' default seed: the seed of a run whose recipe does not set ``training.seed``.
DEFAULT_TRAINING_SEED = 42

class ReportError(ValueError):
    """A problem with the run folders given to `etf-hf report`; the message names the folder and the fix."""


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """Mean of paired differences and its 95 % t-interval (``low``/``high`` None for a single pair)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def within_noise(self) -> bool | None:
        """True when the interval contains 0 (no detectable difference); None when there is no interval."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 0 <= self.high


def format_interval(interval: Interval, digits: int = 2) -> str:
    """``+0.27 [−0.72, +1.26] (within noise)``: the one spelling of a paired difference in every table."""
    if interval.low is None or interval.high is None:
        return f"{_signed(interval.mean, digits)} (1 seed: no interval)"
    cell = f"{_signed(interval.mean, digits)} [{_signed(interval.low, digits)}, {_signed(interval.high, digits)}]"
    return cell + (" (within noise)" if interval.within_noise else "")


def paired_interval(differences: Sequence[float]) -> Interval:
    """Mean difference ± t(0.975; n-1) · sd / sqrt(n) over ``n`` paired seeds."""
    if not differences:
        raise ValueError("a paired interval needs at least one pair")
    mean = statistics.fmean(differences)
    n = len(differences)
    if n < 2:
        return Interval(mean, None, None, n)
    from scipy.stats import t  # imported here: a second of import time the CLI's other paths need not pay

    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(differences) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


# --------------------------------------------------------------------------------------------------
# Reading run folders
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """How a metrics.json key is shown: ``scale`` 100 turns a fraction into percent points."""

    key: str
    label: str
    scale: float = 1.0
    digits: int = 4
    higher_is_better: bool | None = None


#: Metrics picked automatically, in this order: the first one every mode row has.
KNOWN_METRICS: tuple[Metric, ...] = (
    Metric("test_accuracy", "test accuracy %", 100.0, 2, True),
    Metric("test_perplexity", "test perplexity", 1.0, 2, False),
    Metric("test_loss", "test loss", 1.0, 4, False),
)


@dataclass
class Run:
    """One `etf-hf train` run folder: its metrics.json, its config.yaml (if any) and its training seed."""

    path: Path
    metrics: dict[str, Any]
    config: dict[str, Any] | None
    seed: int | None


def load_run(path: str | Path) -> Run:
    """Read a run folder; a missing or malformed metrics.json is a `ReportError` naming the folder."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run folder {str(path)!r} does not exist" + (" (it is a file; pass the folder that holds "
                                                                         "metrics.json)" if path.is_file() else ""))
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise ReportError(f"{str(path)!r} has no metrics.json: pass folders written by `etf-hf train` "
                          f"(an unfinished run writes metrics.json only at its end)")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{str(metrics_file)!r} is not valid JSON ({error})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("modes"), list) or not metrics["modes"]:
        raise ReportError(f"{str(metrics_file)!r} has no 'modes' list: it was not written by `etf-hf train`")
    for index, row in enumerate(metrics["modes"]):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str):
            raise ReportError(f"{str(metrics_file)!r}: modes[{index}] has no 'name'")
    config = None
    config_file = path / "config.yaml"
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    return Run(path, metrics, config, _run_seed(metrics, config))


def _run_seed(metrics: dict[str, Any], config: dict[str, Any] | None) -> int | None:
    """The training seed: metrics.json's ``seed`` if recorded, else config.yaml's ``training.seed``."""
    if isinstance(metrics.get("seed"), int):
        return metrics["seed"]
    if config is not None:
        seed = (config.get("training") or {}).get("seed", DEFAULT_TRAINING_SEED)
        return seed if isinstance(seed, int) else None
    return None


def _without_seeds(value: Any) -> Any:
    """The recipe minus what legitimately differs between seeds of one recipe (every ``seed``, ``output_dir``)."""
    if isinstance(value, dict):
        return {k: _without_seeds(v) for k, v in value.items() if k not in ("seed", "output_dir")}
    if isinstance(value, list):
        return [_without_seeds(v) for v in value]
    return value


def _recipe(run: Run, use_config: bool) -> dict[str, Any]:
    """What must agree between runs besides the modes: config.yaml (when every run has one), else what
    metrics.json says."""
    if use_config and run.config is not None:
        return _without_seeds({key: value for key, value in run.config.items() if key != "modes"})
    data = run.metrics.get("data") or {}
    return _without_seeds({
        "task": run.metrics.get("task"),
        "data": {k: v for k, v in data.items() if k not in ("train_examples", "test_examples")},
    })


def _mode_definitions(run: Run, use_config: bool) -> dict[str, Any]:
    """How each mode the run trained is defined: its config.yaml entry, else its metrics.json ``etf`` record
    (for Adaptive-ETF its settings: the ``etf`` record holds the blocks it locked, an outcome that may differ
    between seeds)."""
    trained = [row["name"] for row in run.metrics["modes"]]
    if use_config and run.config is not None:
        entries = {entry.get("name"): entry for entry in run.config.get("modes") or [] if isinstance(entry, dict)}
        return {name: _without_seeds(entries.get(name)) for name in trained}
    return {row["name"]: _without_seeds(_row_definition(row)) for row in run.metrics["modes"]}


def _row_definition(row: dict[str, Any]) -> dict[str, Any]:
    """A mode's definition as its metrics.json row records it (for runs without config.yaml)."""
    adaptive = row.get("adaptive")
    definition = {"adaptive": adaptive.get("settings")} if isinstance(adaptive, dict) else {"etf": row.get("etf")}
    if row.get("freeze_input_embeddings"):
        definition["freeze_input_embeddings"] = True
    return definition


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """Dotted path of the first place two recipes differ, with both values (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            here = f"{where}.{key}" if where else str(key)
            if key not in a or key not in b:
                return f"{here} is set only in {'the first' if key in a else 'the second'}"
            found = _first_difference(a[key], b[key], here)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{where}.{index}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        return f"{where} has {len(a)} vs {len(b)} entries"
    return None if a == b else f"{where or 'the recipe'} is {a!r} vs {b!r}"


def check_one_recipe(runs: Sequence[Run]) -> None:
    """Refuse folders of different recipes, a mode defined differently in two folders, and folders without a
    seed. Folders of one seed may hold different modes (``etf-hf train --only``: rows added to a finished
    table); the same mode twice for one seed is refused when the rows are grouped (`summarize`)."""
    first = runs[0]
    use_config = all(run.config is not None for run in runs)
    definitions: dict[str, tuple[Any, Path]] = {}
    for run in runs:
        difference = _first_difference(_recipe(first, use_config), _recipe(run, use_config))
        if difference:
            raise ReportError(f"{str(first.path)!r} and {str(run.path)!r} are different recipes ({difference}); "
                              f"several run folders are read as seeds of one recipe: report them separately")
        for name, definition in _mode_definitions(run, use_config).items():
            seen, where = definitions.setdefault(name, (definition, run.path))
            difference = _first_difference(seen, definition, f"modes[{name}]")
            if difference:
                raise ReportError(f"{str(where)!r} and {str(run.path)!r} define mode {name!r} differently "
                                  f"({difference}); rename one of them")
    if len(runs) > 1:
        for run in runs:
            if run.seed is None:
                raise ReportError(f"{str(run.path)!r} records no training seed (no config.yaml, no 'seed' in "
                                  f"metrics.json), so its modes cannot be paired with other runs' by seed")


# --------------------------------------------------------------------------------------------------
# Per-mode summary
# --------------------------------------------------------------------------------------------------


@dataclass
class ModeSummary:
    """One mode over all seeds: metric values by seed, parameter shares, wall time and curves.

    ``row`` is the mode's metrics.json row of the first run: what the mode does (``kind`` and its
    settings) is the same in every seed of one recipe.
    """

    name: str
    row: dict[str, Any]
    values: dict[int | None, float] = field(default_factory=dict)
    trainable_percent: list[float] = field(default_factory=list)
    trainable_percent_end: list[float] = field(default_factory=list)
    trainable_excl_embeddings: list[int] = field(default_factory=list)
    train_time_s: list[float] = field(default_factory=list)
    loss_curves: list[list[dict[str, float]]] = field(default_factory=list)
    ncc: list[list[float]] = field(default_factory=list)
    adaptive_locks: dict[int | None, dict[str, Any]] = field(default_factory=dict)
    delta: Interval | None = None

    @property
    def treatment(self) -> str:
        """``full``, ``etf``, ``frozen``, ``lora`` or ``adaptive`` (derived for rows written before ``kind``)."""
        if isinstance(self.row.get("kind"), str):
            return self.row["kind"]
        return "adaptive" if self.row.get("adaptive") else ("full" if self.row.get("etf") is None else "etf")

    @property
    def basis(self) -> str | None:
        etf = self.row.get("etf")
        return etf.get("basis") if isinstance(etf, dict) else None

    @property
    def is_control(self) -> bool:
        return self.treatment == "etf" and self.basis in _control_bases()

    @property
    def kind(self) -> str:
        """What the mode does, in words; controls say so, so they are never read as ETF results."""
        frozen_embeddings = " + input embeddings frozen" if self.row.get("freeze_input_embeddings") else ""
        return self._treatment_in_words + frozen_embeddings

    @property
    def _treatment_in_words(self) -> str:
        treatment = self.treatment
        if treatment == "full":
            return "nothing fixed"
        if treatment == "frozen":
            return "FFN weights frozen (no ETF)"
        if treatment == "lora":
            lora = self.row.get("lora") or {}
            return f"LoRA r={lora['r']}" if "r" in lora else "LoRA"
        if treatment == "adaptive":
            settings = (self.row.get("adaptive") or {}).get("settings") or {}
            return f"Adaptive-ETF ({settings.get('basis', 'nearest')})"
        if self.is_control:
            return f"control: {self.basis} (not an ETF)"
        return f"ETF: {self.basis}"

    @property
    def placement(self) -> str:
        """Which FFN projections the treatment touches: resolved blocks / projections, or Adaptive-ETF's locks."""
        if self.treatment == "adaptive":
            return _locks_cell(self.adaptive_locks or {None: self.row.get("adaptive") or {}})
        selection = self.row.get("etf") if self.treatment == "etf" else self.row.get("frozen")
        if not isinstance(selection, dict):
            return "–"
        if selection.get("target_modules"):
            return f"target_modules {selection['target_modules']}"
        layers = selection.get("layers", "all")
        layers = ",".join(map(str, layers)) if isinstance(layers, list) else str(layers)
        head = ""
        if selection.get("head"):
            head_basis = selection.get("head_basis")
            head = f" + head: control {head_basis}" if head_basis in _control_bases() else " + ETF head"
        return f"{layers} / {selection.get('projections', 'both')}{head}"


def choose_metric(runs: Sequence[Run], key: str | None) -> Metric:
    """The requested metric key (``--metric``), else the one metrics.json declares (``metric.key``), else the
    first known metric that every mode row has."""
    rows = [row for run in runs for row in run.metrics["modes"]]
    numeric = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    declared = runs[0].metrics.get("metric")
    if key is None and isinstance(declared, dict) and isinstance(declared.get("key"), str):
        key = declared["key"]
    if key is not None:
        missing = [f"{run.path}:{row['name']}" for run in runs for row in run.metrics["modes"]
                   if not isinstance(row.get(key), (int, float))]
        if missing:
            raise ReportError(f"--metric {key!r} is not a number in every mode row "
                              f"(missing in {', '.join(missing[:3])}); "
                              f"numeric keys of the first row: {', '.join(numeric)}")
        known = next((m for m in KNOWN_METRICS if m.key == key), None)
        if known is not None:
            return known
        direction = declared.get("higher_is_better") if isinstance(declared, dict) and declared.get("key") == key \
            else None
        return Metric(key, key, higher_is_better=direction)
    for metric in KNOWN_METRICS:
        if all(isinstance(row.get(metric.key), (int, float)) for row in rows):
            return metric
    raise ReportError(f"none of {', '.join(m.key for m in KNOWN_METRICS)} is in every mode row; pick a metric "
                      f"with --metric (numeric keys of the first row: {', '.join(numeric)})")


def summarize(runs: Sequence[Run], metric: Metric, baseline: str | None = None) -> tuple[list[ModeSummary], str]:
    """Group rows by mode name and add paired differences; returns (modes, baseline name), the baseline first,
    then the recipe's order (`recipe_order`), whatever order the folders were given in.

    The default baseline is the first mode that trains everything (kind ``full``), else the first mode.
    """
    modes: dict[str, ModeSummary] = {}
    for run in runs:
        for row in run.metrics["modes"]:
            mode = modes.setdefault(row["name"], ModeSummary(row["name"], row))
            seed = row.get("seed", run.seed)
            if seed in mode.values:
                raise ReportError(f"mode {row['name']!r} has two results for seed {seed} ({run.path} is the second); "
                                  f"pass one run folder per seed and mode")
            mode.values[seed] = metric.scale * float(row[metric.key])
            if isinstance(row.get("trainable_percent"), (int, float)):
                mode.trainable_percent.append(float(row["trainable_percent"]))
            if isinstance(row.get("trainable_params_end"), int) and row.get("total_params"):
                mode.trainable_percent_end.append(100 * row["trainable_params_end"] / row["total_params"])
            if isinstance(row.get("trainable_params_excl_embeddings"), int):
                mode.trainable_excl_embeddings.append(row["trainable_params_excl_embeddings"])
            if isinstance(row.get("train_time_s"), (int, float)):
                mode.train_time_s.append(float(row["train_time_s"]))
            if row.get("train_loss"):
                mode.loss_curves.append(row["train_loss"])
            ncc = _ncc_of(row, run.path)
            if ncc:
                mode.ncc.append(ncc)
            if isinstance(row.get("adaptive"), dict):
                mode.adaptive_locks[seed] = row["adaptive"]
    if baseline is None:
        baseline = next((m.name for m in modes.values() if m.treatment == "full"), next(iter(modes)))
    elif baseline not in modes:
        raise ReportError(f"--baseline {baseline!r} is not a mode of these runs; modes: {', '.join(modes)}")
    reference = modes[baseline].values
    for mode in modes.values():
        shared = [seed for seed in mode.values if seed in reference]
        if mode.name != baseline and shared:
            mode.delta = paired_interval([mode.values[s] - reference[s] for s in shared])
    order = recipe_order(runs)
    rank = {name: (name != baseline, order.index(name) if name in order else len(order)) for name in modes}
    return sorted(modes.values(), key=lambda mode: rank[mode.name]), baseline


def recipe_order(runs: Sequence[Run]) -> list[str]:
    """Mode names in the order the recipe lists them (config.yaml's ``modes``, every mode even in a folder that
    trained some with ``--only``), then those only metrics.json knows, in the order the folders hold them.

    Folders are often given by a shell glob, sorted by name; a table in that order would not start with the
    baseline and would reorder the recipe's deliberate sequence.
    """
    names: list[str] = []
    entries = [entry for run in runs for entry in ((run.config or {}).get("modes") or [])]
    rows = [row for run in runs for row in run.metrics["modes"]]
    for name in [entry.get("name") for entry in entries if isinstance(entry, dict)] + [row["name"] for row in rows]:
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names


def _locks_cell(locks_by_seed: dict[int | None, dict[str, Any]]) -> str:
    """Adaptive-ETF's locks in every seed: seeds can lock different blocks at different steps, and showing only
    the first seed's locks would pass them off as the mode's."""
    seeds_by_text: dict[str, list[int | None]] = {}
    for seed, adaptive in sorted(locks_by_seed.items(), key=lambda item: (item[0] is None, item[0] or 0)):
        seeds_by_text.setdefault(_locks_text(adaptive), []).append(seed)
    if len(seeds_by_text) == 1:
        text, seeds = next(iter(seeds_by_text.items()))
        every = " (every seed)" if len(seeds) > 1 else ""
        return f"none locked{every}" if text == "none" else f"locked: {text}{every}"
    return "locked: " + "; ".join(f"{text} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
                                  for text, seeds in seeds_by_text.items())


def _locks_text(adaptive: dict[str, Any]) -> str:
    """``4, 5 at step 250`` (blocks, and the training steps at which they were locked), or ``none``."""
    locked = adaptive.get("locked") or []
    if not locked:
        return "none"
    steps = sorted({int(step) for step in (adaptive.get("lock_steps") or {}).values()})
    blocks = ", ".join(map(str, locked))
    if not steps:
        return blocks
    return f"{blocks} at step {steps[0]}" if len(steps) == 1 else f"{blocks} at steps {steps[0]}–{steps[-1]}"


def _lock_losses(mode: ModeSummary) -> dict[int | None, list[dict[str, Any]]]:
    """Adaptive-ETF's probe losses around each lock, per seed (the runner's record of the callback's
    ``lock_losses``, the numbers it logged as ``etf/lock_loss_before|after``)."""
    return {seed: adaptive["lock_losses"] for seed, adaptive in mode.adaptive_locks.items()
            if adaptive.get("lock_losses")}


def _lock_losses_cell(mode: ModeSummary) -> str:
    """``0.210 → 0.231 (+10.0 %)`` per lock, locks of a seed joined by commas, seeds by semicolons."""
    by_seed = _lock_losses(mode)
    if not by_seed:
        return "–"
    cells = []
    for seed, locks in sorted(by_seed.items(), key=lambda item: (item[0] is None, item[0] or 0)):
        text = ", ".join(f"{lock['before']:.3f} → {lock['after']:.3f} "
                         f"({_signed(100 * (lock['after'] - lock['before']) / lock['before'], 1)} %)" for lock in locks)
        cells.append(text if seed is None or len(by_seed) == 1 else f"seed {seed}: {text}")
    return "; ".join(cells)


def _ncc_of(row: dict[str, Any], run_dir: Path) -> list[float] | None:
    """Per-block NCC accuracy of a trained mode, if measured: the ``collapse.json`` that ``etf-hf probe
    --checkpoint RUN/MODE`` writes into the mode's folder, else Adaptive-ETF's last check."""
    probe_file = run_dir / row["name"] / "collapse.json"
    if probe_file.is_file():
        try:
            collapse = json.loads(probe_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ReportError(f"{str(probe_file)!r} is not valid JSON ({error}); rerun etf-hf probe "
                              f"--checkpoint {run_dir / row['name']} or delete it") from None
        rows = collapse.get("rows") if isinstance(collapse, dict) else None
        if isinstance(rows, list) and rows:
            return [float("nan") if r.get("ncc") is None else float(r["ncc"]) for r in rows]
    history = (row.get("adaptive") or {}).get("ncc_history") if isinstance(row.get("adaptive"), dict) else None
    if history:
        return [float(value) for value in history[-1]["ncc"]]
    return None


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def _plain(value: float, digits: int) -> str:
    return f"{value:.{digits}f}".replace("-", "−")


def _delta_cell(mode: ModeSummary, baseline: str, digits: int) -> str:
    if mode.name == baseline:
        return "baseline"
    interval = mode.delta
    if interval is None:
        return "no seed shared with the baseline"
    return format_interval(interval, digits)


def _mean_sd(values: Sequence[float], digits: int) -> str:
    if len(values) < 2:
        return _plain(values[0], digits)
    return f"{_plain(statistics.fmean(values), digits)} ± {_plain(statistics.stdev(values), digits)}"


def _trainable_cell(mode: ModeSummary) -> str:
    """Trainable share at the start, and at the end when it changed (Adaptive-ETF's locks)."""
    if not mode.trainable_percent:
        return "?"
    start = statistics.fmean(mode.trainable_percent)
    end = statistics.fmean(mode.trainable_percent_end) if mode.trainable_percent_end else start
    return f"{start:.1f}" if abs(end - start) < 0.05 else f"{start:.1f} → {end:.1f}"


def render_table(modes: Sequence[ModeSummary], baseline: str, metric: Metric) -> str:
    """The markdown comparison table: one row per mode."""
    digits = metric.digits
    # Shown when the runs recorded it: a text model's embedding matrix can be half its weights.
    excl = any(mode.trainable_excl_embeddings for mode in modes)
    # Shown when an Adaptive-ETF run logged them (etf/lock_loss_before|after): the cost of each lock.
    lock_losses = any(_lock_losses(mode) for mode in modes)
    lines = [f"| mode | FFN treatment | placement | {metric.label} (mean ± sd) | per seed | n "
             f"| Δ vs {baseline}, paired (95 % CI) | trainable % |"
             + (" trainable excl. input embeddings |" if excl else "")
             + (" probe loss at each lock (before → after) |" if lock_losses else "") + " train time (s) |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if excl else "") + ("---|" if lock_losses else "") + "---|"]
    for mode in modes:
        ordered = sorted(mode.values.items(), key=lambda item: (item[0] is None, item[0] or 0))
        per_seed = ", ".join(_plain(v, digits) for _, v in ordered)
        trainable = _trainable_cell(mode)
        if excl:
            counts = sorted(set(mode.trainable_excl_embeddings))
            trainable += " | " + ("/".join(f"{count:,}" for count in counts) if counts else "?")
        if lock_losses:
            trainable += " | " + _lock_losses_cell(mode)
        seconds = f"{statistics.fmean(mode.train_time_s):.1f}" if mode.train_time_s else "?"
        lines.append(f"| {mode.name} | {mode.kind} | {mode.placement} | {_mean_sd(list(mode.values.values()), digits)} "
                     f"| {per_seed} | {len(mode.values)} | {_delta_cell(mode, baseline, digits)} | {trainable} "
                     f"| {seconds} |")
    return "\n".join(lines)


def render_report(runs: Sequence[Run], modes: Sequence[ModeSummary], baseline: str, metric: Metric,
                  plots: Sequence[Path]) -> str:
    """The whole report.md: what was run, the table, how to read it, and the plots."""
    first = runs[0].metrics
    data = first.get("data") or {}
    seeds = sorted({seed for mode in modes for seed in mode.values if seed is not None})
    lines = [f"# {first.get('config_name', 'run')}: {first.get('task', '?')} on {data.get('source', '?')}", ""]
    lines.append(f"{len(runs)} run folder{'s' if len(runs) > 1 else ''} "
                 f"({', '.join(str(run.path) for run in runs)}); training seeds: "
                 f"{', '.join(map(str, seeds)) if seeds else 'not recorded'}.")
    lines.append("")
    lines.append(render_table(modes, baseline, metric))
    lines.append("")
    lines += _notes(runs, modes, baseline, metric)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{path.stem}]({path.name})" for path in plots]
    lines += ["", f"_Written by `etf-hf report` on {datetime.now():%Y-%m-%d %H:%M}._", ""]
    return "\n".join(lines)


def _notes(runs: Sequence[Run], modes: Sequence[ModeSummary], baseline: str, metric: Metric) -> list[str]:
    notes = []
    sizes = sorted({(run.metrics.get("data") or {}).get("test_examples") for run in runs} - {None})
    if sizes:
        size_text = " / ".join(f"{s:,}" for s in sizes)
        line = f"- Test set: {size_text} examples"
        if metric.scale == 100 and len(sizes) == 1:
            line += f"; one example is {100 / sizes[0]:.2f} points of {metric.label.rstrip(' %')}"
        notes.append(line + ".")
    else:
        notes.append("- Test set size: not recorded in metrics.json.")
    direction = {True: "higher is better", False: "lower is better", None: "direction not known"}[
        metric.higher_is_better]
    notes.append(f"- {metric.label}: final model after training, on the held-out test split ({direction}). "
                 f"Mean ± sample sd over seeds; Δ is the mean of per-seed differences to `{baseline}` (same seed, "
                 f"same initial weights and data order) with a 95 % t-interval; \"(within noise)\": the interval "
                 f"contains 0, so no difference is detectable at this number of seeds.")
    if any(_best_model_selected(run) for run in runs):
        notes.append("- **Caution**: `load_best_model_at_end` was on and etf-hf evaluates on the test split, so "
                     "these are best-checkpoint-on-test numbers (optimistic).")
    unlogged = [m.name for m in modes if not m.loss_curves]
    if unlogged:
        plot = "there is no loss plot" if len(unlogged) == len(modes) else "the loss plot leaves them out"
        notes.append(f"- No training loss was logged by {', '.join(unlogged)} (fewer optimizer steps than "
                     f"`training.logging_steps`), so {plot}; lower `training.logging_steps` to see their curves.")
    controls = [m.name for m in modes if m.is_control]
    if controls:
        notes.append(f"- Controls (not ETFs): {', '.join(controls)} — fixed weights with no ETF geometry at an ETF "
                     f"placement (`gaussian`: random, norm-matched; `zero`: weight removed, bias kept; `frozen`: "
                     f"the initial weight kept, norm-matched). An ETF row that does not beat the control at the same "
                     f"placement shows only that those layers can be fixed, not that ETF geometry helps.")
    notes.append(f"- {_environment_text(runs)}")
    return notes


def _best_model_selected(run: Run) -> bool:
    return bool(((run.config or {}).get("training") or {}).get("load_best_model_at_end"))


def _environment_text(runs: Sequence[Run]) -> str:
    environments = {json.dumps(run.metrics.get("environment") or {}, sort_keys=True) for run in runs}
    env = runs[0].metrics.get("environment") or {}
    if not env:
        return "Environment: not recorded."
    text = ", ".join(f"{key} {value}" for key, value in env.items())
    return f"Environment: {text}" + ("" if len(environments) == 1 else " (the runs' environments differ)") + "."


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _colour(index: int) -> str:
    return f"C{index % 10}"


def plot_loss_curves(modes: Sequence[ModeSummary], path: Path) -> Path | None:
    """Training loss per mode: each seed thin, the mean over seeds (at steps all seeds logged) bold."""
    if not any(mode.loss_curves for mode in modes):
        return None
    figure = new_figure(6.5, 4)
    axes = figure.add_subplot()
    for index, mode in enumerate(modes):
        for curve in mode.loss_curves:
            axes.plot([p["step"] for p in curve], [p["loss"] for p in curve], color=_colour(index),
                      alpha=0.3 if len(mode.loss_curves) > 1 else 1.0, linewidth=0.8,
                      label=None if len(mode.loss_curves) > 1 else mode.name)
        if len(mode.loss_curves) > 1:
            by_step = [{p["step"]: p["loss"] for p in curve} for curve in mode.loss_curves]
            steps = sorted(set.intersection(*(set(c) for c in by_step)))
            axes.plot(steps, [statistics.fmean(c[s] for c in by_step) for s in steps], color=_colour(index),
                      linewidth=2, label=f"{mode.name} (mean of {len(by_step)})")
    axes.set(xlabel="optimizer step", ylabel="training loss", title="training loss per mode")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


def far_outliers(distances: dict[int, float], ratio: float = 3.0) -> set[int]:
    """Modes (by index) so far from the baseline that drawing them would flatten every other difference: while
    the farthest is more than ``ratio`` times farther than the next one, it is set aside (a LoRA run at a
    learning rate it cannot learn with, 76 points below, next to differences of a point). When every other mode
    ties the baseline there is nothing to flatten, so nothing is set aside."""
    remaining = dict(distances)
    outliers: set[int] = set()
    while len(remaining) >= 3:
        ordered = sorted(remaining, key=remaining.__getitem__, reverse=True)
        farthest, next_one = remaining[ordered[0]], remaining[ordered[1]]
        if next_one == 0 or farthest <= ratio * next_one:
            break
        outliers.add(ordered[0])
        del remaining[ordered[0]]
    return outliers


def plot_metric(modes: Sequence[ModeSummary], metric: Metric, baseline: str, path: Path) -> Path:
    """Top: each seed's metric per mode (dots) with the mean ± sd (bar), controls hollow. Bottom: the paired
    difference to the baseline with its 95 % interval — what the table's Δ column says, and what the top panel
    cannot show when modes differ by less than the seeds do. A far outlier (`far_outliers`) is drawn as an
    arrow at the panel's edge with its value written beside it, so the other modes stay readable."""
    figure = new_figure(max(4.0, 1.2 * len(modes) + 2), 7)
    values_axes, delta_axes = figure.subplots(2, 1, sharex=True)
    reference = statistics.fmean(next(m for m in modes if m.name == baseline).values.values())
    means = {index: statistics.fmean(mode.values.values()) for index, mode in enumerate(modes)}
    hidden = far_outliers({index: abs(mean - reference) for index, mean in means.items()})
    for index, mode in enumerate(modes):
        if index in hidden:
            continue
        values = list(mode.values.values())
        values_axes.scatter([index] * len(values), values, color=_colour(index), alpha=0.6,
                            facecolors="none" if mode.is_control else _colour(index))
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        values_axes.errorbar([index + 0.15], [means[index]], yerr=[sd], color="black", capsize=4, marker="_")
        if mode.delta is not None:
            low = mode.delta.mean if mode.delta.low is None else mode.delta.low
            high = mode.delta.mean if mode.delta.high is None else mode.delta.high
            delta_axes.errorbar([index], [mode.delta.mean], yerr=[[mode.delta.mean - low], [high - mode.delta.mean]],
                                color=_colour(index), capsize=4, marker="o",
                                markerfacecolor="none" if mode.is_control else _colour(index))
    delta_axes.axhline(0.0, color="black", linewidth=0.8)
    for index in sorted(hidden):
        mode = modes[index]
        for axes, value in ((values_axes, means[index]), (delta_axes, mode.delta.mean if mode.delta else None)):
            if value is None:
                continue
            below = value < (reference if axes is values_axes else 0.0)
            edge = axes.get_ylim()[0 if below else 1]
            axes.annotate(f"{_plain(value, metric.digits)} (off scale)", (index, edge), ha="center",
                          va="bottom" if below else "top", fontsize=8, xytext=(0, 14 if below else -14),
                          textcoords="offset points",
                          arrowprops={"arrowstyle": "->", "color": _colour(index)})
    delta_axes.set_xticks(range(len(modes)), [m.name + (" (control)" if m.is_control else "") for m in modes],
                          rotation=30, ha="right")
    delta_axes.set_xlim(-0.5, len(modes) - 0.5)
    values_axes.set_ylabel(metric.label)
    values_axes.set_title(f"{metric.label}: seeds (dots), mean ± sd (bar)", fontsize=10)
    delta_axes.set_ylabel(f"Δ vs {baseline}")
    direction = {True: "; higher is better", False: "; lower is better"}.get(metric.higher_is_better, "")
    delta_axes.set_title(f"paired difference to {baseline} (mean, 95 % interval{direction})", fontsize=10)
    for axes in (values_axes, delta_axes):
        axes.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def plot_ncc(modes: Sequence[ModeSummary], path: Path) -> Path | None:
    """NCC accuracy per block and mode (mean over the seeds that measured it), when any mode has it."""
    measured = [(index, mode) for index, mode in enumerate(modes) if mode.ncc]
    if not measured:
        return None
    figure = new_figure(6.5, 4)
    axes = figure.add_subplot()
    for index, mode in measured:
        depth = min(len(curve) for curve in mode.ncc)
        mean = [statistics.fmean(curve[layer] for curve in mode.ncc) for layer in range(depth)]
        axes.plot(range(depth), mean, marker="o", color=_colour(index),
                  linestyle="--" if mode.is_control else "-", label=mode.name)
    axes.set_xticks(range(max(len(curve) for _, mode in measured for curve in mode.ncc)))
    axes.set(xlabel="block", ylabel="NCC accuracy", ylim=(0, 1.02))
    axes.set_title("NCC accuracy per block (etf-hf probe of the trained mode,\nor Adaptive-ETF's last check)",
                   fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def default_output(runs: Sequence[Run]) -> Path:
    """The run folder itself for one run; ``<common parent>/report-<recipe name>`` for several."""
    if len(runs) == 1:
        return runs[0].path
    parent = Path(os.path.commonpath([str(run.path.resolve()) for run in runs]))
    return parent / f"report-{runs[0].metrics.get('config_name', 'runs')}"


def write_report(run_dirs: Sequence[str | Path], output: str | Path | None = None, baseline: str | None = None,
                 metric: str | None = None) -> tuple[Path, str]:
    """Read the run folders, write report.md and the PNGs into ``output``; returns (report.md path, markdown)."""
    if not run_dirs:
        raise ReportError("give at least one run folder (written by `etf-hf train`)")
    runs = [load_run(path) for path in run_dirs]
    check_one_recipe(runs)
    chosen = choose_metric(runs, metric)
    modes, baseline = summarize(runs, chosen, baseline)
    out = Path(output) if output is not None else default_output(runs)
    out.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot_loss_curves(modes, out / "report_training_loss.png"),
                         plot_metric(modes, chosen, baseline, out / "report_metric.png"),
                         plot_ncc(modes, out / "report_ncc.png")) if p is not None]
    markdown = render_report(runs, modes, baseline, chosen, plots) + _frontier_markdown(runs, modes, baseline, chosen, out)
    report_file = out / "report.md"
    report_file.write_text(markdown, encoding="utf-8")
    return report_file, markdown


def _frontier_markdown(runs: Sequence[Run], modes: Sequence[ModeSummary], baseline: str, metric: Metric,
                       out: Path) -> str:
    """The cost–quality frontier section (`etf_hf.app.frontier`), for runs that measured step time and memory."""
    from .frontier import frontier_section

    lines, plots = frontier_section(runs, modes, baseline, metric, out)
    if not lines:
        return ""
    return "\n".join(["", *lines, "", *(f"![{path.stem}]({path.name})" for path in plots), ""])
