"""The benchmark harness (etf_hf.app.bench): a CPU smoke run through `main`, and its parts.

No timing is asserted here: performance goals live in BENCHMARKS.md and are measured with the harness.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from etf_hf import ETFConfig, patch
from etf_hf.architectures import find_slots
from etf_hf.app.bench import (BiasOnly, Settings, _child_command, _densify_structured, add_ratios, build_parser,
                          freeze_ffn_weights, lora_available, main, make_ffn_free, markdown, run_benchmark)
from tiny_models import tiny_gpt2, token_batch

SMOKE_MODES = ["full", "frozen", "etf-orthogonal", "etf-structured", "ffn-free"] + (["lora"] if lora_available() else [])


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("bench")
    argv = ["--family", "gpt2", "--size", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1",
            "--modes", ",".join(SMOKE_MODES), "--threads", "1", "--json", str(folder / "out.json"),
            "--markdown", str(folder / "out.md"), "--quiet"]
    try:
        status = main(argv)
    finally:
        torch.set_num_threads(threads)
    return status, json.loads((folder / "out.json").read_text()), (folder / "out.md").read_text()


def test_smoke_run_writes_every_mode(smoke):
    status, result, _ = smoke
    assert status == 0
    rows = {row["mode"]: row for row in result["results"]}
    assert list(rows) == SMOKE_MODES
    assert result["skipped"] == []
    for row in rows.values():
        assert row["step_ms_median"] > 0 and len(row["step_ms"]) == 2 and len(row["warmup_ms"]) == 1
        assert row["peak_memory_bytes"] >= 0 and row["memory_kind"]
        assert row["checkpoint_bytes"] > 0
        assert row["base_total"] == rows["full"]["base_total"]  # every mode starts from the same model
    assert rows["full"]["step_over_full"] == 1.0 and rows["ffn-free"]["step_over_ffn_free"] == 1.0
    meta = result["meta"]
    assert meta["device"] and meta["torch"] == torch.__version__ and meta["dtype"] == "fp32"
    assert (meta["batch"], meta["seq"], meta["steps"], meta["warmup"], meta["compile"]) == (2, 16, 2, 1, False)


def test_smoke_trainable_counts(smoke):
    _, result, _ = smoke
    trainable = {row["mode"]: row["trainable"] for row in result["results"]}
    full = trainable["full"]
    assert trainable["frozen"] < full and trainable["etf-orthogonal"] < full and trainable["etf-structured"] < full
    # ffn-free keeps only the FFN biases: no mode that keeps the same slots trainable can have fewer
    assert trainable["ffn-free"] <= trainable["frozen"] < trainable["etf-orthogonal"] == trainable["etf-structured"]
    assert trainable["etf-orthogonal"] - trainable["frozen"] == 4  # one gain per projection, 2 blocks x 2
    if "lora" in trainable:
        assert trainable["lora"] < trainable["ffn-free"]
    rows = {row["mode"]: row for row in result["results"]}
    assert rows["full"]["trainable_pct"] == 100.0
    # regenerable frames are not stored, so the ETF checkpoint is smaller than the full one
    assert rows["etf-structured"]["checkpoint_bytes"] < rows["full"]["checkpoint_bytes"]


def test_smoke_markdown_has_a_row_per_mode(smoke):
    _, _, table = smoke
    assert "**Device:**" in table and f"torch {torch.__version__}" in table and "transformers" in table
    assert "batch 2 × 16 tokens" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [row.split("|")[1].strip() for row in rows] == SMOKE_MODES
    assert all(len(row.split("|")) == 12 for row in rows)  # 10 columns


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


def test_ffn_free_and_frozen_hit_exactly_the_etf_slots():
    model = tiny_gpt2()
    names = [slot.name for slot in find_slots(model, ETFConfig())]
    make_ffn_free(model)
    replaced = [name for name, module in model.named_modules() if isinstance(module, BiasOnly)]
    assert replaced == names and len(names) == 4
    assert isinstance(model.transformer.h[0].attn.c_proj, Conv1D)  # the attention's c_proj is not an FFN

    model = tiny_gpt2()
    freeze_ffn_weights(model)
    frozen = sorted(name for name, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(f"{name}.weight" for name in names)


def test_structured_dense_variant_computes_the_same_function():
    model = patch(tiny_gpt2(), ETFConfig(basis="structured")).eval()
    ids = token_batch()
    expected = model(ids).logits
    _densify_structured(model)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(key.endswith(".frame") for key in model.state_dict())  # still not stored


@pytest.mark.parametrize("argv, named", [
    (["--modes", "full,etf-sideways"], "etf-sideways"),
    (["--modes", "full,banana"], "banana"),
    (["--modes", "etf-orthogonal-dense"], "etf-structured-dense"),
    (["--family", "llama"], "llama"),
    (["--family", "gpt2", "--size", "huge"], "huge"),
    (["--modes", "full", "--profile", "ffn-free"], "ffn-free"),
])
def test_bad_arguments_are_named(argv, named, capsys, restore_threads):
    assert main(argv + ["--quiet"]) == 2
    error = capsys.readouterr().err
    assert "error" in error and named in error
    assert "Traceback" not in error


def test_lora_skipped_with_a_note_without_peft(monkeypatch):
    monkeypatch.setattr("etf_hf.app.bench.lora_available", lambda: False)
    settings = Settings("gpt2", "tiny", 2, 16, 1, 0, "fp32", "cpu", False, 0, 1e-4, False, None, 1)
    result = run_benchmark(settings, ["lora"])
    assert result["results"] == [] and result["skipped"][0]["mode"] == "lora"
    assert "peft" in markdown(result)


def test_ratios_without_baselines_print_dashes():
    rows = [{"mode": "etf-structured", "trainable": 5, "trainable_pct": 50.0, "step_ms_median": 2.0,
             "peak_memory_bytes": 2**30, "memory_kind": "x"}]
    add_ratios(rows)
    assert rows[0]["step_over_full"] is None and rows[0]["step_over_ffn_free"] is None
    meta = {"family": "gpt2", "size": "tiny", "batch": 1, "tokens_per_example": 8, "dtype": "fp32", "autocast": False,
            "compile": False, "steps": 1, "warmup": 0, "optimizer": "AdamW", "seed": 0, "device": "cpu",
            "torch": "t", "transformers": "x"}
    line = [l for l in markdown({"meta": meta, "results": rows}).splitlines() if l.startswith("| etf")][0]
    assert line.count("–") == 5  # four ratios and the absent checkpoint size


def test_isolated_child_command_round_trips():
    settings = Settings("bert", '{"num_hidden_layers": 3}', 4, 64, 7, 2, "bf16", "cpu", True, 3, 2e-4, False,
                        "ffn-free", 2)
    command = _child_command(settings, "ffn-free", "/tmp/x.json", threads=1)
    assert command[1:3] == ["-m", "etf_hf.app.bench"]
    options = build_parser().parse_args(command[3:])
    assert (options.family, options.size, options.batch, options.seq, options.modes, options.steps, options.warmup,
            options.dtype, options.compile, options.seed, options.lr, options.checkpoint, options.profile,
            options.threads, options.json, options.quiet) == (
        "bert", '{"num_hidden_layers": 3}', 4, 64, "ffn-free", 7, 2, "bf16", True, 3, 2e-4, False, "ffn-free", 1,
        "/tmp/x.json", True)


def test_etf_hf_bench_subcommand_runs_the_harness(tmp_path):
    """`etf-hf bench ...` hands its options to the harness untouched (argparse would swallow them)."""
    from etf_hf.app.cli import main as cli_main

    out = tmp_path / "bench.json"
    status = cli_main(["bench", "--family", "gpt2", "--size", "tiny", "--batch", "1", "--seq", "8", "--steps", "1",
                       "--warmup", "1", "--modes", "full,etf-structured", "--no-checkpoint", "--threads", "1",
                       "--quiet", "--json", str(out)])
    assert status == 0
    assert [row["mode"] for row in json.loads(out.read_text())["results"]] == ["full", "etf-structured"]
