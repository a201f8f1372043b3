"""Benchmark harness: the cost of one training step, and of inference, per way of treating the feed-forward
projections.

``python -m etf_hf.app.bench --family gpt2 --size large --batch 2 --seq 512 --dtype bf16`` builds the model
from a config (no downloads, random inputs) once per *mode*, and times one training step (forward,
backward, AdamW step, zero_grad) after warm-up:

==========================  ==================================================================================
``full``                    every weight trainable (the baseline of the ratios)
``frozen``                  the FFN projection weights ``requires_grad=False``; their biases stay trainable
``lora``                    PEFT LoRA r=8 on the attention projections, everything else frozen (classifier
                            heads trainable); skipped with a note when ``peft`` is not installed
``etf-<basis>``             ``etf_hf.patch(model, ETFConfig(basis=<basis>))``: ``orthogonal``, ``canonical``,
                            ``nearest`` hold a dense frame; ``structured`` applies its frame matrix-free
``etf-structured-dense``    the structured frame materialised once into a dense buffer and applied like the
                            dense bases (separates "which frame" from "matrix-free vs one GEMM")
``etf-structured-saved``    ``etf-structured`` with ``ETFConfig(recompute=False)``: the fused FFN saves the
                            up-projection's output instead of recomputing it in backward (time for memory)
``ffn-activation-only``     each FFN computes only its activation, on its up-projection's bias broadcast to
                            the full hidden width, and hands the first model-width units on: what every
                            fixed-frame FFN still pays, frames aside (`etf_hf.app.bounds`)
``ffn-free``                every FFN projection returns only its bias, broadcast to the output shape: no
                            activation at all, the loosest bound (`etf_hf.app.bounds`)
``dense:KEY=VALUE[:...]``   ``full`` on the model built with config fields overridden (``dense:n_inner=512``,
                            ``dense:n_layer=2``): dense baselines of other sizes, for iso-cost matching
==========================  ==================================================================================

``full``, ``frozen``, ``lora`` and the ETF modes are `etf_hf.app.treatments` modes, applied by the same
`treatments.apply_mode` that ``etf-hf train`` uses; the rest are bench-only. Every mode starts from the same
seeded initial weights, and the projections of ``frozen``, the ETF modes and the two bounds are exactly the
slots `etf_hf.architectures.find_slots` returns for the default `ETFConfig`. Per mode it reports trainable
parameters (`etf_hf.parameter_summary`), the median step time, tokens per second, the peak memory (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set, see `MemoryMeter`, and the peak
of live tensors, `tensor_peak_bytes`), the bytes
autograd saves for backward (`saved_activation_bytes`, exact), the size of the ``save_pretrained``
safetensors, and the ratios to ``full`` and to both bounds.

``--inference`` times forward passes instead (no gradients) and, for GPT-2, ``generate()`` with the KV cache
at each ``--gen-batches`` size; ``--profile FILE`` writes torch.profiler's top ops per mode. Output: a
markdown table (stdout, ``--markdown``) and JSON (``--json``, the rows another tool reads).

Timings are not asserted anywhere in the test suite: performance goals live in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..architectures import REGISTRY, Bench, architecture_for
from ..config import ETFConfig
from ..etf import BASES
from ..injection import etf_layers, parameter_summary
from . import treatments
from .bounds import ACTIVATION_ONLY, BOUNDS, FFN_FREE, replace_ffn
from .recipe import ConfigError

#: Families with a benchmark entry in their architecture record (`etf_hf.architectures.Bench`).
FAMILIES = tuple(t for a in REGISTRY if a.bench is not None for t in a.model_types)
SIZES = ("tiny", "small", "large")
#: ``dense:KEY=VALUE[:KEY=VALUE...]``: the full model with its config fields overridden.
DENSE_PREFIX = "dense:"
#: Every fixed mode name the harness accepts (``dense:...`` modes besides), in the order tables list them.
MODES = ("full", "frozen", "lora", *(f"etf-{basis}" for basis in BASES), "etf-structured-dense",
         "etf-structured-saved", ACTIVATION_ONLY, FFN_FREE)
DEFAULT_MODES = ("full", "frozen", "lora", "etf-orthogonal", "etf-structured", "etf-canonical", ACTIVATION_ONLY,
                 FFN_FREE)
#: ``--inference`` without ``--modes``: training-only treatments (frozen, LoRA) compute what ``full`` does.
INFERENCE_MODES = ("full", "etf-orthogonal", "etf-structured", ACTIVATION_ONLY, FFN_FREE)
#: Families whose benchmark model can ``generate()`` (the others are classifiers), from their records.
GENERATIVE = tuple(t for a in REGISTRY if a.bench is not None and a.bench.generates for t in a.model_types)


class BenchError(ValueError):
    """A problem with the benchmark's arguments; `main` prints it as one line and returns 2."""


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def _bench(family: str) -> Bench:
    """The benchmark entry of ``family``'s architecture record (presets, model class, inputs)."""
    architecture = architecture_for(family)
    if family not in FAMILIES or architecture is None or architecture.bench is None:
        raise BenchError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    return architecture.bench


