"""Train and write a complete run directory, figures included; resume one from its directory alone.

:func:`train_run` is what ``pyro-vae train`` does, for any model and data
set from Python: :func:`~pyro_vae.training.engine.fit` writes the config,
checkpoints, history and test metrics, then the figures the model declares
are drawn into ``figures/``. :func:`resume_run` rebuilds the model, the data
and the objective from the run's ``config.json`` and continues it.
"""

from __future__ import annotations

from pathlib import Path

from .data import Dataset
from .infer.objective import completed_objective_config
from .models import Model
from .runs import Run, RunDirectory
from .runs.directory import data_from_config, model_from_config
from .training.engine import LEGACY_SETTINGS, as_dataset, fit


def train_run(model: Model, data, run_dir: str | Path, **settings) -> Run | None:
    """Train ``model`` on ``data`` with :func:`~pyro_vae.training.engine.fit` into ``run_dir``, then draw its figures.

    Takes every keyword argument of ``fit``. Returns the :class:`~pyro_vae.runs.Run`, whose
    model holds the best epoch's weights; on a data-parallel run's processes other than
    the first (which writes the run), None.
    """
    data = as_dataset(data)
    RunDirectory(run_dir).check_figures()
    history = fit(model, data, run_dir=run_dir, **settings)
    processes = settings.get("processes")
    if processes is not None and not processes.is_writer:
        return None
    from .plots import save_figures  # imported when drawn: importing matplotlib slows start-up

    directory = RunDirectory(run_dir)
    model.cpu()
    with directory.lock():
        save_figures(model, data.to("cpu"), history, directory.figures)
    state = directory.load_checkpoint("best")
    return Run(directory.path, model, directory.read_config(), history, state["epoch"])


def training_settings(config: dict) -> dict:
    """The keyword arguments of ``fit`` that a run's ``config.json`` recorded (older runs' layout included, with
    the values those runs had for settings added since)."""
    train = {**LEGACY_SETTINGS, **config["train"]}
    if "objective" not in train:  # written before objectives were pluggable
        if train.pop("semi_supervised", False):
            keys = ("num_labels", "label_seed", "aux_weight")
            train["objective"] = {"name": "semi-supervised", **{key: train.pop(key) for key in keys if key in train}}
        else:
            train["objective"] = {"name": train.pop("elbo", "trace"), "num_particles": train.pop("num_particles", 1)}
    train["objective"] = completed_objective_config(train["objective"])
    return train


def resume_run(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    model: Model | None = None,
    data: Dataset | None = None,
    data_dir: str | None = None,
    download: bool = False,
    **settings,
) -> Run | None:
    """Continue the run in ``run_dir`` up to ``epochs`` in all (by default its own target), then redraw its figures.

    The model, data and objective are rebuilt from ``config.json``; pass
    ``model`` for a run with custom networks and ``data`` for one trained on
    your own tensors. A torchvision data set whose files moved is found at
    ``data_dir`` (then recorded in the config), or fetched with ``download``. Other keyword arguments
    (``progress``, ``processes``, ``device``) override the recorded ones.
    """
    directory = RunDirectory(run_dir)
    directory.check_resumable()
    directory.check_weights(resuming=True)  # before the lock, which would leave its file in a record
    config = directory.read_config()
    model = model_from_config(directory.path, config) if model is None else model
    if data is None:
        data = data_from_config(directory.path, config, data_dir=data_dir, download=download)
    train = {**training_settings(config), **settings}
    if epochs is not None:
        train["epochs"] = epochs
    if "processes" in settings:
        train.pop("device", None)
    return train_run(model, data, directory.path, resume=True, **train)
