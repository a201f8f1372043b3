"""`ETFConfig`: which projections become fixed simplex-ETF layers, validated once, stored as `config.etf`."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .controls import CONTROL_BASES
from .etf import BASES

#: Version of the `config.etf` format this release writes; a checkpoint written by a newer release
#: is refused rather than half-understood.
FORMAT_VERSION = 1

PROJECTIONS = ("up", "down", "both")
STORAGES = ("compact", "dense")
_LAST_N = re.compile(r"last:(\d+)")


@dataclass
class ETFConfig:
    """How to patch a model.

    layers: ``"all"``, ``"last:N"`` (the last N blocks) or a list of block indices (0-based).
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
    """

    layers: str | list[int] = "all"
    projections: str = "both"
    basis: str = "orthogonal"
    seed: int = 0
    gain: str | float = "match"
    trainable_gain: bool = True
    target_modules: list[str] | None = None
    storage: str = "compact"
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != "all" and not _LAST_N.fullmatch(self.layers):
                raise ValueError(f"ETFConfig.layers={self.layers!r}: use 'all', 'last:N' or a list of block indices")
            match = _LAST_N.fullmatch(self.layers)
            if match and int(match.group(1)) < 1:
                raise ValueError("ETFConfig.layers='last:0' selects nothing: use 'last:N' with N >= 1")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(f"ETFConfig.layers={self.layers!r}: a list of layers must be non-empty block indices (ints)")
            if any(i < 0 for i in self.layers):
                raise ValueError(f"ETFConfig.layers={self.layers!r}: block indices are 0-based and non-negative")
            self.layers = sorted(set(self.layers))
        else:
            raise ValueError(f"ETFConfig.layers must be 'all', 'last:N' or a list of ints, got {type(self.layers).__name__}")
        if self.projections not in PROJECTIONS:
            raise ValueError(f"ETFConfig.projections={self.projections!r}: choose one of {', '.join(PROJECTIONS)}")
        if self.basis not in BASES + CONTROL_BASES:
            raise ValueError(f"ETFConfig.basis={self.basis!r} is unknown: choose an ETF basis ({', '.join(BASES)}) "
                             f"or a control ({', '.join(CONTROL_BASES)})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ETFConfig.seed={self.seed!r}: must be a non-negative int")
        if isinstance(self.gain, bool) or not (
            self.gain == "match" or (isinstance(self.gain, (int, float)) and self.gain > 0)
        ):
            raise ValueError(f"ETFConfig.gain={self.gain!r}: use 'match' or a positive number")
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
        if self.format_version != FORMAT_VERSION:
            if isinstance(self.format_version, int) and self.format_version > FORMAT_VERSION:
                raise ValueError(
                    f"config.etf has format_version {self.format_version}, but this etf_hf reads up to "
                    f"version {FORMAT_VERSION}: upgrade etf_hf (pip install -U etf_hf)"
                )
            raise ValueError(f"ETFConfig.format_version={self.format_version!r}: expected {FORMAT_VERSION}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form written to `model.config.etf`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ETFConfig:
        """Read `config.etf` strictly: every field present, nothing unknown, each value validated.

        A checkpoint is a contract; a missing or unknown key means it was written by something else, and
        guessing a default could silently rebuild different frames.
        """
        if isinstance(data, ETFConfig):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"config.etf must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        if "format_version" in data and isinstance(data["format_version"], int) and data["format_version"] > FORMAT_VERSION:
            cls(format_version=data["format_version"])  # raises the version error, naming both versions
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config.etf has unknown field(s) {unknown}; known fields: {sorted(names)}")
        missing = sorted(names - set(data))
        if missing:
            raise ValueError(f"config.etf is missing field(s) {missing}")
        return cls(**data)
