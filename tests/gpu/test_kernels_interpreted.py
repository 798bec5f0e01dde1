"""The Triton kernels checked on the CPU (in CI): interpreted_kernels.py,
interpreted_quant_kernels.py and interpreted_lora_kernels.py under TRITON_INTERPRET=1.

A child process, because the interpreter switch must be set before triton is first imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.parametrize("script", ["interpreted_kernels.py", "interpreted_quant_kernels.py",
                                    "interpreted_lora_kernels.py"])
def test_kernels_under_the_triton_interpreter(script):
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / script)],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