def model_config(family: str, size: str, overrides: dict[str, Any] | None = None, where: str = "--modes") -> Any:
    """The transformers config for ``family`` at ``size`` (a preset name of its record's `Bench`, or a JSON
    object of config kwargs), with ``overrides`` (a ``dense:`` mode's fields) on top."""
    bench = _bench(family)
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(family))
    if size in bench.presets:
        kwargs = dict(bench.presets[size])
    else:
        try:
            kwargs = json.loads(size)
        except json.JSONDecodeError:
            raise BenchError(f"unknown size {size!r}: choose one of {', '.join(bench.presets)} or give a JSON object "
                             f"of {config_class.__name__} kwargs, e.g. '{{\"num_hidden_layers\": 4}}'") from None
        if not isinstance(kwargs, dict):
            raise BenchError(f"--size JSON must be an object of {config_class.__name__} kwargs, got {size!r}")
    config = config_class(**kwargs)
    if not overrides:
        return config
    try:
        return treatments.override_config(config, overrides, where)
    except ConfigError as error:
        raise BenchError(str(error)) from None


def build_model(family: str, config: Any) -> nn.Module:
    import transformers

    return getattr(transformers, _bench(family).model_class)(config)


def tokens_per_example(family: str, config: Any, seq: int) -> int:
    return _bench(family).tokens(config, seq)


