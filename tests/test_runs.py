"""The run directory: one writer at a time, a full disk that loses nothing, and the package's layers."""

import ast
import errno
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_vae

import pyro_vae as pv
from pyro_vae import cli, plots
from pyro_vae.runs import files
from pyro_vae.runs.files import load_checkpoint

PACKAGE = Path(pv.__file__).parent


def test_a_second_writer_is_refused_and_named(small_mnist, tmp_path):
    run = tmp_path / "run"
    pv.fit(small_vae(), small_mnist.subset(train=200), epochs=1, run_dir=run, progress=False)
    with pv.RunDirectory(run).lock():  # as if another process were training it now
        with pytest.raises(pv.RunLocked, match=rf"another process \(pid {os.getpid()}\)"):
            pv.fit(small_vae(), small_mnist.subset(train=200), epochs=2, run_dir=run, resume=True, progress=False)
        with pytest.raises(pv.RunLocked):
            pv.evaluate_run(run, num_samples=2, progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1  # the refused writer wrote nothing
    pv.fit(small_vae(), small_mnist.subset(train=200), epochs=2, run_dir=run, resume=True, progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2  # released with its holder


def test_a_kept_record_reads_like_its_run_and_no_new_run_overwrites_it(small_mnist, tmp_path):
    run = tmp_path / "run"
    pv.fit(small_vae(), small_mnist.subset(train=200, test=50), epochs=1, run_dir=run, progress=False)
    pv.evaluate_run(run, num_samples=5, progress=False)
    record = pv.RunDirectory(run).keep_record(tmp_path / "record")
    assert not record.holds_run() and not record.figures.exists()  # no weights, no pictures
    assert record.read_metrics() == pv.RunDirectory(run).read_metrics()
    assert record.read_config() == pv.RunDirectory(run).read_config()
    assert record.evaluation_names() == ["is-K5"] and len(record.read_log_px()) == 50
    before = {path.name: path.read_bytes() for path in record.path.iterdir() if path.is_file()}
    with pytest.raises(pv.CheckpointError, match="holds what a run measured .* but no checkpoint"):
        pv.fit(small_vae(), small_mnist.subset(train=200), epochs=1, run_dir=record.path, progress=False)
    uses = {
        "load": pv.load_run,
        "evaluate": lambda path: pv.evaluate_run(path, num_samples=5, progress=False),
        "resume": pv.resume_run,
        "fit": lambda path: pv.fit(small_vae(), small_mnist.subset(train=200), run_dir=path, resume=True),
    }
    for use in uses.values():
        with pytest.raises(pv.CheckpointError, match="holds no checkpoint: the record of a run"):
            use(record.path)
    assert {path.name: path.read_bytes() for path in record.path.iterdir() if path.is_file()} == before


def test_a_run_stopped_before_writing_its_metrics_has_not_finished_until_resumed(small_mnist, tmp_path):
    run, data = tmp_path / "run", small_mnist.subset(train=200, test=50)
    pv.fit(small_vae(), data, epochs=1, run_dir=run, progress=False)
    directory = pv.RunDirectory(run)
    assert directory.training_finished()
    metrics = directory.read_metrics()
    directory.write_metrics({**metrics, "epochs": 0})  # the metrics of a shorter run, extended since
    assert not directory.training_finished()
    directory.file(directory.METRICS).unlink()  # what a kill after the last checkpoint, before the metrics, leaves
    assert not directory.training_finished()
    pv.fit(small_vae(), data, epochs=1, run_dir=run, resume=True, progress=False)  # trains nothing, finishes
    assert directory.training_finished() and directory.read_metrics() == metrics
    assert not pv.RunDirectory(tmp_path / "nothing").training_finished()


def test_a_finished_run_resumed_on_another_random_stream_keeps_its_test_metrics(small_mnist, tmp_path):
    """The test metrics are drawn from the run's seed, not from the stream training left: a finished run resumed
    with other generators (as on another number of processes, each of which starts a fresh stream) writes the
    same test ELBO, where it had written another draw of it."""
    run, data = tmp_path / "run", small_mnist.subset(train=200, test=50)
    pv.fit(small_vae(), data, epochs=1, run_dir=run, progress=False)
    metrics = pv.RunDirectory(run).read_metrics()
    state = load_checkpoint(run / "checkpoint.pt")
    state["rng"] = {"torch": torch.Generator().manual_seed(12345).get_state(), "cuda": []}
    torch.save(state, run / "checkpoint.pt")
    pv.fit(small_vae(), data, epochs=1, run_dir=run, resume=True, progress=False)  # trains nothing, finishes
    assert pv.RunDirectory(run).read_metrics() == metrics


def test_a_training_process_holds_its_run_and_a_killed_one_releases_it(tmp_path, capsys):
    args = ["--subset", "3000", "--hidden", "32", "--z-dim", "2", "--batch-size", "10", "--epochs", "50"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae.cli", "train", *args, "--no-progress", "--out", str(tmp_path), "--name", "r"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert process.stdout.readline().startswith("run directory:")
        deadline = time.monotonic() + 300
        while not (tmp_path / "r" / "checkpoint.pt").exists():
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        assert cli.main(["train", "--resume", str(tmp_path / "r"), "--epochs", "51", "--no-progress"]) == 2
        assert f"being written by another process (pid {process.pid})" in capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # the kernel dropped the killed process's lock: the next run goes ahead (and stops at once, epochs reached)
    epoch = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["epoch"]
    resume = ["train", "--resume", str(tmp_path / "r"), "--epochs", str(max(epoch, 1)), "--compile", "off"]
    assert cli.main([*resume, "--no-progress"]) == 0


def _full_disk_after(monkeypatch, writes: int):
    """Every ``os.fsync`` after the first ``writes`` fails as on a full disk."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) > writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(small_mnist, tmp_path, monkeypatch, capsys):
    data = small_mnist.subset(train=200)
    run = tmp_path / "run"
    pv.fit(small_vae(), data, epochs=1, run_dir=run, progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    _full_disk_after(monkeypatch, 1)  # the new config.json is written; the next checkpoint is not
    with pytest.raises(pv.CheckpointError, match=r"the disk is full; the previous (best|checkpoint)\.pt is intact"):
        pv.fit(small_vae(), data, epochs=3, run_dir=run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before and load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()
    pv.fit(small_vae(), data, epochs=3, run_dir=run, resume=True, progress=False)  # space freed: it continues
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 3


def test_a_stop_between_the_checkpoint_and_best_pt_is_mended_on_resume(small_mnist, tmp_path, monkeypatch):
    """The last checkpoint is written before best.pt: a stop between them leaves it at the new best epoch, and the
    resume copies it to best.pt before training on, whatever its own epochs come out as."""
    data = small_mnist.subset(train=200)
    run = tmp_path / "run"
    pv.fit(small_vae(), data, epochs=1, run_dir=run, progress=False)
    write = files.atomic_write_bytes

    def stop_at_best(path, data):
        if Path(path).name == "best.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", stop_at_best)
    with pytest.raises(OSError, match="No space left"):
        pv.fit(small_vae(), data, epochs=2, run_dir=run, resume=True, progress=False)
    monkeypatch.undo()
    last = load_checkpoint(run / "checkpoint.pt")
    assert last["epoch"] == last["best_epoch"] == 2 and load_checkpoint(run / "best.pt")["epoch"] == 1
    pv.fit(small_vae(), data, epochs=2, run_dir=run, resume=True, progress=False)
    assert (run / "best.pt").read_bytes() == (run / "checkpoint.pt").read_bytes()
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 2


def test_a_full_disk_while_writing_results_keeps_the_previous_results(small_mnist, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    pv.fit(small_vae(), small_mnist.subset(train=200), epochs=1, run_dir=run, progress=False)
    assert cli.main(["evaluate", str(run), "--samples", "4", "--no-progress"]) == 0
    metrics, log_px = (run / "metrics.json").read_bytes(), (run / "test_log_px.npy").read_bytes()
    _full_disk_after(monkeypatch, 0)
    assert cli.main(["evaluate", str(run), "--samples", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "is intact" in err and "Traceback" not in err
    assert (run / "metrics.json").read_bytes() == metrics and (run / "test_log_px.npy").read_bytes() == log_px


def test_a_full_disk_while_drawing_a_figure_keeps_the_previous_figure(tmp_path, monkeypatch):
    path = tmp_path / "figures" / "samples.png"
    plots.plot_samples(small_vae(), path, n=4)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")  # the format from the suffix
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(pv.CheckpointError, match=r"the disk is full; the previous samples\.png is intact"):
        plots.plot_samples(small_vae(), path, n=4)
    assert path.read_bytes() == before and not list(path.parent.glob(".*.tmp"))


def test_a_headline_kept_apart_leaves_the_earlier_evaluations(tmp_path):
    """Kept apart as is-K10, the headline's file holds these weights' numbers: a summary of that name among the
    earlier weights' evaluations goes."""
    run = pv.RunDirectory(tmp_path)
    run.write_log_px(np.array([-1.0, -3.0]))
    metrics = {"test_num_samples": 10, "test_log_px": -2.0, run.LOG_PX_DIGEST: "d", "log_px_batch_size": 100}
    metrics.update(evaluations={"is-K5": {"log_px": -2.5}}, earlier_evaluations={"is-K10": {"log_px": -9.0}})
    run.keep_headline_apart(metrics, "d", num_samples=5)
    assert metrics["evaluations"]["is-K10"] == {"num_samples": 10, "log_px": -2.0, "method": "is", "seed": 0,
                                                "batch_size": 100}  # fmt: skip
    assert "earlier_evaluations" not in metrics
    np.testing.assert_array_equal(run.read_evaluation("is-K10")["log_px"], [-1.0, -3.0])
    run.keep_headline_apart(metrics, "other weights", num_samples=5)  # another digest: nothing to keep
    assert set(metrics["evaluations"]) == {"is-K5", "is-K10"}


def test_the_latent_space_of_one_or_two_points_is_drawn(tmp_path):
    """PCA of fewer points than two components (a tiny --subset's test split) pads with zeros, instead of
    failing after training; points that coincide explain all their (zero) variance."""
    vae = small_vae(z_dim=4)
    for n in (1, 2, 3):
        path = plots.plot_latent_space(vae, torch.rand(n, 1, 28, 28), torch.arange(n), tmp_path / f"latent{n}.png")
        assert path.read_bytes().startswith(b"\x89PNG")


def test_json_files_are_strict_json_and_read_back_their_non_finite_numbers(tmp_path):
    written = {"se": math.nan, "k": [math.inf, 0.5, -math.inf], "nested": {"name": "NaNo", "x": 1.0}}
    files.write_json(tmp_path / "m.json", written)
    text = (tmp_path / "m.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not strict JSON")

    strict = json.loads(text, parse_constant=refuse)  # what a strict reader (jq, JavaScript) takes
    assert strict["se"] == "NaN" and strict["k"] == ["Infinity", 0.5, "-Infinity"]
    read = files.read_json(tmp_path / "m.json")
    assert math.isnan(read["se"]) and read["k"] == [math.inf, 0.5, -math.inf] and read["nested"] == written["nested"]
    (tmp_path / "old.json").write_text('{"se": NaN, "k": Infinity}')  # as earlier versions wrote them
    old = files.read_json(tmp_path / "old.json")
    assert math.isnan(old["se"]) and old["k"] == math.inf


def test_fit_takes_a_tensor_or_names_make_dataset(small_mnist):
    x = small_mnist.train.x[:300].round()
    history = pv.fit(small_vae(), x, epochs=1, progress=False)
    assert len(history) == 2 and history[1]["val_elbo"] > history[0]["val_elbo"]
    with pytest.raises(TypeError, match="pv.make_dataset"):
        pv.fit(small_vae(), [[0.0, 1.0]], epochs=1, progress=False)


# ------------------------------------------------------------ a new model is one module
@pv.register_model
class ExternallyRegisteredVAE(pv.VAE):
    """A model written outside the package: a VAE subclass with its own type name and one figure less."""

    name = "test-model"
    figures = ("learning_curves", "samples")


def test_a_model_registered_outside_the_package_trains_resumes_loads_and_plots(small_mnist, tmp_path):
    model = ExternallyRegisteredVAE((1, 28, 28), 2, hidden=(16,))
    run = pv.train_run(model, small_mnist.subset(train=200), tmp_path / "new", epochs=1, progress=False)
    assert run.config["model"]["type"] == "test-model"
    assert {p.name for p in (tmp_path / "new" / "figures").iterdir()} == {"learning_curves.png", "samples.png"}
    resumed = pv.resume_run(tmp_path / "new", epochs=2, progress=False)
    assert isinstance(resumed.model, ExternallyRegisteredVAE) and len(resumed.history) == 3
    assert isinstance(pv.load_run(tmp_path / "new").model, ExternallyRegisteredVAE)
    assert cli.main(["train", "--resume", str(tmp_path / "new"), "--epochs", "3", "--no-progress"]) == 0


# ------------------------------------------------------------------ the layers
#: Each layer imports only layers before it (and itself); the interface modules come last.
LAYERS = [
    {"_version", "registry", "data", "checks"},
    {"components"},
    {"models"},
    {"accel"},
    {"infer"},
    {"runs"},
    {"training"},
    {"evaluate", "plots"},
    {"workflow"},
    {"cli"},
]


def _layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if module.split(".")[0] in names)


def _imports(source: str, package: tuple[str, ...]) -> set[str]:
    """The pyro_vae modules (or their members) that ``source``, a module of ``package``, imports.

    As dotted names below pyro_vae, e.g. "infer.elbo.ELBO" for ``from ..infer.elbo import ELBO``.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("pyro_vae.") for alias in node.names if alias.name.startswith("pyro_vae.")
            )
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join((*base, *(node.module.split(".") if node.module else ())))
            elif node.module == "pyro_vae" or (node.module or "").startswith("pyro_vae."):
                target = node.module.removeprefix("pyro_vae").removeprefix(".")
            else:
                continue
            found.update(f"{target}.{alias.name}" if target else alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] not in ("", "__init__")}


def test_the_import_finder_sees_every_form_of_import():
    source = "\n".join(
        [
            "from pyro_vae import cli",
            "import pyro_vae.accel",
            "from .. import data, workflow",
            "from .elbo import x",
            "import torch",
        ]
    )
    assert _imports(source, ("infer",)) == {"cli", "accel", "data", "workflow", "infer.elbo.x"}


def test_every_import_runs_down_the_layers_and_components_and_models_use_no_compiler():
    sources = sorted(p for p in PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    for path in sources:
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module == "__init__":
            continue  # the package's face re-exports every layer
        package = tuple(module.split(".")[:-1])
        for target in _imports(path.read_text(), package):
            assert _layer(target) <= _layer(module), f"{module} imports {target}, a layer above it"
            if module.startswith(("components", "models")):
                assert not target.startswith("accel"), f"{module} imports the compiler machinery ({target})"
        if module.startswith(("components", "models")):
            assert "torch._inductor" not in path.read_text() and "torch.compile" not in path.read_text()


def test_importing_the_package_has_no_cycle():
    """Each module imports on its own in a fresh interpreter, whatever was imported first."""
    modules = ["pyro_vae.models.vae", "pyro_vae.training.engine", "pyro_vae.infer.importance", "pyro_vae.cli"]

    def imports(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: this machine has two cores
        for done in pool.map(imports, modules):
            assert done.returncode == 0, done.stderr[-2000:]


def test_layers_cover_every_module():
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module != "__init__":
            _layer(module)  # raises StopIteration for a module outside every layer


def test_nothing_but_the_run_directory_spells_its_file_names():
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "runs":
            continue
        text = path.read_text()
        spelled += [f"{path.name}: {name}" for name in ('"config.json"', '"checkpoint.pt"', '"metrics.json"',
                                                        '"best.pt"', '"history.csv"') if name in text]  # fmt: skip
    assert not spelled


def test_the_gpus_generators_are_saved_and_restored_where_there_are_gpus(monkeypatch):
    """The CUDA branch of the checkpoint's RNG state, on this CPU machine: two GPUs stood in by tensors.

    A checkpoint from a machine with more GPUs than this one restores the states of the GPUs there are.
    """
    states = {0: torch.tensor([1, 2], dtype=torch.uint8), 1: torch.tensor([3, 4], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[0], states[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    saved = files.rng_state()
    assert torch.equal(saved["torch"], torch.get_rng_state()) and saved["cuda"] == [states[0], states[1]]
    files.restore_rng(saved)
    assert list(restored) == [0] and torch.equal(restored[0], states[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU checkpoint resumed on a CPU machine
    restored.clear()
    files.restore_rng(saved)
    assert restored == {}


def _torchvision_mnist(root: Path, n: int = 40) -> None:
    """A small MNIST in torchvision's layout (its idx files, uncompressed, under MNIST/raw), of random pixels."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_a_torchvision_data_set_that_moved_is_found_where_it_is_now(tmp_path, small_mnist):
    """Where the files are is no part of the data (the digests are): resume and evaluate take the new folder, and
    the resume records it."""
    _torchvision_mnist(tmp_path / "before")
    data = pv.load_dataset("mnist-torchvision", data_dir=str(tmp_path / "before"), val_size=10)
    run = tmp_path / "run"
    pv.fit(small_vae(), data, epochs=1, run_dir=run, progress=False, eval_samples=0)
    (tmp_path / "before").rename(tmp_path / "after")
    with pytest.raises(pv.DataError, match=r"If its files moved, give their folder with data_dir= \(--data-dir\)"):
        pv.resume_run(run, epochs=2, progress=False)
    assert cli.main(["train", "--resume", str(run), "--epochs", "2", "--data-dir", str(tmp_path / "after"),
                     "--no-progress", "--eval-samples", "0"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == str(tmp_path / "after")
    (tmp_path / "after").rename(tmp_path / "again")
    summary = pv.evaluate_run(run, num_samples=2, data_dir=str(tmp_path / "again"), progress=False)
    assert summary["test_num_points"] == 40
    embedded = tmp_path / "embedded"
    pv.fit(small_vae(), small_mnist.subset(train=100), epochs=1, run_dir=embedded, progress=False, eval_samples=0)
    with pytest.raises(pv.DataError, match="not on a torchvision data set: a data folder and a download apply"):
        pv.evaluate_run(embedded, num_samples=2, data_dir=str(tmp_path), progress=False)


def test_run_files_are_as_readable_as_the_umask_makes_new_files(tmp_path):
    """Written through a private temporary file, a run's files still get the mode open() would give them, so
    that the collaborators of a shared folder of runs can read them."""
    previous = os.umask(0o027)
    try:
        files.atomic_write_bytes(tmp_path / "config.json", b"{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o640
