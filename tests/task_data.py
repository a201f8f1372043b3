"""Small task data for the Trainer tests: real data from ../shared/data, or synthetic data of the same shape.

Three tasks, one per architecture family the Trainer tests cover:
  * tiny shakespeare as a character-level causal-LM corpus (GPT-2);
  * TREC-6 question classification with a word-level vocabulary built here (BERT);
  * a Fashion-MNIST subset as 1x28x28 images (ViT).

The real files live in ``../shared/data`` beside the checkout (see its README: TSVs are split on the tab,
no quoting). A fresh clone has no such directory, so every loader falls back to *generated* data with the
same columns, shapes, dtypes and number of classes, and with learnable structure, so the tests still
train something and still run instead of being skipped. Each dataset records which one it got in
``.source`` (``"real"`` or ``"synthetic"``).

No tokenizer is downloaded: text is tokenized by character (LM) or by the most frequent words (TREC).
This module is imported both by pytest and by the torchrun worker (tests/ddp_train_worker.py).
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import torch

from conftest import shared_data_dir

TREC6_LABELS: tuple[str, ...] = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
FASHION_CLASSES = 10
PAD, UNK, CLS = 0, 1, 2


class ExampleDataset(torch.utils.data.Dataset):
    """A list of feature dicts (tensors), the shape transformers.Trainer's default collator expects."""

    def __init__(self, examples: list[dict[str, torch.Tensor]], source: str) -> None:
        self.examples = examples
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.examples[index]


def _data_file(relative: str, synthetic: bool) -> Path | None:
    if synthetic:
        return None
    root = shared_data_dir()
    if root is None or not (root / relative).is_file():
        return None
    return root / relative


# ---------------------------------------------------------------- tiny shakespeare (character-level LM)

def _synthetic_play(num_chars: int, seed: int = 0) -> str:
    """Play-like text (speaker lines of words from a small lexicon), so a char LM has something to learn."""
    rng = np.random.default_rng(seed)
    speakers = ["ROMEO", "JULIET", "KING", "NURSE", "FIRST CITIZEN"]
    words = ("the and to of my thou thee that is in not be me with lord love what shall will your "
             "good sir have come now our death night day heart").split()
    parts: list[str] = []
    length = 0
    while length < num_chars:
        line = speakers[rng.integers(len(speakers))] + ":\n"
        sentence = " ".join(words[i] for i in rng.integers(len(words), size=rng.integers(4, 12)))
        line += sentence[0].upper() + sentence[1:] + rng.choice([".", ",", "!", "?"]) + "\n\n"
        parts.append(line)
        length += len(line)
    return "".join(parts)[:num_chars]


def shakespeare_text(num_chars: int = 40_000, synthetic: bool = False) -> tuple[str, str]:
    """(text, source): the first ``num_chars`` characters of tiny shakespeare, or generated play text."""
    path = _data_file("tinyshakespeare/input.txt", synthetic)
    if path is None:
        return _synthetic_play(num_chars), "synthetic"
    with open(path, encoding="utf-8") as handle:
        return handle.read(num_chars), "real"


def char_lm_dataset(num_blocks: int = 128, block_size: int = 32, offset_blocks: int = 0,
                    synthetic: bool = False) -> tuple[ExampleDataset, int]:
    """(dataset, vocab_size): non-overlapping character blocks with ``labels = input_ids`` (causal LM).

    ``offset_blocks`` skips that many blocks, so a held-out eval set can follow the training blocks.
    The vocabulary is every character of the text read, so train and eval built with the same
    ``num_blocks + offset_blocks`` budget share it.
    """
    total_blocks = num_blocks + offset_blocks
    text, source = shakespeare_text(max(total_blocks * block_size, 40_000), synthetic)
    vocab = {char: index for index, char in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[c] for c in text[: total_blocks * block_size]], dtype=torch.long)
    blocks = ids.view(total_blocks, block_size)[offset_blocks:]
    examples = [{"input_ids": block.clone(), "labels": block.clone()} for block in blocks]
    return ExampleDataset(examples, source), len(vocab)


# ---------------------------------------------------------------- TREC-6 (question classification)

_SYNTHETIC_TREC = {
    "ABBR": ("What does {n} stand for ?", "What is the abbreviation for {n} ?"),
    "DESC": ("How do you {v} a {n} ?", "Why does the {n} {v} ?", "What is a {n} ?"),
    "ENTY": ("What {n} did the {n} {v} ?", "What kind of {n} is used to {v} ?"),
    "HUM": ("Who {v} the first {n} ?", "Who was the {n} of the {n} ?"),
    "LOC": ("Where is the {n} ?", "What country has the largest {n} ?"),
    "NUM": ("How many {n} are in a {n} ?", "When did the {n} {v} ?", "How much does a {n} cost ?"),
}
_NOUNS = "river car king film city war moon bird song team ship bank word game star tree".split()
_VERBS = "invent build win play make find sell paint cross write".split()


