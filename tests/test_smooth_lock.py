"""Smooth Adaptive-ETF locks (etf_hf/smooth_lock.py and the callback's use of it) under the real Trainer, on the
tiny paper MLP (3 blocks of width 32, BatchNorm) and noisy synthetic classes (tests/adaptive_ddp_worker.py).

Each run trains 40 SGD steps, then the callback locks every block at step 40 (checks every 20 steps, patience 1,
NCC threshold 0.3); runs with the same seed are identical up to the lock, so their probe losses just before it
are the same number and the losses just after it can be compared directly. The lock comes with (or, gradual,
a few steps before) the end of training so that what is measured after it is the lock's own doing; that needs
``min_steps_after_lock`` below its default of one check interval, which would refuse such a late lock.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import etf_hf
from etf_hf import AdaptiveETFCallback
from etf_hf.adaptive import unwrap_optimizer
from etf_hf.smooth_lock import fit_gain, folded_bias, output_nearest_frame
from adaptive_ddp_worker import SeparableImages, tiny_mlp

LOCK_STEP = 40


class Spy(TrainerCallback):
    """Registered after the adaptive callback: sees its anneal targets and each step's dense weights."""

    def __init__(self, callback: AdaptiveETFCallback) -> None:
        self.callback = callback
        self.targets: dict[str, dict] = {}
        self.distances: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        anneal = self.callback._anneal
        if anneal is not None:
            self.targets = anneal["targets"]
            self.distances.append(float(sum((model.get_submodule(name).weight.detach() - target["target"]).norm()
                                            for name, target in anneal["targets"].items())))


def train(tmp_path, steps: int = LOCK_STEP, **settings) -> tuple[Trainer, AdaptiveETFCallback, Spy]:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=16,
                             max_steps=steps, learning_rate=0.05, optim="sgd", optim_args="momentum=0.9",
                             logging_steps=5, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=tiny_mlp(), args=args, train_dataset=SeparableImages(320, seed=0, noise=6.0))
    settings.setdefault("min_steps_after_lock", 0)
    callback = AdaptiveETFCallback(SeparableImages(128, seed=1, noise=6.0), threshold=0.3, patience=1, every=20,
                                   **settings).attach(trainer)
    spy = Spy(callback)
    trainer.add_callback(spy)
    trainer.train()
    return trainer, callback, spy


def test_least_squares_gain_and_folded_bias_reproduce_an_exact_frame_layer():
    """If W = s F on the probe's span, the fit recovers s and leaves the bias; any other W gets the mean output."""
    generator = torch.Generator().manual_seed(0)
    frame = etf_hf.simplex_etf(6, 6, "orthogonal", seed=3).double()
    x = torch.randn(500, 6, generator=generator, dtype=torch.float64) + 2.0
    mean, covariance = x.mean(0), torch.cov(x.t(), correction=0)
    assert fit_gain(2.5 * frame, frame, covariance) == pytest.approx(2.5)
    weight = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(6, generator=generator, dtype=torch.float64)
    gain = fit_gain(weight, frame, covariance)
    new_bias = folded_bias(weight, bias, frame, gain, mean)
    assert torch.allclose((x @ weight.t() + bias).mean(0), (x @ (gain * frame).t() + new_bias).mean(0))
    # the output-nearest frame is at least as close on these inputs as the Frobenius-nearest one
    nearest = etf_hf.simplex_etf(6, 6, "nearest", weight=weight).double()
    fitted = output_nearest_frame(weight, covariance).double()
    error = lambda f: float(((x - mean) @ (weight - fit_gain(weight, f, covariance) * f).t()).norm())  # noqa: E731
    assert error(fitted) <= error(nearest) + 1e-9
    assert output_nearest_frame(torch.randn(3, 6, generator=generator), covariance) is None  # rows: no closed form


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    plain = train(tmp_path_factory.mktemp("plain"), LOCK_STEP, smooth=False)
    smooth = train(tmp_path_factory.mktemp("smooth"), LOCK_STEP)
    return plain, smooth


