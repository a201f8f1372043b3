"""Adaptive-ETF (arXiv 2412.00884): lock blocks to fixed simplex ETFs during training, once they collapse.

`AdaptiveETFCallback` measures every block's nearest-class-mean (NCC) accuracy on a probe set at regular
checks; a block whose NCC stays >= ``threshold`` for ``patience`` consecutive checks is locked with
`etf_hf.lock_blocks` (by default to the frame nearest to its current weight, so the function it computes
changes as little as possible). Counters run across epoch boundaries: the public code that seems to
accompany the paper resets them every epoch, which with a patience above one check per epoch means that
nothing ever locks.

A lock changes the model's parameter set in the middle of training, which three things must learn about:

* the optimizer (`hand_over_parameters`): the replaced weight leaves its param group and its state
  (momentum or Adam moments would otherwise keep a dead tensor alive, and weight decay would keep
  "training" it); the new bias takes the old bias's place and state (its value is copied, so it is the
  same variable); the new gain ``frame_norm`` joins a group without weight decay, as Trainer treats norm
  scales (decay would pull the frame's scale to zero). Each touched group is then put back in
  ``model.named_parameters()`` order, the order in which `Trainer.create_optimizer` lists a freshly loaded
  model's parameters, so that a checkpoint's optimizer state (matched by position) resumes onto the
  right tensors.
* DistributedDataParallel (`rebuild_ddp_reducer`): its reducer holds the parameter list from wrapping
  time, so the new gain and bias would never be all-reduced (replicas drift) and, without
  ``find_unused_parameters``, the vanished weight would make the next backward fail. The reducer is
  rebuilt in place, as DDP itself does when unpickled (``DistributedDataParallel.__setstate__``), after
  checking that all ranks hold the same parameter shapes and broadcasting parameters and buffers (frames
  included) from rank 0. In place, because Trainer's loop holds the DDP object in a local variable.
  Every rank reaches the same decision because the NCC statistics are all-reduced before deciding.
* the checkpoint: ``config.etf`` records the locks (`lock_blocks`), and the callback's counters, locked
  blocks and lock steps travel in ``TrainerState.stateful_callbacks``, restored on resume.

Not supported: DeepSpeed and FSDP (sharded parameters cannot be swapped like this) -- the callback
refuses to start under them.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from .collapse import collapse_report
from .config import ETFConfig
from .controls import CONTROL_BASES
from .etf import BASES
from .injection import parameter_summary
from .patch import lock_blocks

logger = logging.getLogger("etf_hf")

EVERY_EVENTS = ("eval", "epoch")


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` (itself an Optimizer subclass)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _extend_scheduler(scheduler: Any, source_index: int) -> None:
    """Give a newly added param group the schedule of group ``source_index``."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler
    if scheduler is None:
        return
    if not hasattr(scheduler, "base_lrs"):
        raise NotImplementedError(
            f"cannot add a param group to a {type(scheduler).__name__} (no per-group base_lrs); give the optimizer "
            f"a param group without weight decay (as Trainer's default optimizer has) so that ETF gains can join it")
    scheduler.base_lrs.append(scheduler.base_lrs[source_index])
    if hasattr(scheduler, "lr_lambdas"):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[source_index])
    if getattr(scheduler, "_last_lr", None) is not None:
        scheduler._last_lr.append(scheduler._last_lr[source_index])


