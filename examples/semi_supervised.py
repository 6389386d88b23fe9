"""Semi-supervised M2 from 100 labels: pv.SSVAE with the unknown labels summed out by enumeration.

    python examples/semi_supervised.py --epochs 20
    python examples/semi_supervised.py --epochs 1 --subset 2000 --samples 10   # a smoke test

Trains Kingma et al.'s M2 with ``pv.train_run`` and the objective
``pv.SemiSupervisedELBO`` (class-balanced labels, the auxiliary
classification term, the classifier first trained on the labels; the best
epoch by validation accuracy is kept, and the model ends with its weights),
then uses the trained model three ways:

* as a classifier, q(y | x);
* as a density model: test log p(x) by importance sampling, with y drawn from
  q(y | x) by the generic estimator;
* as a conditional generator: one test image's style z decoded with every
  digit y, and the *model* (not the classifier) asked which digit explains
  an image best: argmax_y log p(x, y) (``pv.classify_generatively``).
"""

import argparse
from pathlib import Path

import pyro_vae as pv
from pyro_vae.cli import count_or_zero, positive_int
from pyro_vae.infer.semisupervised import draw_labelled


def main(epochs: int, labels: int, subset: int | None, samples: int, out: str) -> None:
    if pv.RunDirectory(out).holds_run():  # before any work
        raise SystemExit(f"{out} already holds a run; give another --out, or continue it with pyro-vae train --resume.")
    data = pv.load_dataset("mnist", binarize="dynamic")
    try:
        data = data.quick_subset(subset) if subset else data
        draw_labelled(data.train.y, labels, num_classes=10)  # a label count the data can give
    except pv.DataError as err:
        raise SystemExit(str(err)) from None
    objective = pv.SemiSupervisedELBO(num_labels=labels)
    ssvae = pv.SSVAE(data.x_shape, z_dim=50, hidden=(500,))
    # pyro-vae train --semi-supervised's settings: Adam 3e-3, the last tenth of the epochs at 3e-4
    run = pv.train_run(
        ssvae, data, Path(out), objective=objective, epochs=epochs, batch_size=200, lr=3e-3, lr_schedule="step",
        eval_samples=samples, progress=False,
    )  # fmt: skip
    directory = pv.RunDirectory(run.path)
    metrics = directory.read_metrics()  # the best epoch's validation and test numbers
    print(f"best epoch {metrics['best_epoch']}: validation accuracy {100 * metrics['val_accuracy']:.1f}%")
    print(f"test accuracy {100 * metrics['test_accuracy']:.1f}% from {labels} labels")
    if samples:
        print(f"test log p(x) {metrics['test_log_px']:.2f} +- {metrics['test_log_px_se']:.2f} nats (K = {samples})")

    # The model's own answer: the label y with the highest log p(x, y), estimated by importance sampling.
    x = data.test.x[:8]  # binarised: log p(x, y) is a density of binary images; q(y | x) reads the intensities
    print(f"true digits              {data.test.y[:8].tolist()}")
    print(f"classifier q(y | x)      {ssvae.classify(data.test.unbinarised[:8]).tolist()}")
    print(f"model argmax log p(x, y) {pv.classify_generatively(ssvae, x).tolist()}")
    figures = ", ".join(sorted(path.name for path in directory.figures.glob("*.png")))
    print(f"figures (style transfer, class samples, ...): {figures} in {directory.figures}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--labels", type=positive_int, default=100, help="labelled training points, class-balanced")
    parser.add_argument("--subset", type=positive_int, help="train on this many points only")
    parser.add_argument("--samples", type=count_or_zero, default=1000, help="K of the test log p(x); 0 skips it")
    parser.add_argument("--out", default="runs/semi-supervised", help="the run directory")
    main(**vars(parser.parse_args()))
