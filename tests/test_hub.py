"""Hub-ready checkpoints: compact/dense storage, loading without the plugin, materialize, push_to_hub."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from huggingface_hub import HfApi
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
                          GPT2Config, GPT2LMHeadModel)

import etf_hf
from etf_hf import ETFConfig, etf_layers, materialize, patch
from etf_hf.hub import _FOOTER_MARKER, REMOTE_CODE_FILE, remote_code_source
from intercepted_hub import intercept_hub
from isolated import Case, run_python, run_python_cases
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_batch


def tiny_mlp() -> etf_hf.MLPForImageClassification:
    return etf_hf.MLPForImageClassification(etf_hf.CollapseMLPConfig(hidden_size=16, num_hidden_layers=3, num_labels=4))


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


def frame_keys(folder: Path) -> list[str]:
    return [k for k in load_file(folder / "model.safetensors") if k.endswith(".frame")]


def test_compact_leaves_out_regenerable_frames_dense_stores_them(tmp_path: Path) -> None:
    model = patch(tiny_gpt2())
    model.save_pretrained(tmp_path / "compact")
    model.save_pretrained(tmp_path / "dense", etf_storage="dense")
    assert frame_keys(tmp_path / "compact") == []
    assert len(frame_keys(tmp_path / "dense")) == len(etf_layers(model))
    assert model.config.etf["storage"] == "compact" and "auto_map" not in model.config.to_dict()
    x = token_batch()
    for variant in ("compact", "dense"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / variant)
        assert loaded.config.etf["storage"] == variant
        assert torch.equal(logits(loaded, input_ids=x), logits(model, input_ids=x))


def test_dense_checkpoint_frames_are_loaded_not_regenerated(tmp_path: Path) -> None:
    """In a dense checkpoint the stored frame is authoritative: it is what the model computes with."""
    patch(tiny_gpt2()).save_pretrained(tmp_path, etf_storage="dense")
    weights = load_file(tmp_path / "model.safetensors")
    key = frame_keys(tmp_path)[0]
    weights[key] = -weights[key]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.get_parameter_or_buffer(key), weights[key])


@pytest.mark.slow
def test_gpt2_small_compact_checkpoint_is_at_most_56_percent_of_vanilla(tmp_path: Path) -> None:
    """A compact checkpoint leaves out every regenerable frame, whichever the basis: canonical frames stand
    for all of them here because they are the cheapest to build (an orthogonal patch of GPT-2 small spends
    ~10 s in QR decompositions; the file is the same size)."""
    vanilla = GPT2LMHeadModel(GPT2Config()).to(torch.bfloat16)
    vanilla.save_pretrained(tmp_path / "vanilla")
    patch(vanilla, ETFConfig(basis="canonical")).save_pretrained(tmp_path / "compact")
    vanilla_size = (tmp_path / "vanilla" / "model.safetensors").stat().st_size
    compact_size = (tmp_path / "compact" / "model.safetensors").stat().st_size
    assert compact_size <= 0.56 * vanilla_size, (compact_size, vanilla_size)


REMOTE_CASES = {
    "gpt2": (lambda: patch(tiny_gpt2(), ETFConfig(basis="orthogonal")), "AutoModelForCausalLM",
             lambda: {"input_ids": token_batch()}),
    "bert-nearest": (lambda: patch(tiny_bert(), ETFConfig(basis="nearest", layers="last:1")),
                     "AutoModelForSequenceClassification", lambda: {"input_ids": token_batch(120)}),
    "vit-canonical": (lambda: patch(tiny_vit(), ETFConfig(basis="canonical")), "AutoModelForImageClassification",
                      lambda: {"pixel_values": torch.randn(2, 1, 28, 28)}),
    # the paper's MLP: its vanilla classes live in etf_hf.models, so the remote code must inline them
    "mlp-nearest": (lambda: patch(tiny_mlp(), ETFConfig(basis="nearest", layers="last:2")),
                    "AutoModelForImageClassification", lambda: {"pixel_values": torch.randn(4, 1, 28, 28)}),
    # the code of a fixed head (here alone, K=33 classes: K = hidden + 1) and of a control, which only
    # checkpoints using them carry
    "bert-head": (lambda: patch(tiny_bert(num_labels=33), ETFConfig(head=True, layers=[])),
                  "AutoModelForSequenceClassification", lambda: {"input_ids": token_batch(120)}),
    "vit-gaussian": (lambda: patch(tiny_vit(), ETFConfig(basis="gaussian")), "AutoModelForImageClassification",
                     lambda: {"pixel_values": torch.randn(2, 1, 28, 28)}),
    # a gated MLP on the fused path, and the structured basis's code, which only its checkpoints carry
    "llama-structured": (lambda: patch(tiny_llama(), ETFConfig(basis="structured")), "AutoModelForCausalLM",
                         lambda: {"input_ids": token_batch()}),
}


@pytest.mark.parametrize("case", sorted(REMOTE_CASES))
def test_remote_code_rebuilds_the_model_and_imports_nothing_from_etf_hf(case: str, tmp_path: Path, monkeypatch) -> None:
    """The generated file, imported in this process as a module of its own, rebuilds the model, and names
    etf_hf in no import. (Here the Auto classes would pick etf_hf's own classes, which are registered: the
    slow test below loads through them where etf_hf cannot be imported at all.)"""
    build, _, make_inputs = REMOTE_CASES[case]
    model = build()
    inputs = make_inputs()
    model.save_pretrained(tmp_path)
    source = (tmp_path / REMOTE_CODE_FILE).read_text()
    imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports and not [ast.unparse(node) for node in imports if "etf_hf" in ast.unparse(node)]
    remote = _remote_module(tmp_path, f"remote_code_{case.replace('-', '_')}", monkeypatch)
    loaded = getattr(remote, type(model).__name__).from_pretrained(tmp_path)
    assert type(loaded).__module__ == remote.__name__
    assert torch.equal(logits(loaded, **inputs), logits(model, **inputs))
    assert type(transformers.AutoConfig.from_pretrained(tmp_path)).__module__.startswith("etf_hf")  # left as it was


@pytest.mark.parametrize("basis", ["structured", "orthogonal"])
def test_remote_code_carries_the_one_row_path(basis: str, tmp_path: Path, monkeypatch) -> None:
    """A batch-1 decoding step's FFN (one row, no gradients) takes the remote code's own one-row path and
    gives the original's values bit for bit; a checkpoint without structured frames leaves that code out
    (it is optional code) and never reaches for it. (Compared per MLP: on one token the model's logits can
    differ in the last bit between two identical copies, from the BLAS kernel a 1-row matmul gets.)"""
    model = patch(tiny_gpt2(), ETFConfig(basis=basis)).eval()
    model.save_pretrained(tmp_path)
    remote = _remote_module(tmp_path, "remote_code_one_row", monkeypatch)
    loaded = getattr(remote, type(model).__name__).from_pretrained(tmp_path).eval()
    taken = []
    row_forward = remote._row_forward
    monkeypatch.setattr(remote, "_row_forward", lambda *a: taken.append(1) or row_forward(*a))
    x = torch.randn(1, 1, model.config.n_embd)
    with torch.no_grad():
        for original, rebuilt in zip(model.transformer.h, loaded.transformer.h):
            assert torch.equal(rebuilt.mlp(x), original.mlp(x))
    assert len(taken) == (model.config.n_layer if basis == "structured" else 0)
    assert ("def _row_forward" in (tmp_path / REMOTE_CODE_FILE).read_text()) == (basis == "structured")


def _top_level_names(source: str) -> set[str]:
    return {node.name for node in ast.parse(source).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_remote_code_of_a_default_checkpoint_stays_within_40_kb() -> None:
    """Issue 18's size goal for the generated file (GPT-2, default frames), as a size, not a timing: code
    that only structured checkpoints run must stay optional (a one-row decoding path once put 6 KB of it
    into every file, 40.6 KB)."""
    assert len(remote_code_source(patch(tiny_gpt2())).encode()) <= 40_000


def test_remote_code_holds_only_what_loading_needs() -> None:
    """Loading rebuilds the layers from the record in config.etf (``modules``): the architecture registry,
    ETFConfig's validation, patching and Auto-class registration stay out, and so does the code of the
    features a checkpoint's config does not use (structured frames, controls, a fixed head)."""
    plain = remote_code_source(patch(tiny_gpt2()))
    names = _top_level_names(plain)
    assert {"ETFModelBase", "ETFLinear", "apply_etf_layers", "fuse_feed_forwards", "simplex_etf"} <= names
    assert not names & {"ETFConfig", "Architecture", "find_slots", "find_head", "resolve_layers", "record_stacks",
                        "ETFModelMixin", "etf_model_class", "etf_config_class", "register_auto_models",
                        "recorded_modules", "structured_plan", "control_frame", "ETFClassifier"}
    assert "REGISTRY =" not in plain and "structured_plan = _LeftOut('structured_plan')" in plain
    full = remote_code_source(patch(tiny_bert(), ETFConfig(basis="structured", head=True, head_basis="gaussian")))
    assert {"structured_plan", "_StructuredFrameLinear", "control_frame", "ETFClassifier"} <= _top_level_names(full)
    assert "_LeftOut" not in full


