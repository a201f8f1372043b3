"""Per-block neural-collapse report of a transformers model: NCC accuracy, NC1, ETF error per block.

Why per block: the paper's "effective depth" is the first block from which the features of every later
block are already nearest-class-mean separable (NCC accuracy >= a threshold); those later blocks are the
candidates for fixed ETF weights, and `AdaptiveETFCallback` locks them during training from exactly
this measurement.

Features come from ``output_hidden_states=True`` (entry 0, the embeddings or the MLP's input layer, is not
a block and is not reported; entry i + 1 is block i's output) and are pooled to one vector per example:

  cls   the first token (BERT, RoBERTa, ViT: what their classification heads read)
  last  the last non-padding token, found from ``attention_mask`` whichever side is padded (GPT-2, Llama)
  mean  the mean over non-padding tokens
  flat  every feature of an example, flattened (the MLP, whose hidden states are already vectors)

Hidden states that are already (batch, dim) are used as they are under any pooling. Statistics are
streamed (`CollapseStatistics`, then a second pass for `NearestClassMeanAccuracy` against the final
class means), so the data set never has to fit in memory. The same measures per block come from Trainer's
``compute_metrics`` with `etf_hf.CollapseMetrics` (``etf_hf/trainer_metrics.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import default_data_collator

from .architectures import model_architecture
from .metrics import CollapseStatistics, NearestClassMeanAccuracy, ReduceFn, collapse_passes

POOLINGS = ("auto", "cls", "last", "mean", "flat")


@dataclass
class CollapseReport:
    """One row per block (``layer`` = block index) and the effective depth read from them."""

    rows: list[dict[str, float]]
    effective_depth: int | None
    threshold: float

    @classmethod
    def from_measures(cls, statistics: Sequence[CollapseStatistics], accuracies: Sequence[NearestClassMeanAccuracy],
                      threshold: float) -> CollapseReport:
        """The report of finished per-block accumulators (both passes done, reduced where distributed)."""
        rows = [{"layer": index, "ncc": accuracy.compute(), **stats.compute()}
                for index, (stats, accuracy) in enumerate(zip(statistics, accuracies))]
        return cls(rows, effective_depth([row["ncc"] for row in rows], threshold), threshold)

    @property
    def ncc(self) -> list[float]:
        return [row["ncc"] for row in self.rows]

    def __str__(self) -> str:
        lines = [f"{'layer':>5} {'ncc':>7} {'nc1':>10} {'etf_error':>9}"]
        lines += [f"{row['layer']:>5} {row['ncc']:>7.4f} {row['nc1']:>10.4g} {row['etf_error']:>9.4f}" for row in self.rows]
        lines.append(f"effective depth (NCC >= {self.threshold} from this block on): {self.effective_depth}")
        return "\n".join(lines)


def effective_depth(ncc: Sequence[float], threshold: float, strict: bool = False) -> int | None:
    """The first block from which NCC accuracy stays >= ``threshold`` (``strict``: > ``threshold``) in every
    later block; None if the last block's does not (nan never counts).

    Reports and ``layers="auto"`` use >=; Adaptive-ETF's lock rule asks strictly above (the paper's
    "above the threshold"), so a block sitting exactly at it is not locked on the strength of a tie."""
    depth = None
    for index in range(len(ncc) - 1, -1, -1):
        value = ncc[index]
        if not (value > threshold if strict else value >= threshold):
            break
        depth = index
    return depth


def resolve_pooling(model: nn.Module, pooling: str) -> str:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
    if pooling != "auto":
        return pooling
    architecture = model_architecture(model)
    return architecture.pooling if architecture is not None else "mean"


def pool(hidden: torch.Tensor, pooling: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens, dim) -> (batch, dim) by ``pooling`` (``flat``: (batch, tokens * dim))."""
    if hidden.dim() == 2:
        return hidden
    if pooling == "flat":
        return hidden.reshape(hidden.shape[0], -1)
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden[:, -1] if pooling == "last" else hidden.mean(1)
    mask = attention_mask.to(hidden.device)
    if pooling == "last":
        # position of the last 1 in each row: right padding (1 1 1 0 0) and left padding (0 0 1 1 1) alike
        positions = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def pool_blocks(hidden_states: Sequence[torch.Tensor] | None, pooling: str,
                attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One pooled (batch, dim) feature matrix per block from a model's ``hidden_states`` (entry 0, the
    embeddings, is not a block)."""
    if not hidden_states or len(hidden_states) < 2:
        count = len(hidden_states) if hidden_states else 0
        raise ValueError(f"got {count} hidden states, need the embeddings and one per block: run the model with "
                         "output_hidden_states=True")
    return [pool(hidden, pooling, attention_mask) for hidden in hidden_states[1:]]


def _batches(data: Any, batch_size: int, collate_fn: Callable | None) -> Iterable[Mapping[str, Any]]:
    """A re-iterable stream of batch dicts: a DataLoader or list of batches as given, a data set wrapped."""
    if isinstance(data, (DataLoader, list, tuple)):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or default_data_collator)


def _block_features(model: nn.Module, batch: Mapping[str, Any], label_key: str, pooling: str,
                    device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
              for key, value in batch.items() if key != label_key}
    if label_key not in batch:
        raise ValueError(f"batch has no {label_key!r} (keys: {sorted(batch)}); pass label_key=")
    hidden_states = model(**inputs, output_hidden_states=True).hidden_states
    return pool_blocks(hidden_states, pooling, inputs.get("attention_mask")), torch.as_tensor(batch[label_key])


def collapse_report(
    model: nn.Module,
    data: Any,
    num_classes: int | None = None,
    pooling: str = "auto",
    threshold: float = 0.9,
    batch_size: int = 256,
    collate_fn: Callable | None = None,
    label_key: str = "labels",
    reduce_fn: ReduceFn | None = None,
) -> CollapseReport:
    """Neural-collapse measures of every block's features on ``data``, and the effective depth.

    data: a DataLoader, a list of batch dicts, or a data set of example dicts (batched with ``collate_fn``,
        default `transformers.default_data_collator`). It is read twice (NCC needs the final class means).
    num_classes: default ``model.config.num_labels``.
    reduce_fn: a sum all-reduce (``torch.distributed.all_reduce``) when each rank streams its own shard;
        every rank must then call this, and every rank gets the measures of the union.

    The model runs in eval mode without gradients (BatchNorm uses its running statistics, dropout is
    off: the features the trained network actually computes) and is put back in its previous mode.
    Rows hold ``layer``, ``ncc`` and every `CollapseStatistics.compute` measure (``nc1``, ``etf_error``,
    ``nc2_*``, ``cdnv``).
    """
    num_classes = num_classes or getattr(getattr(model, "config", None), "num_labels", None)
    if not num_classes:
        raise ValueError("num_classes is needed (the model's config has no num_labels)")
    pooling = resolve_pooling(model, pooling)
    batches = _batches(data, batch_size, collate_fn)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            statistics, accuracies = collapse_passes(
                lambda: (_block_features(model, batch, label_key, pooling, device) for batch in batches),
                num_classes, device, reduce_fn)
    finally:
        model.train(was_training)
    return CollapseReport.from_measures(statistics, accuracies, threshold)


def plot_collapse(report: CollapseReport, path: str | Path, title: str | None = None) -> Path:
    """PNG of NCC accuracy (with the threshold and the effective depth) and NC1 (log scale) per block."""
    from .plotting import new_figure, save_figure

    layers = [row["layer"] for row in report.rows]
    figure = new_figure(9, 3.5, dpi=120)
    ncc_axis, nc1_axis = figure.subplots(1, 2)
    ncc_axis.plot(layers, report.ncc, marker="o")
    ncc_axis.axhline(report.threshold, color="grey", linestyle="--", label=f"threshold {report.threshold}")
    if report.effective_depth is not None:
        ncc_axis.axvline(report.effective_depth, color="tab:red", linestyle=":",
                         label=f"effective depth {report.effective_depth}")
    ncc_axis.set(xlabel="block", ylabel="NCC accuracy", ylim=(0, 1.02))
    ncc_axis.legend(loc="lower right")
    nc1 = [row["nc1"] if row["nc1"] > 0 and math.isfinite(row["nc1"]) else float("nan") for row in report.rows]
    nc1_axis.plot(layers, nc1, marker="o", color="tab:orange")
    nc1_axis.set(xlabel="block", ylabel="NC1  tr(Σ_W Σ_B⁺)/K", yscale="log")
    for axis in (ncc_axis, nc1_axis):
        axis.set_xticks(layers)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)
