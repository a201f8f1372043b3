"""Adaptive-ETF under the real `transformers.Trainer` (CPU): the lock rule, the optimizer hand-over, logging,
checkpoints and resume, and (slow) a mid-training lock under two-process DDP.

The model is a tiny version of the paper's MLP on synthetic data whose classes are nearest-mean separable
from the input on (tests/adaptive_ddp_worker.py), so NCC is high at the first check and the lock time is
set by the schedule alone: checks every 4 steps, patience 2, hence every block locks at the third check
(step 12: more than 2 checks). An epoch is 6 steps, so that lock needs counters that survive the epoch
boundary at step 6.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments
from transformers.optimization import get_linear_schedule_with_warmup

import etf_hf
from etf_hf import AdaptiveETFCallback
from etf_hf.adaptive import hand_over_parameters, unwrap_optimizer
from adaptive_ddp_worker import CHECK_EVERY, STEPS, FrameRecorder, SeparableImages, tiny_mlp

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "adaptive_ddp_worker.py"
MAX_STEPS = 36
STEPS_PER_EPOCH = 6  # 96 examples, batch 16
LOCK_STEP = 12
WIDTH = 32



def build_trainer(model: torch.nn.Module, output_dir: Path) -> tuple[Trainer, AdaptiveETFCallback, FrameRecorder]:
    args = TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_train_batch_size=16,
                             per_device_eval_batch_size=64, max_steps=MAX_STEPS, learning_rate=0.05, optim="sgd",
                             optim_args="momentum=0.9", weight_decay=0.01, logging_steps=1, eval_strategy="steps",
                             eval_steps=4, save_strategy="steps", save_steps=4, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=SeparableImages(96, seed=0),
                      eval_dataset=SeparableImages(64, seed=1))
    callback = AdaptiveETFCallback(threshold=0.5, patience=2, every="eval").attach(trainer)  # probe: eval_dataset
    recorder = FrameRecorder()
    trainer.add_callback(recorder)  # after the callback: sees each frame in the event that created it
    return trainer, callback, recorder


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("adaptive")
    trainer, callback, recorder = build_trainer(tiny_mlp(), output_dir)
    trainer.train()
    return SimpleNamespace(trainer=trainer, callback=callback, recorder=recorder, output_dir=output_dir,
                           final=full_state(trainer.model))


# ---- the rule, without training ---------------------------------------------------------------------


def test_effective_depth_rule_locks_only_blocks_beyond_the_depth_after_more_than_patience_checks():
    """The issue's example: NCC [0.5, 0.95, 0.6, 0.97] has effective depth 3, so block 3 alone locks, at the
    check after `patience` qualifying ones; block 1 (collapsed, but block 2 after it is not) never counts."""
    callback = AdaptiveETFCallback(threshold=0.9, patience=5)
    for _ in range(5):
        assert callback.observe([0.5, 0.95, 0.6, 0.97]) == []
    assert callback.counters == [0, 0, 0, 5]
    assert callback.observe([0.5, 0.95, 0.6, 0.97]) == [3]
    callback.locked = [3]
    for _ in range(10):
        assert callback.observe([0.5, 0.95, 0.6, 0.97]) == []  # below the depth: never
    assert callback.counters[:3] == [0, 0, 0]


def test_a_dip_resets_and_exactly_the_threshold_does_not_count():
    callback = AdaptiveETFCallback(threshold=0.9, patience=2)
    assert callback.observe([0.2, 0.95, 0.95]) == []
    assert callback.observe([0.2, 0.95, 0.95]) == []
    assert callback.observe([0.2, 0.95, 0.85]) == []  # block 2 dips: depth None, every counter resets
    assert callback.counters == [0, 0, 0]
    assert callback.observe([0.2, 0.9, 0.95]) == []  # 0.9 is not above 0.9: depth 2
    assert callback.counters == [0, 0, 1]
    assert callback.observe([0.2, 0.95, 0.95]) == []
    assert callback.observe([0.2, 0.95, 0.95]) == [2]  # block 2's third check in a row: more than 2
    assert callback.counters == [0, 2, 3]


def test_locks_never_move_backwards_and_a_locked_block_keeps_its_lock():
    callback = AdaptiveETFCallback(threshold=0.9, patience=1)
    callback.observe([0.95, 0.95, 0.95])
    assert callback.observe([0.95, 0.95, 0.95]) == [0, 1, 2]
    callback.locked = [0, 1, 2]
    assert callback.observe([0.1, 0.1, 0.1]) == [] and callback.counters == [2, 2, 2]


def test_per_block_rule_is_the_named_alternative():
    callback = AdaptiveETFCallback(threshold=0.9, patience=1, rule="per_block")
    callback.observe([0.5, 0.95, 0.6, 0.97])
    assert callback.observe([0.5, 0.95, 0.6, 0.97]) == [1, 3]  # block 1 although block 2 is not collapsed


def test_invalid_settings_are_refused(tmp_path):
    for kwargs, message in (({"threshold": 1.5}, "threshold=1.5: an NCC accuracy threshold lies in [0, 1]"),
                            ({"patience": 0}, "patience=0: must be an int >= 1"),
                            ({"every": "step"}, "every='step': use 'eval', 'epoch' or a positive number of steps"),
                            ({"every": 0}, "every=0: use 'eval', 'epoch' or a positive number of steps"),
                            ({"basis": "random"}, "basis='random': choose an ETF basis (canonical, orthogonal, nearest, "
                                                  "structured) or, to lock to a control, one of gaussian, zero, frozen"),
                            ({"rule": "paper"}, "rule='paper': choose 'effective_depth' (the paper's) or 'per_block'"),
                            ({"anneal_steps": -1}, "anneal_steps=-1: must be an int >= 0"),
                            ({"min_steps_after_lock": -1}, "min_steps_after_lock=-1: must be an int >= 0"),
                            ({"min_steps_after_lock": 2.5}, "min_steps_after_lock=2.5: must be an int >= 0"),
                            ({"smooth": "yes"}, "smooth='yes': must be true or false")):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            AdaptiveETFCallback(**kwargs)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             restore_callback_states_from_checkpoint=True)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        AdaptiveETFCallback().attach(Trainer(model=tiny_mlp(), args=args))


def _decay_split(trainer: Trainer, model: torch.nn.Module) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in unwrap_optimizer(trainer.optimizer).param_groups]


def test_hand_over_matches_a_fresh_trainer_optimizer_and_moves_bias_state(tmp_path):
    """After a lock the optimizer holds exactly what Trainer would build for the patched model, in the same
    order (so a checkpoint's optimizer state resumes onto the right tensors); the bias keeps its state."""
    model = tiny_mlp()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                         optim="adamw_torch", weight_decay=0.1))
    optimizer = trainer.create_optimizer()
    model(**{k: v.unsqueeze(0).repeat(4, *[1] * v.dim()) for k, v in SeparableImages(1, seed=0)[0].items()}).loss.backward()
    optimizer.step()
    old_weight, old_bias = model.layers[1].linear.weight, model.layers[1].linear.bias
    bias_state = optimizer.state[old_bias]
    before = dict(model.named_parameters())
    etf_hf.lock_blocks(model, [1])
    hand_over_parameters(optimizer, model, before, set(trainer.get_decay_parameter_names(model)))

    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert all(p is not old_weight and p is not old_bias for p in in_optimizer)
    assert old_weight not in optimizer.state and old_bias not in optimizer.state
    new_bias, gain = model.layers[1].linear.bias, model.layers[1].linear.frame_norm
    assert optimizer.state[new_bias] is bias_state and gain not in optimizer.state
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters() if p.requires_grad}
    no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0.0)
    assert any(p is gain for p in no_decay["params"])

    handed_over = _decay_split(trainer, model)
    trainer.optimizer = None
    trainer.create_optimizer()
    assert handed_over == _decay_split(trainer, model)


