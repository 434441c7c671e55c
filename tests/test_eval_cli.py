"""`vegan-scale eval` and `vegan-scale sample` on a short real MNIST run, each as one subprocess."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

import vegan_scale
from tests import runkit
from vegan_scale.cli_parser import parser
from vegan_scale.config.schema import EvalConfig
from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.errors import ConfigError
from vegan_scale.evaluation import grids
from vegan_scale.evaluation.model_source import open_model
from vegan_scale.evaluation.protocol import EvalSettings

pytestmark = pytest.mark.data
NUM_SAMPLES = 300
RUN_OVERRIDES = [
    "train.max_steps=20",
    "eval.every_steps=20",
    "checkpoint.every_steps=20",
    "tracking.log_every=10",
    "tracking.backend=mlflow",
]


@pytest.fixture(scope="module")
def run_dir(mnist_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WAE-MMD with a small MLP, 20 steps on real MNIST, tracked in a local MLflow store."""
    root = tmp_path_factory.mktemp("eval_runs")
    done = runkit.run(runkit.single([*runkit.train_args(mnist_shards, root, "short", "wae_mmd"), *RUN_OVERRIDES]))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "mnist" / "short"


def test_eval_reports_writes_and_logs(run_dir: Path, mnist_shards: Path, tmp_path: Path) -> None:
    """`vegan-scale eval RUN` prints, writes eval.json and logs it to the run's MLflow run; logging the same
    evaluation again added a second point to every final/ metric at the same step, and `sync` never sent an
    evaluation whose logging had failed (a run the server never saw lacked it for good): neither is so now."""
    from mlflow.tracking import MlflowClient

    from vegan_scale.cli import main
    from vegan_scale.rundir import RunDir
    from vegan_scale.tracking.sync import log_evaluation

    done = runkit.run([sys.executable, "-m", "vegan_scale", "eval", str(run_dir), "--num-samples", str(NUM_SAMPLES)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FID (LeNet features)" in done.stdout and "real data" in done.stdout
    report = json.loads((run_dir / "eval.json").read_text())
    model, real = report["model"], report["real"]
    assert report["step"] == 20 and report["settings"]["classifier"] == "mnist"
    assert report["settings"]["set_size"] == NUM_SAMPLES // 2
    assert {"fid", "kid", "precision", "recall", "sharpness", "recon_cost", "recon_mse", "latent_mmd"} <= model.keys()
    assert model["fid"] > real["fid"] > 0  # 20 steps of training are far from the data
    assert 0 <= real["precision"] <= 1 and 0 <= model["recall"] <= 1

    # reconstruction over the same test images, computed here from the export in float64
    images = load_images(read_index(str(mnist_shards / "test")), (1, 28, 28), NUM_SAMPLES)[0].double() / 255
    ae = vegan_scale.load(run_dir / "export")
    squared = (ae.reconstruct(images.float()).double() - images).pow(2).flatten(1)
    assert model["recon_mse"] == pytest.approx(squared.mean().item(), rel=1e-5)
    assert model["recon_cost"] == pytest.approx(0.05 * squared.sum(dim=1).mean().item(), rel=1e-5)  # l2sq's factor

    client, run_id = runkit.local_mlflow(run_dir)
    logged = client.get_run(run_id).data.metrics
    assert logged["final/fid"] == pytest.approx(model["fid"])
    assert logged["final/real/fid"] == pytest.approx(real["fid"])
    assert log_evaluation(RunDir(run_dir), client.tracking_uri) == run_id  # the same evaluation again
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "final/fid")] == [(20, model["fid"])]
    copy, store = tmp_path / "copy", f"sqlite:///{tmp_path / 'other.db'}"  # a run this store never saw
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow_run_id"))
    assert main(["sync", str(copy), "--uri", store]) == 0
    synced = MlflowClient(store).get_run((copy / "mlflow_run_id").read_text().strip()).data.metrics
    assert synced["final/fid"] == model["fid"] and synced["final/real/recall"] == real["recall"]


