"""The cost–quality frontier: is a fixed-frame model better than a *smaller dense* model of equal cost?

Three pieces, used by `etf_hf.app.runner` and `etf_hf.app.report`:

* **Dense baselines of any size in one recipe.** A mode of a ``from_config`` model may change the model's
  size settings (``model: {n_inner: 512}``, ``{n_layer: 2}``, ``{intermediate_size: 96}``), so a narrower
  or shallower dense model trains with the same data, seeds and ``TrainingArguments`` as the ETF modes, and
  lands in the same report. A mode may also have one size setting *derived* instead of picked::

      - name: dense_iso_etf_all
        match: {mode: etf_all, by: params, vary: n_inner}     # tolerance: 0.02 by default
      - name: dense_1layer_iso_etf_all
        model: {n_layer: 1}                                    # fixed settings first, then the solve
        match: {mode: etf_all, by: params, vary: n_inner}

  `validate_mode_models` counts the trainable weights of mode ``etf_all`` (its model built on the meta
  device and treated, no memory used), then solves for the ``vary`` setting at which this mode trains as
  many weights (the count is affine in a width or a depth), and refuses a match off by more than the
  tolerance. The derived value, the target and achieved counts and their relative error go into the
  mode's metrics.json row (``match``).
* **Cost measured in the training run** (`CostMeter`): the median optimizer-step time and the peak memory
  of each mode's real training run, so the time and memory axes come from the same runs as the metric.
  Iso-time and iso-memory are *not* derived before training: they are read off the measured points
  (`equal_cost_reference`); step time is compared as a ratio to the baseline mode of the same run folder,
  because absolute times on a shared machine drift with its load (recorded as ``load_average``).
* **The front** (`pareto_front`, `frontier_section`): per cost axis, the modes that no other mode beats
  at no more cost, plotted with 95 % intervals over seeds, and for every non-dense mode the dense mode of
  equal cost it is compared with, paired by seed.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .recipe import ConfigError, expect, reject_unknown
from .treatments import ModeSpec, apply_mode

#: Model settings every mode shares: the data is prepared once, for the recipe's model (vocabulary,
#: positions, image size and channels), and the labels come from the data.
SHARED_MODEL_KEYS = ("model_type", "vocab_size", "n_positions", "max_position_embeddings", "image_size",
                     "num_channels", "num_labels", "id2label", "label2id", "bos_token_id", "eos_token_id",
                     "pad_token_id")
MATCH_KEYS = ("mode", "by", "vary", "tolerance")
#: What a match equalises before training. Step time and memory are measured, not derived (see above).
MATCH_BY = ("params",)
DEFAULT_TOLERANCE = 0.02


@dataclass
class Match:
    """A validated ``match``; `derive` fills in ``value`` (the derived setting) and the two counts."""

    mode: str
    by: str
    vary: str
    tolerance: float
    value: int | None = None
    target: int | None = None
    achieved: int | None = None

    def record(self) -> dict[str, Any]:
        """What metrics.json keeps: how the match was made and how close it is."""
        return {"mode": self.mode, "by": self.by, "vary": self.vary, "value": self.value,
                "target_trainable_params": self.target, "achieved_trainable_params": self.achieved,
                "relative_error": (self.achieved - self.target) / self.target, "tolerance": self.tolerance}


# --------------------------------------------------------------------------------------------------
# Recipe: per-mode model settings and derived matches
# --------------------------------------------------------------------------------------------------


def validate_mode_models(model: dict[str, Any], modes: list[ModeSpec],
                         skeleton: Callable[[ModeSpec], torch.nn.Module]) -> None:
    """Check every mode's ``model`` and ``match`` against the recipe's ``model`` section, then derive the
    matched settings in place (``mode.model[vary]``). ``skeleton(mode)`` builds the mode's model on the
    meta device."""
    names = [mode.name for mode in modes]
    for i, mode in enumerate(modes):
        where = f"modes[{i}]"
        if (mode.model or mode.match is not None) and "pretrained" in model:
            key = "model" if mode.model else "match"
            raise ConfigError(f"{where}.{key}: a pretrained model's size is fixed by its checkpoint (its weights "
                              f"would not fit another size); per-mode model settings need model.from_config")
        if mode.model:
            _check_model_settings(model["from_config"], mode.model, f"{where}.model")
            _build(mode, skeleton, f"{where}.model")
        if mode.match is not None:
            mode.match = _validate_match(mode.match, f"{where}.match", mode, names)
    for i, mode in enumerate(modes):
        if mode.match is not None:
            derive(mode, modes[names.index(mode.match.mode)], skeleton, f"modes[{i}].match")


def _check_model_settings(from_config: dict[str, Any], settings: dict[str, Any], where: str) -> None:
    """Every key must be a setting of the model type's config, and not one the data depends on; the merged
    config is built once so that transformers' own checks (heads dividing the width) name the mode."""
    from transformers import AutoConfig
    from huggingface_hub.errors import StrictDataclassError

    defaults = AutoConfig.for_model(from_config["model_type"])
    for key in settings:
        if key in SHARED_MODEL_KEYS:
            raise ConfigError(f"{where}.{key}: every mode shares it (the data is prepared once for the recipe's "
                              f"model); set it in model.from_config instead")
        if not hasattr(defaults, key):
            raise ConfigError(f"unknown key {where}.{key}: {type(defaults).__name__} has no such setting")
    try:
        AutoConfig.for_model(**{**from_config, **settings})
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConfigError(f"{where}: {type(defaults).__name__} rejected the settings: {error}") from None


