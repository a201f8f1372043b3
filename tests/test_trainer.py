"""Patched models under the real `transformers.Trainer`, on CPU.

What the core must survive in a training loop: weight decay and the optimizer never touching a frame,
checkpoints that omit regenerable frames yet resume exactly, activation checkpointing (which replays the
ETF forward during backward) and bf16 autocast (which the ETF autograd function handles by hand).
Data: the real tasks from ../shared/data when present, generated look-alikes otherwise (tests/task_data.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import etf_hf
import task_data
from tiny_models import tiny_bert, tiny_gpt2, tiny_vit

BATCH = 16
#: transformers renamed gradient checkpointing to activation checkpointing (old names warn, removal in v6);
#: use the new names where this transformers has them, the old ones on older releases of the tested range.
NEW_CHECKPOINTING_NAMES = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
CHECKPOINTING_ARG = "activation_checkpointing" if NEW_CHECKPOINTING_NAMES else "gradient_checkpointing"


def enable_checkpointing(model: nn.Module) -> None:
    getattr(model, "activation_checkpointing_enable" if NEW_CHECKPOINTING_NAMES else "gradient_checkpointing_enable")()


def is_checkpointing(model: nn.Module) -> bool:
    return getattr(model, "is_activation_checkpointing" if NEW_CHECKPOINTING_NAMES else "is_gradient_checkpointing")



def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    """CPU Trainer settings shared by every test: a loss logged each step, no saving unless asked."""
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", per_device_train_batch_size=BATCH,
                    per_device_eval_batch_size=64, max_steps=40, learning_rate=3e-3, weight_decay=0.1,
                    logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def frames(model: nn.Module) -> dict[str, torch.Tensor]:
    return {path: layer.frame.detach().clone() for path, layer in etf_hf.etf_layers(model)}


def gains(model: nn.Module) -> dict[str, torch.Tensor]:
    return {path: layer.frame_norm.detach().clone() for path, layer in etf_hf.etf_layers(model)}


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_loss_decreased(trainer: Trainer, eval_before: float, eval_after: float, window: int = 5) -> None:
    """Both signals must improve: the held-out loss, and the mean of the last vs the first logged losses."""
    losses = logged_losses(trainer)
    assert len(losses) >= 2 * window, losses
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < first, f"training loss did not decrease: first {losses[:window]}, last {losses[-window:]}"
    assert eval_after < eval_before, f"eval loss did not decrease: {eval_before} -> {eval_after}"


def assert_frames_fixed(model: nn.Module, before: dict[str, torch.Tensor], gains_before: dict[str, torch.Tensor]) -> None:
    """Every frame bit-identical and frozen, while the trainable gains did move (so training happened)."""
    after = frames(model)
    assert after.keys() == before.keys() and before
    for path in before:
        assert torch.equal(before[path], after[path]), f"{path}.frame changed during training"
    assert not any(layer.frame.requires_grad for _, layer in etf_hf.etf_layers(model))
    moved = [p for p, g in gains(model).items() if not torch.equal(g, gains_before[p])]
    assert moved, "no ETF gain changed: the frame check above would be vacuous"


def assert_optimizer_sees_no_frame(trainer: Trainer) -> None:
    """The frame is not an optimizer parameter; the gain is, in a weight-decay-free group (named *_norm)."""
    groups = trainer.optimizer.param_groups
    optimized = {id(p) for group in groups for p in group["params"]}
    no_decay = {id(p) for group in groups if group["weight_decay"] == 0.0 for p in group["params"]}
    assert any(group["weight_decay"] == 0.1 for group in groups), "weight decay was not applied at all"
    for path, layer in etf_hf.etf_layers(trainer.model):
        assert id(layer.frame) not in optimized, f"{path}.frame is an optimizer parameter"
        assert layer.frame.data_ptr() not in {p.data_ptr() for g in groups for p in g["params"]}
        assert id(layer.frame_norm) in no_decay, f"{path}.frame_norm is weight-decayed towards 0"
        assert id(layer.bias) in optimized


def gpt2_task(num_blocks: int = 256):
    train, vocab_size = task_data.char_lm_dataset(num_blocks=num_blocks, block_size=32)
    held_out, _ = task_data.char_lm_dataset(num_blocks=32, block_size=32, offset_blocks=num_blocks)
    return tiny_gpt2(vocab_size=vocab_size), train, held_out


def bert_task():
    train, vocab = task_data.trec6_dataset(limit=640, split="train")
    held_out, _ = task_data.trec6_dataset(limit=128, split="test", vocab=vocab)
    return tiny_bert(num_labels=len(task_data.TREC6_LABELS)), train, held_out


def vit_task():
    train = task_data.fashion_mnist_dataset(limit=640, split="train")
    held_out = task_data.fashion_mnist_dataset(limit=128, split="test")
    return tiny_vit(num_labels=task_data.FASHION_CLASSES), train, held_out


#: task -> (model and data builder, learning rate). The tiny BERT's [CLS] classifier needs a larger step
#: than the others to move visibly within 40 steps (at 1e-3 its synthetic-data loss stays flat).
TASKS = {"gpt2-shakespeare": (gpt2_task, 3e-3), "bert-trec6": (bert_task, 5e-3), "vit-fashion-mnist": (vit_task, 3e-3)}


def test_synthetic_data_has_the_real_data_shapes(shared_data):
    """A fresh clone trains on generated data: it must have the same fields, shapes and dtypes as the real data,
    or the Trainer tests would exercise something else there than here. Needs the real data (../shared/data),
    else it would compare the generated data with itself."""
    lm_fake, vocab_fake = task_data.char_lm_dataset(num_blocks=4, block_size=32, synthetic=True)
    trec_fake, _ = task_data.trec6_dataset(limit=12, synthetic=True)
    img_fake = task_data.fashion_mnist_dataset(limit=12, synthetic=True)
    assert {lm_fake.source, trec_fake.source, img_fake.source} == {"synthetic"}
    assert 2 < vocab_fake <= 96  # fits tiny_gpt2's default vocabulary
    assert {int(x["labels"]) for x in trec_fake} == set(range(len(task_data.TREC6_LABELS)))
    assert {int(x["labels"]) for x in img_fake} <= set(range(task_data.FASHION_CLASSES))
    real_lm, _ = task_data.char_lm_dataset(num_blocks=4, block_size=32)
    real_trec, _ = task_data.trec6_dataset(limit=12)
    real_img = task_data.fashion_mnist_dataset(limit=12)
    assert "synthetic" not in {real_lm.source, real_trec.source, real_img.source}
    for fake, real in ((lm_fake, real_lm), (trec_fake, real_trec), (img_fake, real_img)):
        assert fake[0].keys() == real[0].keys()
        for key in fake[0]:
            assert fake[0][key].shape == real[0][key].shape and fake[0][key].dtype == real[0][key].dtype, key
    images, labels, _ = task_data.fashion_mnist_arrays(limit=12, synthetic=True)
    assert images.shape == (12, 28, 28) and str(images.dtype) == "uint8" and str(labels.dtype) == "int64"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_trainer_trains_patched_model_with_frames_fixed(task, tmp_path):
    """The headline guarantee: a patched model trains under Trainer with weight decay, and no frame moves by a bit.

    Weight decay is the realistic threat (AdamW's decoupled decay would shrink any tensor it is handed even
    with a zero gradient), so the frame must not be handed to the optimizer at all.
    """
    build, learning_rate = TASKS[task]
    model, train, held_out = build()
    etf_hf.patch(model, etf_hf.ETFConfig(layers="all", projections="both"))
    frames_before, gains_before = frames(model), gains(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, learning_rate=learning_rate),
                      train_dataset=train, eval_dataset=held_out)
    eval_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    eval_after = trainer.evaluate()["eval_loss"]
    assert trainer.state.global_step == 40
    assert_loss_decreased(trainer, eval_before, eval_after)
    assert_frames_fixed(trainer.model, frames_before, gains_before)
    assert_optimizer_sees_no_frame(trainer)


# ---------------------------------------------------------------- checkpoints and resume

RESUME_STEPS, RESUME_AT = 12, 6


def _patched_gpt2_for_resume(init_seed: int) -> tuple[nn.Module, torch.utils.data.Dataset]:
    torch.manual_seed(init_seed)
    model, train, _ = gpt2_task(num_blocks=160)
    return etf_hf.patch(model, etf_hf.ETFConfig(layers="all", projections="both", basis="orthogonal")), train


def _resume_args(output_dir: Path) -> TrainingArguments:
    # 160 blocks / 16 = 10 batches per epoch: the run crosses an epoch boundary after the resume point,
    # and dropout stays on, so the resumed run must restore the sampler position and the RNG states too.
    return training_args(output_dir, max_steps=RESUME_STEPS, save_strategy="steps", save_steps=RESUME_AT,
                         learning_rate=1e-3)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """One uninterrupted run that saves checkpoint-6 and checkpoint-12 (shared by the resume and reload tests)."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    model, train = _patched_gpt2_for_resume(init_seed=0)
    trainer = Trainer(model=model, args=_resume_args(output_dir), train_dataset=train)
    trainer.train()
    return trainer, output_dir


