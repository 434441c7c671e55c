"""A real MLflow tracking server (on 127.0.0.1) that goes away and comes back: training never stops for it and
no metric is lost.

One test stops the server's process and starts it again. The others cut the connection to a server that keeps
running (:class:`Link`, a relay that refuses connections and drops the open ones while cut), which is what a client
sees of a server that went away, or silence it (connections accepted, never answered: a server that hangs). All
use the session's server (conftest's ``mlflow_server``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import ROOT
from tests.runkit import (
    HoldsWrites,
    MlflowServer,
    ddp,
    env,
    exit_status,
    finish,
    free_port,
    run,
    single,
    start,
    steps_logged,
    train_args,
    wait_for_step,
    wait_until,
)

pytestmark = pytest.mark.distributed


class Link:
    """A TCP relay from a port of its own to a server's. Cut, connections are refused and the open ones dropped, as
    when the server goes away; silenced, they are accepted and never answered, as from a server that hangs or a route
    that drops packets; restored, it relays again on the same port."""

    def __init__(self, server: MlflowServer) -> None:
        self.server, self.port = server, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> Link:
        return self._listen(relay=True)

    def silence(self) -> Link:
        return self._listen(relay=False)

    def _listen(self, relay: bool) -> Link:
        self.cut()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener, relay), daemon=True).start()
        return self

    def cut(self) -> None:
        if self._listener is None:
            return
        with self._lock:
            dropped, self._open = [self._listener, *self._open], set()
        self._listener = None
        for sock in dropped:
            _close(sock)

    def _accept(self, listener: socket.socket, relay: bool) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            if not relay:  # held open, unanswered, until cut
                with self._lock:
                    self._open.add(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.server.port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for sock in (source, sink):
        _close(sock)


def _close(sock: socket.socket) -> None:
    """Shut down first: that wakes a thread blocked in accept() or recv() on the socket, which close() alone does
    not."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


STEPS = 200


@pytest.fixture()
def link(mlflow_server: MlflowServer) -> Iterator[Link]:
    """A link to the shared server (running again if a failed test left it stopped), cut until the test restores
    it."""
    made = Link(mlflow_server.start())
    yield made
    made.cut()


def _args(shards: Path, root: Path, name: str, uri: str, *extra: str) -> list[str]:
    return train_args(
        shards,
        root,
        name,
        "wae_mmd",
        f"tracking.uri={uri}",
        "tracking.backend=mlflow",
        f"train.max_steps={STEPS}",
        "checkpoint.every_steps=0",
        "eval.every_steps=1000",
        "tracking.close_timeout_s=120",
        *extra,
    )


