"""Data-parallel training on many processes and machines with PyTorch Lightning (DDP).

The model and guide are the same ``vae.model`` and ``vae.guide`` that
:func:`pyro_vae.train.fit` trains. Pyro's ``ELBOModule`` (``elbo(model,
guide)``) computes the loss inside a ``LightningModule``, as in Pyro's
``examples/svi_lightning.py``, and Lightning's DDP averages the gradients
across processes before every Adam step.

* Each process draws its own minibatches of ``batch_size`` points from the
  in-memory training set through a ``DistributedSampler`` (seeded, reshuffled
  every epoch), so one step sees ``batch_size * world_size`` points.
* The "data" plate is sized for the full training set (``num_data=N``), so
  each process's loss is an unbiased estimate of the negative ELBO of all N
  points and the averaged gradient is too.
* Process 0 writes the run directory in the format of single-process
  training (config, atomic checkpoint after every epoch, history, metrics), so
  ``pyro-vae evaluate``, ``compare``, the plots and ``--resume`` work unchanged.
* At the end, every process's parameters are hashed and compared; replicas
  that drifted apart raise an error instead of leaving a silently wrong run.

Lightning is an optional dependency: ``pip install "pyro-vae[distributed]"``.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pyro
import torch
from pyro.infer.elbo import ELBOModule
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import CONFIG, write_json
from .data import Dataset
from .train import (
    TrainingDiverged,
    adam,
    build_elbo,
    check_dataset,
    check_fresh,
    evaluate_elbo,
    kl_weight_schedule,
    load_for_resume,
    run_config,
    save_run_state,
    write_test_metrics,
)
from .vae import VAE


class ReplicasDiverged(RuntimeError):
    """The processes of a data-parallel run ended with different parameters."""


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in ``state_dict`` order: equal digests mean identical parameters."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class VAETrainingPlan(pl.LightningModule):
    """One VAE's stochastic variational inference as a ``LightningModule``.

    ``training_step`` returns Pyro's differentiable loss of ``vae.model`` and
    ``vae.guide`` (through an ``ELBOModule``) on this process's minibatch, with
    the KL weight of the warm-up schedule and the plate sized for all
    ``len(data.train)`` points. Process 0 evaluates the validation ELBO and
    saves the run after every epoch.
    """

    def __init__(
        self,
        vae: VAE,
        data: Dataset,
        *,
        config: dict,
        run_dir: Path | None,
        history: list[dict] | None = None,
        start_epoch: int = 0,
        optimizer_state: dict | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.data = data
        self.config = config
        self.train_config = config["train"]
        self.run_dir = run_dir
        self.history = history
        self.start_epoch = start_epoch
        self.optimizer_state = optimizer_state
        train = self.train_config
        self.loss_fn = ELBOModule(
            vae.model,
            vae.guide,
            build_elbo(
                train["elbo"],
                epochs=train["epochs"],
                batch_size=train["batch_size"],
                lr=train["lr"],
                num_particles=train["num_particles"],
                warmup_epochs=train["warmup_epochs"],
                beta=train["beta"],
            ),
        )

    @property
    def steps_per_epoch(self) -> int:
        per_process = math.ceil(len(self.data.train) / self.trainer.world_size)
        return math.ceil(per_process / self.train_config["batch_size"])

    @property
    def epoch(self) -> int:
        """The epoch being trained, counted over the whole run (a resumed run continues the count)."""
        return self.start_epoch + self.current_epoch + 1

    def train_dataloader(self) -> DataLoader:
        indices = range(len(self.data.train))
        self.sampler = DistributedSampler(
            indices,
            num_replicas=self.trainer.world_size,
            rank=self.global_rank,
            shuffle=True,
            seed=self.train_config["seed"],
        )
        return DataLoader(indices, batch_size=self.train_config["batch_size"], sampler=self.sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = adam(self.vae.parameters(), self.train_config["lr"], self.device)
        if self.optimizer_state is not None:
            optimizer.load_state_dict(self.optimizer_state)
        return optimizer

    def setup(self, stage: str) -> None:
        # Every process checks before any writes; the barrier keeps process 0 from writing first.
        if self.history is None:
            check_fresh(self.run_dir)
        self.trainer.strategy.barrier()

    def on_fit_start(self) -> None:
        self.data = self.data.to(self.device)
        check_dataset(self.vae, self.data)
        # A stream of random numbers of its own for every process (and for every resumption).
        pyro.set_rng_seed(self.train_config["seed"] + self.trainer.world_size * self.start_epoch + self.global_rank)
        if self.global_rank != 0 or self.run_dir is None:
            return
        print(f"run directory: {self.run_dir}")
        if self.history is None:
            self.history = [{"epoch": 0, **evaluate_elbo(self.vae, self.data.val.x, prefix="val_")}]
            write_json(self.run_dir / CONFIG, self.config)
            self._save(0)
        else:
            write_json(self.run_dir / CONFIG, self.config)  # records the new epoch target

    def on_train_epoch_start(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.epoch_started = time.perf_counter()
        self.epoch_loss = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of losses, points

    def training_step(self, indices: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = self.data.batch(indices)
        num_data = len(self.data.train)
        global_step = (self.epoch - 1) * self.steps_per_epoch + batch_idx
        warmup_steps = round(self.train_config["warmup_epochs"] * self.steps_per_epoch)
        kl_weight = kl_weight_schedule(global_step, beta=self.train_config["beta"], warmup_steps=warmup_steps)
        with pyro.validation_enabled(global_step == 0):
            loss = self.loss_fn(x, kl_weight=kl_weight, num_data=num_data)
        # The loss of this process's batch, unscaled: the plate multiplied it by num_data / len(x).
        count = torch.tensor(float(len(x)), dtype=torch.float64, device=self.device)
        batch = torch.stack([loss.detach().double() * (len(x) / num_data), count])
        batch = self.trainer.strategy.reduce(batch, reduce_op="sum")  # every process sees every process's loss
        if not torch.isfinite(batch[0]):
            raise TrainingDiverged(
                f"The loss became {batch[0].item()} at epoch {self.epoch}, step {batch_idx + 1}. Lower the learning "
                f"rate (now {self.train_config['lr']:g}) or check the data for extreme values; the checkpoint of "
                f"epoch {self.epoch - 1} is kept."
            )
        self.epoch_loss += batch
        self.kl_weight = kl_weight
        return loss

    def on_train_epoch_end(self) -> None:
        if self.global_rank != 0:
            return
        trained = time.perf_counter()
        total, count = self.epoch_loss.tolist()
        row = {"epoch": self.epoch, "train_objective": -total / count, "kl_weight": self.kl_weight}
        row.update(evaluate_elbo(self.vae, self.data.val.x, prefix="val_"))
        row.update(seconds=trained - self.epoch_started, val_seconds=time.perf_counter() - trained)
        self.history.append(row)
        print(f"epoch {self.epoch:3d}  train objective {row['train_objective']:9.3f}  val ELBO {row['val_elbo']:9.3f}")
        if self.run_dir is not None:
            self._save(self.epoch)

    def on_fit_end(self) -> None:
        digest = parameter_digest(self.vae)
        self.digests = [digest]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.digests = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(self.digests, digest)

    def _save(self, epoch: int) -> None:
        save_run_state(self.run_dir, self.vae, self.trainer.optimizers[0], epoch, self.history, self.config)


def fit_distributed(
    vae: VAE,
    data: Dataset,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    elbo: str = "trace",
    num_particles: int = 1,
    warmup_epochs: float = 0.0,
    beta: float = 1.0,
    seed: int = 0,
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: str = "ddp",
    accelerator: str = "cpu",
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict] | None:
    """Train ``vae`` on ``data`` with Lightning on ``devices`` processes per node and ``num_nodes`` nodes.

    Takes the arguments of :func:`pyro_vae.train.fit`, where ``batch_size`` is
    per process, and Lightning's ``devices``, ``num_nodes``, ``strategy`` and
    ``accelerator``. Every process must run this function (Lightning's
    ``ddp`` strategy starts the other local processes itself by re-running the
    command; ``torchrun`` and SLURM start them all). Returns the history on
    process 0 and ``None`` on the others.
    """
    run_dir = None if run_dir is None else Path(run_dir)
    train = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        elbo=elbo,
        num_particles=num_particles,
        warmup_epochs=warmup_epochs,
        beta=beta,
        seed=seed,
        device={"gpu": "cuda"}.get(accelerator, accelerator),  # what a single-process --resume would use
    )
    config = run_config(vae, data, **train)
    config["distributed"] = {"devices": devices, "num_nodes": num_nodes, "strategy": strategy}
    history, start_epoch, optimizer_state = None, 0, None
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs the run_dir to resume from.")
        state = load_for_resume(run_dir, vae, config)
        history, start_epoch, optimizer_state = list(state["history"]), state["epoch"], state["optimizer"]
    plan = VAETrainingPlan(
        vae,
        data,
        config=config,
        run_dir=run_dir,
        history=history,
        start_epoch=start_epoch,
        optimizer_state=optimizer_state,
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        max_epochs=max(epochs - start_epoch, 0),
        use_distributed_sampler=False,  # the plan brings its own, seeded by the run's seed
        logger=False,
        enable_checkpointing=False,  # the run directory's checkpoint is written by the plan
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # the data are in memory
        warnings.filterwarnings("ignore", ".*treespec, LeafSpec.*")  # Lightning's own use of a torch deprecation
        trainer.fit(plan)
    if trainer.global_rank != 0:
        return None
    if len(set(plan.digests)) != 1:
        raise ReplicasDiverged(f"The {len(plan.digests)} processes ended with different parameters: {plan.digests}.")
    vae.cpu()
    if run_dir is not None:
        replicas = {"world_size": trainer.world_size, "replica_parameter_digests": plan.digests}
        write_test_metrics(run_dir, vae, data.to("cpu"), plan.history, epochs=epochs, **replicas)
    return plan.history
