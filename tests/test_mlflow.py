"""MLflow as a user meets it: one real training run sent over HTTP to a real `mlflow server` on 127.0.0.1, read back
through MlflowClient (metrics, params, tags, images, the exported model), then shown in the MLflow UI in headless
Chromium.

The UI test saves its screenshot under pytest's tmp_path; docs/mlflow-ui.png was made by the same test with
``VEGAN_SCALE_UI_SCREENSHOT=docs/mlflow-ui.png .venv/bin/python -m pytest tests/test_mlflow.py -k ui``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import vegan_scale
from tests.paths import ROOT
from tests.runkit import MlflowServer, env, single, train_args
from vegan_scale.errors import ConfigError

pytestmark = [pytest.mark.distributed, pytest.mark.data]

STEPS, LOG_EVERY, EVAL_EVERY = 200, 5, 50
EXPERIMENT = "vegan-scale-ui-check"
REGISTERED = "vegan-scale-ui-check-model"
# Chromium as this machine runs it: no sandbox as root, and none of the background connections a closed network refuses
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1500,1450",
)


@dataclass
class TrackedRun:
    server: MlflowServer
    run_dir: Path
    run_id: str
    link: str  # the UI link the run printed at its end


@pytest.fixture(scope="module")
def tracked(mnist_shards: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_server: MlflowServer) -> TrackedRun:
    """WAE-MMD (a small MLP) on real MNIST for 200 steps, tracked by the session's server, with system metrics on
    and the environment of a requeued SLURM job; the run name and the experiment come from their defaults and
    $MLFLOW_EXPERIMENT_NAME."""
    root = tmp_path_factory.mktemp("mlflow")
    server = mlflow_server.start()
    args = train_args(
        mnist_shards,
        root / "runs",
        "unused",
        "wae_mmd",
        "run.name=null",
        "model.mlp.hidden=[256]",
        "train.global_batch_size=100",
        f"train.max_steps={STEPS}",
        "train.deterministic=false",
        "train.check_every=50",
        f"tracking.log_every={LOG_EVERY}",
        "tracking.backend=mlflow",
        f"tracking.uri={server.uri}",
        "tracking.system_metrics=true",
        f"tracking.register_as={REGISTERED}",
        f"eval.every_steps={EVAL_EVERY}",
        "eval.num_samples=500",
        "eval.grid_size=8",
        "checkpoint.every_steps=0",
    )
    extra = {
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5",
        "SLURM_JOB_ID": "4242",
        "SLURM_RESTART_COUNT": "1",
    }
    done = subprocess.run(single(args), cwd=ROOT, env={**env(), **extra}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (run_dir,) = (root / "runs" / "mnist").iterdir()
    (link,) = [line.split("open ", 1)[1] for line in done.stdout.splitlines() if line.startswith("MLflow:")]
    return TrackedRun(server, run_dir, (run_dir / "mlflow_run_id").read_text().strip(), link.strip())


def _client(tracked: TrackedRun):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracked.server.uri)


def _git_head() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def test_run_names_params_and_tags(tracked: TrackedRun) -> None:
    """The experiment is $MLFLOW_EXPERIMENT_NAME's, the run is named after what ran, params are the flattened
    config, and the tags say which code, launch and SLURM job produced it."""
    client = _client(tracked)
    run = client.get_run(tracked.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    assert run.info.run_name == tracked.run_dir.name
    assert run.info.run_name.startswith("mmd-mlp-z8-gb100-lr0.001-")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == str(STEPS)
    assert run.data.params["model.mlp.hidden"] == "[256]"
    # only the sections the run uses: a WAE-MMD MLP has no critic, no sliced penalty, no conv or resnet network
    unused = ("penalty.adversarial.", "penalty.sliced.", "model.conv.", "model.resnet.")
    assert not [k for k in run.data.params if k.startswith(unused)]
    assert "penalty.mmd.kernel" in run.data.params
    tags = run.data.tags
    assert tags["vegan_scale.version"] == vegan_scale.__version__
    assert (tags["dist.type"], tags["dist.world_size"]) == ("NO", "1")
    assert (tags["slurm.job_id"], tags["slurm.restart_count"]) == ("4242", "1")
    head = _git_head()
    if head is None:
        assert "mlflow.source.git.commit" not in tags and "git.dirty" not in tags
    else:
        assert tags["mlflow.source.git.commit"] == head
        assert tags["git.dirty"] in ("true", "false")


def test_metrics_equal_the_run_directory(tracked: TrackedRun) -> None:
    """Every flushed step of train/loss is on the server with the value metrics.jsonl holds; evaluation metrics
    and the sampler's system/ metrics are there too."""
    client = _client(tracked)
    history = sorted(client.get_metric_history(tracked.run_id, "train/loss"), key=lambda m: m.step)
    local = [json.loads(line) for line in (tracked.run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {m["step"]: m["train/loss"] for m in local if "train/loss" in m}
    assert [m.step for m in history] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert {m.step: m.value for m in history} == pytest.approx(expected, rel=1e-6)
    assert history[-1].value < history[0].value  # it learned
    keys = set(client.get_run(tracked.run_id).data.metrics)
    assert "eval/recon" in keys
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)


def test_images_and_config_are_artifacts(tracked: TrackedRun) -> None:
    """Sample, reconstruction and interpolation grids at every evaluation, and the resolved config."""
    client = _client(tracked)
    assert {"config.yaml", "images"} <= {a.path for a in client.list_artifacts(tracked.run_id)}
    images = [a.path for a in client.list_artifacts(tracked.run_id, "images") if a.path.endswith(".png")]
    for key in ("samples", "reconstructions", "interpolations"):
        # the file names are MLflow's own (pinned version): key+step+STEP+timestamp+...
        steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if f"/{key}+step+" in p)
        assert steps == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))


