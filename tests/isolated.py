"""Python code run in a fresh process: what only a new interpreter shows (import cost, import order),
and loading where etf_hf cannot be imported at all (as in a user's environment without the plugin)."""
from __future__ import annotations

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
