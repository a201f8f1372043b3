"""Data sources of `etf-hf train`: a recipe's ``data:`` section -> a `datasets.DatasetDict` of raw columns.

Every source goes through Hugging Face `datasets`, so a recipe can name a Hub dataset as easily as a local
file, and the task (`etf_hf.app.tasks`) sees one kind of object whatever the origin:

==============  ===============================================  ===========================================
``source``      keys (besides the common ones)                   read with
==============  ===============================================  ===========================================
hub             name, config_name, train_split, test_split       ``datasets.load_dataset(name, config_name)``
csv             train_file, test_file, header, columns           datasets' ``csv`` loader
tsv             train_file, test_file, header, columns           ``csv`` with a tab delimiter, quoting off
text            train_file, test_file                            ``text``, one example per file (causal-lm)
npz             train_file, test_file, label_names_key           numpy: the arrays named by the columns
imagefolder     train_dir, test_dir                              ``imagefolder`` (class = sub-folder name)
sklearn_digits  (none)                                           scikit-learn's bundled 8x8 digits
==============  ===============================================  ===========================================

Common keys: ``test_fraction`` (held out when there is no test file/split), ``seed`` (of that split and
of subsets), ``max_train_samples``/``max_test_samples`` (a seeded random subset, for quick runs).

A CSV/TSV file's first line names its columns (``header: true``, the default). A file without that line
(``sentence<TAB>label`` from the first line on) needs ``header: false`` and ``columns: [sentence, label]``, the
names in file order; every line is then an example, and each file's first line must have that many fields.
Train and test files whose first lines differ are refused while loading, with that advice: without it, the
first example of each file would silently become its column names.

TSV is read with quoting disabled because real TSVs (TREC, SST-2) contain unescaped ``"`` characters
that a quoting parser would silently merge across lines; CSV/TSV cells are read verbatim (no "NA" ->
missing conversion), since a question that reads "NA" is text, not a missing value. Relative paths are
relative to the working directory (run from the repository root, ``../shared/data/...`` works).

Columns are checked after loading, by the key that named them (``data.text_column 'txt' is not a column
of ...``), before any mode trains.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .recipe import ConfigError, existing_path, expect, expect_positive_int, reject_unknown

#: Marks a source key without a default: the recipe must set it.
REQUIRED = object()

#: Keys every source accepts, with their defaults.
COMMON_KEYS: dict[str, Any] = {"source": REQUIRED, "test_fraction": 0.2, "seed": 0, "max_train_samples": None,
                               "max_test_samples": None}


@dataclass(frozen=True)
class Source:
    """One kind of data: its own keys (default or `REQUIRED`), the tasks it can feed (None: any), a check
    run while validating (files exist, types) and a loader ``(data settings, {key: column}) -> DatasetDict``.

    The loader returns a "train" split and, when the recipe names one, a "test" split; the task holds out
    ``test_fraction`` itself otherwise, because how to hold out differs (stratified vs. a text's tail).
    """

    keys: dict[str, Any]
    tasks: tuple[str, ...] | None
    check: Callable[[dict[str, Any]], None]
    load: Callable[[dict[str, Any], dict[str, str]], Any]
    origin: Callable[[dict[str, Any], str], str]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def validate_data(value: Any, task: str, task_keys: dict[str, Any]) -> dict[str, Any]:
    """Check ``data:`` for ``task``; returns the settings with every default filled in.

    ``task_keys`` are the task's own keys (columns, ``max_length``, ``block_size``) and their defaults.
    """
    expect(value, dict, "data", "a mapping with 'source'")
    source_name = expect(value.get("source"), str, "data.source", f"one of {', '.join(SOURCES)}")
    if source_name not in SOURCES:
        raise ConfigError(f"data.source {source_name!r} is not a data source; choose one of {', '.join(SOURCES)}")
    source = SOURCES[source_name]
    if source.tasks is not None and task not in source.tasks:
        raise ConfigError(f"data.source {source_name!r} cannot feed task {task!r} (it serves {', '.join(source.tasks)}); "
                          f"use hub, csv or tsv with the task's columns")
    defaults = {**COMMON_KEYS, **source.keys, **task_keys}
    reject_unknown(value, defaults, "data", f"data.source {source_name} with task {task} takes: {', '.join(defaults)}")
    data = {key: value.get(key, default) for key, default in defaults.items()}
    for key in defaults:
        if data[key] is REQUIRED:
            raise ConfigError(f"data.{key} is required for data.source {source_name}")
    fraction = expect(data["test_fraction"], (int, float), "data.test_fraction", "a number in (0, 1)")
    if not 0 < fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {fraction}")
    data["test_fraction"] = float(fraction)
    expect(data["seed"], int, "data.seed", "an integer")
    for key in task_keys:
        if key.endswith("_column"):
            expect(data[key], str, f"data.{key}", "a column name (string)")
    for key in ("max_train_samples", "max_test_samples"):
        expect_positive_int(data[key], f"data.{key}", allow_none=True)
    source.check(data)
    return data


def load_source(data: dict[str, Any], columns: dict[str, str]) -> Any:
    """Load the raw splits and check that every column the task needs is there, naming its key.

    ``columns`` maps a recipe key (``data.text_column``) to the column it names (``text``).
    """
    source = SOURCES[data["source"]]
    splits = source.load(data, columns)
    for split, dataset in splits.items():
        for key, column in columns.items():
            if column not in dataset.column_names:
                hint = ("; its first line is read as column names: for a file without a header line set data.header: "
                        "false and data.columns: [names in file order]") if data.get("header") else ""
                raise ConfigError(f"{key} {column!r} is not a column of {source.origin(data, split)}; "
                                  f"its columns: {', '.join(dataset.column_names)}{hint}")
    return splits


# --------------------------------------------------------------------------------------------------
# The sources
# --------------------------------------------------------------------------------------------------


def _file_keys(folder: bool = False) -> dict[str, Any]:
    prefix = ("train_dir", "test_dir") if folder else ("train_file", "test_file")
    return {prefix[0]: REQUIRED, prefix[1]: None}


def _check_files(folder: bool = False) -> Callable[[dict[str, Any]], None]:
    train_key, test_key = _file_keys(folder)

    def check(data: dict[str, Any]) -> None:
        existing_path(data[train_key], f"data.{train_key}", folder)
        if data[test_key] is not None:
            existing_path(data[test_key], f"data.{test_key}", folder)

    return check


def _file_origin(folder: bool = False) -> Callable[[dict[str, Any], str], str]:
    def origin(data: dict[str, Any], split: str) -> str:
        key = f"{split}_{'dir' if folder else 'file'}"
        return f"data.{key} {data[key]!r}"

    return origin


def _data_files(data: dict[str, Any], folder: bool = False) -> dict[str, str]:
    train_key, test_key = _file_keys(folder)
    files = {"train": str(existing_path(data[train_key], f"data.{train_key}", folder))}
    if data[test_key] is not None:
        files["test"] = str(existing_path(data[test_key], f"data.{test_key}", folder))
    return files


def _load_builder(builder: str, **kwargs: Any) -> Callable[[dict[str, Any], dict[str, str]], Any]:
    """A file source read by one of datasets' packaged builders (csv, text, imagefolder)."""
    folder = builder == "imagefolder"

    def load(data: dict[str, Any], columns: dict[str, str]) -> Any:
        import datasets

        files = _data_files(data, folder)
        if folder:  # every file below the folder; imagefolder labels each by its parent folder's name
            files = {split: f"{path}/**" for split, path in files.items()}
        try:
            return datasets.load_dataset(builder, data_files=files, **kwargs)
        except (ValueError, TypeError, OSError) as error:  # e.g. a ragged CSV row, an unreadable image
            key = f"data.train_{'dir' if folder else 'file'}"
            raise ConfigError(f"{key}: datasets could not read {files} as {builder}: {error}") from None

    return load


def _table_keys() -> dict[str, Any]:
    return {**_file_keys(), "header": True, "columns": None}


def _first_fields(path: str, delimiter: str) -> list[str]:
    """The fields of a file's first line, split as the loader splits them (TSV: on tabs, no quoting)."""
    with open(path, encoding="utf-8", newline="") as file:
        line = file.readline().rstrip("\r\n")
    if delimiter == "\t":
        return line.split("\t")
    return next(csv.reader([line]), [])


def _check_table(delimiter: str) -> Callable[[dict[str, Any]], None]:
    """``header`` and ``columns`` of a csv/tsv source, and, for a file without a header line, that each file's
    first line has as many fields as ``columns`` names."""
    kind = "tab-separated" if delimiter == "\t" else "comma-separated"

    def check(data: dict[str, Any]) -> None:
        _check_files()(data)
        header = expect(data["header"], bool, "data.header", "true (the first line names the columns) or false")
        if data["columns"] is None:
            if not header:
                raise ConfigError("data.header is false, so data.columns must name the columns in file order, "
                                  "e.g. columns: [sentence, label]")
            return
        columns = expect(data["columns"], list, "data.columns", "a list of column names in file order")
        if header:
            raise ConfigError("data.columns names the columns of a file without a header line: set data.header: "
                              "false too, or drop data.columns to use the file's own header line")
        distinct = len(set(columns)) == len(columns)
        if not columns or not distinct or not all(isinstance(name, str) and name for name in columns):
            raise ConfigError(f"data.columns must be distinct, non-empty column names (strings), got {columns!r}")
        for key in ("train_file", "test_file"):
            if data[key] is None:
                continue
            fields = _first_fields(data[key], delimiter)
            if len(fields) != len(columns):
                raise ConfigError(f"data.{key} {data[key]!r}: its first line has {len(fields)} {kind} field(s) "
                                  f"{fields[:4]!r}, but data.columns names {len(columns)} ({', '.join(columns)})")

    return check


def _load_table(delimiter: str, **kwargs: Any) -> Callable[[dict[str, Any], dict[str, str]], Any]:
    """A csv/tsv source: datasets' ``csv`` builder, told the column names when the files have no header line.

    Files with header lines that differ (the first example of each headerless file read as its column names)
    are refused naming both lines and the keys that fix it, instead of datasets' cast error.
    """
    kind = "tsv" if delimiter == "\t" else "csv"

    def load(data: dict[str, Any], columns: dict[str, str]) -> Any:
        import datasets
        from datasets.exceptions import DatasetGenerationCastError

        names = {} if data["header"] else {"header": None, "column_names": data["columns"]}
        if data["header"] and data["test_file"] is not None:
            train, test = (_first_fields(data[key], delimiter) for key in ("train_file", "test_file"))
            if train != test:
                raise ConfigError(f"data.train_file and data.test_file start with different header lines ({train!r} "
                                  f"vs {test!r}); the first line of each file is read as its column names. For files "
                                  f"without a header line set data.header: false and data.columns: [names in file "
                                  f"order]")
        try:
            return datasets.load_dataset("csv", data_files=_data_files(data), delimiter=delimiter, **names, **kwargs)
        except (ValueError, TypeError, OSError, DatasetGenerationCastError) as error:  # e.g. a ragged row
            raise ConfigError(f"data.train_file: datasets could not read {_data_files(data)} as {kind}: "
                              f"{error}") from None

    return load


def _check_hub(data: dict[str, Any]) -> None:
    expect(data["name"], str, "data.name", "a Hugging Face Hub dataset name such as 'SetFit/TREC-QC'")
    for key in ("config_name", "test_split"):
        if data[key] is not None:
            expect(data[key], str, f"data.{key}", "a string or null")
    expect(data["train_split"], str, "data.train_split", "a split name such as 'train'")


def _load_hub(data: dict[str, Any], columns: dict[str, str]) -> Any:
    """``datasets.load_dataset(name, config_name)``; needs the network (or the local datasets cache)."""
    import datasets

    try:
        loaded = datasets.load_dataset(data["name"], data["config_name"])
    except Exception as error:  # noqa: BLE001 - offline, unknown name, gated: all reach the user the same way
        raise ConfigError(f"data.name {data['name']!r}: datasets.load_dataset failed ({type(error).__name__}: {error}); "
                          f"check the name and data.config_name, the network, or use a local file source "
                          f"(csv, tsv, text, npz, imagefolder)") from None
    wanted = {"train": data["train_split"], "test": data["test_split"]}
    splits = {}
    for role, split in wanted.items():
        if split is None:
            continue
        if split not in loaded:
            raise ConfigError(f"data.{role}_split {split!r} is not a split of {data['name']!r}; "
                              f"its splits: {', '.join(loaded)}")
        splits[role] = loaded[split]
    return datasets.DatasetDict(splits)


def _hub_origin(data: dict[str, Any], split: str) -> str:
    return f"split {data[f'{split}_split']!r} of data.name {data['name']!r}"


def _check_npz(data: dict[str, Any]) -> None:
    _check_files()(data)
    if data["label_names_key"] is not None:
        expect(data["label_names_key"], str, "data.label_names_key", "the name of an array of class names, or null")


def _load_npz(data: dict[str, Any], columns: dict[str, str]) -> Any:
    """The arrays named by the task's columns (e.g. ``images``, ``labels``); other arrays in the file may
    have other lengths (the shared Fashion-MNIST files hold ``class_names``), so only those are read.

    ``label_names_key`` names an array of class names; the label column then becomes a `ClassLabel`.
    """
    import datasets

    splits = {}
    for split, path in _data_files(data).items():
        with np.load(path, allow_pickle=False) as arrays:
            present = {name: arrays[name] for name in columns.values() if name in arrays.files}
            names_key = data["label_names_key"]
            if names_key is not None and names_key not in arrays.files:
                raise ConfigError(f"data.label_names_key {names_key!r} is not an array of data.{split}_file {path!r}; "
                                  f"its arrays: {', '.join(arrays.files)}")
            names = [str(name) for name in arrays[names_key]] if names_key is not None else None
            listing = list(arrays.files)
        missing = [name for name in columns.values() if name not in present]
        if missing:  # the same message as load_source's, naming the key
            key = next(key for key, name in columns.items() if name == missing[0])
            raise ConfigError(f"{key} {missing[0]!r} is not an array of data.{split}_file {path!r}; "
                              f"its arrays: {', '.join(listing)}")
        lengths = {name: len(array) for name, array in present.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"data.{split}_file {path!r}: the arrays {lengths} differ in length (one entry per example)")
        features = datasets.Features({name: _array_feature(array) for name, array in present.items()})
        dataset = datasets.Dataset.from_dict(present, features=features)
        label = columns.get("data.label_column")
        if names is not None and label is not None:
            dataset = dataset.cast_column(label, datasets.ClassLabel(names=names))
        splits[split] = dataset
    return datasets.DatasetDict(splits)


def _array_feature(array: np.ndarray) -> Any:
    """A fixed-shape Arrow feature, so images come back as one numpy array instead of nested lists."""
    import datasets

    shape, dtype = array.shape[1:], str(array.dtype)
    if not shape:
        return datasets.Value(dtype)
    kinds = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D, 5: datasets.Array5D}
    if len(shape) not in kinds:
        raise ConfigError(f"data: npz arrays of {len(shape)} dimensions per example are not supported (1 to 5)")
    return kinds[len(shape)](shape=shape, dtype=dtype)