def test_resume_from_checkpoint_matches_uninterrupted_run(uninterrupted_run, tmp_path):
    """Checkpoints omit regenerable frames; a fresh patched model resumed from one must end bit-identical.

    Bit-identical (torch.equal), not allclose: on CPU in float32, with the same thread count, both runs
    execute the same kernels on the same data in the same order (Trainer restores model, optimizer,
    scheduler, sampler and RNG states exactly), so any difference at all means something was not restored,
    e.g. a frame regenerated wrongly.
    """
    reference, reference_dir = uninterrupted_run
    checkpoint = reference_dir / f"checkpoint-{RESUME_AT}"
    assert checkpoint.is_dir()
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as stored:
        assert not any(key.endswith(".frame") for key in stored.keys()), "regenerable frames were saved"
        assert any(key.endswith(".frame_norm") for key in stored.keys())

    # A different init: every trained value must come from the checkpoint, every frame from the ETF recipe.
    model, train = _patched_gpt2_for_resume(init_seed=123)
    resumed = Trainer(model=model, args=_resume_args(tmp_path), train_dataset=train)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == reference.state.global_step == RESUME_STEPS
    expected = dict(reference.model.named_parameters()) | dict(reference.model.named_buffers())
    actual = dict(resumed.model.named_parameters()) | dict(resumed.model.named_buffers())
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    # The resumed state carries the first RESUME_AT log entries over from the checkpoint's trainer_state.json.
    assert logged_losses(resumed) == logged_losses(reference)