def test_hand_over_adds_a_no_decay_group_when_there_is_none_and_schedules_it():
    """A single decayed group (a custom optimizer): the gains get their own group, which the schedule drives."""
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10)
    optimizer.step()
    scheduler.step()
    before = dict(model.named_parameters())
    etf_hf.lock_blocks(model, [0, 2])
    hand_over_parameters(optimizer, model, before, {"input_layer.linear.weight"}, scheduler)
    assert len(optimizer.param_groups) == 2
    added = optimizer.param_groups[1]
    assert added["weight_decay"] == 0.0 and added["momentum"] == 0.9
    assert added["params"] == [model.layers[0].linear.frame_norm, model.layers[2].linear.frame_norm]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert added["lr"] == optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 6 / 10)


# ---- one Trainer run with a lock at step 8 ------------------------------------------------------------


def test_lock_needs_counters_that_survive_the_epoch_boundary(run):
    callback = run.callback
    assert callback.locked == [0, 1, 2]
    assert callback.lock_steps == {0: LOCK_STEP, 1: LOCK_STEP, 2: LOCK_STEP}
    first, second, third = callback.history[:3]
    assert (first["step"], second["step"], third["step"]) == (4, 8, 12)
    assert first["epoch"] < 1 < second["epoch"], "the checks behind the lock lie in different epochs"
    assert min(first["ncc"] + second["ncc"] + third["ncc"]) > 0.5
    assert run.trainer.model.config.etf["layers"] == [0, 1, 2] and run.trainer.model.config.etf["basis"] == "nearest"


