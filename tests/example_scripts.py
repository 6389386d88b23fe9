"""Running the scripts of ``examples/`` from the tests: as a process on one thread, imported as a module, or
its ``main`` called in this process (a command refused before any work, without a process's 3 s of imports)."""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def refusal_of(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``examples/SCRIPT ARGS`` in ``cwd``, a command the script refuses before any work, its ``main`` called here.

    The same arguments, checks, messages and exit status as :func:`run_example`'s process (a ``SystemExit``
    message goes to stderr with status 1, as the interpreter would write it), without its 3 s of imports.
    Fails the test if the command goes ahead.
    """
    module = load_example(script)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [script, *args])
        try:
            module.main()
        except SystemExit as refused:
            code = refused.code
    assert code not in (0, None), f"examples/{script} {' '.join(args)} went ahead:\n{stderr.getvalue()[-2000:]}"
    if isinstance(code, str):
        stderr.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())
