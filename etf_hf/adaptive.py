"""Adaptive-ETF (arXiv 2412.00884): lock blocks to fixed simplex ETFs during training, once they collapse.

`AdaptiveETFCallback` measures every block's nearest-class-mean (NCC) accuracy on a probe set at regular
checks. The paper's rule (``rule="effective_depth"``, the default): the *effective depth* of a check is
the first block from which every block has NCC strictly above ``threshold``; a block is locked once it
has been at or beyond the effective depth for more than ``patience`` consecutive checks. So a block
locks only when everything after it has collapsed too, and never while a later block has not (NCC
[0.5, 0.95, 0.6, 0.97] locks block 3 alone). ``rule="per_block"`` (each block on its own NCC) is kept
as an explicitly named alternative; it is not the paper's rule. Locks never move backwards. Counters
run across epoch boundaries: the public code that seems to accompany the paper resets them every
epoch, which with a patience above one check per epoch means that nothing ever locks.

A lock is *smooth* by default (`etf_hf.smooth_lock`): the frame's gain is the least-squares one on the
probe's inputs to the layer, the mean residual is folded into the bias, and BatchNorm running statistics
are re-estimated on the probe; with ``anneal_steps=N`` the weight is pulled linearly onto gain * frame
over N optimizer steps before it is replaced. The probe loss just before and after each lock is logged.
A lock that would complete with less than one check interval of training after it does not start (see
``min_steps_after_lock``): locking a block when no training is left to adapt to it only costs.

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
  blocks and lock steps travel in ``TrainerState.stateful_callbacks``, restored on resume. Trainer loads a
  checkpoint's weights and optimizer state before any callback event, so a model built fresh (unlocked)
  for ``train(resume_from_checkpoint=...)`` would take neither; `attach` therefore wraps the trainer's
  checkpoint loader to give the model the checkpoint's locks first (`lock_blocks` with its
  ``config.etf``), after which weights and optimizer state load onto the same tensors as in the
  uninterrupted run.

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

from .architectures import Slot, find_slots
from .collapse import collapse_report, effective_depth
from .config import ETFConfig
from .controls import CONTROL_BASES
from .etf import BASES, slot_seed
from .injection import parameter_summary
from .layers import ETFLinear
from .patch import lock_blocks
from .smooth_lock import fit_gain, folded_bias, input_moments, output_nearest_frame, probe_loss, refresh_batch_norm

logger = logging.getLogger("etf_hf")

EVERY_EVENTS = ("eval", "epoch")
RULES = ("effective_depth", "per_block")


def _dense_weight(layer: nn.Module, layout: str) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear (layout ``linear``) or transformers Conv1D (``conv1d``)."""
    return layer.weight.t() if layout == "conv1d" else layer.weight


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

    probe: the data NCC, the lock's input statistics and the lock losses are measured on -- a data set of
        example dicts (sharded across ranks under DDP, batched with the Trainer's data collator) or a
        DataLoader (used as given on every rank); default the Trainer's ``eval_dataset``.
    threshold, patience: with ``rule="effective_depth"`` (the paper's, the default) a block locks once it has
        been at or beyond the effective depth (the first block from which every block has NCC *strictly
        above* ``threshold``) for *more than* ``patience`` consecutive checks; with ``rule="per_block"``
        (not the paper's: a block can lock while a later block has not collapsed) once its own NCC has been
        strictly above ``threshold`` for more than ``patience`` consecutive checks. Strictly above, because
        "above the threshold" is what the paper asks, and an NCC that merely touches it (a probe of 10
        examples at 0.9) has not shown it; more than ``patience``, because ``patience`` is the number of
        checks a collapse must *survive* before the lock (with patience 0 a single check would suffice,
        which ``patience >= 1`` rules out). A check below the rule resets the block's counter; locked
        blocks stay locked.
    every: ``"eval"`` (after each evaluation), ``"epoch"`` (each epoch end) or N (every N optimizer steps).
    basis: the ETF basis of a lock (``"nearest"``: the frame closest to the block's current weights), or a
        control basis (see `etf_hf.controls`).
    smooth: fit the lock to the probe (see `etf_hf.smooth_lock`): for ``nearest``, the frame nearest to the
        weight on the probe's inputs to the layer; the least-squares gain on those inputs; the mean residual
        folded into the bias; BatchNorm running statistics re-estimated on the probe. With False the lock
        is `lock_blocks`' own (Frobenius-nearest frame and scale, old bias), BatchNorm keeps its statistics.
    anneal_steps: 0 (the default) replaces the weight at the check; N > 0 first pulls it, over the next N
        optimizer steps, linearly onto gain * frame (still training, the bias absorbing the mean change),
        and then replaces it by exactly that frame and gain.
    min_steps_after_lock: a lock starts only if it completes (after its ``anneal_steps``) at least this many
        optimizer steps before the end of training (``state.max_steps``); None (the default) means one check
        interval, the steps since the previous check. Why: the rest of the network adapts to a lock only by
        training after it, so a lock at (or annealing into) the end of training removes trainable weights
        from a finished model at a loss cost nothing can recover -- on the paper's MLP a gradual lock that
        ended with training raised the probe loss by 38 %. Blocks that qualify too late stay trainable; each
        such check is logged and kept in ``late_locks``. 0 allows a lock at the very last step.
    num_classes, pooling, batch_size: see `etf_hf.collapse_report`.

    Usage (the callback needs the trainer itself, for its optimizer, DDP wrapper and logger)::

        AdaptiveETFCallback(probe_dataset, threshold=0.9, patience=5).attach(trainer)
        trainer.train()

    Logged at each check: ``etf/ncc/layer_i``, ``etf/effective_depth`` (-1 for none), ``etf/locked_blocks``
    (how many), ``etf/trainable_params``; at each lock ``etf/lock_loss_before`` and ``etf/lock_loss_after``
    (probe loss in eval mode just before the lock and right after it, BatchNorm refreshed).
    Attributes: ``counters`` (consecutive qualifying checks, per block), ``locked``, ``lock_steps`` (block ->
    global step of its lock), ``history`` (one ``{"step", "epoch", "ncc"}`` per check), ``lock_losses`` (one
    ``{"blocks", "step", "before", "after"}`` per lock), ``annealing`` (block -> steps of its anneal done),
    ``late_locks`` (one ``{"blocks", "step"}`` per check at which qualifying blocks were too late to lock).
    """

    def __init__(self, probe: Any = None, *, threshold: float = 0.9, patience: int = 5, every: str | int = "eval",
                 rule: str = "effective_depth", basis: str = "nearest", smooth: bool = True, anneal_steps: int = 0,
                 min_steps_after_lock: int | None = None, num_classes: int | None = None, pooling: str = "auto",
                 batch_size: int = 256) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold={threshold}: an NCC accuracy threshold lies in [0, 1]")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience={patience!r}: must be an int >= 1 (consecutive checks)")
        if every not in EVERY_EVENTS and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
            raise ValueError(f"every={every!r}: use 'eval', 'epoch' or a positive number of steps")
        if rule not in RULES:
            raise ValueError(f"rule={rule!r}: choose 'effective_depth' (the paper's) or 'per_block'")
        if basis not in BASES + CONTROL_BASES:
            raise ValueError(f"basis={basis!r}: choose an ETF basis ({', '.join(BASES)}) or, to lock to a control, "
                             f"one of {', '.join(CONTROL_BASES)}")
        if basis == "structured" and anneal_steps:
            raise ValueError("anneal_steps with basis='structured': a structured frame has no stored dense matrix to "
                             "anneal onto; use anneal_steps=0 or a dense basis")
        if not isinstance(smooth, bool):
            raise ValueError(f"smooth={smooth!r}: must be true or false")
        if not isinstance(anneal_steps, int) or isinstance(anneal_steps, bool) or anneal_steps < 0:
            raise ValueError(f"anneal_steps={anneal_steps!r}: must be an int >= 0 (optimizer steps)")
        if min_steps_after_lock is not None and (not isinstance(min_steps_after_lock, int) or
                                                 isinstance(min_steps_after_lock, bool) or min_steps_after_lock < 0):
            raise ValueError(f"min_steps_after_lock={min_steps_after_lock!r}: must be an int >= 0 (optimizer steps) "
                             f"or None (one check interval)")
        self.probe = probe
        self.threshold = threshold
        self.patience = patience
        self.every = every
        self.rule = rule
        self.basis = basis
        self.smooth = smooth
        self.anneal_steps = anneal_steps
        self.min_steps_after_lock = min_steps_after_lock
        self.num_classes = num_classes
        self.pooling = pooling
        self.batch_size = batch_size
        self.counters: list[int] = []
        self.locked: list[int] = []
        self.lock_steps: dict[int, int] = {}
        self.history: list[dict[str, Any]] = []
        self.lock_losses: list[dict[str, Any]] = []
        self.annealing: dict[int, int] = {}
        self.late_locks: list[dict[str, Any]] = []
        self._anneal: dict[str, Any] | None = None  # the running anneal's targets (not checkpointed)
        self._handover: dict[str, nn.Parameter] = {}  # the parameters before a replacement, for the optimizer
        self._trainer: Any = None
        self._training = False

    # ---- wiring -------------------------------------------------------------------------------------

    def attach(self, trainer: Any) -> AdaptiveETFCallback:
        """Register with ``trainer`` (if not already among its callbacks), keep a reference to it, and wrap its
        checkpoint loader so that resuming gives the model the checkpoint's locks first (module docstring)."""
        if trainer.args.restore_callback_states_from_checkpoint:
            raise ValueError(
                "AdaptiveETFCallback restores its own counters and locks on resume; "
                "restore_callback_states_from_checkpoint=True would replace it by a copy built from JSON, "
                "without its probe data or trainer. Leave that argument False.")
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        load = trainer._load_from_checkpoint
        if not getattr(load, "_etf_locks_first", False):
            def load_with_locks(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
                if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):  # refused in on_train_begin
                    adopt_checkpoint_locks(model if model is not None else trainer.model, resume_from_checkpoint)
                load(resume_from_checkpoint, model)

            load_with_locks._etf_locks_first = True  # type: ignore[attr-defined]
            trainer._load_from_checkpoint = load_with_locks
        return self

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON): the settings and the counters, locks, NCC history and lock losses."""
        return {
            "args": {"threshold": self.threshold, "patience": self.patience, "every": self.every, "rule": self.rule,
                     "basis": self.basis, "smooth": self.smooth, "anneal_steps": self.anneal_steps,
                     "min_steps_after_lock": self.min_steps_after_lock,
                     "num_classes": self.num_classes, "pooling": self.pooling, "batch_size": self.batch_size},
            "attributes": {"counters": list(self.counters), "locked": list(self.locked),
                           "lock_steps": {str(block): step for block, step in self.lock_steps.items()},
                           "history": list(self.history), "lock_losses": list(self.lock_losses),
                           "annealing": {str(block): done for block, done in self.annealing.items()},
                           "late_locks": list(self.late_locks)},
        }

    def _restore(self, saved: dict[str, Any], model: nn.Module) -> None:
        attributes = saved["attributes"]
        annealing = attributes.get("annealing") or {}
        if annealing:
            raise ValueError(
                f"resuming: the checkpoint was taken in the middle of a gradual lock (blocks {sorted(map(int, annealing))}, "
                f"{max(annealing.values())} of {saved['args'].get('anneal_steps')} steps done), whose target frame is not "
                f"checkpointed. Resume from a checkpoint taken before that lock began or after it completed.")
        self.counters = list(attributes["counters"])
        self.locked = list(attributes["locked"])
        self.lock_steps = {int(block): step for block, step in attributes["lock_steps"].items()}
        self.history = list(attributes["history"])
        self.lock_losses = list(attributes.get("lock_losses", []))
        self.late_locks = list(attributes.get("late_locks", []))
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
        etf = getattr(self._trainer.model.config, "etf", None)
        fixed = ETFConfig.from_dict(etf).layers if etf is not None else []
        already = sorted(set(fixed) - set(self.locked)) if isinstance(fixed, list) else []
        if already:
            # blocks fixed before training (e.g. ETFConfig(head=True) fixes every block of a model built from a
            # config) are locked from the start: the rule must not lock them again
            self.locked = sorted(set(self.locked) | set(already))
            logger.warning("etf_hf: blocks %s were fixed before training (config.etf); Adaptive-ETF counts them as "
                           "locked. To leave every block to the callback under a fixed classifier, patch with "
                           "ETFConfig(head=True, layers=[])", already)
        self._training = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._training = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self._anneal is not None:
            self._anneal_step(state.global_step)
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
        if self.rule == "effective_depth":
            depth = effective_depth(ncc, self.threshold, strict=True)
            qualifies = [depth is not None and block >= depth for block in range(len(ncc))]
        else:
            qualifies = [value > self.threshold for value in ncc]
        settled = set(self.locked) | set(self.annealing)
        for block, ok in enumerate(qualifies):
            if block not in settled:
                self.counters[block] = self.counters[block] + 1 if ok else 0
        return [block for block, count in enumerate(self.counters) if count > self.patience and block not in settled]

    def check(self, state: TrainerState) -> None:
        """Measure, update the counters, lock what qualifies, log. Collective under DDP."""
        trainer = self._trainer
        model = trainer.model
        report = collapse_report(model, self._probe(), self.num_classes, self.pooling, self.threshold,
                                 self.batch_size, trainer.data_collator,
                                 reduce_fn=dist.all_reduce if _distributed() else None)
        ready = self.observe(report.ncc)
        logs: dict[str, float] = {}
        if ready and self._anneal is None:  # blocks that qualify during an anneal wait for the next check after it
            if self._too_late(state):
                self.late_locks.append({"blocks": ready, "step": state.global_step})
                logger.warning("etf_hf: Adaptive-ETF: blocks %s qualify at step %d, but their lock would complete "
                               "with less than %s steps of training left (of %d): not locked", ready, state.global_step,
                               self._margin(state), state.max_steps)
            else:
                logs.update(self._start_lock(ready, state.global_step))
        self.history.append({"step": state.global_step, "epoch": state.epoch, "ncc": report.ncc})
        logs.update({f"etf/ncc/layer_{i}": value for i, value in enumerate(report.ncc)})
        depth = effective_depth(report.ncc, self.threshold, strict=True)
        logs["etf/effective_depth"] = -1 if depth is None else depth
        logs["etf/locked_blocks"] = len(self.locked)
        logs["etf/trainable_params"] = parameter_summary(model)["trainable"]
        self._log(logs)

    def _margin(self, state: TrainerState) -> int:
        """Steps of training a lock must leave after it: ``min_steps_after_lock``, or the check interval."""
        if self.min_steps_after_lock is not None:
            return self.min_steps_after_lock
        previous = self.history[-1]["step"] if self.history else 0  # this check is not in history yet
        return state.global_step - previous

    def _too_late(self, state: TrainerState) -> bool:
        """Whether a lock started now would complete with fewer than `_margin` steps of training left."""
        return state.global_step + self.anneal_steps + self._margin(state) > state.max_steps

    def _log(self, logs: dict[str, float]) -> None:
        # Trainer.log clears control.should_log; keep a loss log pending for this step (checks made in
        # on_step_end run before it) so that the training loss is still logged at its own step.
        trainer = self._trainer
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
        # Its own generator: a DataLoader without one draws its base seed from the global torch RNG at every
        # iteration, which would shift the dropout masks of the training that follows, so that a run with the
        # callback would differ from one without it before any lock.
        return DataLoader(probe, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                          generator=torch.Generator())

    # ---- the lock -----------------------------------------------------------------------------------

    def _lock_config(self, model: nn.Module) -> ETFConfig:
        existing = getattr(model.config, "etf", None)
        return (ETFConfig(basis=self.basis) if existing is None
                else dataclasses.replace(ETFConfig.from_dict(existing), basis=self.basis))

    def _start_lock(self, blocks: list[int], step: int) -> dict[str, float]:
        """Lock ``blocks`` now, or start their anneal; returns what to log."""
        model = self._trainer.model
        config = self._lock_config(model)
        reduce_fn = dist.all_reduce if _distributed() else None
        probe = self._probe()
        before = probe_loss(model, probe, reduce_fn)
        slots = find_slots(model, dataclasses.replace(config, layers=sorted(blocks)))
        moments = (input_moments(model, {s.name: getattr(s.parent, s.attribute) for s in slots}, probe, reduce_fn)
                   if self.smooth or self.anneal_steps else {})
        if self.anneal_steps:
            self._anneal = {"blocks": sorted(blocks), "before": before,
                            "targets": {s.name: self._anneal_target(s, config, moments[s.name]) for s in slots}}
            self.annealing.update({block: 0 for block in blocks})
            logger.info("etf_hf: Adaptive-ETF starts locking blocks %s at step %d over %d steps (%s frame)",
                        blocks, step, self.anneal_steps, self.basis)
            return {}
        weights = {s.name: _dense_weight(getattr(s.parent, s.attribute), s.layout).detach().clone() for s in slots}
        self._replace(blocks, config)
        if self.smooth:
            for slot in slots:
                layer = getattr(slot.parent, slot.attribute)
                mean, covariance = moments[slot.name]
                frame = self._frame(weights[slot.name], covariance, layer.frame)
                gain = fit_gain(weights[slot.name], frame, covariance) if config.gain == "match" else None
                self._set(layer, frame, gain, weights[slot.name], mean)
        return self._finish_lock(blocks, step, before, probe)

    def _replace(self, blocks: list[int], config: ETFConfig) -> None:
        """`lock_blocks`, keeping the parameters from before it for the optimizer hand-over (`_finish_lock`)."""
        trainer = self._trainer
        model = trainer.model
        before = dict(model.named_parameters())
        lock_blocks(model, blocks, config)
        self._handover = before

    def _frame(self, weight: torch.Tensor, covariance: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
        """The frame of a smooth lock: for ``nearest``, the frame nearest to the weight on the probe's inputs
        (`output_nearest_frame`) where it has a closed form; otherwise ``frame`` (the basis's own)."""
        if self.basis == "nearest":
            fitted = output_nearest_frame(weight, covariance)
            if fitted is not None:
                return fitted.to(device=frame.device, dtype=frame.dtype)
        return frame

    def _set(self, layer: ETFLinear, frame: torch.Tensor | None, gain: float | None, weight: torch.Tensor,
             mean: torch.Tensor | None) -> None:
        """Give a new ETF layer its frame (when given), gain (when given) and the bias that keeps the mean
        output of ``weight`` on the probe (when ``mean`` is given and the layer has a bias)."""
        with torch.no_grad():
            if frame is not None:
                layer.frame.copy_(frame)
            if gain is not None:
                layer.frame_norm.fill_(gain)
            if mean is not None and layer.bias is not None:
                layer.bias.copy_(folded_bias(weight, layer.bias, layer.frame, float(layer.frame_norm.detach()), mean))

    def _finish_lock(self, blocks: list[int], step: int, before: float | None, probe: Any) -> dict[str, float]:
        trainer = self._trainer
        model = trainer.model
        if self.smooth:
            refresh_batch_norm(model, probe)
        wrapped = trainer.model_wrapped
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            rebuild_ddp_reducer(wrapped)
        hand_over_parameters(trainer.optimizer, model, self._handover, set(trainer.get_decay_parameter_names(model)),
                             trainer.lr_scheduler)
        self._handover = {}
        after = probe_loss(model, probe, dist.all_reduce if _distributed() else None)
        self.locked = sorted(set(self.locked) | set(blocks))
        self.lock_steps.update({block: step for block in blocks})
        for block in blocks:
            self.annealing.pop(block, None)
        logger.info("etf_hf: Adaptive-ETF locked blocks %s at step %d (%s frame); locked now %s; probe loss %s -> %s",
                    blocks, step, self.basis, self.locked, before, after)
        if before is None or after is None:
            return {}
        self.lock_losses.append({"blocks": list(blocks), "step": step, "before": before, "after": after})
        return {"etf/lock_loss_before": before, "etf/lock_loss_after": after}

    # ---- the gradual lock ---------------------------------------------------------------------------

    def _anneal_target(self, slot: Slot, config: ETFConfig, moments: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """The frame, gain and mean input a block's projection is annealed onto; the frame is built exactly
        as the lock will build it (`ETFLinear.from_layer`, the slot's seed)."""
        dense = getattr(slot.parent, slot.attribute)
        scratch = ETFLinear.from_layer(dense, layout=slot.layout, basis=config.basis,
                                       seed=slot_seed(config.seed, slot.seed_key), gain=config.gain,
                                       trainable_gain=config.trainable_gain)
        mean, covariance = moments
        weight = _dense_weight(dense, slot.layout)
        frame = scratch.frame.detach().clone()
        gain = float(scratch.frame_norm.detach())
        if self.smooth:
            frame = self._frame(weight, covariance, frame)
            gain = fit_gain(weight, frame, covariance) if config.gain == "match" else gain
        target = (frame * torch.tensor([gain], dtype=frame.dtype, device=frame.device)).to(weight.dtype)
        return {"frame": frame, "gain": gain, "target": target, "mean": mean}

    def _anneal_step(self, step: int) -> None:
        """One optimizer step of the running anneal: move each weight 1/(steps left) of the way to its target,
        the bias absorbing the change of the mean output; after the last step, replace the weights."""
        anneal = self._anneal
        model = self._trainer.model
        config = self._lock_config(model)
        slots = {s.name: s for s in find_slots(model, dataclasses.replace(config, layers=anneal["blocks"]))}
        done = self.annealing[anneal["blocks"][0]] + 1
        left = self.anneal_steps - done
        with torch.no_grad():
            for name, target in anneal["targets"].items():
                dense = getattr(slots[name].parent, slots[name].attribute)
                weight = _dense_weight(dense, slots[name].layout)
                old = weight.detach().clone()
                if left == 0:
                    weight.copy_(target["target"])
                else:
                    weight.add_((target["target"] - weight) / (left + 1))
                if dense.bias is not None:
                    shift = (old.double().cpu() - weight.detach().double().cpu()) @ target["mean"]
                    dense.bias.add_(shift.to(device=dense.bias.device, dtype=dense.bias.dtype))
        for block in anneal["blocks"]:
            self.annealing[block] = done
        if left > 0:
            return
        self._replace(anneal["blocks"], config)
        for name, target in anneal["targets"].items():
            layer = getattr(slots[name].parent, slots[name].attribute)
            self._set(layer, target["frame"], target["gain"], target["target"], None)
        self._anneal = None
        self._log(self._finish_lock(anneal["blocks"], step, anneal["before"], self._probe()))


def adopt_checkpoint_locks(model: nn.Module, checkpoint: str) -> list[int]:
    """Give ``model`` the locks a Trainer checkpoint's ``config.json`` records (``etf.layers``) that it lacks,
    so that the checkpoint's weights and optimizer state fit it; returns the blocks added.

    A model built fresh for ``trainer.train(resume_from_checkpoint=...)`` has dense weights where the
    checkpoint has frames and gains; without this, Trainer would load the weights non-strictly and then fail
    on the optimizer state with torch's "loaded state dict contains a parameter group that doesn't match".
    A model whose ETF config differs from the checkpoint's in more than the locked blocks gets one clear
    error instead.
    """
    import json
    import os

    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle).get("etf")
    if saved is None:
        return []
    target = ETFConfig.from_dict(saved)
    current = getattr(getattr(model, "config", None), "etf", None)
    have = ETFConfig.from_dict(current).layers if current is not None else []
    if not isinstance(target.layers, list) or not isinstance(have, list):
        return []
    missing = sorted(set(target.layers) - set(have))
    if not missing:
        return []
    try:
        lock_blocks(model, missing, target)
    except ValueError as error:
        raise ValueError(
            f"resuming from {checkpoint}: the checkpoint fixes blocks {target.layers} with {target}, and this model "
            f"cannot take those locks ({error}). Build the model from the checkpoint "
            f"(AutoModelFor...from_pretrained(checkpoint_dir)) or with the same ETF config.") from error
    logger.info("etf_hf: resuming from %s: locked blocks %s first, as the checkpoint has them", checkpoint, missing)
    return missing