def hand_over_parameters(optimizer: torch.optim.Optimizer, model: nn.Module, before: Mapping[str, nn.Parameter],
                         decay_names: set[str] | list[str], lr_scheduler: Any = None) -> None:
    """Update ``optimizer`` after ``model``'s parameters changed from ``before`` (name -> parameter).

    Removed parameters leave their group and the optimizer state. A new parameter with the name and shape
    of a removed one (a bias) takes its place and its state. Other new trainable parameters join a
    group with the hyperparameters of the group that held their module's old parameters, with weight
    decay only if their name is in ``decay_names`` (`Trainer.get_decay_parameter_names`); if no such
    group exists one is added, and ``lr_scheduler`` (LambdaLR-like) extended to schedule it.
    """
    base = unwrap_optimizer(optimizer)
    after = dict(model.named_parameters())
    removed = {name: p for name, p in before.items() if after.get(name) is not p}
    added = {name: p for name, p in after.items() if before.get(name) is not p and p.requires_grad}
    group_of = {id(p): group for group in base.param_groups for p in group["params"]}
    reference: dict[str, dict] = {}  # module path -> the group that held its old parameters
    for name, old in removed.items():
        if id(old) in group_of:
            reference.setdefault(_module_of(name), group_of[id(old)])
    touched: list[dict] = []

    for name, new in list(added.items()):
        old = removed.get(name)
        if old is None or id(old) not in group_of or old.shape != new.shape:
            continue
        group = group_of[id(old)]
        group["params"][next(i for i, p in enumerate(group["params"]) if p is old)] = new
        if old in base.state:
            base.state[new] = base.state.pop(old)
        del added[name], removed[name]
        touched.append(group)

    for old in removed.values():
        group = group_of.get(id(old))
        if group is not None:
            group["params"][:] = [p for p in group["params"] if p is not old]
            base.state.pop(old, None)
            touched.append(group)

    for name, new in added.items():
        source = reference.get(_module_of(name), base.param_groups[0])
        weight_decay = source.get("weight_decay", 0.0) if name in decay_names else 0.0
        settings = {k: v for k, v in source.items() if k not in ("params", "weight_decay")}
        group = next((g for g in base.param_groups if g.get("weight_decay", 0.0) == weight_decay
                      and all(g.get(k) == v for k, v in settings.items())), None)
        if group is None:
            source_index = next(i for i, g in enumerate(base.param_groups) if g is source)
            base.add_param_group({**settings, "weight_decay": weight_decay, "params": [new]})
            _extend_scheduler(lr_scheduler, source_index)
        else:
            group["params"].append(new)
            touched.append(group)

    order = {id(p): i for i, p in enumerate(after.values())}
    for group in touched:
        group["params"].sort(key=lambda p: order.get(id(p), len(order)))