def _remote_module(folder: Path, name: str, monkeypatch):
    """The remote-code file of ``folder`` imported in this process as a module of its own."""
    spec = importlib.util.spec_from_file_location(name, folder / REMOTE_CODE_FILE)
    remote = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, remote)  # dataclasses look their module up there
    spec.loader.exec_module(remote)
    return remote


def test_remote_code_refuses_what_it_does_not_carry(tmp_path: Path, monkeypatch) -> None:
    """A left-out name fails with its reason if anything calls it, and a config.etf of another format
    (without the modules record) is sent to etf_hf, which reads every format."""
    patch(tiny_gpt2()).save_pretrained(tmp_path)
    remote = _remote_module(tmp_path, "remote_code_refusals", monkeypatch)
    with pytest.raises(RuntimeError, match="structured_plan is not in this checkpoint's remote code.*etf_hf"):
        remote.structured_plan(4, 8)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["etf"]["modules"]
    config["etf"]["format_version"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"format_version 3 without the modules record .*etf_hf installed"):
        remote.ETFGPT2LMHeadModel.from_pretrained(tmp_path)


def _load_and_save_logits(auto_class: str, folder: Path, inputs: Path, out: Path, *, again: Path | None = None,
                          module: str = "transformers_modules") -> str:
    """Code that loads ``folder`` (a class from ``module``: its remote code), optionally saves it to ``again``
    with transformers' own save_pretrained and loads that, and saves its logits on ``inputs`` to ``out``."""
    code = f"""
import torch, transformers
model = transformers.{auto_class}.from_pretrained({str(folder)!r}, trust_remote_code=True)
assert type(model).__module__.startswith({module!r}), type(model).__module__
"""
    if again is not None:
        code += f"""model.save_pretrained({str(again)!r})
model = transformers.{auto_class}.from_pretrained({str(again)!r}, trust_remote_code=True)
"""
    return code + f"""with torch.no_grad():
    torch.save(model.eval()(**torch.load({str(inputs)!r})).logits, {str(out)!r})
"""