def _build(mode: ModeSpec, skeleton: Callable[[ModeSpec], torch.nn.Module], where: str) -> torch.nn.Module:
    """The mode's model on the meta device: some settings pass the config and fail only in the model
    (GPT-2's width not divisible by its heads), which must not wait until the mode's turn to train."""
    try:
        return skeleton(mode)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ConfigError(f"{where}: the model could not be built with {mode.model}: {error}") from None


def _validate_match(value: Any, where: str, mode: ModeSpec, names: list[str]) -> Match:
    expect(value, dict, where, "a mapping like {mode: etf, by: params, vary: n_inner}")
    reject_unknown(value, MATCH_KEYS, where)
    for key in ("mode", "vary"):
        if key not in value:
            raise ConfigError(f"{where}.{key} is required, e.g. {{mode: etf, by: params, vary: n_inner}}")
    target = expect(value["mode"], str, f"{where}.mode", "the name of another mode of this recipe")
    if target not in names or target == mode.name:
        raise ConfigError(f"{where}.mode {target!r} must name another mode of this recipe: "
                          f"{', '.join(n for n in names if n != mode.name)}")
    by = expect(value.get("by", "params"), str, f"{where}.by", f"one of {', '.join(MATCH_BY)}")
    if by not in MATCH_BY:
        raise ConfigError(f"{where}.by {by!r}: only {', '.join(MATCH_BY)} is derived before training; step time and "
                          f"memory are measured in the run and compared by etf-hf report (equal-cost columns)")
    vary = expect(value["vary"], str, f"{where}.vary", "an integer size setting of the model config, e.g. n_inner")
    if vary in mode.model:
        raise ConfigError(f"{where}.vary {vary!r} is derived by the match, and {where.rsplit('.', 1)[0]}.model sets it "
                          f"too: remove one of them")
    if vary in SHARED_MODEL_KEYS:
        raise ConfigError(f"{where}.vary {vary!r}: every mode shares it (the data is prepared for it)")
    tolerance = expect(value.get("tolerance", DEFAULT_TOLERANCE), (int, float), f"{where}.tolerance",
                       "a relative error in (0, 1), e.g. 0.02")
    if not 0 < tolerance < 1:
        raise ConfigError(f"{where}.tolerance must lie in (0, 1), got {tolerance}")
    return Match(target, by, vary, float(tolerance))