def test_sample_writes_three_grids(run_dir: Path, tmp_path: Path) -> None:
    checkpoint = run_dir / "checkpoints" / "step_00000020"
    done = runkit.run(
        [sys.executable, "-m", "vegan_scale", "sample", str(checkpoint), "--out", str(tmp_path), "--grid", "4"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("samples", "reconstructions", "interpolations"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size == (4 * 30 + 2, 4 * 30 + 2)  # 28-pixel tiles, 2-pixel padding


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"num_samples": 0}, "num_samples must be at least 8, not 0"),  # a limit of 0 read the whole test set
        ({"num_samples": -5}, "num_samples must be at least 8, not -5"),
        ({"num_samples": 9, "neighbours": 5}, "num_samples must be at least 12"),  # halves of more than k
        ({"inception_samples": 0}, "inception_samples must be at least 2"),  # was ignored
    ],
)
def test_evaluation_counts_out_of_range_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        EvalSettings(**settings)


def test_test_data_too_small_or_a_classifier_of_other_images_is_refused(run_dir: Path, tmp_path: Path) -> None:
    """Test shards of 7 images with the classifier's metrics were k-NN's traceback (their count was checked against
    --num-samples, not against the images read); the MNIST classifier on a model of 3x32x32 images was a
    convolution's. Each is one line naming the data or the two shapes, before anything is computed."""
    from tests.shardkit import make_shards
    from vegan_scale.evaluation.protocol import Shares, evaluate_source
    from vegan_scale.experiment import load_experiment

    make_shards(tmp_path / "seven", [7], side=28)
    source = open_model(run_dir)
    with pytest.raises(ConfigError, match=r"the test data .*seven holds 7 images; the evaluation needs at least 8"):
        evaluate_source(source, EvalSettings(num_samples=100), Shares(), test_data=str(tmp_path / "seven"))
    source.config = load_experiment(run_dir / "config.yaml", ["data.channels=3", "data.image_size=32"])
    with pytest.raises(ConfigError, match="--classifier mnist reads 1x28x28 images, and this model's are 3x32x32"):
        evaluate_source(source, EvalSettings(num_samples=100), Shares(), classifier="mnist")


def test_a_grid_out_of_range_or_an_unusable_out_is_refused_by_the_command(run_dir: Path, tmp_path: Path) -> None:
    """`sample --grid 0` divided by zero, `--grid 100000` tried to decode 10**10 images, an --out that cannot be a
    directory ended in a traceback: exit 2, naming the value or the path; the schema's eval.grid_size has the same
    bound."""
    for grid in (0, grids.MAX_GRID + 1):
        with pytest.raises(ConfigError, match=f"1 to {grids.MAX_GRID} rows and columns, not {grid}"):
            grids.test_images_needed(grid)
    command = [sys.executable, "-m", "vegan_scale", "sample", str(run_dir), "--out", str(tmp_path), "--grid", "0"]
    done = runkit.run(command)
    assert done.returncode == 2 and "1 to 100 rows" in done.stderr and "Traceback" not in done.stderr, done.stderr
    (tmp_path / "file").touch()  # an --out under a file: the path and the system's reason
    done = runkit.run([*command[:-3], str(tmp_path / "file" / "grids"), "--grid", "2"])
    assert done.returncode == 2 and "file/grids: Not a directory" in done.stderr and "Traceback" not in done.stderr
    assert [f.metadata["bounds"].high for f in dataclasses.fields(EvalConfig) if f.name == "grid_size"] == [
        grids.MAX_GRID
    ]


@pytest.mark.parametrize("command", [["eval", "RUN"], ["sample", "RUN", "--out", "X"], ["shards", "npz", "--out", "X"]])
@pytest.mark.parametrize("seed", ["-1", str(2**32), "1" + "0" * 24, "x"])
def test_a_seed_out_of_range_is_a_usage_error(command: list[str], seed: str, capsys: pytest.CaptureFixture) -> None:
    """A seed past 2^32 - 1 ended in an OverflowError from torch (or repeated a smaller seed's draws), and -1 was
    taken: each seed argument has run.seed's range, checked by the parser (exit 2)."""
    option = "--split-seed" if command[0] == "shards" else "--seed"
    with pytest.raises(SystemExit) as info:
        parser().parse_args([*command, option, seed])
    assert info.value.code == 2 and option in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--max-shard-mb", "nan"], ["--max-shard-mb", "inf"], ["--size", "0"],
                                    ["--size", "100000"], ["--crop", "-5"], ["--samples-per-shard", "0"],
                                    ["--workers", "100000"], ["--workers", "0"]])  # fmt: skip
