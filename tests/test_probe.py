"""`etf-hf probe`: the per-block collapse table of a recipe's model, its JSON and PNG, and its errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import etf_hf
from etf_hf.app import cli
from etf_hf.app.treatments import probe_subset
from etf_hf.app.probe import probe
from etf_hf.app.runner import ConfigError, apply_overrides, build_model, load_config, load_data, validate

#: The quickstart shrunk to a 2-block, 16-wide ViT: building and probing take a second.
TINY = ["model.from_config.hidden_size=16", "model.from_config.num_hidden_layers=2",
        "model.from_config.num_attention_heads=2", "model.from_config.intermediate_size=32"]


def test_probe_measures_the_recipes_initial_patched_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "probe"
    assert cli.main(["probe", "--mode", "etf", "--samples", "300", "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "neural collapse per block on 300 train examples" in printed and "effective depth" in printed

    saved = json.loads((out / "collapse.json").read_text())
    assert saved["mode"] == "etf" and saved["examples"] == 300 and saved["split"] == "train"
    assert [row["layer"] for row in saved["rows"]] == [0, 1]
    assert (out / "collapse.png").read_bytes().startswith(b"\x89PNG")

    # the same numbers from the library calls: the model `etf-hf train` would start the 'etf' mode from
    raw, name = load_config(None)
    spec = validate(apply_overrides(raw, TINY), name)
    data = load_data(spec)
    model = etf_hf.patch(build_model(spec, data, spec.training["seed"]), spec.modes[1].etf)
    expected = etf_hf.collapse_report(model, probe_subset(data.train, 300, spec.data["seed"]), num_classes=10)
    for got, want in zip(saved["rows"], expected.rows):
        assert got["ncc"] == pytest.approx(want["ncc"]) and got["nc1"] == pytest.approx(want["nc1"])
    assert saved["effective_depth"] == expected.effective_depth
    for row in expected.rows:
        assert f"{row['ncc']:.4f}" in printed


def test_threshold_zero_makes_every_block_collapsed(tmp_path: Path) -> None:
    assert cli.main(["probe", "--samples", "100", "--threshold", "0", "--split", "test",
                     "--output", str(tmp_path), *TINY]) == 0
    saved = json.loads((tmp_path / "collapse.json").read_text())
    assert saved["effective_depth"] == 0 and saved["split"] == "test" and saved["mode"] is None


def test_samples_zero_measures_the_whole_split(tmp_path: Path) -> None:
    assert cli.main(["probe", "--samples", "0", "--split", "test", "--output", str(tmp_path), *TINY]) == 0
    assert json.loads((tmp_path / "collapse.json").read_text())["examples"] == 360  # the quickstart's test split


@pytest.mark.parametrize("args, message", [
    (["--mode", "nope"], "--mode 'nope' is not a mode of this recipe; modes: full, etf"),
    (["--mode", "etf", "--checkpoint", "x"], "--mode and --checkpoint exclude each other"),
    (["--checkpoint", "/no/such/run/etf"], "holds no config.json"),
    (["--threshold", "2"], "--threshold 2.0"),
    (["--samples", "-5"], "--samples -5"),
    (["model.from_config.hidden_sise=3"], "model.from_config.hidden_sise"),
])
def test_probe_errors_name_the_problem(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", *args, *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("etf-hf: error: ") and message in err and "Traceback" not in err


def test_probe_of_the_unpatched_model_differs_from_the_patched_one(tmp_path: Path) -> None:
    for mode in ("full", "etf"):
        assert cli.main(["probe", "--mode", mode, "--samples", "200", "--output", str(tmp_path / mode), *TINY]) == 0
    full, etf = (json.loads((tmp_path / m / "collapse.json").read_text())["rows"] for m in ("full", "etf"))
    assert [r["nc1"] for r in full] != pytest.approx([r["nc1"] for r in etf])


def test_probe_refuses_a_task_without_classes(tmp_path: Path) -> None:
    raw, name = load_config(None)
    spec = dataclasses.replace(validate(apply_overrides(raw, TINY), name), task="causal-lm")
    with pytest.raises(ConfigError, match="task 'causal-lm' has no class labels"):
        probe(spec, output=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before building or writing anything