def test_locked_frames_stay_bit_exact_while_gains_and_loss_keep_training(run):
    model = run.trainer.model
    layers = dict(etf_hf.etf_layers(model))
    assert sorted(layers) == ["layers.0.linear", "layers.1.linear", "layers.2.linear"]
    for path, layer in layers.items():
        assert torch.equal(layer.frame, run.recorder.frames[path]), f"{path}.frame moved after its lock"
        assert not torch.equal(layer.frame_norm.detach(), run.recorder.gains[path]), f"{path} gain never trained"
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e and e["step"] > LOCK_STEP]
    assert len(losses) == MAX_STEPS - LOCK_STEP
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_optimizer_holds_exactly_the_trainable_parameters_after_the_lock(run):
    model = run.trainer.model
    optimizer = unwrap_optimizer(run.trainer.optimizer)
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_optimizer) == len(trainable) and {id(p) for p in in_optimizer} == trainable
    assert all(id(p) in trainable for p in optimizer.state), "optimizer state of a replaced weight survived"
    assert not any(p.shape == (WIDTH, WIDTH) for p in in_optimizer), "a replaced H x H weight is still optimized"
    gains = {id(layer.frame_norm) for _, layer in etf_hf.etf_layers(model)}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert gains <= no_decay


def test_checks_are_logged_to_the_trainer(run):
    entries = [e for e in run.trainer.state.log_history if "etf/locked_blocks" in e]
    assert [e["step"] for e in entries] == list(range(4, MAX_STEPS + 1, 4))
    assert all({f"etf/ncc/layer_{i}" for i in range(3)} <= e.keys() for e in entries)
    assert [e["etf/locked_blocks"] for e in entries[:4]] == [0, 0, 3, 3]
    assert all(e["etf/effective_depth"] == 0 for e in entries)
    dense = sum(p.numel() for p in tiny_mlp().parameters())
    assert entries[0]["etf/trainable_params"] == dense
    assert entries[2]["etf/trainable_params"] == dense - 3 * WIDTH * WIDTH + 3  # three weights became three gains


def test_saved_model_loads_with_its_locks(run, tmp_path):
    model = run.trainer.model.eval()
    run.trainer.save_model(str(tmp_path))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.etf["layers"] == [0, 1, 2]
    pixels = SeparableImages(8, seed=9).pixels
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    checkpoint = json.loads((run.output_dir / "checkpoint-12" / "config.json").read_text())
    assert checkpoint["etf"]["layers"] == [0, 1, 2]
    assert json.loads((run.output_dir / "checkpoint-8" / "config.json").read_text()).get("etf") is None  # pre-lock


