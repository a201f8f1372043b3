"""`ETFConfig`: which projections become fixed simplex-ETF layers, validated once, stored as `config.etf`."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .controls import CONTROL_BASES
from .etf import BASES

#: Version of the `config.etf` format this release writes; a checkpoint written by a newer release
#: is refused rather than half-understood.
FORMAT_VERSION = 4
#: Fields added after version 1, with the version that added them. An older config.etf lacks them and is
#: read with their defaults (which reproduce what that older release built); a newer field in an older
#: version's dict is refused like any unknown field. ``modules`` (version 4) is then recomputed from the
#: model when it loads (`etf_hf.injection.recorded_modules`).
_ADDED_IN_VERSION = {"head": 2, "head_basis": 2, "placement": 2, "recompute": 3, "modules": 4}
#: The keys of one ``modules`` entry (see `ETFConfig.modules`).
MODULE_KEYS = ("path", "root", "role", "layout", "seed_key")

PROJECTIONS = ("up", "down", "both")
STORAGES = ("compact", "dense")
_LAST_N = re.compile(r"last:(\d+)")
#: The largest number gain tensors can hold: they are float32 (or the model's dtype, checked by `etf_hf.patch`).
GAIN_MAX = float(torch.finfo(torch.float32).max)
#: ``layers`` values that only `etf_hf.resolve` turns into block indices (the default and ``"auto"``): every
#: other function that selects blocks (`etf_hf.architectures.find_slots`) refuses them.
LAYER_CHOICES = (None, "auto")


@dataclass
class ETFConfig:
    """How to patch a model.

    layers: ``"all"``, ``"last:N"`` (the last N blocks), a list of block indices (0-based), ``"auto"``
        (the blocks from the effective depth on, measured by NCC on labelled data:
        ``etf_hf.patch(model, config, data=...)``, see `etf_hf.suggest_layers`) or None, the default.
        None means one thing: "let `etf_hf.resolve` choose for this model": every block of a model built
        from a config (random init), and for a model loaded with pretrained weights ``"auto"`` when ``data``
        is given, else the second half of its blocks (see `etf_hf.placement`; why: fixing every FFN of a
        pretrained model cost 7-9 points in the pre-study, the last half < 1). Only `resolve` (and so
        `patch`) reads None; `etf_hf.architectures.find_slots` and the other block selectors refuse it,
        and a resolved config (``config.etf``) always holds explicit blocks. ``[]`` fixes no FFN block
        (only with ``head=True``). `patch` writes the resolved list into ``config.etf``, so a checkpoint
        never depends on the data.
        On a model of several stacks (T5, BART, Whisper: ``encoder`` / ``decoder``; CLIP: ``text`` /
        ``vision``) a plain value applies to each stack, and a mapping addresses them one by one:
        ``{"encoder": "last:2", "decoder": "all"}`` (a stack left out gets no ETF layer). `patch` then
        records one list per stack.
    projections: ``"up"`` (d -> 4d), ``"down"`` (4d -> d) or ``"both"``. Gated MLPs count gate and up
        projections as ``"up"``.
    basis: ``"orthogonal"`` (seeded random frame, the default: every hidden unit sees the input),
        ``"canonical"`` (the paper's U = I; on an FFN pair 3/4 of the hidden units then see only their
        bias), ``"nearest"`` (the ETF closest to the layer's current weight; stored in checkpoints) or
        ``"structured"`` (seeded Walsh-Hadamard frame applied matrix-free). **Controls, not ETFs**, at
        the same placement (see `etf_hf.controls`): ``"gaussian"`` (seeded Gaussian with the ETF's norm),
        ``"zero"`` (weight zeroed, bias kept) and ``"frozen"`` (the layer's own weight, frozen).
    seed: seeds the orthogonal frames; each projection derives its own seed from it.
    gain: ``"match"`` starts each layer's trainable gain so that the ETF layer has the replaced weight's
        Frobenius norm (for ``nearest``: the least-squares scale); a number sets it directly (1.0 gives
        unit-norm frame vectors, as in the paper).
    trainable_gain: when False the gain is fixed too (stored as a buffer, never a frozen Parameter,
        because transformers 5.x reloads frozen Parameters as trainable).
    target_modules: regular expressions matched (fullmatch) against module paths; when given they
        replace the architecture registry's choice of projections, and ``projections`` is ignored.
    storage: ``"compact"`` (checkpoints leave out frames that can be regenerated from basis and seed;
        ``nearest`` frames are always stored) or ``"dense"`` (every frame stored). Also settable per
        save: ``model.save_pretrained(dir, etf_storage="dense")``.
    head: also fix the classification head (``classifier`` / ``score``, or RoBERTa's
        ``classifier.out_proj``) to a K x hidden simplex ETF, one row per class, with a trainable gain
        and its bias (see `etf_hf.architectures.find_head`): the fixed classifier the paper builds on.
    head_basis: the head's basis (ETF or control); None: the FFN ``basis`` at patch time, which `patch`
        then writes here, so that a later lock with another FFN basis (Adaptive-ETF) leaves the head's
        frame reproducible.
    recompute: for a block whose FFN projections are all fixed (computed by the fused FFN,
        `etf_hf.ffn`): True saves only the block input and recomputes the up-projection in backward, False
        also saves its 4d-wide pre-gain output. None (default): True for ``structured`` (recomputing its
        transform costs a fraction of the saved memory traffic), False for dense frames (recomputing a
        d x 4d GEMM costs more time than the memory is worth; measured in BENCHMARKS.md). Training
        memory and speed only: outputs and gradients are the same either way.
    placement: how `patch` chose ``layers`` (written by `patch`, not an input): the rule, a sentence
        saying why, and for ``"auto"`` the threshold, the per-block NCC accuracies and the effective
        depth. A record only: it takes no part in comparing configs, nor in their repr (see config.etf).
    modules: the modules `patch` replaced (written by `patch`, not an input): one entry per module, with
        its ``path`` below ``root`` (``"base_model"``, so that every head class of the family finds it, or
        ``"model"`` for a module outside the base model: the head, a ``target_modules`` match such as
        ``lm_head``), ``role`` (``up``/``down``/``head``), weight ``layout`` and the ``seed_key`` its frame's
        seed derives from. Loading rebuilds the layers from this list alone, so a
        checkpoint's remote code needs neither the architecture registry nor this class's validation; with
        etf_hf installed, loading checks it against ``layers`` (and recomputes it for an older format).
        Not compared either: it follows from the other fields and the model.
    """

    layers: str | list[int] | dict[str, str | list[int]] | None = None
    projections: str = "both"
    basis: str = "orthogonal"
    seed: int = 0
    gain: str | float = "match"
    trainable_gain: bool = True
    target_modules: list[str] | None = None
    storage: str = "compact"
    head: bool = False
    head_basis: str | None = None
    recompute: bool | None = None
    placement: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    modules: list[dict[str, str]] | None = field(default=None, compare=False, repr=False)
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.head, bool):
            raise ValueError(f"ETFConfig.head={self.head!r}: must be true or false")
        if isinstance(self.layers, dict):
            if not self.layers or not all(isinstance(stack, str) and stack for stack in self.layers):
                raise ValueError(f"ETFConfig.layers={self.layers!r}: per-stack layers map stack names (e.g. 'encoder', "
                                 f"'decoder') to 'all', 'last:N' or [i, ...]")
            self.layers = {stack: self._checked_layers(value, f"ETFConfig.layers[{stack!r}]", per_stack=True)
                           for stack, value in self.layers.items()}
            if not any(self.layers.values()) and not self.head:
                raise ValueError(f"ETFConfig.layers={self.layers!r} fixes no FFN block: that only makes sense with "
                                 f"head=True; list block indices or use 'all'/'last:N' for some stack")
        else:
            self.layers = self._checked_layers(self.layers, "ETFConfig.layers", per_stack=False)
        if self.projections not in PROJECTIONS:
            raise ValueError(f"ETFConfig.projections={self.projections!r}: choose one of {', '.join(PROJECTIONS)}")
        if self.basis not in BASES + CONTROL_BASES:
            raise ValueError(f"ETFConfig.basis={self.basis!r} is unknown: choose an ETF basis ({', '.join(BASES)}) "
                             f"or a control ({', '.join(CONTROL_BASES)})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ETFConfig.seed={self.seed!r}: must be a non-negative int")
        self._validate_gain()
        if not isinstance(self.trainable_gain, bool):
            raise ValueError(f"ETFConfig.trainable_gain={self.trainable_gain!r}: must be true or false")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(p, str) for p in self.target_modules):
                raise ValueError("ETFConfig.target_modules must be a list of regular expressions (strings)")
            for pattern in self.target_modules:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"ETFConfig.target_modules: {pattern!r} is not a valid regex ({error})") from None
            self.target_modules = list(self.target_modules)
        if self.storage not in STORAGES:
            raise ValueError(f"ETFConfig.storage={self.storage!r}: choose one of {', '.join(STORAGES)}")
        if self.head_basis is not None:
            if not self.head:
                raise ValueError(f"ETFConfig.head_basis={self.head_basis!r} without head=True: set head=True to fix "
                                 f"the classification head, or drop head_basis")
            if self.head_basis not in BASES + CONTROL_BASES:
                raise ValueError(f"ETFConfig.head_basis={self.head_basis!r} is unknown: choose an ETF basis "
                                 f"({', '.join(BASES)}) or a control ({', '.join(CONTROL_BASES)})")
        if self.recompute is not None and not isinstance(self.recompute, bool):
            raise ValueError(f"ETFConfig.recompute={self.recompute!r}: use true, false, or null (true for the "
                             f"structured basis, false for dense frames)")
        if self.placement is not None and not isinstance(self.placement, dict):
            raise ValueError(f"ETFConfig.placement must be a JSON object or null (it is written by etf_hf.patch), "
                             f"got {type(self.placement).__name__}")
        if self.modules is not None:
            self.modules = self._checked_modules(self.modules)
        if self.format_version != FORMAT_VERSION:
            if isinstance(self.format_version, int) and self.format_version > FORMAT_VERSION:
                raise ValueError(
                    f"config.etf has format_version {self.format_version}, but this etf_hf reads up to "
                    f"version {FORMAT_VERSION}: upgrade etf_hf (pip install -U etf_hf)"
                )
            raise ValueError(f"ETFConfig.format_version={self.format_version!r}: expected {FORMAT_VERSION}")

    def _validate_gain(self) -> None:
        """'match' or a positive, finite number that float32 can hold: an infinite gain gives non-finite logits
        and one beyond float32 fails deep inside torch with an overflow, far from the field that caused it."""
        if self.gain == "match":
            return
        if isinstance(self.gain, bool) or not isinstance(self.gain, (int, float)):
            raise ValueError(f"ETFConfig.gain={self.gain!r}: use 'match' or a positive number (1.0 gives unit-norm "
                             f"frame vectors)")
        too_big = f"does not fit in float32, the dtype gains are kept in (largest {GAIN_MAX:.3g})"
        try:
            value = float(self.gain)
        except OverflowError:  # an int beyond any float
            problem = too_big
        else:
            problem = ("is not finite" if not math.isfinite(value) else "is not positive" if value <= 0
                       else too_big if value > GAIN_MAX else None)
        if problem:
            raise ValueError(f"ETFConfig.gain={self.gain!r} {problem}: use 'match' (the replaced weight's norm) or a "
                             f"finite positive number such as 1.0")

    def _checked_layers(self, layers: Any, where: str, per_stack: bool) -> Any:
        """One ``layers`` value validated (a list sorted, duplicates dropped); ``per_stack``: a stack's value
        in a mapping, which is always explicit (no default, no ``"auto"``)."""
        if layers is None and not per_stack:  # the default: resolved by etf_hf.patch
            return None
        if isinstance(layers, str):
            choices = ("all",) if per_stack else ("all", "auto")
            if layers not in choices and not _LAST_N.fullmatch(layers):
                extra = "" if per_stack else (", 'auto', a mapping of stack -> layers (encoder-decoder models), "
                                              "or leave it unset for the default")
                raise ValueError(f"{where}={layers!r}: use 'all', 'last:N', a list of block indices{extra}")
            match = _LAST_N.fullmatch(layers)
            if match and int(match.group(1)) < 1:
                raise ValueError(f"{where}='last:0' selects nothing: use 'last:N' with N >= 1")
            return layers
        if isinstance(layers, (list, tuple)):
            if not layers and not self.head and not per_stack:
                raise ValueError(f"{where}=[] fixes no FFN block: that only makes sense with head=True "
                                 "(a fixed classifier alone); otherwise list block indices or use 'all'/'last:N'")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"{where}={layers!r}: a list of layers must hold block indices (ints)")
            if any(i < 0 for i in layers):
                raise ValueError(f"{where}={layers!r}: block indices are 0-based and non-negative")
            return sorted(set(layers))
        allowed = "'all', 'last:N' or a list of ints" if per_stack else \
            "'all', 'auto', 'last:N', a list of ints, a mapping of stack -> layers, or None"
        raise ValueError(f"{where} must be {allowed}, got {type(layers).__name__}")

    @staticmethod
    def _checked_modules(modules: Any) -> list[dict[str, str]]:
        entries = list(modules) if isinstance(modules, (list, tuple)) else None
        if entries is None or not all(isinstance(entry, dict) and set(entry) == set(MODULE_KEYS)
                                      and all(isinstance(value, str) for value in entry.values()) for entry in entries):
            raise ValueError(f"ETFConfig.modules must be a list of {{{', '.join(MODULE_KEYS)}}} string records "
                             f"(it is written by etf_hf.patch; leave it unset)")
        return [dict(entry) for entry in entries]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to `model.config.etf`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ETFConfig:
        """Read `config.etf` strictly: every field present, nothing unknown, each value validated.

        A checkpoint is a contract; a missing or unknown key means it was written by something else, and
        guessing a default could silently rebuild different frames. The one exception is an older format
        version, whose dict lacks exactly the fields added since: those get the defaults that reproduce
        what the older release built (no head, no placement record, ``modules`` recomputed on loading), and
        the result is this version. An older release recorded ``layers`` None when ``target_modules``
        matched modules outside numbered blocks, which meant all of them: read as ``"all"``.
        """
        if isinstance(data, ETFConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"config.etf must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        is_version = isinstance(version, int) and not isinstance(version, bool)
        if is_version and version > FORMAT_VERSION:
            cls(format_version=version)  # raises the version error, naming both versions
        older = is_version and 1 <= version < FORMAT_VERSION
        names = {f.name for f in fields(cls) if not older or _ADDED_IN_VERSION.get(f.name, 1) <= version}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config.etf (format_version {version!r}) has unknown field(s) {unknown}; "
                             f"known fields: {sorted(names)}")
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"config.etf is missing field(s) {missing}")
        if older and data.get("layers", "all") is None and data.get("target_modules"):
            data = {**data, "layers": "all"}
        return cls(**{**data, "format_version": FORMAT_VERSION} if older else data)