@pytest.fixture(scope="module")
def without_etf_hf(tmp_path_factory) -> tuple[Path, dict[str, Case], dict[str, torch.Tensor]]:
    """Every checkpoint of this file that must load where etf_hf cannot be imported, loaded in one fresh
    process (`run_python_cases`): (folder, name -> `Case`, name -> the logits it must give)."""
    root = tmp_path_factory.mktemp("without_etf_hf")
    cases: dict[str, str] = {}
    expected: dict[str, torch.Tensor] = {}
    for case, (build, auto_class, make_inputs) in REMOTE_CASES.items():
        model, inputs = build(), make_inputs()
        model.save_pretrained(root / case)
        torch.save(inputs, root / f"{case}.in.pt")
        cases[case] = _load_and_save_logits(auto_class, root / case, root / f"{case}.in.pt", root / f"{case}.out.pt")
        expected[case] = logits(model, **inputs)
    # materialized: a plain GPT-2 checkpoint, no remote code
    vanilla, x, _ = _materialized()
    vanilla.save_pretrained(root / "materialized")
    torch.save({"input_ids": x}, root / "materialized.in.pt")
    cases["materialized"] = _load_and_save_logits("AutoModelForCausalLM", root / "materialized",
                                                  root / "materialized.in.pt", root / "materialized.out.pt",
                                                  module="transformers.models.gpt2")
    expected["materialized"] = logits(vanilla, input_ids=x)
    # the paper's MLP, loaded through remote code and saved again by transformers alone
    model, inputs = patch(tiny_mlp(), ETFConfig(basis="orthogonal")), {"pixel_values": torch.randn(4, 784)}
    model.save_pretrained(root / "mlp-first")
    torch.save(inputs, root / "mlp-again.in.pt")
    cases["mlp-again"] = _load_and_save_logits("AutoModelForImageClassification", root / "mlp-first",
                                               root / "mlp-again.in.pt", root / "mlp-again.out.pt",
                                               again=root / "mlp-second")
    expected["mlp-again"] = logits(model, **inputs)
    return root, run_python_cases(cases, without_etf_hf=True), expected


