"""Neural collapse as `transformers.Trainer` metrics: per-block NCC, NC1, NC2, ETF error, CDNV, effective depth.

    metrics = etf_hf.CollapseMetrics(model)
    trainer = Trainer(model=model, args=TrainingArguments(..., batch_eval_metrics=True), eval_dataset=probe,
                      compute_metrics=metrics, preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics)
    trainer.evaluate()   # eval_ncc/layer_0, eval_nc1/layer_0, ..., eval_effective_depth, eval_accuracy
    etf_hf.plot_collapse(metrics.report, "collapse.png")

Why two hooks into the Trainer: ``preprocess_logits_for_metrics`` runs on every evaluation batch, before
the Trainer gathers or stores anything, so it pools each block's hidden states there (CLS, last non-pad
token, mean or flat, as `collapse_report` does): the full (batch, tokens, dim) hidden states are never
accumulated, only one vector per example and block. ``compute_metrics`` keeps each batch's pooled vectors
(N x dim per block, in their own dtype, on the CPU). With ``batch_eval_metrics=True`` the Trainer calls it
per batch (``compute_result`` is True on the last); without, once with the whole evaluation's pooled
features. At the end the kept vectors go through the same two passes as `collapse_report`
(`etf_hf.metrics.collapse_passes`: NCC accuracy is an argmin against the *final* class means, so it needs a
second look at every example), so the numbers equal `collapse_report` on the same data.

Why a forward pre-hook on the model: the Trainer hands ``preprocess_logits_for_metrics`` only the outputs
and labels, but pooling the last or mean token needs the batch's ``attention_mask``, and the model must
return hidden states. The hook, active in eval mode only, records the mask and asks for
``output_hidden_states=True`` (unless the caller set it); training forwards are untouched. ``remove()``
detaches it. Under distributed evaluation each rank pools its own batch before the Trainer's gather, so
the statistics are those of the whole evaluation set on every rank.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import EvalPrediction

from .collapse import CollapseReport, pool_blocks, resolve_pooling
from .metrics import collapse_passes


def accuracy(eval_prediction: EvalPrediction) -> dict[str, float]:
    """A Trainer ``compute_metrics``: the share of examples whose logits' argmax is the label.

    The logits are the first element when the model returns a tuple (extra outputs kept for metrics).
    """
    logits = eval_prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((np.argmax(logits, axis=-1) == eval_prediction.label_ids).mean())}


class CollapseMetrics:
    """``compute_metrics`` for `transformers.Trainer` (use with its `preprocess_logits_for_metrics`).

    model: the model the Trainer evaluates; its eval-mode forwards get a pre-hook (see the module docstring).
    num_classes: default ``model.config.num_labels``.
    pooling: ``auto`` (by model type: CLS for BERT/ViT, last non-pad token for GPT-2, flat for the MLP),
        ``cls``, ``last``, ``mean`` or ``flat``.
    threshold: NCC accuracy from which a block counts as collapsed, for ``effective_depth``.

    Returns ``accuracy`` (of the logits' argmax), ``<measure>/layer_<i>`` for every column of
    `CollapseReport`'s rows (``ncc``, ``nc1``, ``nc2_*``, ``etf_error``, ``cdnv``) and ``effective_depth``
    (nan when the last block is below the threshold). The last evaluation's report is kept as ``report``.
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None, pooling: str = "auto",
                 threshold: float = 0.9) -> None:
        self.num_classes = num_classes or getattr(getattr(model, "config", None), "num_labels", None)
        if not self.num_classes:
            raise ValueError("num_classes is needed: the model's config has no num_labels; pass num_classes=")
        self.pooling = resolve_pooling(model, pooling)
        self.threshold = threshold
        self.report: CollapseReport | None = None
        self._mask: torch.Tensor | None = None
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._reset()

    def remove(self) -> None:
        """Detach the forward pre-hook: the model's eval forwards go back to exactly what the caller asks."""
        self._hook.remove()

    def _reset(self) -> None:
        self._batches: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # pooled features per block, labels
        self._correct = self._total = 0

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        if module.training:
            return None
        self._mask = kwargs.get("attention_mask")
        if kwargs.get("output_hidden_states") is None:
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def preprocess_logits_for_metrics(self, outputs: Any, labels: Any) -> tuple[torch.Tensor, ...]:
        """(argmax predictions, one pooled (batch, dim) tensor per block) from one batch's model outputs.

        ``outputs`` is what the Trainer passes: the model's outputs other than the loss, logits first; the
        hidden states are the first tuple among them.
        """
        outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        hidden_states = next((value for value in outputs[1:] if isinstance(value, (tuple, list))), None)
        if hidden_states is None:
            raise ValueError("the model returned no hidden_states: give CollapseMetrics the model the Trainer "
                             "evaluates, or set model.config.output_hidden_states = True")
        mask, self._mask = self._mask, None
        if mask is not None:
            tokens = hidden_states[0].shape[1] if hidden_states[0].dim() == 3 else mask.shape[1]
            if mask.shape[0] != hidden_states[0].shape[0] or mask.shape[1] > tokens:
                raise ValueError(f"the recorded attention_mask {tuple(mask.shape)} does not belong to hidden states "
                                 f"{tuple(hidden_states[0].shape)}: was the model called outside the Trainer?")
            # a distributed gather pads hidden states on the right to the longest rank's length
            mask = nn.functional.pad(mask, (0, tokens - mask.shape[1]))
        return (outputs[0].argmax(-1), *pool_blocks(hidden_states, self.pooling, mask))

    def __call__(self, eval_pred: EvalPrediction, compute_result: bool = True) -> dict[str, float]:
        """Fold in one batch (``batch_eval_metrics=True``) or the whole evaluation; on ``compute_result`` return
        the measures and start afresh for the next evaluation."""
        predictions = eval_pred.predictions
        if (not isinstance(predictions, (tuple, list)) or len(predictions) < 2
                or any(isinstance(value, (tuple, list)) for value in predictions)):
            raise ValueError("CollapseMetrics needs pooled features: pass preprocess_logits_for_metrics="
                             "metrics.preprocess_logits_for_metrics to the Trainer along with compute_metrics=metrics")
        self._update(torch.as_tensor(predictions[0]), [torch.as_tensor(f) for f in predictions[1:]],
                     torch.as_tensor(eval_pred.label_ids))
        if not compute_result:
            return {}
        try:
            return self._compute()
        finally:
            self._reset()

    def _update(self, predicted: torch.Tensor, features: list[torch.Tensor], labels: torch.Tensor) -> None:
        if labels.dim() != 1:
            raise ValueError(f"labels of shape {tuple(labels.shape)}: collapse needs one class index per example "
                             "(a classification head), not per token")
        self._batches.append(([block.cpu() for block in features], labels.cpu()))
        self._correct += int((predicted.to(labels.device) == labels).sum())
        self._total += labels.numel()

    def _compute(self) -> dict[str, float]:
        if not self._batches:
            raise ValueError("no evaluation batch reached CollapseMetrics")
        statistics, accuracies = collapse_passes(lambda: self._batches, self.num_classes)
        self.report = CollapseReport.from_measures(statistics, accuracies, self.threshold)
        result = {"accuracy": self._correct / self._total}
        for row in self.report.rows:
            result.update({f"{key}/layer_{row['layer']}": value for key, value in row.items() if key != "layer"})
        depth = self.report.effective_depth
        result["effective_depth"] = math.nan if depth is None else float(depth)
        return result
