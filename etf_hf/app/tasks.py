"""Tasks of `etf-hf train`: what a task reads from the data, how it becomes model inputs, and its metric.

================================  ==================================  =====================================
task                              data keys (default)                 reported metric
================================  ==================================  =====================================
``image-classification``          image_column (image),               test accuracy
                                  label_column (label)
``sequence-classification``       text_column (text), label_column    test accuracy
                                  (label), max_length (128)
``causal-lm``                     text_column (text), block_size      test perplexity = exp(test loss)
                                  (128)
================================  ==================================  =====================================

Labels: a `datasets.ClassLabel` column keeps its names and ids; any other column's values (strings such
as TREC's ``DESC``, or integers) are sorted and numbered 0..K-1, and the names recorded in the model's
``id2label``. Without a test file or split, classification holds out a stratified ``test_fraction``; a
language model holds out the *last* ``test_fraction`` of its token blocks (contiguous text, so no test
block shares a sentence with a training block).

Images are brought to the model: pixels become float in [0, 1] (integer pixels are read as 0..255,
float pixels are kept), then converted to the model config's ``num_channels`` and resized (bilinear) to its
``image_size`` when they differ; a model config without those settings (the paper's MLP) gets them as
they are.

Text needs a tokenizer: ``model.tokenizer``, by default the ``model.pretrained`` folder. ``byte-level``
names a tokenizer built here, offline: 256 tokens, one per UTF-8 byte (id = byte value), no special
tokens -- for a small language model trained from scratch (e.g. tiny shakespeare, pure ASCII: one token
per character).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..trainer_metrics import accuracy
from .data import load_source
from .recipe import ConfigError, expect, expect_positive_int, resolve_folder

#: ``model.tokenizer`` value naming the offline byte-level tokenizer.
BYTE_LEVEL = "byte-level"


class DictDataset(torch.utils.data.Dataset):
    """In-memory examples as the dicts Trainer's default collator stacks (``{input name: tensor, labels}``)."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {name: tensor[index] for name, tensor in self.inputs.items()}
        item["labels"] = self.labels[index]
        return item


@dataclass
class DataSplits:
    """A task's training and test examples, ready for Trainer.

    ``label_names`` is empty for a language model. ``tokenizer`` (text tasks) is saved with each trained
    mode. ``collator`` batches the examples (None: transformers' default collator, for equal shapes);
    text classification pads each batch to its longest example, so pass it to anything that batches
    ``train``/``test`` (e.g. `etf_hf.collapse_report`'s ``collate_fn``).
    """

    train: Any
    test: Any
    label_names: list[str]
    tokenizer: Any = None
    collator: Callable | None = None