def _check_case(without_etf_hf, case: str) -> Path:
    root, errors, expected = without_etf_hf
    assert errors[case].error == "", errors[case].error[-3000:]
    assert torch.equal(torch.load(root / f"{case}.out.pt"), expected[case])
    return root


@pytest.mark.slow  # a fresh Python process (one for every case of this file)
@pytest.mark.parametrize("case", sorted(REMOTE_CASES))
def test_loads_without_etf_hf_through_remote_code(case: str, without_etf_hf) -> None:
    _check_case(without_etf_hf, case)


def _materialized() -> tuple[GPT2LMHeadModel, torch.Tensor, torch.Tensor]:
    """A patched GPT-2 with non-unit gains, materialized; with an input batch and the patched model's logits."""
    model = patch(tiny_gpt2(), ETFConfig(basis="orthogonal"))
    with torch.no_grad():
        for _, layer in etf_layers(model):
            layer.frame_norm.mul_(1.5)
    x = token_batch()
    expected = logits(model, input_ids=x)
    return materialize(model), x, expected


def test_materialize_returns_the_vanilla_model_with_identical_outputs() -> None:
    vanilla, x, expected = _materialized()
    assert type(vanilla) is GPT2LMHeadModel and vanilla.config.model_type == "gpt2"
    assert not etf_layers(vanilla) and not hasattr(vanilla.config, "etf")
    assert type(vanilla.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    assert torch.allclose(logits(vanilla, input_ids=x), expected, atol=1e-5)
    assert all(p.requires_grad for p in vanilla.parameters())


@pytest.mark.slow  # a fresh Python process (shared, see `without_etf_hf`)
def test_materialized_checkpoint_loads_without_etf_hf(without_etf_hf) -> None:
    root = _check_case(without_etf_hf, "materialized")
    assert not (root / "materialized" / REMOTE_CODE_FILE).exists()


def test_materialize_needs_a_patched_model() -> None:
    with pytest.raises(ValueError, match="not patched"):
        materialize(tiny_gpt2())


def test_push_to_hub_uploads_the_save_folder_and_a_model_card(monkeypatch, tmp_path: Path) -> None:
    """No network here: everything up to HfApi.create_commit is the real code path; the commit is
    intercepted and its operations inspected."""
    commits = []

    class Repo:
        repo_id = "someone/etf-gpt2"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())

    def fake_commit(self, repo_id, operations, **kwargs):
        commits.append((repo_id, {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations},
                        kwargs))
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_commit", fake_commit)
    model = patch(tiny_gpt2(), ETFConfig(basis="orthogonal", layers="last:1"))
    model.config._name_or_path = "openai-community/gpt2"
    model.push_to_hub("etf-gpt2")
    model.save_pretrained(tmp_path)
    (repo_id, files, kwargs), = commits
    assert repo_id == "someone/etf-gpt2"
    assert set(files) == {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", REMOTE_CODE_FILE, "README.md"} <= set(files)
    card = files["README.md"].decode()
    metadata = card_metadata(card)
    assert {"etf", "neural-collapse"} <= set(metadata["tags"])
    assert metadata["base_model"] == "openai-community/gpt2" and metadata["library_name"] == "transformers"
    summary = etf_hf.parameter_summary(model)
    assert f"{summary['trainable']:,}" in card and f"{summary['total']:,}" in card
    assert '"basis": "orthogonal"' in card and "trust_remote_code=True" in card and "materialize" in card
    # the quick start names the task's Auto class, not AutoModelForPreTraining (which maps GPT-2's LM head too)
    assert "AutoModelForCausalLM.from_pretrained(" in card and "AutoModelForPreTraining" not in card


def card_metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_a_users_own_card_keeps_its_text_and_gains_the_etf_section_once(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# My model\n\nmy own words\n")
    model = patch(tiny_gpt2())
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card_metadata(card)["license"] == "mit" and "etf" in card_metadata(card)["tags"]
    assert card.index("# My model") < card.index("my own words") < card.index("Fixed simplex-ETF")
    assert card.count("Fixed simplex-ETF") == 1 and card.count("trust_remote_code=True") == 1


def test_trainer_push_to_hub_card_has_the_etf_tags_and_a_later_save_adds_the_etf_section(
        monkeypatch, tmp_path: Path) -> None:
    """The real `Trainer.push_to_hub` (no network: repo creation and the upload are intercepted) replaces the
    folder's card with its own; the model's tags (`add_model_tags` at patch time) reach it, and the next
    `save_model` adds the ETF section to that card instead of keeping it as it is."""
    from transformers import Trainer, TrainingArguments

    class Repo:
        repo_id = "someone/etf-gpt2"

    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, **kw: uploaded.update(
        card=(Path(folder_path) / "README.md").read_text()))
    model = patch(tiny_gpt2(), ETFConfig(basis="orthogonal"))
    assert set(etf_hf.hub.MODEL_TAGS) <= set(model.model_tags)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args)
    trainer.push_to_hub()
    assert "Fixed simplex-ETF" not in uploaded["card"]  # the Trainer's own card: no etf_hf.keep_etf_card(trainer)
    assert {"etf", "neural-collapse", "etf_hf"} <= set(card_metadata(uploaded["card"])["tags"])
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert uploaded["card"].split("---", 2)[2].strip()[:200] in card  # the Trainer's text is kept
    assert card.count("Fixed simplex-ETF") == 1 and "trust_remote_code=True" in card
    assert '"basis": "orthogonal"' in card and "generated_from_trainer" in card_metadata(card)["tags"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.etf == model.config.etf


def _causal_lm_data(count: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids, "labels": ids} for ids in token_batch(batch=count)]


