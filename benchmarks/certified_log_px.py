"""Certified test log p(x) of trained runs: importance sampling, AIS, their paired difference, and BDMC gaps.

    python benchmarks/certified_log_px.py runs/RUN [runs/RUN ...]
    python benchmarks/certified_log_px.py runs/RUN --test-points 200 --bdmc-points 100   # a quick look
    python benchmarks/certified_log_px.py runs/RUN --steps 500 --chains 32   # other AIS settings

For each run (its best checkpoint) this runs, through ``pv.evaluate_run``
(what ``pyro-vae evaluate`` does), whichever of these it has not run yet on
the best checkpoint's current weights:

* importance sampling at K = ``--samples`` on the test points;
* AIS from the encoder on the same points, at the library's default settings or those given;
* BDMC on ``--bdmc-points`` points simulated from the model, at the same settings.

An interrupted AIS or BDMC evaluation continues where it stopped, so the
script can be run again after a stop. It then prints one markdown row per
run: both estimates with their standard errors, the paired difference
AIS - IS with its standard error (the same points, so the standard error
is that of the per-point differences) and how many standard errors it is,
the mean BDMC gap with its standard error, the largest, and how many are
negative by noise (upper - lower bound: in expectation at most this far is
AIS from log p(x) on the model's own data), and
each evaluation's wall time as it was recorded when it ran.
"""

import argparse

import numpy as np

import pyro_vae as pv
from pyro_vae.cli import positive_int
from pyro_vae.evaluate import current_evaluation, evaluation_name
from pyro_vae.infer.ais import DEFAULT_CHAINS, DEFAULT_LEAPFROG_STEPS, DEFAULT_SCHEDULE, DEFAULT_STEPS, SCHEDULES
from pyro_vae.infer.densities import standard_error
from pyro_vae.models import SemiSupervisedModel


def evaluated(run: str, method: str, ais: dict, **settings) -> tuple[dict, dict]:
    """The arrays and summary of an evaluation of ``run``, run first if it is missing or of other weights."""
    name = evaluation_name(method, ais=ais, **{"num_samples": 0, "num_points": 0, **settings})
    arrays = current_evaluation(run, name)
    if arrays is None:  # none, or of older weights
        pv.evaluate_run(run, method=method, **ais, **settings)  # importance sampling ignores the AIS settings
        arrays = current_evaluation(run, name)
    return arrays, pv.RunDirectory(run).read_metrics()["evaluations"][name]


def row(run: str, samples: int, test_points: int | None, bdmc_points: int, ais_settings: dict) -> str:
    importance, is_summary = evaluated(run, "is", ais_settings, num_samples=samples, test_points=test_points)
    ais, ais_summary = evaluated(run, "ais", ais_settings, test_points=test_points)
    bdmc, bdmc_summary = evaluated(run, "bdmc", ais_settings, num_points=bdmc_points)
    diff = ais["log_px"] - importance["log_px"]
    se = standard_error(diff)
    gap = bdmc["upper"] - bdmc["lower"]
    unreliable = int((importance["pareto_k"] > 0.7).sum())
    return (
        f"| {run} | {len(diff)} | {importance['log_px'].mean():.2f} +- {standard_error(importance['log_px']):.2f} "
        f"(Pareto k > 0.7 at {unreliable}) | {ais['log_px'].mean():.2f} +- {standard_error(ais['log_px']):.2f} "
        f"| **{diff.mean():+.3f} +- {se:.3f}** ({diff.mean() / se:.0f} se; smallest {diff.min():+.2f}) "
        f"| {len(gap)}: **{gap.mean():.3f} +- {standard_error(gap):.3f}** mean, {np.max(gap):.3f} largest, "
        f"{int((gap < 0).sum())} negative "
        f"| {is_summary['seconds'] / 60:.1f} / {ais_summary['seconds'] / 60:.1f} / "
        f"{bdmc_summary['seconds'] / 60:.1f} min |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--samples", type=positive_int, default=5000, help="K of importance sampling")
    parser.add_argument("--test-points", type=positive_int, help="the first N test points only [default: all]")
    parser.add_argument(
        "--bdmc-points", type=positive_int, default=1000, help="points simulated from each model for BDMC"
    )
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="AIS steps T [default: %(default)s]")
    parser.add_argument(
        "--chains", type=positive_int, default=DEFAULT_CHAINS, help="AIS chains C [default: %(default)s]"
    )
    parser.add_argument(
        "--leapfrog", type=positive_int, default=DEFAULT_LEAPFROG_STEPS, help="leapfrog steps L [default: %(default)s]"
    )
    parser.add_argument(
        "--schedule", choices=SCHEDULES, default=DEFAULT_SCHEDULE, help="AIS schedule [default: %(default)s]"
    )
    args = parser.parse_args()
    ais = {
        "num_steps": args.steps,
        "num_chains": args.chains,
        "leapfrog_steps": args.leapfrog,
        "schedule": args.schedule,
    }
    for run in args.runs:  # every run checked before the first one's evaluations (hours of them)
        directory = pv.RunDirectory(run)
        try:
            directory.check_resumable()
        except pv.CheckpointError as err:
            raise SystemExit(str(err)) from None
        if not directory.holds_run():
            raise SystemExit(f"{run} holds no checkpoint (a kept record?); give the directory of a trained run.")
        trained = pv.load_run(run)
        if isinstance(trained.model, SemiSupervisedModel):  # evaluate_run would refuse its BDMC, hours in
            raise SystemExit(
                f"{run} holds a {type(trained.model).__name__}, whose label is discrete: BDMC cannot anneal it. "
                f"Estimate its log p(x) with pyro-vae evaluate {run} --method ais instead."
            )
        if args.test_points and args.test_points > (size := len(trained.load_data().test)):
            raise SystemExit(f"--test-points {args.test_points} exceeds the {size} test points of {run}.")
    annealing = f"{args.steps} steps x {args.chains} chains x {args.leapfrog} leapfrog, {args.schedule}"
    print(
        f"| run | test points | IS, K = {args.samples} | AIS ({annealing}) | AIS - IS, paired "
        "| BDMC gap on simulated points | wall time IS / AIS / BDMC |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run, args.samples, args.test_points, args.bdmc_points, ais), flush=True)


if __name__ == "__main__":
    main()