def _synthetic_trec(count: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        label = TREC6_LABELS[index % len(TREC6_LABELS)]
        templates = _SYNTHETIC_TREC[label]
        text = templates[rng.integers(len(templates))]
        while "{n}" in text or "{v}" in text:
            text = text.replace("{n}", _NOUNS[rng.integers(len(_NOUNS))], 1)
            text = text.replace("{v}", _VERBS[rng.integers(len(_VERBS))], 1)
        rows.append((label, text))
    order = rng.permutation(count)
    return [rows[i] for i in order]


def trec6_rows(split: str = "train", limit: int = 1024, synthetic: bool = False) -> tuple[list[tuple[str, str]], str]:
    """([(coarse_label, question), ...], source) for the first ``limit`` rows of a TREC-6 split."""
    path = _data_file(f"trec6/{split}.tsv", synthetic)
    if path is None:
        return _synthetic_trec(limit, seed=0 if split == "train" else 1), "synthetic"
    with open(path, encoding="utf-8") as handle:
        lines = [line.rstrip("\n").split("\t") for line in handle]
    header, body = lines[0], lines[1:]
    label_col, text_col = header.index("label"), header.index("text")
    return [(row[label_col], row[text_col]) for row in body[:limit]], "real"


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def trec6_dataset(limit: int = 512, vocab_size: int = 120, max_length: int = 16, split: str = "train",
                  vocab: dict[str, int] | None = None,
                  synthetic: bool = False) -> tuple[ExampleDataset, dict[str, int]]:
    """(dataset, vocab): TREC-6 questions as ``[CLS] w1 w2 ...`` ids, padded to ``max_length``.

    Without ``vocab`` one is built: PAD/UNK/CLS plus the ``vocab_size - 3`` most frequent words of these
    rows, enough for the question words that decide the coarse class. Pass the training set's vocab
    to encode an eval split the same way.
    """
    rows, source = trec6_rows(split, limit, synthetic)
    if vocab is None:
        counts = collections.Counter(w for _, text in rows for w in _words(text))
        vocab = {"[PAD]": PAD, "[UNK]": UNK, "[CLS]": CLS}
        for word, _ in counts.most_common(vocab_size - len(vocab)):
            vocab[word] = len(vocab)
    label_ids = {label: index for index, label in enumerate(TREC6_LABELS)}
    examples = []
    for label, text in rows:
        ids = [CLS] + [vocab.get(w, UNK) for w in _words(text)][: max_length - 1]
        mask = [1] * len(ids) + [0] * (max_length - len(ids))
        ids = ids + [PAD] * (max_length - len(ids))
        examples.append({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                         "labels": torch.tensor(label_ids[label])})
    return ExampleDataset(examples, source), vocab


# ---------------------------------------------------------------- Fashion-MNIST (image classification)

def _synthetic_fashion(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 uint8 images: one smooth random template per class plus pixel noise."""
    templates_rng = np.random.default_rng(1234)
    coarse = templates_rng.random((FASHION_CLASSES, 7, 7))
    templates = np.kron(coarse, np.ones((4, 4))) * 200.0
    rng = np.random.default_rng(seed)
    labels = rng.integers(FASHION_CLASSES, size=count).astype(np.int64)
    noise = rng.normal(0.0, 40.0, size=(count, 28, 28))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def fashion_mnist_arrays(split: str = "train", limit: int = 1024,
                         synthetic: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """(images uint8 (N,28,28), labels int64 (N,), source) for the first ``limit`` images of a split."""
    path = _data_file(f"fashion_mnist/{split}.npz", synthetic)
    if path is None:
        images, labels = _synthetic_fashion(limit, seed=0 if split == "train" else 1)
        return images, labels, "synthetic"
    with np.load(path) as data:
        return data["images"][:limit], data["labels"][:limit].astype(np.int64), "real"


def fashion_mnist_dataset(limit: int = 512, split: str = "train", synthetic: bool = False) -> ExampleDataset:
    """Fashion-MNIST as ``pixel_values`` (1,28,28) float32 in [-1, 1] and integer ``labels``."""
    images, labels, source = fashion_mnist_arrays(split, limit, synthetic)
    pixels = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    examples = [{"pixel_values": pixels[i], "labels": torch.tensor(int(labels[i]))} for i in range(len(labels))]
    return ExampleDataset(examples, source)
