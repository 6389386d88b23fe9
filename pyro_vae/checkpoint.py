"""Checkpoints and the files of a run directory, written atomically.

A run directory holds::

    config.json     everything needed to rebuild the model, the data and the training
    checkpoint.pt   model and optimiser state, history and RNG state (every epoch)
    history.csv     one row per epoch
    metrics.json    final evaluation numbers
    figures/        PNG figures

Every file is written to a temporary name in the same folder, flushed to
disk and then renamed over the old one, so a run killed at any moment leaves
either the old file or the new one, never half of one. Checkpoints are
loaded with ``torch.load(..., weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "pyro-vae-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG, CHECKPOINT, HISTORY, METRICS, FIGURES = "config.json", "checkpoint.pt", "history.csv", "metrics.json", "figures"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used; the message names the fix."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; is {path.parent} a pyro-vae run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore it or start a new run.") from err


def write_history_csv(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in history for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


def save_checkpoint(
    path: Path,
    *,
    model_state: dict,
    optimizer_state: dict,
    epoch: int,
    history: list[dict],
    config: dict,
    position: dict | None = None,
) -> None:
    """Atomically save everything needed to continue training exactly where it stopped.

    ``epoch`` is the last complete epoch; ``position`` describes an epoch
    interrupted part-way (its number, next step, batch order and running
    totals), or is None.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "position": position,
        "config": config,
        "model": model_state,
        "optimizer": optimizer_state,
        "history": history,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check that it is one of ours."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}. Train first (pyro-vae train), or drop --resume to start anew.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, and was refused unread: a checkpoint that "
            f"can run code when loaded is not trusted ({_first_line(err)}). "
            "Use a checkpoint written by pyro-vae."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({_first_line(err)}). Delete it and train again, or restore a copy."
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint.")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')}, but this pyro-vae reads version "
            f"{CHECKPOINT_VERSION}. Use the pyro-vae version that wrote it."
        )
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
