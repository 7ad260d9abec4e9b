"""The examples run and their checks against autograd pass."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_module_example(capsys):
    runpy.run_path(str(EXAMPLES / "custom_module.py"), run_name="__main__")
    assert "both match autograd" in capsys.readouterr().out


def test_ddp_preconditioned_example():
    # a subprocess: mp.spawn re-imports the example as the children's main module
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp_preconditioned.py")],
        capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")])},
    ).stdout  # fmt: skip
    assert "step 9: loss" in out and "replicas identical" in out
