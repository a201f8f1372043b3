"""The paper's MLP (arXiv 2412.00884, Fashion-MNIST experiments) as a transformers model.

    pixels (784) -> Linear(784, H) -> BN -> ReLU -> L x [Linear(H, H) -> BN -> ReLU] -> Linear(H, C)

Why a `PreTrainedModel` rather than a bare `nn.Module`: the ETF machinery (``etf_hf.patch``,
``lock_blocks``, the generated ``ETF*`` classes, ``save_pretrained``/``from_pretrained`` keeping the locks)
works on transformers models, and ``Trainer`` + ``AdaptiveETFCallback`` drive training. The L square
hidden layers live in numbered `CollapseMLPBlock`s (``layers.0 .. layers.L-1``) so the architecture
registry can address them by block index; the input layer (784 -> H) is deliberately *not* a block,
because the paper fixes the square hidden layers and the classifier, never the input projection.

A patched MLP's checkpoint carries this file's source inside its remote code (``etf_hf.hub`` inlines it,
since a process loading with ``trust_remote_code=True`` need not have etf_hf), so at top level it imports
only torch, transformers, huggingface_hub and the standard library, never etf_hf.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModelForImageClassification, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_mlp import CollapseMLPConfig

class _LinearNormReLU(nn.Module):
    """Linear -> BatchNorm -> ReLU."""

    def __init__(self, in_features: int, out_features: int, batch_norm: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.norm = nn.BatchNorm1d(out_features) if batch_norm else nn.Identity()
        self.activation = nn.ReLU()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.linear(hidden)))


class CollapseMLPBlock(_LinearNormReLU):
    """A square hidden block; the registry fixes its ``linear`` to an ETF (role "up", since it is square)."""


class CollapseMLPInput(_LinearNormReLU):
    """The input layer (784 -> H). Not a `CollapseMLPBlock` subclass: the registry matches parents by class
    name along the MRO, and the input projection must never be selected as a block."""


class CollapseMLPPreTrainedModel(PreTrainedModel):
    config_class = CollapseMLPConfig
    base_model_prefix = "mlp"
    main_input_name = "pixel_values"

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own defaults (Kaiming-uniform weights, fan-in uniform biases), as in the paper's code,
        instead of transformers' N(0, 0.02); written with `transformers.initialization` so that loading a
        checkpoint never re-initialises weights it has just read."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class MLPForImageClassification(CollapseMLPPreTrainedModel):
    """The paper's MLP classifier. Accepts ``pixel_values`` of shape (N, 1, 28, 28), (N, 28, 28) or (N, 784).

    ``hidden_states`` (with ``output_hidden_states=True``) follows transformers' convention: entry 0 is
    the input layer's output (the "embedding"), entry i + 1 the output of block i, all post-ReLU, so
    ``len(hidden_states) == num_hidden_layers + 1`` as for BERT or ViT.
    """

    def __init__(self, config: CollapseMLPConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.input_layer = CollapseMLPInput(config.input_size, config.hidden_size, config.batch_norm)
        self.layers = nn.ModuleList(
            CollapseMLPBlock(config.hidden_size, config.hidden_size, config.batch_norm)
            for _ in range(config.num_hidden_layers)
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                ) -> ImageClassifierOutput | tuple:
        """Logits, and the mean cross-entropy loss when ``labels`` are given.

        No ``**kwargs``: Trainer reads a catch-all as "this model normalises its loss by
        ``num_items_in_batch``" and then multiplies the loss by the number of DDP processes.
        """
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden = pixel_values.reshape(pixel_values.shape[0], -1)
        if hidden.shape[1] != self.config.input_size:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} flatten to {hidden.shape[1]} "
                             f"features; this model takes input_size={self.config.input_size}")
        hidden = self.input_layer(hidden.to(self.classifier.bias.dtype))
        states = [hidden]
        for block in self.layers:
            hidden = block(hidden)
            states.append(hidden)
        logits = self.classifier(hidden)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.to(logits.device).long())
        hidden_states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (loss, logits, hidden_states) if value is not None)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


def register_auto_classes(config_class: type = CollapseMLPConfig) -> None:
    """Make ``collapse_mlp`` checkpoints load through AutoModelForImageClassification.

    Called when the first `CollapseMLPConfig` is built (``import etf_hf`` registers the config type); a
    patched MLP's ``etf_collapse_mlp`` classes derive from this Auto entry.
    """
    AutoModelForImageClassification.register(config_class, MLPForImageClassification, exist_ok=True)
