"""`CollapseMetrics` under the real `transformers.Trainer`: per-batch (``batch_eval_metrics``) and whole-evaluation
``compute_metrics`` give the numbers `collapse_report` gives on the same data, for each pooling.

The reference is `collapse_report`, which runs its own forwards with its own DataLoader; the metric only
sees what the Trainer hands it, so agreement checks the pooling, the recorded attention masks and the
streaming together.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (EvalPrediction, GPT2Config, GPT2ForSequenceClassification, Trainer, TrainingArguments)

import task_data
from adaptive_ddp_worker import SeparableImages, tiny_mlp
from etf_hf import CollapseMetrics, ETFConfig, collapse_report, patch
from tiny_models import tiny_bert

EVAL_BATCH = 16
MEASURES = ("ncc", "nc1", "nc2_equinorm", "nc2_equiangular_std", "nc2_equiangular_max", "etf_error", "cdnv")


def args(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_eval_batch_size=EVAL_BATCH,
                    per_device_train_batch_size=16, save_strategy="no", disable_tqdm=True, seed=0,
                    dataloader_num_workers=0, batch_eval_metrics=True)
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer_for(model, data, metrics: CollapseMetrics | None, output_dir: Path, **overrides) -> Trainer:
    return Trainer(model=model, args=args(output_dir, **overrides), train_dataset=data, eval_dataset=data,
                   compute_metrics=metrics,
                   preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics if metrics else None)


def balanced_trec(per_class: int = 10) -> task_data.ExampleDataset:
    """Up to ``per_class`` questions of each TREC-6 class (ABBR is rare: a plain prefix may lack it).

    Right-padded ``[CLS] w1 w2 ... [PAD]``, so GPT-2's last real token is not the last position."""
    data, _ = task_data.trec6_dataset(limit=512)
    kept, counts = [], [0] * len(task_data.TREC6_LABELS)
    for example in data.examples:
        label = int(example["labels"])
        if counts[label] < per_class:
            kept.append(example)
            counts[label] += 1
    assert min(counts) > 0
    return task_data.ExampleDataset(kept, data.source)


def tiny_gpt2_classifier() -> GPT2ForSequenceClassification:
    return GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=120, n_positions=64,
                                                    num_labels=6, pad_token_id=task_data.PAD, bos_token_id=0,
                                                    eos_token_id=0))


def assert_matches_report(metrics: dict[str, float], report, prefix: str = "eval_") -> None:
    for row in report.rows:
        layer = row["layer"]
        assert metrics[f"{prefix}ncc/layer_{layer}"] == row["ncc"], layer
        for measure in MEASURES[1:]:
            assert metrics[f"{prefix}{measure}/layer_{layer}"] == pytest.approx(row[measure], rel=1e-6, abs=1e-9), \
                (layer, measure)
    assert f"{prefix}ncc/layer_{len(report.rows)}" not in metrics
    depth = metrics[f"{prefix}effective_depth"]
    assert (math.isnan(depth) and report.effective_depth is None) or depth == report.effective_depth


def eval_accuracy(model, data) -> float:
    loader = torch.utils.data.DataLoader(data, batch_size=EVAL_BATCH)
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) == b["labels"]).sum())
                   for b in loader)
    return hits / len(data)


CASES = {
    "bert-cls": (lambda: patch(tiny_bert(num_labels=6), ETFConfig(basis="orthogonal", layers="last:1")), "cls"),
    "gpt2-last": (tiny_gpt2_classifier, "last"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_metrics_equal_collapse_report_for_token_models(case: str, tmp_path: Path) -> None:
    build, pooling = CASES[case]
    model = build()
    data = balanced_trec()  # 60 examples: batches of 16, 16, 16, 12
    metrics = CollapseMetrics(model)
    assert metrics.pooling == pooling
    result = trainer_for(model, data, metrics, tmp_path).evaluate()
    report = collapse_report(model, data, batch_size=EVAL_BATCH)
    assert_matches_report(result, report)
    assert result["eval_accuracy"] == eval_accuracy(model, data)
    assert metrics.report.ncc == report.ncc and metrics.report.effective_depth == report.effective_depth


def test_mlp_metrics_during_training_equal_collapse_report_and_reset_between_evaluations(tmp_path: Path) -> None:
    model = tiny_mlp()
    data = SeparableImages(100, seed=1)  # 7 evaluation batches, the last of 4
    metrics = CollapseMetrics(model, threshold=0.95)
    trainer = trainer_for(model, data, metrics, tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3,
                          learning_rate=0.05)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_ncc/layer_0" in entry]
    assert [entry["step"] for entry in logged] == [3, 6]
    final = trainer.evaluate()
    assert_matches_report(final, collapse_report(model, data, batch_size=EVAL_BATCH, threshold=0.95))
    assert {key: final[key] for key in final if "/" in key} == {key: logged[-1][key] for key in final if "/" in key}


def test_whole_evaluation_without_batch_eval_metrics_gives_the_same_numbers(tmp_path: Path) -> None:
    model = tiny_mlp()
    data = SeparableImages(70, seed=2)
    metrics = CollapseMetrics(model)
    streamed = trainer_for(model, data, metrics, tmp_path).evaluate()
    whole = trainer_for(model, data, metrics, tmp_path, batch_eval_metrics=False).evaluate()
    assert_matches_report(whole, collapse_report(model, data, batch_size=EVAL_BATCH))
    for key, value in streamed.items():
        if "/" in key or key == "eval_accuracy":
            assert whole[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_hook_asks_for_hidden_states_in_eval_mode_only_and_remove_detaches() -> None:
    model = tiny_mlp()
    pixels = torch.randn(8, 784)
    metrics = CollapseMetrics(model)
    assert model.train()(pixel_values=pixels).hidden_states is None
    assert len(model.eval()(pixel_values=pixels).hidden_states) == 4
    assert model(pixel_values=pixels, output_hidden_states=False).hidden_states is None
    metrics.remove()
    assert model(pixel_values=pixels).hidden_states is None


def test_misuse_is_named(tmp_path: Path) -> None:
    model = tiny_mlp()
    data = SeparableImages(20, seed=3)
    metrics = CollapseMetrics(model)
    trainer = trainer_for(model, data, None, tmp_path, batch_eval_metrics=False)
    trainer.compute_metrics = metrics  # the features were not pooled: no preprocess_logits_for_metrics
    with pytest.raises(ValueError, match="preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics"):
        trainer.evaluate()
    token_labels = EvalPrediction(predictions=(np.zeros(4), np.zeros((4, 32))), label_ids=np.zeros((4, 7), int))
    with pytest.raises(ValueError, match="one class index per example"):
        metrics(token_labels)
    metrics.remove()
    with pytest.raises(ValueError, match="no hidden_states"):
        metrics.preprocess_logits_for_metrics(torch.zeros(4, 5), None)
    with pytest.raises(ValueError, match="num_classes"):
        CollapseMetrics(torch.nn.Linear(2, 2))
