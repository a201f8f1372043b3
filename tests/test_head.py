"""The fixed simplex-ETF classification head (``ETFConfig(head=True)``), the dot-regression loss, and the
head with Adaptive-ETF locks."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (AutoModelForImageClassification, AutoModelForSequenceClassification, BertConfig, BertModel,
                          GPT2Config, GPT2ForSequenceClassification, Trainer, TrainingArguments)

from adaptive_ddp_worker import SeparableImages, tiny_mlp
from etf_hf import (AdaptiveETFCallback, CollapseMLPConfig, DotRegressionLoss, ETFClassifier, ETFConfig,
                    MLPForImageClassification, dot_regression_loss, etf_layers, lock_blocks, materialize,
                    parameter_summary, patch)
from tiny_models import tiny_bert, tiny_gpt2, tiny_roberta, tiny_vit, token_batch


def gpt2_classifier(num_labels: int = 4) -> GPT2ForSequenceClassification:
    return GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=64,
                                                    num_labels=num_labels, pad_token_id=0))


def mlp(num_labels: int = 5) -> MLPForImageClassification:
    return MLPForImageClassification(CollapseMLPConfig(input_size=16, hidden_size=24, num_hidden_layers=3,
                                                       num_labels=num_labels))


HEADS = {  # builder, path of the fixed head, (K, hidden), whether it has a bias, inputs
    "bert": (lambda: tiny_bert(num_labels=6), "classifier", (6, 32), True, lambda: {"input_ids": token_batch(120)}),
    "roberta": (lambda: tiny_roberta(num_labels=3), "classifier.out_proj", (3, 32), True,
                lambda: {"input_ids": token_batch(120)}),
    "vit": (lambda: tiny_vit(num_labels=10), "classifier", (10, 32), True,
            lambda: {"pixel_values": torch.randn(2, 1, 28, 28)}),
    "gpt2": (gpt2_classifier, "score", (4, 32), False, lambda: {"input_ids": token_batch(96) + 1}),
    "mlp": (mlp, "classifier", (5, 24), True, lambda: {"pixel_values": torch.randn(3, 16)}),
    "K=hidden": (lambda: tiny_bert(num_labels=32), "classifier", (32, 32), True, lambda: {"input_ids": token_batch(120)}),
    "K=hidden+1": (lambda: tiny_bert(num_labels=33), "classifier", (33, 32), True,
                   lambda: {"input_ids": token_batch(120)}),
}


def assert_simplex_rows(weight: torch.Tensor) -> None:
    """Rows are K unit vectors with pairwise cosine -1/(K-1): the Gram of a simplex ETF."""
    classes = weight.shape[0]
    unit = weight.double() / weight.double().norm(dim=1, keepdim=True)
    expected = torch.full((classes, classes), -1.0 / (classes - 1), dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(unit @ unit.t(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.double().norm(dim=1), torch.ones(classes, dtype=torch.float64), atol=1e-5, rtol=0)


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("family", sorted(HEADS))
def test_head_alone_is_a_k_by_hidden_simplex_etf(family: str) -> None:
    build, path, shape, has_bias, _ = HEADS[family]
    model = build()
    old = model.get_submodule(path)
    old_bias = None if old.bias is None else old.bias.detach().clone()
    before = parameter_summary(model)
    patch(model, ETFConfig(head=True, layers=[]))
    head = model.get_submodule(path)
    assert isinstance(head, ETFClassifier) and [n for n, _ in etf_layers(model)] == [path]
    assert tuple(head.frame.shape) == shape and (head.bias is not None) == has_bias
    assert_simplex_rows(head.frame)
    assert not head.frame.requires_grad and head.frame_norm.requires_grad
    if has_bias:
        assert torch.equal(head.bias, old_bias) and head.bias.requires_grad
    # gain "match": the fixed head keeps the old classifier's Frobenius norm
    assert float(head.weight.detach().norm()) == pytest.approx(float(old.weight.detach().norm()), rel=1e-5)
    summary = parameter_summary(model)
    assert summary["etf_fixed"] == shape[0] * shape[1]
    assert summary["trainable"] == before["trainable"] - shape[0] * shape[1] + 1
    assert model.config.etf["layers"] == [] and model.config.etf["head_basis"] == "orthogonal"


def test_head_with_ffn_blocks_and_its_own_basis() -> None:
    model = patch(tiny_bert(), ETFConfig(layers="last:1", head=True, head_basis="canonical", basis="nearest"))
    names = {n for n, _ in etf_layers(model)}
    assert names == {"bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense", "classifier"}
    assert model.classifier.basis == "canonical" and model.bert.encoder.layer[1].output.dense.basis == "nearest"
    assert model.config.etf["layers"] == [1] and model.config.etf["head_basis"] == "canonical"


def test_nearest_head_is_the_etf_closest_to_the_classifier() -> None:
    model = tiny_bert(num_labels=4)
    weight = model.classifier.weight.detach().clone()
    patch(model, ETFConfig(head=True, layers=[], basis="nearest"))
    frame = model.classifier.frame
    assert_simplex_rows(frame)
    scale = float((weight.double() * frame.double()).sum()) / 4
    assert model.classifier.frame_norm.item() == pytest.approx(scale, rel=1e-5)
    other = patch(tiny_bert(num_labels=4), ETFConfig(head=True, layers=[], basis="orthogonal")).classifier.frame
    assert (weight - scale * frame).norm() < (weight - scale * other).norm()


@pytest.mark.parametrize("build,message", [
    (lambda: tiny_bert(num_labels=34), r"K=34 classes.*dimension >= K-1=33"),
    (tiny_gpt2, "language-model head .*tied to the input embeddings"),
    (lambda: BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=50)), "no classification head"),
    (lambda: tiny_bert(num_labels=1), "needs K >= 2 classes"),
])
def test_heads_that_cannot_be_fixed_are_refused(build, message: str) -> None:
    model = build()
    with pytest.raises(ValueError, match=message):
        patch(model, ETFConfig(head=True, layers=[]))
    assert not etf_layers(model) and not model.config.model_type.startswith("etf_")


def test_head_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="layers=\\[\\] fixes no FFN block.*head=True"):
        ETFConfig(layers=[])
    with pytest.raises(ValueError, match="head_basis='canonical' without head=True"):
        ETFConfig(head_basis="canonical")
    with pytest.raises(ValueError, match="head_basis='hadamard' is unknown"):
        ETFConfig(head=True, head_basis="hadamard")
    with pytest.raises(ValueError, match="ETFConfig.head="):
        ETFConfig(head="yes")
    with pytest.raises(ValueError, match="structured frame .* K=32 >= hidden=32"):
        patch(tiny_bert(num_labels=32), ETFConfig(head=True, layers=[], basis="structured"))


# ---- saving, loading, materialize -------------------------------------------------------------------

@pytest.mark.parametrize("family,basis", [("bert", "orthogonal"), ("gpt2", "structured"), ("K=hidden+1", "orthogonal"),
                                          ("roberta", "nearest"), ("mlp", "canonical")])
def test_save_and_load_rebuild_the_head_bit_identically(family: str, basis: str, tmp_path: Path) -> None:
    build, path, _, _, make_inputs = HEADS[family]
    model = patch(build(), ETFConfig(head=True, layers="last:1", basis=basis)).eval()
    inputs = make_inputs()
    model.save_pretrained(tmp_path)
    auto = AutoModelForImageClassification if family == "mlp" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config.etf == model.config.etf
    assert torch.equal(loaded.get_submodule(path).frame, model.get_submodule(path).frame)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


@pytest.mark.parametrize("family", ["bert", "gpt2", "roberta"])
def test_materialize_turns_the_head_into_a_plain_linear(family: str) -> None:
    build, path, shape, has_bias, make_inputs = HEADS[family]
    model = patch(build(), ETFConfig(head=True, layers="all")).eval()
    inputs = make_inputs()
    expected = logits(model, inputs)
    materialize(model)
    head = model.get_submodule(path)
    assert type(head) is nn.Linear and tuple(head.weight.shape) == shape and (head.bias is not None) == has_bias
    # frame x gain folded into one matrix: equal up to float rounding, as for FFN frames
    assert not etf_layers(model) and torch.allclose(logits(model, inputs), expected, atol=1e-6)


# ---- dot-regression loss ----------------------------------------------------------------------------

def test_dot_regression_loss_by_hand() -> None:
    class_vectors = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, 1, -100])
    # cosines with the own class vector: 1, 0, -1/sqrt(2); the last item is ignored
    per_item = [0.0, 0.5, 0.5 * (1 + 1 / math.sqrt(2)) ** 2]
    loss = dot_regression_loss(features, labels, class_vectors)
    assert float(loss) == pytest.approx(sum(per_item) / 3, rel=1e-6)
    assert float(dot_regression_loss(features, labels, class_vectors, num_items_in_batch=6)) == pytest.approx(
        sum(per_item) / 6, rel=1e-6)
    # the gain and the feature scale do not enter: scaled inputs give the same loss
    assert float(dot_regression_loss(7 * features, labels, 3 * class_vectors)) == pytest.approx(float(loss), rel=1e-6)
    with pytest.raises(ValueError, match="one feature vector per label"):
        dot_regression_loss(torch.zeros(2, 5, 2), torch.zeros(2, dtype=torch.long), class_vectors)


def _classification_data(count: int = 24) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(count) % 6
    ids = torch.randint(3, 120, (count, 8), generator=generator)
    ids[:, 1] = labels + 3
    return [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
            for i in range(count)]


def test_trainer_steps_with_the_dot_regression_loss(tmp_path: Path) -> None:
    model = patch(tiny_bert(num_labels=6), ETFConfig(head=True, layers=[]))
    frame, gain = model.classifier.frame.clone(), model.classifier.frame_norm.detach().clone()
    encoder = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    loss_func = DotRegressionLoss(model)
    features: list[torch.Tensor] = []
    model.classifier.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
    labels: list[tuple[torch.Tensor, object]] = []

    def recording_loss(outputs, batch_labels, num_items_in_batch=None):
        labels.append((batch_labels.clone(), num_items_in_batch))
        return loss_func(outputs, batch_labels, num_items_in_batch=num_items_in_batch)

    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_classification_data(), compute_loss_func=recording_loss)
    result = trainer.train()
    assert 0 < result.training_loss <= 2 and math.isfinite(result.training_loss)
    # the first logged loss is the dot-regression loss of the first batch's features, recomputed here
    first = dot_regression_loss(features[0], labels[0][0], frame, labels[0][1])
    assert labels[0][1] == 8 and trainer.state.log_history[0]["loss"] == pytest.approx(float(first), rel=1e-4)
    assert torch.equal(model.classifier.frame, frame)
    assert torch.equal(model.classifier.frame_norm.detach(), gain)  # the loss does not train the gain
    assert not torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight, encoder)
    loss_func.remove()


def test_dot_regression_loss_needs_a_fixed_zero_bias_head() -> None:
    with pytest.raises(ValueError, match="patch the model with etf_hf.ETFConfig\\(head=True\\) first"):
        DotRegressionLoss(tiny_bert())
    with pytest.raises(ValueError, match="nonzero bias.*zeros_"):
        DotRegressionLoss(patch(mlp(), ETFConfig(head=True, layers=[])))  # nn.Linear's default bias is uniform
    loss = DotRegressionLoss(patch(tiny_bert(), ETFConfig(head=True, layers=[])))
    with pytest.raises(RuntimeError, match="no forward"):
        loss(None, torch.zeros(2, dtype=torch.long))


# ---- the head with Adaptive-ETF's locks ---------------------------------------------------------------

def test_lock_blocks_adds_nearest_ffn_frames_to_a_head_only_model(tmp_path: Path) -> None:
    model = patch(mlp(), ETFConfig(head=True, layers=[]))
    head_frame = model.classifier.frame.clone()
    before = model.layers[1].linear.weight.detach().clone()
    # the config AdaptiveETFCallback(basis="nearest") passes: config.etf with the lock's basis
    lock = dataclasses.replace(ETFConfig.from_dict(model.config.etf), basis="nearest")
    assert lock_blocks(model, [1], lock) == [1]
    etf = model.config.etf
    assert etf["layers"] == [1] and etf["basis"] == "nearest" and etf["head"] and etf["head_basis"] == "orthogonal"
    assert {n for n, _ in etf_layers(model)} == {"classifier", "layers.1.linear"}
    assert model.layers[1].linear.basis == "nearest" and torch.equal(model.classifier.frame, head_frame)
    nearest = model.layers[1].linear.weight.detach()
    assert (nearest - before).norm() < before.norm()  # the frame nearest to the weight it replaced
    # once an FFN block is fixed, the basis is settled
    with pytest.raises(ValueError, match="in more than layers"):
        lock_blocks(model, [2], dataclasses.replace(lock, basis="canonical"))
    inputs = {"pixel_values": torch.randn(3, 16)}
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.etf == model.config.etf
    assert {n for n, _ in etf_layers(loaded)} == {"classifier", "layers.1.linear"}
    assert torch.equal(loaded.classifier.frame, head_frame)
    assert torch.equal(loaded.layers[1].linear.frame, model.layers[1].linear.frame)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_adaptive_etf_locks_nearest_blocks_under_a_fixed_head(tmp_path: Path) -> None:
    """The whole path: head-only patch, then AdaptiveETFCallback locks blocks to their nearest frames
    during Trainer training; the head stays the same frame and save/load keeps both."""
    model = patch(tiny_mlp(layers=3), ETFConfig(head=True, layers=[]))
    head_frame = model.classifier.frame.clone()
    args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to="none", per_device_train_batch_size=16,
                             max_steps=12, learning_rate=0.05, optim="sgd", save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=SeparableImages(64, seed=0))
    callback = AdaptiveETFCallback(SeparableImages(64, seed=1), threshold=0.5, patience=1, every=4,
                                   basis="nearest").attach(trainer)
    trainer.train()
    assert callback.locked == [0, 1, 2] and callback.lock_steps == {0: 8, 1: 8, 2: 8}  # the second check: > patience
    etf = model.config.etf
    assert etf["layers"] == [0, 1, 2] and etf["basis"] == "nearest" and etf["head_basis"] == "orthogonal"
    assert torch.equal(model.classifier.frame, head_frame)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "ckpt")
    inputs = {"pixel_values": SeparableImages(8, seed=2).pixels}
    assert {n for n, _ in etf_layers(loaded)} == {"classifier", "layers.0.linear", "layers.1.linear", "layers.2.linear"}
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
