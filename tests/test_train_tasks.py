"""`etf-hf train` beyond the quickstart: text classification and causal-LM runs with the real Trainer (tiny
models, seconds), every kind of mode (etf, frozen, lora, adaptive), the shipped configs, and recipe errors
that name their key."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from etf_hf.app import cli
from etf_hf.app.runner import ConfigError, load_config, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
#: configs of examples/reproduce_mlp.py (the paper's MLP and its Adaptive-ETF development sets), not
#: `etf-hf train` recipes: tests/test_reproduction.py loads them
REPRODUCE_MLP_CONFIGS = {"mlp_fashion_mnist.yaml", "mlp_digits_dev.yaml", "mlp_synthetic_dev.yaml"}
CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if p.name not in REPRODUCE_MLP_CONFIGS)

TREC = [("DESC", 'What does "RSVP" mean ?'), ("HUM", "Who wrote Hamlet ?"), ("LOC", "Where is Rome ?"),
        ("NUM", "How many legs has a spider ?"), ("DESC", "What is a comet ?"), ("HUM", "Who painted the Mona Lisa ?"),
        ("LOC", "Where is the Nile ?"), ("NUM", "When did the war end ?"), ("DESC", "Why is the sky blue ?"),
        ("HUM", "Who invented the telephone ?"), ("LOC", "What country has Paris ?"), ("NUM", "How far is the moon ?")]
TRAINING = {"max_steps": 3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "logging_steps": 1,
            "learning_rate": 1e-3, "save_strategy": "no", "use_cpu": True, "report_to": "none", "disable_tqdm": True,
            "seed": 0}


def tiny_bert_tokenizer(folder: Path) -> Path:
    """A WordPiece tokenizer over the TREC rows' words, saved like a model folder's tokenizer (no download)."""
    from transformers import BertTokenizer

    words = sorted({w for _, text in TREC for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


def sequence_recipe(tmp_path: Path, modes: list[dict[str, Any]]) -> dict[str, Any]:
    train, test = tmp_path / "train.tsv", tmp_path / "test.tsv"
    for path, rows in ((train, TREC * 3), (test, TREC)):
        path.write_text("label\tfine_label\ttext\n" + "".join(f"{label}\t{label}:x\t{text}\n" for label, text in rows),
                        encoding="utf-8")
    return {
        "task": "sequence-classification",
        "model": {"from_config": {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 64,
                                  "max_position_embeddings": 32},
                  "tokenizer": str(tiny_bert_tokenizer(tmp_path / "tokenizer"))},
        "data": {"source": "tsv", "train_file": str(train), "test_file": str(test), "max_length": 16},
        "modes": modes, "training": dict(TRAINING), "output_dir": str(tmp_path / "run"), "torch_threads": 1,
    }


def lm_recipe(tmp_path: Path, modes: list[dict[str, Any]]) -> dict[str, Any]:
    text = "".join(f"ROMEO:\nWhat light through yonder window breaks {i}?\n\n" for i in range(40))
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    return {
        "task": "causal-lm",
        "model": {"from_config": {"model_type": "gpt2", "vocab_size": 256, "n_positions": 64, "n_embd": 16,
                                  "n_layer": 2, "n_head": 2, "bos_token_id": None, "eos_token_id": None},
                  "tokenizer": "byte-level"},
        "data": {"source": "text", "train_file": str(tmp_path / "play.txt"), "block_size": 32, "test_fraction": 0.2},
        "modes": modes, "training": {**TRAINING, "eval_strategy": "steps", "eval_steps": 2},
        "output_dir": str(tmp_path / "run"), "torch_threads": 1,
    }


def run_recipe(recipe: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Through the command line, as a user runs it; returns metrics.json."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert cli.main(["train", str(path)]) == 0
    return json.loads((Path(recipe["output_dir"]) / "metrics.json").read_text())


def test_sequence_classification_run_with_every_kind_of_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("peft")
    modes = [{"name": "full"}, {"name": "frozen", "frozen": {}}, {"name": "lora", "lora": {"r": 2}},
             {"name": "etf", "etf": {"basis": "orthogonal"}},
             {"name": "adaptive", "adaptive": {"threshold": 0.0, "patience": 1, "every": 1, "basis": "canonical"}}]
    metrics = run_recipe(sequence_recipe(tmp_path, modes), tmp_path)
    rows = {row["name"]: row for row in metrics["modes"]}
    assert metrics["metric"] == {"name": "accuracy", "key": "test_accuracy", "higher_is_better": True}
    assert metrics["data"]["label_names"] == ["DESC", "HUM", "LOC", "NUM"]
    assert metrics["data"]["train_examples"] == 36 and metrics["data"]["test_examples"] == 12
    full = rows["full"]
    for row in rows.values():
        assert row["steps"] == 3 and len(row["train_loss"]) == 3 and 0 <= row["test_accuracy"] <= 1
        assert row["total_params"] >= full["total_params"] - 4   # LoRA adds adapters; ETF gains replace weights
    assert [rows[n]["kind"] for n in rows] == ["full", "frozen", "lora", "etf", "adaptive"]
    assert rows["frozen"]["trainable_params"] == full["trainable_params"] - 2 * 2 * 16 * 32   # 2 blocks x up+down
    assert rows["lora"]["trainable_params"] < rows["frozen"]["trainable_params"] / 10
    lora = rows["lora"]["lora"]
    assert lora["target_modules"] and lora["modules_to_save"] == ["classifier"]   # the BERT record's head
    assert rows["etf"]["etf"]["basis"] == "orthogonal" and rows["etf"]["etf_fixed_params"] == 2 * 2 * 16 * 32
    adaptive = rows["adaptive"]                               # threshold 0: every block locks at the first check
    assert adaptive["adaptive"]["locked"] == [0, 1] and adaptive["etf"]["layers"] == [0, 1]
    assert adaptive["trainable_params_end"] < adaptive["trainable_params"] == full["trainable_params"]
    assert len(adaptive["adaptive"]["ncc_history"]) == 3 and adaptive["adaptive"]["late_locks"] == []  # 1 step was left
    embedding = full["trainable_params_end"] - full["trainable_params_excl_embeddings"]
    assert embedding > 0 and embedding % 32 == 0                # the (vocab x 32) input embedding matrix
    assert rows["etf"]["trainable_params_excl_embeddings"] == rows["etf"]["trainable_params_end"] - embedding
    assert rows["lora"]["trainable_params_excl_embeddings"] == rows["lora"]["trainable_params_end"]  # frozen by LoRA

    table = capsys.readouterr().out
    assert "test acc" in table and "-> " in table             # Adaptive-ETF's locks show in the table

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    saved = tmp_path / "run" / "etf"
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    assert model.config.id2label == {0: "DESC", 1: "HUM", 2: "LOC", 3: "NUM"}
    assert AutoTokenizer.from_pretrained(saved)("who wrote hamlet ?")["input_ids"][1] > 4   # the recipe's tokenizer


def test_freeze_input_embeddings_on_top_of_a_treatment(tmp_path: Path) -> None:
    """``freeze_input_embeddings`` takes exactly the input embedding matrix out of training, on top of the ETF
    treatment (the embeddings are half of a pretrained MiniLM), and the row records it."""
    modes = [{"name": "etf", "etf": {"basis": "nearest"}},
             {"name": "etf_frozen_embeddings", "etf": {"basis": "nearest"}, "freeze_input_embeddings": True}]
    rows = {row["name"]: row for row in run_recipe(sequence_recipe(tmp_path, modes), tmp_path)["modes"]}
    etf, frozen = rows["etf"], rows["etf_frozen_embeddings"]
    assert (etf["freeze_input_embeddings"], frozen["freeze_input_embeddings"]) == (False, True)
    assert etf["trainable_params"] - frozen["trainable_params"] == 64 * 16    # the vocab x hidden matrix
    assert frozen["trainable_params_excl_embeddings"] == frozen["trainable_params_end"] \
        == etf["trainable_params_excl_embeddings"]


def test_apply_mode_freezes_the_embeddings_only_where_a_model_has_them() -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from etf_hf.app.treatments import ModeSpec, apply_mode

    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=64))
    apply_mode(model, ModeSpec("frozen_embeddings", freeze_input_embeddings=True))
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["bert.embeddings.word_embeddings.weight"]
    with pytest.raises(ConfigError, match="Sequential has no input embeddings"):
        apply_mode(torch.nn.Sequential(torch.nn.Linear(2, 2)), ModeSpec("m", freeze_input_embeddings=True))


def test_causal_lm_run_reports_perplexity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    modes = [{"name": "full"}, {"name": "etf", "etf": {"basis": "structured"}}]
    metrics = run_recipe(lm_recipe(tmp_path, modes), tmp_path)
    assert metrics["metric"]["key"] == "test_perplexity" and metrics["metric"]["higher_is_better"] is False
    assert "num_labels" not in metrics["data"] and metrics["data"]["block_size"] == 32
    text_blocks = len((tmp_path / "play.txt").read_text()) // 32
    assert metrics["data"]["train_examples"] + metrics["data"]["test_examples"] == text_blocks
    for row in metrics["modes"]:
        assert "test_accuracy" not in row
        assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]))
        assert 1 < row["test_perplexity"] < 300                  # below uniform over 256 bytes after 3 steps
        assert [e["step"] for e in row["eval_perplexity"]] == [2, 3]
    assert [Path(p).name for p in metrics["plots"]] == ["training_loss.png", "eval_perplexity.png"]
    table = capsys.readouterr().out
    assert "test ppl" in table and "test acc" not in table

    from transformers import AutoModelForCausalLM, AutoTokenizer
    saved = tmp_path / "run" / "etf"
    assert AutoModelForCausalLM.from_pretrained(saved).config.etf["basis"] == "structured"
    assert AutoTokenizer.from_pretrained(saved).decode([82, 79, 77, 69, 79]) == "ROMEO"


def test_lora_without_peft_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "peft" else real(name, *args))
    with pytest.raises(ConfigError, match=r"modes\[1\].lora needs the optional peft package: pip install 'etf_hf\[peft\]'"):
        validate(lm_recipe(tmp_path, [{"name": "full"}, {"name": "lora", "lora": {}}]))


def test_images_are_brought_to_the_model_size() -> None:
    """The digits are 8x8; a ViT for 16x16 single-channel images gets them resized, not refused."""
    from etf_hf.app.runner import apply_overrides, load_data

    raw, name = load_config(None)
    spec = validate(apply_overrides(raw, ["model.from_config.image_size=16", "model.from_config.patch_size=4"]), name)
    data = load_data(spec)
    assert data.train[0]["pixel_values"].shape == (1, 16, 16) and len(data.label_names) == 10


def _image_recipe() -> dict[str, Any]:
    raw, _ = load_config(None)
    return raw


@pytest.mark.parametrize("make, change, message", [
    # unknown keys
    ("lm", {"data.blok_size": 8}, "unknown key data.blok_size (did you mean 'block_size'?)"),
    ("lm", {"model.tokeniser": "byte-level"}, "unknown key model.tokeniser (did you mean 'tokenizer'?)"),
    ("seq", {"modes": [{"name": "a", "frozen": {"basis": "zero"}}]}, "unknown key modes[0].frozen.basis"),
    ("seq", {"modes": [{"name": "a", "adaptive": {"treshold": 1}}]}, "unknown key modes[0].adaptive.treshold"),
    ("seq", {"modes": [{"name": "a", "lora": {"rank": 4}}]}, "unknown key modes[0].lora.rank"),
    ("seq", {"modes": [{"name": "a", "freeze": {}}]}, "unknown key modes[0].freeze (did you mean 'frozen'?)"),
    # wrong types
    ("lm", {"data.block_size": "big"}, "data.block_size must be a positive integer, got str 'big'"),
    ("seq", {"data.max_length": 0}, "data.max_length must be a positive integer, got 0"),
    ("seq", {"modes": [{"name": "a", "lora": {"r": 2.5}}]}, "modes[0].lora.r must be a positive integer"),
    ("seq", {"modes": [{"name": "a", "frozen": True}]}, "modes[0].frozen must be a mapping"),
    ("lm", {"model.tokenizer": 5}, "model.tokenizer must be a tokenizer folder"),
    # missing files and folders
    ("lm", {"data.train_file": "no/such.txt"}, "data.train_file: file 'no/such.txt' not found"),
    ("seq", {"model.tokenizer": "/no/such/tokenizer"}, "model.tokenizer '/no/such/tokenizer': no tokenizer could"),
    ("seq", {"model.tokenizer": "package:no_such_package_xyz"}, "package 'no_such_package_xyz' is not installed"),
    # unsupported task / source / combination
    ("seq", {"task": "token-classification"}, "task 'token-classification' is not supported; supported tasks: "
     "image-classification, sequence-classification, causal-lm"),
    ("lm", {"data.source": "imagefolder"}, "data.source 'imagefolder' cannot feed task 'causal-lm'"),
    ("image", {"model.tokenizer": "byte-level"}, "model.tokenizer is only read by text tasks"),
    ("seq", {"model.tokenizer": None}, "task 'sequence-classification' needs a tokenizer: set model.tokenizer"),
    ("seq", {"model.tokenizer": "byte-level"}, "has no padding (or end-of-text) token"),
    # model and data disagree
    ("lm", {"data.block_size": 65}, "data.block_size is 65, but the model (model.from_config) has only 64 positions"),
    ("lm", {"model.from_config.vocab_size": 100}, "set model.from_config.vocab_size to at least 256"),
    # modes
    ("seq", {"modes": [{"name": "a", "etf": {}, "lora": {}}]}, "modes[0] sets etf and lora; a mode takes at most one"),
    ("lm", {"modes": [{"name": "a", "adaptive": {}}]}, "modes[0].adaptive: Adaptive-ETF locks blocks by "
     "nearest-class-mean accuracy, which needs class labels"),
    ("seq", {"modes": [{"name": "a", "adaptive": {}}]}, "modes[0].adaptive.every is 'eval' (the default), but "
     "training.eval_strategy is 'no'"),
    ("seq", {"modes": [{"name": "a", "adaptive": {"every": "epoch", "threshold": 2}}]}, "modes[0].adaptive: threshold=2"),
    ("lm", {"modes": [{"name": "a", "etf": {"layers": "auto"}}]}, "modes[0].etf.layers 'auto' picks blocks by"),
    ("seq", {"modes": [{"name": "a", "frozen": {"layers": "auto"}}]}, "modes[0].frozen.layers 'auto' is for etf modes"),
    ("seq", {"modes": [{"name": "a", "frozen": {"layers": "last:5"}}]}, "modes[0].frozen: "),
    ("seq", {"modes": [{"name": "a", "lora": {"target_modules": ["nope"]}}]}, "modes[0].lora: peft could not apply it"),
    ("seq", {"modes": [{"name": "a", "freeze_input_embeddings": "yes"}]},
     "modes[0].freeze_input_embeddings must be true or false, got str 'yes'"),
    ("seq", {"modes": [{"name": "a", "lora": {}, "freeze_input_embeddings": True}]},
     "modes[0].freeze_input_embeddings: a LoRA mode already trains only its adapters"),
    ("lm", {"model.from_config": {"model_type": "olmo", "vocab_size": 256,  # neither etf_hf nor peft has defaults
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "max_position_embeddings": 64},
            "modes": [{"name": "a", "lora": {}}]}, "modes[0].lora.target_modules is required for model type 'olmo'"),
])
def test_text_recipe_errors_name_the_key(tmp_path: Path, make: str, change: dict[str, Any], message: str) -> None:
    if "lora" in str(change):
        pytest.importorskip("peft")
    recipe = {"seq": sequence_recipe, "lm": lm_recipe}.get(make, lambda *_: _image_recipe())(tmp_path, [{"name": "full"}])
    for dotted, value in change.items():
        node = recipe
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    with pytest.raises(ConfigError) as error:
        validate(recipe)
    assert message in str(error.value)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every recipe in configs/ passes validation as run from the repository root (its data paths are
    relative to it); recipes on ../shared/data skip on a fresh clone, MiniLM ones without its package."""
    monkeypatch.chdir(REPO_ROOT)
    raw, name = load_config(config)
    data = raw["data"]
    for key in ("train_file", "test_file", "train_dir", "test_dir"):
        if data.get(key) and not Path(data[key]).exists():
            pytest.skip(f"{config.name}: data.{key} {data[key]!r} is absent (a fresh clone has no ../shared/data)")
    if str(raw["model"].get("pretrained", "")).startswith("package:"):
        pytest.importorskip(raw["model"]["pretrained"].removeprefix("package:"))
    if any("lora" in mode for mode in raw["modes"]):
        pytest.importorskip("peft")
    spec = validate(raw, name)
    assert spec.name == config.stem and len(spec.modes) >= 2 and spec.modes[0].kind == "full"
    assert yaml.safe_dump(spec.raw) == yaml.safe_dump(load_config(config)[0])   # validation does not rewrite the recipe
