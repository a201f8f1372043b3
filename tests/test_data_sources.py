"""`etf-hf train` data sources (etf_hf.app.data) and what the tasks make of them (etf_hf.app.tasks): files read
verbatim, labels numbered in sorted order, held-out splits, images brought to the model, token blocks,
and errors that name the key."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from etf_hf.app.data import validate_data
from etf_hf.app.recipe import ConfigError
from etf_hf.app.tasks import TASKS, byte_level_tokenizer, pixel_values, prepare_data

TREC_ROWS = [("DESC", 'What does "NA" mean ?'), ("HUM", "Who wrote Hamlet ?"), ("LOC", "Where is Rome ?"),
             ("NUM", "How many legs has a spider ?"), ("DESC", "NA"), ("HUM", "Who painted the Mona Lisa ?"),
             ("LOC", "Where is the Nile ?"), ("NUM", "When did WWII end ?")] * 2


def write_tsv(path: Path, rows: list[tuple[str, str]] = TREC_ROWS) -> Path:
    """TREC-like TSV: header label/text, unescaped quotes inside the text, as in ../shared/data."""
    path.write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def prepared(task: str, data: dict[str, Any], config: Any = None, tokenizer: Any = None) -> Any:
    """validate_data + prepare_data, as `etf-hf train` runs them."""
    spec = TASKS[task]
    return prepare_data(spec, validate_data(data, task, spec.data_keys), config or SimpleNamespace(), tokenizer)


class WordTokenizer:
    """Just enough of a tokenizer for the sequence task: one id per character, no special tokens."""

    pad_token_id = 0

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
        ids = [[ord(c) for c in text][:max_length] for text in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}


def test_tsv_is_read_verbatim_and_labels_are_numbered_in_sorted_order(tmp_path: Path) -> None:
    train = write_tsv(tmp_path / "train.tsv")
    test = write_tsv(tmp_path / "test.tsv", [("NUM", "How far ?"), ("DESC", 'Why "so" ?')])
    data = prepared("sequence-classification", {"source": "tsv", "train_file": str(train), "test_file": str(test),
                                                "max_length": 8}, tokenizer=WordTokenizer())
    assert data.label_names == ["DESC", "HUM", "LOC", "NUM"]
    assert len(data.train) == len(TREC_ROWS) and len(data.test) == 2
    texts = {"".join(map(chr, row["input_ids"])) for row in data.train}
    assert 'What doe' in texts and "NA" in texts          # the quote did not swallow lines; "NA" stayed text
    assert [row["labels"] for row in data.test] == [3, 0]
    assert max(len(row["input_ids"]) for row in data.train) == 8   # truncated to max_length


def test_csv_without_test_file_holds_out_a_stratified_seeded_fraction(tmp_path: Path) -> None:
    rows = [(str(i % 2), f"sentence {i}") for i in range(40)]
    path = tmp_path / "sst.csv"
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for label, text in rows), encoding="utf-8")
    settings = {"source": "csv", "train_file": str(path), "test_fraction": 0.25, "seed": 3}
    first = prepared("sequence-classification", dict(settings), tokenizer=WordTokenizer())
    again = prepared("sequence-classification", dict(settings), tokenizer=WordTokenizer())
    assert first.label_names == ["0", "1"]                  # integer labels, recorded as names
    assert len(first.train) == 30 and len(first.test) == 10
    assert sorted(row["labels"] for row in first.test) == [0] * 5 + [1] * 5
    assert first.test["input_ids"] == again.test["input_ids"]
    train_texts = {tuple(ids) for ids in first.train["input_ids"]}
    assert not train_texts & {tuple(ids) for ids in first.test["input_ids"]}


def test_max_samples_take_a_seeded_random_subset(tmp_path: Path) -> None:
    rows = [("A" if i < 20 else "B", f"row {i}") for i in range(40)]        # sorted by class
    train = write_tsv(tmp_path / "train.tsv", rows)
    data = prepared("sequence-classification", {"source": "tsv", "train_file": str(train), "test_file": str(train),
                                                "max_train_samples": 10, "max_test_samples": 4},
                    tokenizer=WordTokenizer())
    assert len(data.train) == 10 and len(data.test) == 4
    assert set(data.train["labels"]) == {0, 1}              # a "first 10" rule would have kept class A only


def test_text_source_makes_token_blocks_and_holds_out_the_tail(tmp_path: Path) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    data = prepared("causal-lm", {"source": "text", "train_file": str(path), "block_size": 32, "test_fraction": 0.1},
                    tokenizer=byte_level_tokenizer())
    assert data.label_names == [] and len(data.train) + len(data.test) == 1000 // 32
    assert len(data.test) == math.ceil(0.1 * 31)
    first, last = data.train[0], data.test[len(data.test) - 1]
    assert torch.equal(first["input_ids"], first["labels"])
    assert bytes(first["input_ids"].tolist()).decode() == text[:32]
    assert bytes(last["input_ids"].tolist()).decode() == text[30 * 32: 31 * 32]   # the text's tail, in order


def test_byte_level_tokenizer_is_the_utf8_bytes() -> None:
    tokenizer = byte_level_tokenizer()
    text = 'First Citizen:\n"Before" we proceed — é'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokenizer) == 256 and ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_npz_arrays_become_model_sized_images_with_class_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 3
    path = tmp_path / "train.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array(["shirt", "shoe", "bag"]),
             source_split=np.array("train"))
    data = prepared("image-classification", {"source": "npz", "train_file": str(path), "test_file": str(path),
                                             "image_column": "images", "label_column": "labels",
                                             "label_names_key": "class_names"},
                    SimpleNamespace(image_size=14, num_channels=3))
    assert data.label_names == ["shirt", "shoe", "bag"]      # the file's names, in id order (not sorted)
    item = data.train[5]
    assert item["pixel_values"].shape == (3, 14, 14) and item["labels"] == 2
    expected = torch.nn.functional.interpolate(torch.from_numpy(images[5:6]).float()[None] / 255, size=(14, 14),
                                               mode="bilinear", antialias=True)[0, 0]
    assert torch.allclose(item["pixel_values"][0], expected) and torch.equal(item["pixel_values"][0], item["pixel_values"][2])


def test_imagefolder_labels_come_from_folder_names_and_sizes_are_unified(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for label, colour in (("cat", 40), ("dog", 220)):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10 + i, 12), (colour, colour, colour)).save(tmp_path / split / label / f"{i}.png")
    data = prepared("image-classification", {"source": "imagefolder", "train_dir": str(tmp_path / "train"),
                                             "test_dir": str(tmp_path / "test")},
                    SimpleNamespace(image_size=[8, 8], num_channels=1))
    assert data.label_names == ["cat", "dog"] and len(data.train) == 6
    for index in range(len(data.train)):
        item = data.train[index]
        assert item["pixel_values"].shape == (1, 8, 8)
        assert item["pixel_values"].mean().item() == pytest.approx((40 if item["labels"] == 0 else 220) / 255, abs=0.01)


def test_pixel_values_convert_layouts_and_channels() -> None:
    rgb = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    gray = pixel_values(rgb, 1, None)
    assert gray.shape == (2, 1, 4, 4) and torch.allclose(gray, torch.full_like(gray, 0.587))
    floats = np.full((1, 6, 6), 0.5, dtype=np.float32)                    # float pixels are kept as they are
    assert torch.equal(pixel_values(floats, None, None), torch.full((1, 1, 6, 6), 0.5))
    rgba = np.zeros((1, 5, 5, 4), dtype=np.uint8)                          # alpha is dropped
    assert pixel_values(rgba, 3, (2, 2)).shape == (1, 3, 2, 2)
    with pytest.raises(ConfigError, match="the images have 3 channels and the model's num_channels is 2"):
        pixel_values(rgb, 2, None)


def test_hub_source_picks_the_named_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name: str, config_name: str | None = None) -> datasets.DatasetDict:
        calls.append((name, config_name))
        rows = {"question": ["Who ?", "Where ?", "Who else ?", "Where now ?"], "coarse": [1, 0, 1, 0]}
        features = datasets.Features({"question": datasets.Value("string"),
                                      "coarse": datasets.ClassLabel(names=["LOC", "HUM"])})
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                                     "validation": datasets.Dataset.from_dict(rows, features=features)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    settings = {"source": "hub", "name": "someone/trec", "config_name": "coarse", "test_split": "validation",
                "text_column": "question", "label_column": "coarse"}
    data = prepared("sequence-classification", dict(settings), tokenizer=WordTokenizer())
    assert calls == [("someone/trec", "coarse")]
    assert data.label_names == ["LOC", "HUM"] and len(data.test) == 4       # ClassLabel names kept as they are
    with pytest.raises(ConfigError, match="data.test_split 'dev' is not a split of 'someone/trec'; its splits: train, validation"):
        prepared("sequence-classification", {**settings, "test_split": "dev"}, tokenizer=WordTokenizer())


def test_hub_failure_names_data_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(name: str, config_name: str | None = None) -> None:
        raise ConnectionError(f"Couldn't reach {name!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"data.name 'nope/nothing': datasets.load_dataset failed \(ConnectionError"):
        prepared("causal-lm", {"source": "hub", "name": "nope/nothing"}, tokenizer=byte_level_tokenizer())


@pytest.mark.parametrize("settings, task, message", [
    ({"source": "parquet"}, "causal-lm", "data.source 'parquet' is not a data source; choose one of hub, csv, tsv"),
    ({"source": "npz", "train_file": "x.npz"}, "causal-lm", "data.source 'npz' cannot feed task 'causal-lm'"),
    ({"source": "tsv"}, "sequence-classification", "data.train_file is required for data.source tsv"),
    ({"source": "tsv", "train_file": "no/such.tsv"}, "sequence-classification",
     "data.train_file: file 'no/such.tsv' not found"),
    ({"source": "tsv", "train_file": "TRAIN", "test_file": "no.tsv"}, "sequence-classification",
     "data.test_file: file 'no.tsv' not found"),
    ({"source": "imagefolder", "train_dir": "TRAIN"}, "image-classification", "train.tsv' not found (it is a file)"),
    ({"source": "tsv", "train_file": "TRAIN", "block_size": 8}, "sequence-classification",
     "unknown key data.block_size; data.source tsv with task sequence-classification takes:"),
    ({"source": "tsv", "train_file": "TRAIN", "text_colum": "t"}, "sequence-classification",
     "unknown key data.text_colum (did you mean 'text_column'?)"),
    ({"source": "tsv", "train_file": "TRAIN", "test_fraction": 1.5}, "sequence-classification",
     "data.test_fraction must be in (0, 1)"),
    ({"source": "tsv", "train_file": "TRAIN", "max_train_samples": 0}, "sequence-classification",
     "data.max_train_samples must be a positive integer or null"),
    ({"source": "tsv", "train_file": "TRAIN", "seed": "x"}, "sequence-classification", "data.seed must be an integer"),
    ({"source": "hub", "name": 5}, "causal-lm", "data.name must be a Hugging Face Hub dataset name"),
])
def test_data_errors_name_the_key(tmp_path: Path, settings: dict[str, Any], task: str, message: str) -> None:
    train = write_tsv(tmp_path / "train.tsv")
    settings = {k: str(train) if v == "TRAIN" else v for k, v in settings.items()}
    with pytest.raises(ConfigError) as error:
        validate_data(settings, task, TASKS[task].data_keys)
    assert message in str(error.value)


@pytest.mark.parametrize("key, column", [("text_column", "question"), ("label_column", "coarse")])
def test_unknown_columns_name_the_key(tmp_path: Path, key: str, column: str) -> None:
    train = write_tsv(tmp_path / "train.tsv")
    with pytest.raises(ConfigError) as error:
        prepared("sequence-classification", {"source": "tsv", "train_file": str(train), key: column},
                 tokenizer=WordTokenizer())
    assert str(error.value).startswith(f"data.{key} {column!r} is not a column of data.train_file ")
    assert "its columns: label, text; its first line is read as column names" in str(error.value)


def write_headerless(path: Path, rows: list[tuple[str, str]], delimiter: str = "\t") -> Path:
    """SST-2-like lines ``sentence<TAB>label`` from the first line on: no header line."""
    path.write_text("".join(f"{text}{delimiter}{label}\n" for label, text in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("source, delimiter", [("tsv", "\t"), ("csv", ",")])
def test_a_file_without_header_line_reads_every_line_with_the_named_columns(tmp_path: Path, source: str,
                                                                           delimiter: str) -> None:
    rows = [("1", "a charming journey"), ("0", "dull"), ("1", "moving"), ("0", "flat")]
    train = write_headerless(tmp_path / "train.txt", rows * 3, delimiter)
    test = write_headerless(tmp_path / "test.txt", rows[::-1], delimiter)
    data = prepared("sequence-classification", {"source": source, "train_file": str(train), "test_file": str(test),
                                                "header": False, "columns": ["sentence", "label"],
                                                "text_column": "sentence"}, tokenizer=WordTokenizer())
    assert len(data.train) == 12 and len(data.test) == 4          # the first line is an example, not a header
    assert "".join(map(chr, data.test[3]["input_ids"])) == "a charming journey"
    assert data.label_names == ["0", "1"] and [row["labels"] for row in data.test] == [0, 1, 0, 1]


def test_a_file_without_header_line_read_as_if_it_had_one_is_refused_with_the_keys(tmp_path: Path) -> None:
    rows = [("1", "a charming journey"), ("0", "dull"), ("1", "moving"), ("0", "flat")]
    train = write_headerless(tmp_path / "train.tsv", rows * 3)
    test = write_headerless(tmp_path / "test.tsv", rows[::-1])
    settings = {"source": "tsv", "train_file": str(train), "test_file": str(test), "text_column": "sentence"}
    with pytest.raises(ConfigError, match=r"start with different header lines \(\['a charming journey', '1'\] vs "
                                          r"\['flat', '0'\]\).*data.header: false and data.columns"):
        prepared("sequence-classification", settings, tokenizer=WordTokenizer())
    with pytest.raises(ConfigError, match=r"data.text_column 'sentence' is not a column.*its first line is read as "
                                          r"column names.*data.header: false and data.columns"):
        prepared("sequence-classification", {**settings, "test_file": None}, tokenizer=WordTokenizer())


@pytest.mark.parametrize("extra, message", [
    ({"header": False}, "data.header is false, so data.columns must name the columns in file order"),
    ({"columns": ["sentence", "label"]}, "data.columns names the columns of a file without a header line: set "
                                         "data.header: false too"),
    ({"header": "no", "columns": ["a", "b"]}, "data.header must be true (the first line names the columns) or false"),
    ({"header": False, "columns": "sentence,label"}, "data.columns must be a list of column names"),
    ({"header": False, "columns": ["s", "s"]}, "data.columns must be distinct, non-empty column names"),
    ({"header": False, "columns": ["sentence"]}, "data.train_file '{train}': its first line has 2 tab-separated "
                                                 "field(s) ['dull', '0'], but data.columns names 1 (sentence)"),
])
def test_header_and_columns_errors_name_the_key(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    train = write_headerless(tmp_path / "train.tsv", [("0", "dull"), ("1", "moving")])
    with pytest.raises(ConfigError) as error:
        validate_data({"source": "tsv", "train_file": str(train), "text_column": "sentence", **extra},
                      "sequence-classification", TASKS["sequence-classification"].data_keys)
    assert message.format(train=train) in str(error.value)


def test_a_text_column_of_numbers_or_a_single_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "numbers.csv"
    path.write_text("text,label\n" + "".join(f"t{i % 2},{i % 2}\n" for i in range(8)), encoding="utf-8")
    with pytest.raises(ConfigError, match="data.text_column 'label' holds int values such as 0, not text"):
        prepared("sequence-classification", {"source": "csv", "train_file": str(path), "text_column": "label",
                                             "label_column": "text"}, tokenizer=WordTokenizer())
    one_class = write_tsv(tmp_path / "one.tsv", [("DESC", "a"), ("DESC", "b")])
    with pytest.raises(ConfigError, match="data.label_column 'label' has 1 distinct value"):
        prepared("sequence-classification", {"source": "tsv", "train_file": str(one_class)}, tokenizer=WordTokenizer())


def test_npz_missing_array_and_ragged_arrays_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4) % 2)
    with pytest.raises(ConfigError, match="data.image_column 'pixels' is not an array of data.train_file .*"
                                          "its arrays: images, labels"):
        prepared("image-classification", {"source": "npz", "train_file": str(path), "image_column": "pixels",
                                          "label_column": "labels"})
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(5) % 2)
    with pytest.raises(ConfigError, match="differ in length"):
        prepared("image-classification", {"source": "npz", "train_file": str(path), "image_column": "images",
                                          "label_column": "labels"})


def test_text_too_short_for_one_block_names_block_size(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("tiny", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.block_size 32 is longer than the whole text of the train split"):
        prepared("causal-lm", {"source": "text", "train_file": str(path), "block_size": 32},
                 tokenizer=byte_level_tokenizer())