def test_a_shard_size_out_of_range_is_a_usage_error(option: list[str], capsys: pytest.CaptureFixture) -> None:
    """NaN or infinite shard sizes were tracebacks; a side of 0 or a negative crop was blamed on the first image,
    and a side of 100,000 ran out of memory. 100,000 encoding processes were forked, for ever on a 2-core machine
    (1,692 after 15 s, for a 50-image file)."""
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["shards", "folder", "--out", "X", *option])
    assert info.value.code == 2 and f"{option[0]}: {option[1]} is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["eval", "RUN", "--test-data"], ["sample", "RUN", "--test-data"],
                                    ["eval", "RUN", "--classifier"]])  # fmt: skip
def test_an_empty_option_is_a_usage_error(option: list[str], capsys: pytest.CaptureFixture) -> None:
    """`--test-data ''` (an unset shell variable) fell back to the run's data.test without a word."""
    with pytest.raises(SystemExit) as info:
        parser().parse_args([*option, " ", *(["--out", "X"] if option[0] == "sample" else [])])
    assert info.value.code == 2 and f"{option[-1]}: is empty" in capsys.readouterr().err


def test_sources_agree_and_refuse_other_directories(run_dir: Path, tmp_path: Path) -> None:
    """A run directory, its checkpoint and its export give the same weights; anything else is a ConfigError."""
    sources = [open_model(p) for p in (run_dir, run_dir / "checkpoints" / "step_00000020", run_dir / "export")]
    for source in sources:
        assert source.run_dir == run_dir and source.step == 20
        for key, value in sources[0].model.state_dict().items():
            assert torch.equal(source.model.state_dict()[key], value)
    with pytest.raises(ConfigError, match="neither a run directory"):
        open_model(tmp_path)


def test_a_run_whose_configuration_describes_another_network_than_its_export_is_refused(
    run_dir: Path, tmp_path: Path
) -> None:
    """`eval RUN` built the export's weights into the network of the run's config.yaml, never reading the
    export's model.yaml: an edited config.yaml (another prior scale) was scored as another model without a word.
    The network comes from model.yaml (its digest checked), and a run configuration that disagrees is refused,
    naming the key; the export alone still evaluates."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "eval.json").unlink(missing_ok=True)  # an earlier test's evaluation
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("  scale: 1.0\n", "  scale: 5.0\n", 1))
    assert "scale: 5.0" in config.read_text()
    done = runkit.run([sys.executable, "-m", "vegan_scale", "eval", str(copy), "--num-samples", "100"])
    said = done.stdout + done.stderr
    assert done.returncode == 2, said[-3000:]
    assert f"{config} describes another network than the export {copy / 'export'}" in said
    assert "prior.scale: export 1.0, config 5.0" in said and not (copy / "eval.json").exists()
    assert open_model(run_dir / "export").config.prior.scale == 1.0


def _copy_with(run_dir: Path, tmp_path: Path, name: str, change: Callable[[bytes], bytes], forged: bool) -> Path:
    """A copy of the run (without its export) whose last checkpoint's file ``name`` is changed; ``forged``: its size
    and digest in state.json too, as someone who can write the checkpoint would."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    step = copy / "checkpoints" / "step_00000020"
    (step / name).write_bytes(change((step / name).read_bytes()))
    if forged:
        state = json.loads((step / "state.json").read_text())
        state["files"][name] = (step / name).stat().st_size
        state["sha256"][name] = hashlib.sha256((step / name).read_bytes()).hexdigest()
        (step / "state.json").write_text(json.dumps(state))
    return step