def _load_digits(data: dict[str, Any], columns: dict[str, str]) -> Any:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): no download, always there.

    Pixels (0..16) are scaled to [0, 1] here, as floats, so the task keeps them as they are.
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = datasets.Features({"image": datasets.Array2D(shape=(8, 8), dtype="float32"),
                                  "label": datasets.ClassLabel(names=[str(n) for n in digits.target_names])})
    images = digits.images.astype(np.float32) / 16.0
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": digits.target},
                                                                     features=features)})


def _no_check(data: dict[str, Any]) -> None:
    """sklearn_digits has no settings of its own."""


SOURCES: dict[str, Source] = {
    "hub": Source({"name": REQUIRED, "config_name": None, "train_split": "train", "test_split": None}, None,
                  _check_hub, _load_hub, _hub_origin),
    "csv": Source(_table_keys(), None, _check_table(","), _load_table(",", na_filter=False), _file_origin()),
    "tsv": Source(_table_keys(), None, _check_table("\t"),
                  _load_table("\t", quoting=csv.QUOTE_NONE, na_filter=False), _file_origin()),
    "text": Source(_file_keys(), ("causal-lm",), _check_files(),
                   _load_builder("text", sample_by="document"), _file_origin()),
    "npz": Source({**_file_keys(), "label_names_key": None}, ("image-classification",), _check_npz, _load_npz,
                  _file_origin()),
    "imagefolder": Source(_file_keys(folder=True), ("image-classification",), _check_files(folder=True),
                          _load_builder("imagefolder"), _file_origin(folder=True)),
    "sklearn_digits": Source({}, ("image-classification",), _no_check, _load_digits,
                             lambda data, split: "scikit-learn's digits"),
}