def make_batch(family: str, config: Any, batch: int, seq: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs and labels of the right shapes (the values do not matter for timing)."""
    bench = _bench(family)
    limit = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions too; absent for images
    if limit is not None and seq > limit:
        raise BenchError(f"--seq {seq} exceeds this {family} config's {limit} positions")
    inputs = bench.inputs(config, batch, seq, torch.Generator().manual_seed(seed))
    return {key: value.to(device) for key, value in inputs.items()}


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------

def _densify_structured(model: nn.Module) -> None:
    """Benchmark-only: give each structured ETF layer its materialised frame and the dense forward."""
    from ..layers import _FixedFrameLinear

    def dense_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _FixedFrameLinear.apply(x, layer._buffers["frame"], layer.frame_norm, layer.bias)

    for _, layer in etf_layers(model):
        frame = layer.frame.detach().to(dtype=layer.frame_norm.dtype).contiguous()  # materialises (out, in)
        layer._buffers["frame"] = frame          # `ETFLinear.frame` returns this buffer from now on
        layer._non_persistent_buffers_set.add("frame")  # never in checkpoints, like the plan
        layer.forward = types.MethodType(dense_forward, layer)


def lora_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def treatment(mode: str, family: str) -> treatments.ModeSpec:
    """The `etf_hf.app.treatments` mode behind a bench mode (``etf-structured-dense``: the structured ETF,
    densified afterwards; ``full``, ``dense:`` and the bounds: no treatment)."""
    if mode == "frozen":
        default = ETFConfig()
        return treatments.ModeSpec(mode, frozen={key: getattr(default, key) for key in treatments.SELECTION_KEYS})
    if mode == "lora":
        # the classifiers of BERT and ViT start random, so LoRA trains them, as `etf-hf train` does
        return treatments.ModeSpec(mode, lora=treatments.lora_settings(family, has_labels=family not in GENERATIVE))
    if mode == "etf-structured-saved":
        return treatments.ModeSpec(mode, etf=ETFConfig(basis="structured", recompute=False))
    if mode.startswith("etf-"):
        return treatments.ModeSpec(mode, etf=ETFConfig(basis=mode.removeprefix("etf-").removesuffix("-dense")))
    return treatments.ModeSpec(mode)


def apply_mode(model: nn.Module, mode: str, family: str) -> nn.Module:
    """Turn a fresh model into ``mode``'s model (may return a wrapper, for LoRA)."""
    if mode in BOUNDS:
        replace_ffn(model, mode)
        return model
    model = treatments.apply_mode(model, treatment(mode, family))
    if mode == "etf-structured-dense":
        _densify_structured(model)
    return model


def dense_overrides(mode: str) -> dict[str, Any]:
    """``dense:n_layer=2:n_inner=512`` -> ``{"n_layer": 2, "n_inner": 512}``. Values are read as JSON
    (``512``, ``null``, ``true``) and otherwise kept as text (``activation_function=relu``)."""
    overrides: dict[str, Any] = {}
    for item in mode.removeprefix(DENSE_PREFIX).split(":"):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise BenchError(f"mode {mode!r}: {item!r} is not KEY=VALUE; write config fields like "
                             f"dense:n_inner=512 or dense:n_layer=2:n_inner=1024")
        if key in overrides:
            raise BenchError(f"mode {mode!r} sets {key!r} twice")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def parse_modes(text: str, family: str, size: str) -> list[str]:
    """The modes of ``--modes``; ``dense:`` modes are checked against the family's config class (``size``'s)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise BenchError("--modes is empty: give a comma-separated list, e.g. full,etf-structured,ffn-free")
    for mode in modes:
        if mode.startswith(DENSE_PREFIX):
            config = model_config(family, size, dense_overrides(mode), f"mode {mode!r}")  # unknown fields: named
            try:
                with torch.device("meta"):  # structure only: catches e.g. a width the heads do not divide
                    build_model(family, config)
            except (ValueError, TypeError) as error:
                raise BenchError(f"mode {mode!r}: the {family} model cannot be built with these fields: {error}") from None
            continue
        if mode not in MODES:
            hint = ""
            if mode.startswith("etf-") and mode.endswith("-dense"):
                hint = " (only the structured basis has a matrix-free form, so only etf-structured-dense exists)"
            raise BenchError(f"unknown mode {mode!r}{hint}: choose from {', '.join(MODES)}, "
                             f"or {DENSE_PREFIX}KEY=VALUE[:KEY=VALUE...] for a dense model with other config fields")
    duplicates = sorted({m for m in modes if modes.count(m) > 1})
    if duplicates:
        raise BenchError(f"--modes lists {', '.join(duplicates)} more than once")
    return modes


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_host_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS reflects live memory


class MemoryMeter:
    """Peak memory of one mode over its timed steps (everything resident counts: weights, optimizer
    state, activations, gradients; compilation and other one-off warm-up costs do not).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, so the
    model's weights, optimizer state and activations, not the caching allocator's slack).
    CPU on Linux: the peak resident set (``VmHWM``), reset per mode through ``/proc/self/clear_refs``,
    minus the resident set measured before the model was built, so the interpreter and imported
    libraries are not counted. Where the reset is not possible, ``ru_maxrss`` is the peak of the whole
    process so far (``kind`` says so; run with ``--isolate`` for a per-mode number).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.kind = ""

    def before_build(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
            return
        _release_host_memory()
        rss = _proc_status_kib("VmRSS")
        self.baseline = 0 if rss is None else rss * 1024

    def reset_peak(self) -> None:
        """Called after the warm-up steps: what is resident then (weights, gradients' absence, optimizer
        state) stays counted, and the timed steps add their activations and gradients on top."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_host_memory()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self.kind = "peak RSS minus pre-build RSS (VmHWM reset per mode)"
        except OSError:
            self.kind = "process-wide peak RSS (ru_maxrss, not resettable here) minus pre-build RSS"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status_kib("VmHWM") if self.kind.endswith("per mode)") else None
        if hwm is not None:
            peak = hwm * 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        return max(0, peak - self.baseline)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: str) -> Callable[[], Any]:
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def checkpoint_bytes(model: nn.Module) -> int:
    """Total bytes of the ``*.safetensors`` files ``save_pretrained`` writes (for LoRA: the adapter)."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" would clutter the benchmark's output
    try:
        with tempfile.TemporaryDirectory(prefix="etf_bench_ckpt_") as folder:
            model.save_pretrained(folder)
            return sum(path.stat().st_size for path in Path(folder).rglob("*.safetensors"))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@dataclass
class Settings:
    family: str
    size: str
    batch: int
    seq: int
    steps: int
    warmup: int
    dtype: str          # resolved: fp32 or bf16
    device: str
    compile: bool = False
    seed: int = 0
    lr: float = 1e-4
    checkpoint: bool = True
    profile: bool = False         # torch.profiler tables per mode (``--profile FILE``)
    profile_steps: int = 3
    inference: bool = False       # forward passes and generate() instead of training steps
    new_tokens: int = 128
    prompt: int = 32
    gen_batches: tuple[int, ...] = (1, 8)
    gen_repeats: int = 3


_PRIMED: set[tuple[str, str, str]] = set()


def prime_runtime(settings: Settings) -> None:
    """One untimed step of a tiny model of the same family, once per process, device and dtype.

    The first training step of a process pays one-off costs (thread pools, allocator arenas, kernel
    selection) that would otherwise land in whichever mode happens to run first, mostly in its peak memory.
    """
    key = (settings.family, settings.device, settings.dtype)
    if key in _PRIMED:
        return
    device = torch.device(settings.device)
    config = model_config(settings.family, "tiny")
    with torch.device(device):
        model = build_model(settings.family, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    batch = make_batch(settings.family, config, 2, 8, device, settings.seed)
    with autocast_context(device, settings.dtype)():
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    del model, optimizer, batch, loss
    _PRIMED.add(key)


def build_mode(settings: Settings, mode: str, device: torch.device) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A fresh model from the seeded initial weights, treated as ``mode``; its config; and the row's
    parameter counts. ``trainable_pct`` is of the ``--size`` model's parameter count, for ``dense:`` modes too,
    so that rows of different sizes compare."""
    overrides = dense_overrides(mode) if mode.startswith(DENSE_PREFIX) else {}
    config = model_config(settings.family, settings.size, overrides)
    torch.manual_seed(settings.seed)
    with torch.device(device):
        base = build_model(settings.family, config)
    base_total = sum(p.numel() for p in base.parameters())
    reference_total = _parameter_count(settings) if overrides else base_total
    model = apply_mode(base, mode, settings.family)
    params = parameter_summary(model)
    row: dict[str, Any] = {
        "mode": mode,
        "trainable": params["trainable"],
        "total": params["total"],
        "base_total": base_total,
        "reference_total": reference_total,
        "trainable_pct": 100.0 * params["trainable"] / reference_total,
        "etf_fixed": params["etf_fixed"],
    }
    if overrides:
        row["config_overrides"] = overrides
    return model, config, row


def _parameter_count(settings: Settings) -> int:
    with torch.device("meta"):  # structure only, no memory
        model = build_model(settings.family, model_config(settings.family, settings.size))
    return sum(p.numel() for p in model.parameters())


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor], autocast: Callable[[], Any]) -> int:
    """Bytes autograd keeps for backward after one eager forward of ``batch``, parameters and buffers not
    counted: the activation memory of a training step, measured exactly rather than read off an allocator,
    so it is the same on every machine and run. Only what the loss's graph still holds at the end of the
    forward counts (each storage once): tensors saved by ops whose results nothing uses are freed with them."""
    persistent = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    packed: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        packed.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast():
        loss = model(**batch).loss
    saved: dict[int, int] = {}
    for reference in packed:
        tensor = reference()
        if tensor is not None and tensor.untyped_storage().data_ptr() not in persistent:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    del loss  # frees the graph and everything it saved
    return sum(saved.values())


def tensor_peak_bytes(run: Callable[[], Any], device: torch.device) -> int | None:
    """The most bytes that tensors held at once during one call of ``run`` on a CPU ``device`` (weights,
    gradients and optimizer state it touches included), from the allocations torch.profiler records:
    exact and the same in every run, where the resident set also counts what the C allocator keeps of
    freed blocks (it moved by ±5 % between runs of the same mode). The CPU counterpart of what CUDA's
    ``max_memory_allocated`` measures. None on CUDA (`MemoryMeter` measures tensors there already) or when
    this torch's profiler cannot build the memory timeline (``export_memory_timeline``, deprecated)."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as profiler:
        run()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = os.path.join(folder, "timeline.json")
        try:
            profiler.export_memory_timeline(path, device="cpu")
        except (AttributeError, NotImplementedError, RuntimeError, ValueError):
            return None
        with open(path) as handle:
            _, sizes = json.load(handle)  # per time point, the live bytes of each category
    return max((sum(point) for point in sizes), default=0)


def _fresh_mode(settings: Settings, mode: str) -> tuple[torch.device, MemoryMeter, float, tuple]:
    """The start every measured mode shares: runtime primed, memory baseline taken, then the mode's model
    built; returns (device, meter, build start time, build_mode's (model, config, row))."""
    device = torch.device(settings.device)
    prime_runtime(settings)
    if settings.compile:
        # A fresh compile per mode: the modes differ in module structure, and past dynamo's recompile
        # limit a later mode would silently run eager.
        torch._dynamo.reset()
    meter = MemoryMeter(device)
    meter.before_build()
    started = time.perf_counter()
    return device, meter, started, build_mode(settings, mode, device)


def run_mode(settings: Settings, mode: str) -> dict[str, Any]:
    """Build a fresh model, apply ``mode``, train ``warmup + steps`` steps; return the mode's measurements."""
    device, meter, started, (model, config, row) = _fresh_mode(settings, mode)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    batch = make_batch(settings.family, config, settings.batch, settings.seq, device, settings.seed)
    forward = torch.compile(model) if settings.compile else model
    autocast = autocast_context(device, settings.dtype)
    saved = saved_activation_bytes(model, batch, autocast)

    def step() -> float:
        _synchronize(device)
        begin = time.perf_counter()
        with autocast():
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        return time.perf_counter() - begin

    setup_s = time.perf_counter() - started
    warmup_s = [step() for _ in range(settings.warmup)]
    meter.reset_peak()  # steady state: compilation and one-off first-step buffers are not counted
    times = [step() for _ in range(settings.steps)]
    peak = meter.peak()
    tensor_peak = tensor_peak_bytes(step, device)  # after the timed steps: the profiler slows this step
    median_s = statistics.median(times)
    row.update({
        "step_ms_median": 1000.0 * median_s,
        "step_ms_min": 1000.0 * min(times),
        "step_ms_mean": 1000.0 * statistics.fmean(times),
        "step_ms": [1000.0 * t for t in times],
        "warmup_ms": [1000.0 * t for t in warmup_s],
        "tokens_per_s": settings.batch * tokens_per_example(settings.family, config, settings.seq) / median_s,
        "peak_memory_bytes": peak,
        "memory_kind": meter.kind,
        "peak_tensor_bytes": tensor_peak,
        "saved_activation_bytes": saved,
        "setup_s": setup_s,
    })
    if settings.profile:
        row["profile"] = {f"{settings.profile_steps} training steps": profile_table(step, device,
                                                                                  settings.profile_steps)}
    if settings.checkpoint:
        row["checkpoint_bytes"] = checkpoint_bytes(model)
        row["checkpoint_kind"] = "LoRA adapter only" if mode == "lora" else "save_pretrained"
    del forward, model, optimizer, batch, trainable
    _release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_inference_mode(settings: Settings, mode: str) -> dict[str, Any]:
    """Build a fresh model, apply ``mode``, time ``warmup + steps`` forward passes without gradients and,
    for generative families, `generation_speed` at each of ``gen_batches``; return the mode's measurements."""
    device, meter, started, (model, config, row) = _fresh_mode(settings, mode)
    model.eval()
    inputs = {key: value for key, value in
              make_batch(settings.family, config, settings.batch, settings.seq, device, settings.seed).items()
              if key != "labels"}
    forward = torch.compile(model) if settings.compile else model
    autocast = autocast_context(device, settings.dtype)

    def forward_pass() -> float:
        _synchronize(device)
        begin = time.perf_counter()
        with torch.inference_mode(), autocast():
            forward(**inputs)
        _synchronize(device)
        return time.perf_counter() - begin

    setup_s = time.perf_counter() - started
    warmup_s = [forward_pass() for _ in range(settings.warmup)]
    meter.reset_peak()
    times = [forward_pass() for _ in range(settings.steps)]
    peak = meter.peak()
    median_s = statistics.median(times)
    row.update({
        "forward_ms_median": 1000.0 * median_s,
        "forward_ms": [1000.0 * t for t in times],
        "warmup_ms": [1000.0 * t for t in warmup_s],
        "forward_tokens_per_s": settings.batch * tokens_per_example(settings.family, config, settings.seq) / median_s,
        "forward_examples_per_s": settings.batch / median_s,
        "peak_memory_bytes": peak,
        "memory_kind": meter.kind,
        "setup_s": setup_s,
    })
    generative = settings.family in GENERATIVE
    row["generate"] = [generation_speed(model, config, settings, batch, device)
                       for batch in settings.gen_batches] if generative else []
    if settings.profile:
        row["profile"] = {f"{settings.profile_steps} forward passes": profile_table(forward_pass, device,
                                                                                  settings.profile_steps)}
        if generative:
            batch = settings.gen_batches[0]
            label = f"generate(), batch {batch}, {settings.new_tokens} new tokens"
            row["profile"][label] = profile_table(lambda: generation_time(model, config, settings, batch, device),
                                                  device, 1)
    del forward, model, inputs
    _release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def generation_time(model: nn.Module, config: Any, settings: Settings, batch: int, device: torch.device) -> float:
    """Seconds of one greedy ``generate()`` of ``new_tokens`` tokens after a random ``prompt``-token prompt,
    KV cache on (always eager: ``--compile`` applies to the forward passes). ``min_new_tokens`` equals
    ``max_new_tokens``, so an end-of-text token cannot stop it early and every mode generates as many tokens."""
    generator = torch.Generator().manual_seed(settings.seed + batch)
    ids = torch.randint(0, config.vocab_size, (batch, settings.prompt), generator=generator).to(device)
    _synchronize(device)
    begin = time.perf_counter()
    with torch.inference_mode(), autocast_context(device, settings.dtype)():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.new_tokens,
                                min_new_tokens=settings.new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=config.eos_token_id)
    _synchronize(device)
    elapsed = time.perf_counter() - begin
    if tuple(output.shape) != (batch, settings.prompt + settings.new_tokens):
        raise RuntimeError(f"generate() returned shape {tuple(output.shape)}, expected "
                           f"{(batch, settings.prompt + settings.new_tokens)}")
    return elapsed


def generation_speed(model: nn.Module, config: Any, settings: Settings, batch: int,
                     device: torch.device) -> dict[str, Any]:
    """`generation_time` once untimed, then ``gen_repeats`` times: the median, as generated tokens per second."""
    warmup = generation_time(model, config, settings, batch, device)
    seconds = [generation_time(model, config, settings, batch, device) for _ in range(settings.gen_repeats)]
    median_s = statistics.median(seconds)
    return {"batch": batch, "prompt_tokens": settings.prompt, "new_tokens": settings.new_tokens,
            "seconds": seconds, "warmup_seconds": warmup, "seconds_median": median_s,
            "tokens_per_s": batch * settings.new_tokens / median_s, "ms_per_token": 1000.0 * median_s / settings.new_tokens}


#: Rows of each torch.profiler table.
PROFILE_ROWS = 20


def profile_table(run: Callable[[], Any], device: torch.device, repeats: int) -> str:
    """torch.profiler over ``repeats`` calls of ``run``: the top ops by self CUDA time (on CUDA) and by self
    CPU time, as text tables."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            run()
    averages = profiler.key_averages()
    orders = (("self CUDA time", "self_device_time_total"),) if device.type == "cuda" else ()
    orders += (("self CPU time", "self_cpu_time_total"),)
    return "\n".join(f"top {PROFILE_ROWS} ops by {title}:\n{averages.table(sort_by=key, row_limit=PROFILE_ROWS)}"
                     for title, key in orders)


# --------------------------------------------------------------------------------------------------
# Environment, ratios, tables
# --------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {model}, {cores} cores available, torch threads {torch.get_num_threads()}"


def environment(settings: Settings, config: Any) -> dict[str, Any]:
    import transformers

    device = torch.device(settings.device)
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "family": settings.family,
        "size": settings.size,
        "model_config": {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"},
        "tokens_per_example": tokens_per_example(settings.family, config, settings.seq),
        "batch": settings.batch,
        "seq": settings.seq,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "dtype": settings.dtype,
        "autocast": settings.dtype == "bf16",
        "compile": settings.compile,
        "seed": settings.seed,
        "inference": settings.inference,
    }
    if settings.inference:
        meta.update({"new_tokens": settings.new_tokens, "prompt_tokens": settings.prompt,
                     "gen_batches": list(settings.gen_batches), "gen_repeats": settings.gen_repeats,
                     "generates": settings.family in GENERATIVE})
    else:
        meta["optimizer"] = f"AdamW(lr={settings.lr})"
    return meta


#: The rows every ratio is taken to, by the suffix of its key (``step_over_full``, ``memory_over_ffn_free``, ...).
BASELINES = (("full", "full"), ("ffn_free", FFN_FREE), ("activation_only", ACTIVATION_ONLY))


def _over(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Training rows: ``step_over_X`` and ``memory_over_X`` (X's multiple; lower is cheaper). Inference rows:
    ``forward_speed_over_X`` and each generation's ``speed_over_X`` (tokens per second as a multiple of X's;
    higher is faster). X is each of `BASELINES` present in ``rows``, else the ratio is None."""
    by_mode = {row["mode"]: row for row in rows}
    for row in rows:
        for suffix, mode in BASELINES:
            base = by_mode.get(mode, {})
            if "step_ms_median" in row:
                row[f"step_over_{suffix}"] = _over(row["step_ms_median"], base.get("step_ms_median"))
                row[f"memory_over_{suffix}"] = _over(row["peak_memory_bytes"], base.get("peak_memory_bytes"))
                row[f"tensor_memory_over_{suffix}"] = _over(row.get("peak_tensor_bytes"),
                                                            base.get("peak_tensor_bytes"))
                continue
            row[f"forward_speed_over_{suffix}"] = _over(row["forward_tokens_per_s"], base.get("forward_tokens_per_s"))
            base_generations = {g["batch"]: g["tokens_per_s"] for g in base.get("generate", [])}
            for generation in row.get("generate", []):
                generation[f"speed_over_{suffix}"] = _over(generation["tokens_per_s"],
                                                          base_generations.get(generation["batch"]))


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    precision = f"{meta['dtype']}{' autocast' if meta['autocast'] else ''}"
    compiled = "torch.compile" if meta["compile"] else "eager"
    isolate = ", each mode in its own process" if meta.get("isolate") else ""
    if meta.get("inference"):
        settings = (f"{meta['family']} size={meta['size']}, inference: forward of batch {meta['batch']} × "
                    f"{meta['tokens_per_example']} tokens, {precision}, {compiled}, median of {meta['steps']} "
                    f"after {meta['warmup']} warm-up")
        if meta.get("generates"):
            settings += (f"; generate() (eager, KV cache, greedy): {meta['prompt_tokens']}-token prompt + "
                         f"{meta['new_tokens']} new tokens, median of {meta['gen_repeats']} after 1 warm-up")
        table = _inference_table(result["results"], meta)
    else:
        settings = (f"{meta['family']} size={meta['size']}, batch {meta['batch']} × {meta['tokens_per_example']} "
                    f"tokens, {precision}, {compiled}, median of {meta['steps']} steps after {meta['warmup']} "
                    f"warm-up, {meta['optimizer']}, seed {meta['seed']}")
        table = _training_table(result["results"])
    lines = [f"**Device:** {meta['device']} · torch {meta['torch']} · transformers {meta['transformers']}", "",
             f"**Settings:** {settings}{isolate}", "", *table]
    kinds = sorted({row["memory_kind"] for row in result["results"]})
    notes = [f"peak memory: {', '.join(kinds)}" if kinds else "",
             "trainable % is of the --size model's parameter count (dense:... modes too)"]
    if meta.get("inference"):
        notes.append("× X: tokens per second as a multiple of mode X's (higher is faster)")
        if not meta.get("generates"):
            notes.append(f"no generate(): the {meta['family']} benchmark model is a classifier")
    else:
        notes += ["X / Y: X as a multiple of mode Y's (lower is cheaper); act-only is ffn-activation-only",
                  "peak tensors MiB: the most bytes tensors held at once during one more step (weights, gradients, "
                  "optimizer state and activations; exact, from torch.profiler's allocation records, CPU only)",
                  "saved MiB: bytes autograd keeps for backward after one eager forward, parameters and buffers "
                  "excluded (exact, not timed)",
                  "ckpt: bytes of the *.safetensors save_pretrained writes (lora: the adapter only; ETF: compact "
                  "storage, regenerable frames not stored)"]
    notes += [f"skipped {skip['mode']}: {skip['reason']}" for skip in result.get("skipped", [])]
    lines += ["", *(f"- {note}" for note in notes if note)]
    return "\n".join(lines) + "\n"


def _training_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| mode | trainable | trainable % | median step ms | tokens/s | peak memory GiB | peak tensors MiB | "
             "saved MiB | step / full | mem / full | step / ffn-free | mem / ffn-free | step / act-only | "
             "mem / act-only | tensors / full | tensors / ffn-free | ckpt MB |",
             "|---|" + "---:|" * 16]
    for row in rows:
        ckpt = f"{row['checkpoint_bytes'] / 1e6:.2f}" if "checkpoint_bytes" in row else "–"
        saved = f"{row['saved_activation_bytes'] / 2**20:.1f}" if "saved_activation_bytes" in row else "–"
        tensors = f"{row['peak_tensor_bytes'] / 2**20:.1f}" if row.get("peak_tensor_bytes") is not None else "–"
        ratios = " | ".join(_ratio(row.get(f"{kind}_over_{suffix}")) for suffix, _ in BASELINES
                            for kind in ("step", "memory"))
        tensor_ratios = " | ".join(_ratio(row.get(f"tensor_memory_over_{suffix}")) for suffix in ("full", "ffn_free"))
        lines.append(f"| {row['mode']} | {row['trainable']:,} | {row['trainable_pct']:.2f} | "
                     f"{row['step_ms_median']:.1f} | {row['tokens_per_s']:,.0f} | "
                     f"{row['peak_memory_bytes'] / 2**30:.3f} | {tensors} | {saved} | {ratios} | {tensor_ratios} | "
                     f"{ckpt} |")
    return lines


