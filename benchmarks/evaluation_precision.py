"""What bfloat16 products would do to a log p(x): the importance sampler in float32 and at "medium", side by side.

    python benchmarks/evaluation_precision.py RUN [--points 200] [--samples 1000]

The first ``--points`` test points of RUN (a VAE run of ``pyro-vae train``,
its best checkpoint), binarised once with a fixed seed, and
``pv.log_marginal_likelihood`` with K = ``--samples`` and the same seed, so
the same draws, under torch's float32 matmul precision ``"highest"`` and
``"medium"`` (bfloat16 inputs where the CPU multiplies them; see
``pyro_vae.training.precision``). Each precision runs twice, alternating,
the first as warm-up. Prints the per-point differences (mean, standard
deviation, largest) against the estimate's own standard error, and the
times. ``fit``'s ``matmul_precision`` never reaches the evaluators; this
measures what it would cost them.
"""

from __future__ import annotations

import argparse
import time

import pyro_vae as pv
from pyro_vae.cli import positive_int
from pyro_vae.data import dataset_from_spec
from pyro_vae.training.precision import float32_matmul_precision


def main(run_dir: str, points: int, samples: int) -> None:
    run = pv.load_run(run_dir)
    data = dataset_from_spec(run.config["data"])
    x = data.test.x[:points]  # binarised once, as every evaluation reads them, where the run's data are
    if len(x) < points:
        raise SystemExit(f"{run_dir}'s data have {len(x)} test points; give --points {len(x)} or fewer.")
    model = run.model.eval()
    log_px, seconds = {}, {}
    for precision in ("highest", "medium", "highest", "medium"):
        with float32_matmul_precision(precision):
            started = time.perf_counter()
            estimate = pv.log_marginal_likelihood(model.model, model.guide, x, num_samples=samples, seed=0)
            seconds[precision] = time.perf_counter() - started
        log_px[precision] = estimate.log_px
    difference = log_px["medium"] - log_px["highest"]
    print(f"{run_dir}: {points} test points, K = {samples}")
    print(
        f"log p(x) in float32: {log_px['highest'].mean():.3f} nats a point, standard error of the mean "
        f"{log_px['highest'].std() / len(x) ** 0.5:.3f}"
    )
    print(
        f"medium - float32, per point: mean {difference.mean():+.4f}, sd {difference.std():.4f}, "
        f"largest {difference.abs().max():.4f} nats"
    )
    print(f"seconds (the second of each): float32 {seconds['highest']:.2f}, medium {seconds['medium']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("run_dir", metavar="RUN", help="a pyro-vae train run of a VAE")
    parser.add_argument("--points", type=positive_int, default=200, help="test points, the first of the test set")
    parser.add_argument("--samples", type=positive_int, default=1000, help="K, importance samples a point")
    args = parser.parse_args()
    if not pv.RunDirectory(args.run_dir).holds_run():
        parser.error(f"{args.run_dir} holds no trained run; give a pyro-vae train run of a VAE.")
    main(args.run_dir, args.points, args.samples)