def rebuild_ddp_reducer(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Make a DDP wrapper reduce its module's *current* parameters, in place (see the module docstring).

    Collective: every rank must call it after making the same change to its module.
    """
    from torch.distributed.utils import _sync_module_states, _verify_param_shape_across_processes

    ddp._module_parameters = [p for name, p in ddp.module.named_parameters() if name not in ddp.parameters_to_ignore]
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    _verify_param_shape_across_processes(ddp.process_group, parameters)
    _sync_module_states(module=ddp.module, process_group=ddp.process_group,
                        broadcast_bucket_size=ddp.broadcast_bucket_size, src=0,
                        params_and_buffers_to_ignore=ddp.parameters_to_ignore, broadcast_buffers=True)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, ddp._build_debug_param_to_name_mapping(parameters),
                         ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
    for hook, state in ddp._comm_hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)
    ddp._has_rebuilt_buckets = False


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AdaptiveETFCallback(TrainerCallback, ExportableState):
    """Lock blocks to fixed simplex ETFs once their features collapse (Adaptive-ETF).

    probe: the data NCC is measured on -- a data set of example dicts (sharded across ranks under DDP,
        batched with the Trainer's data collator) or a DataLoader (used as given on every rank); default
        the Trainer's ``eval_dataset``.
    threshold, patience: a block locks after ``patience`` consecutive checks with NCC >= ``threshold``.
    every: ``"eval"`` (after each evaluation), ``"epoch"`` (each epoch end) or N (every N optimizer steps).
    basis: the ETF basis of a lock (``"nearest"``: the frame closest to the block's current weights).
    lock_following: when a block qualifies, lock every later block with it (the effective-depth rule:
        the first block that has collapsed and all blocks after it are fixed together).
    num_classes, pooling, batch_size: see `etf_hf.collapse_report`.

    Usage (the callback needs the trainer itself, for its optimizer, DDP wrapper and logger)::

        AdaptiveETFCallback(probe_dataset, threshold=0.9, patience=5).attach(trainer)
        trainer.train()

    Logged at each check: ``etf/ncc/layer_i``, ``etf/locked_blocks`` (how many), ``etf/trainable_params``.
    Attributes: ``counters`` (consecutive checks above threshold, per block), ``locked``, ``lock_steps``
    (block -> global step of its lock), ``history`` (one ``{"step", "epoch", "ncc"}`` per check).
    """

    def __init__(self, probe: Any = None, *, threshold: float = 0.9, patience: int = 5, every: str | int = "eval",
                 basis: str = "nearest", lock_following: bool = False, num_classes: int | None = None,
                 pooling: str = "auto", batch_size: int = 256) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold}: an NCC accuracy threshold lies in [0, 1]")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience={patience!r}: must be an int >= 1 (consecutive checks)")
        if every not in EVERY_EVENTS and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
            raise ValueError(f"every={every!r}: use 'eval', 'epoch' or a positive number of steps")
        if basis not in BASES + CONTROL_BASES:
            raise ValueError(f"basis={basis!r}: choose an ETF basis ({', '.join(BASES)}) or, to lock to a control, "
                             f"one of {', '.join(CONTROL_BASES)}")
        self.probe = probe
        self.threshold = threshold
        self.patience = patience
        self.every = every
        self.basis = basis
        self.lock_following = lock_following
        self.num_classes = num_classes
        self.pooling = pooling
        self.batch_size = batch_size
        self.counters: list[int] = []
        self.locked: list[int] = []
        self.lock_steps: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self._trainer: Any = None
        self._training = False

    # ---- wiring -------------------------------------------------------------------------------------

    def attach(self, trainer: Any) -> AdaptiveETFCallback:
        """Register with ``trainer`` (if not already among its callbacks) and keep a reference to it."""
        if trainer.args.restore_callback_states_from_checkpoint:
            raise ValueError(
                "AdaptiveETFCallback restores its own counters and locks on resume; "
                "restore_callback_states_from_checkpoint=True would replace it by a copy built from JSON, "
                "without its probe data or trainer. Leave that argument False.")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON): the settings and the counters, locks and NCC history."""
        return {
            "args": {"threshold": self.threshold, "patience": self.patience, "every": self.every,
                     "basis": self.basis, "lock_following": self.lock_following, "num_classes": self.num_classes,
                     "pooling": self.pooling, "batch_size": self.batch_size},
            "attributes": {"counters": list(self.counters), "locked": list(self.locked),
                           "lock_steps": {str(block): step for block, step in self.lock_steps.items()},
                           "history": list(self.history)},
        }

    def _restore(self, saved: dict[str, Any], model: nn.Module) -> None:
        attributes = saved["attributes"]
        self.counters = list(attributes["counters"])
        self.locked = list(attributes["locked"])
        self.lock_steps = {int(block): step for block, step in attributes["lock_steps"].items()}
        self.history = list(attributes["history"])
        etf = getattr(model.config, "etf", None)
        layers = ETFConfig.from_dict(etf).layers if etf is not None else []
        fixed = set(layers) if isinstance(layers, list) else set()
        if not set(self.locked) <= fixed:
            raise ValueError(
                f"resuming: the checkpoint locked blocks {self.locked}, but this model fixes {sorted(fixed)}. "
                f"Load the model from the checkpoint (AutoModelFor...from_pretrained(checkpoint_dir)), whose "
                f"config.etf holds the locks, before trainer.train(resume_from_checkpoint=...)")

    # ---- events -------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self._trainer is None:
            raise RuntimeError("AdaptiveETFCallback needs its trainer: use AdaptiveETFCallback(...).attach(trainer)")
        if self._trainer.is_deepspeed_enabled or self._trainer.is_fsdp_enabled:
            sharding = "DeepSpeed" if self._trainer.is_deepspeed_enabled else "FSDP"
            raise NotImplementedError(
                f"AdaptiveETFCallback does not run under {sharding}: a lock replaces parameters, which {sharding} "
                f"has sharded across ranks. Its multi-process path is DDP: remove {sharding} from TrainingArguments "
                f"(and the accelerate config) and launch with torchrun --nproc_per_node N "
                f"(examples/ddp_torchrun.py). "
                f"To shard, fix the blocks before training with etf_hf.patch instead, which trains under FSDP.")
        if self.every == "eval" and args.eval_strategy == "no":
            raise ValueError("AdaptiveETFCallback(every='eval') needs evaluations: set eval_strategy, or use "
                             "every='epoch' or every=<steps>")
        saved = state.stateful_callbacks.get(type(self).__name__)
        if state.global_step > 0 and saved:
            self._restore(saved, self._trainer.model)
        self._training = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if isinstance(self.every, int) and state.global_step % self.every == 0:
            self.check(state)

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.every == "epoch":
            self.check(state)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        # only during training: an evaluate() after train() must not change the model
        if self.every == "eval" and self._training:
            self.check(state)

    # ---- the rule -----------------------------------------------------------------------------------

    def observe(self, ncc: list[float]) -> list[int]:
        """Fold one check's per-block NCC into the counters; return the blocks that qualify to lock now."""
        if not self.counters:
            self.counters = [0] * len(ncc)
        if len(ncc) != len(self.counters):
            raise ValueError(f"{len(ncc)} blocks measured, but the counters track {len(self.counters)}")
        for block, value in enumerate(ncc):
            if block not in self.locked:
                self.counters[block] = self.counters[block] + 1 if value >= self.threshold else 0
        ready = [block for block, count in enumerate(self.counters)
                 if count >= self.patience and block not in self.locked]
        if self.lock_following and ready:
            ready = [block for block in range(min(ready), len(ncc)) if block not in self.locked]
        return ready

    def check(self, state: TrainerState) -> None:
        """Measure, update the counters, lock what qualifies, log. Collective under DDP."""
        trainer = self._trainer
        model = trainer.model
        report = collapse_report(model, self._probe(), self.num_classes, self.pooling, self.threshold,
                                 self.batch_size, trainer.data_collator,
                                 reduce_fn=dist.all_reduce if _distributed() else None)
        ready = self.observe(report.ncc)
        if ready:
            self._lock(ready, state.global_step)
        self.history.append({"step": state.global_step, "epoch": state.epoch, "ncc": report.ncc})
        logs: dict[str, float] = {f"etf/ncc/layer_{i}": value for i, value in enumerate(report.ncc)}
        logs["etf/locked_blocks"] = len(self.locked)
        logs["etf/trainable_params"] = parameter_summary(model)["trainable"]
        # Trainer.log clears control.should_log; keep a loss log pending for this step (checks made in
        # on_step_end run before it) so that the training loss is still logged at its own step.
        pending = trainer.control.should_log
        trainer.log(logs)
        trainer.control.should_log = pending

    def _probe(self) -> Any:
        probe = self.probe if self.probe is not None else self._trainer.eval_dataset
        if probe is None or isinstance(probe, Mapping):
            raise ValueError("AdaptiveETFCallback needs probe data: pass probe=..., or give the Trainer one eval_dataset")
        if isinstance(probe, DataLoader):
            return probe
        if _distributed():
            probe = Subset(probe, range(dist.get_rank(), len(probe), dist.get_world_size()))
        collate: Callable | None = self._trainer.data_collator
        return DataLoader(probe, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    def _lock(self, blocks: list[int], step: int) -> None:
        trainer = self._trainer
        model = trainer.model
        existing = getattr(model.config, "etf", None)
        config = (ETFConfig(basis=self.basis) if existing is None
                  else dataclasses.replace(ETFConfig.from_dict(existing), basis=self.basis))
        before = dict(model.named_parameters())
        lock_blocks(model, blocks, config)
        wrapped = trainer.model_wrapped
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            rebuild_ddp_reducer(wrapped)
        hand_over_parameters(trainer.optimizer, model, before, set(trainer.get_decay_parameter_names(model)),
                             trainer.lr_scheduler)
        self.locked = sorted(set(self.locked) | set(blocks))
        self.lock_steps.update({block: step for block in blocks})
        logger.info("etf_hf: Adaptive-ETF locked blocks %s at step %d (%s frame); locked now %s",
                    blocks, step, self.basis, self.locked)
