"""One `Architecture` record per family: its facts reach patch, collapse, treatments and bench; a new family
(Qwen2) is one record; encoder-decoder and dual-tower models get a frame per stack and ``layers`` per
stack; block indices come from the stack's block container; single-stack seeds are those of earlier
releases, so their checkpoints regenerate the same frames."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import transformers
from safetensors import safe_open

import etf_hf
from etf_hf import ETFConfig, etf_layers, patch
from etf_hf.architectures import REGISTRY, architecture_for, find_slots, head_names, peft_targets
from etf_hf.collapse import resolve_pooling
from isolated import Case, run_python_cases
from tiny_models import (tiny_bart, tiny_bert, tiny_clip, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_roberta, tiny_t5,
                         tiny_vit, tiny_whisper, token_batch)


def tiny_mlp() -> etf_hf.MLPForImageClassification:
    return etf_hf.MLPForImageClassification(etf_hf.CollapseMLPConfig(input_size=784, hidden_size=16,
                                                                     num_hidden_layers=3, num_labels=4))


#: The single-stack families whose checkpoints predate stacks (their frames must not change).
SINGLE_STACK: dict[str, Callable[[], Any]] = {
    "gpt2": tiny_gpt2, "bert": tiny_bert, "roberta": tiny_roberta, "vit": tiny_vit, "llama": tiny_llama,
    "collapse_mlp": tiny_mlp,
}
#: Blocks per stack of the test models (tiny_models.py) with other than one stack of 2 blocks.
BLOCKS_PER_STACK = {"t5": {"encoder": 2, "decoder": 3}, "bart": {"encoder": 2, "decoder": 3},
                    "whisper": {"encoder": 2, "decoder": 3}, "clip": {"text": 2, "vision": 3},
                    "collapse_mlp": {"": 3}}
EVERY_FAMILY = {**SINGLE_STACK, "qwen2": tiny_qwen2, "t5": tiny_t5, "bart": tiny_bart, "whisper": tiny_whisper,
                "clip": tiny_clip}


def _earlier_seed_key(slot) -> str:
    """The seed key etf_hf derived before stacks: the last number in the owning module's path."""
    parent_path = slot.name.rpartition(".")[0]
    block = [int(part) for part in parent_path.split(".") if part.isdigit()][-1]
    return f"{block}:{slot.role}:{slot.attribute}"


@pytest.mark.parametrize("family", sorted(SINGLE_STACK))
def test_single_stack_frames_are_seeded_as_in_earlier_releases(family: str) -> None:
    model = SINGLE_STACK[family]()
    slots = find_slots(model, ETFConfig(layers="all"))
    assert slots and all(slot.stack == "" for slot in slots)
    assert [slot.seed_key for slot in slots] == [_earlier_seed_key(slot) for slot in slots]


def test_every_registry_family_has_a_test_model() -> None:
    assert {t for a in REGISTRY for t in a.model_types} == set(EVERY_FAMILY)


@pytest.mark.parametrize("family", sorted(EVERY_FAMILY))
def test_record_facts_reach_patch_and_collapse(family: str) -> None:
    model = EVERY_FAMILY[family]()
    architecture = architecture_for(family)
    assert resolve_pooling(model, "auto") == architecture.pooling
    assert head_names(model) == architecture.head
    slots = find_slots(model, ETFConfig(layers="all"))
    owners = {type(slot.parent).__name__ for slot in slots}
    assert owners <= {p.parent for p in architecture.projections}
    assert {(slot.role, slot.attribute) for slot in slots} <= {(p.role, p.attribute) for p in architecture.projections}
    expected = {(stack, i) for stack, count in BLOCKS_PER_STACK.get(family, {"": 2}).items() for i in range(count)}
    assert {(slot.stack, slot.block) for slot in slots} == expected


