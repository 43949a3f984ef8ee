"""The deployment files run for real: a Prefect server on 127.0.0.1 (SQLite) with the
deployments of infra/prefect/prefect.yaml registered by ``metasep deploy`` and a process worker
that runs the nightly separation; a Ray head started with ``ray start --head`` that runs the
catalog job submitted through Ray's job submission API. Both read a synth library in S3 (a moto
server), with credentials only in the environment of the processes that run the work, as a
Kubernetes Secret would give them, and both must never show those credentials."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import pytest
from services import Service, free_port, wait_until

from model import STEMS
from pipeline.storage.manifest import read_manifests

pytestmark = [pytest.mark.infra, pytest.mark.slow]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
BUCKET = "infra-music"
ACCESS_KEY = f"AKIA{uuid.uuid4().hex[:16].upper()}"
SECRET = f"do-not-print-{uuid.uuid4().hex}"
RAY_TOKEN = uuid.uuid4().hex  # the cluster's token, as the Secret metasep-ray-token holds it
RAY_AUTH = {"Authorization": f"Bearer {RAY_TOKEN}"}


@pytest.fixture(scope="module")
def library(s3_server, tmp_path_factory) -> list[str]:
    """Two synth songs of 3 s (mixtures only) in s3://infra-music/library/<song>.wav."""
    import s3fs

    out = tmp_path_factory.mktemp("synth")
    command = [BIN / "metasep", "synth", out, "--tracks", "2", "--seconds", "3", "--seed", "1"]
    subprocess.run([*map(str, command), "--split", "test"], check=True, capture_output=True)
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(BUCKET)
    songs = sorted(folder.name for folder in (out / "test").iterdir())
    for song in songs:
        fs.put_file(str(out / "test" / song / "mixture.wav"), f"{BUCKET}/library/{song}.wav")
    return songs


def storage_options(s3_server, credentials: bool) -> dict:
    options = {
        "endpoint_url": s3_server["endpoint_url"],
        "client_kwargs": s3_server["client_kwargs"],
    }
    return {**options, "key": ACCESS_KEY, "secret": SECRET} if credentials else options


def check_outputs(s3_server, destination: str, songs: list[str]) -> None:
    """Four stems per song and one ``ok`` manifest row per song under ``destination``."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    rows = read_manifests(fs, destination).to_pylist()
    assert sorted(row["track_id"] for row in rows) == [f"{song}.wav" for song in songs]
    assert all(row["status"] == "ok" for row in rows), rows
    for song in songs:
        for stem in STEMS:
            assert fs.size(f"{destination}/stems/{song}/{stem}.flac") > 1000
    assert len(fs.ls(f"{destination}/runs")) == 1


def base_env(home: Path) -> dict[str, str]:
    """This test's environment for the services, without credentials and without any
    PREFECT_API_URL or RAY_ADDRESS of the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_", "AWS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


# --- Prefect -----------------------------------------------------------------------------------


@dataclass
class PrefectServer:
    env: dict[str, str]  # what points a process at the server
    ready: Callable[[], None]  # waits until it answers


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 with its own SQLite database. Its scheduler runs
    every 2 s, so the nightly schedule gets its runs. It starts while other fixtures (the synth
    library) are built: call ``ready()`` before using it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = base_env(home)
    env.update(
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
    )
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Service(command, env, home / "server.log")

    def healthy() -> bool:
        server.check_alive()
        try:
            with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5) as reply:
                return json.load(reply) is True
        except OSError:
            return False

    try:
        yield PrefectServer(env, lambda: wait_until(healthy, 240, "the Prefect server"))
    finally:
        server.stop()
    assert not server.alive()


