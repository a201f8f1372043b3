"""One rank of the two-process FSDP runs of tests/test_fsdp.py (CPU, gloo, torch ``fully_shard``).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUTDIR CASE [CASE ...] \
        [--trainer-probe]

A CASE is ``model:basis:storage[:bf16]`` (model ``gpt2`` or ``llama``; basis an ETF basis, a control,
``full`` for the unpatched model or ``frozen-ffn`` for plain ``requires_grad=False`` FFN weights; storage
``compact`` or ``dense``; ``bf16``: mixed precision, training only). One launch runs every case given,
because each launch costs two cold transformers imports. Per case, every rank:

1. builds the same model (`build_model`), shards it with ``fully_shard`` per block and at the root, and
   trains `STEPS` AdamW steps, each rank on its half of the same global batch (`global_batch`);
2. records the global loss per step, the gathered final parameters and buffers, its own frames (to
   compare across ranks) and the bytes it holds of parameters, gradients, optimizer state and frames;
3. gathers the full state dict to rank 0, which writes it with ``save_pretrained`` (OUTDIR/CASE/hf),
   and records the sharded model's logits on a fixed batch, for the test's ``from_pretrained``;
4. trains again, stopping after `RESUME_AT` steps with a sharded torch.distributed.checkpoint (DCP)
   save, builds and shards a fresh model and optimizer, loads the checkpoint into them and finishes:
   the final state is recorded to compare with the uninterrupted run.

With ``--trainer-probe`` it finally trains one step with ``Trainer(fsdp=True)`` (see `trainer_fsdp_probe`).

Writes OUTDIR/rank{R}.pt: {"cases": {case: record}, "trainer_probe": ...}. The single-process reference
is computed by the test, with the same `build_model`, `global_batch` and `train_single`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's etf_hf, as launched from the tests

import etf_hf  # noqa: E402
from etf_hf.architectures import find_slots  # noqa: E402
from etf_hf.memory import buffer_bytes, frame_buffers  # noqa: E402

STEPS = 4
RESUME_AT = 2
GLOBAL_BATCH = 4  # sequences per optimizer step, split evenly over the ranks
LENGTH = 12
VOCAB = 64
LR = 1e-2


def build_model(model_name: str, basis: str, storage: str) -> PreTrainedModel:
    """The same model on every rank and in the reference process: seeded init, no dropout (a sharded and
    a single-process run must draw no random numbers), patched with every FFN projection fixed."""
    torch.manual_seed(0)
    if model_name == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    elif model_name == "llama":  # gated MLP: gate and up projections are both "up"
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                             max_position_embeddings=LENGTH))
    else:
        raise ValueError(f"unknown model {model_name!r}")
    etf_basis = "orthogonal" if basis in ("full", "frozen-ffn") else basis  # the baselines only select with it
    selection = etf_hf.ETFConfig(layers="all", projections="both", basis=etf_basis, storage=storage)
    if basis == "frozen-ffn":
        for slot in find_slots(model, selection):
            getattr(slot.parent, slot.attribute).weight.requires_grad_(False)
    elif basis != "full":
        etf_hf.patch(model, selection)
    return model


def blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def global_batch(step: int) -> torch.Tensor:
    """The step's global batch of token ids (every sequence full length, so the mean over the ranks' mean
    token losses is the global mean token loss)."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(100 + step))


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with eps=1e-4 instead of 1e-8. Why: GPT-2's attention key bias has an exactly zero gradient in
    exact arithmetic (softmax ignores a shift shared by all keys), so what it gets is rounding noise of
    ~1e-10, which differs between any two summation orders (one process or two shards); Adam divides by
    sqrt(v) + eps and, with eps=1e-8, turns that noise into lr-sized steps of random sign. A larger eps
    keeps Adam's behaviour on real gradients (~1e-3 here) and stops it amplifying noise."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1, eps=1e-4)