@pytest.mark.parametrize("checkpoint_step", [4, 12], ids=["before-lock", "after-lock"])
def test_resume_restores_counters_and_locks_and_continues_bit_exactly(run, checkpoint_step, tmp_path):
    """Resuming from step 4 needs the restored counter (else the lock would come at step 16, not 12); from
    step 12, the model arrives locked from its checkpoint and the optimizer state must land on the right
    tensors. Either way the run ends bit-identical to the uninterrupted one."""
    checkpoint = run.output_dir / f"checkpoint-{checkpoint_step}"
    model = AutoModelForImageClassification.from_pretrained(checkpoint)
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["AdaptiveETFCallback"]
    assert saved["attributes"]["counters"] == ([1, 1, 1] if checkpoint_step == 4 else [3, 3, 3])
    trainer, callback, _ = build_trainer(model, tmp_path)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert callback.lock_steps == run.callback.lock_steps
    assert callback.history == run.callback.history
    final = full_state(trainer.model)
    assert final.keys() == run.final.keys()
    different = [name for name in final if not torch.equal(final[name], run.final[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"


def test_resume_into_a_freshly_built_model_takes_the_checkpoints_locks_and_continues_bit_exactly(run, tmp_path):
    """Issue 17: a model built fresh (unlocked) for resume_from_checkpoint used to fail with torch's "loaded
    state dict contains a parameter group that doesn't match". The callback gives it the checkpoint's locks
    before Trainer loads weights and optimizer state, and the run ends as the uninterrupted one."""
    trainer, callback, _ = build_trainer(tiny_mlp(), tmp_path)
    trainer.train(resume_from_checkpoint=str(run.output_dir / "checkpoint-16"))
    assert trainer.model.config.etf["layers"] == [0, 1, 2]
    assert callback.lock_steps == run.callback.lock_steps
    final = full_state(trainer.model)
    assert final.keys() == run.final.keys()
    assert [n for n in final if not torch.equal(final[n], run.final[n])] == []


def test_resume_into_a_model_with_another_etf_config_gets_one_clear_error(run, tmp_path):
    model = etf_hf.patch(tiny_mlp(), etf_hf.ETFConfig(layers=[0], basis="canonical"))
    trainer, _, _ = build_trainer(model, tmp_path)
    with pytest.raises(ValueError, match="cannot take those locks.*from_pretrained"):
        trainer.train(resume_from_checkpoint=str(run.output_dir / "checkpoint-16"))


def test_blocks_fixed_before_training_count_as_locked(tmp_path, caplog):
    """ETFConfig(head=True) on a model built from a config fixes every block too: the callback says so and
    does not lock them again (with layers=[] it would lock them itself, tests/test_head.py)."""
    model = etf_hf.patch(tiny_mlp(), etf_hf.ETFConfig(head=True))
    trainer, callback, _ = build_trainer(model, tmp_path)
    trainer.args.max_steps = 12
    with caplog.at_level("WARNING", logger="etf_hf"):
        trainer.train()
    assert callback.locked == [0, 1, 2] and callback.lock_steps == {} and callback.lock_losses == []
    assert "layers=[]" in caplog.text


def test_evaluate_after_training_does_not_check_or_lock(run):
    checks = len(run.callback.history)
    run.trainer.evaluate()
    assert len(run.callback.history) == checks


# ---- two processes ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_lock_mid_training_keeps_replicas_identical(tmp_path):
    """torchrun, 2 gloo ranks, Trainer + DDP without find_unused_parameters: both ranks lock the same blocks at
    the same step, the rebuilt DDP reducer covers the new gains and biases (the ranks see different shards,
    so unreduced gradients would make them drift), and training goes on after the lock."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    first, second = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))
    for rank, record in enumerate((first, second)):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["wrapper"] == "DistributedDataParallel"
        assert record["global_step"] == STEPS
        assert record["ddp_reduces_all_trainable"]
    assert first["locked"] == second["locked"] == [0, 1, 2]
    assert first["lock_steps"] == second["lock_steps"] == {0: 2 * CHECK_EVERY, 1: 2 * CHECK_EVERY, 2: 2 * CHECK_EVERY}
    assert len(first["lock_losses"]) == 1 and first["lock_losses"] == second["lock_losses"]  # all-reduced on the probe
    assert first["config_etf"] == second["config_etf"]
    different = [n for n in first["parameters"] if not torch.equal(first["parameters"][n], second["parameters"][n])]
    assert not different, f"the replicas differ after the lock in {different}"
    for path, frame in first["frames"].items():
        assert torch.equal(frame, second["frames"][path])
        assert torch.equal(frame, first["frames_at_lock"][path]), f"{path}.frame moved after the lock"
        assert not torch.equal(first["parameters"][f"{path}.frame_norm"], first["gains_at_lock"][path])
    after_lock = [loss for step, loss in first["losses"] if step > 2 * CHECK_EVERY]
    assert len(after_lock) == STEPS - 2 * CHECK_EVERY and all(torch.isfinite(torch.tensor(after_lock)))
    assert sum(after_lock[-4:]) < sum(after_lock[:4]), after_lock
