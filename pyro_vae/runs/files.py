"""The files of a run directory, written atomically; checkpoints loaded safely.

Every file is written to a temporary name in the same folder, flushed to
disk and then renamed over the old one, so a run killed at any moment, or a
disk that fills while writing, leaves either the old file or the new one,
never half of one. A write that fails (a full disk, say) removes its
temporary file and raises :class:`CheckpointError` saying that the previous
file is intact. Checkpoints are loaded with ``torch.load(..., weights_only=True)``,
which refuses pickled code. The names of the files are
:class:`pyro_vae.runs.directory.RunDirectory`'s.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..checks import first_line

CHECKPOINT_FORMAT = "pyro-vae-checkpoint"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks the objective's state and the best epoch, which default


class CheckpointError(RuntimeError):
    """A checkpoint or run directory that cannot be used; the message names the fix."""


def _umask() -> int:
    """The process's umask (read by setting it, and set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is private (0600); a run's files are as open() makes them
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        cause = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else f"{err.strerror or err}"
        raise CheckpointError(
            f"Could not write {path}: {cause}; {kept}. Free space (or fix the folder) and run the command again; "
            "a training run continues with --resume."
        ) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


#: How the numbers that JSON has no literal for are written, as strings, so that every file is strict JSON
#: (RFC 8259) that any reader takes; :func:`read_json` turns them back into floats.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _spelled_out(obj):
    """``obj`` with every NaN or infinite float replaced by its name in :data:`NON_FINITE`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {key: _spelled_out(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_spelled_out(value) for value in obj]
    return obj


def _read_back(obj):
    """The inverse of :func:`_spelled_out`."""
    if isinstance(obj, str):
        return NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {key: _read_back(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_read_back(value) for value in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON: a NaN (the standard error of one point) or an infinity (a Pareto k of a
    tail too short to fit) becomes the string of :data:`NON_FINITE`."""
    text = json.dumps(_spelled_out(obj), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; is {path.parent} a pyro-vae run directory?")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore it or start a new run.") from err
    if not isinstance(content, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(content).__name__}, not the object pyro-vae writes; restore it or start a "
            "new run."
        )
    return _read_back(content)  # the files of earlier versions, with NaN and Infinity bare, read as well


def write_history_csv(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in history for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


def save_checkpoint(
    paths: Path | tuple[Path, ...],
    *,
    model_state: dict,
    optimizer_state: dict,
    epoch: int,
    history: list[dict],
    config: dict,
    position: dict | None = None,
    objective_state: dict | None = None,
    best_epoch: int | None = None,
    rng: dict | None = None,
    averaging: dict | None = None,
    compiled_step: dict | None = None,
) -> None:
    """Atomically save everything needed to continue training exactly where it stopped, to each of ``paths``.

    ``epoch`` is the last complete epoch; ``position`` describes an epoch
    interrupted part-way (its number, next step, batch order and running
    totals), or is None. ``objective_state`` is the objective's own
    (:meth:`pyro_vae.infer.objective.Objective.state_dict`); ``best_epoch`` the
    epoch of the best checkpoint so far; ``rng`` the random number generators'
    states (by default this process's, :func:`rng_state`). With an average of the weights
    (:mod:`pyro_vae.training.averaging`), ``model_state`` is the average and ``averaging`` holds the
    iterates (``"iterates"``) and how many steps the average spans (``"steps"``); else None. ``compiled_step``
    is the compiled step's own (:meth:`pyro_vae.accel.training_step.CompiledStep.state_dict`), or None.
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
        "objective": objective_state or {},
        "best_epoch": best_epoch,
        "rng": rng_state() if rng is None else rng,
        "averaging": averaging,
        "compiled_step": compiled_step,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for path in (paths,) if isinstance(paths, str | Path) else paths:
        atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check that it is one of ours."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"No checkpoint at {path}. Train first (pyro-vae train), or drop --resume to start anew.")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is no checkpoint of ours
        raise CheckpointError(
            f"{path} is truncated or corrupt, or not a checkpoint that pyro-vae wrote (not PyTorch's zip archive). "
            "Delete it and train again, or restore a copy."
        )
    try:  # torch.load does not check the archive's checksums: a flipped bit would load as a changed weight
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        damaged = f"the archive itself ({first_line(err)})"
    if damaged is not None:
        raise CheckpointError(
            f"{path} is corrupt: {damaged} does not match its checksum. Restore a copy, or delete it and train again."
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = str(err).partition("WeightsUnpickler error:")[2].strip().splitlines()
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data ({found[0] if found else first_line(err)}), "
            "and was refused unread: a checkpoint that can run code when loaded is not trusted. Use a checkpoint "
            "written by pyro-vae."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({first_line(err)}). Delete it and train again, or restore a copy."
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint.")
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path} has checkpoint format version {state.get('version')}, but this pyro-vae reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Use the pyro-vae version that wrote it."
        )
    state.setdefault("objective", {})
    state.setdefault("best_epoch", None)
    state.setdefault("averaging", None)
    return state


def rng_state() -> dict:
    """This process's random number generators' states: torch's (CPU and every GPU), Python's and NumPy's, which
    ``pyro.set_rng_seed`` seeds with them and a model of one's own may draw from. NumPy's key is kept as a
    tensor, so that checkpoints load with ``weights_only=True``."""
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), position, has_gauss, cached_gaussian),
    }


def restore_rng(rng: dict) -> None:
    """Set this process's generators to the states :func:`rng_state` returned (checkpoints written before
    2026-12-07 hold torch's alone)."""
    torch.set_rng_state(rng["torch"].cpu())  # a checkpoint loaded onto a GPU brings its states along
    if rng["cuda"] and torch.cuda.is_available():
        for device, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state.cpu(), device)
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        kind, key, position, has_gauss, cached_gaussian = rng["numpy"]
        np.random.set_state((kind, key.cpu().numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