def trainable_count(mode: ModeSpec, skeleton: Callable[[ModeSpec], torch.nn.Module], where: str) -> int:
    """Weights the mode trains at its start, counted on a meta-device model given the mode's treatment."""
    return sum(p.numel() for p in apply_mode(_build(mode, skeleton, where), mode).parameters() if p.requires_grad)


def derive(mode: ModeSpec, target: ModeSpec, skeleton: Callable[[ModeSpec], torch.nn.Module], where: str) -> None:
    """Set ``mode.model[vary]`` so that ``mode`` trains as many weights as ``target``.

    The count is affine in a width (``n_inner``, ``intermediate_size``) or a depth (``n_layer``), so two
    counts give the solution; the neighbours of the rounded solution are counted too, so a setting with a
    mildly non-affine count (a hidden size) still lands on the closest integer.
    """
    match: Match = mode.match
    if target.adaptive is not None or target.match is not None:
        raise ConfigError(f"{where}.mode {target.name!r}: match a mode whose trainable count is known before "
                          f"training (not Adaptive-ETF, which locks blocks as it trains, nor another match)")
    if target.etf is not None and target.etf.layers == "auto":
        raise ConfigError(f"{where}.mode {target.name!r} places its frames from data (layers: auto), so its "
                          f"trainable count is known only at training time: give it layers")
    goal = trainable_count(target, skeleton, f"{where}.mode {target.name!r}")

    def count(value: int) -> int:
        return trainable_count(ModeSpec(**{**vars(mode), "model": {**mode.model, match.vary: value}}), skeleton, where)

    low, high = count(1), count(2)
    if high == low:
        raise ConfigError(f"{where}.vary {match.vary!r} does not change the trainable count of mode {mode.name!r}; "
                          f"vary a size setting (n_inner, n_layer, intermediate_size, ...)")
    guess = max(1, round(1 + (goal - low) / (high - low)))
    value = min(range(max(1, guess - 1), guess + 2), key=lambda v: abs(count(v) - goal))
    achieved = count(value)
    error = (achieved - goal) / goal
    if abs(error) > match.tolerance:
        raise ConfigError(f"{where}: mode {target.name!r} trains {goal:,} weights; the closest {match.vary} is "
                          f"{value} with {achieved:,} ({100 * error:+.1f} %, tolerance {100 * match.tolerance:g} %): "
                          f"fix another setting in this mode's model (e.g. fewer layers) or raise tolerance")
    mode.model = {**mode.model, match.vary: value}
    match.value, match.target, match.achieved = value, goal, achieved


# --------------------------------------------------------------------------------------------------
# Cost measured in the training run
# --------------------------------------------------------------------------------------------------


class CostMeter(TrainerCallback):
    """A `TrainerCallback` measuring the wall time and the process CPU time of every optimizer step
    (forward, backward, optimizer; not data loading) and the peak memory of the training run.

    CPU time is the cost measure that survives a loaded machine: wall time there includes the waits for a
    core that other processes hold, CPU time only the work this process did (all its threads). On a GPU
    the wall time is the measure (the CPU mostly waits).

    Memory is `etf_hf.app.bench.MemoryMeter`'s: CUDA ``max_memory_allocated``, on CPU the peak resident set
    from before the model was built (create the meter first) through training, so weights, gradients,
    optimizer state and activations count. The first `WARMUP` steps are left out of the median.
    """

    WARMUP = 3

    def __init__(self, device: torch.device) -> None:
        from .bench import MemoryMeter

        self.device = torch.device(device)
        self.memory = MemoryMeter(self.device)
        self.memory.before_build()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self._cpu_begin = 0.0
        self.peak: int | None = None
        self.load: list[float] = []
        self._begin = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.memory.reset_peak()
        self.load = list(os.getloadavg())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self._begin, self._cpu_begin = time.perf_counter(), time.process_time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._begin)
        self.cpu_times.append(time.process_time() - self._cpu_begin)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.peak = self.memory.peak()

    def record(self, mode: ModeSpec) -> dict[str, Any]:
        """The mode's metrics.json fields: its model settings and match, step time, memory, machine load."""
        skip = self.WARMUP if len(self.times) > self.WARMUP else 0
        timed, cpu = self.times[skip:], self.cpu_times[skip:]
        return {
            "model": dict(mode.model),
            "match": mode.match.record() if mode.match is not None else None,
            "step_time_s_median": statistics.median(timed) if timed else None,
            "step_cpu_time_s_median": statistics.median(cpu) if cpu and self.device.type == "cpu" else None,
            "steps_timed": len(timed),
            "peak_memory_bytes": self.peak,
            "memory_kind": self.memory.kind or "cuda max_memory_allocated",
            "load_average": {"start": self.load, "end": list(os.getloadavg())},
        }