def test_the_model_is_an_mlflow_model(tracked: TrackedRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's model ``model`` loads with MLflow's own pyfunc loader (without a warning about its predict
    method) and with vegan_scale.load from runs:/ and from the registry (models:/NAME/1, tracking.register_as),
    with the run's exported weights, the store named by $MLFLOW_TRACKING_URI or by argument (the registry was looked
    up in $MLFLOW_TRACKING_URI's whatever the argument said); its signature says what it takes; predict
    reconstructs like the network, and gives codes with params."""
    import mlflow.pyfunc
    import numpy as np
    import torch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.server.uri)
    exported = vegan_scale.load(tracked.run_dir / "export")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyfunc = mlflow.pyfunc.load_model(f"runs:/{tracked.run_id}/model")
    assert not [w for w in caught if "predict" in str(w.message)], [str(w.message) for w in caught]
    assert str(pyfunc.metadata.signature.inputs.inputs[0].shape) == "(-1, 1, 28, 28)"
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    want = exported.reconstruct(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(pyfunc.predict(images), want, atol=1e-6)
    assert pyfunc.predict(images, params={"output": "codes"}).shape == (5, 8)
    for uri in (f"runs:/{tracked.run_id}/model", f"models:/{REGISTERED}/1"):
        loaded = vegan_scale.load(uri)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in exported.state_dict().items()), uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the store given by argument, the registry's lookup included
    loaded = vegan_scale.load(f"models:/{REGISTERED}/1", tracking_uri=tracked.server.uri)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in exported.state_dict().items())
    client = _client(tracked)
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == tracked.run_id
    # the resolved config goes with the model: as its params, and its file among the model's artifacts
    experiment = client.get_run(tracked.run_id).info.experiment_id
    (logged,) = [m for m in client.search_logged_models([experiment]) if m.source_run_id == tracked.run_id]
    assert logged.name == "model" and logged.params["train.max_steps"] == str(STEPS)
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id, "artifacts")}
    assert "artifacts/config.yaml" in files, files


def test_a_continued_run_that_exports_again_logs_a_new_model(tracked: TrackedRun, tmp_path: Path) -> None:
    """A run continued past its end exports again: a new model, which runs:/RUN/model then loads, and a new
    registered version, while the first version keeps its weights (the one model's files were replaced, so a
    registered version changed its weights after it was registered). Logging the same export again (a retry, a
    sync) adds nothing. Linking the run to a model a second time broke the store's unique constraint."""
    import torch
    from safetensors.torch import load_file, save_file

    from vegan_scale.tracking import models

    client, name = _client(tracked), "vegan-scale-continued-check"
    run_id = client.create_run(client.get_run(tracked.run_id).info.experiment_id).info.run_id
    config, later = tracked.run_dir / "config.yaml", tmp_path / "export"
    shutil.copytree(tracked.run_dir / "export", later)
    first = models.log_model(client, run_id, tracked.run_dir / "export", config, {}, 10, name)
    weights = load_file(later / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, later / "model.safetensors")
    second = models.log_model(client, run_id, later, config, {}, 20, name)
    assert second != first and models.log_model(client, run_id, later, config, {}, 20, name) == second
    assert sorted((o.step, o.model_id) for o in client.get_run(run_id).outputs.model_outputs) == [
        (10, first),
        (20, second),
    ]
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    uri = tracked.server.uri
    for source, export_dir in ((f"runs:/{run_id}/model", later), (f"models:/{name}/1", tracked.run_dir / "export")):
        loaded = vegan_scale.load(source, tracking_uri=uri).state_dict()
        assert all(torch.equal(v, loaded[k]) for k, v in vegan_scale.load(export_dir).state_dict().items()), source


def test_a_missing_model_is_named(tracked: TrackedRun) -> None:
    with pytest.raises(ConfigError, match="runs:/0123456789abcdef/model"):
        vegan_scale.load("runs:/0123456789abcdef/model", tracking_uri=tracked.server.uri)


def _chromium() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "headless browser tests need Debian's chromium and its driver: apt-get install chromium chromium-driver"
        )
    pytest.importorskip("selenium", reason="pip install selenium (in the dev extra)")
    return browser, driver


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_ui_shows_curves_and_sample_images(tracked: TrackedRun, tmp_path: Path) -> None:
    """The run's Model metrics page in headless Chromium: the train/loss chart is drawn and the sample and
    reconstruction grids of the last evaluation load. The screenshot is kept (VEGAN_SCALE_UI_SCREENSHOT)."""
    browser, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    wait = WebDriverWait(driver, 60, poll_frequency=0.25)
    try:  # on failure, the page as it was is in tmp_path
        experiment = _client(tracked).get_run(tracked.run_id).info.experiment_id
        # the link the run printed opens its charts in the model-training view (not MLflow 3's GenAI default)
        assert tracked.link == (
            f"{tracked.server.uri}/#/experiments/{experiment}/runs/{tracked.run_id}/model-metrics"
            "?workflowType=machine_learning"
        )
        driver.get(tracked.link)
        header = "[data-testid='experiment-view-compare-runs-section-header']"
        headers = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, header) if _section(d, "train") else None)
        for close in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id$='assistant.chat_panel.close']"):
            close.click()  # the assistant side panel would hide half the charts
        for section in headers:
            if section.text.split("\n")[0] in ("eval", "perf"):
                section.click()  # collapsed, so that the train curves and the image grids fit one screen
        # sections render when scrolled into view
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", _section(driver, "train"))
        loss = wait.until(lambda d: _chart(d, "train/loss"))
        assert loss.find_elements(By.CSS_SELECTOR, "svg.main-svg path.js-line")  # plotly drew the curve
        # the image grids open at step 0; choose the last evaluation's step in each
        assert "workflowType=machine_learning" in driver.current_url  # still the model-training view
        steps = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type='number'][max]"))
        for box in steps:
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(STEPS), Keys.TAB)
        # every grid of the last evaluation loaded (artifact paths are URL-encoded: '+' is %2B)
        wanted = [f"{figure}%2Bstep%2B{STEPS}%2B" for figure in ("samples", "reconstructions", "interpolations")]
        wait.until(lambda d: all(any(w in src for src in _loaded_images(d)) for w in wanted))
        time.sleep(1)  # the charts' resize animation after the sections collapsed
        shot = tmp_path / "mlflow-ui.png"
        assert driver.save_screenshot(str(shot))
        if target := os.environ.get("VEGAN_SCALE_UI_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / target)
    except Exception:
        driver.save_screenshot(str(tmp_path / "failed.png"))
        (tmp_path / "failed.html").write_text(driver.page_source)
        raise
    finally:
        driver.quit()


def _chart(driver, title: str):
    """The chart card of metric ``title`` (its heading shows the name after the section prefix and carries the
    whole name as its title) once plotly has drawn into it, else None."""
    from selenium.webdriver.common.by import By

    for card in driver.find_elements(By.CSS_SELECTOR, "[data-testid='experiment-view-compare-runs-card']"):
        if card.find_elements(By.CSS_SELECTOR, f"h4[title='{title}']") and card.find_elements(
            By.CSS_SELECTOR, "svg.main-svg"
        ):
            return card
    return None


def _section(driver, name: str):
    """The header of the chart section ``name`` (metrics are grouped by their prefix: train/, eval/, ...)."""
    from selenium.webdriver.common.by import By

    headers = driver.find_elements(By.CSS_SELECTOR, "[data-testid='experiment-view-compare-runs-section-header']")
    return next((h for h in headers if h.text.split("\n")[0] == name), None)


def _loaded_images(driver) -> list[str]:
    """The sources of the artifact images that finished loading, each scrolled into its card's view."""
    return driver.execute_script(
        """
        const imgs = [...document.querySelectorAll("img[src*='get-artifact']")];
        if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return [];
        imgs.forEach(i => i.scrollIntoView({block: 'nearest'}));
        return imgs.map(i => i.src);
        """
    )


def test_a_sampler_stopped_within_its_first_interval_still_logs_its_node(tmp_path: Path) -> None:
    """MLflow's sampler drops what it holds when stopped before its first interval ends (10 s by default), so a
    node whose part of a run is that short was missing from it; vegan_scale's sampler logs one sample then."""
    from mlflow.tracking import MlflowClient

    from vegan_scale.tracking.system_metrics import SystemMetrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("short"))
    sampler = SystemMetrics(run.info.run_id, uri, "node1", resume=False)
    sampler.stop()
    metrics = client.get_run(run.info.run_id).data.metrics
    assert "system/node1/cpu_utilization_percentage" in metrics, sorted(metrics)


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("http://127.0.0.1:notaport", "not a server's address"),
        ("http://[::1", "not a server's address"),
        ("https://:5000", "not a server's address"),
        ("sqlite:///", "a database in memory"),
        ("sqlite://", "a database in memory"),
        ("sqlite:///:memory:?x=1", "a database in memory"),
        ("sqlite:///file::memory:?cache=shared", "a database in memory"),
        ("http://ho st:5000", "not a server's address"),
        ("HTTP://host:5000", "not a store MLflow tracks to"),  # its server would never have been asked at start
        ("bogus://x", "not a store MLflow tracks to"),
    ],
)
def test_a_tracking_uri_that_cannot_work_is_refused_before_training(uri: str, words: str) -> None:
    """A port that is not a number or an unclosed IPv6 address was a traceback from the first request, after the run
    directory was made (its exit status "crashed"); an in-memory sqlite store trained with every update failing.
    Each is refused at the configuration's check, naming the URI and the two forms that work."""
    from vegan_scale.tracking.mlflow_run import check_uri

    with pytest.raises(ConfigError, match=f"tracking URI '.*' is {words}.*use http\\(s\\)://HOST:PORT"):
        check_uri(uri)
    for good in ("http://127.0.0.1:5000", "https://mlflow.example.org", "sqlite:///runs/mlflow.db", "databricks"):
        check_uri(good)


