"""A real local cluster (`ray start --head`), a tiny training job submitted through the Jobs API."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest

from lasb import artifacts

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_cluster(tmp_path):
    """`ray start --head` in its own temp dir; stopped by its own address afterwards."""
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # short path: Ray's unix sockets live under it and must stay below 107 characters
    temp = Path(tempfile.mkdtemp(prefix="lasb-ray-", dir="/tmp"))
    started = subprocess.run(
        [str(ray_bin), "start", "--head", "--num-cpus", "2", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard", "true",
         "--disable-usage-stats", "--temp-dir", str(temp)],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        # `ray stop` would stop every Ray on this machine (the test session's too): stop only
        # the processes of this cluster, recognised by its temp dir or its GCS port
        import psutil

        procs = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(temp) in cmd or f"127.0.0.1:{port}" in cmd or f"--gcs_server_port={port}" in cmd:
                procs.append(p)
        for p in procs:
            p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_training_job_submitted_through_the_jobs_api_publishes_a_model(
        local_cluster, demo_data, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = local_cluster
    registry = tmp_path / "registry"
    client = JobSubmissionClient(address)
    submit = partial(
        client.submit_job,
        # the venv's interpreter: `python` on PATH may be another one here
        entrypoint=(f"{sys.executable} -m jobs.train --data {demo_data} --category demo_texture "
                    f"--registry {registry} --storage {tmp_path / 'runs'} --preset tiny "
                    "codec.steps=10 denoiser.steps=20"),
        runtime_env={"working_dir": str(ROOT), "excludes": [".venv", ".git", "demo_out",
                                                             "runs", "benchmarks/results"],
                     "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}},
    )
    for attempt in range(30):  # the job agent comes up a few seconds after `ray start`
        try:
            job = submit()
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == 29:
                raise
            time.sleep(2)
    deadline = time.time() + 400
    status = client.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(2)
        status = client.get_job_status(job)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "published demo_texture version" in logs
    folder, version = artifacts.fetch(str(registry), "demo_texture")
    assert (folder / "calibration.json").exists() and version in logs
