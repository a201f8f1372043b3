"""Where the ETF layers go: ``layers="auto"`` (the blocks from the effective depth on) and the defaults.

Why this matters more than the basis: on the pretrained all-MiniLM-L6-v2 fine-tuned on TREC-6 (pre-study,
one seed, ../shared/FINDINGS.md), fixing the FFNs of all 6 blocks cost 7-9 points (below even frozen
random FFNs), fixing the last 3 cost < 1; from scratch, fixing every FFN did not hurt. So:

* ``layers="auto"`` measures, on labelled data, the nearest-class-mean (NCC) accuracy of every block's
  features of the model *as it is* (`etf_hf.collapse_report`, pooled per architecture: CLS for
  BERT/RoBERTa/ViT, last token for GPT-2/Llama, the vector itself for the paper's MLP) and fixes the blocks
  from the effective depth on: the first block from which NCC stays >= ``threshold`` in every later block,
  and all later blocks (Adaptive-ETF's ``rule="effective_depth"``, which asks NCC strictly above). Those blocks already
  separate the classes as well as a fixed frame can keep. **Fallback** when no block qualifies (the last
  block is below the threshold, typical of a pretrained model before fine-tuning): the second half of
  the blocks, the pretrained default below, logged as a warning with the best NCC reached.
* The default (``layers`` left unset): a model built from a config (random init) gets every block; a
  model loaded with pretrained weights gets ``"auto"`` when ``data`` is given, otherwise the second half
  of its blocks (the last max(1, L // 2); of each stack for an encoder-decoder). One log line names the
  choice and how to change it. ``"auto"`` reads one stack's hidden states, so it is refused on a model of
  several stacks (give ``layers`` per stack there).

How "loaded with pretrained weights" is told (`loaded_with_pretrained_weights`): transformers'
``from_pretrained`` marks every weight it read from a checkpoint (``_is_hf_initialized``) and records
where it came from in ``config._name_or_path``. Either signal counts. The marks alone would miss a
``copy.deepcopy`` of a loaded model (the copy drops them, the config keeps its path); the path alone
would miss nothing but also counts ``from_config(AutoConfig.from_pretrained(...))`` (random weights,
named config) as pretrained: the cautious side, costing only coverage, never a ruined model. Weights
put in with ``load_state_dict`` leave neither signal: give ``layers`` explicitly then.

The decision is written to ``config.etf``: ``layers`` as the resolved list, ``placement`` as the record
(rule, reason, and for auto the threshold, per-block NCC and effective depth), so a checkpoint is
rebuilt without the data and anyone can see why those blocks were fixed.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .architectures import SINGLE, head_names, model_stacks
from .collapse import collapse_report, resolve_pooling
from .config import ETFConfig

logger = logging.getLogger("etf_hf")

#: ``Placement.rule`` values.
RULES = ("auto", "auto-fallback", "default-from-config", "default-pretrained")


@dataclass
class Placement:
    """Which blocks get ETF layers and why (what ``config.etf["placement"]`` records, besides ``layers``).

    rule: ``"auto"`` (blocks from the effective depth on), ``"auto-fallback"`` (no block qualified: the
        second half), ``"default-from-config"`` (every block) or ``"default-pretrained"`` (second half).
    reason: one sentence for people.
    threshold, ncc, effective_depth, pooling: the measurement behind an ``auto`` rule (None otherwise);
        ``ncc[i]`` is block i's NCC accuracy on the data.
    """

    layers: list[int] | dict[str, list[int]]
    rule: str
    reason: str
    threshold: float | None = None
    ncc: list[float] | None = None
    effective_depth: int | None = None
    pooling: str | None = None

    def record(self) -> dict[str, Any]:
        """The JSON form stored as ``config.etf["placement"]`` (``layers`` lives in ``config.etf`` itself);
        the measurement only for the auto rules (an ``effective_depth`` of None then means "none")."""
        record: dict[str, Any] = {"rule": self.rule, "reason": self.reason}
        if self.ncc is not None:
            record.update(threshold=self.threshold, ncc=list(self.ncc), effective_depth=self.effective_depth,
                          pooling=self.pooling)
        return record


def second_half(total: int) -> list[int]:
    """The last max(1, total // 2) blocks: 3, 4, 5 of 6; 3, 4 of 5; the only block of 1."""
    return list(range(total - max(1, total // 2), total))


def _stack_sizes(model: nn.Module) -> dict[str, int]:
    """Blocks per stack (one stack named `SINGLE` for most models)."""
    return model_stacks(model, ETFConfig(layers="all")).sizes


def _per_stack(sizes: dict[str, int], choose: Callable[[int], list[int]]) -> list[int] | dict[str, list[int]]:
    """``choose(blocks)`` for each stack: a list for a single-stack model, else one list per stack."""
    if list(sizes) == [SINGLE]:
        return choose(sizes[SINGLE])
    return {stack: choose(size) for stack, size in sizes.items()}


def _model_blocks(model: nn.Module) -> int:
    """The number of blocks of a single-stack model; NCC placement (``"auto"``) reads one stack's hidden states."""
    sizes = _stack_sizes(model)
    if list(sizes) != [SINGLE]:
        raise ValueError(f"layers='auto' measures NCC along one stack of blocks, but {type(model).__name__} has "
                         f"stacks {sorted(sizes)}: give ETFConfig.layers per stack, e.g. "
                         f"{{{', '.join(repr(s) + ': ' + repr('all') for s in sizes)}}}")
    return sizes[SINGLE]


def loaded_with_pretrained_weights(model: nn.Module) -> bool:
    """Whether ``model`` came from ``from_pretrained`` (see the module docstring for the rule and its limits)."""
    if any(getattr(parameter, "_is_hf_initialized", False) for parameter in model.parameters()):
        return True
    return bool(getattr(getattr(model, "config", None), "_name_or_path", ""))


def suggest_layers(model: nn.Module, data: Any, threshold: float = 0.9, *, num_classes: int | None = None,
                   pooling: str = "auto", batch_size: int = 64, collate_fn: Callable | None = None,
                   label_key: str = "labels") -> Placement:
    """The blocks of ``model`` from its effective depth on, measured by NCC accuracy on ``data``.

    data: labelled examples, as `etf_hf.collapse_report` takes them (a data set of dicts with
        ``label_key``, a DataLoader or a list of batch dicts); read twice, without gradients, in eval mode.
    threshold: NCC accuracy in [0, 1] that every block from the effective depth on must reach.
    num_classes: default ``config.num_labels`` for a model with a classification head; required for one
        without (a causal LM probed with labelled sequences: its ``num_labels`` describes no task).
    pooling: ``"auto"`` picks per architecture (CLS, last token, flat); see `etf_hf.collapse_report`.

    Returns a `Placement` with ``rule`` ``"auto"``, or ``"auto-fallback"`` (the second half) when even the
    last block is below the threshold; its ``reason`` says which. Nothing is logged here: `etf_hf.patch`
    logs the one line of the choice it makes with it.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: an NCC accuracy threshold is a number in [0, 1]")
    if num_classes is None and not any(isinstance(getattr(model, a, None), nn.Module) for a in head_names(model)):
        raise ValueError(
            f"suggest_layers: {type(model).__name__} has no classification head, so config.num_labels says nothing "
            f"about the probe's labels: pass num_classes= (the number of classes in data's {label_key!r})")
    total = _model_blocks(model)
    report = collapse_report(model, data, num_classes, pooling, threshold, batch_size, collate_fn, label_key)
    if len(report.rows) != total:
        raise ValueError(f"suggest_layers: {type(model).__name__} returned hidden states for {len(report.rows)} "
                         f"blocks, but has {total} FFN blocks; give ETFConfig.layers explicitly")
    ncc = [float(value) for value in report.ncc]
    common = dict(threshold=float(threshold), ncc=ncc, effective_depth=report.effective_depth,
                  pooling=resolve_pooling(model, pooling))
    depth = report.effective_depth
    if depth is not None:
        layers = list(range(depth, total))
        reason = (f"layers='auto': NCC >= {threshold} from block {depth} on (effective depth {depth}), so blocks "
                  f"{depth}..{total - 1} are fixed")
        return Placement(layers, "auto", reason, **common)
    layers = second_half(total)
    best = max(range(total), key=lambda i: ncc[i] if ncc[i] == ncc[i] else -1.0)
    reason = (f"layers='auto': the last block's NCC ({ncc[-1]:.3f}) is below {threshold} (best: block {best}, "
              f"{ncc[best]:.3f}), so no effective depth exists; fell back to the second half, blocks {layers}")
    return Placement(layers, "auto-fallback", reason, **common)


def choose_placement(model: nn.Module, layers: str | None, data: Any, probe_options: dict[str, Any]) -> Placement:
    """Resolve ``layers`` None (the default) or ``"auto"`` for ``model``, and log the choice in one line.

    probe_options: keyword arguments of `suggest_layers` (threshold, num_classes, pooling, ...).
    The line is a warning when the choice deserves a look (a pretrained model's default, an auto
    fallback), else info; it always says how to choose otherwise.
    """
    name = type(model).__name__
    change = "set ETFConfig.layers ('all', 'last:N', [i, ...], or 'auto' with data=) to choose otherwise"
    if layers == "auto":
        if data is None:
            raise ValueError(
                "ETFConfig(layers='auto') measures each block's NCC accuracy on labelled data: call "
                "etf_hf.patch(model, config, data=...) with a data set of dicts holding 'labels' (or a DataLoader), "
                "or give layers explicitly ('all', 'last:N', [i, ...])")
        placement = suggest_layers(model, data, **probe_options)
        log = logger.warning if placement.rule == "auto-fallback" else logger.info
        log("etf_hf: %s; %s", placement.reason, change)
        return placement
    if not loaded_with_pretrained_weights(model):
        unused = " (data= is not used: a random-init model has no collapse to measure)" if data is not None else ""
        reason = f"no layers given and {name} was built from a config (random init): every block is fixed{unused}"
        logger.info("etf_hf: %s; %s", reason, change)
        return Placement(_per_stack(_stack_sizes(model), lambda size: list(range(size))), "default-from-config", reason)
    source = getattr(model.config, "_name_or_path", "") or "a checkpoint"
    if data is not None:
        placement = suggest_layers(model, data, **probe_options)
        placement.reason = f"no layers given and {name} was loaded with pretrained weights ({source}): {placement.reason}"
        logger.warning("etf_hf: %s; %s", placement.reason, change)
        return placement
    sizes = _stack_sizes(model)
    layers_chosen = _per_stack(sizes, second_half)
    of = sizes[SINGLE] if list(sizes) == [SINGLE] else sizes
    reason = (f"no layers given and {name} was loaded with pretrained weights ({source}) without data: only the "
              f"second half is fixed, blocks {layers_chosen} of {of}")
    logger.warning("etf_hf: %s; pass data= to choose by NCC, or %s", reason, change)
    return Placement(layers_chosen, "default-pretrained", reason)
