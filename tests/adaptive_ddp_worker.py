"""One rank of a two-process CPU (gloo) Adaptive-ETF run, launched by tests/test_adaptive.py:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/adaptive_ddp_worker.py OUTDIR

Trains the tiny paper MLP with `transformers.Trainer` under DDP (``ddp_find_unused_parameters=False``, so a
reducer that still expected the replaced weights would fail the first backward after the lock) while
`AdaptiveETFCallback` locks blocks mid-training, then writes ``OUTDIR/rank{R}.pt``: the locks and their
steps, the losses, every parameter and ETF frame at the end, the frames right after the lock, and what
the DDP wrapper reduces. The test compares the ranks' files.

Also the home of the tiny model and the separable synthetic data that tests/test_adaptive.py uses, so
that the test and the ranks build exactly the same thing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments

import etf_hf
from etf_hf import AdaptiveETFCallback, CollapseMLPConfig, MLPForImageClassification

CLASSES = 4
STEPS = 16
CHECK_EVERY = 4


class SeparableImages(torch.utils.data.Dataset):
    """``pixel_values`` (784,) = a fixed random template per class + Gaussian noise: classes are separable
    by nearest class mean from the input on, so NCC is high in every block from the first check."""

    def __init__(self, count: int, seed: int, noise: float = 1.5) -> None:
        templates = torch.randn(CLASSES, 784, generator=torch.Generator().manual_seed(1234))
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (count,), generator=generator)
        self.pixels = templates[self.labels] + noise * torch.randn(count, 784, generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def tiny_mlp(layers: int = 3, width: int = 32) -> MLPForImageClassification:
    torch.manual_seed(0)
    return MLPForImageClassification(CollapseMLPConfig(hidden_size=width, num_hidden_layers=layers,
                                                       num_labels=CLASSES))


class FrameRecorder(TrainerCallback):
    """Copies each ETF frame the first time it appears (right after its lock), to check it never moves."""

    def __init__(self) -> None:
        self.frames: dict[str, torch.Tensor] = {}
        self.gains: dict[str, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for path, layer in etf_hf.etf_layers(model):
            if path not in self.frames:
                self.frames[path] = layer.frame.detach().clone()
                self.gains[path] = layer.frame_norm.detach().clone()

    on_evaluate = on_step_end  # locks made at an evaluation (every="eval") are seen there


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_mlp()
    args = TrainingArguments(output_dir=str(options.outdir / "trainer"), use_cpu=True, report_to="none",
                             per_device_train_batch_size=8, max_steps=STEPS, learning_rate=0.05, optim="sgd",
                             optim_args="momentum=0.9", weight_decay=0.01, logging_steps=1, save_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, ddp_find_unused_parameters=False)
    recorder = FrameRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=SeparableImages(256, seed=0),
                      callbacks=[recorder])
    # the probe (64 examples) is sharded: each rank measures 32, the statistics are all-reduced
    # the effective-depth rule (default), patience 1: every block locks at the second check (step 8), with
    # the smooth lock's all-reduced input moments, BatchNorm refresh and lock losses
    callback = AdaptiveETFCallback(SeparableImages(64, seed=1), threshold=0.5, patience=1,
                                   every=CHECK_EVERY).attach(trainer)
    # put the callback before the recorder, so the recorder sees a lock in the step it happens
    trainer.callback_handler.callbacks.remove(recorder)
    trainer.add_callback(recorder)
    trainer.train()
    wrapped = trainer.model_wrapped
    reduced = {id(p) for p in wrapped._module_parameters}
    record = {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "wrapper": type(wrapped).__name__,
        "global_step": trainer.state.global_step,
        "locked": callback.locked,
        "lock_steps": callback.lock_steps,
        "lock_losses": callback.lock_losses,
        "config_etf": model.config.etf,
        "losses": [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry],
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "frames": {path: layer.frame.detach().clone() for path, layer in etf_hf.etf_layers(model)},
        "frames_at_lock": recorder.frames,
        "gains_at_lock": recorder.gains,
        "ddp_reduces_all_trainable": all(id(p) in reduced for p in model.parameters() if p.requires_grad),
        "ddp_reduces_count": len(wrapped._module_parameters),
    }
    torch.save(record, options.outdir / f"rank{dist.get_rank()}.pt")
    # leave together and close the group: a rank exiting while the other still holds it can abort in
    # gloo's threads (seen once: "terminate called without an active exception", a flaky failure)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
