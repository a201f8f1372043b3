"""Python code run in a fresh process: what only a new interpreter shows (import cost, import order),
and loading where etf_hf cannot be imported at all (as in a user's environment without the plugin)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from typing import NamedTuple

import torch

#: Makes ``import etf_hf`` raise ImportError, as if the package were not installed.
_BLOCK_ETF_HF = "import sys; sys.modules['etf_hf'] = None\n"


def run_python(code: str, without_etf_hf: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -c code``; returns the finished process (stdout/stderr captured as text)."""
    source = (_BLOCK_ETF_HF if without_etf_hf else "") + code
    # The child computes with as many torch threads as this process (conftest sets 1): results compared
    # bit for bit across the two processes depend on how a GEMM is split over threads.
    environment = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=timeout,
                          env=environment)


class Case(NamedTuple):
    """What one snippet of `run_python_cases` did: its traceback ("" when it ran) and what it printed."""

    error: str
    stdout: str
    stderr: str


_MARK = "\n=== isolated case: {} ===\n"


def _split(output: str, names: list[str]) -> dict[str, str]:
    parts = {}
    for name, following in zip(names, [*names[1:], None]):
        start = output.find(_MARK.format(name))
        end = output.find(_MARK.format(following)) if following is not None else -1
        parts[name] = output[start + len(_MARK.format(name)):end if end >= 0 else None] if start >= 0 else ""
    return parts


def run_python_cases(cases: dict[str, str], without_etf_hf: bool = False, timeout: float = 300) -> dict[str, Case]:
    """Run several snippets in one fresh process, each in a namespace of its own, one after the other: the
    interpreter start-up and the torch/transformers import (most of a small test's time) are paid once.

    Returns name -> `Case`: its traceback ("" for a snippet that ran) and its own part of the process's
    stdout and stderr. A failing snippet does not stop the others, so each test asserts on its own case.
    Snippets that load remote code must use folders of distinct names: transformers caches a local
    folder's remote code under the folder's name.
    """
    program = f"""import json, sys, traceback
errors = {{}}
for name, code in {cases!r}.items():
    for stream in (sys.stdout, sys.stderr):
        stream.write({_MARK!r}.format(name))
        stream.flush()
    try:
        exec(compile(code, name, "exec"), {{"__name__": "__main__"}})
        errors[name] = ""
    except BaseException:
        errors[name] = traceback.format_exc()
    sys.stdout.flush()
    sys.stderr.flush()
print("\\n" + json.dumps(errors))
"""
    result = run_python(program, without_etf_hf=without_etf_hf, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"the shared process failed before reporting its cases:\n{result.stderr[-3000:]}")
    printed, _, report = result.stdout.rstrip("\n").rpartition("\n")
    errors = json.loads(report)
    names = list(cases)
    stdout, stderr = _split(printed + "\n", names), _split(result.stderr, names)
    return {name: Case(errors[name], stdout[name], stderr[name]) for name in names}