def _inference_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    batches = meta["gen_batches"] if meta.get("generates") else []
    header = ["mode", "trainable", "forward ms", "forward tokens/s", "× full", "× ffn-free", "peak memory GiB"]
    for batch in batches:
        header += [f"generate b{batch} tokens/s", "× full", "× ffn-free"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [row["mode"], f"{row['trainable']:,}", f"{row['forward_ms_median']:.1f}",
                 f"{row['forward_tokens_per_s']:,.0f}", _ratio(row.get("forward_speed_over_full")),
                 _ratio(row.get("forward_speed_over_ffn_free")), f"{row['peak_memory_bytes'] / 2**30:.3f}"]
        generations = {g["batch"]: g for g in row.get("generate", [])}
        for batch in batches:
            generation = generations.get(batch, {})
            cells += [f"{generation['tokens_per_s']:,.1f}" if generation else "–",
                      _ratio(generation.get("speed_over_full")), _ratio(generation.get("speed_over_ffn_free"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_report(result: dict[str, Any]) -> str:
    """The ``--profile`` file: each mode's torch.profiler tables under the run's settings line."""
    meta = result["meta"]
    sections = [f"# torch.profiler, {meta['family']} size={meta['size']}, batch {meta['batch']} × "
                f"{meta['tokens_per_example']} tokens, {meta['dtype']}, "
                f"{'torch.compile' if meta['compile'] else 'eager'}, on {meta['device']}\n"]
    for row in result["results"]:
        for label, table in row.get("profile", {}).items():
            sections.append(f"## {row['mode']}: {label}\n\n```\n{table}\n```\n")
    return "\n".join(sections)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_EPILOG = """\
modes:
  full, frozen, lora, etf-<basis> (%(bases)s), etf-structured-dense: treatments of the same model
  etf-structured-saved: etf-structured with recompute=False (saves the up-projection's output instead)
  ffn-activation-only: each FFN computes only its activation at full hidden width (the tight bound)
  ffn-free: each FFN projection returns only its bias (the loose bound)
  dense:KEY=VALUE[:KEY=VALUE...]: the full model with config fields overridden, e.g. dense:n_inner=512,
      dense:n_layer=2 (dense baselines of other sizes for iso-cost matching; an unknown field is an error)

--json FILE writes {"meta": {...settings, device, versions}, "results": [row per mode], "skipped": [...]};
a training row has mode, trainable, trainable_pct, step_ms_median, step_ms (every step), tokens_per_s,
peak_memory_bytes, peak_tensor_bytes (CPU), saved_activation_bytes, checkpoint_bytes, config_overrides (dense:
modes) and the ratios step_over_X / memory_over_X / tensor_memory_over_X for X in full, ffn_free,
activation_only (None when X was not run). An --inference
row has forward_ms_median, forward_tokens_per_s, peak_memory_bytes, forward_speed_over_X and generate: a list
of {batch, new_tokens, seconds_median, tokens_per_s, speed_over_X}.
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m etf_hf.app.bench",
        description="Time one training step (forward, backward, AdamW, zero_grad) of a model built from a config, "
                    "per way of treating its FFN projections, and report trainable parameters, median step time, "
                    "tokens/s, peak memory, saved activations, checkpoint size and ratios to full training and to "
                    "the two FFN bounds; with --inference, forward and generate() throughput instead.",
        epilog=_EPILOG % {"bases": ", ".join(BASES)},
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="gpt2", help=f"model family: {', '.join(FAMILIES)} (default gpt2)")
    parser.add_argument("--size", default="small",
                        help=f"{', '.join(SIZES)} or a JSON object of the family's config kwargs (default small)")
    parser.add_argument("--batch", type=int, default=8, help="examples per step or forward pass (default 8)")
    parser.add_argument("--seq", type=int, default=1024,
                        help="tokens per example (ViT: set by image/patch size) (default 1024)")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated (default {','.join(DEFAULT_MODES)}; with --inference "
                             f"{','.join(INFERENCE_MODES)}); see 'modes' below")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (forward passes) per mode (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first: compilation, allocator (default 5)")
    parser.add_argument("--dtype", default="auto", help="fp32, bf16 (autocast; weights stay fp32) or auto "
                        "(bf16 on CUDA, fp32 on CPU; the default)")
    parser.add_argument("--device", default="auto", help="auto (the default), cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (compile time falls in warm-up; generate() stays eager)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                        help="skip the save_pretrained size measurement")
    parser.add_argument("--isolate", action="store_true",
                        help="run each mode in a fresh subprocess (clean CPU peak memory, no allocator carry-over)")
    inference = parser.add_argument_group("inference (--inference)")
    inference.add_argument("--inference", action="store_true",
                           help="time forward passes without gradients (tokens/s; ViT: images/s too) and, for gpt2, "
                                "greedy generate() with the KV cache, instead of training steps")
    inference.add_argument("--new-tokens", type=int, default=128,
                           help="tokens each generate() produces (min_new_tokens too, so none stops early; "
                                "default 128)")
    inference.add_argument("--prompt", type=int, default=32, help="random prompt tokens before them (default 32)")
    inference.add_argument("--gen-batches", default="1,8", help="comma-separated generate() batch sizes (default 1,8)")
    inference.add_argument("--gen-repeats", type=int, default=3,
                           help="timed generate() calls per batch size, after one untimed (default 3)")
    output = parser.add_argument_group("output")
    output.add_argument("--profile", metavar="FILE", default=None,
                        help="profile every mode (torch.profiler: top ops by self CUDA and CPU time) and write the "
                             "tables to FILE; to profile one mode, run it alone")
    output.add_argument("--profile-steps", type=int, default=3,
                        help="steps (forward passes) recorded by --profile (default 3)")
    output.add_argument("--json", metavar="FILE", default=None, help="write every row as JSON (schema below)")
    output.add_argument("--markdown", metavar="FILE", default=None, help="write the markdown table")
    output.add_argument("--quiet", action="store_true", help="do not print the table")
    return parser


def _gen_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise BenchError(f"--gen-batches {text!r} must be comma-separated positive integers, e.g. 1,8")
    return batches


def _settings(options: argparse.Namespace) -> tuple[Settings, list[str]]:
    if options.family not in FAMILIES:
        raise BenchError(f"unknown family {options.family!r}: choose one of {', '.join(FAMILIES)}")
    config = model_config(options.family, options.size)  # validates --size before any model is built
    default_modes = INFERENCE_MODES if options.inference else DEFAULT_MODES
    modes = parse_modes(options.modes or ",".join(default_modes), options.family, options.size)
    for name, value, least in (("--batch", options.batch, 1), ("--seq", options.seq, 1), ("--steps", options.steps, 1),
                               ("--warmup", options.warmup, 0), ("--profile-steps", options.profile_steps, 1),
                               ("--new-tokens", options.new_tokens, 1), ("--prompt", options.prompt, 1),
                               ("--gen-repeats", options.gen_repeats, 1)):
        if value < least:
            raise BenchError(f"{name} must be >= {least}, got {value}")
    gen_batches = _gen_batches(options.gen_batches)
    if options.inference and options.family in GENERATIVE:
        length = options.prompt + options.new_tokens
        if length > config.max_position_embeddings:  # GPT-2's n_positions
            raise BenchError(f"--prompt {options.prompt} + --new-tokens {options.new_tokens} = {length} exceeds this "
                             f"{options.family} config's {config.max_position_embeddings} positions")
    if options.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        try:
            device = str(torch.device(options.device))
        except RuntimeError:
            raise BenchError(f"unknown device {options.device!r}: use auto, cpu, cuda or cuda:N") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError(f"--device {options.device} asked for, but torch sees no CUDA device")
    dtype = options.dtype
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise BenchError(f"unknown dtype {options.dtype!r}: choose fp32, bf16 or auto")
    if options.profile is not None and (options.profile in MODES or options.profile.startswith(DENSE_PREFIX)):
        raise BenchError(f"--profile takes the FILE to write the tables to, not a mode ({options.profile!r}); every "
                         f"mode run is profiled: to profile one, run it alone, e.g. --modes {options.profile} "
                         f"--profile profile.md")
    if options.compile and options.warmup < 1:
        raise BenchError("--compile needs --warmup >= 1, or compilation would be timed")
    return Settings(options.family, options.size, options.batch, options.seq, options.steps, options.warmup, dtype,
                    device, options.compile, options.seed, options.lr, options.checkpoint, options.profile is not None,
                    options.profile_steps, options.inference, options.new_tokens, options.prompt, gen_batches,
                    options.gen_repeats), modes


def _child_command(settings: Settings, mode: str, json_path: str, threads: int | None) -> list[str]:
    """The command line that measures ``mode`` alone in a fresh process (``--isolate``); its profile tables
    come back in the JSON rows."""
    command = [sys.executable, "-m", "etf_hf.app.bench", "--family", settings.family, "--size", settings.size,
               "--batch", str(settings.batch), "--seq", str(settings.seq), "--modes", mode,
               "--steps", str(settings.steps), "--warmup", str(settings.warmup), "--dtype", settings.dtype,
               "--device", settings.device, "--seed", str(settings.seed), "--lr", repr(settings.lr),
               "--json", json_path, "--quiet"]
    if settings.compile:
        command.append("--compile")
    if not settings.checkpoint:
        command.append("--no-checkpoint")
    if threads is not None:
        command += ["--threads", str(threads)]
    if settings.profile:
        command += ["--profile", os.devnull, "--profile-steps", str(settings.profile_steps)]
    if settings.inference:
        command += ["--inference", "--new-tokens", str(settings.new_tokens), "--prompt", str(settings.prompt),
                    "--gen-batches", ",".join(map(str, settings.gen_batches)),
                    "--gen-repeats", str(settings.gen_repeats)]
    return command


def run_isolated(settings: Settings, mode: str, threads: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="etf_bench_") as folder:
        path = os.path.join(folder, "mode.json")
        completed = subprocess.run(_child_command(settings, mode, path, threads), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            raise RuntimeError(f"mode {mode!r} failed in its subprocess (exit {completed.returncode}):\n"
                               f"{completed.stderr[-4000:]}")
        with open(path) as handle:
            child = json.load(handle)
    if child["skipped"]:
        return {"skipped": child["skipped"][0]}
    return child["results"][0]


def _summary(row: dict[str, Any]) -> str:
    if "step_ms_median" in row:
        return f"{row['step_ms_median']:.1f} ms/step, {row['peak_memory_bytes'] / 2**30:.3f} GiB"
    generations = "".join(f", generate b{g['batch']} {g['tokens_per_s']:.1f} tokens/s" for g in row["generate"])
    return f"forward {row['forward_ms_median']:.1f} ms{generations}"


def run_benchmark(settings: Settings, modes: list[str], isolate: bool = False, threads: int | None = None,
                  log: Callable[[str], None] | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every mode; returns ``{"meta": ..., "results": [row per mode], "skipped": [...]}``.
    ``progress`` gets that result so far after each mode (`main` writes it out, so that a run stopped by a
    time limit still leaves the modes it finished)."""
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    meta = environment(settings, model_config(settings.family, settings.size))
    meta["isolate"] = isolate
    result = {"meta": meta, "results": rows, "skipped": skipped}
    measure = run_inference_mode if settings.inference else run_mode
    for mode in modes:
        if mode == "lora" and not lora_available():
            skipped.append({"mode": mode, "reason": "peft is not installed (pip install peft)"})
            continue
        if log:
            log(f"etf_hf.app.bench: {mode} ...")
        row = run_isolated(settings, mode, threads) if isolate else measure(settings, mode)
        if "skipped" in row:
            skipped.append(row["skipped"])
            continue
        if log:
            log(f"etf_hf.app.bench: {mode}: {_summary(row)}")
        rows.append(row)
        add_ratios(rows)
        if progress:
            progress(result)
    return result


def write_outputs(result: dict[str, Any], options: argparse.Namespace) -> str:
    """Write the ``--json``, ``--markdown`` and ``--profile`` files of ``result``; returns the markdown table."""
    table = markdown(result)
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
    if options.markdown:
        Path(options.markdown).write_text(table)
    if options.profile:
        Path(options.profile).write_text(profile_report(result))
    return table


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``python -m etf_hf.app.bench``; returns the exit status (2 for a bad argument)."""
    options = build_parser(prog).parse_args(argv)
    try:
        settings, modes = _settings(options)
    except BenchError as error:
        print(f"{prog or 'etf_hf.app.bench'}: error: {error}", file=sys.stderr)
        return 2
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    log = None if options.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    result = run_benchmark(settings, modes, isolate=options.isolate, threads=options.threads, log=log,
                           progress=lambda partial: write_outputs(partial, options))
    table = write_outputs(result, options)
    if not options.quiet:
        print(table)
        if options.profile:
            print(f"torch.profiler tables: {options.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