def test_smooth_lock_keeps_the_probe_loss_closer_than_a_plain_lock(runs):
    (_, plain, _), (trainer, smooth, _) = runs
    assert plain.lock_steps == smooth.lock_steps == {0: LOCK_STEP, 1: LOCK_STEP, 2: LOCK_STEP}
    [before_plain], [before_smooth] = plain.lock_losses, smooth.lock_losses
    assert before_plain["before"] == before_smooth["before"]  # the same run up to the lock
    before = before_plain["before"]
    plain_jump, smooth_jump = before_plain["after"] - before, before_smooth["after"] - before
    print(f"probe loss {before:.4f}: plain lock {before_plain['after']:.4f}, smooth {before_smooth['after']:.4f}")
    assert plain_jump > 0.1 * before, "the plain lock should visibly hurt here, or this test measures nothing"
    assert abs(smooth_jump) < 0.5 * plain_jump
    logged = [e for e in trainer.state.log_history if "etf/lock_loss_before" in e]
    assert [(e["etf/lock_loss_before"], e["etf/lock_loss_after"]) for e in logged] == [(before, before_smooth["after"])]


def test_batch_norm_is_refreshed_on_the_probe_after_a_smooth_lock_only(runs):
    """One probe batch (128 < batch_size): the refreshed running mean is that batch's mean of the BatchNorm's
    input in train mode, and the running variance its unbiased variance."""
    (plain_trainer, _, _), (trainer, callback, _) = runs
    model = trainer.model
    pixels = callback.probe.pixels
    inputs = {}
    hooks = [norm.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
             for name, norm in model.named_modules() if isinstance(norm, torch.nn.BatchNorm1d)]
    model.train()
    with torch.no_grad():
        model(pixel_values=pixels)
    for hook in hooks:
        hook.remove()
    # training went on for 0 steps after the lock (max_steps = LOCK_STEP): the stats are the refresh's
    for name, x in inputs.items():
        norm = model.get_submodule(name)
        assert torch.allclose(norm.running_mean, x.mean(0), atol=1e-5), name
        assert torch.allclose(norm.running_var, x.var(0, unbiased=True), rtol=1e-4, atol=1e-5), name
    plain_norm = plain_trainer.model.get_submodule(next(iter(inputs)))
    assert not torch.allclose(plain_norm.running_mean, model.get_submodule(next(iter(inputs))).running_mean)


def test_gradual_lock_reaches_exactly_the_frame_then_leaves_the_optimizer(tmp_path):
    anneal_steps = 6
    trainer, callback, spy = train(tmp_path, LOCK_STEP + anneal_steps + 4, anneal_steps=anneal_steps)
    assert callback.lock_steps == {0: LOCK_STEP + anneal_steps, 1: LOCK_STEP + anneal_steps, 2: LOCK_STEP + anneal_steps}
    assert callback.annealing == {} and callback._anneal is None
    # the weights approached their targets step by step, reaching them at the last step of the anneal
    # (seen at the check that started it and after each step but the last, which replaces the weights first)
    assert len(spy.distances) == anneal_steps
    start = spy.distances[0]
    for done, distance in enumerate(spy.distances):  # linear: (N - k) / N of the way left, give or take training
        assert distance == pytest.approx(start * (anneal_steps - done) / anneal_steps, rel=0.05), spy.distances
    model = trainer.model
    optimizer = unwrap_optimizer(trainer.optimizer)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, target in spy.targets.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, etf_hf.ETFLinear)
        assert torch.equal(layer.frame, target["frame"]), f"{name}: not the frame annealed onto"
        assert id(layer.frame_norm) in in_optimizer and not any(p.shape == (32, 32) for p in optimizer.state)
    assert all(p.shape != (32, 32) for group in optimizer.param_groups for p in group["params"])
    [lock] = callback.lock_losses
    assert lock["step"] == LOCK_STEP + anneal_steps and math.isfinite(lock["after"])


