"""The run directory: one module owns its layout, its lock, and loading a run back.

A run directory holds::

    config.json       everything needed to rebuild the model, the data and the training
    checkpoint.pt     model, optimiser, objective and RNG state, history (after every epoch)
    best.pt           the same, at the epoch with the best validation metric
    history.csv       one row per epoch
    metrics.json      the test evaluation of the best checkpoint
    test_log_px.npy   per-point test log p(x) by importance sampling, written by ``pyro-vae evaluate``
    evaluations/      per-point results of every evaluation, one .npz per method and settings
    figures/          PNG figures
    starts/           with ``starts`` > 1: the first epochs of each start (``seed-S/``, their config and
                      history once the best is chosen), the weights they began from (``initial.pt``) and
                      the choice (``starts.json``)

Only one process writes a run directory at a time: :meth:`RunDirectory.lock`
takes an exclusive ``flock`` on ``.lock`` (which names the holder's process
id). The kernel drops the lock when its process ends, however it ends, so a
lock left by a killed process never blocks the next run.
"""

from __future__ import annotations

import fcntl
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import TORCHVISION_DATASETS, DataError, Dataset, dataset_from_spec, is_data_file, load_numpy
from ..models import Model, build_model
from ..models.base import completed_model_config
from .files import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_history_csv,
    write_json,
)


class RunLocked(CheckpointError):
    """Another process is writing the run directory."""