# --------------------------------------------------------------------------------------------------
# The front
# --------------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the (cost, metric) points that no other point dominates: none costs at most as much and
    is at least as good while strictly cheaper or better. Equal points are both on the front."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(c <= cost and sign * v >= sign * value and (c < cost or sign * v > sign * value)
                        for j, (c, v) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


#: The cost axes of the report: (key, label, how much more a dense mode may cost and still be "equal").
AXES = (("params", "trainable parameters", 0.02), ("time", "step time / baseline's", 0.05),
        ("memory", "peak memory (MiB)", 0.05))


@dataclass
class FrontierPoint:
    """One mode on the cost axes: mean costs over seeds, the metric's mean and 95 % interval."""

    summary: Any  # etf_hf.app.report.ModeSummary
    costs: dict[str, float | None]
    interval: Any  # etf_hf.app.report.Interval

    @property
    def dense(self) -> bool:
        return self.summary.treatment == "full"


def time_key(runs: Sequence[Any]) -> str:
    """The step time the time axis uses: CPU time when every row has it (CPU runs), else wall time."""
    rows = [row for run in runs for row in run.metrics["modes"]]
    return "step_cpu_time_s_median" if all(row.get("step_cpu_time_s_median") for row in rows) else "step_time_s_median"


def frontier_points(runs: Sequence[Any], modes: Sequence[Any], baseline: str) -> list[FrontierPoint]:
    """Costs per mode: trainable parameters, the median step time (`time_key`) as a ratio to the baseline
    mode's of the same seed (mean over seeds), and peak memory (mean over seeds). A cost a row does not
    record is None."""
    from .report import paired_interval

    rows: dict[str, dict[Any, dict[str, Any]]] = {}
    for run in runs:
        for row in run.metrics["modes"]:
            rows.setdefault(row["name"], {})[row.get("seed", run.seed)] = row
    reference = rows.get(baseline, {})
    key = time_key(runs)
    points = []
    for mode in modes:
        by_seed = rows[mode.name]
        ratios = [row[key] / reference[seed][key] for seed, row in by_seed.items()
                  if row.get(key) and (reference.get(seed) or {}).get(key)]
        memory = [row["peak_memory_bytes"] / 2**20 for row in by_seed.values() if row.get("peak_memory_bytes")]
        params = [row["trainable_params"] for row in by_seed.values() if isinstance(row.get("trainable_params"), int)]
        costs = {"params": statistics.fmean(params) if params else None,
                 "time": statistics.fmean(ratios) if ratios else None,
                 "memory": statistics.fmean(memory) if memory else None}
        points.append(FrontierPoint(mode, costs, paired_interval(list(mode.values.values()))))
    return points


