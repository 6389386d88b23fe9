"""Every example script finishes on a tiny budget."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, args", [("basic_vae.py", ["--epochs", "1", "--subset", "500"])])
def test_example_runs(script, args, tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