CHECKPOINT_READERS = (["export", "--out", "x"], ["eval"], ["sample", "--out", "y"])


@pytest.mark.parametrize(
    ("name", "change", "forged", "words"),
    [  # a weight changed in place: size kept, values finite
        ("autoencoder.safetensors", lambda raw: raw[:-4] + bytes([raw[-4] ^ 1]) + raw[-3:], False, "bytes differ"),
        ("config.yaml", lambda raw: b"- a\n", True, "config.yaml: a configuration must be a mapping"),
        (  # another network: the export's model.yaml would not fit its weights
            "config.yaml",
            lambda raw: raw.replace(b"latent_dim: 8", b"latent_dim: 9"),
            True,
            "does not hold the weights of the configured network",
        ),
    ],
    ids=["weights changed", "config not a mapping", "config of another network"],
)
def test_export_eval_and_sample_check_the_checkpoint_they_read(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, name: str, change, forged: bool, words: str
) -> None:
    """`vegan-scale export`, `eval` and `sample` read a checkpoint as a resume does: a weight changed in place came
    out as a clean export with a valid digest, exit 0; a config.yaml that is no configuration was a traceback, and
    one of another network made an export whose model.yaml did not fit its weights. Each is now one line, exit 2,
    and nothing is written."""
    from vegan_scale.cli import main

    step = _copy_with(run_dir, tmp_path, name, change, forged)
    for command, *options in CHECKPOINT_READERS:
        out = [str(tmp_path / option) if option in ("x", "y") else option for option in options]
        assert main([command, str(step), *out]) == 2, command
        said = capsys.readouterr()
        assert words in said.out + said.err, command
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("damage", ["interrupted", "cut short"])
def test_an_export_interrupted_or_cut_short_is_no_export(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    """An export killed after its weights and before its model.yaml (its marker): `eval RUN` read those weights
    with the run's configuration as the run's model, and `sync` began logging the model, failed on the missing file
    and left it PENDING in the store. The run's newest checkpoint is read instead, the directory itself is refused
    naming what it lacks, and sync sends the rest of the run with a warning saying how to write the export again.
    Weights cut short were a safetensors traceback from eval, sample and sync (which left its new run RUNNING): eval
    names the file and the fix, and sync sends and finishes the rest of the run with the same warning."""
    from mlflow.tracking import MlflowClient

    from vegan_scale import export
    from vegan_scale.cli import main

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow_run_id"))
    if damage == "interrupted":
        (copy / "export" / export.CONFIG_FILE).unlink()
        source = open_model(copy)
        assert source.weights.parent.name == "step_00000020" and source.step == 20
        words = r"not an exported model \(missing model\.yaml"
    else:
        with (copy / "export" / export.MODEL_FILE).open("r+b") as f:
            f.truncate(300)
        words = (
            r"model\.safetensors is not a readable safetensors file .*: damaged or cut short; export the model again"
        )
        with pytest.raises(ConfigError, match=words):
            open_model(copy)
    with pytest.raises(ConfigError, match=words):
        open_model(copy / "export")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sync", str(copy), "--uri", store]) == 0
    said = capsys.readouterr()
    assert re.search(f"{words}.*; its model is not sent: write it again with `vegan-scale export", said.out + said.err)
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_logged_models(experiments)
    assert [r.info.status for r in client.search_runs(experiments)] == ["FINISHED"]


def test_a_sync_beside_another_holder_of_the_run_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two syncs of one run directory at once each created an MLflow run (and logged the model twice), as a sync
    beside the run's training could: sync holds the run directory's lock as a training does, and is refused while
    another process holds it, naming that process; once it has ended, sync goes ahead."""
    from vegan_scale.cli import main

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow_run_id"))
    hold = "import sys, time, pathlib; from vegan_scale.rundir import RunDir; "
    hold += "lock = RunDir(pathlib.Path(sys.argv[1])).take_lock(); "
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "print(lock[1], flush=True); time.sleep(60)", str(copy)],
        stdout=subprocess.PIPE,
        text=True,
    )
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        assert holder.stdout.readline().strip() == "None"  # it holds the lock
        assert main(["sync", str(copy), "--uri", store]) == 2
        said = capsys.readouterr()
        assert f"is in use by a training, process {holder.pid} on" in said.out + said.err
        assert not (copy / "mlflow_run_id").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["sync", str(copy), "--uri", store]) == 0


@runkit.needs_namespaces
def test_an_evaluation_that_could_not_be_written_is_refused_before_it_starts(run_dir: Path, tmp_path: Path) -> None:
    """On a read-only run directory (a model store mounted read-only), eval.json failed to be written after the
    evaluation's minutes: it is refused at once (exit 74), naming the file and --out, as is an --out that cannot be
    a file; an --out that holds another file than an evaluation (weights, a pipe, a damaged report) is a usage
    error (2). With --out the evaluation is written there (and can be written there again), and the run's MLflow
    run gets its metrics."""
    root = tmp_path / "root"  # the run and its MLflow store, copied: this test's evaluation is logged there
    shutil.copytree(run_dir.parent.parent, root, ignore=shutil.ignore_patterns("eval.json"))
    copy = root / run_dir.relative_to(run_dir.parent.parent)
    command = [sys.executable, "-m", "vegan_scale", "eval", str(copy), "--num-samples", "100"]
    refused = runkit.run([*runkit.read_only(copy), *command])
    said = refused.stdout + refused.stderr
    assert refused.returncode == 74 and f"{copy / 'eval.json'} cannot be written (" in said, said[-3000:]
    assert "read-only" in said and "--out FILE" in said and "FID" not in said and "Traceback" not in said
    (tmp_path / "file").touch()
    refused = runkit.run([*command, "--out", str(tmp_path / "file" / "eval.json")])
    said = refused.stdout + refused.stderr
    assert refused.returncode == 74 and f"{tmp_path / 'file'} is not a directory" in said, said[-3000:]
    weights = copy / "export" / "model.safetensors"  # an --out mistyped onto another file would have replaced it
    kept = weights.read_bytes()
    refused = runkit.run([*command, "--out", str(weights)])
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "a file that is no evaluation is there" in said and "FID" not in said, said
    assert weights.read_bytes() == kept
    fifo = tmp_path / "pipe.json"  # a pipe in its place: reading it to see what it holds must not wait for ever
    os.mkfifo(fifo)
    refused = runkit.run([*command, "--out", str(fifo)], timeout=120)
    assert refused.returncode == 2 and "a file that is no evaluation is there" in refused.stderr, refused.stderr

    out = tmp_path / "evals" / "short.json"
    done = runkit.run([*runkit.read_only(copy), *command, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["step"] == 20 and report["settings"]["set_size"] == 50 and not (copy / "eval.json").exists()
    client, run_id = runkit.local_mlflow(copy)
    logged = [m.value for m in client.get_metric_history(run_id, "final/fid") if m.step == 20]
    assert report["model"]["fid"] in logged
    from vegan_scale.cli import _an_evaluation

    assert _an_evaluation(out)  # the next evaluation may replace it
    out.write_bytes(out.read_bytes()[:40])  # cut short (a copy interrupted): no longer taken for an evaluation
    assert not _an_evaluation(out)


def test_grids_and_evaluations_are_kept_out_of_an_export(run_dir: Path, mnist_shards: Path, tmp_path: Path) -> None:
    """`sample --out RUN/export` wrote its grids among the export's files, and the run's next export (training
    again, at the end of its budget) refused the directory with exit 2, advising another output directory, which a
    run cannot choose; into a checkpoint, they were deleted with it as the run trained on. The grids, and an
    evaluation under another name than eval.json, are refused from an export, a run's export to be and a checkpoint
    (exit 2, nothing written); the run's own export, finding other files, says to move them and how to write it."""
    root = tmp_path / "root"
    shutil.copytree(run_dir.parent.parent, root)
    copy = root / run_dir.relative_to(run_dir.parent.parent)
    elsewhere = tmp_path / "exported"
    shutil.copytree(copy / "export", elsewhere)
    kept = sorted(p.name for p in (copy / "export").iterdir())
    checkpoint = copy / "checkpoints" / "step_00000020"  # pruned whole, grids and all, as its run trains on
    for out, what in (
        (copy / "export", f"the export of the run {copy}, for an export's own files"),
        (elsewhere, "an export, for an export's own files"),
        (checkpoint, "a checkpoint, which its run deletes whole when it keeps only its newest"),
    ):
        refused = runkit.run([sys.executable, "-m", "vegan_scale", "sample", str(copy), "--out", str(out)])
        assert refused.returncode == 2 and f"--out {out} is {what}" in refused.stderr, refused.stderr[-2000:]
        assert not (out / "samples.png").exists()
    command = [sys.executable, "-m", "vegan_scale", "eval", str(copy), "--num-samples", "100"]
    refused = runkit.run([*command, "--out", str(copy / "export" / "short.json")])
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "is the export of the run" in said and "FID" not in said, said[-2000:]
    assert sorted(p.name for p in (copy / "export").iterdir()) == kept and not (elsewhere / "samples.png").exists()

    (copy / "export" / "notes.txt").write_text("mine")  # put there by hand: the run's export keeps it, and says so
    again = runkit.run(runkit.single([*runkit.train_args(mnist_shards, root, "short", "wae_mmd"), *RUN_OVERRIDES]))
    assert again.returncode == 2 and "holds other files (notes.txt)" in again.stderr, again.stderr[-2000:]
    assert f"move them out of it (the run's export is its own); `vegan-scale export {copy} --out" in again.stderr
    assert (copy / "export" / "notes.txt").read_text() == "mine"


def test_weights_this_user_may_not_read_are_named_so(run_dir: Path, tmp_path: Path) -> None:
    """An export's weights that this user may not read were called "damaged or cut short (No such file ...)":
    safetensors reports a refused opening so. The system's reason is named, and what to do about it."""
    export = tmp_path / "export"
    shutil.copytree(run_dir / "export", export)
    (export / "model.safetensors").chmod(0)
    command = [sys.executable, "-m", "vegan_scale", "sample", str(export), "--out", str(tmp_path / "grids")]
    refused = runkit.run([*runkit.permissions_held(), *command])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "model.safetensors cannot be opened (Permission denied); make it readable to this user" in refused.stderr
    assert "damaged" not in refused.stderr and "Traceback" not in refused.stderr


def test_a_run_that_trains_on_is_evaluated_and_exported_while_it_prunes_its_checkpoints(
    mnist_shards: Path, tmp_path: Path
) -> None:
    """`vegan-scale eval` and `vegan-scale export` of a run still training, which writes a checkpoint at every step
    and keeps one (checkpoint.keep_last_k=1), so the newest checkpoint is deleted milliseconds after it was found:
    each reads a whole checkpoint and succeeds, and the one eval read has since been pruned (every eval of such a run
    used to fail, exit 2, calling the checkpoint damaged or of another version)."""
    settings = (
        "train.max_steps=1000000",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last_k=1",
        "eval.every_steps=1000000",
    )
    trainer = runkit.start(runkit.single([*runkit.train_args(mnist_shards, tmp_path, "live", "wae_mmd"), *settings]))
    run_dir = tmp_path / "mnist" / "live"
    try:
        runkit.wait_for_step(trainer, run_dir, 10)
        evaluated = runkit.run([sys.executable, "-m", "vegan_scale", "eval", str(run_dir), "--num-samples", "100"])
        exported = runkit.run(
            [sys.executable, "-m", "vegan_scale", "export", str(run_dir), "--out", str(tmp_path / "x")]
        )
        assert trainer.poll() is None, "training ended"
    finally:
        runkit.kill_group(trainer)
        runkit.finish(trainer)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert exported.returncode == 0, exported.stderr[-3000:]
    step = json.loads((run_dir / "eval.json").read_text())["step"]
    assert not (run_dir / "checkpoints" / f"step_{step:08d}").exists()
    assert vegan_scale.load(tmp_path / "x") is not None
