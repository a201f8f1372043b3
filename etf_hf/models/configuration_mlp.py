"""Configuration of the paper's MLP (`etf_hf.models.mlp`), apart from the model so that registering the
``collapse_mlp`` config type with AutoConfig stays cheap (see `etf_hf.registration`).

Inlined into a patched MLP's remote code like `mlp`, so at top level it imports only transformers,
huggingface_hub and the standard library, never etf_hf.
"""
from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from ..configuration_etf import AutoRegisteredConfig

MODEL_TYPE = "collapse_mlp"


@strict
class CollapseMLPConfig(AutoRegisteredConfig, PreTrainedConfig):
    """Configuration of `MLPForImageClassification`.

    input_size: flattened input dimension (784 for 28 x 28 images).
    hidden_size: width H of every hidden layer (the paper: 400).
    num_hidden_layers: depth L, the number of square H x H hidden blocks (the paper: 4). The name is
        transformers' convention, which ``ETFConfig(layers="last:N")`` relies on to count blocks.
    batch_norm: BatchNorm1d after every hidden Linear (the paper uses it).
    num_labels: classes C (a `PreTrainedConfig` keyword, default here 10).
    """

    model_type = MODEL_TYPE
    auto_registration = ("etf_hf.models.mlp", "register_auto_classes")  # the model, on first use

    input_size: int = 784
    hidden_size: int = 400
    num_hidden_layers: int = 4
    batch_norm: bool = True

    def __post_init__(self, **kwargs):
        kwargs.setdefault("num_labels", 10 if self.id2label is None else len(self.id2label))
        if self.input_size < 1 or self.hidden_size < 1 or self.num_hidden_layers < 0:
            raise ValueError(f"CollapseMLPConfig: input_size={self.input_size}, hidden_size={self.hidden_size} must be "
                             f">= 1 and num_hidden_layers={self.num_hidden_layers} >= 0")
        super().__post_init__(**kwargs)

    def to_diff_dict(self) -> dict:
        """Always write the labels: transformers drops them when they equal *its* default (2 classes), and
        this config's default is 10, so a 2-class model would otherwise reload with 10 classes."""
        diff = super().to_diff_dict()
        full = self.to_dict()
        diff.setdefault("id2label", full["id2label"])
        diff.setdefault("label2id", full["label2id"])
        return diff
