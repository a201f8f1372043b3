"""The committed tables' scripts at tiny sizes: examples/reproduce_mlp.py and examples/vit_fashion_mnist.py.

Both need Fashion-MNIST (Debian's dataset-fashion-mnist or ../shared/data) and skip cleanly without it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import reproduce_mlp  # noqa: E402

pytestmark = pytest.mark.slow
SHARED_FMNIST = REPO.parent / "shared" / "data" / "fashion_mnist"


def run_script(*args: str, timeout: int = 600) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(markdown: str, key_column: int) -> dict[str, list[str]]:
    """Markdown table rows (header skipped) keyed by one column's text."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ")]
    return {cells[key_column]: cells for cells in rows[1:]}


def test_mlp_reproduction_puts_controls_next_to_the_etf_with_paired_intervals(tmp_path: Path) -> None:
    if reproduce_mlp.debian_files() is None and not SHARED_FMNIST.exists():
        pytest.skip("no Fashion-MNIST (apt install dataset-fashion-mnist, or ../shared/data)")
    tiny = ["--set", "training.epochs=1", "seeds=[0,1]", "data.train_limit=512", "data.test_limit=256",
            "data.probe_size=256", "model.hidden_size=32"]
    script = str(REPO / "examples" / "reproduce_mlp.py")
    run_script(script, *tiny, "--modes", "baseline", "etf_last_3", "--output-dir", str(tmp_path / "a"))
    run_script(script, *tiny, "--modes", "ctl_zero_last_3", "ctl_frozen_last_3", "--output-dir", str(tmp_path / "b"))
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [r["seed"] for r in metrics["results"]["ctl_zero_last_3"]] == [0, 1]

    table = run_script(script, *tiny, "--table", str(tmp_path / "a"), str(tmp_path / "b"))
    rows = table_rows(table, key_column=1)
    assert list(rows) == ["baseline", "etf_last_3", "ctl_zero_last_3", "ctl_frozen_last_3"]  # grouped by placement
    assert rows["etf_last_3"][2] == "ETF" and rows["ctl_zero_last_3"][2] == "control"
    zero = [r["test_accuracy"] for r in metrics["results"]["ctl_zero_last_3"]]
    etf = [r["test_accuracy"] for r in json.loads((tmp_path / "a" / "metrics.json").read_text())["results"]["etf_last_3"]]
    mean_difference = 100 * sum(z - e for z, e in zip(zero, etf)) / 2
    assert rows["ctl_zero_last_3"][6].startswith(f"{mean_difference:+.2f} [".replace("-", "−"))  # Δ vs the ETF here
    assert rows["etf_last_3"][6] == "–" and "Test set: 256 images" in table


def test_mlp_table_refuses_runs_with_different_settings(tmp_path: Path, capsys) -> None:
    if reproduce_mlp.debian_files() is None and not SHARED_FMNIST.exists():
        pytest.skip("no Fashion-MNIST (apt install dataset-fashion-mnist, or ../shared/data)")
    script = str(REPO / "examples" / "reproduce_mlp.py")
    tiny = ["training.epochs=1", "seeds=[0]", "data.train_limit=256", "data.test_limit=128", "data.probe_size=128",
            "model.hidden_size=16"]
    run_script(script, "--set", *tiny, "--modes", "baseline", "--output-dir", str(tmp_path / "a"))
    run_script(script, "--set", *tiny, "training.learning_rate=0.1", "--modes", "etf_last_3",
               "--output-dir", str(tmp_path / "b"))
    # the merged table in this process (what `--table` calls; the test above runs the command itself)
    with pytest.raises(SystemExit, match="differ in data, model or training"):
        reproduce_mlp.print_merged_table([tmp_path / "a", tmp_path / "b"], reproduce_mlp.DEFAULT_CONFIG)
    # more seeds may come from another invocation, but one seed of a mode only once
    run_script(script, "--set", *tiny[:1], "seeds=[1]", *tiny[2:], "--modes", "baseline", "--output-dir", str(tmp_path / "c"))
    reproduce_mlp.print_merged_table([tmp_path / "a", tmp_path / "c"], reproduce_mlp.DEFAULT_CONFIG)
    table = capsys.readouterr().out
    assert len(table_rows(table, key_column=1)["baseline"][4].split(", ")) == 2  # seeds 0 and 1 in one row
    with pytest.raises(SystemExit, match="two results for a seed"):
        reproduce_mlp.print_merged_table([tmp_path / "a", tmp_path / "a"], reproduce_mlp.DEFAULT_CONFIG)


def test_vit_table_labels_controls_and_adds_rows_to_earlier_results(tmp_path: Path) -> None:
    if not SHARED_FMNIST.exists():
        pytest.skip("../shared/data/fashion_mnist is absent")
    script = str(REPO / "examples" / "vit_fashion_mnist.py")
    common = ["--epochs", "0.1", "--seeds", "0", "1", "--hidden", "16", "--layers", "1", "--output", str(tmp_path)]
    run_script(script, *common, "--modes", "full", "etf-orthogonal", "--json", str(tmp_path / "first.json"))
    table = run_script(script, *common, "--modes", "control-zero", "--include", str(tmp_path / "first.json"))
    rows = table_rows(table, key_column=0)
    assert list(rows) == ["full", "etf-orthogonal", "control-zero"]
    assert rows["etf-orthogonal"][1] == "ETF" and rows["control-zero"][1] == "control"
    assert "[" in rows["control-zero"][4] and "Test set: 2,000 images" in table


def test_development_sets_load_with_their_documented_splits_and_run_the_lock_study(tmp_path: Path) -> None:
    """configs/mlp_digits_dev.yaml and configs/mlp_synthetic_dev.yaml (docs/results/adaptive_lock_dev_digits.md):
    the sets are deterministic, split as documented, and a tiny run of the dev config records late locks."""
    pytest.importorskip("sklearn")
    digits, _ = reproduce_mlp.load_fashion_mnist({"source": "digits"})
    assert [len(digits[s][1]) for s in ("train", "test")] == [1400, 397] and digits["train"][0].shape[1:] == (8, 8)
    assert digits["train"][0].dtype.name == "uint8" and digits["train"][0].max() == 255
    synthetic, _ = reproduce_mlp.load_fashion_mnist({"source": "synthetic"})
    again, _ = reproduce_mlp.load_fashion_mnist({"source": "synthetic"})
    assert [len(synthetic[s][1]) for s in ("train", "test")] == [8000, 2000] and synthetic["train"][0].shape[1] == 64
    assert (synthetic["train"][0] == again["train"][0]).all() and set(synthetic["train"][1].tolist()) == set(range(10))
    run_script(str(REPO / "examples" / "reproduce_mlp.py"), "--config", str(REPO / "configs" / "mlp_digits_dev.yaml"),
               "--set", "training.epochs=2", "seeds=[0]", "modes.1.adaptive.patience=1", "--modes", "adaptive",
               "--output-dir", str(tmp_path))
    [run] = json.loads((tmp_path / "metrics.json").read_text())["results"]["adaptive"]
    # every block is above 0.9 from epoch 1 on digits, so with patience 1 all qualify at the last check (epoch 2,
    # step 88): too late to lock, recorded instead
    assert run["lock_epochs"] == {} and run["late_locks"] == [{"blocks": [0, 1, 2, 3], "step": 88, "epoch": 2.0}]