@pytest.mark.parametrize("family", sorted(set(EVERY_FAMILY) - {"collapse_mlp"}))  # the paper's MLP has no attention
def test_lora_defaults_target_attention_never_an_ffn_projection(family: str) -> None:
    peft = pytest.importorskip("peft")
    model = EVERY_FAMILY[family]()
    ffn = {slot.name for slot in find_slots(model, ETFConfig(layers="all"))}
    config = peft.LoraConfig(r=2, target_modules=peft_targets(family),
                             fan_in_fan_out=architecture_for(family).fan_in_fan_out)
    wrapped = peft.get_peft_model(model, config)
    adapted = {name.removeprefix("base_model.model.") for name, module in wrapped.named_modules()
               if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B"))}
    assert adapted and not adapted & ffn
    assert all(any(word in name for word in ("attn", "attention", "Attention", "q", "v")) for name in adapted)


def test_peft_defaults_come_from_peft_unless_the_record_names_them() -> None:
    constants = pytest.importorskip("peft.utils.constants")
    table = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert peft_targets("llama") == list(table["llama"]) and peft_targets("etf_qwen2") == list(table["qwen2"])
    assert peft_targets("vit") == architecture_for("vit").peft_targets  # peft's ViT names predate transformers 5.2x
    assert peft_targets("olmo") is None and peft_targets("collapse_mlp") is None  # neither knows: ask the user
    assert architecture_for("gpt2").fan_in_fan_out and not architecture_for("bert").fan_in_fan_out


def test_recipe_lora_defaults_read_the_records() -> None:
    pytest.importorskip("peft")
    from etf_hf.app.treatments import validate_modes

    [gpt2] = validate_modes([{"name": "l", "lora": {}}], has_labels=False, model_type="gpt2", training={})
    assert gpt2.lora["target_modules"] == ["c_attn"] and gpt2.lora["fan_in_fan_out"] is True
    [bart] = validate_modes([{"name": "l", "lora": {}}], has_labels=True, model_type="etf_bart", training={})
    assert bart.lora["modules_to_save"] == ["classification_head"] and bart.lora["fan_in_fan_out"] is False


def test_bench_families_are_the_records_with_bench_inputs() -> None:
    from etf_hf.app import bench

    assert set(bench.FAMILIES) == {t for a in REGISTRY if a.bench for t in a.model_types} >= {"gpt2", "bert", "vit",
                                                                                                  "qwen2"}
    assert set(bench.GENERATIVE) == {"gpt2", "qwen2"}
    for family in bench.FAMILIES:
        config = bench.model_config(family, "tiny")
        model = bench.build_model(family, config)
        assert model.can_generate() == (family in bench.GENERATIVE)
        inputs = bench.make_batch(family, config, 2, 8, torch.device("cpu"), seed=0)
        assert torch.isfinite(model(**inputs).loss)
    with pytest.raises(bench.BenchError, match="exceeds this qwen2 config's 128 positions"):
        bench.make_batch("qwen2", bench.model_config("qwen2", "tiny"), 1, 129, torch.device("cpu"), seed=0)


# ---- C: an Auto mapping whose model belongs to another architecture ---------------------------------------

def test_register_model_type_skips_auto_entries_of_other_architectures() -> None:
    etf_hf.register_model_type("qwen2")  # transformers 5.24 maps Qwen2Config to JevModel in one Auto class
    config_class = etf_hf.modeling_etf.etf_config_class(transformers.Qwen2Config)
    registered = []
    for auto in etf_hf.hub.auto_classes():
        try:
            registered.append(auto._model_mapping[config_class])
        except (KeyError, ValueError):
            continue
    assert len(registered) >= 3 and all(model.config_class is config_class for model in registered)
    causal_lm = transformers.AutoModelForCausalLM._model_mapping[config_class]
    assert causal_lm.etf_vanilla_class is transformers.Qwen2ForCausalLM


# ---- a family added as one record: Qwen2 ------------------------------------------------------------------

def _train_one_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """One AdamW step; the frames must not move, the gains must."""
    frames = {name: layer.frame.clone() for name, layer in etf_layers(model)}
    gains = {name: layer.frame_norm.detach().clone() for name, layer in etf_layers(model)}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**inputs).loss.backward()
    optimizer.step()
    model.eval()
    assert all(torch.equal(frames[name], layer.frame) for name, layer in etf_layers(model))
    assert any(not torch.equal(gains[name], layer.frame_norm) for name, layer in etf_layers(model))


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.logits_per_image