def test_trainer_checkpoint_reloads_with_auto_class(uninterrupted_run):
    """A Trainer checkpoint is a normal save_pretrained directory: AutoModelForCausalLM rebuilds the ETF class,
    regenerates the frames, and gives the trained model's logits exactly."""
    trainer, output_dir = uninterrupted_run
    trained = trainer.model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(output_dir / f"checkpoint-{RESUME_STEPS}").eval()
    assert type(reloaded) is type(trained) and reloaded.config.model_type == "etf_gpt2"
    for (path, layer), (_, original) in zip(etf_hf.etf_layers(reloaded), etf_hf.etf_layers(trained), strict=True):
        assert torch.equal(layer.frame, original.frame), path
        assert torch.equal(layer.frame_norm, original.frame_norm), path
    tokens = torch.stack([trainer.train_dataset[i]["input_ids"] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, trained(tokens).logits)


# ---------------------------------------------------------------- activation checkpointing

def _count_etf_calls(model: nn.Module) -> list[int]:
    """Count ETF forward calls. A *pre*-hook, because non-reentrant checkpointing stops the replay as soon as
    the last saved tensor is recomputed, i.e. inside the block's final ETF forward, before any post-hook."""
    calls = [0]

    def hook(module, inputs):
        calls[0] += 1

    for _, layer in etf_hf.etf_layers(model):
        layer.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize("in_features,out_features", [(8, 32), (32, 8)], ids=["up", "down"])
def test_etf_linear_backward_inside_non_reentrant_checkpoint(in_features, out_features):
    """The minimal form of the model-level test below. transformers checkpoints with use_reentrant=False,
    under which each saved tensor may be unpacked once per backward, so the ETF autograd function must read
    ctx.saved_tensors a single time. Both orientations: they save different activations (x vs pre-gain)."""
    layer = etf_hf.ETFLinear(in_features, out_features, basis="orthogonal", seed=0, gain=1.3)
    x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (layer(x) ** 2).sum().backward()
    expected = [x.grad.clone(), layer.frame_norm.grad.clone(), layer.bias.grad.clone()]
    x.grad = layer.frame_norm.grad = layer.bias.grad = None
    (checkpoint(layer, x, use_reentrant=False) ** 2).sum().backward()
    for name, want, got in zip(("x", "frame_norm", "bias"), expected, [x.grad, layer.frame_norm.grad, layer.bias.grad]):
        assert torch.equal(got, want), name


def test_gradient_checkpointing_gives_the_same_gradients():
    """Activation checkpointing replays the ETF forward inside backward; gradients must not change.

    One backward pass of two identical patched GPT-2s, one with gradient checkpointing. Dropout is zeroed
    so the comparison does not depend on the RNG replay. Compared with torch.equal: the recomputed forward runs
    the same CPU kernels on the same inputs, so the saved tensors and hence the gradients are the same bits.
    """
    torch.manual_seed(0)
    plain, train, _ = gpt2_task(num_blocks=8)
    etf_hf.patch(plain, etf_hf.ETFConfig())
    for module in plain.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    checkpointed = tiny_gpt2(vocab_size=plain.config.vocab_size)
    etf_hf.patch(checkpointed, etf_hf.ETFConfig())
    checkpointed.load_state_dict(plain.state_dict())
    for module in checkpointed.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    enable_checkpointing(checkpointed)
    assert is_checkpointing(checkpointed) and not is_checkpointing(plain)
    calls_plain, calls_checkpointed = _count_etf_calls(plain), _count_etf_calls(checkpointed)

    tokens = torch.stack([train[i]["input_ids"] for i in range(4)])
    for model in (plain, checkpointed):
        model.train()
        model(tokens, labels=tokens).loss.backward()
    assert calls_checkpointed[0] == 2 * calls_plain[0], "the ETF layers were not recomputed: checkpointing inactive"
    grads_plain = {n: p.grad for n, p in plain.named_parameters()}
    grads_checkpointed = {n: p.grad for n, p in checkpointed.named_parameters()}
    etf_gain_grads = [n for n in grads_plain if n.endswith("frame_norm")]
    assert etf_gain_grads and all(grads_plain[n] is not None and grads_plain[n] != 0 for n in etf_gain_grads)
    for name, grad in grads_plain.items():
        assert grad is not None and grads_checkpointed[name] is not None, name
        assert torch.equal(grad, grads_checkpointed[name]), f"gradient of {name} differs under checkpointing"


def test_trainer_with_gradient_checkpointing_trains_patched_gpt2(tmp_path):
    """`gradient_checkpointing=True` (``activation_checkpointing`` since transformers 5.2x) in TrainingArguments:
    Trainer enables it on the ETF model class, and the model trains with frames fixed."""
    model, train, held_out = gpt2_task()
    etf_hf.patch(model, etf_hf.ETFConfig())
    frames_before, gains_before = frames(model), gains(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=30, **{CHECKPOINTING_ARG: True}),
                      train_dataset=train, eval_dataset=held_out)
    eval_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert is_checkpointing(trainer.model)
    assert_loss_decreased(trainer, eval_before, trainer.evaluate()["eval_loss"])
    assert_frames_fixed(trainer.model, frames_before, gains_before)


