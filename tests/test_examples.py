"""The examples run and their checks against autograd pass."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_custom_module_example(capsys):
    runpy.run_path(str(EXAMPLES / "custom_module.py"), run_name="__main__")
    assert "both match autograd" in capsys.readouterr().out
