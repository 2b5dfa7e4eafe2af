"""Run a script in a child process under Triton's CPU interpreter and read its JSON report.

TRITON_INTERPRET is read when ``@triton.jit`` runs, that is when a kernel module is first
imported, and other tests in this process may already have imported it without the
variable; so interpreter cases run in one child started with TRITON_INTERPRET=1. The
child gets the calling test file's path as argv[1] (to load its case tables) and must
print one JSON object.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_interpreted(child: str, test_file: str) -> dict:
    pytest.importorskip("triton")
    # The child loads the test file, which imports this module and its sibling tests.
    path = os.pathsep.join(p for p in (str(Path(test_file).parent), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", child, test_file], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)
