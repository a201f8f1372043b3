"""save_pretrained / from_pretrained round trips, and each transformers 5.x loading trap closed by a test."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageClassification,
                          AutoModelForSequenceClassification)

from etf_hf import FORMAT_VERSION, ETFConfig, etf_layers, patch
from etf_hf.injection import apply_etf_layers
from isolated import Case, run_python, run_python_cases
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_vit, token_batch

CASES = {
    "gpt2": (tiny_gpt2, AutoModelForCausalLM, lambda: {"input_ids": token_batch()}),
    "bert": (tiny_bert, AutoModelForSequenceClassification, lambda: {"input_ids": token_batch(120)}),
    "vit": (tiny_vit, AutoModelForImageClassification, lambda: {"pixel_values": torch.randn(2, 1, 28, 28)}),
    "llama": (tiny_llama, AutoModelForCausalLM, lambda: {"input_ids": token_batch()}),
}


def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("basis", ["orthogonal", "canonical", "nearest"])
@pytest.mark.parametrize("family", sorted(CASES))
def test_reloaded_model_is_identical(family: str, basis: str, tmp_path: Path) -> None:
    build, auto_class, make_inputs = CASES[family]
    model = patch(build(), ETFConfig(basis=basis, layers="last:1" if family == "gpt2" else "all")).eval()
    inputs = make_inputs()
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.etf == model.config.etf
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    for (name, layer), (_, original) in zip(etf_layers(loaded), etf_layers(model)):
        assert torch.equal(layer.frame, original.frame), name


def test_regenerated_frames_are_not_left_as_uninitialised_memory(tmp_path: Path) -> None:
    """Trap: transformers 5.x refills non-persistent buffers with torch.empty_like after loading; the
    frames must be rebuilt, not left as whatever memory was there."""
    model = patch(tiny_gpt2())
    model.save_pretrained(tmp_path)
    assert not any(key.endswith(".frame") for key in load_file(tmp_path / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (_, layer), (_, original) in zip(etf_layers(loaded), etf_layers(model)):
        assert torch.equal(layer.frame, original.frame)


def test_nothing_fixed_comes_back_trainable(tmp_path: Path) -> None:
    """Trap: transformers 5.x reloads frozen Parameters with requires_grad=True. Frames and a fixed gain
    are buffers, so after reloading the only trainable tensors in ETF layers are the intended ones."""
    model = patch(tiny_bert(), ETFConfig(trainable_gain=False, basis="nearest"))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    for name, layer in etf_layers(loaded):
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"bias"}, name
        assert torch.equal(layer.frame_norm, dict(etf_layers(model))[name].frame_norm)


def test_vit_checkpoint_keys_round_trip(tmp_path: Path) -> None:
    """Trap: ViT's FFN modules are ViTMLP.fc1/fc2 in memory (5.2x) but transformers rewrites the keys on
    disk; the ETF gains and biases must survive that renaming."""
    model = patch(tiny_vit())
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert sum(key.endswith("frame_norm") for key in keys) == 4
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    gains = {n: layer.frame_norm.item() for n, layer in etf_layers(model)}
    assert {n: layer.frame_norm.item() for n, layer in etf_layers(loaded)} == gains


def test_canonical_frames_are_not_shared_tensors(tmp_path: Path) -> None:
    """Trap: tensors shared across layers make save_pretrained raise; equal frames must be separate."""
    model = patch(tiny_gpt2(), ETFConfig(basis="canonical", trainable_gain=False))
    frames = [layer.frame for _, layer in etf_layers(model)]
    assert len({f.data_ptr() for f in frames}) == len(frames)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()


@pytest.fixture(scope="module")
def vanilla_loads(tmp_path_factory) -> dict[str, Case]:
    """An ETF GPT-2 checkpoint, with and without its remote code, loaded by vanilla transformers in one fresh
    process without etf_hf (`run_python_cases`)."""
    root = tmp_path_factory.mktemp("vanilla_loads")
    patch(tiny_gpt2()).save_pretrained(root / "etf")
    assert json.loads((root / "etf" / "config.json").read_text())["model_type"] == "etf_gpt2"
    patch(tiny_gpt2()).save_pretrained(root / "no-remote-code")
    config = json.loads((root / "no-remote-code" / "config.json").read_text())
    del config["auto_map"]
    (root / "no-remote-code" / "config.json").write_text(json.dumps(config))
    auto = "from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({!r})"
    return run_python_cases({
        "auto": auto.format(str(root / "etf")),
        "auto-without-remote-code": auto.format(str(root / "no-remote-code")),
        "explicit-class": f"from transformers import GPT2LMHeadModel\nGPT2LMHeadModel.from_pretrained({str(root / 'etf')!r})",
    }, without_etf_hf=True)


@pytest.mark.slow  # a fresh Python process (shared, see `vanilla_loads`)
def test_vanilla_auto_class_refuses_an_etf_checkpoint(vanilla_loads) -> None:
    """Trap: a checkpoint keeping model_type gpt2 would load in vanilla transformers with random MLPs.
    The etf_gpt2 type (and the shipped remote code) make the Auto classes raise instead, asking for
    trust_remote_code; with the remote code removed they raise on the unknown model type."""
    assert "trust_remote_code=True" in vanilla_loads["auto"].error
    assert "etf_gpt2" in vanilla_loads["auto-without-remote-code"].error


@pytest.mark.slow  # a fresh Python process (shared, see `vanilla_loads`)
def test_explicit_vanilla_class_loudly_reports_the_missing_ffn(vanilla_loads) -> None:
    """GPT2LMHeadModel.from_pretrained on an ETF checkpoint cannot be exact (the compact checkpoint has no
    dense FFN weights); transformers must at least report the model-type mismatch and every missing
    FFN weight. This pins that the report stays loud."""
    case = vanilla_loads["explicit-class"]
    report = case.stdout + case.stderr
    assert "etf_gpt2" in report
    assert "mlp.c_fc.weight" in report and "MISSING" in report


def test_missing_stored_frame_is_an_error(tmp_path: Path) -> None:
    """A nearest frame cannot be regenerated: a checkpoint without it must not load half-initialised."""
    patch(tiny_gpt2(), ETFConfig(basis="nearest")).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("c_fc.frame"))
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match="cannot be regenerated"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda etf: etf.update(basis="hadamard"), "basis='hadamard' is unknown"),
    (lambda etf: etf.pop("seed"), r"missing field\(s\) \['seed'\]"),
    (lambda etf: etf.update(layers=[0, 7]), r"block index \[7\] out of range"),
    (lambda etf: etf.update(format_version=99), "format_version 99"),
])
def test_malformed_config_etf_names_the_field(edit, message: str, tmp_path: Path) -> None:
    patch(tiny_gpt2()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["etf"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_etf_class_on_a_vanilla_checkpoint_explains_how_to_patch(tmp_path: Path) -> None:
    tiny_gpt2().save_pretrained(tmp_path)
    from etf_hf.modeling_etf import etf_model_class
    from transformers import GPT2LMHeadModel
    with pytest.raises(ValueError, match="etf_hf.patch"):
        etf_model_class(GPT2LMHeadModel).from_pretrained(tmp_path)


def test_from_config_builds_the_patched_structure() -> None:
    model = patch(tiny_bert())
    rebuilt = AutoModel.from_config(model.config)
    assert {n.removeprefix("bert.") for n, _ in etf_layers(model)} == {n for n, _ in etf_layers(rebuilt)}


def test_version_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """A checkpoint written with config.etf format 1 (before head and placement existed) rebuilds the
    same model: the new fields take the defaults that reproduce what version 1 built."""
    model = patch(tiny_bert(), ETFConfig(layers=[1], basis="nearest")).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for added in ("head", "head_basis", "placement", "recompute", "modules"):
        del config["etf"][added]
    config["etf"]["format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    inputs = {"input_ids": token_batch(120)}
    assert ETFConfig.from_dict(loaded.config.etf) == ETFConfig.from_dict(model.config.etf)
    assert loaded.config.etf["format_version"] == FORMAT_VERSION and not loaded.config.etf["head"]
    assert loaded.config.etf["modules"] == model.config.etf["modules"]  # recomputed from the model, as patch records it
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


@pytest.mark.slow  # fresh Python processes: what `import etf_hf` imports, in both import orders
@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_etf_hf_is_light_and_enough_to_load_an_etf_checkpoint(transformers_first: bool, tmp_path: Path) -> None:
    """``import etf_hf`` imports neither torch nor transformers, yet an ETF checkpoint then loads through the
    Auto classes (ETF config types announced when transformers loads AutoConfig, model classes on first use)."""
    model = patch(tiny_vit(), ETFConfig(basis="orthogonal"))
    model.save_pretrained(tmp_path)
    inputs = {"pixel_values": torch.randn(2, 1, 28, 28)}
    torch.save(inputs, tmp_path / "inputs.pt")
    first = "from transformers import AutoConfig\nimport etf_hf" if transformers_first else """import sys, etf_hf
