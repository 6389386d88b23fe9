"""Adam's subnormal moments: how many a trained run's optimiser holds, and what they cost its training steps.

    python benchmarks/adam_subnormals.py RUN [--steps 100] [--repeats 5]

RUN is a VAE run of ``pyro-vae train`` (``pv.fit``'s ``run_dir``). Its last
checkpoint's model and Adam state are loaded, and for every parameter the
share of Adam's moments (``exp_avg``, ``exp_avg_sq``) below float32's
smallest normal number (2^-126) is printed. Then ``--steps`` training
steps of RUN's objective (``take_step`` with the compiled step, batch and
matmul precision as the run's, on its training data) are timed from that state twice: with the state
as saved, and after ``pyro_vae.training.engine.flush_subnormal_moments``.
Each repeat starts both from the checkpoint again, in alternating order, and
reports the median step; ``torch.profiler`` then times fused Adam's kernel
(``aten::_fused_adam_``) alone in each. Last, the flush's own time.

The machine is shared and noisy: only the ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

import pyro_vae as pv
from pyro_vae.cli import positive_int
from pyro_vae.data import dataset_from_spec
from pyro_vae.infer import build_objective
from pyro_vae.training.engine import adam, compiled_step, flush_subnormal_moments, take_step
from pyro_vae.training.precision import float32_matmul_precision
from pyro_vae.workflow import training_settings


def subnormal_share(tensor: torch.Tensor) -> float:
    return ((tensor != 0) & (tensor.abs() < torch.finfo(tensor.dtype).tiny)).float().mean().item()


def trainer(run: pv.Run, flushed: bool):
    """A function of a batch's indices that takes one step from RUN's last state, and the optimiser."""
    model = pv.load_run(run.path, checkpoint="last").model.train()
    settings = training_settings(run.config)
    objective = build_objective(settings["objective"])
    data = dataset_from_spec(run.config["data"])
    objective.setup(model, data, batch_size=settings["batch_size"])
    optimizer = adam(model.parameters(), settings["lr"], torch.device("cpu"))
    optimizer.load_state_dict(pv.RunDirectory(run.path).load_checkpoint("last")["optimizer"])
    if flushed:
        flush_subnormal_moments(optimizer)
    compiled = compiled_step(model, objective)
    points = objective.training_points(data)

    def step(generator: torch.Generator) -> None:
        batch = points[torch.randint(len(points), (settings["batch_size"],), generator=generator)]
        take_step(model, objective, optimizer, data, batch, compiled=compiled)

    step(torch.Generator().manual_seed(0))  # records and compiles
    return step, optimizer


def main(run_dir: str, steps: int, repeats: int) -> None:
    run = pv.load_run(run_dir, checkpoint="last")
    state = pv.RunDirectory(run_dir).load_checkpoint("last")
    # fit's Adam holds every parameter of the model, in order; its state is keyed by their positions
    names = dict(zip(state["optimizer"]["param_groups"][0]["params"], dict(run.model.named_parameters()), strict=True))
    print(f"{run_dir}, epoch {state['epoch']}: the share of Adam's moments that are subnormal")
    print("| parameter | shape | exp_avg | exp_avg_sq |\n|---|---|---|---|")
    for index, moments in state["optimizer"]["state"].items():
        shares = " | ".join(f"{100 * subnormal_share(moments[key]):.2f}%" for key in ("exp_avg", "exp_avg_sq"))
        print(f"| {names[index]} | {tuple(moments['exp_avg'].shape)} | {shares} |")

    times: dict[str, list[float]] = {"as saved": [], "flushed": []}
    adam_kernel: dict[str, list[float]] = {"as saved": [], "flushed": []}
    precision = training_settings(run.config)["matmul_precision"]  # the run's own, as fit would train it
    for repeat in range(repeats):
        for kind in ("as saved", "flushed") if repeat % 2 == 0 else ("flushed", "as saved"):
            with float32_matmul_precision(precision):
                step, _ = trainer(run, flushed=kind == "flushed")
                generator = torch.Generator().manual_seed(repeat + 1)
                started = time.perf_counter()
                for _ in range(steps):
                    step(generator)
                times[kind].append((time.perf_counter() - started) / steps)
                with profile() as profiler:
                    for _ in range(20):
                        step(generator)
            kernel = [event for event in profiler.key_averages() if event.key == "aten::_fused_adam_"]
            adam_kernel[kind].append(kernel[0].self_cpu_time_total / 20 / 1000 if kernel else float("nan"))
    for kind in times:
        print(
            f"{kind}: {1000 * statistics.median(times[kind]):.2f} ms a step (median of {repeats}), "
            f"fused Adam's kernel {statistics.median(adam_kernel[kind]):.2f} ms of it"
        )
    print(f"flushed / as saved: {statistics.median(times['flushed']) / statistics.median(times['as saved']):.2f}")
    _, optimizer = trainer(run, flushed=False)
    started = time.perf_counter()
    flush_subnormal_moments(optimizer)
    print(f"one flush of the saved state: {1000 * (time.perf_counter() - started):.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("run_dir", metavar="RUN", help="a pyro-vae train run of a VAE")
    parser.add_argument("--steps", type=positive_int, default=100, help="timed steps of each kind in a repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    if not pv.RunDirectory(args.run_dir).holds_run():
        parser.error(f"{args.run_dir} holds no trained run; give a pyro-vae train run of a VAE.")
    main(args.run_dir, args.steps, args.repeats)