def train_single(model: PreTrainedModel, steps: range) -> list[float]:
    """The reference: one process, the whole global batch per step."""
    optimizer = make_optimizer(model)
    losses = []
    for step in steps:
        ids = global_batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def shard(model: PreTrainedModel, mesh, bf16: bool = False) -> PreTrainedModel:
    """``fully_shard`` per block, then the root; with ``bf16`` the mixed precision accelerate's FSDP2 sets up
    for ``mixed_precision: bf16`` (parameters all-gathered and computed in bf16, gradients reduced in fp32)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of ``tensor`` (its shard for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def sharded_step(model, optimizer, step: int, measure: bool = False) -> tuple[float, dict | None]:
    """One optimizer step on this rank's half of the global batch; returns the global loss (and, with
    ``measure``, the bytes held per kind, taken after backward, when gradients exist)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = global_batch(step).chunk(world)[rank]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    memory = None
    if measure:
        trainable = [p for p in model.parameters() if p.requires_grad]
        memory = {
            "parameters": sum(local_bytes(p) for p in model.parameters()),
            "gradients": sum(local_bytes(p.grad) for p in trainable if p.grad is not None),
            "optimizer": sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
                             if isinstance(v, torch.Tensor)),
            "frames": buffer_bytes(frame_buffers(model)),
            "other_buffers": buffer_bytes(model.buffers()) - buffer_bytes(frame_buffers(model)),
        }
    optimizer.zero_grad(set_to_none=True)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / world, memory


def gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full tensor (a collective: all ranks walk the same names)."""
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        state[name] = tensor.detach().clone()
    return state


def own_frames(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's frame buffers, as it holds them (never communicated), to compare across ranks."""
    return {name: tensor.detach().clone() for name, tensor in frame_buffers(model, named=True)}


def run_case(case: str, outdir: Path, mesh) -> dict:
    model_name, basis, storage, *precision = case.split(":")
    rank = dist.get_rank()
    record: dict = {}

    # 1-2. uninterrupted training
    model = shard(build_model(model_name, basis, storage), mesh, bf16=precision == ["bf16"])
    optimizer = make_optimizer(model)
    record["sharded_parameters"] = sorted(n for n, p in model.named_parameters() if hasattr(p, "full_tensor"))
    losses = []
    for step in range(STEPS):
        loss, memory = sharded_step(model, optimizer, step, measure=step == STEPS - 1)
        losses.append(loss)
    record.update(losses=losses, memory=memory, state=gathered_state(model), frames=own_frames(model))
    if precision:  # mixed precision: training only
        return record

    # 3. full state dict on rank 0 -> save_pretrained; logits of the sharded model to compare the reload with
    probe = global_batch(-1)
    with torch.no_grad():
        record["logits"] = model(input_ids=probe).logits.detach().clone()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0 and basis not in ("full", "frozen-ffn"):
        model.save_pretrained(outdir / case.replace(":", "-") / "hf", state_dict=full)
    dist.barrier()

    # 4. DCP save after RESUME_AT steps, resume into a fresh sharded model + optimizer, finish
    model = shard(build_model(model_name, basis, storage), mesh)
    optimizer = make_optimizer(model)
    for step in range(RESUME_AT):
        sharded_step(model, optimizer, step)
    checkpoint = outdir / case.replace(":", "-") / "dcp"
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    del model, optimizer

    model = shard(build_model(model_name, basis, storage), mesh)
    optimizer = make_optimizer(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    record["resumed_frames"] = own_frames(model)
    record["resumed_losses"] = [sharded_step(model, optimizer, step)[0] for step in range(RESUME_AT, STEPS)]
    record["resumed_state"] = gathered_state(model)
    return record


def trainer_fsdp_probe(outdir: Path) -> dict:
    """What ``Trainer(fsdp=True)`` does on CPU in these processes: which wrapper it trains, whether it
    reports FSDP enabled, and every log record that mentions FSDP (to show whether it says anything)."""
    import logging

    from transformers import Trainer, TrainingArguments

    class Collect(logging.Handler):
        records: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record.getMessage())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    for name in ("transformers", "accelerate"):
        logging.getLogger(name).addHandler(handler)
    model = build_model("gpt2", "orthogonal", "compact")
    data = [{"input_ids": ids, "labels": ids} for ids in global_batch(0)]
    args = TrainingArguments(output_dir=str(outdir / "trainer"), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True,
                             fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True},
                             ddp_find_unused_parameters=False)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return {"is_fsdp_enabled": trainer.is_fsdp_enabled, "distributed_type": str(trainer.accelerator.distributed_type),
            "wrapper": type(trainer.model_wrapped).__name__,
            "fsdp_messages": [message for message in handler.records if "fsdp" in message.lower()]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("cases", nargs="*")
    parser.add_argument("--trainer-probe", action="store_true", help="also run trainer_fsdp_probe, last")
    options = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    records = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
               "cases": {case: run_case(case, options.outdir, mesh) for case in options.cases}}
    if options.trainer_probe:
        records["trainer_probe"] = trainer_fsdp_probe(options.outdir)
    options.outdir.mkdir(parents=True, exist_ok=True)
    torch.save(records, options.outdir / f"rank{records['rank']}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
