"""The paper's MLP as a transformers model: forward contract, Auto save/load, and ETF patching of its
square hidden blocks and of its classifier through the same machinery as the transformer models."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification

import etf_hf
from etf_hf import CollapseMLPConfig, ETFConfig, MLPForImageClassification
from etf_hf.models.mlp import CollapseMLPBlock


def small_mlp(layers: int = 3, width: int = 24, labels: int = 5) -> MLPForImageClassification:
    return MLPForImageClassification(CollapseMLPConfig(hidden_size=width, num_hidden_layers=layers, num_labels=labels))


def pixels(batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(3))


def eval_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_defaults_are_the_papers_mlp():
    config = CollapseMLPConfig()
    model = MLPForImageClassification(config)
    assert (config.input_size, config.hidden_size, config.num_hidden_layers, config.num_labels) == (784, 400, 4, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(400, 784)] + [(400, 400)] * 4 + [(10, 400)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 5
    assert sum(p.numel() for p in model.parameters()) == 963_610  # the baseline count in ../shared/FINDINGS.md


def test_forward_accepts_image_and_flat_inputs_and_returns_block_features():
    model = small_mlp().eval()
    x = pixels()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    out = model(pixel_values=x, labels=labels, output_hidden_states=True)
    assert out.logits.shape == (6, 5)
    assert torch.allclose(out.loss, nn.functional.cross_entropy(out.logits, labels))
    # entry 0 = input layer, then one per block, all post-ReLU
    assert len(out.hidden_states) == 4 and all(h.shape == (6, 24) and (h >= 0).all() for h in out.hidden_states)
    assert torch.equal(model.classifier(out.hidden_states[-1]), out.logits)
    assert torch.equal(model(pixel_values=x.reshape(6, 784)).logits, out.logits)
    assert model(pixel_values=x).hidden_states is None
    with pytest.raises(ValueError, match="input_size=784"):
        model(pixel_values=torch.randn(2, 100))


def test_init_is_pytorch_default_not_transformers_normal():
    """Kaiming-uniform weights within +-1/sqrt(fan_in) (std bound/sqrt(3)), as the paper's plain-PyTorch model."""
    model = small_mlp(width=400)
    weight = model.input_layer.linear.weight
    bound = 1 / math.sqrt(784)
    assert weight.abs().max() <= bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_auto_classes_save_and_load(tmp_path):
    model = small_mlp()
    x = pixels()
    model.train()
    model(pixel_values=x)  # move BatchNorm running statistics away from their init
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "collapse_mlp"
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is MLPForImageClassification
    assert torch.equal(eval_logits(loaded, x), eval_logits(model, x))


def test_registry_patches_square_blocks_only_and_locks_survive_save_load(tmp_path):
    model = etf_hf.patch(small_mlp(layers=4), ETFConfig(layers="last:2", basis="orthogonal"))
    assert [path for path, _ in etf_hf.etf_layers(model)] == ["layers.2.linear", "layers.3.linear"]
    assert type(model).__name__ == "ETFMLPForImageClassification" and model.config.model_type == "etf_collapse_mlp"
    assert isinstance(model.input_layer.linear, nn.Linear) and isinstance(model.classifier, nn.Linear)
    assert etf_hf.lock_blocks(model, [0], ETFConfig(basis="orthogonal")) == [0, 2, 3]
    x = pixels()
    expected = eval_logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.etf["layers"] == [0, 2, 3]
    assert [path for path, _ in etf_hf.etf_layers(loaded)] == ["layers.0.linear", "layers.2.linear", "layers.3.linear"]
    assert torch.equal(eval_logits(loaded, x), expected)


def test_nearest_lock_of_an_unpatched_mlp():
    """lock_blocks on a vanilla MLP patches it (nearest frame by default) and the gain matches the old scale."""
    model = small_mlp()
    old = model.layers[1].linear.weight.detach().clone()
    assert etf_hf.lock_blocks(model, [1]) == [1]
    layer = model.layers[1].linear
    assert isinstance(model.layers[1], CollapseMLPBlock) and layer.basis == "nearest"
    # the nearest frame, scaled by the least-squares gain, is closer to the old weight than its negation
    assert (layer.weight - old).norm() < (layer.weight + old).norm()


def test_fixed_etf_classifier(tmp_path):
    """The C x H classifier as a fixed simplex ETF (rows = class vectors): every pair of rows at cosine -1/(C-1)."""
    model = etf_hf.patch(small_mlp(labels=5), ETFConfig(target_modules=["classifier"]))
    classifier = model.classifier
    assert isinstance(classifier, etf_hf.ETFLinear) and classifier.frame.shape == (5, 24)
    rows = classifier.frame.double()
    cosines = (rows / rows.norm(dim=1, keepdim=True)) @ (rows / rows.norm(dim=1, keepdim=True)).T
    off_diagonal = cosines[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, -1 / 4), atol=1e-6)
    trainable = etf_hf.parameter_summary(model)["trainable"]
    assert trainable == etf_hf.parameter_summary(small_mlp(labels=5))["trainable"] - 5 * 24 + 1  # weight -> gain
    x = pixels()
    expected = eval_logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(loaded.classifier, etf_hf.ETFLinear)
    assert torch.equal(eval_logits(loaded, x), expected)
    materialized = etf_hf.materialize(loaded)
    assert type(materialized) is MLPForImageClassification
    assert torch.allclose(eval_logits(materialized, x), expected, atol=1e-6)


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_number_of_classes_survives_save_and_load(classes, tmp_path):
    """transformers omits labels equal to its own 2-class default; this config's default is 10 classes."""
    CollapseMLPConfig(num_labels=classes, hidden_size=8, num_hidden_layers=1).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).num_labels == classes
