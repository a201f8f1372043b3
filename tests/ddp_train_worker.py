"""One rank of a two-process CPU (gloo) training run of a patched model, launched by tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_train_worker.py OUTDIR

Trains a patched tiny GPT-2 on character-level tiny shakespeare (or its synthetic stand-in), then writes
``OUTDIR/rank{R}.pt``: rank, world size, global step, how the model was wrapped, the first batch this
rank saw, and every parameter and buffer (ETF frames included) after training, as full CPU tensors.
The test compares the ranks' files.

The real transformers.Trainer with ``use_cpu=True`` (DDP over gloo). Sharded training (torch's
``fully_shard``) has its own worker, tests/fsdp_worker.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # task_data, tiny_models, conftest

import task_data  # noqa: E402
from tiny_models import tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import etf_hf  # noqa: E402

STEPS = 6
BATCH = 8


class RecordingTrainer(Trainer):
    """Trainer that remembers the first batch it trained on, to show that the ranks got different shards."""

    first_batch: torch.Tensor | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.first_batch is None:
            self.first_batch = inputs["input_ids"].detach().cpu().clone()
        return super().compute_loss(model, inputs, *args, **kwargs)


def build_model() -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    """The same patched model and data on every rank (and in the test, to compare against)."""
    torch.manual_seed(0)
    train, vocab_size = task_data.char_lm_dataset(num_blocks=128, block_size=32)
    model = etf_hf.patch(tiny_gpt2(vocab_size=vocab_size), etf_hf.ETFConfig(layers="all", projections="both"))
    return model, train


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a CPU tensor, non-persistent frames included."""
    return {name: tensor.detach().cpu().clone()
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers())}


def train_with_trainer(model, train, outdir: Path) -> dict:
    args = TrainingArguments(output_dir=str(outdir / "trainer"), use_cpu=True, report_to="none",
                             per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=3e-3,
                             weight_decay=0.1, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                             dataloader_num_workers=0,
                             # no unused-parameter search: DDP then raises if any trainable ETF tensor
                             # (gain, bias) misses its gradient instead of silently skipping it
                             ddp_find_unused_parameters=False)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    return {
        "parallel_mode": str(args.parallel_mode),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "first_batch": trainer.first_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(1)

    model, train = build_model()
    result = train_with_trainer(model, train, options.outdir)

    record = {
        "rank": int(os.environ["RANK"]),
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "state": full_state(model),
        **result,
    }
    options.outdir.mkdir(parents=True, exist_ok=True)
    torch.save(record, options.outdir / f"rank{record['rank']}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