def test_keep_etf_card_trainer_push_to_hub_uploads_the_trainers_card_with_the_etf_section(
        monkeypatch, tmp_path: Path) -> None:
    """The real `Trainer.push_to_hub`, the Hub intercepted: with `keep_etf_card` the uploaded README.md is the
    Trainer's card (training summary, model-index) with the ETF tags, base_model and the ETF section added."""
    from transformers import Trainer, TrainingArguments

    uploads = intercept_hub(monkeypatch, tmp_path / "hub")
    model = patch(tiny_gpt2(), ETFConfig(basis="orthogonal"))
    model.config._name_or_path = "openai-community/gpt2"  # as if loaded from the Hub
    args = TrainingArguments(output_dir=str(tmp_path / "etf-gpt2"), report_to="none", use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_causal_lm_data())
    assert etf_hf.keep_etf_card(trainer) is trainer
    callbacks = len(trainer.callback_handler.callbacks)
    etf_hf.keep_etf_card(trainer)  # a second call changes nothing
    assert len(trainer.callback_handler.callbacks) == callbacks
    trainer.train()
    trainer.push_to_hub()
    trainer.push_to_hub()  # pushing again rewrites the card: still one ETF section
    folder = uploads[-1]
    assert {"config.json", "model.safetensors", REMOTE_CODE_FILE, "README.md"} <= {p.name for p in folder.iterdir()}
    card = (folder / "README.md").read_text()
    metadata = card_metadata(card)
    assert {*etf_hf.hub.MODEL_TAGS, "generated_from_trainer"} <= set(metadata["tags"])
    assert metadata["base_model"] == "openai-community/gpt2" and metadata["model-index"][0]["name"] == "etf-gpt2"
    assert "### Training hyperparameters" in card and "- training_steps: 2" in card  # the Trainer's summary ...
    assert card.index("- training_steps: 2") < card.index("Fixed simplex-ETF")  # ... then the ETF section, once
    assert card.count("Fixed simplex-ETF") == 1 and "Base model: `openai-community/gpt2`." in card
    assert '"basis": "orthogonal"' in card and 'from_pretrained("someone/etf-gpt2", trust_remote_code=True)' in card
    assert AutoModelForCausalLM.from_pretrained(folder).config.etf == model.config.etf


