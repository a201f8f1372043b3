"""Benchmark harness: the cost of one training step per way of treating the feed-forward projections.

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
``ffn-free``                every FFN projection returns only its bias, broadcast to the output shape
                            (`BiasOnly`): the lower bound, since no replacement layer can cost less
==========================  ==================================================================================

Every mode starts from the same seeded initial weights, and the projections of ``frozen``, the ETF modes
and ``ffn-free`` are exactly the slots `etf_hf.architectures.find_slots` returns for the default
`ETFConfig`. Per mode it reports trainable parameters (`etf_hf.parameter_summary`), the median step time,
the peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set,
see `MemoryMeter`), the size of the ``save_pretrained`` safetensors, and the ratios to ``full`` and to
``ffn-free``. Output: a markdown table (stdout, ``--markdown``) and JSON (``--json``).

Timings are not asserted anywhere in the test suite: performance goals live in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..architectures import Slot, find_slots
from ..config import ETFConfig
from ..etf import BASES
from ..injection import etf_layers, parameter_summary

FAMILIES = ("gpt2", "bert", "vit")
SIZES = ("tiny", "small", "large")
FIXED_MODES = ("full", "frozen", "lora", "ffn-free")
#: Every mode name the harness accepts, in the order tables list them.
MODES = ("full", "frozen", "lora", *(f"etf-{basis}" for basis in BASES), "etf-structured-dense", "ffn-free")
DEFAULT_MODES = ("full", "frozen", "lora", "etf-orthogonal", "etf-structured", "etf-canonical", "ffn-free")
LORA_RANK = 8


class BenchError(ValueError):
    """A problem with the benchmark's arguments; `main` prints it as one line and returns 2."""


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

#: Config kwargs of each family's presets. ``small`` is the config class's defaults (GPT-2 124M,
#: BERT-base, ViT-base/16); ``large`` GPT-2-large / BERT-large / ViT-large; ``tiny`` is for CI.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {
        "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 256, "n_positions": 128},
        "small": {},
        "large": {"n_embd": 1280, "n_layer": 36, "n_head": 20},
    },
    "bert": {
        "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256,
                 "vocab_size": 256, "max_position_embeddings": 128},
        "small": {},
        "large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
    },
    "vit": {
        "tiny": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 256,
                 "image_size": 32, "patch_size": 8},
        "small": {},
        "large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
    },
}

#: PEFT target_modules (a regex, fullmatched against module paths) naming each family's attention
#: projections; GPT-2's ``c_proj`` is deliberately absent (the MLP has one too).
LORA_TARGETS = {
    "gpt2": r".*\.attn\.c_attn",
    "bert": r".*\.attention\.self\.(query|value)",
    "vit": r".*\.attention(\.attention)?\.(q_proj|v_proj|query|value)",  # 5.2x names, then older ones
}
#: Heads PEFT should keep trainable (a classifier starts random, so LoRA users train it).
LORA_MODULES_TO_SAVE = {"gpt2": None, "bert": ["classifier"], "vit": ["classifier"]}


def model_config(family: str, size: str) -> Any:
    """The transformers config for ``family`` at ``size`` (a preset name or a JSON object of config kwargs)."""
    if family not in FAMILIES:
        raise BenchError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    from transformers import BertConfig, GPT2Config, ViTConfig

    config_class = {"gpt2": GPT2Config, "bert": BertConfig, "vit": ViTConfig}[family]
    if size in PRESETS[family]:
        kwargs = PRESETS[family][size]
    else:
        try:
            kwargs = json.loads(size)
        except json.JSONDecodeError:
            raise BenchError(f"unknown size {size!r}: choose one of {', '.join(SIZES)} or give a JSON object of "
                             f"{config_class.__name__} kwargs, e.g. '{{\"n_layer\": 4}}'") from None
        if not isinstance(kwargs, dict):
            raise BenchError(f"--size JSON must be an object of {config_class.__name__} kwargs, got {size!r}")
    return config_class(**kwargs)


def build_model(family: str, config: Any) -> nn.Module:
    from transformers import BertForSequenceClassification, GPT2LMHeadModel, ViTForImageClassification

    model_class = {"gpt2": GPT2LMHeadModel, "bert": BertForSequenceClassification,
                   "vit": ViTForImageClassification}[family]
    return model_class(config)