assert not {"torch", "transformers"} & set(sys.modules), sorted({"torch", "transformers"} & set(sys.modules))"""
    result = run_python(f"""{first}
import torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r}).eval()
assert type(model).__module__ == "etf_hf.modeling_etf", type(model)
with torch.no_grad():
    torch.save(model(**torch.load({str(tmp_path / 'inputs.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
""")
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), outputs(model.eval(), inputs))


def test_etf_classes_pickle_by_name_even_before_first_use() -> None:
    """Unpickling finds a generated class by module and name; one no code has asked for yet is made then."""
    import etf_hf.configuration_etf
    import etf_hf.modeling_etf
    from transformers import AutoModelForTokenClassification

    model_class = etf_hf.modeling_etf.ETFRobertaForTokenClassification
    config_class = etf_hf.configuration_etf.ETFRobertaConfig
    assert pickle.loads(pickle.dumps(model_class)) is model_class
    assert pickle.loads(pickle.dumps(config_class)) is config_class
    assert AutoModelForTokenClassification._model_mapping[config_class] is model_class
    with pytest.raises(AttributeError):
        etf_hf.modeling_etf.ETFNoSuchModel


def test_config_etf_records_the_modules_loading_rebuilds() -> None:
    """FFN paths below the base model (every head class of the family finds them), the head's below the model."""
    model = patch(tiny_bert(), ETFConfig(layers=[1], head=True))
    modules = model.config.etf["modules"]
    assert modules == [
        {"path": "encoder.layer.1.intermediate.dense", "root": "base_model", "role": "up", "layout": "linear",
         "seed_key": "1:up:dense"},
        {"path": "encoder.layer.1.output.dense", "root": "base_model", "role": "down", "layout": "linear",
         "seed_key": "1:down:dense"},
        {"path": "classifier", "root": "model", "role": "head", "layout": "linear", "seed_key": "head"}]
    paths = {f"bert.{entry['path']}" if entry["root"] == "base_model" else entry["path"] for entry in modules}
    assert paths == {name for name, _ in etf_layers(model)}
    assert patch(tiny_gpt2()).config.etf["modules"][0] == {
        "path": "h.0.mlp.c_fc", "root": "base_model", "role": "up", "layout": "conv1d", "seed_key": "0:up:c_fc"}


def test_a_modules_record_that_layers_do_not_select_is_refused(tmp_path: Path) -> None:
    patch(tiny_gpt2(), ETFConfig(layers=[1])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["etf"]["modules"][0]["path"] = "h.0.mlp.c_fc"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"records modules that its layers=\[1\] do not select in ETFGPT2LMHeadModel "
                                         r"\(first difference: recorded \{.*'path': 'h.0.mlp.c_fc'.*selected \{'path': 'h.1.mlp.c_fc'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_recorded_module_the_model_lacks_is_named() -> None:
    record = dict(patch(tiny_gpt2()).config.etf)
    record["modules"] = [{**record["modules"][0], "path": "h.7.mlp.c_fc"}]
    with pytest.raises(ValueError, match=r"records the module 'h.7.mlp.c_fc' \(in the base model\), which "
                                         r"GPT2LMHeadModel does not have"):
        apply_etf_layers(tiny_gpt2(), record)