@pytest.mark.slow  # a fresh Python process
def test_keep_etf_card_checkpoint_pushes_carry_the_remote_code_and_the_etf_card(monkeypatch, tmp_path: Path) -> None:
    """A push during training (``push_to_hub=True``) uploads ``output_dir`` after copying in only the weights and
    config: with `keep_etf_card` the remote code that ``config.auto_map`` names and the ETF card are there too,
    and the upload loads where etf_hf is not installed."""
    from transformers import Trainer, TrainingArguments

    uploads = intercept_hub(monkeypatch, tmp_path / "hub")
    model = patch(tiny_gpt2(), ETFConfig(basis="orthogonal"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=2,
                             per_device_train_batch_size=4, save_strategy="steps", save_steps=2, disable_tqdm=True,
                             push_to_hub=True, hub_model_id="someone/etf-gpt2")
    trainer = etf_hf.keep_etf_card(Trainer(model=model, args=args, train_dataset=_causal_lm_data()))
    trainer.train()
    checkpoint_push, = uploads
    assert {REMOTE_CODE_FILE, "README.md", "config.json", "model.safetensors"} <= {
        p.name for p in checkpoint_push.iterdir()}
    card = (checkpoint_push / "README.md").read_text()
    assert card.count("Fixed simplex-ETF") == 1 and "etf" in card_metadata(card)["tags"]
    inputs = token_batch()
    torch.save(inputs, tmp_path / "inputs.pt")
    result = run_python(f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(checkpoint_push)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'inputs.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
""", without_etf_hf=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), logits(model, input_ids=inputs))


def test_keep_etf_card_needs_an_etf_model(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="needs a Trainer whose model is an ETF model.*GPT2LMHeadModel"):
        etf_hf.keep_etf_card(Trainer(model=tiny_gpt2(), args=args))
    adapted = get_peft_model(patch(tiny_gpt2(), ETFConfig(layers="last:1")),
                             LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(TypeError, match="PEFT model.*model.push_to_hub"):
        etf_hf.keep_etf_card(Trainer(model=adapted, args=args))


def test_keep_etf_card_leaves_a_materialized_models_card_to_the_trainer(monkeypatch, tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    uploads = intercept_hub(monkeypatch, tmp_path / "hub")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = etf_hf.keep_etf_card(Trainer(model=patch(tiny_gpt2()), args=args))
    materialize(trainer.model)  # a vanilla GPT-2 again: an ETF section would describe layers it no longer has
    trainer.push_to_hub()
    card = (uploads[-1] / "README.md").read_text()
    assert "Fixed simplex-ETF" not in card and not set(etf_hf.hub.MODEL_TAGS) & set(card_metadata(card)["tags"])
    assert REMOTE_CODE_FILE not in {p.name for p in uploads[-1].iterdir()}


def test_materialized_model_loses_the_etf_tags() -> None:
    model = materialize(patch(tiny_gpt2()))
    assert not set(etf_hf.hub.MODEL_TAGS) & set(model.model_tags or ())


def _with_a_narrower_frame(folder: Path) -> str:
    """Cut one column off a stored frame in ``folder``'s checkpoint; returns its key."""
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.endswith("c_fc.frame"))
    weights[key] = weights[key][:, :-1].contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return key


def test_shape_mismatch_in_checkpoint_is_an_error(tmp_path: Path) -> None:
    patch(tiny_gpt2(), ETFConfig(basis="nearest")).save_pretrained(tmp_path)
    _with_a_narrower_frame(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own check
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_ignore_mismatched_sizes_never_reinitialises_a_frame(tmp_path: Path) -> None:
    """With ``ignore_mismatched_sizes=True`` transformers re-initialises a mismatched weight at random and
    loads on; a vanilla model would. etf_hf's own check refuses, naming the frame."""
    patch(tiny_gpt2(), ETFConfig(basis="nearest")).save_pretrained(tmp_path)
    key = _with_a_narrower_frame(tmp_path)
    with pytest.raises(OSError, match=rf"wrong shape: \['{re.escape(key)}'\]; a fixed frame cannot be re-initialised"):
        AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[: len(data) // 2], "incomplete metadata, file not fully covered"),
    (lambda data: b"\x00" * 64 + data[64:], "invalid JSON in header"),
])
def test_a_damaged_weights_file_fails_as_for_the_vanilla_model(damage, message: str, tmp_path: Path) -> None:
    """ETF loading adds no fallback (such as regenerating frames) that could hide a damaged file: the load
    fails with safetensors' own error, exactly as the vanilla model's does."""
    errors = []
    for name, model in (("vanilla", tiny_gpt2()), ("etf", patch(tiny_gpt2()))):
        model.save_pretrained(tmp_path / name)
        weights = tmp_path / name / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        with pytest.raises(SafetensorError, match=message) as error:
            AutoModelForCausalLM.from_pretrained(tmp_path / name)
        errors.append(str(error.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("basis", ["orthogonal", "nearest"])
def test_bf16_round_trip_keeps_the_frame_up_to_bf16_rounding(basis: str, tmp_path: Path) -> None:
    """Frames are defined in float32; a bf16 model holds exactly their bf16 rounding, whether the frame
    was stored (nearest) or regenerated after loading (orthogonal)."""
    model = patch(tiny_bert(), ETFConfig(basis=basis))
    frames = {name: layer.frame.clone() for name, layer in etf_layers(model)}
    gains = {name: layer.frame_norm.detach().clone() for name, layer in etf_layers(model)}
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, layer in etf_layers(loaded):
        assert layer.frame.dtype == torch.bfloat16
        assert torch.equal(layer.frame, frames[name].to(torch.bfloat16)), name
        assert torch.equal(layer.frame_norm, gains[name].to(torch.bfloat16)), name


@pytest.mark.slow  # a fresh Python process (shared, see `without_etf_hf`)
def test_mlp_checkpoint_saved_again_without_etf_hf_stays_self_contained(without_etf_hf) -> None:
    """A model loaded through remote code is saved by transformers alone, which copies the file: the MLP
    classes it defines are neither imported from etf_hf nor inlined twice."""
    root = _check_case(without_etf_hf, "mlp-again")
    first, second = ((root / name / REMOTE_CODE_FILE).read_text() for name in ("mlp-first", "mlp-second"))
    assert second == first and second.count("class MLPForImageClassification(") == 1
    assert "etf_hf" not in second.rpartition(_FOOTER_MARKER)[2]  # the footer imports nothing from etf_hf