def _round_trip(model: torch.nn.Module, auto_class: str, inputs: dict[str, torch.Tensor], folder: Path) -> None:
    """Train a step, save, reload through the Auto class: identical config.etf, ETF layers and logits."""
    _train_one_step(model, inputs)
    model.save_pretrained(folder)
    loaded = getattr(transformers, auto_class).from_pretrained(folder).eval()
    assert loaded.config.etf == model.config.etf
    assert [name for name, _ in etf_layers(loaded)] == [name for name, _ in etf_layers(model)]
    with torch.no_grad():
        assert torch.equal(_logits(loaded(**inputs)), _logits(model(**inputs)))


def test_qwen2_is_patched_trained_saved_and_reloaded(tmp_path: Path) -> None:
    model = patch(tiny_qwen2(), ETFConfig())
    assert type(model).__name__ == "ETFQwen2ForCausalLM" and model.config.etf["layers"] == [0, 1]
    assert {name.rsplit(".", 1)[1] for name, _ in etf_layers(model)} == {"gate_proj", "up_proj", "down_proj"}
    ids = token_batch()
    _round_trip(model, "AutoModelForCausalLM", {"input_ids": ids, "labels": ids}, tmp_path)


# ---- D: block indices from the block containers ---------------------------------------------------------

@pytest.mark.parametrize("layers,blocks", [
    ([1], {"encoder.block.1", "decoder.block.1"}),
    ([0], {"encoder.block.0", "decoder.block.0"}),
    ("last:1", {"encoder.block.1", "decoder.block.2"}),
    ({"decoder": [2]}, {"decoder.block.2"}),
])
def test_target_modules_blocks_are_counted_in_each_stack_not_by_the_last_number(layers, blocks: set[str]) -> None:
    model = patch(tiny_t5(), ETFConfig(target_modules=[r".*DenseReluDense\.w[io]"], layers=layers))
    patched = {name.split(".layer.")[0] for name, _ in etf_layers(model)}
    assert patched == blocks and len(etf_layers(model)) == 2 * len(blocks)
    recorded = model.config.etf["layers"]
    assert {f"{stack}.block.{i}" for stack, indices in recorded.items() for i in indices} == blocks


# ---- encoder-decoder and dual-tower models ----------------------------------------------------------------

def _t5_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": token_batch(), "labels": token_batch(length=5)}


def _bart_inputs() -> dict[str, torch.Tensor]:
    ids = token_batch()
    body = ids[:, :-1]
    body[body == 2] = 3
    ids[:, -1] = 2  # BART classifies at the eos token, which every sequence must hold once
    return {"input_ids": ids, "labels": torch.tensor([0, 2])}


def _whisper_inputs() -> dict[str, torch.Tensor]:
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    return {"input_features": features, "labels": token_batch(length=5)}


def _clip_inputs() -> dict[str, torch.Tensor]:
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return {"input_ids": token_batch(length=6), "pixel_values": pixels, "return_loss": True}


STACKED = {
    "t5": (tiny_t5, "AutoModelForSeq2SeqLM", _t5_inputs, ("encoder", "decoder")),
    "bart": (tiny_bart, "AutoModelForSequenceClassification", _bart_inputs, ("encoder", "decoder")),
    "whisper": (tiny_whisper, "AutoModelForSpeechSeq2Seq", _whisper_inputs, ("encoder", "decoder")),
    "clip": (tiny_clip, "AutoModel", _clip_inputs, ("text", "vision")),
}


@pytest.mark.parametrize("family", sorted(STACKED))
def test_each_stack_gets_its_own_frames(family: str) -> None:
    build, _, _, (first, second) = STACKED[family]
    model = patch(build(), ETFConfig(layers="all"))
    assert model.config.etf["layers"] == {first: [0, 1], second: [0, 1, 2]}
    frames = {(slot.stack, slot.block, slot.role, slot.attribute): slot.parent.get_submodule(slot.attribute).frame
              for slot in find_slots(model, ETFConfig(layers="all"))}
    shared = [key for key in frames if key[0] == first and (second, *key[1:]) in frames]
    assert shared and all(not torch.equal(frames[key], frames[(second, *key[1:])]) for key in shared)