def test_server_outage_mid_run_loses_nothing(tiny_shards: Path, tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """The server's process stops at step 30 and starts again later: training goes on (exit 0) and, at the end,
    the server holds every step exactly once."""
    server = mlflow_server
    run_dir = tmp_path / "mnist" / "outage"
    proc = start(single(_args(tiny_shards, tmp_path, "outage", server.uri)))
    wait_for_step(proc, run_dir, 30)
    server.stop()
    wait_for_step(proc, run_dir, 100)  # training does not wait for the server
    server.start()
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert "fails" in out and "answers again" in out
    assert server.steps(run_dir) == list(range(1, STEPS + 1))


def test_unreachable_at_start(tiny_shards: Path, tmp_path: Path, link: Link) -> None:
    """A server that refuses connections at start stops the run with exit code 2 and a way out. With
    tracking.on_unreachable=continue and a server that accepts connections but never answers, the run trains after
    the 10 s health check (not after a further request's 20 s timeout), and when the server answers later it
    receives every step."""
    refused = run(single(_args(tiny_shards, tmp_path, "refused", link.uri)))
    assert refused.returncode == 2 and "tracking.on_unreachable=continue" in refused.stderr
    run_dir = tmp_path / "mnist" / "late"
    link.silence()
    started = time.monotonic()
    proc = start(single(_args(tiny_shards, tmp_path, "late", link.uri, "tracking.on_unreachable=continue")))
    wait_for_step(proc, run_dir, 1)
    assert time.monotonic() - started < 25
    wait_for_step(proc, run_dir, 20)
    link.restore()
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert "does not answer" in out and "cannot open the run yet" not in out, out[-3000:]
    assert link.server.steps(run_dir) == list(range(1, STEPS + 1))


def test_a_server_that_answers_its_health_check_and_no_read_is_refused_at_start(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """A server whose database is out of reach passes the health check and holds every request of the API: the run
    started and waited 20 s at its first step for a run that could not be opened. One read of the API now belongs
    to the start-up check, which refuses such a server by name (exit 2) within its two 10 s requests."""
    with HoldsWrites(reads=False) as server:
        started = time.monotonic()
        refused = run(single(_args(tiny_shards, tmp_path, "held", server.uri)), timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert time.monotonic() - started < 60
    said = refused.stdout + refused.stderr
    assert f"the MLflow server at {server.uri} answers its health check but not its API" in said, said[-3000:]
    assert "tracking.on_unreachable=continue" in said and not (tmp_path / "mnist" / "held" / "metrics.jsonl").exists()


def test_a_server_that_stops_answering_then_sigterm_to_every_process(
    tiny_shards: Path, tmp_path: Path, link: Link
) -> None:
    """Under `accelerate launch` with 2 processes, the server stops answering once it has some of the run
    (connections accepted, no reply: the client's requests wait for their timeout), and at step 30 SIGTERM reaches
    the launcher and both ranks. Training never waited for the server; the ranks stop together with a checkpoint,
    and the main one leaves within its close timeout rather than after the hung request, naming `vegan-scale
    sync`, which later sends every step and the run's KILLED status."""
    link.restore()
    run_dir = tmp_path / "mnist" / "hung"
    args = _args(tiny_shards, tmp_path, "hung", link.uri, "tracking.close_timeout_s=2", "train.max_steps=1000")
    proc = start(ddp(args))
    wait_for_step(proc, run_dir, 5)
    wait_until("a step on the server", lambda: link.server.steps(run_dir), proc, timeout=60)
    link.silence()
    wait_for_step(proc, run_dir, 30)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    _, out = finish(proc)
    assert time.monotonic() - signalled < 10, out[-3000:]  # MLflow's request timeout is 20 s
    status = exit_status(run_dir)
    assert status["code"] == 75 and 30 <= status["step"] < 1000, (status, out[-3000:])
    assert (run_dir / "checkpoints" / f"step_{status['step']:08d}" / "COMPLETE").exists()
    assert f"vegan-scale sync {run_dir}" in out, out[-3000:]
    link.restore()
    assert 0 < len(link.server.steps(run_dir)) < status["step"]
    synced = _sync(run_dir, link.uri)
    assert synced.returncode == 0, synced.stderr[-3000:]
    view = _server_view(link.server, run_dir)
    assert [step for step, _ in view["metrics"]["train/loss"]] == list(range(1, status["step"] + 1))
    assert view["status"] == "KILLED"


def _sync(run_dir: Path, uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vegan_scale", "sync", str(run_dir), "--uri", uri],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _server_view(server: MlflowServer, run_dir: Path) -> dict:
    """Everything the server holds of a run: status and end time, params, metric histories, artifacts, and its
    logged models (name, status, files) and the steps they were logged at."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.uri)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    artifacts = sorted(a.path for folder in ("", "images") for a in client.list_artifacts(run.info.run_id, folder))
    models = [
        (m.name, str(m.status), sorted(a.path for a in client.list_logged_model_artifacts(m.model_id)))
        for m in client.search_logged_models([run.info.experiment_id])
        if m.source_run_id == run.info.run_id
    ]
    histories = {
        k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics
    }
    return {
        "status": run.info.status,
        "end_time": run.info.end_time,
        "params": run.data.params,
        "metrics": histories,
        "artifacts": artifacts,
        "models": models,
        "model_steps": [out.step for out in run.outputs.model_outputs] if run.outputs else [],
    }


def test_sync_creates_the_run_a_server_never_saw(tiny_shards: Path, tmp_path: Path, link: Link) -> None:
    """tracking.on_unreachable=continue and a server that never answered while the run trained: `vegan-scale sync`
    later creates the MLflow run and sends params, every metric, the figures, the config and the exported model,
    and sets the final status; a second sync changes nothing."""
    run_dir = tmp_path / "mnist" / "never"
    args = _args(
        tiny_shards,
        tmp_path,
        "never",
        link.uri,
        "tracking.on_unreachable=continue",
        "tracking.close_timeout_s=1",
        "train.max_steps=30",
        "eval.every_steps=15",
    )
    trained = run(single(args))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert not (run_dir / "mlflow_run_id").exists()
    # the server still away, then a URI of no tracking store: one line each, not MLflow's traceback
    for uri, code, words in ((link.uri, 69, "and that its server answers"), ("bogus://x", 2, "not a store MLflow")):
        refused = _sync(run_dir, uri)
        assert refused.returncode == code and words in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr and not (run_dir / "mlflow_run_id").exists()
    link.restore()
    # damage on storage: a figure cut short, a metric's name garbled (MLflow refused the whole batch for it)
    damaged = sorted((run_dir / "figures").glob("*.png"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "\\u0000": 1.0}\n')
    first = _sync(run_dir, link.uri)
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stdout + first.stderr
    assert f"{damaged} cannot be read" in said, said[-3000:]
    assert "1 value(s) that are no number or under names MLflow refuses" in said, said[-3000:]
    view = _server_view(link.server, run_dir)
    assert view["status"] == "FINISHED"
    assert view["params"]["penalty.kind"] == "mmd" and view["params"]["train.max_steps"] == "30"
    assert [step for step, _ in view["metrics"]["train/loss"]] == list(range(1, 31))
    assert "config.yaml" in view["artifacts"]
    assert [(name, status) for name, status, _ in view["models"]] == [("model", "READY")]
    assert "MLmodel" in view["models"][0][2] and view["model_steps"] == [30]
    figures = len(list((run_dir / "figures").glob("*.png")))
    assert figures == 6 and len([a for a in view["artifacts"] if a.startswith("images/")]) >= figures - 1
    again = _sync(run_dir, link.uri)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _server_view(link.server, run_dir) == view
    # a run directory without its exit status (the process killed after its export): the model is logged at the
    # export's step, not at step 0
    killed = tmp_path / "mnist" / "killed"
    shutil.copytree(run_dir, killed)
    (killed / "exit_status.json").unlink()
    (killed / "mlflow_run_id").unlink()
    assert _sync(killed, link.uri).returncode == 0
    assert _server_view(link.server, killed)["model_steps"] == [30]


def test_sync_after_a_mid_run_outage_finishes_the_run(tiny_shards: Path, tmp_path: Path, link: Link) -> None:
    """The server went away mid-run and the run ended before it came back (close timeout 1 s), saying how to catch
    up: sync sends exactly the missing steps, the figures and the model, and the run no longer shows RUNNING."""
    link.restore()
    run_dir = tmp_path / "mnist" / "gone"
    extra = ("tracking.close_timeout_s=1", "train.max_steps=60", "eval.every_steps=30")
    proc = start(single(_args(tiny_shards, tmp_path, "gone", link.uri, *extra)))
    wait_for_step(proc, run_dir, 5)
    link.cut()
    code, out = finish(proc)
    assert code == 0 and f"vegan-scale sync {run_dir}" in out, out[-3000:]
    link.restore()
    before = _server_view(link.server, run_dir)
    assert before["status"] == "RUNNING" and len(before["metrics"].get("train/loss", [])) < 60
    synced = _sync(run_dir, link.uri)
    assert synced.returncode == 0, synced.stderr[-3000:]
    view = _server_view(link.server, run_dir)
    assert view["status"] == "FINISHED" and [m[:2] for m in view["models"]] == [("model", "READY")]
    assert [step for step, _ in view["metrics"]["train/loss"]] == list(range(1, 61))


def test_a_run_is_created_once_whatever_fails_after_the_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Creating the MLflow run was retried whole: a failure after the server made it (the answer to create_run
    lost, its params refused) left a second RUNNING run of the same name with every param, one per failure. The id
    is kept as soon as the run exists, and a retry, here each by another process (a sync run again, a training
    resumed), finds a run whose answer was lost by the token the run directory keeps."""
    from mlflow.tracking import MlflowClient

    from vegan_scale.rundir import RunDir
    from vegan_scale.tracking.mlflow_run import MlflowRun, NewRun

    uri, params = f"sqlite:///{tmp_path / 'mlflow.db'}", {"a": "1", "b": "2"}
    new = NewRun("e", "r", {"t": "1"}, params, None)
    faults = {"create_run": 1, "log_batch": 1}
    real_create, real_batch = MlflowClient.create_run, MlflowClient.log_batch

    def create_run(self, *args, **kwargs):
        made = real_create(self, *args, **kwargs)
        if faults["create_run"]:
            faults["create_run"] -= 1
            raise ConnectionError("the answer to create_run lost")
        return made

    def log_batch(self, *args, **kwargs):
        if faults["log_batch"] and kwargs.get("params"):
            faults["log_batch"] -= 1
            raise ConnectionError("params refused")
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", create_run)
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    for attempt in range(3):
        try:
            run = MlflowRun.create(uri, new, RunDir(tmp_path / "run"))  # each try as a new process would
            break
        except ConnectionError:
            assert attempt < 2
    client = MlflowClient(uri)
    (held,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    kept = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    assert held.info.run_id == run.run_id == kept and held.data.params == params


def test_a_store_that_refuses_the_run_is_said_once_and_holds_no_end(tiny_shards: Path, tmp_path: Path) -> None:
    """The run's experiment deleted in the store: opening the run was refused, then every update failed on the run
    never opened, retried as a passing failure for the whole run and, at its end, for tracking.close_timeout_s (a
    6-step run took 70 s), which ended saying to sync "once the server answers". The refusal is said once with the
    store's reason, the updates dropped are counted at the end with the fix, and the run ends at once."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment("mnist"))
    started = time.monotonic()
    trained = run(single(_args(tiny_shards, tmp_path, "refused", store, "train.max_steps=6")))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert time.monotonic() - started < 60  # 120 s of close_timeout_s before
    said = trained.stdout + trained.stderr
    assert said.count("MLflow refused") == 2 and "cannot open the run yet" not in said, said[-3000:]
    assert "MLflow refused to open the run (" in said and "the opening of the run among them" in said
    assert f"`vegan-scale sync {tmp_path / 'mnist' / 'refused'}`" in said and "tracking.experiment" in said
    # a continued run whose MLflow run was deleted: one warning per metric flush before, the same two lines now
    client.restore_experiment(client.get_experiment_by_name("mnist").experiment_id)
    kept = _args(tiny_shards, tmp_path, "kept", store, "train.max_steps=6", "checkpoint.every_steps=6")
    assert run(single(kept)).returncode == 0
    client.delete_run((tmp_path / "mnist" / "kept" / "mlflow_run_id").read_text().strip())
    continued = run(single([*kept, "train.max_steps=9"]))
    said = continued.stdout + continued.stderr
    assert continued.returncode == 0 and said.count("MLflow refused") == 2, said[-3000:]
    assert "MLflow refused to open the run (" in said and "the opening of the run among them" in said


def test_an_evaluation_with_odd_values_is_sent_once(tmp_path: Path) -> None:
    """eval.json holding NaN (a collapsed model's FID), an infinity or a number written as text got one more point
    at every sync: NaN never equals itself, sqlite keeps an infinity as the largest float, and "0.5" is not 0.5."""
    from mlflow.tracking import MlflowClient

    from vegan_scale.tracking.mlflow_run import MlflowRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = MlflowRun(uri, client.create_run(client.create_experiment("e")).info.run_id, new=False)
    report = tmp_path / "eval.json"
    report.write_text('{"step": 6, "model": {"fid": NaN, "mse": 0.25, "kid": "0.5"}, "real": {"fid": Infinity}}')
    for _ in range(3):
        run.send_evaluation(report)
    for key in ("final/fid", "final/mse", "final/kid", "final/real/fid"):
        assert len(client.get_metric_history(run.run_id, key)) == 1, key


def test_the_python_api_does_not_wait_for_a_server_that_hangs_after_its_health_check(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """The Python API leaves MLflow's client settings as the user has them (by default 120 s a request, 7 retries).
    A server that passed the health check and then never answered held the run's first step for about a quarter of
    an hour; the run now trains after waiting 20 s for it, ends within its close timeout, and says how to send it
    all later."""
    run_dir = tmp_path / "mnist" / "api"
    args = _args(tiny_shards, tmp_path, "api", "URI", "tracking.close_timeout_s=1", "train.max_steps=20")[3:]
    environment = {k: v for k, v in env().items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    script = "import sys, vegan_scale; vegan_scale.train(sys.argv[1], sys.argv[2:])"
    with HoldsWrites() as server:
        uri = server.uri
        started = time.monotonic()
        trained = subprocess.run(
            [sys.executable, "-c", script, *[a.replace("URI", uri) for a in args]],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=150,
        )
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert time.monotonic() - started < 100
    said = (run_dir / "train.log").read_text()  # the API's caller has the console; the run's log has it all
    assert f"MLflow at {uri} has not answered the opening of the run in 20 s" in said, said[-3000:]
    assert f"vegan-scale sync {run_dir}" in said, said[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"train/loss"' in line] == list(range(1, 21))


def test_sigterm_to_every_process_while_the_start_waits_for_a_server_that_hangs(
    tiny_shards: Path, tmp_path: Path
) -> None:
    """Under `accelerate launch` with 2 processes, the main one waits (at most 20 s) for a server that passed its
    health check and holds every API request, the other at the first collective; SIGTERM reaches the launcher and
    both ranks then. The job stops together before its first step, within the wait and a close timeout, and says
    so in its exit status, with nothing trained and no checkpoint."""
    run_dir = tmp_path / "mnist" / "waiting"
    with HoldsWrites() as server:
        proc = start(ddp(_args(tiny_shards, tmp_path, "waiting", server.uri, "tracking.close_timeout_s=1")))
        wait_until("the first API request", server.asked.is_set, proc, timeout=120)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        _, out = finish(proc, timeout=120)
    assert time.monotonic() - signalled < 45, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == 75 and status["step"] == 0, (status, out[-3000:])
    assert "before step 1" in status["reason"], status
    assert not list((run_dir / "checkpoints").glob("step_*")) and steps_logged(run_dir) == 0


def test_a_continuation_that_makes_the_mlflow_run_sends_the_earlier_attempts(tiny_shards: Path, tmp_path: Path) -> None:
    """The first attempt trained with its server away (tracking.on_unreachable=continue) and stopped; the second
    made the MLflow run and sent only its own steps: the first attempt's were in metrics.jsonl and never reached the
    store, and `vegan-scale sync` said it was up to date (it sends steps after the last one the store holds). The
    run a continuation makes gets the earlier attempts' rows and figures first."""
    from tests.runkit import local_mlflow

    away = f"http://127.0.0.1:{free_port()}"
    common = [
        "tracking.close_timeout_s=1",
        "tracking.on_unreachable=continue",
        "eval.every_steps=5",
        "checkpoint.every_steps=10",
    ]
    first = run(single(_args(tiny_shards, tmp_path, "late", away, *common, "train.max_steps=10")))
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "mnist" / "late"
    assert not (run_dir / "mlflow_run_id").exists()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    second = run(single(_args(tiny_shards, tmp_path, "late", store, *common, "train.max_steps=20")))
    assert second.returncode == 0, second.stderr[-3000:]
    client, run_id = local_mlflow(run_dir)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 21))
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert [n for n in images if "+step+5+" in n] and [n for n in images if "+step+10+" in n], images


def test_values_that_are_no_number_in_metrics_jsonl_are_left_out(tmp_path: Path) -> None:
    """A row of metrics.jsonl holding null or text (storage damage, a hand edit) was a TypeError: `vegan-scale sync`
    ended in a traceback and a continuation's sending thread retried it for ever, sending nothing after it. Such
    values are left out with a warning; every number is sent."""
    from mlflow.tracking import MlflowClient

    from vegan_scale.rundir import RunDir
    from vegan_scale.tracking.mlflow_run import MlflowRun

    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    rows = [
        {"step": 1, "train/loss": 0.5},
        {"step": 2, "train/loss": None, "train/lr": "abc"},
        {"step": 3, "train/loss": 0.25},
    ]
    run_dir.metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = MlflowRun(uri, client.create_run(client.create_experiment("e")).info.run_id, new=False)
    run.send_run_dir(run_dir)
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "train/loss")] == [(1, 0.5), (3, 0.25)]
    assert client.get_metric_history(run.run_id, "train/lr") == []


def test_sync_of_a_run_the_store_does_not_hold_names_the_file_that_says_which_run(
    reference: Path, tmp_path: Path
) -> None:
    """A run directory whose mlflow_run_id names a run of another store (a continuation given another
    tracking.uri, a store made again): sync said to check that the server answers, which it did. It names the file
    and both ways out."""
    from mlflow.tracking import MlflowClient

    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    (copy / "mlflow_run_id").write_text("0" * 32 + "\n")
    store = f"sqlite:///{tmp_path / 'other.db'}"
    MlflowClient(store).search_experiments()  # the store exists, without that run
    done = run(single(["-m", "vegan_scale", "sync", str(copy), "--uri", store]))
    assert done.returncode == 69, done.stderr[-3000:]
    assert f"the MLflow run named in {copy / 'mlflow_run_id'} is not in the store at {store}" in done.stderr
    assert "or remove that file to make a new run there" in done.stderr


def test_an_experiment_another_task_creates_first_is_joined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two array tasks of a sweep starting together both found no experiment, and the second's creation was
    refused (RESOURCE_ALREADY_EXISTS, a refusal the tracker does not retry): its run trained untracked. The
    experiment the other made is joined. The race is made here: the look finds nothing, the store has it."""
    from mlflow.tracking import MlflowClient

    from vegan_scale.rundir import RunDir
    from vegan_scale.tracking.mlflow_run import MlflowRun, NewRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = MlflowClient(uri).create_experiment("sweeps")
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lambda self, name, _calls=[]: _calls.append(1) or (
        None if len(_calls) == 1 else self.get_experiment(made)))  # fmt: skip
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run = MlflowRun.create(uri, NewRun("sweeps", "t-1", {}, {}, None), run_dir)
    assert run.experiment_id == made
