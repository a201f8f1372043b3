"""Where ETF layers go: ``layers="auto"`` (effective depth by NCC), its fallback, and the defaults for
models built from a config vs loaded with pretrained weights."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForImageClassification, AutoModelForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification)

from etf_hf import CollapseMLPConfig, ETFConfig, MLPForImageClassification, collapse_report, etf_layers, patch
from etf_hf.placement import loaded_with_pretrained_weights, second_half, suggest_layers
from tiny_models import tiny_bert, tiny_gpt2, tiny_vit

CLASSES = 3  # not 2: a 2-label collapse_mlp config reloads with 10 labels (transformers omits the default id2label)


def denoising_mlp(collapse_at: int | None, blocks: int = 4) -> MLPForImageClassification:
    """The paper's MLP (no BatchNorm) with hand-set weights whose block ``collapse_at`` is the first to
    collapse. Inputs are [y + n, n, 0, 0] (label y in {0, 1, 2}, noise n >= 0): class means differ only in
    the first coordinate, where the noise hides the label, so NCC is near chance on identity blocks; the
    block ``collapse_at`` computes (y + n) - n = y, after which every feature is its class mean (NCC 1)."""
    model = MLPForImageClassification(CollapseMLPConfig(input_size=4, hidden_size=4, num_hidden_layers=blocks,
                                                        batch_norm=False, num_labels=CLASSES)).eval()
    denoise = torch.zeros(4, 4)
    denoise[0, 0], denoise[0, 1] = 1.0, -1.0
    with torch.no_grad():
        for index, linear in enumerate([model.input_layer.linear] + [b.linear for b in model.layers]):
            linear.weight.copy_(denoise if index - 1 == collapse_at else torch.eye(4))
            linear.bias.zero_()
    return model


def noisy_labelled(count: int = 400, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    noise = 10 * torch.rand(count, generator=generator)
    pixels = torch.zeros(count, 4)
    pixels[:, 0], pixels[:, 1] = labels + noise, noise
    return [{"pixel_values": pixels[i:i + 100], "labels": labels[i:i + 100]} for i in range(0, count, 100)]


def ffn_blocks(model) -> set[int]:
    return {int(part) for name, _ in etf_layers(model) for part in name.split(".") if part.isdigit()}


def test_auto_fixes_the_blocks_from_a_known_collapsed_block_on() -> None:
    data = noisy_labelled()
    placement = suggest_layers(denoising_mlp(collapse_at=2), data)
    assert placement.layers == [2, 3] and placement.rule == "auto" and placement.effective_depth == 2
    assert max(placement.ncc[:2]) < 0.75 and placement.ncc[2:] == [1.0, 1.0]
    assert placement.pooling == "flat" and placement.threshold == 0.9

    model = patch(denoising_mlp(collapse_at=2), ETFConfig(layers="auto"), data=data)
    assert model.config.etf["layers"] == [2, 3] and ffn_blocks(model) == {2, 3}
    record = model.config.etf["placement"]
    assert record["rule"] == "auto" and record["threshold"] == 0.9 and record["effective_depth"] == 2
    assert record["ncc"] == placement.ncc and "effective depth 2" in record["reason"]


def test_threshold_moves_the_effective_depth() -> None:
    data = noisy_labelled()
    loose = suggest_layers(denoising_mlp(collapse_at=2), data, threshold=0.0)
    assert loose.layers == [0, 1, 2, 3] and loose.effective_depth == 0


def test_auto_falls_back_to_the_second_half_and_says_so(caplog) -> None:
    data = noisy_labelled()
    with caplog.at_level(logging.INFO, logger="etf_hf"):
        model = patch(denoising_mlp(collapse_at=None), ETFConfig(layers="auto"), data=data)
    record = model.config.etf["placement"]
    assert model.config.etf["layers"] == [2, 3] and record["rule"] == "auto-fallback"
    assert record["effective_depth"] is None and max(record["ncc"]) < 0.9
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "fell back to the second half" in r.message]
    assert len(warnings) == 1 and "set ETFConfig.layers" in warnings[0].message


@pytest.mark.parametrize("total,expected", [(6, [3, 4, 5]), (5, [3, 4]), (1, [0]), (2, [1])])
def test_second_half(total: int, expected: list[int]) -> None:
    assert second_half(total) == expected


def test_auto_without_data_and_data_without_auto_are_refused() -> None:
    with pytest.raises(ValueError, match=r"layers='auto'.*data="):
        patch(tiny_bert(), ETFConfig(layers="auto"))
    with pytest.raises(ValueError, match="data= .* only choose layers.*layers='all'"):
        patch(tiny_bert(), ETFConfig(layers="all"), data=[{"input_ids": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"\['threshold'\].*pass data="):
        patch(tiny_bert(), ETFConfig(layers="auto"), threshold=0.5)
    with pytest.raises(ValueError, match="threshold=1.5"):
        suggest_layers(tiny_bert(), [], threshold=1.5)


def _token_probe(vocab: int, classes: int, mask: bool = True) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        labels = torch.arange(16) % classes
        ids = torch.randint(3, vocab, (16, 8), generator=generator)
        ids[:, 1] = labels + 3  # a class-bearing token, so the classes differ
        batch = {"input_ids": ids, "labels": labels}
        if mask:
            batch["attention_mask"] = torch.ones_like(ids)
        batches.append(batch)
    return batches


def _gpt2_classifier() -> GPT2ForSequenceClassification:
    return GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=64,
                                                    num_labels=3, pad_token_id=0))


@pytest.mark.parametrize("build,data,pooling,options", [
    (lambda: tiny_bert(num_labels=3), lambda: _token_probe(120, 3), "cls", {}),
    (lambda: tiny_vit(num_labels=3), lambda: [{"pixel_values": torch.randn(12, 1, 28, 28),
                                               "labels": torch.arange(12) % 3}], "cls", {}),
    (_gpt2_classifier, lambda: _token_probe(96, 3), "last", {}),
    (tiny_gpt2, lambda: _token_probe(96, 3), "last", {"num_classes": 3}),  # causal LM, labelled probe
])
def test_auto_measures_each_architecture_as_collapse_report_does(build, data, pooling: str, options: dict) -> None:
    model, probe = build(), data()
    reference = collapse_report(model, probe, options.get("num_classes"), threshold=0.0)
    placement = suggest_layers(model, probe, threshold=0.0, **options)
    assert placement.pooling == pooling and placement.ncc == reference.ncc
    assert placement.layers == [0, 1] and placement.rule == "auto"


def test_causal_lm_probe_needs_num_classes() -> None:
    with pytest.raises(ValueError, match="no classification head.*num_classes="):
        suggest_layers(tiny_gpt2(), _token_probe(96, 3))


# ---- defaults ----------------------------------------------------------------------------------------

def _loaded_bert(tmp_path: Path, layers: int = 4):
    tiny_bert(num_labels=3, layers=layers).save_pretrained(tmp_path)
    return AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_pretrained_detection(tmp_path: Path) -> None:
    assert not loaded_with_pretrained_weights(tiny_bert())
    loaded = _loaded_bert(tmp_path)
    assert loaded_with_pretrained_weights(loaded)
    assert loaded_with_pretrained_weights(copy.deepcopy(loaded))  # the copy drops the weight marks, keeps the path
    assert not loaded_with_pretrained_weights(MLPForImageClassification(CollapseMLPConfig(num_hidden_layers=1)))


def test_default_on_a_model_built_from_a_config_is_every_block(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="etf_hf"):
        model = patch(tiny_bert(layers=4))
    assert model.config.etf["layers"] == [0, 1, 2, 3] and ffn_blocks(model) == {0, 1, 2, 3}
    assert model.config.etf["placement"]["rule"] == "default-from-config"
    lines = [r for r in caplog.records if "no layers given" in r.message]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "built from a config" in lines[0].message and "set ETFConfig.layers" in lines[0].message


def test_default_on_a_pretrained_model_is_the_second_half(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="etf_hf"):
        model = patch(_loaded_bert(tmp_path))
    assert model.config.etf["layers"] == [2, 3] and ffn_blocks(model) == {2, 3}
    assert model.config.etf["placement"]["rule"] == "default-pretrained"
    lines = [r for r in caplog.records if "no layers given" in r.message]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "pretrained weights" in lines[0].message and "pass data=" in lines[0].message
    assert "set ETFConfig.layers" in lines[0].message


def test_default_on_a_pretrained_model_with_data_is_auto(tmp_path: Path, caplog) -> None:
    probe = _token_probe(120, 3)
    loaded = _loaded_bert(tmp_path)
    expected = suggest_layers(loaded, probe, threshold=0.0)
    with caplog.at_level(logging.INFO, logger="etf_hf"):
        model = patch(loaded, data=probe, threshold=0.0)
    record = model.config.etf["placement"]
    assert model.config.etf["layers"] == expected.layers and record["rule"] == "auto"
    assert record["ncc"] == expected.ncc and record["threshold"] == 0.0
    assert len([r for r in caplog.records if "no layers given" in r.message]) == 1


def test_chosen_layers_reload_without_data_and_repatching_is_a_no_op(tmp_path: Path) -> None:
    data = noisy_labelled()
    model = patch(denoising_mlp(collapse_at=1), ETFConfig(layers="auto"), data=data)
    assert model.config.etf["layers"] == [1, 2, 3]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert loaded.config.etf == model.config.etf and ffn_blocks(loaded) == {1, 2, 3}
    assert patch(loaded, ETFConfig(layers="auto"), data=data) is loaded  # the recorded choice stands
    assert patch(loaded) is loaded
    with pytest.raises(ValueError, match="already patched"):
        patch(loaded, ETFConfig(layers="auto", basis="canonical"), data=data)


def test_target_modules_default_to_all_of_them() -> None:
    model = patch(tiny_bert(), ETFConfig(target_modules=[r"bert\.encoder\.layer\.1\.output\.dense"]))
    assert [name for name, _ in etf_layers(model)] == ["bert.encoder.layer.1.output.dense"]
    with pytest.raises(ValueError, match="target_modules"):
        patch(tiny_bert(), ETFConfig(layers="auto", target_modules=["x"]), data=[{}])
