"""The README's demo command works: `make demo` runs `python -m tests.harness.demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.controlplane import find_binaries

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.cluster
def test_demo_reaches_a_successful_check():
    if find_binaries() is None:
        pytest.fail("control-plane binaries are not built: run `make control-plane`", pytrace=False)
    proc = subprocess.run([sys.executable, "-m", "tests.harness.demo", "--once", "--timeout", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("NAME ", 1)[1]
    row = [line for line in table.splitlines() if line.startswith("local-stack")][0].split()
    assert row[1] == "true", table