def tokens_per_example(family: str, config: Any, seq: int) -> int:
    if family == "vit":
        return (config.image_size // config.patch_size) ** 2 + 1
    return seq


def make_batch(family: str, config: Any, batch: int, seq: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs and labels of the right shapes (the values do not matter for timing)."""
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=generator)
        labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
        return {"pixel_values": pixels.to(device), "labels": labels.to(device)}
    limit = config.n_positions if family == "gpt2" else config.max_position_embeddings
    if seq > limit:
        raise BenchError(f"--seq {seq} exceeds this {family} config's {limit} positions")
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    if family == "gpt2":
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    labels = torch.randint(0, config.num_labels, (batch,), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


# --------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------

class BiasOnly(nn.Module):
    """The FFN-free bound: a projection that ignores its input and returns its bias broadcast to
    ``(*input.shape[:-1], out_features)`` (zeros when the layer had no bias).

    The result is an expanded view (no copy). Under autocast it comes out in the autocast dtype, like a
    real Linear would, so downstream ops run in the same precision as in the other modes.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_layer(cls, layer: nn.Module, layout: str) -> BiasOnly:
        weight = layer.weight.t() if layout == "conv1d" else layer.weight
        out_features, in_features = weight.shape
        return cls(in_features, out_features, getattr(layer, "bias", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x.new_zeros((), dtype=dtype).expand(shape)
        return self.bias.to(dtype).expand(shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def ffn_slots(model: nn.Module) -> list[Slot]:
    """The FFN projections every mode treats: those `etf_hf.patch` replaces under the default `ETFConfig`."""
    return find_slots(model, ETFConfig())


def make_ffn_free(model: nn.Module) -> list[Slot]:
    """Replace every FFN projection of ``model`` by a `BiasOnly`, in place; returns the slots."""
    slots = ffn_slots(model)
    for slot in slots:
        setattr(slot.parent, slot.attribute, BiasOnly.from_layer(getattr(slot.parent, slot.attribute), slot.layout))
    return slots


def freeze_ffn_weights(model: nn.Module) -> list[Slot]:
    """``requires_grad=False`` on every FFN projection weight (biases stay trainable); returns the slots."""
    slots = ffn_slots(model)
    for slot in slots:
        getattr(slot.parent, slot.attribute).weight.requires_grad_(False)
    return slots


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


def apply_mode(model: nn.Module, mode: str, family: str) -> nn.Module:
    """Turn a fresh model into ``mode``'s model (may return a wrapper, for LoRA)."""
    if mode == "full":
        return model
    if mode == "frozen":
        freeze_ffn_weights(model)
        return model
    if mode == "ffn-free":
        make_ffn_free(model)
        return model
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                            target_modules=LORA_TARGETS[family], modules_to_save=LORA_MODULES_TO_SAVE[family],
                            fan_in_fan_out=family == "gpt2")  # GPT-2's Conv1D stores (in, out)
        return get_peft_model(model, config)
    if mode.startswith("etf-"):
        from ..patch import patch

        dense = mode.endswith("-dense")
        basis = mode.removeprefix("etf-").removesuffix("-dense")
        patch(model, ETFConfig(basis=basis))
        if dense:
            _densify_structured(model)
        return model
    raise BenchError(f"unknown mode {mode!r}")  # parse_modes rejects these first


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise BenchError("--modes is empty: give a comma-separated list, e.g. full,etf-structured,ffn-free")
    for mode in modes:
        if mode not in MODES:
            hint = ""
            if mode.startswith("etf-") and mode.endswith("-dense"):
                hint = " (only the structured basis has a matrix-free form, so only etf-structured-dense exists)"
            raise BenchError(f"unknown mode {mode!r}{hint}: choose from {', '.join(MODES)}")
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
    compile: bool
    seed: int
    lr: float
    checkpoint: bool
    profile: str | None
    profile_steps: int


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


def run_mode(settings: Settings, mode: str) -> dict[str, Any]:
    """Build a fresh model, apply ``mode``, train ``warmup + steps`` steps; return the mode's measurements."""
    device = torch.device(settings.device)
    prime_runtime(settings)
    if settings.compile:
        # A fresh compile per mode: the modes differ in module structure, and past dynamo's recompile
        # limit a later mode would silently run eager.
        torch._dynamo.reset()
    meter = MemoryMeter(device)
    meter.before_build()
    started = time.perf_counter()
    config = model_config(settings.family, settings.size)
    torch.manual_seed(settings.seed)
    with torch.device(device):
        base = build_model(settings.family, config)
    base_total = sum(p.numel() for p in base.parameters())
    model = apply_mode(base, mode, settings.family)
    model.train()
    params = parameter_summary(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    batch = make_batch(settings.family, config, settings.batch, settings.seq, device, settings.seed)
    forward = torch.compile(model) if settings.compile else model
    autocast = autocast_context(device, settings.dtype)

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
    row: dict[str, Any] = {
        "mode": mode,
        "trainable": params["trainable"],
        "total": params["total"],
        "base_total": base_total,
        "trainable_pct": 100.0 * params["trainable"] / base_total,
        "etf_fixed": params["etf_fixed"],
        "step_ms_median": 1000.0 * statistics.median(times),
        "step_ms_min": 1000.0 * min(times),
        "step_ms_mean": 1000.0 * statistics.fmean(times),
        "step_ms": [1000.0 * t for t in times],
        "warmup_ms": [1000.0 * t for t in warmup_s],
        "peak_memory_bytes": peak,
        "memory_kind": meter.kind,
        "setup_s": setup_s,
    }
    if mode == settings.profile:
        row["profile"] = profile_steps(step, device, settings.profile_steps)
    if settings.checkpoint:
        row["checkpoint_bytes"] = checkpoint_bytes(model)
        row["checkpoint_kind"] = "LoRA adapter only" if mode == "lora" else "save_pretrained"
    del forward, model, base, optimizer, batch, trainable
    _release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_steps(step: Callable[[], float], device: torch.device, steps: int) -> str:
    """torch.profiler over ``steps`` more steps: the top 15 ops by self device (CUDA) or CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=15)


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
    return {
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
        "optimizer": f"AdamW(lr={settings.lr})",
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by_mode = {row["mode"]: row for row in rows}
    full, bound = by_mode.get("full"), by_mode.get("ffn-free")
    for row in rows:
        row["step_over_full"] = row["step_ms_median"] / full["step_ms_median"] if full else None
        row["memory_over_full"] = (row["peak_memory_bytes"] / full["peak_memory_bytes"]
                                   if full and full["peak_memory_bytes"] else None)
        row["step_over_ffn_free"] = row["step_ms_median"] / bound["step_ms_median"] if bound else None
        row["memory_over_ffn_free"] = (row["peak_memory_bytes"] / bound["peak_memory_bytes"]
                                       if bound and bound["peak_memory_bytes"] else None)


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    settings = (f"{meta['family']} size={meta['size']}, batch {meta['batch']} × "
                f"{meta['tokens_per_example']} tokens, {meta['dtype']}{' autocast' if meta['autocast'] else ''}, "
                f"{'torch.compile' if meta['compile'] else 'eager'}, median of {meta['steps']} steps after "
                f"{meta['warmup']} warm-up, {meta['optimizer']}, seed {meta['seed']}"
                f"{', each mode in its own process' if meta.get('isolate') else ''}")
    lines = [
        f"**Device:** {meta['device']} · torch {meta['torch']} · transformers {meta['transformers']}",
        "",
        f"**Settings:** {settings}",
        "",
        "| mode | trainable | trainable % | median step ms | peak memory GiB | step / full | mem / full | "
        "step / ffn-free | mem / ffn-free | ckpt MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        ckpt = f"{row['checkpoint_bytes'] / 1e6:.2f}" if "checkpoint_bytes" in row else "–"
        lines.append(
            f"| {row['mode']} | {row['trainable']:,} | {row['trainable_pct']:.2f} | {row['step_ms_median']:.1f} | "
            f"{row['peak_memory_bytes'] / 2**30:.3f} | {_ratio(row['step_over_full'])} | "
            f"{_ratio(row['memory_over_full'])} | {_ratio(row['step_over_ffn_free'])} | "
            f"{_ratio(row['memory_over_ffn_free'])} | {ckpt} |")
    kinds = sorted({row["memory_kind"] for row in result["results"]})
    notes = [f"peak memory: {', '.join(kinds)}" if kinds else "",
             "trainable % is of the unmodified model's parameter count",
             "ckpt: bytes of the *.safetensors save_pretrained writes (lora: the adapter only; ETF: compact "
             "storage, regenerable frames not stored)"]
    notes += [f"skipped {skip['mode']}: {skip['reason']}" for skip in result.get("skipped", [])]
    lines += ["", *(f"- {note}" for note in notes if note)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m etf_hf.app.bench",
        description="Time one training step (forward, backward, AdamW, zero_grad) of a model built from a config, "
                    "per way of treating its FFN projections, and report trainable parameters, median step time, "
                    "peak memory, checkpoint size and ratios to full training and to the FFN-free bound.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--family", default="gpt2", help=f"model family: {', '.join(FAMILIES)}")
    parser.add_argument("--size", default="small",
                        help=f"{', '.join(SIZES)} or a JSON object of the family's config kwargs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per example (ViT: set by image/patch size)")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--dtype", default="auto", help="fp32, bf16 (autocast; weights stay fp32) or auto "
                        "(bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (compile time falls in warm-up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                        help="skip the save_pretrained size measurement")
    parser.add_argument("--isolate", action="store_true",
                        help="run each mode in a fresh subprocess (clean CPU peak memory, no allocator carry-over)")
    parser.add_argument("--profile", metavar="MODE", default=None,
                        help="also print torch.profiler's top 15 ops for MODE (one of --modes)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps recorded by --profile")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="write the markdown table")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    return parser


def _settings(options: argparse.Namespace) -> tuple[Settings, list[str]]:
    if options.family not in FAMILIES:
        raise BenchError(f"unknown family {options.family!r}: choose one of {', '.join(FAMILIES)}")
    modes = parse_modes(options.modes)
    for name, value, least in (("--batch", options.batch, 1), ("--seq", options.seq, 1), ("--steps", options.steps, 1),
                               ("--warmup", options.warmup, 0), ("--profile-steps", options.profile_steps, 1)):
        if value < least:
            raise BenchError(f"{name} must be >= {least}, got {value}")
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
    if options.profile is not None and options.profile not in modes:
        raise BenchError(f"--profile {options.profile!r} is not one of --modes ({', '.join(modes)})")
    if options.compile and options.warmup < 1:
        raise BenchError("--compile needs --warmup >= 1, or compilation would be timed")
    model_config(options.family, options.size)  # validates --size before any model is built
    return Settings(options.family, options.size, options.batch, options.seq, options.steps, options.warmup, dtype,
                    device, options.compile, options.seed, options.lr, options.checkpoint, options.profile,
                    options.profile_steps), modes


def _child_command(settings: Settings, mode: str, json_path: str, threads: int | None) -> list[str]:
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
    if settings.profile == mode:
        command += ["--profile", mode, "--profile-steps", str(settings.profile_steps)]
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


def run_benchmark(settings: Settings, modes: list[str], isolate: bool = False,
                  threads: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every mode; returns ``{"meta": ..., "results": [row per mode], "skipped": [...]}``."""
    rows, skipped = [], []
    for mode in modes:
        if mode == "lora" and not lora_available():
            skipped.append({"mode": mode, "reason": "peft is not installed (pip install peft)"})
            continue
        if log:
            log(f"etf_hf.app.bench: {mode} ...")
        row = run_isolated(settings, mode, threads) if isolate else run_mode(settings, mode)
        if "skipped" in row:
            skipped.append(row["skipped"])
            continue
        if log:
            log(f"etf_hf.app.bench: {mode}: {row['step_ms_median']:.1f} ms/step, "
                f"{row['peak_memory_bytes'] / 2**30:.3f} GiB")
        rows.append(row)
    add_ratios(rows)
    meta = environment(settings, model_config(settings.family, settings.size))
    meta["isolate"] = isolate
    return {"meta": meta, "results": rows, "skipped": skipped}


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
    result = run_benchmark(settings, modes, isolate=options.isolate, threads=options.threads, log=log)
    table = markdown(result)
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=2) + "\n")
    if options.markdown:
        Path(options.markdown).write_text(table)
    if not options.quiet:
        print(table)
        for row in result["results"]:
            if "profile" in row:
                print(f"torch.profiler, mode {row['mode']}, {settings.profile_steps} steps:\n{row['profile']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
