"""The committed Python stubs match what proto/generate.py makes from the .proto files.

Generated files are never edited by hand; this fails when a .proto changed
without regenerating (run ``python proto/generate.py``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    pytest.importorskip("grpc_tools")
    result = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr

