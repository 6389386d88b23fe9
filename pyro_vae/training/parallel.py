"""The processes a training run spans: one, or many through Lightning Fabric (data-parallel, DDP).

The training engine runs the same loop on every process. What differs is
collected here, behind one small interface:

* :class:`SingleProcess`: the ordinary case, where every collective is the identity;
* :class:`LightningProcesses`: ``lightning.fabric.Fabric`` launches and connects
  the processes (``devices`` per node on ``num_nodes`` machines; Lightning's
  ``ddp`` strategy starts the local ones by re-running the command, and
  ``torchrun`` or SLURM can start them all). Each process draws its own
  share of every global batch; after each backward pass the gradients are
  summed over the processes in one all-reduce (as DDP averages them), so that
  every replica takes the same Adam step, on the gradient of the global batch.

Lightning is an optional dependency: ``pip install "pyro-vae[distributed]"``.
"""

from __future__ import annotations

import hashlib

import torch


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of the module's ``state_dict`` (parameters and buffers): equal digests mean identical weights."""
    return state_digest(module.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a ``state_dict``'s names and tensors' bytes, in its order (as a checkpoint saves it)."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def points_digest(x: torch.Tensor) -> str:
    """SHA-256 of the points' float32 bytes: which test points an evaluation is of."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy()).hexdigest()  # no copy: a buffer


class ProcessFailed(RuntimeError):
    """What the other processes of a data-parallel run raise when process 0 failed at its own work (a write, the
    validation): its own error says why."""


class ReplicasDiverged(RuntimeError):
    """The processes of a data-parallel run ended with different parameters."""


class SingleProcess:
    """One process: collectives are the identity."""

    world_size = 1
    rank = 0
    device: torch.device | None = None

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the run directory (process 0)."""
        return self.rank == 0

    def config(self) -> dict | None:
        """How the processes were launched, for the run's config (None for one process)."""
        return None

    def share(self, model: torch.nn.Module) -> None:
        """Give every process process 0's parameters."""

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Process 0's ``tensor`` on every process."""
        return tensor

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes."""
        return tensor

    def sum_gradients(self, parameters: list[torch.nn.Parameter], weight: float = 1.0) -> None:
        """Replace every gradient by the sum over the processes of ``weight`` times it (each process its own
        weight)."""

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order."""
        return [obj]


#: The Lightning strategies a run can take: every process holds a whole replica of the model (the engine sums
#: the gradients itself), and the processes are started by re-running the command (or by torchrun, SLURM).
#: ``ddp_spawn`` and ``ddp_fork`` start them from a function, FSDP and DeepSpeed shard the model.
STRATEGIES = ("ddp",)


class LightningProcesses(SingleProcess):
    """Several processes launched and connected by ``lightning.fabric.Fabric``.

    :param devices: processes (CPU) or GPUs per node, or ``"auto"``.
    :param num_nodes: machines.
    :param strategy: the Fabric strategy, one of :data:`STRATEGIES` (``"ddp"``).
    :param accelerator: ``"cpu"``, ``"gpu"`` or ``"auto"``.
    """

    def __init__(self, devices: int | str = "auto", num_nodes: int = 1, strategy: str = "ddp", accelerator="cpu"):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"strategy {strategy!r} is not one a run can take; choose one of {STRATEGIES} (replicas of the whole "
                "model, the processes started by re-running the command)."
            )
        try:
            from lightning.fabric import Fabric
        except ImportError as err:
            raise ValueError(
                f"Training on several processes needs PyTorch Lightning ({err}); "
                'install it with: pip install "pyro-vae[distributed]"'
            ) from err
        if accelerator == "gpu" and not torch.cuda.is_available():
            raise ValueError("--accelerator gpu was asked for, but PyTorch sees no GPU here; use --accelerator cpu.")
        self.settings = {"devices": devices, "num_nodes": num_nodes, "strategy": strategy, "accelerator": accelerator}
        self.fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
        self.fabric.launch()
        self.world_size, self.rank, self.device = self.fabric.world_size, self.fabric.global_rank, self.fabric.device

    def config(self) -> dict:
        return {**self.settings, "world_size": self.world_size}

    def _distributed(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def share(self, model):
        if self._distributed():
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)

    def broadcast(self, tensor):
        if self._distributed():
            tensor = tensor.contiguous()
            torch.distributed.broadcast(tensor, src=0)
        return tensor

    def all_reduce(self, tensor):
        if self._distributed():
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters, weight=1.0):
        if not self._distributed():
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if weight != 1.0:
            flat *= weight
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(parameters, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def gather(self, obj):
        if not self._distributed():
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out
