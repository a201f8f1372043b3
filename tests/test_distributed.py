"""Multi-process training of patched models on CPU: two gloo ranks launched with torchrun.

Each test launches tests/ddp_train_worker.py as two processes and compares what the ranks wrote. Data
parallelism only works if every rank holds the same frames (they are regenerated per process from the
seed, never communicated as parameters) and the trainable ETF tensors (gain, bias) are all-reduced like
any other parameter; a frame that differed between ranks, or a gain DDP did not know about, would make
the replicas drift apart.

`accelerate launch --cpu --num_processes 2` is not used: it starts a single process on CPU. Sharded
training (FSDP) is tested in tests/test_fsdp.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import etf_hf

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "ddp_train_worker.py"
TIMEOUT_S = 240  # two cold transformers imports (~7 s each alone, far more on a busy 2-core machine) + training

sys.path.insert(0, str(WORKER.parent))
import ddp_train_worker  # noqa: E402


def run_two_ranks(outdir: Path, *worker_args: str) -> list[dict]:
    """torchrun the worker as 2 processes; return both ranks' records (failing with the worker's output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(outdir), *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return [torch.load(outdir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def assert_replicas_identical_with_fixed_frames(records: list[dict]) -> None:
    """Both ranks hold the same bits everywhere; frames equal a freshly regenerated model's; gains trained."""
    first, second = records
    assert first["state"].keys() == second["state"].keys()
    different = [name for name in first["state"] if not torch.equal(first["state"][name], second["state"][name])]
    assert not different, f"the two replicas differ in {different}"

    reference, _ = ddp_train_worker.build_model()
    layers = etf_hf.etf_layers(reference)
    assert layers
    for path, layer in layers:
        assert torch.equal(first["state"][f"{path}.frame"], layer.frame), f"{path}.frame moved or was regenerated differently"
    moved = [path for path, layer in layers if not torch.equal(first["state"][f"{path}.frame_norm"], layer.frame_norm.detach())]
    assert moved, "no ETF gain changed: the ranks did not train"


@pytest.mark.slow
def test_ddp_trainer_two_processes_keeps_replicas_and_frames_identical(tmp_path):
    """Trainer + DDP (gloo, use_cpu): two ranks train on different shards and end with identical parameters,
    gains included, and with the frames both ranks regenerated independently, unchanged by training."""
    records = run_two_ranks(tmp_path)
    for rank, record in enumerate(records):
        assert record["rank"] == rank
        assert record["world_size"] == 2 and record["backend"] == "gloo"
        assert record["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert record["wrapper"] == "DistributedDataParallel"
        assert record["global_step"] == ddp_train_worker.STEPS > 0
        assert all(torch.isfinite(torch.tensor(record["losses"])))
    assert not torch.equal(records[0]["first_batch"], records[1]["first_batch"]), (
        "both ranks saw the same batch: the sampler did not shard, so identical replicas would prove nothing")
    assert_replicas_identical_with_fixed_frames(records)
