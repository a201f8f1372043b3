"""`etf-hf probe`: a recipe's model -> per-block neural-collapse table, effective depth, PNG and JSON.

Why a separate command: choosing *where* to fix ETFs (``layers: last:N``) is the paper's question of
effective depth -- from which block on are the features already nearest-class-mean separable? This
answers it for a recipe's model without training a single mode: as built (``--mode`` first applies that
mode's treatment, e.g. its ETF patch, to see what patching alone does), or for a trained mode saved by
`etf-hf train` (``--checkpoint RUN/MODE``). With a checkpoint the JSON lands in that mode's folder by default, where
`etf-hf report` finds it and plots NCC per block next to the comparison table.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import ConfigError, DataSplits, RunSpec, TASKS, build_model, default_run_dir, load_data

#: Columns printed per block (every row also carries the NC2 measures in the JSON).
TABLE_COLUMNS = ("ncc", "nc1", "etf_error", "cdnv")


@dataclass
class ProbeResult:
    """What `probe` measured and where it wrote it."""

    report: Any  # etf_hf.CollapseReport
    examples: int
    json_path: Path
    png_path: Path


def probe_model(spec: RunSpec, data: DataSplits, mode: str | None, checkpoint: str | Path | None) -> Any:
    """The model to probe: a saved checkpoint, or the model `etf-hf train` starts ``mode`` from (built with
    the recipe's training seed, then given the mode's treatment exactly as `etf-hf train` does)."""
    from .treatments import apply_mode, placement_data

    if checkpoint is not None:
        if mode is not None:
            raise ConfigError("--mode and --checkpoint exclude each other: a saved mode already carries its ETF "
                              "layers (config.etf); drop --mode")
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise ConfigError(f"--checkpoint {str(path)!r} holds no config.json: pass a mode folder written by "
                              f"`etf-hf train` (e.g. runs/quickstart-.../etf)")
        return TASKS[spec.task].auto_class.from_pretrained(path)
    modes = {m.name: m for m in spec.modes}
    if mode is not None and mode not in modes:
        raise ConfigError(f"--mode {mode!r} is not a mode of this recipe; modes: {', '.join(modes)}")
    model = build_model(spec, data, spec.training.get("seed", 42), modes.get(mode))
    if mode is None:
        return model
    placement = placement_data(modes[mode], "pretrained" in spec.model, data.train, len(data.label_names),
                               data.collator, spec.data["seed"])
    return apply_mode(model, modes[mode], **placement)


def format_rows(report: Any) -> str:
    """The per-block table as printed: block, NCC accuracy, NC1, ETF error, CDNV."""
    header = f"{'block':>5}  " + "  ".join(f"{name:>10}" for name in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for row in report.rows:
        cells = "  ".join(f"{row[name]:>10.4f}" if name == "ncc" else f"{row[name]:>10.4g}" for name in TABLE_COLUMNS)
        lines.append(f"{row['layer']:>5}  {cells}")
    depth = report.effective_depth
    lines.append(f"effective depth (NCC >= {report.threshold} in this block and every later one): "
                 + (f"block {depth}" if depth is not None else "none (the last block is below the threshold)"))
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard (json.dumps would write bare NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def probe(spec: RunSpec, mode: str | None = None, checkpoint: str | Path | None = None,
          output: str | Path | None = None, split: str = "train", samples: int = 2000, pooling: str = "auto",
          threshold: float = 0.9, batch_size: int = 256) -> ProbeResult:
    """Measure collapse per block on a sample of ``split``; write collapse.json and collapse.png to ``output``.

    Default ``output``: the checkpoint folder, else ``runs/probe-<recipe>-<timestamp>``.
    """
    from ..collapse import collapse_report, plot_collapse
    from .treatments import probe_subset

    if not TASKS[spec.task].has_labels:
        raise ConfigError(f"task {spec.task!r} has no class labels; neural collapse is measured per class, so "
                          f"probe needs a classification recipe")
    if split not in ("train", "test"):
        raise ConfigError(f"--split {split!r}: choose train or test")
    data = load_data(spec)
    model = probe_model(spec, data, mode, checkpoint)
    split_data = getattr(data, split)
    # the seeded random subset Adaptive-ETF and `layers: auto` measure on (random: a class-sorted source
    # would otherwise lose classes)
    dataset = probe_subset(split_data, samples if samples > 0 else len(split_data), spec.data["seed"])
    try:
        report = collapse_report(model, dataset, num_classes=len(data.label_names), pooling=pooling,
                                 threshold=threshold, batch_size=batch_size, collate_fn=data.collator)
    except ValueError as error:  # e.g. a model that returns no hidden states
        raise ConfigError(f"collapse report failed: {error}") from None
    if output is not None:
        out = Path(output)
    elif checkpoint is not None:
        out = Path(checkpoint)
    else:
        out = default_run_dir(f"probe-{spec.name}" + (f"-{mode}" if mode else ""))
    out.mkdir(parents=True, exist_ok=True)
    what = f"checkpoint {checkpoint}" if checkpoint is not None else (f"mode {mode!r}" if mode else "model as built")
    payload = {
        "config_name": spec.name, "task": spec.task, "mode": mode,
        "checkpoint": None if checkpoint is None else str(checkpoint), "split": split, "examples": len(dataset),
        "pooling": pooling, "threshold": threshold, "effective_depth": report.effective_depth,
        "rows": [{key: _finite(value) for key, value in row.items()} for row in report.rows],
    }
    json_path = out / "collapse.json"
    json_path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    png_path = plot_collapse(report, out / "collapse.png",
                             title=f"{spec.name}: {what}, {len(dataset)} {split} examples")
    return ProbeResult(report, len(dataset), json_path, png_path)