class RunDirectory:
    """The files of one run, by name; every read and write of a run goes through here."""

    CONFIG = "config.json"
    CHECKPOINT = "checkpoint.pt"
    BEST = "best.pt"
    HISTORY = "history.csv"
    METRICS = "metrics.json"
    LOG_PX = "test_log_px.npy"
    EVALUATIONS = "evaluations"
    FIGURES = "figures"
    STARTS = "starts"
    #: In :attr:`STARTS`: the weights every start began from, and every start's metric with the choice.
    INITIAL_WEIGHTS, STARTS_RECORD = "initial.pt", "starts.json"
    LOCK = ".lock"
    #: The files of a run's record (:meth:`keep_record`): its settings and what it measured, not its weights.
    RECORD = (CONFIG, HISTORY, METRICS, LOG_PX, f"{STARTS}/{STARTS_RECORD}")
    #: The metrics key of the digest (``parameter_digest``) of the weights whose log p(x) :attr:`LOG_PX` holds.
    LOG_PX_DIGEST = "log_px_model_digest"
    #: The metrics key of the digest (``pyro_vae.evaluate.points_digest``) of the test points :attr:`LOG_PX` is of.
    LOG_PX_TEST_DIGEST = "log_px_test_digest"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def figures(self) -> Path:
        return self.path / self.FIGURES

    def holds_run(self) -> bool:
        """Whether a run has been started here (it has a checkpoint)."""
        return self.file(self.CHECKPOINT).exists()

    def training_finished(self) -> bool:
        """Whether the run's metrics were written after its last checkpoint's epoch: a run stopped between its
        last epoch and its metrics, or extended since they were written (even part-way through an epoch), has
        not finished (resuming it to the same epochs writes them)."""
        if not self.holds_run():
            return False
        state = self.load_checkpoint("last")
        return state["position"] is None and self.read_metrics().get("epochs") == state["epoch"]

    def check_fresh(self) -> None:
        """A new run must not overwrite a finished or interrupted one, nor a run's record (:meth:`keep_record`)."""
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"{self.path} is a file; choose another name for the run, or move the file away.")
        if self.started():
            raise CheckpointError(f"{self.path} already holds a run; resume it (--resume) or choose another name.")
        measured = [name for name in (self.HISTORY, self.METRICS, self.LOG_PX) if self.file(name).exists()]
        measured += [f"{self.EVALUATIONS}/"] if self.evaluation_names() else []
        if measured:
            raise CheckpointError(
                f"{self.path} holds what a run measured ({', '.join(measured)}) but no checkpoint (a kept record, "
                "or a run whose weights were removed): it cannot be resumed, and a new run here would overwrite "
                "it. Choose another name, or move the folder away first."
            )
        self.check_figures()

    def check_figures(self) -> None:
        """Refuse a file where the figures go, before training: they are drawn after it."""
        if self.figures.exists() and not self.figures.is_dir():
            raise CheckpointError(f"{self.figures} is a file where the run's figures go; move it away.")

    def check_resumable(self, command: str | None = "pyro-vae train --resume") -> None:
        """A run to resume, evaluate or load must be here; a folder of runs gets a message that names them, and
        a file of a run its folder, each in an example of ``command`` (None: the path alone)."""
        if self.file(self.CONFIG).exists():
            return
        example = lambda path: f"e.g. {command} {path}" if command else f"e.g. {path}"  # noqa: E731
        if self.path.is_file():
            folder = self.path.parent
            fix = example(folder) if (folder / self.CONFIG).exists() else "such as runs/<name>"
            raise CheckpointError(f"{self.path} is a file, not a run's folder; give the folder of a run, {fix}.")
        runs = sorted(p for p in self.path.glob(f"*/{self.CONFIG}")) if self.path.is_dir() else []
        if runs:
            names = ", ".join(p.parent.name for p in runs)
            raise CheckpointError(
                f"{self.path} is a folder of runs ({names}), not a run; give one of them, {example(runs[-1].parent)}"
            )
        if not self.path.exists():
            raise CheckpointError(f"{self.path} does not exist; give the folder of a run, such as runs/<name>.")
        raise CheckpointError(f"{self.path} holds no pyro-vae run (no {self.CONFIG}); give the folder of a run.")

    def choosing_start(self) -> bool:
        """Whether the run is still training its starts (``fit(starts=...)``): it has them and its config, but no
        checkpoint of its own yet."""
        weights = self.file(self.STARTS) / self.INITIAL_WEIGHTS  # a kept record has the choice, not the weights
        return weights.exists() and self.file(self.CONFIG).exists() and not self.holds_run()

    def started(self) -> bool:
        """Whether a run is here, or one still training its starts: either is resumed, not begun again."""
        return self.holds_run() or self.choosing_start()

    def start(self, seed: int) -> RunDirectory:
        """The run directory of the run's start from ``seed`` (``fit(starts=...)``)."""
        return RunDirectory(self.file(self.STARTS) / f"seed-{seed}")

    def check_weights(self, *, resuming: bool = False) -> None:
        """A run to load, evaluate or resume holds its weights; a study's kept record (config, history, metrics,
        :meth:`keep_record`) does not, nor a run still choosing among its starts (unless ``resuming`` it)."""
        if self.choosing_start():
            if resuming:
                return
            raise CheckpointError(
                f"{self.path} is still training its starts ({self.file(self.STARTS)}) and has no weights of its own "
                f"yet; finish it first: pyro-vae train --resume {self.path}"
            )
        weights = (self.file(self.CHECKPOINT), self.file(self.BEST))
        if self.file(self.CONFIG).exists() and not any(path.exists() for path in weights):
            raise CheckpointError(
                f"{self.path} holds no checkpoint: the record of a run (config, history, metrics) as a study keeps "
                "it, or a run stopped before its first checkpoint; train the run again to evaluate or resume it."
            )

    # ------------------------------------------------------------- the lock
    @contextmanager
    def lock(self):
        """Hold the run directory for writing; refuse, naming the holder, while another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file(self.LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise RunLocked(
                    f"{self.path} is being written by another process (pid {holder}); wait for it to finish or stop "
                    "it (a new run can take another name instead)."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # closing drops the lock

    # ---------------------------------------------------------------- files
    #: What every config.json holds (``None`` where the run used networks or tensors of one's own).
    CONFIG_SECTIONS = {"model": (dict, type(None)), "data": (dict, type(None)), "train": (dict,)}

    def read_config(self) -> dict:
        """The run's config.json, refused with the fix where it lacks a section the run is rebuilt from."""
        config = read_json(self.file(self.CONFIG))
        wrong = [key for key, kinds in self.CONFIG_SECTIONS.items() if not isinstance(config.get(key, ...), kinds)]
        if wrong:
            raise CheckpointError(
                f"{self.file(self.CONFIG)} has no valid {', '.join(repr(key) for key in wrong)} section: it is not "
                "the config.json that pyro-vae wrote for this run. Restore the run's own config.json."
            )
        return config

    def write_config(self, config: dict) -> None:
        write_json(self.file(self.CONFIG), config)

    def save_checkpoint(self, *, best: bool = False, **state) -> None:
        """The checkpoint (atomically) and the history table; with ``best``, then as the best checkpoint.

        The last checkpoint goes first: if the process stops between the two
        writes, it records this epoch as the best while best.pt holds the
        previous best, and the resume rebuilds best.pt from it
        (:meth:`check_best_before_resuming`). Written the other way round, a resume that
        retrains the epoch less than bit for bit (on another device or number
        of processes) would leave best.pt with weights of no recorded epoch.
        """
        paths = (self.file(self.CHECKPOINT), self.file(self.BEST)) if best else (self.file(self.CHECKPOINT),)
        save_checkpoint(paths, **state)
        write_history_csv(self.file(self.HISTORY), state["history"])

    def load_checkpoint(self, which: str = "last", map_location="cpu") -> dict:
        """The last checkpoint, or the best one (``which="best"``; runs older than best.pt give the last)."""
        if which not in ("last", "best"):
            raise ValueError(f"checkpoint must be 'last' or 'best'; got {which!r}.")
        self.check_weights()
        if which == "last" and not self.file(self.CHECKPOINT).exists():  # best.pt is, by check_weights
            best = load_checkpoint(self.file(self.BEST), map_location)
            raise CheckpointError(
                f"{self.file(self.CHECKPOINT)} is missing; {self.file(self.BEST)} is a whole checkpoint of the run's "
                f"best epoch ({best['epoch']}): copy it to {self.CHECKPOINT} to go on from that epoch (the epochs "
                "after it are trained again), or restore the missing file."
            )
        if which == "last" or self.file(self.BEST).exists():
            return load_checkpoint(self.file(self.BEST if which == "best" else self.CHECKPOINT), map_location)
        last = load_checkpoint(self.file(self.CHECKPOINT), map_location=map_location)
        self.check_best_kept(last)
        return last

    def check_best_kept(self, last: dict) -> None:
        """A run whose last checkpoint records its best epoch wrote best.pt: refuse to go on without it (only runs
        older than best.pt, which record none, take their last checkpoint as their best)."""
        if last["best_epoch"] is not None and not self.file(self.BEST).exists():
            raise CheckpointError(
                f"{self.file(self.BEST)} is missing, though the run kept its best epoch ({last['best_epoch']}) there: "
                f"restore it, or load the last checkpoint (epoch {last['epoch']}) with "
                "pv.load_run(run, checkpoint='last')."
            )

    def check_best_before_resuming(self, last: dict) -> None:
        """Before training on: best.pt is readable, of the same model, and holds the best epoch that the last
        checkpoint ``last`` records, so that the run can end with the weights its metrics name.

        A stop between the two writes of a best epoch (:meth:`save_checkpoint`) leaves the last checkpoint at
        that epoch and best.pt at the previous best: best.pt is rebuilt from the last checkpoint. Otherwise a
        best.pt that does not hold the best epoch is refused, before any epoch is trained.
        """
        best_epoch, path = last["best_epoch"], self.file(self.BEST)
        if best_epoch is None:
            return  # a run older than best.pt: its last checkpoint is its best
        at_best = last["position"] is None and last["epoch"] == best_epoch
        problem, later, unreadable = None, None, None
        if not path.exists():
            problem = "is missing"
        else:
            try:
                best = load_checkpoint(path)
            except CheckpointError as err:
                problem, unreadable = "cannot be read (truncated, corrupt, or not a pyro-vae checkpoint)", err
            else:
                if not model_config_matches(best["config"]["model"], last["config"]["model"]):
                    problem = "holds the weights of another model than the last checkpoint"
                elif best["epoch"] != best_epoch:
                    problem = f"holds epoch {best['epoch']}, not the best epoch that the last checkpoint records"
                    later = best["epoch"] if best["epoch"] > last["epoch"] else None
        if problem is None:
            return
        if at_best:  # the last checkpoint is the best epoch: best.pt is a copy of it
            atomic_write_bytes(path, self.file(self.CHECKPOINT).read_bytes())
            return
        fix = (
            f"it is the later checkpoint (a stop between the writes of epoch {later}): copy it over "
            f"{self.file(self.CHECKPOINT)} to resume from epoch {later}"
            if later is not None
            else "restore it, or load the last checkpoint "
            f"(epoch {last['epoch']}) with pv.load_run(run, checkpoint='last') to use what the run has"
        )
        raise CheckpointError(
            f"{path} {problem}, though the run's best epoch ({best_epoch}) is kept there and nowhere else; {fix}."
        ) from unreadable

    def continue_from(self, start: RunDirectory, config: dict) -> None:
        """Make the checkpoints of the run in ``start`` (one of this run's starts) this run's, under its
        ``config``: ``best.pt`` first, then ``checkpoint.pt`` with the history, whose arrival makes this
        directory hold the run (:meth:`holds_run`); a stop between the two leaves the choice to be made again."""
        for name in (self.BEST, self.CHECKPOINT):
            state = start.load_checkpoint("best" if name == self.BEST else "last")
            kept = ("epoch", "position", "history", "best_epoch", "rng", "averaging", "compiled_step")
            save_checkpoint(
                self.file(name),
                model_state=state["model"],
                optimizer_state=state["optimizer"],
                objective_state=state["objective"],
                config=config,
                **{key: state[key] for key in kept},
            )
        write_history_csv(self.file(self.HISTORY), state["history"])

    def drop_weights(self) -> None:
        """Remove the checkpoints, keeping the record (config, history): what is left of a start not continued."""
        for name in (self.CHECKPOINT, self.BEST):
            self.file(name).unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Temporary files left by a process killed while writing (its checkpoints, evaluations or figures)."""
        for stale in self.path.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def read_metrics(self) -> dict:
        return read_json(self.file(self.METRICS)) if self.file(self.METRICS).exists() else {}

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.file(self.METRICS), metrics)

    def write_log_px(self, log_px: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(log_px, dtype=np.float64))
        atomic_write_bytes(self.file(self.LOG_PX), buffer.getvalue())

    def evaluation_path(self, name: str, partial: bool = False) -> Path:
        """The file of the evaluation ``name`` (``partial``: of its batches done so far)."""
        return self.path / self.EVALUATIONS / f"{name}{'.partial' if partial else ''}.npz"

    def evaluation_names(self) -> list[str]:
        """The names of the finished evaluations (method and settings, e.g. ``ais-T400-C16-L2-sigmoid``)."""
        folder = self.path / self.EVALUATIONS
        return sorted(p.name.removesuffix(".npz") for p in folder.glob("*.npz") if ".partial" not in p.name)

    def write_evaluation(self, name: str, arrays: dict[str, np.ndarray], *, partial: bool = False) -> None:
        """Per-point arrays of an evaluation, atomically; ``partial`` for the batches done so far (removed by
        :meth:`remove_partial_evaluation` once the finished one's summary is in ``metrics.json``)."""
        buffer = io.BytesIO()
        np.savez(buffer, **{key: np.asarray(value) for key, value in arrays.items()})
        atomic_write_bytes(self.evaluation_path(name, partial), buffer.getvalue())

    def remove_partial_evaluation(self, name: str) -> None:
        """Remove the batches of an evaluation whose finished file and summary are written."""
        self.evaluation_path(name, partial=True).unlink(missing_ok=True)

    def read_evaluation(self, name: str, *, partial: bool = False) -> dict[str, np.ndarray] | None:
        """An evaluation's per-point arrays; None for a partial one not begun, an error naming the others."""
        path = self.evaluation_path(name, partial)
        if not path.exists():
            if partial:
                return None
            known = ", ".join(self.evaluation_names()) or "none yet"
            raise ValueError(
                f"{self.path} has no evaluation {name!r} (it has: {known}); run pyro-vae evaluate with that method "
                "and those settings first."
            )
        fix = "delete it to start that evaluation again." if partial else "delete it and run pyro-vae evaluate again."
        return load_numpy(path, fix, CheckpointError)

    def keep_headline_apart(self, metrics: dict, digest: str, num_samples: int) -> None:
        """Before an importance-sampled estimate of every test point at K = ``num_samples`` replaces the headline
        of ``metrics`` and :attr:`LOG_PX`: keep a headline of the same weights (``digest``) at another K as the
        named evaluation it is, ``is-K<K>``, in ``metrics["evaluations"]`` and its file, so that no finished
        estimate is lost. Training's (``eval_samples``) has no file of its own until then; its per-point
        values are :attr:`LOG_PX`'s.
        """
        earlier_k = metrics.get("test_num_samples")
        if earlier_k in (None, num_samples) or metrics.get(self.LOG_PX_DIGEST) != digest:
            return
        name = f"is-K{earlier_k}"
        if name in metrics.get("evaluations", {}) or not self.file(self.LOG_PX).exists():
            return
        points = metrics.get(self.LOG_PX_TEST_DIGEST)
        arrays = {"log_px": self.read_log_px(), "model_digest": digest, **({"test_digest": points} if points else {})}
        self.write_evaluation(name, arrays)
        summary = {key.removeprefix("test_"): value for key, value in metrics.items() if key.startswith("test_")}
        summary.update(method="is", seed=metrics.get("log_px_seed", 0))
        if "log_px_batch_size" in metrics:
            summary["batch_size"] = metrics["log_px_batch_size"]
        metrics.setdefault("evaluations", {})[name] = summary
        earlier = metrics.pop("earlier_evaluations", {})
        earlier.pop(name, None)  # its file now holds these weights' numbers
        metrics.update({"earlier_evaluations": earlier} if earlier else {})

    def keep_record(self, destination: str | Path, extra: tuple[str, ...] = ()) -> RunDirectory:
        """Copy the run's record to ``destination``: :attr:`RECORD`, the finished evaluations, and the files
        named in ``extra``, whichever the run has; no checkpoint and no figures (a few hundred kB).

        A record reads like its run (``read_config``, ``read_metrics``, ``read_log_px``,
        ``read_evaluation``) but holds no weights to load or resume: a study that commits its runs'
        records builds its tables from runs trained on machines that are gone. Each file is written
        atomically, so an interrupted copy leaves the previous record's files whole.
        """
        record = RunDirectory(destination)
        record.path.mkdir(parents=True, exist_ok=True)
        for name in (*self.RECORD, *extra):
            if self.file(name).exists():
                record.file(name).parent.mkdir(exist_ok=True)  # starts/
                atomic_write_bytes(record.file(name), self.file(name).read_bytes())
        for name in self.evaluation_names():
            record.evaluation_path(name).parent.mkdir(exist_ok=True)
            atomic_write_bytes(record.evaluation_path(name), self.evaluation_path(name).read_bytes())
        return record

    def read_log_px(self) -> np.ndarray:
        if not self.file(self.LOG_PX).exists():
            raise ValueError(f"{self.path} has no per-point log p(x); run `pyro-vae evaluate {self.path}` first.")
        return load_numpy(
            self.file(self.LOG_PX), f"delete it and run `pyro-vae evaluate {self.path}` again.", CheckpointError
        )


def model_config_matches(saved: dict | None, current: dict | None) -> bool:
    """Whether two model configs describe the same model.

    Configs that predate model types are VAEs; keys that a model type added later
    (its ``legacy_config``) take the value the older runs had.
    """
    if saved is None or current is None:
        return saved == current
    return completed_model_config(saved) == completed_model_config(current)


@dataclass
class Run:
    """A trained run: the model with its weights, the config, the per-epoch history and the checkpoint's epoch."""

    path: Path
    model: Model
    config: dict
    history: list[dict]
    epoch: int

    def load_data(self, *, data_dir: str | None = None, download: bool = False) -> Dataset:
        """The data set the run was trained on, rebuilt from its config (``data_dir``, ``download``: where a
        torchvision data set whose files moved is now, or fetch it; :func:`data_from_config`)."""
        return data_from_config(self.path, self.config, data_dir=data_dir, download=download)


class NotRebuildable(CheckpointError, ValueError):
    """A run whose config cannot rebuild its model (networks of one's own) or data (tensors of one's own): pass
    them yourself. Both a :class:`CheckpointError`, as :func:`~pyro_vae.resume_run` raised, and a ``ValueError``,
    as :func:`load_run` did."""


def model_from_config(path: Path, config: dict) -> Model:
    """The model of the run at ``path`` rebuilt from its ``config``, with fresh weights."""
    if config["model"] is None:
        raise NotRebuildable(
            f"{path} used custom networks; build the same model and pass it as model= (pv.load_run, "
            "pv.evaluate_run, pv.resume_run)."
        )
    try:
        return build_model(config["model"])
    except KeyError as err:
        raise CheckpointError(
            f"{path / RunDirectory.CONFIG} describes its model without {err}, which pyro-vae writes: restore the "
            "run's own config.json."
        ) from err


def data_from_config(path: Path, config: dict, *, data_dir: str | None = None, download: bool = False) -> Dataset:
    """The data set the run at ``path`` was trained on, rebuilt from its ``config``.

    For a torchvision data set, ``data_dir`` is where its files are now, if they moved, and ``download`` lets
    torchvision fetch them; the run's data digests still check that they are the same data.
    """
    if config["data"] is None:
        raise NotRebuildable(
            f"{path} was trained on tensors of your own; pass them as data= (pv.evaluate_run, pv.resume_run), "
            "or load them yourself."
        )
    spec = config["data"]
    if data_dir is not None or download:
        if spec["name"] not in TORCHVISION_DATASETS:
            raise DataError(
                f"{path} was trained on {spec['name']}, not on a torchvision data set: a data folder and a download "
                "apply only to those; drop them."
            )
        spec = {**spec, "data_dir": spec["data_dir"] if data_dir is None else data_dir, "download": download}
    if is_data_file(spec["name"]) and not Path(spec["name"]).exists():
        raise DataError(
            f"{path} was trained on the data file {spec['name']}, which is no longer there; put it back at that "
            "path (config.json records it) to resume or evaluate the run."
        )
    return dataset_from_spec(spec)


def load_run(path: str | Path, *, model: Model | None = None, checkpoint: str = "best", map_location="cpu") -> Run:
    """Rebuild a run's model from ``config.json`` and load a checkpoint into it (``weights_only=True``).

    :param model: for a run whose model has custom networks (its config cannot
        describe them): its weights are loaded into this module.
    :param checkpoint: ``"best"`` (by the model's validation metric; what
        ``metrics.json`` reports) or ``"last"``.
    """
    run = RunDirectory(path)
    run.check_resumable(command=None)
    config = run.read_config()
    state = run.load_checkpoint(checkpoint, map_location=map_location)
    if not model_config_matches(state["config"]["model"], config["model"]):
        raise CheckpointError(
            f"{run.file(run.CONFIG)} describes a different model than the {checkpoint} checkpoint; "
            "restore the config.json that was written with this checkpoint."
        )
    if model is None:
        model = model_from_config(run.path, config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"The weights in {run.path} do not fit the model: {err}") from err
    model.to(torch.device(map_location) if isinstance(map_location, str) else map_location)
    return Run(run.path, model.eval(), config, list(state["history"]), state["epoch"])