def equal_cost_reference(point: FrontierPoint, points: Sequence[FrontierPoint], axis: str,
                         slack: float) -> FrontierPoint | None:
    """The dense mode of equal cost on ``axis``: the cheapest dense mode costing at least as much as
    ``point`` (less ``slack``, relative: a derived iso-parameter match may land a little below), or None."""
    cost = point.costs[axis]
    if cost is None:
        return None
    candidates = [p for p in points if p.dense and p.costs[axis] is not None and p.costs[axis] >= (1 - slack) * cost]
    return min(candidates, key=lambda p: p.costs[axis], default=None)


def _verdict(point: FrontierPoint, reference: FrontierPoint, higher_is_better: bool | None, digits: int) -> str:
    """Paired Δ (point − reference, by seed) with its interval, and what it means."""
    from .report import format_interval, paired_interval

    mine, theirs = point.summary.values, reference.summary.values
    shared = [seed for seed in mine if seed in theirs]
    if not shared:
        return "no shared seed"
    interval = paired_interval([mine[s] - theirs[s] for s in shared])
    cell = format_interval(interval, digits)
    if interval.within_noise is False and higher_is_better is not None:
        better = (interval.mean > 0) == higher_is_better
        cell += " **better**" if better else " worse"
    overlap = point.interval.low is not None and reference.interval.low is not None and not (
        point.interval.high < reference.interval.low or reference.interval.high < point.interval.low)
    return cell + ("; 95 % intervals of the means overlap" if overlap else "")


def _cost_text(axis: str, value: float | None) -> str:
    if value is None:
        return "?"
    return {"params": f"{value:,.0f}", "time": f"{value:.2f}", "memory": f"{value:.1f}"}[axis]


def frontier_section(runs: Sequence[Any], modes: Sequence[Any], baseline: str, metric: Any,
                     out: Path) -> tuple[list[str], list[Path]]:
    """The report's frontier: a table of costs and metric intervals with each mode's place on the front per
    axis, a table comparing every non-dense mode with the dense mode of equal cost, and one PNG per axis.
    Empty when the runs recorded no step time (written before `CostMeter`)."""
    points = frontier_points(runs, modes, baseline)
    if all(p.costs["time"] is None for p in points):
        return [], []
    from .report import _plain

    digits = metric.digits
    clock = "CPU time (process)" if time_key(runs) == "step_cpu_time_s_median" else "wall time"
    fronts = {axis: _front_of(points, axis, metric.higher_is_better) for axis, _, _ in AXES}
    lines = ["## Cost–quality frontier", "",
             f"{metric.label}: mean over seeds with its 95 % t-interval. Dense modes train every weight of their "
             f"(possibly smaller) model. On front: no other mode is at least as good at no more cost on that axis "
             f"(means). Step time: the mode's median optimizer-step {clock} over the baseline `{baseline}`'s in the "
             f"same run folder (same seed, same process), mean over seeds.", "",
             f"| mode | FFN treatment | model | trainable | step time / {baseline} | peak memory MiB "
             f"| {metric.label} (95 % CI) | on front: params / time / memory |", "|---|---|---|---|---|---|---|---|"]
    for index, point in enumerate(points):
        model = ", ".join(f"{k}={v}" for k, v in (point.summary.row.get("model") or {}).items()) or "recipe's"
        ci = point.interval
        value = _plain(ci.mean, digits) + (f" [{_plain(ci.low, digits)}, {_plain(ci.high, digits)}]"
                                           if ci.low is not None else " (1 seed)")
        on = " / ".join("yes" if index in fronts[axis] else ("–" if point.costs[axis] is None else "no")
                        for axis, _, _ in AXES)
        lines.append(f"| {point.summary.name} | {point.summary.kind} | {model} | {_cost_text('params', point.costs['params'])} "
                     f"| {_cost_text('time', point.costs['time'])} | {_cost_text('memory', point.costs['memory'])} "
                     f"| {value} | {on} |")
    lines += ["", "Each non-dense mode against the dense mode of equal cost: the cheapest dense mode costing at least "
              "as much (within 2 % for parameters, 5 % for time and memory), Δ = mode − dense, paired by seed, "
              "95 % t-interval.", "", "| mode | axis | equal-cost dense mode (its cost vs this mode's) | Δ |",
              "|---|---|---|---|"]
    for point in points:
        if point.dense:
            continue
        for axis, label, slack in AXES:
            reference = equal_cost_reference(point, points, axis, slack)
            if reference is None:
                cell, verdict = "none costs as much" if point.costs[axis] is not None else "not measured", "–"
            else:
                cell = (f"{reference.summary.name} ({_cost_text(axis, reference.costs[axis])} vs "
                        f"{_cost_text(axis, point.costs[axis])})")
                verdict = _verdict(point, reference, metric.higher_is_better, digits)
            lines.append(f"| {point.summary.name} | {axis} | {cell} | {verdict} |")
    loads = sorted({round(row["load_average"]["start"][0], 1) for run in runs for row in run.metrics["modes"]
                    if isinstance(row.get("load_average"), dict)})
    if loads:
        lines += ["", f"- 1-minute load average at the start of the modes' training: {loads[0]}–{loads[-1]} "
                  f"(in each mode's metrics.json row); times on a loaded machine are noisy, hence ratios."]
    labels = {axis: label for axis, label, _ in AXES}
    labels["time"] = f"step {clock} / {baseline}'s (same run)"
    plots = [path for axis in labels
             if (path := plot_frontier(points, axis, labels[axis], fronts[axis], metric,
                                       out / f"report_frontier_{axis}.png"))]
    return lines, plots


