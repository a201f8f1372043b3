"""FSDP (torch ``fully_shard``) on two CPU gloo processes is the same training as one process.

One torchrun launch of tests/fsdp_worker.py runs every case (a launch costs two cold transformers
imports); the tests here compare what the ranks wrote with a single-process run of the same patched
model on the same global batches, computed in this process with the worker's own functions. Because the
reference is the patched model itself, any layer implementation `etf_hf.patch` picks is covered.

Trainer / accelerate do not shard on CPU: `TrainingArguments(fsdp=True, use_cpu=True)` under torchrun
wraps the model in DistributedDataParallel (accelerate enables FSDP only for multi-GPU/accelerator
states) and says nothing about it; `test_trainer_fsdp_on_cpu_falls_back_to_ddp_without_a_word` pins that
behaviour, so this file notices when it changes. GPU users get examples/accelerate_fsdp.yaml.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import etf_hf
from etf_hf.memory import fsdp_rank_memory, frame_buffers, meta_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
TIMEOUT_S = 300  # two cold transformers imports (~7 s each alone, far more on a busy machine) + 28 cases

sys.path.insert(0, str(WORKER.parent))
import fsdp_worker  # noqa: E402

ETF_CASES = [f"{model}:{basis}:{storage}" for model in ("gpt2", "llama")
             for basis in (*etf_hf.BASES, "frozen") for storage in ("compact", "dense")]
#: The unpatched model and plain requires_grad=False FFN weights: the baselines of the memory table.
BASELINE_CASES = [f"{model}:{basis}:compact" for model in ("gpt2", "llama") for basis in ("full", "frozen-ffn")]
#: bf16 mixed precision (what examples/accelerate_fsdp.yaml sets up on GPUs), training only.
BF16_CASES = [f"{model}:{basis}:compact:bf16" for model in ("gpt2", "llama") for basis in ("orthogonal", "structured")]
TOL = {"rtol": 1e-5, "atol": 1e-5}


def torchrun(script: Path, *args: str, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    outdir = tmp_path_factory.mktemp("fsdp")
    torchrun(WORKER, str(outdir), *ETF_CASES, *BASELINE_CASES, *BF16_CASES, "--trainer-probe")
    records = [torch.load(outdir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    for rank, record in enumerate(records):
        assert (record["rank"], record["world_size"], record["backend"]) == (rank, 2, "gloo")
    return outdir, records


def reference(case: str) -> tuple[list[float], dict[str, torch.Tensor], torch.nn.Module]:
    """The single-process run: same model, whole global batch per step."""
    model = fsdp_worker.build_model(*case.split(":"))
    losses = fsdp_worker.train_single(model, range(fsdp_worker.STEPS))
    state = {name: tensor.detach() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    return losses, state, model


def assert_states_close(actual: dict, expected: dict, what: str, **tolerance) -> None:
    assert actual.keys() == expected.keys(), f"{what}: different tensors {set(actual) ^ set(expected)}"
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, **tolerance, msg=lambda m, n=name: f"{what}, {n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("case", ETF_CASES + BASELINE_CASES)
def test_sharded_training_equals_single_process(ranks, case):
    """Per-step losses and final weights (gains, biases, every other parameter and buffer) of the 2-rank
    ``fully_shard`` run equal the 1-process run on the same global batches, to 1e-5 in float32; the
    trainable ETF tensors are sharded DTensors, the frames plain buffers that every rank built alike."""
    _, records = ranks
    first, second = (record["cases"][case] for record in records)
    losses, state, model = reference(case)
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(losses), **TOL)
    assert first["losses"] == second["losses"]
    assert_states_close(first["state"], state, f"{case} after {fsdp_worker.STEPS} sharded steps", **TOL)
    for name in first["state"]:
        assert torch.equal(first["state"][name], second["state"][name]), f"gathered {name} differs between ranks"
    if case in ETF_CASES:
        assert any(name.endswith("frame_norm") for name in first["sharded_parameters"])
        frames = dict(frame_buffers(model, named=True))
        assert frames and first["frames"].keys() == frames.keys()
        for name, frame in frames.items():
            assert torch.equal(first["frames"][name], frame), f"rank 0 built {name} differently"
            assert torch.equal(second["frames"][name], frame), f"rank 1 built {name} differently"


@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_mixed_precision_sharded_training_tracks_float32(ranks, case):
    """With FSDP2's bf16 mixed precision (parameters gathered and computed in bf16, gradients reduced in
    fp32), ETF layers train: the losses stay within 0.01 of the float32 single-process run, the ranks
    agree, and the frames remain the float32 buffers every rank built (FSDP casts parameters, not buffers)."""
    _, records = ranks
    first, second = (record["cases"][case] for record in records)
    losses, _, model = reference(case.removesuffix(":bf16"))
    assert first["losses"] == second["losses"]
    torch.testing.assert_close(torch.tensor(first["losses"]), torch.tensor(losses), rtol=0, atol=1e-2)
    for name, frame in frame_buffers(model, named=True):
        assert torch.equal(first["frames"][name], frame) and torch.equal(second["frames"][name], frame), name
    for name in first["state"]:
        assert torch.equal(first["state"][name], second["state"][name]), f"gathered {name} differs between ranks"


@pytest.mark.slow
def test_trainer_fsdp_on_cpu_falls_back_to_ddp_without_a_word(ranks):
    """``Trainer(fsdp=True, fsdp_config={"version": 2}, use_cpu=True)`` under torchrun trains a
    DistributedDataParallel model: accelerate turns only GPU/accelerator states into FSDP, and neither
    library logs anything about FSDP being dropped. Pinned so that this file notices when CPU FSDP arrives
    in Trainer (then test Trainer's FSDP here too)."""
    for record in ranks[1]:
        probe = record["trainer_probe"]
        assert probe == {"is_fsdp_enabled": False, "distributed_type": "DistributedType.MULTI_CPU",
                         "wrapper": "DistributedDataParallel", "fsdp_messages": []}, probe


@pytest.mark.slow
@pytest.mark.parametrize("case", ETF_CASES)
def test_full_state_dict_saved_from_rank_0_reloads_to_identical_logits(ranks, case):
    """The full state dict gathered to rank 0 (``get_model_state_dict(full_state_dict=True)``) and written
    with ``save_pretrained(dir, state_dict=...)`` loads with ``from_pretrained`` to the sharded model's
    logits; compact storage leaves regenerable frames out, dense storage writes them; the checkpoint names
    the ETF class, not torch's generated ``FSDP...`` subclass."""
    outdir, records = ranks
    record = records[0]["cases"][case]
    folder = outdir / case.replace(":", "-") / "hf"
    config = json.loads((folder / "config.json").read_text())
    _, basis, storage = case.split(":")
    class_name = {"gpt2": "ETFGPT2LMHeadModel", "llama": "ETFLlamaForCausalLM"}[case.split(":")[0]]
    assert config["architectures"] == [class_name]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_etf_hf.{class_name}"
    assert f"\nclass {class_name}(ETFModelBase, " in (folder / "modeling_etf_hf.py").read_text()

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    frames = {name for name, _ in frame_buffers(fsdp_worker.build_model(*case.split(":")), named=True)}
    with safe_open(folder / "model.safetensors", "pt") as weights:
        saved_frames = frames & set(weights.keys())
    stored = storage == "dense" or basis in ("nearest", "frozen")  # structured: a plan, never stored
    assert bool(saved_frames) == (stored and basis != "structured"), saved_frames
    with torch.no_grad():
        logits = reloaded(input_ids=fsdp_worker.global_batch(-1)).logits
    torch.testing.assert_close(logits, record["logits"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_rank_0_checkpoints_load_without_etf_hf_through_remote_code(ranks, tmp_path):
    """The rank-0 checkpoints of the structured GPT-2 and Llama load with ``trust_remote_code=True`` in a
    process without etf_hf, to the sharded model's logits, as the ETF class the config's ``auto_map`` and
    ``architectures`` name (not ``fully_shard``'s generated ``FSDP...`` subclass)."""
    outdir, records = ranks
    cases = ["gpt2:structured:compact", "llama:structured:compact"]
    torch.save(fsdp_worker.global_batch(-1), tmp_path / "ids.pt")
    folders = [str(outdir / case.replace(":", "-") / "hf") for case in cases]
    code = f"""import sys; sys.modules['etf_hf'] = None
import torch
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'ids.pt')!r})
out = []
for folder in {folders!r}:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model).__name__ == model.config.architectures[0], (type(model).__name__, model.config.architectures)
    with torch.no_grad():
        out.append(model(input_ids=ids).logits)
torch.save(out, {str(tmp_path / 'logits.pt')!r})
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    for case, logits in zip(cases, torch.load(tmp_path / "logits.pt")):
        torch.testing.assert_close(logits, records[0]["cases"][case]["logits"], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("case", ETF_CASES + BASELINE_CASES)
def test_sharded_checkpoint_resume_equals_uninterrupted_run(ranks, case):
    """A torch.distributed.checkpoint save (model + AdamW state) after `RESUME_AT` steps, loaded into a
    freshly built and sharded model, finishes with the uninterrupted run's losses and weights, bit for bit
    (same ranks, one thread each); the frames the fresh model regenerated (or loaded, when stored) are
    identical on both ranks and to the first run's."""
    _, records = ranks
    for record in records:
        run = record["cases"][case]
        assert run["resumed_losses"] == run["losses"][fsdp_worker.RESUME_AT:]
        assert_states_close(run["resumed_state"], run["state"], f"{case} resumed", rtol=0, atol=0)  # bit-exact
        assert run["resumed_frames"].keys() == run["frames"].keys()
        for name, frame in run["frames"].items():
            assert torch.equal(run["resumed_frames"][name], frame), \
                f"{name} came back different on rank {record['rank']}"
    first, second = (record["cases"][case]["resumed_frames"] for record in records)
    for name in first:
        assert torch.equal(first[name], second[name]), f"the ranks regenerated {name} differently"


@pytest.mark.slow
@pytest.mark.parametrize("case", ETF_CASES + BASELINE_CASES)
def test_counted_rank_memory_equals_measured(ranks, case):
    """`fsdp_rank_memory` (counted from shapes) equals what rank 0 holds after a sharded step: its shard of
    parameters, gradients and AdamW state, and the frames and other buffers it keeps whole; rank 1 holds
    the same replicated buffers and at most rank 0's shard."""
    _, records = ranks
    counted = fsdp_rank_memory(fsdp_worker.build_model(*case.split(":")), world_size=2).as_dict()
    first, second = (record["cases"][case]["memory"] for record in records)
    assert {key: first[key] for key in counted if key != "total"} == {k: v for k, v in counted.items() if k != "total"}
    assert second["frames"] == first["frames"] and second["other_buffers"] == first["other_buffers"]
    assert all(second[key] <= first[key] for key in ("parameters", "gradients", "optimizer"))


LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def test_llama_7b_at_8_ranks_dense_frames_are_replicated_structured_plans_are_small():
    """Counted on the meta device (no memory): a Llama-7B-shaped model in bf16, sharded over 8 ranks. A dense
    frame costs its full size on every rank at any world size (32 x 3 x 4096 x 11008 x 2 bytes = 8.66 GB),
    more than the parameter shard it saves; the structured basis keeps only O(D) plan buffers (29.3 MB, 0.34 %)."""
    ffn_bytes = 32 * 3 * 4096 * 11008 * 2
    full = fsdp_rank_memory(meta_model(LLAMA_7B), world_size=8)
    assert full.frames == 0
    counts = {}
    for basis in ("orthogonal", "structured"):
        model = etf_hf.patch(meta_model(LLAMA_7B), etf_hf.ETFConfig(layers="all", basis=basis))
        counts[basis] = {world: fsdp_rank_memory(model, world_size=world) for world in (1, 8)}
    orthogonal, structured = counts["orthogonal"], counts["structured"]
    assert orthogonal[1].frames == orthogonal[8].frames == ffn_bytes  # replicated: no 1/8
    assert structured[1].frames == structured[8].frames < ffn_bytes / 250
    assert full.parameters - orthogonal[8].parameters == pytest.approx(ffn_bytes / 8, rel=1e-3)
    assert orthogonal[8].total > full.total > structured[8].total


def test_rank_memory_refuses_a_bad_world_size():
    with pytest.raises(ValueError, match="world_size=0"):
        fsdp_rank_memory(torch.nn.Linear(2, 2), world_size=0)


@pytest.mark.parametrize("sharding", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_adaptive_etf_refuses_sharded_training_and_names_ddp(tmp_path, sharding):
    """Adaptive-ETF's lock swaps parameters, which FSDP and DeepSpeed hold sharded: the callback refuses to
    start, naming the supported path (DDP under torchrun) and the sharded alternative (patch up front).
    Trainer enables FSDP only on GPUs, so the flag Trainer sets from its accelerator state is set by hand."""
    from adaptive_ddp_worker import tiny_mlp

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = Trainer(model=tiny_mlp(), args=args)
    callback = etf_hf.AdaptiveETFCallback(threshold=0.5, patience=1, every=1).attach(trainer)
    setattr(trainer, sharding, True)
    name = "FSDP" if sharding == "is_fsdp_enabled" else "DeepSpeed"
    with pytest.raises(NotImplementedError, match=rf"does not run under {name}.*DDP.*torchrun.*etf_hf\.patch"):
        callback.on_train_begin(args, trainer.state, trainer.control)


@pytest.mark.slow
def test_fsdp_torchrun_example_runs_as_documented(tmp_path):
    """examples/fsdp_torchrun.py, launched as its docstring says (2 steps): it trains sharded, rank 0's
    measured bytes equal `etf_hf.memory`'s count, frames agree on both ranks, and the full checkpoint
    reloads to the same logits."""
    done = torchrun(REPO_ROOT / "examples" / "fsdp_torchrun.py", "--steps", "2", "--output", str(tmp_path / "out"))
    lines = done.stdout.splitlines()
    measured = next(line for line in lines if line.startswith("rank 0 holds")).partition("parameters")[2]
    counted = next(line for line in lines if line.startswith("etf_hf.memory counts")).partition("parameters")[2]
    assert measured and measured == counted
    assert "frames identical on all 2 ranks" in done.stdout
    difference = float(next(line for line in lines if line.startswith("reloaded from")).rsplit(maxsplit=1)[-1])
    assert difference <= 1e-5
    assert (tmp_path / "out" / "dcp" / ".metadata").is_file()


def test_accelerate_fsdp_config_launches_fsdp2_wrapping_each_block(monkeypatch):
    """examples/accelerate_fsdp.yaml, read by accelerate's own launcher code, sets FSDP2 with transformer-block
    wrapping; with no class names given, accelerate wraps the model's ``_no_split_modules``, which a patched
    model inherits (its blocks). The GPU run itself is not tested here (no GPU)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    options = launch_command_parser().parse_args(
        ["--config_file", str(REPO_ROOT / "examples" / "accelerate_fsdp.yaml"), "train.py"])
    environment = prepare_multi_gpu_env(_validate_launch_command(options)[0])
    assert environment["ACCELERATE_USE_FSDP"] == "true" and environment["FSDP_VERSION"] == "2"
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.transformer_cls_names_to_wrap is None
    model = fsdp_worker.build_model("llama", "structured", "compact")
    blocks = {type(module).__name__ for module in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= blocks


def test_memory_example_prints_the_documented_llama_7b_table():
    """examples/fsdp_memory.py's default table (Llama-7B, bf16, 8 ranks) is the one in
    docs/results/fsdp_memory.md, row for row, and ranks the options as the README says."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fsdp_memory", REPO_ROOT / "examples" / "fsdp_memory.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.memory_table(example.LLAMA_7B, world_size=8).splitlines()[2:]
    document = (REPO_ROOT / "docs" / "results" / "fsdp_memory.md").read_text()
    assert len(rows) == len(example.ROWS) and all(row in document for row in rows), rows
    total = {row.split(" | ")[0].strip("| "): float(row.rstrip(" |").rsplit("| ", 1)[-1]) for row in rows}
    assert total["etf structured"] < total["frozen FFN (requires_grad=False)"] < total["full"] < total["etf orthogonal"]
