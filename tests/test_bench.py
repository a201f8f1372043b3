"""The benchmark harness (etf_hf.app.bench): CPU smoke runs through `main`, and its parts.

No timing is asserted here: performance goals live in BENCHMARKS.md and are measured with the harness.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from etf_hf import ETFConfig, patch, resolve
from etf_hf.app import treatments
from etf_hf.app.bench import (Settings, _child_command, _densify_structured, add_ratios, apply_mode, build_parser,
                              lora_available, main, markdown, run_benchmark, saved_activation_bytes, tensor_peak_bytes,
                              treatment)
from etf_hf.app.bounds import BiasOnly, BroadcastHidden, LeadingUnits, replace_ffn
from etf_hf.app.recipe import ConfigError
from etf_hf.architectures import find_slots
from tiny_models import tiny_gpt2, tiny_vit, token_batch

REPO = Path(__file__).resolve().parents[1]
DENSE = "dense:n_inner=128"
SMOKE_MODES = (["full", "frozen", "etf-orthogonal", "etf-structured", "ffn-activation-only", "ffn-free", DENSE]
               + (["lora"] if lora_available() else []))
TINY = ["--family", "gpt2", "--size", "tiny", "--batch", "2", "--seq", "16", "--threads", "1", "--quiet"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    status = _run(TINY + ["--steps", "2", "--warmup", "1", "--modes", ",".join(SMOKE_MODES),
                          "--json", str(folder / "out.json"), "--markdown", str(folder / "out.md")])
    return status, json.loads((folder / "out.json").read_text()), (folder / "out.md").read_text()


@pytest.fixture(scope="module")
def inference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_inference")
    status = _run(TINY + ["--steps", "2", "--warmup", "1", "--inference", "--modes", "full,etf-structured,ffn-free",
                          "--new-tokens", "6", "--prompt", "4", "--gen-batches", "1,2", "--gen-repeats", "2",
                          "--json", str(folder / "out.json"), "--markdown", str(folder / "out.md"),
                          "--profile", str(folder / "profile.md"), "--profile-steps", "1"])
    return (status, json.loads((folder / "out.json").read_text()), (folder / "out.md").read_text(),
            (folder / "profile.md").read_text())


def test_smoke_run_writes_every_mode(smoke):
    status, result, _ = smoke
    assert status == 0
    rows = {row["mode"]: row for row in result["results"]}
    assert list(rows) == SMOKE_MODES
    assert result["skipped"] == []
    for row in rows.values():
        assert row["step_ms_median"] > 0 and len(row["step_ms"]) == 2 and len(row["warmup_ms"]) == 1
        assert row["tokens_per_s"] == pytest.approx(2 * 16 / (row["step_ms_median"] / 1000))
        assert row["peak_memory_bytes"] >= 0 and row["memory_kind"]
        assert row["saved_activation_bytes"] > 0
        # a step holds the activations saved for backward besides, in full, every fp32 weight and its two
        # AdamW moments (12 bytes a parameter)
        weights = 12 * row["base_total"] if row["mode"] == "full" else 0
        assert row["peak_tensor_bytes"] > row["saved_activation_bytes"] + weights
        assert row["checkpoint_bytes"] > 0
        assert row["reference_total"] == rows["full"]["base_total"]
        if row["mode"] != DENSE:
            assert row["base_total"] == rows["full"]["base_total"]  # every mode starts from the same model
    assert rows["full"]["step_over_full"] == 1.0 and rows["ffn-free"]["step_over_ffn_free"] == 1.0
    assert rows["ffn-activation-only"]["memory_over_activation_only"] == 1.0
    assert rows["ffn-free"]["tensor_memory_over_ffn_free"] == 1.0
    assert rows["etf-structured"]["tensor_memory_over_full"] == (rows["etf-structured"]["peak_tensor_bytes"]
                                                                 / rows["full"]["peak_tensor_bytes"])
    step = rows["etf-structured"]["step_ms_median"]
    assert rows["etf-structured"]["step_over_activation_only"] == step / rows["ffn-activation-only"]["step_ms_median"]
    meta = result["meta"]
    assert meta["device"] and meta["torch"] == torch.__version__ and meta["dtype"] == "fp32"
    assert (meta["batch"], meta["seq"], meta["steps"], meta["warmup"], meta["compile"]) == (2, 16, 2, 1, False)
    assert meta["inference"] is False


def test_smoke_trainable_counts(smoke):
    _, result, _ = smoke
    trainable = {row["mode"]: row["trainable"] for row in result["results"]}
    full = trainable["full"]
    assert trainable["frozen"] < full and trainable["etf-orthogonal"] < full and trainable["etf-structured"] < full
    # the bounds keep only the FFN biases: no mode that keeps the same slots trainable can have fewer
    assert trainable["ffn-free"] == trainable["ffn-activation-only"] <= trainable["frozen"]
    assert trainable["frozen"] < trainable["etf-orthogonal"] == trainable["etf-structured"]
    assert trainable["etf-orthogonal"] - trainable["frozen"] == 4  # one gain per projection, 2 blocks x 2
    if "lora" in trainable:
        assert trainable["lora"] < trainable["ffn-free"]
    rows = {row["mode"]: row for row in result["results"]}
    assert rows["full"]["trainable_pct"] == 100.0
    # regenerable frames are not stored, so the ETF checkpoint is smaller than the full one
    assert rows["etf-structured"]["checkpoint_bytes"] < rows["full"]["checkpoint_bytes"]


def test_dense_mode_builds_the_overridden_model(smoke):
    """dense:n_inner=128 is the full model with a 128-wide FFN (the tiny preset's is 4 x 64 = 256)."""
    _, result, table = smoke
    row = next(row for row in result["results"] if row["mode"] == DENSE)
    assert row["config_overrides"] == {"n_inner": 128}
    blocks, width = 2, 64
    ffn_weights_saved = blocks * 2 * width * (256 - 128)  # two projections per block, 128 hidden units fewer
    ffn_biases_saved = blocks * (256 - 128)
    assert row["base_total"] == row["reference_total"] - ffn_weights_saved - ffn_biases_saved
    assert row["trainable"] == row["base_total"]
    assert row["trainable_pct"] == pytest.approx(100.0 * row["base_total"] / row["reference_total"])
    assert f"| {DENSE} |" in table


def test_json_rows_hold_what_an_iso_cost_tool_reads(smoke):
    """Issue 16's matcher reads step time, memory, throughput and trainable counts per mode from --json."""
    _, result, _ = smoke
    for row in result["results"]:
        for key in ("mode", "trainable", "trainable_pct", "step_ms_median", "step_ms", "tokens_per_s",
                    "peak_memory_bytes", "saved_activation_bytes", "step_over_full", "memory_over_full"):
            assert key in row, key
    assert result["meta"]["model_config"]["n_layer"] == 2


def test_smoke_markdown_has_a_row_per_mode(smoke):
    _, _, table = smoke
    assert "**Device:**" in table and f"torch {torch.__version__}" in table and "transformers" in table
    assert "batch 2 × 16 tokens" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [row.split("|")[1].strip() for row in rows] == SMOKE_MODES
    header = next(line for line in table.splitlines() if line.startswith("| mode"))
    assert "step / act-only" in header and "mem / ffn-free" in header and "saved MiB" in header
    assert "peak tensors MiB" in header and "tensors / ffn-free" in header
    assert all(len(row.split("|")) == len(header.split("|")) == 19 for row in rows)  # 17 columns


def test_inference_run_reports_forward_and_generation(inference):
    status, result, table, _ = inference
    assert status == 0
    rows = {row["mode"]: row for row in result["results"]}
    assert list(rows) == ["full", "etf-structured", "ffn-free"]
    for row in rows.values():
        assert row["forward_ms_median"] > 0 and len(row["forward_ms"]) == 2
        assert row["forward_tokens_per_s"] == pytest.approx(2 * 16 / (row["forward_ms_median"] / 1000))
        assert [g["batch"] for g in row["generate"]] == [1, 2]
        for generation in row["generate"]:
            assert generation["new_tokens"] == 6 and len(generation["seconds"]) == 2
            assert generation["tokens_per_s"] == pytest.approx(
                generation["batch"] * 6 / generation["seconds_median"])
        assert "step_ms_median" not in row  # nothing was trained
    assert rows["full"]["forward_speed_over_full"] == 1.0
    assert [g["speed_over_full"] for g in rows["full"]["generate"]] == [1.0, 1.0]
    structured = rows["etf-structured"]["generate"][0]
    assert structured["speed_over_full"] == structured["tokens_per_s"] / rows["full"]["generate"][0]["tokens_per_s"]
    meta = result["meta"]
    assert (meta["inference"], meta["new_tokens"], meta["prompt_tokens"], meta["gen_batches"]) == (True, 6, 4, [1, 2])
    assert "generate b1 tokens/s" in table and "generate b2 tokens/s" in table and "KV cache" in table


def test_inference_profile_file_has_each_mode(inference):
    _, _, _, profile = inference
    for mode in ("full", "etf-structured", "ffn-free"):
        assert f"## {mode}: 1 forward passes" in profile
        assert f"## {mode}: generate(), batch 1, 6 new tokens" in profile
    assert "by self CPU time" in profile and "aten::" in profile


def test_inference_of_a_classifier_has_no_generation(tmp_path, restore_threads):
    out = tmp_path / "bert.json"
    assert main(["--family", "bert", "--size", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0",
                 "--inference", "--modes", "full,ffn-activation-only", "--threads", "1", "--json", str(out),
                 "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert [row["generate"] for row in result["results"]] == [[], []]
    assert "no generate()" in markdown(result) and "generate b1" not in markdown(result)


def test_activation_only_keeps_the_hidden_activation_and_trains_through_it():
    """ffn-free drops the activation; ffn-activation-only computes it at full hidden width, keeps it for
    backward and sends gradients through it: it must save at least one hidden-wide tensor per block more."""
    batch = {"input_ids": token_batch(), "labels": token_batch()}  # 2 x 10 tokens
    saved, grads = {}, {}
    for mode in ("ffn-free", "ffn-activation-only"):
        torch.manual_seed(0)
        model = apply_mode(tiny_gpt2(), mode, "gpt2")
        saved[mode] = saved_activation_bytes(model, batch, lambda: torch.autocast("cpu", enabled=False))
        model(**batch).loss.backward()
        grads[mode] = model.transformer.h[0].mlp.c_fc.bias.grad
    hidden_bytes = 2 * 10 * 4 * 32 * 4  # tokens x hidden width (4 x 32) x fp32
    assert saved["ffn-activation-only"] - saved["ffn-free"] >= 2 * hidden_bytes  # 2 blocks
    assert grads["ffn-free"] is None  # nothing downstream reads the activation
    assert grads["ffn-activation-only"] is not None and grads["ffn-activation-only"].abs().sum() > 0


class _Scaled(torch.nn.Module):
    """tanh(linear(x)) * a buffer, summed: autograd saves x (for the weight's gradient) and tanh's output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 1000)
        self.register_buffer("scale", torch.ones(1000))

    def forward(self, x: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(loss=(torch.tanh(self.linear(x)) * self.scale).sum())


def test_saved_activation_bytes_counts_activations_not_weights_exactly():
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    saved = saved_activation_bytes(_Scaled(), {"x": torch.randn(4, 8)}, off)
    assert saved == 4 * 8 * 4 + 4 * 1000 * 4  # x and tanh's output in fp32; the weight and the buffer not


def test_tensor_peak_counts_what_tensors_hold_at_once():
    """Independent reference: the bytes of the tensors alive together, counted by hand."""
    mib = 2**20
    kept = torch.zeros(mib // 4)  # 1 MiB, allocated before the call and read inside it (counted)

    def run() -> float:
        first = torch.ones(mib)  # 4 MiB
        second = torch.ones(2 * mib)  # 8 MiB: 13 MiB with `first` and `kept`
        del first
        # ones (4 MiB) + a scalar -> a new 4 MiB while the ones still live: second + both + kept = 17 MiB
        third = torch.ones(mib) + kept.sum()
        return (second.sum() + third.sum()).item()

    peak = tensor_peak_bytes(run, torch.device("cpu"))
    assert peak is not None
    assert 17 * mib <= peak <= 17 * mib + 64  # plus the few bytes of 0-dim results


def test_broadcast_hidden_and_leading_units():
    up, down = torch.nn.Linear(6, 24), Conv1D(6, 24)  # Conv1D(nf=6, nx=24): 24 -> 6
    hidden = BroadcastHidden.from_layer(up, "linear")
    x = torch.randn(3, 5, 6)
    h = hidden(x)
    assert h.shape == (3, 5, 24) and h.is_contiguous() and h.untyped_storage().nbytes() == 3 * 5 * 24 * 4
    assert torch.equal(h[1, 2], up.bias.detach())
    units = LeadingUnits.from_layer(down, "conv1d")
    assert (units.in_features, units.out_features) == (24, 6)
    y = units(torch.nn.functional.gelu(h))
    assert torch.equal(y, torch.nn.functional.gelu(h)[..., :6] + down.bias.detach())
    y.sum().backward()
    assert hidden.bias.grad[:6].abs().sum() > 0 and torch.equal(hidden.bias.grad[6:], torch.zeros(18))
    no_bias = BroadcastHidden.from_layer(torch.nn.Linear(6, 24, bias=False), "linear")
    assert no_bias.bias.requires_grad and torch.equal(no_bias.bias, torch.zeros(24))  # something to train
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert units(hidden(x)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="widens"):
        LeadingUnits.from_layer(torch.nn.Linear(6, 24), "linear")
    with pytest.raises(ValueError, match="unknown bound 'ffn-half'"):
        replace_ffn(tiny_gpt2(), "ffn-half")


def test_bias_only_returns_only_the_bias():
    layer = torch.nn.Linear(6, 10)
    free = BiasOnly.from_layer(layer, "linear")
    x = torch.randn(3, 4, 6, requires_grad=True)
    out = free(x)
    assert out.shape == (3, 4, 10)
    assert torch.equal(out, layer.bias.detach().expand(3, 4, 10))
    assert torch.equal(free(torch.randn(3, 4, 6) * 100), out)  # the input does not matter
    out.sum().backward()
    assert x.grad is None  # nothing flows back into the input
    assert torch.equal(free.bias.grad, torch.full((10,), 12.0))
    assert [name for name, _ in free.named_parameters()] == ["bias"]


def test_bias_only_conv1d_layout_no_bias_and_autocast():
    conv = Conv1D(10, 6)  # transformers' (in, out) layout: 6 -> 10
    free = BiasOnly.from_layer(conv, "conv1d")
    assert (free.in_features, free.out_features) == (6, 10)
    no_bias = BiasOnly.from_layer(torch.nn.Linear(6, 10, bias=False), "linear")
    assert torch.equal(no_bias(torch.randn(2, 6)), torch.zeros(2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert free(torch.randn(2, 6)).dtype == torch.bfloat16


def test_bounds_and_frozen_hit_exactly_the_etf_slots():
    gpt2 = tiny_gpt2()
    names = [slot.name for slot in find_slots(gpt2, resolve(gpt2, ETFConfig()))]
    assert len(names) == 4
    model = tiny_gpt2()
    replace_ffn(model, "ffn-free")
    assert [name for name, module in model.named_modules() if isinstance(module, BiasOnly)] == names
    assert all(type(block.mlp.act) is torch.nn.Identity for block in model.transformer.h)  # no activation
    assert isinstance(model.transformer.h[0].attn.c_proj, Conv1D)  # the attention's c_proj is not an FFN
    model = tiny_gpt2()
    replace_ffn(model, "ffn-activation-only")
    assert [name for name, module in model.named_modules() if isinstance(module, BroadcastHidden)] == names[::2]
    assert [name for name, module in model.named_modules() if isinstance(module, LeadingUnits)] == names[1::2]
    # the activation runs as the fused ETF FFN runs it (gelu_new as torch's tanh-GELU kernel): still a bound
    assert all(type(block.mlp.act) is torch.nn.GELU and block.mlp.act.approximate == "tanh"
               for block in model.transformer.h)
    vit = tiny_vit()
    replace_ffn(vit, "ffn-activation-only")  # ViT's exact GELU is already one kernel: left as it is
    assert all(type(layer.mlp.activation_fn).__name__ == "GELUActivation" for layer in vit.vit.layers)

    model = apply_mode(tiny_gpt2(), "frozen", "gpt2")
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(f"{name}.weight" for name in names)


def test_bench_modes_are_the_treatments_of_etf_hf_train():
    """One treatments module: bench's frozen, LoRA and ETF modes are the ModeSpecs `etf-hf train` validates."""
    assert treatment("frozen", "gpt2").frozen == treatments._validate_frozen({}, "x")
    assert treatment("etf-orthogonal", "gpt2").etf == treatments._validate_etf({"basis": "orthogonal"}, "x", False)
    assert treatment("etf-structured-dense", "gpt2").etf == ETFConfig(basis="structured")
    assert treatment("full", "gpt2").kind == "full" and treatment("dense:n_layer=1", "gpt2").kind == "full"
    if lora_available():
        for family, has_labels in (("gpt2", False), ("bert", True), ("vit", True)):
            assert treatment("lora", family).lora == treatments._validate_lora({}, "x", has_labels, family, {})
        assert treatment("lora", "gpt2").lora["r"] == treatments.LORA_RANK


def test_structured_dense_variant_computes_the_same_function():
    model = patch(tiny_gpt2(), ETFConfig(basis="structured")).eval()
    ids = token_batch()
    expected = model(ids).logits
    _densify_structured(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(key.endswith(".frame") for key in model.state_dict())  # still not stored


def test_override_config_names_unknown_keys():
    from transformers import GPT2Config

    config = treatments.override_config(GPT2Config(n_layer=4), {"n_inner": 512, "hidden_size": 256}, "here")
    assert (config.n_layer, config.n_inner, config.n_embd) == (4, 512, 256)
    with pytest.raises(ConfigError, match=r"here: GPT2Config has no field 'n_innr' \(did you mean n_inner\?\)"):
        treatments.override_config(GPT2Config(), {"n_innr": 512}, "here")
    with pytest.raises(ConfigError, match="here: GPT2Config refused .*n_inner"):
        treatments.override_config(GPT2Config(), {"n_inner": "wide"}, "here")


@pytest.mark.parametrize("argv, named", [
    (["--modes", "full,etf-sideways"], "etf-sideways"),
    (["--modes", "full,banana"], "banana"),
    (["--modes", "etf-orthogonal-dense"], "etf-structured-dense"),
    (["--family", "llama"], "llama"),
    (["--family", "gpt2", "--size", "huge"], "huge"),
    (["--modes", "full", "--profile", "ffn-free"], "FILE"),
    (["--modes", "full,dense:n_innr=512"], "'n_innr' (did you mean n_inner?)"),
    (["--modes", "dense:n_inner"], "'n_inner' is not KEY=VALUE"),
    (["--modes", "dense:n_layer=1:n_layer=2"], "sets 'n_layer' twice"),
    (["--modes", "dense:n_embd=63"], "cannot be built"),  # 2 heads do not divide 63
    (["--modes", "full,full"], "more than once"),
    (["--inference", "--gen-batches", "1,x"], "--gen-batches"),
    (["--inference", "--prompt", "100", "--new-tokens", "100"], "128 positions"),
])
def test_bad_arguments_are_named(argv, named, capsys, restore_threads):
    assert main(["--size", "tiny"] + argv + ["--quiet"]) == 2
    error = capsys.readouterr().err
    assert "error" in error and named in error
    assert "Traceback" not in error


def test_help_documents_modes_and_json(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for needle in ("dense:KEY=VALUE", "ffn-activation-only", "--inference", "--gen-batches", "--profile FILE",
                   "step_over_X", "tokens_per_s"):
        assert needle in text, needle


def test_lora_skipped_with_a_note_without_peft(monkeypatch):
    monkeypatch.setattr("etf_hf.app.bench.lora_available", lambda: False)
    settings = Settings("gpt2", "tiny", 2, 16, 1, 0, "fp32", "cpu", checkpoint=False)
    result = run_benchmark(settings, ["lora"])
    assert result["results"] == [] and result["skipped"][0]["mode"] == "lora"
    assert "peft" in markdown(result)


def test_ratios_without_baselines_print_dashes():
    rows = [{"mode": "etf-structured", "trainable": 5, "trainable_pct": 50.0, "step_ms_median": 2.0,
             "tokens_per_s": 10.0, "peak_memory_bytes": 2**30, "memory_kind": "x"}]
    add_ratios(rows)
    assert rows[0]["step_over_full"] is None and rows[0]["step_over_ffn_free"] is None
    assert rows[0]["memory_over_activation_only"] is None
    meta = {"family": "gpt2", "size": "tiny", "batch": 1, "tokens_per_example": 8, "dtype": "fp32", "autocast": False,
            "compile": False, "steps": 1, "warmup": 0, "optimizer": "AdamW", "seed": 0, "device": "cpu",
            "torch": "t", "transformers": "x"}
    line = [l for l in markdown({"meta": meta, "results": rows}).splitlines() if l.startswith("| etf")][0]
    assert line.count("–") == 11  # eight ratios, the peak tensors, the saved bytes and the checkpoint size


def test_isolated_child_command_round_trips():
    settings = Settings("bert", '{"num_hidden_layers": 3}', 4, 64, 7, 2, "bf16", "cpu", True, 3, 2e-4, False,
                        profile=True, profile_steps=2, inference=True, new_tokens=9, prompt=5, gen_batches=(1, 4),
                        gen_repeats=2)
    command = _child_command(settings, "ffn-free", "/tmp/x.json", threads=1)
    assert command[1:3] == ["-m", "etf_hf.app.bench"]
    options = build_parser().parse_args(command[3:])
    assert (options.family, options.size, options.batch, options.seq, options.modes, options.steps, options.warmup,
            options.dtype, options.compile, options.seed, options.lr, options.checkpoint, options.profile,
            options.profile_steps, options.threads, options.json, options.quiet) == (
        "bert", '{"num_hidden_layers": 3}', 4, 64, "ffn-free", 7, 2, "bf16", True, 3, 2e-4, False, os.devnull, 2, 1,
        "/tmp/x.json", True)
    assert (options.inference, options.new_tokens, options.prompt, options.gen_batches, options.gen_repeats) == (
        True, 9, 5, "1,4", 2)


def test_etf_hf_bench_subcommand_runs_the_harness(tmp_path):
    """`etf-hf bench ...` hands its options to the harness untouched (argparse would swallow them)."""
    from etf_hf.app.cli import main as cli_main

    out = tmp_path / "bench.json"
    status = cli_main(["bench", "--family", "gpt2", "--size", "tiny", "--batch", "1", "--seq", "8", "--steps", "1",
                       "--warmup", "1", "--modes", "full,etf-structured", "--no-checkpoint", "--threads", "1",
                       "--quiet", "--json", str(out)])
    assert status == 0
    assert [row["mode"] for row in json.loads(out.read_text())["results"]] == ["full", "etf-structured"]


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_isolated_modes_run_in_their_own_processes(tmp_path):
    out, profile = tmp_path / "out.json", tmp_path / "profile.md"
    completed = subprocess.run(
        [sys.executable, "-m", "etf_hf.app.bench", *TINY, "--steps", "1", "--warmup", "1", "--no-checkpoint",
         "--modes", "full,ffn-activation-only,dense:n_layer=1", "--isolate", "--json", str(out),
         "--profile", str(profile), "--profile-steps", "1"],
        cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["isolate"] is True
    assert [row["mode"] for row in result["results"]] == ["full", "ffn-activation-only", "dense:n_layer=1"]
    assert result["results"][2]["config_overrides"] == {"n_layer": 1}
    assert profile.read_text().count("1 training steps") == 3


@pytest.mark.slow
def test_gpu_script_dry_run_writes_its_tables(tmp_path):
    """scripts/gpu_bench.sh --dry-run: the GPU script's exact stages, CPU-sized, end to end."""
    completed = subprocess.run(["bash", str(REPO / "scripts" / "gpu_bench.sh"), "--dry-run", str(tmp_path)],
                               cwd=REPO, env={**_environment(), "PYTHON": sys.executable}, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for stage in ("gpt2-large-eager", "gpt2-small-compile", "gpt2-small-inference"):
        result = json.loads((tmp_path / f"{stage}.json").read_text())
        assert result["results"] and not result["meta"]["compile"]  # the dry run does not compile
        assert (tmp_path / f"{stage}.md").read_text().startswith("**Device:**")
    assert (tmp_path / "gpt2-large-eager.profile.md").exists()
    assert "FAILED" not in (tmp_path / "summary.md").read_text()


def test_structured_saved_mode_is_the_structured_etf_without_recompute():
    """etf-structured-saved trains what etf-structured trains, saving the up-projection's output instead of
    recomputing it: exactly one hidden-wide tensor more per block kept for backward."""
    assert treatment("etf-structured-saved", "gpt2").etf == ETFConfig(basis="structured", recompute=False)
    batch = {"input_ids": token_batch(), "labels": token_batch()}
    saved = {}
    for mode in ("etf-structured", "etf-structured-saved"):
        torch.manual_seed(0)
        model = apply_mode(tiny_gpt2(), mode, "gpt2")
        assert {m.etf_recompute for m in model.modules() if hasattr(m, "etf_recompute")} == {mode == "etf-structured"}
        saved[mode] = saved_activation_bytes(model, batch, lambda: torch.autocast("cpu", enabled=False))
    assert saved["etf-structured-saved"] - saved["etf-structured"] == 2 * (2 * 10 * 4 * 32 * 4)  # 2 blocks