# ---------------------------------------------------------------- bf16 autocast

def _record_etf_output_dtypes(model: nn.Module) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    for _, layer in etf_hf.etf_layers(model):
        layer.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    return seen


def test_trainer_bf16_on_cpu_trains_patched_model(tmp_path):
    """`bf16=True` on CPU makes Trainer run the forward under torch.autocast(cpu, bfloat16): the ETF layers must
    compute in bf16 there, train, and leave the float32 frames untouched (autocast never casts buffers in place)."""
    model, train, held_out = gpt2_task()
    etf_hf.patch(model, etf_hf.ETFConfig())
    frames_before, gains_before = frames(model), gains(model)
    output_dtypes = _record_etf_output_dtypes(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, bf16=True, max_steps=30),
                      train_dataset=train, eval_dataset=held_out)
    eval_before = trainer.evaluate()["eval_loss"]
    output_dtypes.clear()
    trainer.train()
    assert output_dtypes == {torch.bfloat16}, f"ETF layers did not run under bf16 autocast: {output_dtypes}"
    assert_loss_decreased(trainer, eval_before, trainer.evaluate()["eval_loss"])
    assert_frames_fixed(trainer.model, frames_before, gains_before)
    for _, layer in etf_hf.etf_layers(trainer.model):
        assert layer.frame.dtype == layer.frame_norm.dtype == torch.float32