def _front_of(points: Sequence[FrontierPoint], axis: str, higher_is_better: bool | None) -> set[int]:
    measured = [i for i, p in enumerate(points) if p.costs[axis] is not None]
    front = pareto_front([(points[i].costs[axis], points[i].interval.mean) for i in measured],
                         higher_is_better is not False)
    return {measured[i] for i in front}


def plot_frontier(points: Sequence[FrontierPoint], axis: str, label: str, front: set[int], metric: Any,
                  path: Path) -> Path | None:
    """Metric (mean, 95 % interval) against one cost: dense modes as squares, ETF modes as circles (controls
    hollow), other treatments as triangles; the front joined by a step line and ringed."""
    from matplotlib import colormaps

    from ..plotting import new_figure, save_figure

    measured = [(i, p) for i, p in enumerate(points) if p.costs[axis] is not None]
    if not measured:
        return None
    palette = colormaps["tab20"]  # a frontier study has more modes than the default 10 colours

    def _colour(index: int) -> Any:
        return palette(index % palette.N)

    figure = new_figure(10, 5)
    axes = figure.add_subplot()
    for index, point in measured:
        marker = "s" if point.dense else "o" if point.summary.treatment == "etf" else "^"
        ci = point.interval
        yerr = None if ci.low is None else [[ci.mean - ci.low], [ci.high - ci.mean]]
        axes.errorbar([point.costs[axis]], [ci.mean], yerr=yerr, marker=marker, color=_colour(index), capsize=3,
                      markersize=7, markerfacecolor="none" if point.summary.is_control else _colour(index),
                      linestyle="none", label=point.summary.name)
    on_front = sorted((points[i].costs[axis], points[i].interval.mean) for i in front)
    if on_front:
        axes.step([c for c, _ in on_front], [v for _, v in on_front], where="post", color="black", linewidth=0.8,
                  alpha=0.6)
        axes.scatter([c for c, _ in on_front], [v for _, v in on_front], s=180, facecolors="none",
                     edgecolors="black", linewidths=1.2, label="Pareto front", zorder=3)
    if axis == "params":
        axes.set_xscale("log")
    direction = {True: "higher is better", False: "lower is better"}.get(metric.higher_is_better, "")
    axes.set(xlabel=label, ylabel=metric.label,
             title=f"{metric.label} vs {label}\n(squares: dense, circles: ETF, hollow: control; {direction})")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return save_figure(figure, path)
