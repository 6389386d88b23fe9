"""Reading a run directory back: the model, its config and its history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT, CONFIG, CheckpointError, load_checkpoint, read_json
from .data import Dataset, dataset_from_spec
from .ssvae import SSVAE
from .stacked import StackedSSVAE
from .vae import VAE

MODEL_TYPES = {"vae": VAE, "ssvae": SSVAE, "stacked-ssvae": StackedSSVAE}


@dataclass
class Run:
    """A trained run: the VAE with its weights, the config and the per-epoch history."""

    path: Path
    vae: VAE
    config: dict
    history: list[dict]
    epoch: int

    def load_data(self) -> Dataset:
        """The data set the run was trained on, rebuilt from its config."""
        if self.config["data"] is None:
            raise ValueError(f"{self.path} was trained on user tensors; load them yourself.")
        return dataset_from_spec(self.config["data"])


def load_run(path: str | Path, *, vae: VAE | None = None, map_location="cpu") -> Run:
    """Rebuild a run's VAE from ``config.json`` and load its checkpoint (``weights_only=True``).

    Pass ``vae`` for a run whose VAE has custom networks (its config cannot
    describe them); its weights are then loaded into that module.
    """
    path = Path(path)
    config = read_json(path / CONFIG)
    state = load_checkpoint(path / CHECKPOINT, map_location=map_location)
    if state["config"]["model"] != config["model"]:
        raise CheckpointError(
            f"{path / CONFIG} describes a different model than {path / CHECKPOINT}; "
            "restore the config.json that was written with this checkpoint."
        )
    if vae is None:
        if config["model"] is None:
            raise ValueError(f"{path} used custom networks; build the same VAE and pass it as vae=.")
        vae = MODEL_TYPES[config["model"].get("type", "vae")].from_config(config["model"])
    try:
        vae.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"The weights in {path / CHECKPOINT} do not fit the VAE: {err}") from err
    vae.to(torch.device(map_location) if isinstance(map_location, str) else map_location)
    return Run(path, vae.eval(), config, list(state["history"]), state["epoch"])
