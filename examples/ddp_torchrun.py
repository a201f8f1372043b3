"""Data-parallel training of an ETF-patched model: two CPU processes (gloo), launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py            # 2 CPU processes, gloo
    torchrun --standalone --nproc_per_node 4 examples/ddp_torchrun.py            # on a 4-GPU machine: NCCL
                                                                                 # (drop use_cpu below)

The script is an ordinary Trainer script: torchrun sets RANK/WORLD_SIZE, Trainer wraps the model in
DistributedDataParallel and shards the data. Nothing ETF-specific is needed, because every rank builds
the same frames from the same seed (frames are buffers, never communicated) and the trainable ETF
tensors (gain, bias) are ordinary parameters that DDP all-reduces. At the end the script checks that
the replicas are bit-identical, and rank 0 saves, reloads and compares.

Why not ``accelerate launch --cpu --num_processes 2``: on CPU it silently starts a *single* process
(accelerate 1.x), so nothing would be data-parallel; torchrun (or accelerate ``--multi_gpu`` with
``use_cpu``) starts the processes you ask for.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --steps 2       # a smoke run
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import (AutoModelForImageClassification, Trainer, TrainingArguments, ViTConfig,
                          ViTForImageClassification)

import etf_hf


class Digits(torch.utils.data.Dataset):
    """scikit-learn's bundled 8x8 digits (no download): every rank reads the same data, Trainer shards it."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        self.labels = torch.tensor(digits.target, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def replicas_identical(model: torch.nn.Module) -> bool:
    """True when every rank holds rank 0's exact parameters and buffers (frames, gains, biases included)."""
    state = torch.cat([t.detach().reshape(-1).double() for t in [*model.parameters(), *model.buffers()]])
    reference = state.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([0.0 if torch.equal(state, reference) else 1.0], dtype=torch.float64)
    dist.all_reduce(mismatch)
    return mismatch.item() == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--output", type=Path, default=Path("runs/examples/ddp-vit-etf"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's at wrapping)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10,
                                                hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                intermediate_size=256))
    etf_hf.patch(model, etf_hf.ETFConfig(layers="all", projections="both", basis="structured", seed=0))

    training = TrainingArguments(output_dir=str(args.output / "trainer"), max_steps=args.steps, learning_rate=3e-3,
                                 per_device_train_batch_size=32, weight_decay=0.01,
                                 logging_steps=max(1, args.steps // 6),
                                 save_strategy="no", use_cpu=True, report_to="none", seed=0, disable_tqdm=True,
                                 # every trainable tensor gets a gradient; DDP then fails loudly if one did not
                                 ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=training, train_dataset=Digits())
    if not dist.is_initialized():
        raise SystemExit("not launched as several processes: run torchrun --standalone --nproc_per_node 2 "
                         "examples/ddp_torchrun.py")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"{world} processes, backend {dist.get_backend()}, {training.parallel_mode}")
    trainer.train()

    identical = replicas_identical(model)
    if rank == 0:
        print(f"replicas identical after {trainer.state.global_step} steps: {identical}")
    if not identical:
        raise SystemExit(f"rank {rank}: the replicas drifted apart")
    trainer.save_model(str(args.output))  # writes on rank 0 only
    trainer.accelerator.wait_for_everyone()
    if rank == 0:
        reloaded = AutoModelForImageClassification.from_pretrained(args.output)
        model.eval()
        batch = Digits().pixels[:8]
        with torch.no_grad():
            difference = (model(batch).logits - reloaded(batch).logits).abs().max().item()
        print(f"reloaded from {args.output}: {type(reloaded).__name__}, max |logit difference| {difference:.1e}")
        if difference > 1e-5:
            raise SystemExit(f"the reloaded model computes different logits (max difference {difference:.3g})")
        # Sharing it from rank 0 only (needs `huggingface-cli login`):
        #   model.push_to_hub("your-name/vit-etf-digits-ddp")
    # Every rank leaves together and closes the process group: a rank that exits while another still
    # holds the group can abort in gloo's threads ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