def test_bf16_autocast_forward_backward_matches_float32():
    """Direct `torch.autocast("cpu", bfloat16)`: ETF outputs are bf16 and close to float32, gradients land in
    float32 parameters and point the same way as the float32 gradients.

    Tolerances are bf16's: 8 mantissa bits give a relative rounding of 2**-8 per operand, accumulated over
    32- to 128-wide dot products, so logits agree to ~1e-2 and gradients by direction (cosine) and size.
    """
    torch.manual_seed(0)
    model, train, _ = gpt2_task(num_blocks=8)
    etf_hf.patch(model, etf_hf.ETFConfig())
    model.eval()  # no dropout: both passes see the same network
    tokens = torch.stack([train[i]["input_ids"] for i in range(4)])

    loss32 = model(tokens, labels=tokens).loss
    logits32 = model(tokens).logits.detach()
    loss32.backward()
    grads32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    output_dtypes = _record_etf_output_dtypes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(tokens, labels=tokens)
    assert output_dtypes == {torch.bfloat16}
    assert out16.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out16.logits.float(), logits32, atol=1e-2, rtol=2e-2)
    assert abs(out16.loss.item() - loss32.item()) < 1e-2 * loss32.item()
    out16.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
    layers = etf_hf.etf_layers(model)
    assert all(layer.frame.grad is None and layer.frame.dtype == torch.float32 for _, layer in layers)
    # A single gain's gradient is a sum over the whole batch and can nearly cancel, so compare all gains as one
    # vector: same direction, same size. Bias gradients are compared per layer.
    gains16 = torch.stack([layer.frame_norm.grad.reshape(()) for _, layer in layers])
    gains32 = torch.stack([grads32[f"{path}.frame_norm"].reshape(()) for path, _ in layers])
    assert torch.nn.functional.cosine_similarity(gains16, gains32, dim=0) > 0.99, (gains16, gains32)
    assert abs(gains16.norm() / gains32.norm() - 1) < 0.05, (gains16, gains32)
    for path, layer in layers:
        cosine = torch.nn.functional.cosine_similarity(layer.bias.grad, grads32[f"{path}.bias"], dim=0)
        assert cosine > 0.99, (path, cosine)
