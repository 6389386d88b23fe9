"""Run directories: their files, checkpoints, lock, and loading a run back."""

from .directory import Run, RunDirectory, RunLocked, load_run
from .files import CheckpointError

__all__ = ["CheckpointError", "Run", "RunDirectory", "RunLocked", "load_run"]
