"""Control frames (issue 8): fixed weights that are not ETFs, at the ETF modes' exact placement."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoModelForImageClassification

from etf_hf import ETFConfig, etf_layers, lock_blocks, parameter_summary, patch
from etf_hf.controls import CONTROL_BASES, control_frame
from etf_hf.etf import simplex_etf
from isolated import run_python
from tiny_models import tiny_bert, tiny_vit, token_batch


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_gaussian_control_has_the_etf_norm_but_not_its_geometry() -> None:
    frame = control_frame(16, 64, "gaussian", seed=3, dtype=torch.float64)
    etf = simplex_etf(16, 64, "orthogonal", seed=3, dtype=torch.float64)
    assert frame.norm().item() == pytest.approx(etf.norm().item(), rel=1e-12)
    assert frame.norm().item() == pytest.approx(math.sqrt(16), rel=1e-12)
    cosines = torch.nn.functional.normalize(frame, dim=0).t() @ torch.nn.functional.normalize(frame, dim=0)
    off_diagonal = cosines[~torch.eye(16, dtype=torch.bool)]
    # An ETF has every off-diagonal cosine equal to -1/15; a Gaussian frame does not.
    assert (off_diagonal + 1 / 15).abs().max() > 0.1
    assert torch.equal(frame, control_frame(16, 64, "gaussian", seed=3, dtype=torch.float64))
    assert not torch.equal(frame, control_frame(16, 64, "gaussian", seed=4, dtype=torch.float64))


@pytest.mark.slow  # a fresh Python process
def test_gaussian_control_is_identical_in_a_fresh_process(tmp_path: Path) -> None:
    code = ("import torch; from etf_hf.controls import control_frame; "
            f"torch.save(control_frame(8, 40, 'gaussian', seed=11), {str(tmp_path / 'frame.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "frame.pt"), control_frame(8, 40, "gaussian", seed=11))


def test_frozen_control_keeps_the_model_function_exactly() -> None:
    model = tiny_bert().eval()
    inputs = {"input_ids": token_batch(120)}
    before = logits(model, inputs)
    patch(model, ETFConfig(basis="frozen"))
    assert torch.allclose(logits(model, inputs), before, atol=1e-5)
    for _, layer in etf_layers(model):
        assert not any(name == "frame" for name, _ in layer.named_parameters())


def test_zero_control_leaves_only_the_bias_and_the_bias_trains() -> None:
    model = patch(tiny_bert(), ETFConfig(basis="zero", layers=[1]))
    (path, layer), *_ = etf_layers(model)
    assert torch.count_nonzero(layer.frame) == 0
    x = torch.randn(3, layer.in_features, requires_grad=True)
    assert torch.equal(layer(x), layer.bias.expand(3, -1))
    layer(x).sum().backward()
    assert layer.bias.grad is not None and layer.bias.grad.abs().sum() > 0
    assert x.grad.abs().sum() == 0  # nothing flows through a zeroed weight


@pytest.mark.parametrize("basis", CONTROL_BASES)
def test_controls_take_the_same_placement_and_trainable_count_as_the_etf(basis: str) -> None:
    etf = patch(tiny_vit(), ETFConfig(basis="orthogonal", layers="last:1", projections="up"))
    control = patch(tiny_vit(), ETFConfig(basis=basis, layers="last:1", projections="up"))
    assert [name for name, _ in etf_layers(control)] == [name for name, _ in etf_layers(etf)]
    assert parameter_summary(control) == parameter_summary(etf)


@pytest.mark.parametrize("basis,stored", [("gaussian", False), ("zero", False), ("frozen", True)])
def test_controls_round_trip_through_save_and_load(basis: str, stored: bool, tmp_path: Path) -> None:
    model = patch(tiny_bert(), ETFConfig(basis=basis, layers="last:1")).eval()
    inputs = {"input_ids": token_batch(120)}
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors")
    assert any(key.endswith(".frame") for key in keys) == stored
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.etf["basis"] == basis
    for (name, layer), (_, original) in zip(etf_layers(loaded), etf_layers(model)):
        assert torch.equal(layer.frame, original.frame), name
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_model_card_labels_a_control_as_not_an_etf(tmp_path: Path) -> None:
    patch(tiny_vit(), ETFConfig(basis="gaussian")).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "a control: these weights are fixed but are not ETFs" in card
    assert AutoModelForImageClassification.from_pretrained(tmp_path).config.etf["basis"] == "gaussian"


def test_a_frozen_lock_freezes_the_current_weights() -> None:
    """Adaptive-ETF's control: locking a block to basis='frozen' must not change the function."""
    model = tiny_bert().eval()
    inputs = {"input_ids": token_batch(120)}
    before = logits(model, inputs)
    assert lock_blocks(model, [1], ETFConfig(basis="frozen")) == [1]
    assert torch.allclose(logits(model, inputs), before, atol=1e-5)
    assert len(etf_layers(model)) == 2


def test_unknown_basis_error_lists_the_controls() -> None:
    with pytest.raises(ValueError, match="or a control \\(gaussian, zero, frozen\\)"):
        ETFConfig(basis="random")
    with pytest.raises(ValueError, match="all-zero weight"):
        control_frame(4, 8, "frozen", weight=torch.zeros(8, 4))
    with pytest.raises(ValueError, match="pass weight"):
        control_frame(4, 8, "frozen")
