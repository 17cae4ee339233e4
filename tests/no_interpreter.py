"""Scripts run in a fresh process without TRITON_INTERPRET (set by conftest.py on machines without a GPU): under the
interpreter a kernel launched on fake tensors would run on them, where these tests need it traced, analysed or
compiled to TTIR as Inductor does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def run_script(script: str, *args: str, verify_trace_cache: bool = False) -> str:
    """The script's stdout; the test fails with its stderr if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if verify_trace_cache:
        env["DPCOMPILE_VERIFY_TRACE_CACHE"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def last_json(stdout: str) -> Any:
    """The JSON object a script prints on its last line."""
    return json.loads(stdout.strip().splitlines()[-1])