def test_nightly_deployment_runs_on_a_process_worker(prefect_server, library, s3_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    prefect_server.ready()
    env = prefect_server.env
    destination = f"{BUCKET}/nightly"
    deploy_env = {
        **env,
        "METASEP_NIGHTLY_SOURCE": f"s3://{BUCKET}/library",
        "METASEP_NIGHTLY_DESTINATION": f"s3://{destination}",
        # the other deployments are registered too (not run here)
        "METASEP_EVAL_REFERENCES": f"s3://{BUCKET}/references",
        "METASEP_EVAL_ESTIMATES": f"s3://{destination}",
        "METASEP_EVAL_DESTINATION": f"s3://{BUCKET}/evaluation",
        "METASEP_BENCHMARK_DESTINATION": str(tmp_path / "benchmark"),
    }
    deploy = subprocess.run(
        [str(BIN / "metasep"), "deploy", "--pool", "all"],
        env=deploy_env,
        cwd=tmp_path,  # the file is found in the checkout the package runs from
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        deployment = client.read_deployment_by_name("separate-catalog/nightly")
        assert deployment.work_pool_name == "metasep-process"
        assert deployment.entrypoint == "flows.separate.separate_catalog"
        assert deployment.parameters["source"] == f"s3://{BUCKET}/library"
        assert deployment.parameters["destination"] == f"s3://{destination}"
        (schedule,) = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
        assert client.read_work_pool("metasep-process").type == "process"
        # the Kubernetes variant: the server took the pool's template and the job variables
        pool = client.read_work_pool("metasep-kubernetes")
        assert pool.type == "kubernetes" and "metasep-s3" in json.dumps(pool.base_job_template)
        on_kubernetes = client.read_deployment_by_name("separate-catalog/nightly-k8s")
        assert on_kubernetes.job_variables["image"].startswith("metasep/metasep:")
        assert on_kubernetes.parameters["gpus_per_worker"] == 1

        # the server's scheduler turns the cron into runs at 02:00 UTC
        of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        scheduled_only = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        )
        scheduled = wait_until(
            lambda: client.read_flow_runs(
                deployment_filter=of_deployment, flow_run_filter=scheduled_only
            ),
            120,
            "the scheduler to schedule the nightly runs",
        )
        for run in scheduled:
            start = run.expected_start_time.astimezone(UTC)
            assert (start.hour, start.minute, start.second) == (2, 0, 0)

        # the credentials live in the worker's environment only
        worker_env = {
            **env,
            "METASEP_STORAGE_OPTIONS": json.dumps(storage_options(s3_server, credentials=True)),
        }
        worker = Service(
            [str(BIN / "prefect"), "worker", "start", "--pool", "metasep-process"],
            worker_env,
            tmp_path / "worker.log",
            cwd=tmp_path,
        )
        try:
            from prefect.deployments import run_deployment

            flow_run = run_deployment("separate-catalog/nightly", timeout=0)

            def finished():
                worker.check_alive()
                state = client.read_flow_run(flow_run.id).state
                return state if state is not None and state.is_final() else None

            state = wait_until(finished, 480, "the nightly flow run", every=2)
            assert state.type == StateType.COMPLETED, worker.output()
            check_outputs(s3_server, destination, library)

            of_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))

            def settings_logged():
                messages = [log.message for log in client.read_logs(log_filter=of_run)]
                return messages if any(m.startswith("settings:") for m in messages) else None

            logs = wait_until(settings_logged, 60, "the flow run's logs")
            (settings_line,) = [line for line in logs if line.startswith("settings:")]
            assert s3_server["endpoint_url"] in settings_line and "'secret': '***'" in settings_line
            recorded = json.dumps(client.read_flow_run(flow_run.id).model_dump(mode="json"))
            for text in (*logs, recorded, worker.output(100_000)):
                assert SECRET not in text and ACCESS_KEY not in text
        finally:
            worker.stop(first=2)  # SIGINT: the worker's own graceful shutdown


# --- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server, prefect_server):
    """``ray start --head`` on 127.0.0.1 with ports and a temp dir of its own (other tests may
    run Ray beside it) and token authentication, as in infra/ray; the storage credentials are
    in its environment, as the Secret puts them into the head and worker containers, and the
    jobs' flow runs are recorded by the Prefect server (PREFECT_API_URL, from the ConfigMap).
    Yields the dashboard URL (job submission)."""
    from ray.job_submission import JobSubmissionClient

    home = tmp_path_factory.mktemp("ray-job-home")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-ms-", dir="/tmp"))  # short: socket paths
    env = base_env(home)
    env.update(
        PREFECT_API_URL=prefect_server.env["PREFECT_API_URL"],
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=RAY_TOKEN,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET,
        METASEP_STORAGE_OPTIONS=json.dumps(storage_options(s3_server, credentials=False)),
    )
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    command += ["--dashboard-host", "127.0.0.1", "--include-dashboard", "true"]
    command += ["--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp_dir)]
    command += ["--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    head = Service(command, env, home / "ray-head.log")
    url = f"http://127.0.0.1:{dashboard}"

    def reachable():
        head.check_alive()
        try:
            return JobSubmissionClient(url, headers=RAY_AUTH)
        except Exception:
            return None

    try:
        wait_until(reachable, 240, "the Ray dashboard's job API", every=2)
        yield url
    finally:
        head.stop(grace=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not head.alive()


def test_catalog_job_submitted_to_a_ray_head(ray_head, library, s3_server, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from ray.job_submission import JobStatus, JobSubmissionClient

    with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no jobs
        urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    prefect_server.ready()  # the job records its flow run there
    client = JobSubmissionClient(ray_head, headers=RAY_AUTH)
    destination = f"{BUCKET}/ray-job"
    entrypoint = f"metasep separate s3://{BUCKET}/library s3://{destination} --workers 1"
    job = client.submit_job(entrypoint=entrypoint, submission_id=f"metasep-{uuid.uuid4().hex[:8]}")
    try:
        status = wait_until(
            lambda: (s := client.get_job_status(job)).is_terminal() and s, 480, "the job", every=2
        )
    finally:
        if not client.get_job_status(job).is_terminal():
            client.stop_job(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "2 planned: 2 ok" in logs
    check_outputs(s3_server, destination, library)
    info = json.dumps(client.get_job_info(job).__dict__, default=str)
    with (
        temporary_settings({PREFECT_API_URL: prefect_server.env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as prefect,
    ):
        runs = prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["separate-catalog"]))
        )
    (recorded,) = [r for r in runs if r.parameters["destination"] == f"s3://{destination}"]
    assert recorded.state.is_completed() and recorded.parameters["workers"] == 1
    recorded = json.dumps(recorded.model_dump(mode="json"))
    for text in (logs, info, recorded):
        assert SECRET not in text and ACCESS_KEY not in text and RAY_TOKEN not in text