def test_a_store_that_cannot_hold_the_model_is_refused_at_once(tmp_path: Path) -> None:
    """`vegan_scale.load` of an MLflow model with the client's settings as the user has them (by default 120 s a
    request, 7 retries): a server that refuses connections took 250 s to fail and one that accepts connections and
    never answers longer than that, as did one that passes its health check and holds every request of its API (a
    database out of reach); a sqlite URI of a file that does not exist was created, directory and all. Each is now
    refused by name within the start-up check's 10 s a request, and creates nothing."""
    import socket

    from tests.runkit import HoldsWrites, free_port

    missing = tmp_path / "no" / "mlflow.db"
    with socket.socket() as silent, HoldsWrites(reads=False) as held:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are accepted by the kernel, and never answered
        for uri, words in [
            (f"http://127.0.0.1:{free_port()}", "does not answer"),
            (f"http://127.0.0.1:{silent.getsockname()[1]}", "does not answer"),
            (held.uri, "answers its health check but not its API"),
            (f"sqlite:///{missing}", f"there is no MLflow store at {missing}"),
        ]:
            started = time.monotonic()
            with pytest.raises(ConfigError, match=f"cannot download the model runs:/abc/model: .*{words}"):
                vegan_scale.load("runs:/abc/model", tracking_uri=uri)
            assert time.monotonic() - started < 25, uri
    assert not (tmp_path / "no").exists()