@dataclass(frozen=True)
class Task:
    """A task: the Auto class that builds its head, its data keys and defaults, its metric, and two steps:

    ``check(data, model_config, tokenizer, where)`` while validating (e.g. ``block_size`` fits the model's
    positions; ``where`` names the model key in messages), and ``prepare(splits, data, model_config,
    tokenizer)`` to turn the raw `DatasetDict` into `DataSplits`.
    """

    name: str
    auto_class_name: str
    metric: str
    higher_is_better: bool
    data_keys: dict[str, Any]
    check: Callable[[dict[str, Any], Any, Any, str], None]
    prepare: Callable[[Any, dict[str, Any], Any, Any], DataSplits]
    needs_tokenizer: bool = False

    @property
    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)

    @property
    def column_keys(self) -> tuple[str, ...]:
        """The data keys that name columns (checked against the loaded data, by key)."""
        return tuple(key for key in self.data_keys if key.endswith("_column"))

    @property
    def has_labels(self) -> bool:
        """Classification (accuracy over class labels), as opposed to language modelling."""
        return self.metric == "accuracy"

    def compute_metrics(self) -> Callable | None:
        """Trainer's ``compute_metrics``: accuracy from the logits; None for perplexity, which comes from the
        loss alone (so evaluation never gathers a batch x length x vocabulary array of logits)."""
        return accuracy if self.has_labels else None

    def model_kwargs(self, data: DataSplits) -> dict[str, Any]:
        """Config settings the data decides: the label space, and the padding id text classifiers pool by."""
        if not self.has_labels:
            return {}
        names = data.label_names
        kwargs: dict[str, Any] = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                                  "label2id": {name: i for i, name in enumerate(names)}}
        if data.tokenizer is not None:
            kwargs["pad_token_id"] = data.tokenizer.pad_token_id
        return kwargs


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); infinite rather than an OverflowError for a diverged run."""
    return math.exp(loss) if loss < 709 else math.inf


def prepare_data(task: Task, data: dict[str, Any], model_config: Any, tokenizer: Any) -> DataSplits:
    """Read the recipe's data source and prepare it for ``task``'s model."""
    columns = {f"data.{key}": data[key] for key in task.column_keys}
    return task.prepare(load_source(data, columns), data, model_config, tokenizer)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _tokenizer_reference(model: dict[str, Any]) -> tuple[str | None, str]:
    """(reference, key naming it): ``model.tokenizer`` if set, else the ``model.pretrained`` folder."""
    if model.get("tokenizer") is not None:
        return expect(model["tokenizer"], str, "model.tokenizer", f"a tokenizer folder, 'package:NAME' or "
                      f"{BYTE_LEVEL!r}"), "model.tokenizer"
    return model.get("pretrained"), "model.pretrained"


def load_tokenizer(model: dict[str, Any], task: Task) -> Any:
    """The tokenizer a text task needs, ready for it (a padding token for classification)."""
    reference, key = _tokenizer_reference(model)
    if reference is None:
        raise ConfigError(f"task {task.name!r} needs a tokenizer: set model.tokenizer (a folder, 'package:NAME', or "
                          f"{BYTE_LEVEL!r}), or use model.pretrained with a folder that holds one")
    if reference == BYTE_LEVEL:
        tokenizer = byte_level_tokenizer()
    else:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_folder(reference, key))
        except (OSError, ValueError, TypeError) as error:
            raise ConfigError(f"{key} {reference!r}: no tokenizer could be loaded from it ({error}); "
                              f"set model.tokenizer") from None
    if task.name == "sequence-classification" and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"{key} {reference!r}: the tokenizer has no padding (or end-of-text) token, which "
                              f"batches of sentences need; use a tokenizer that has one")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: classifiers pool the last non-padding token
    return tokenizer


def byte_level_tokenizer() -> Any:
    """256 tokens, token id = UTF-8 byte value; built offline from the `tokenizers` library.

    GPT-2's byte-to-character table makes every byte a printable vocabulary entry; with no merges, the
    BPE model then maps each byte to its own id, and the byte-level decoder turns ids back into text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    characters = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={characters[byte]: byte for byte in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _check_text(length_key: str) -> Callable[[dict[str, Any], Any, Any, str], None]:
    """Validation of a text task: the tokenizer's ids and the sequence length must fit the model."""

    def check(data: dict[str, Any], config: Any, tokenizer: Any, where: str) -> None:
        length = expect_positive_int(data[length_key], f"data.{length_key}")
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and length > positions:
            raise ConfigError(f"data.{length_key} is {length}, but the model ({where}) has only {positions} positions; "
                              f"lower data.{length_key} or raise the model's max_position_embeddings/n_positions")
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > vocab:
            fix = (f"set {where}.vocab_size to at least {len(tokenizer)}" if where == "model.from_config"
                   else "set model.tokenizer to the model's own tokenizer")
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab} "
                              f"({where}); {fix}")

    return check


def _no_check(data: dict[str, Any], config: Any, tokenizer: Any, where: str) -> None:
    """Images adapt to the model, so nothing can disagree before the files are read."""


# --------------------------------------------------------------------------------------------------
# Splits and labels
# --------------------------------------------------------------------------------------------------


def seeded_indices(total: int, size: int | None, seed: int) -> list[int]:
    """``size`` of the indices 0..total-1 (all when ``size`` is None or not smaller), chosen at random
    (seeded) but kept in order: data sorted by class would lose classes to a "first N" rule. Every seeded
    subset of the application (``max_*_samples``, NCC probe sets) is drawn here."""
    if size is None or size >= total:
        return list(range(total))
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:size].sort().values.tolist()


