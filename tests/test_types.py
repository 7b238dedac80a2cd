"""The package type-checks (mypy), so the annotations stay honest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_finds_no_errors():
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", str(ROOT / "src" / "netchan")],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