@pytest.mark.parametrize("family", sorted(STACKED))
def test_stacked_model_is_patched_per_stack_trained_saved_and_reloaded(family: str, tmp_path: Path) -> None:
    build, auto_class, make_inputs, (first, second) = STACKED[family]
    model = patch(build(), ETFConfig(layers={first: "last:1", second: "all"}))
    assert model.config.etf["layers"] == {first: [1], second: [0, 1, 2]}
    stacks = {slot.stack for slot in find_slots(model, ETFConfig.from_dict(model.config.etf))}
    assert stacks == {first, second} and len(etf_layers(model)) == 2 * 4
    _round_trip(model, auto_class, make_inputs(), tmp_path)


@pytest.mark.parametrize("layers,message", [
    ({"encodr": "all"}, r"names stack\(s\) \['encodr'\] that WhisperForConditionalGeneration does not have; its "
                        r"stacks: 'encoder' \(2 blocks\), 'decoder' \(3 blocks\)"),
    ({"encoder": [2]}, r"block index \[2\] out of range for the encoder stack of WhisperForConditionalGeneration with "
                       r"2 blocks \(valid: 0..1"),
    ([2], r"out of range for the encoder stack .*give layers per stack instead, e.g. \{'encoder': 'all', "
          r"'decoder': 'all'\}"),
    ({"decoder": "last:4"}, r"'last:4', but the decoder stack of WhisperForConditionalGeneration has only 3 blocks"),
])
def test_per_stack_layers_errors_name_the_stack_and_the_choices(layers, message: str) -> None:
    model = tiny_whisper()
    with pytest.raises(ValueError, match=message):
        patch(model, ETFConfig(layers=layers))
    assert not etf_layers(model)


def test_per_stack_layers_on_a_single_stack_model_are_refused() -> None:
    with pytest.raises(ValueError, match=r"names stacks, but GPT2LMHeadModel has a single stack of blocks"):
        patch(tiny_gpt2(), ETFConfig(layers={"decoder": "all"}))


def test_pretrained_default_is_the_second_half_of_each_stack() -> None:
    model = tiny_whisper()
    model.config._name_or_path = "some/checkpoint"  # what from_pretrained records
    patch(model, ETFConfig())
    assert model.config.etf["layers"] == {"encoder": [1], "decoder": [2]}
    assert model.config.etf["placement"]["rule"] == "default-pretrained"


def test_auto_placement_on_a_stacked_model_asks_for_layers_per_stack() -> None:
    data = [{"input_ids": token_batch()[0], "labels": 0}, {"input_ids": token_batch()[1], "labels": 1}]
    with pytest.raises(ValueError, match=r"layers='auto' measures NCC along one stack .* \{'encoder': 'all', "):
        patch(tiny_t5(), ETFConfig(layers="auto"), data=data, num_classes=2)


def test_one_layer_list_for_all_stacks_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    """What a release before stacks wrote for BART: one list for both stacks, and frames shared by them."""
    patch(tiny_bart(), ETFConfig(layers="all")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["etf"]["layers"] = [0, 1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lists layers=\[0, 1\] for all its stacks at once.*same frame"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)


REMOTE_FAMILIES = ("t5", "bart", "whisper", "clip", "qwen2")


@pytest.fixture(scope="module")
def loaded_without_etf_hf(tmp_path_factory) -> tuple[Path, dict[str, Case], dict[str, torch.Tensor]]:
    """A checkpoint of each of `REMOTE_FAMILIES`, loaded through its remote code in one fresh process
    without etf_hf (`run_python_cases`): (folder, family -> `Case`, family -> the logits it must give)."""
    root = tmp_path_factory.mktemp("remote_families")
    cases: dict[str, str] = {}
    expected: dict[str, torch.Tensor] = {}
    for family in REMOTE_FAMILIES:
        if family == "qwen2":
            model, auto_class, inputs = patch(tiny_qwen2()), "AutoModelForCausalLM", {"input_ids": token_batch()}
        else:
            build, auto_class, make_inputs, (first, second) = STACKED[family]
            model = patch(build(), ETFConfig(layers={first: [0], second: "last:2"}))
            inputs = {k: v for k, v in make_inputs().items() if k not in ("labels", "return_loss")}
            if family in ("t5", "whisper"):
                inputs["decoder_input_ids"] = token_batch(length=4)
        model.eval().save_pretrained(root / family)
        torch.save(inputs, root / f"{family}.in.pt")
        cases[family] = f"""
import torch, transformers
model = transformers.{auto_class}.from_pretrained({str(root / family)!r}, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
with torch.no_grad():
    output = model(**torch.load({str(root / f'{family}.in.pt')!r}))
    torch.save(output.logits if hasattr(output, "logits") else output.logits_per_image,
               {str(root / f'{family}.out.pt')!r})
"""
        with torch.no_grad():
            expected[family] = _logits(model(**inputs))
    return root, run_python_cases(cases, without_etf_hf=True), expected


@pytest.mark.slow  # a fresh Python process, shared by the families
@pytest.mark.parametrize("family", REMOTE_FAMILIES)
def test_stacked_and_new_families_load_without_etf_hf_through_remote_code(family: str, loaded_without_etf_hf) -> None:
    root, errors, expected = loaded_without_etf_hf
    assert errors[family].error == "", errors[family].error[-3000:]
    assert torch.equal(torch.load(root / f"{family}.out.pt"), expected[family])


#: Compact checkpoints (frames left out, regenerated from their seeds on load) written by etf_hf at commit
#: c302e56, before stacks, with the logits they computed then (io.pt).
EARLIER_RELEASE = Path(__file__).parent / "fixtures" / "etf_hf_c302e56"


@pytest.mark.parametrize("name,auto_class", [("gpt2-orthogonal", "AutoModelForCausalLM"),
                                             ("bert-structured", "AutoModelForSequenceClassification")])
def test_checkpoint_of_an_earlier_release_regenerates_the_same_frames(name: str, auto_class: str) -> None:
    inputs, expected = torch.load(EARLIER_RELEASE / name / "io.pt")
    model = getattr(transformers, auto_class).from_pretrained(EARLIER_RELEASE / name).eval()
    with safe_open(EARLIER_RELEASE / name / "model.safetensors", "pt") as weights:
        assert etf_layers(model) and not [key for key in weights.keys() if key.endswith(".frame")]  # regenerated
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-6)  # BLAS may differ by ulps


def test_resolve_returns_what_patch_records_and_changes_nothing() -> None:
    model = tiny_whisper()
    resolved = etf_hf.resolve(model, ETFConfig(layers={"decoder": "last:2"}, head=False))
    assert resolved.layers == {"encoder": [], "decoder": [1, 2]} and not etf_layers(model)
    assert patch(model, ETFConfig(layers={"decoder": "last:2"})).config.etf == resolved.to_dict()
    assert {slot.stack for slot in find_slots(model, resolved)} == {"decoder"} and len(etf_layers(model)) == 4


def test_lock_blocks_refuses_a_model_of_several_stacks() -> None:
    """Adaptive-ETF's lock counts blocks along one stack; on an encoder-decoder the index would be ambiguous."""
    model = tiny_t5()
    with pytest.raises(ValueError, match=r"lock_blocks locks blocks of a single stack, but T5ForConditionalGeneration "
                                         r"has stacks \['decoder', 'encoder'\]"):
        etf_hf.lock_blocks(model, [1])
    assert not etf_layers(model)


@pytest.mark.parametrize("layers,message", [
    ({"encoder": "auto"}, r"ETFConfig.layers\['encoder'\]='auto': use 'all', 'last:N', a list of block indices$"),
    ({"encoder": None}, r"ETFConfig.layers\['encoder'\] must be 'all', 'last:N' or a list of ints, got NoneType"),
    ({"decoder": "last:0"}, r"ETFConfig.layers\['decoder'\]='last:0' selects nothing"),
    ({}, r"per-stack layers map stack names \(e.g. 'encoder', 'decoder'\) to 'all', 'last:N' or \[i, ...\]"),
    ({"encoder": [], "decoder": []}, r"fixes no FFN block: that only makes sense with head=True"),
])
def test_per_stack_layers_are_validated_by_the_config(layers, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ETFConfig(layers=layers)


def test_per_stack_layers_are_normalised_and_round_trip() -> None:
    config = ETFConfig(layers={"encoder": [1, 0, 1], "decoder": "last:2"})
    assert config.layers == {"encoder": [0, 1], "decoder": "last:2"}
    assert ETFConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ETFConfig(layers={"encoder": [], "decoder": []}, head=True).layers == {"encoder": [], "decoder": []}