def test_gradual_lock_weight_equals_gain_times_frame_at_the_handover(tmp_path):
    """At the replacement the dense weight is exactly gain * frame, so the ETF layer computes the same function:
    the loss just after is the loss of the annealed dense model, not a jump."""
    trainer, callback, spy = train(tmp_path, LOCK_STEP + 3, anneal_steps=3)
    for name, target in spy.targets.items():
        layer = trainer.model.get_submodule(name)
        assert torch.equal(layer.weight.detach(), target["target"])
        assert float(layer.frame_norm.detach()) == pytest.approx(target["gain"], rel=1e-6)


def test_resume_in_the_middle_of_a_gradual_lock_is_refused_with_the_way_out():
    callback = AdaptiveETFCallback(anneal_steps=5)
    saved = {"args": {"anneal_steps": 5}, "attributes": {"counters": [2], "locked": [], "lock_steps": {}, "history": [],
                                                           "annealing": {"0": 2}}}
    with pytest.raises(ValueError, match="middle of a gradual lock.*before that lock began or after it completed"):
        callback._restore(saved, tiny_mlp())


def test_a_lock_with_no_training_left_after_it_does_not_fire_by_default(tmp_path, caplog):
    """The blocks qualify at the last check (step 40 of 40): with the default margin (one check interval, 20
    steps) nothing locks, the check is kept in ``late_locks`` and logged; the model ends with dense weights."""
    with caplog.at_level("WARNING", logger="etf_hf"):
        trainer, callback, _ = train(tmp_path, LOCK_STEP, min_steps_after_lock=None)
    assert callback.locked == [] and callback.lock_losses == [] and etf_hf.etf_layers(trainer.model) == []
    assert callback.late_locks == [{"blocks": [0, 1, 2], "step": LOCK_STEP}]
    assert "qualify at step 40, but their lock would complete with less than 20 steps of training left" in caplog.text


def test_a_gradual_lock_must_also_complete_a_check_interval_before_the_end(tmp_path):
    """Starting at step 40, a 6-step anneal ends at 46: with 60 steps in all that leaves 14 < 20 (one check
    interval) and it does not start (nor at the next check, step 60, the last); with 66 it leaves exactly 20
    and runs."""
    _, late, _ = train(tmp_path / "late", LOCK_STEP + 20, anneal_steps=6, min_steps_after_lock=None)
    assert late.locked == [] and late.late_locks == [{"blocks": [0, 1, 2], "step": step} for step in (40, 60)]
    _, timely, _ = train(tmp_path / "timely", LOCK_STEP + 26, anneal_steps=6, min_steps_after_lock=None)
    assert timely.lock_steps == {0: LOCK_STEP + 6, 1: LOCK_STEP + 6, 2: LOCK_STEP + 6} and timely.late_locks == []


class RandomState(TrainerCallback):
    """The global torch RNG state after each step (after the checks of callbacks registered before it)."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(torch.random.get_rng_state())


def test_checks_leave_the_global_random_state_alone_so_nothing_changes_before_a_lock(tmp_path):
    """Dropout draws from the global RNG: a check that advanced it would make a run with the callback differ
    from one without it before any lock (seen on MiniLM). Threshold 1: nothing ever locks here."""
    recorded = []
    for adaptive in (True, False):
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=6,
                                 per_device_train_batch_size=16, save_strategy="no", disable_tqdm=True, seed=0,
                                 dataloader_num_workers=0)
        trainer = Trainer(model=tiny_mlp(), args=args, train_dataset=SeparableImages(96, seed=0))
        if adaptive:
            callback = AdaptiveETFCallback(SeparableImages(64, seed=1), threshold=1.0, patience=1, every=2,
                                           batch_size=16).attach(trainer)
        spy = RandomState()
        trainer.add_callback(spy)
        trainer.train()
        recorded.append(spy.states)
    assert len(callback.history) == 3 and callback.locked == []
    assert all(torch.equal(a, b) for a, b in zip(*recorded)) and len(recorded[0]) == len(recorded[1]) == 6