def test_a_copied_run_directory_gets_an_mlflow_run_of_its_own(tracked: TrackedRun, tmp_path: Path) -> None:
    """A copy of a run directory (`cp -r`, rsync to another cluster) held its original's run id, so that syncing
    it, or continuing its training, wrote into the original's MLflow run. Synced by a real `vegan-scale sync`, the
    copy gets a run of its own with every step of train/loss, and the original's run is left as it was; moved
    afterwards, the copy keeps its run."""
    client = _client(tracked)
    before = client.get_run(tracked.run_id)
    original_losses = len(client.get_metric_history(tracked.run_id, "train/loss"))
    copy, moved = tmp_path / "copy", tmp_path / "moved"
    subprocess.run(["cp", "-r", str(tracked.run_dir), str(copy)], check=True)

    def sync(run_dir: Path) -> subprocess.CompletedProcess:
        args = single(["-m", "vegan_scale", "sync", str(run_dir), "--uri", tracked.server.uri])
        done = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done

    done = sync(copy)
    said = done.stdout + done.stderr
    assert f"{copy} is a copy of {tracked.run_dir.resolve()}: it gets an MLflow run of its own" in said
    run_id = (copy / "mlflow_run_id").read_text().strip()
    assert run_id != tracked.run_id
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    after = client.get_run(tracked.run_id)
    assert (after.data.metrics, after.info.end_time) == (before.data.metrics, before.info.end_time)
    assert len(client.get_metric_history(tracked.run_id, "train/loss")) == original_losses

    copy.rename(moved)
    done = sync(moved)
    assert "is a copy of" not in done.stdout + done.stderr
    assert (moved / "mlflow_run_id").read_text().strip() == run_id