def _subset(rows: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``rows`` (`seeded_indices`)."""
    return rows[seeded_indices(len(rows), limit, seed)]


def _label_space(splits: Any, column: str) -> tuple[list[str], dict[str, np.ndarray]]:
    """(label names, per split the label ids): ClassLabel names as they are, other values sorted."""
    from datasets import ClassLabel

    feature = splits["train"].features[column]
    values = {split: list(dataset[column]) for split, dataset in splits.items()}
    if isinstance(feature, ClassLabel):
        return list(feature.names), {split: np.asarray(v, dtype=np.int64) for split, v in values.items()}
    try:
        ordered = sorted({value for split_values in values.values() for value in split_values})
    except TypeError:
        raise ConfigError(f"data.label_column {column!r} mixes value types (e.g. numbers and text); "
                          f"labels must be all strings or all integers") from None
    index = {value: i for i, value in enumerate(ordered)}
    return [str(v) for v in ordered], {split: np.asarray([index[v] for v in vs], dtype=np.int64)
                                       for split, vs in values.items()}


def _classification_rows(splits: Any, data: dict[str, Any]) -> tuple[list[str], dict[str, tuple[Any, np.ndarray]]]:
    """(label names, {"train"/"test": (selected dataset rows, their label ids)}).

    Without a test split a stratified ``test_fraction`` of train is held out (every class in the test set);
    then ``max_*_samples`` subsets are taken.
    """
    from sklearn.model_selection import train_test_split

    names, labels = _label_space(splits, data["label_column"])
    if len(names) < 2:
        raise ConfigError(f"data.label_column {data['label_column']!r} has {len(names)} distinct value(s); "
                          f"classification needs at least 2 classes")
    if "test" in splits:
        rows = {split: (splits[split], np.arange(len(splits[split]))) for split in ("train", "test")}
    else:
        try:
            train_rows, test_rows = train_test_split(np.arange(len(labels["train"])), test_size=data["test_fraction"],
                                                     random_state=data["seed"], stratify=labels["train"])
        except ValueError as error:  # a class with a single example, or a test set smaller than the classes
            raise ConfigError(f"data.test_fraction {data['test_fraction']}: cannot hold out a stratified test set "
                              f"({error}); give data a test file/split or change test_fraction") from None
        rows = {"train": (splits["train"], train_rows), "test": (splits["train"], test_rows)}
        labels["test"] = labels["train"]
    selected = {}
    for split, (dataset, split_rows) in rows.items():
        split_rows = _subset(split_rows, data[f"max_{split}_samples"], data["seed"])
        selected[split] = (dataset.select(split_rows), labels[split][split_rows])
    return names, selected


# --------------------------------------------------------------------------------------------------
# image-classification
# --------------------------------------------------------------------------------------------------


def _image_size(config: Any) -> tuple[int, int] | None:
    size = getattr(config, "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def pixel_values(images: Any, num_channels: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    """Images (a numpy batch (N, H, W[, C]), or PIL images / arrays of any sizes) -> (N, C, H, W) float32.

    Integer pixels are divided by 255, float pixels kept; (H, W, C) arrays (C = 1, 3, 4) are moved to
    channels-first, (C, H, W) ones kept; RGBA drops alpha, gray <-> RGB converts (ITU-R 601 luma for RGB -> gray); then a bilinear resize.
    """
    if isinstance(images, np.ndarray) and images.dtype != object:
        return _to_model_layout(torch.from_numpy(images), num_channels, size)
    converted = []
    for image in images:
        if hasattr(image, "convert"):  # PIL: palette and 16-bit modes decode properly only through convert()
            image = image.convert("L" if num_channels == 1 else "RGB")
        converted.append(_to_model_layout(torch.from_numpy(np.array(image))[None], num_channels, size))
    return torch.cat(converted)


def _to_model_layout(batch: torch.Tensor, num_channels: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    pixels = batch.float() / 255.0 if not batch.is_floating_point() else batch.float()
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(1)
    elif pixels.ndim == 4 and pixels.shape[-1] in (1, 3, 4):  # (H, W, C), numpy's and PIL's layout, first
        pixels = pixels.permute(0, 3, 1, 2)
    elif pixels.ndim != 4 or pixels.shape[1] not in (1, 3, 4):
        raise ConfigError(f"data.image_column: images of shape {tuple(batch.shape[1:])} are neither (H, W), "
                          f"(H, W, C) nor (C, H, W) with 1, 3 or 4 channels")
    if pixels.shape[1] == 4:
        pixels = pixels[:, :3]
    channels = pixels.shape[1]
    if num_channels is not None and channels != num_channels:
        if channels == 1 and num_channels == 3:
            pixels = pixels.expand(-1, 3, -1, -1)
        elif channels == 3 and num_channels == 1:
            pixels = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ConfigError(f"the images have {channels} channels and the model's num_channels is {num_channels}; "
                              f"only gray <-> RGB conversions are made")
    if size is not None and tuple(pixels.shape[-2:]) != size:
        pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True,
                                                 align_corners=False)
    return pixels.contiguous()


def _prepare_images(splits: Any, data: dict[str, Any], config: Any, tokenizer: Any) -> DataSplits:
    from datasets import Image

    names, selected = _classification_rows(splits, data)
    column = data["image_column"]
    channels, size = getattr(config, "num_channels", None), _image_size(config)
    prepared = []
    for dataset, labels in selected.values():
        images = (list(dataset[column]) if isinstance(dataset.features[column], Image)
                  else dataset.with_format("numpy")[column][:])
        prepared.append(DictDataset({"pixel_values": pixel_values(images, channels, size)}, torch.from_numpy(labels)))
    return DataSplits(prepared[0], prepared[1], names)


# --------------------------------------------------------------------------------------------------
# sequence-classification and causal-lm
# --------------------------------------------------------------------------------------------------


def _texts(dataset: Any, column: str) -> list[str]:
    texts = list(dataset[column])
    odd = next((t for t in texts if not isinstance(t, str)), None)
    if odd is not None:
        raise ConfigError(f"data.text_column {column!r} holds {type(odd).__name__} values such as {odd!r}, not text; "
                          f"name the column with the text")
    return texts


def _prepare_sequences(splits: Any, data: dict[str, Any], config: Any, tokenizer: Any) -> DataSplits:
    """Tokenized (truncated to ``max_length``, unpadded) sentences; batches are padded by the collator."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    names, selected = _classification_rows(splits, data)
    prepared = []
    for dataset, labels in selected.values():
        encoded = tokenizer(_texts(dataset, data["text_column"]), truncation=True, max_length=data["max_length"])
        prepared.append(Dataset.from_dict({**encoded, "labels": labels.tolist()}))
    return DataSplits(prepared[0], prepared[1], names, tokenizer, DataCollatorWithPadding(tokenizer))


def _token_blocks(dataset: Any, data: dict[str, Any], tokenizer: Any, key: str) -> torch.Tensor:
    """All texts tokenized, joined (an end-of-text token after each, if the tokenizer has one) and cut into
    ``block_size`` blocks; the incomplete last block is dropped."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    # verbose=False: a whole book in one call is expected to exceed model_max_length; blocks are cut below
    for text_ids in tokenizer(_texts(dataset, data["text_column"]), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(text_ids)
        if eos is not None:
            ids.append(eos)
    block = data["block_size"]
    if len(ids) < block:
        raise ConfigError(f"data.block_size {block} is longer than the whole text of {key} ({len(ids)} tokens)")
    count = len(ids) // block
    return torch.tensor(ids[: count * block], dtype=torch.long).view(count, block)


def _prepare_blocks(splits: Any, data: dict[str, Any], config: Any, tokenizer: Any) -> DataSplits:
    """Causal-LM blocks with ``labels = input_ids`` (the model shifts them); test = test split or the tail."""
    train = _token_blocks(splits["train"], data, tokenizer, "the train split")
    if "test" in splits:
        test = _token_blocks(splits["test"], data, tokenizer, "the test split")
    else:
        held_out = math.ceil(data["test_fraction"] * len(train))
        if held_out >= len(train):
            raise ConfigError(f"data.test_fraction {data['test_fraction']}: the text makes only {len(train)} blocks "
                              f"of data.block_size {data['block_size']}, too few to hold out a test set")
        train, test = train[:-held_out], train[-held_out:]
    blocks = []
    for split, tensor in (("train", train), ("test", test)):
        tensor = tensor[seeded_indices(len(tensor), data[f"max_{split}_samples"], data["seed"])]
        blocks.append(DictDataset({"input_ids": tensor}, tensor))
    return DataSplits(blocks[0], blocks[1], [], tokenizer)


TASKS: dict[str, Task] = {
    "image-classification": Task("image-classification", "AutoModelForImageClassification", "accuracy", True,
                                 {"image_column": "image", "label_column": "label"}, _no_check, _prepare_images),
    "sequence-classification": Task("sequence-classification", "AutoModelForSequenceClassification", "accuracy", True,
                                    {"text_column": "text", "label_column": "label", "max_length": 128},
                                    _check_text("max_length"), _prepare_sequences, needs_tokenizer=True),
    "causal-lm": Task("causal-lm", "AutoModelForCausalLM", "perplexity", False,
                      {"text_column": "text", "block_size": 128}, _check_text("block_size"), _prepare_blocks,
                      needs_tokenizer=True),
}
