"""Shared fixtures: one real local Ray per session, a tiny published model on generated data."""

from __future__ import annotations

import os

import pytest
import torch

# Before Ray starts: keep it offline, quiet and failing fast instead of stalling.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

torch.set_num_threads(1)  # this process shares 2 cores with Ray workers


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    from jobs.common import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """A small generated MVTec-layout category (32 px) with drawn test defects."""
    from lasb.demo_data import make_demo_category

    root = str(tmp_path_factory.mktemp("data"))
    make_demo_category(root, "demo_texture", size=32, n_train=48, n_test_good=20,
                       n_test_defect=30, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_model(ray_local, demo_data, tmp_path_factory):
    """Train the tiny preset through Ray Train on the demo data and publish it."""
    from jobs import train as train_job
    from lasb.config import load_config

    registry = str(tmp_path_factory.mktemp("registry"))
    # training sees a root holding only train/: proof that it never reads the test split
    train_only = tmp_path_factory.mktemp("train_only")
    (train_only / "demo_texture").mkdir()
    (train_only / "demo_texture" / "train").symlink_to(f"{demo_data}/demo_texture/train")
    cfg = load_config("tiny", overrides=["codec.steps=150", "denoiser.steps=500"])
    version = train_job.run(cfg, str(train_only), "demo_texture", registry,
                            storage=str(tmp_path_factory.mktemp("runs")))
    return {"registry": registry, "category": "demo_texture", "version": version,
            "data": demo_data, "cfg": cfg}


# --- S3 through moto's server on 127.0.0.1 ----------------------------------------------------
# Fake keys for the whole session, set at import so that every Ray worker (whenever Ray starts)
# inherits them: no test can reach real AWS with real credentials. The endpoint is known only
# once the server runs; jobs forward it to their Ray tasks (lasb.storage.worker_env).
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (free port); yields its endpoint URL, set as AWS_ENDPOINT_URL."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()
