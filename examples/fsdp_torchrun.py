"""Sharded training (FSDP) of an ETF-patched Llama with torch's ``fully_shard``, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/fsdp_torchrun.py              # 2 CPU processes (gloo)
    torchrun --standalone --nproc_per_node 8 examples/fsdp_torchrun.py              # 8 GPUs: NCCL, one per process
    torchrun --standalone --nproc_per_node 2 examples/fsdp_torchrun.py --steps 2    # a smoke run

What is ETF-specific: nothing in the sharding. Every rank builds the same model and frames from the
same seed, then ``fully_shard`` splits each decoder block's *parameters* (the trainable gains and biases
of the ETF layers among them) over the ranks. Frames are buffers, which FSDP leaves whole on every rank:
the ``structured`` basis used here stores no frame at all (a seeded O(D) plan per layer), while a dense
basis (orthogonal, canonical, nearest) would cost its full frame on every rank (README "Sharded
training (FSDP)"). The script prints what rank 0 holds, measured and as `etf_hf.memory` counts it.

At the end it checks that every rank holds identical frames, writes a sharded checkpoint with
torch.distributed.checkpoint (to resume on the same number of ranks; see tests/fsdp_worker.py for the
load), gathers the full state dict to rank 0, which writes it with ``save_pretrained``, and reloads it
with ``from_pretrained`` to compare logits.

Trainer users on GPUs: examples/accelerate_fsdp.yaml. On CPU, Trainer and accelerate do not shard
(Trainer(fsdp=...) falls back to DDP), hence this plain loop.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import etf_hf
from etf_hf.memory import buffer_bytes, frame_buffers, fsdp_rank_memory

BLOCK = 64  # characters per sequence
PER_RANK_BATCH = 8


def characters(size: int = 60_000) -> torch.Tensor:
    """Generated play-like text as character ids (every rank generates the same)."""
    rng = np.random.default_rng(0)
    words = "the and thou thee my lord love shall not be what death night heart good sir come".split()
    text = "".join(f"{rng.choice(['ROMEO', 'JULIET', 'KING'])}:\n" + " ".join(rng.choice(words, 8)) + ".\n\n"
                   for _ in range(size // 40 + 1))[:size]
    vocab = sorted(set(text))
    return torch.tensor([vocab.index(char) for char in text[: size // BLOCK * BLOCK]]).view(-1, BLOCK)


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def frames_identical_on_every_rank(model: torch.nn.Module) -> bool:
    """Every rank built the same frames (they are never communicated): compare with rank 0's."""
    frames = torch.cat([t.detach().reshape(-1).double() for t in frame_buffers(model)])
    reference = frames.clone()
    dist.broadcast(reference, src=0)
    mismatch = torch.tensor([float(not torch.equal(frames, reference))], device=frames.device)
    dist.all_reduce(mismatch)
    return mismatch.item() == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--basis", default="structured", help="ETF basis (default structured: no frame per rank)")
    parser.add_argument("--output", type=Path, default=Path("runs/examples/fsdp-llama-etf"))
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("not launched as several processes: run "
                         "torchrun --standalone --nproc_per_node 2 examples/fsdp_torchrun.py")
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # one core per process

    data = characters()
    torch.manual_seed(0)  # the same initial weights, hence the same nearest/frozen frames, on every rank
    model = LlamaForCausalLM(LlamaConfig(vocab_size=int(data.max()) + 1, hidden_size=64, intermediate_size=176,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=BLOCK))
    etf_hf.patch(model, etf_hf.ETFConfig(layers="all", projections="both", basis=args.basis, seed=0))
    if rank == 0:
        etf_hf.print_trainable_parameters(model)
        print(f"{world} processes, backend {dist.get_backend()}, basis {args.basis}")
    counted = fsdp_rank_memory(model, world_size=world)

    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.model.layers:  # each decoder block is one all-gather unit, then the rest at the root
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)

    generator = torch.Generator().manual_seed(0)  # the same global batches on every rank; each takes its slice
    for step in range(args.steps):
        rows = torch.randint(0, len(data), (PER_RANK_BATCH * world,), generator=generator)
        ids = data[rows].chunk(world)[rank].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == args.steps - 1:  # gradients exist now: measure what this rank holds
            measured = {"parameters": sum(local_bytes(p) for p in model.parameters()),
                        "gradients": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        if rank == 0 and (step % max(1, args.steps // 6) == 0 or step == args.steps - 1):
            print(f"step {step + 1}: loss {loss.item() / world:.4f}")

    measured["optimizer"] = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                                if isinstance(v, torch.Tensor))
    measured["frames"] = buffer_bytes(frame_buffers(model))
    if rank == 0:
        print("rank 0 holds (bytes)    " + "  ".join(f"{k} {v:,}" for k, v in measured.items()))
        print("etf_hf.memory counts    " + "  ".join(f"{k} {getattr(counted, k):,}" for k in measured))
    if not frames_identical_on_every_rank(model):
        raise SystemExit(f"rank {rank}: frames differ between ranks")

    # A sharded checkpoint, to resume on `world` ranks: dcp.load into get_state_dict(fresh sharded model, optimizer).
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=args.output / "dcp")

    # A Hub-style checkpoint: the full state dict, gathered to rank 0's CPU memory, written by rank 0.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    probe = data[:4].to(device)
    with torch.no_grad():
        logits = model(input_ids=probe).logits  # a collective: every rank runs it
    if rank == 0:
        model.save_pretrained(args.output, state_dict=full)
        reloaded = AutoModelForCausalLM.from_pretrained(args.output).to(device)
        with torch.no_grad():
            difference = (reloaded(input_ids=probe).logits - logits).abs().max().item()
        print(f"frames identical on all {world} ranks; sharded checkpoint in {args.output / 'dcp'}")
        print(f"reloaded from {args.output}: {type(reloaded).__name__}, max |logit difference| {difference:.1e}")
        if difference > 1e-5:
            raise SystemExit(f"the reloaded model computes different logits (max difference {difference:.3g})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
