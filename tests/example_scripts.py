"""Running the scripts of ``examples/`` from the tests: as a process on one thread, or imported as a module."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The finished process of ``examples/SCRIPT ARGS`` run in ``cwd`` on one thread."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def load_example(script: str):
    """The module of ``examples/SCRIPT``, imported without running its ``main``."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
