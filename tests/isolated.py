"""Python code run in a fresh process: what only a new interpreter shows (import cost, import order),
and loading where etf_hf cannot be imported at all (as in a user's environment without the plugin)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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


def run_python_cases(cases: dict[str, str], without_etf_hf: bool = False, timeout: float = 300) -> dict[str, str]:
    """Run several snippets in one fresh process, each in a namespace of its own, one after the other: the
    interpreter start-up and the torch/transformers import (most of a small test's time) are paid once.

    Returns name -> "" for a snippet that ran, else its traceback; a failing snippet does not stop the
    others, so each test asserts on its own case. Snippets that load remote code must use folders of
    distinct names: transformers caches a local folder's remote code under the folder's name.
    """
    program = f"""import json, traceback
errors = {{}}
for name, code in {cases!r}.items():
    try:
        exec(compile(code, name, "exec"), {{"__name__": "__main__"}})
        errors[name] = ""
    except BaseException:
        errors[name] = traceback.format_exc()
print("\\n" + json.dumps(errors))
"""
    result = run_python(program, without_etf_hf=without_etf_hf, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"the shared process failed before reporting its cases:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
