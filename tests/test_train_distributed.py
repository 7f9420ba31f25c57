"""Checkpoints, resume, worker failures, DDP and many categories (issue 4), on a real local Ray."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lasb.config import load_config
from lasb.pairs import iterate_pairs
from lasb.train import train_models

TINY = ["codec.steps=20", "denoiser.steps=30", "train.log_every=10", "score.select=false"]


def _images(n: int = 12, size: int = 32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _stream(cfg, images, start_batch: int):
    rows = (cfg.codec.steps + 2 + cfg.denoiser.steps + 1) * cfg.train.batch_size
    return iterate_pairs(images, rows, cfg.train.batch_size, cfg.augment, cfg.train.seed,
                         start=start_batch * cfg.train.batch_size)


@pytest.mark.parametrize("stage, step", [("codec", 10), ("bridge", 20)])
def test_resume_from_a_checkpoint_continues_exactly(stage, step):
    """Interrupt at a checkpoint, resume with the stream from the next row: the final weights are
    those of the uninterrupted run (models, EMA, optimizer, LR schedule and RNG all restored)."""
    cfg = load_config("tiny", overrides=TINY + ["train.checkpoint_every=10"])
    images = _images()
    saved = {}

    def keep(st, s, build):
        # serialised at once, as the Ray worker does: the state shares storage with live weights
        buffer = io.BytesIO()
        torch.save(build(), buffer)
        saved[(st, s)] = buffer.getvalue()

    full = train_models(cfg, _stream(cfg, images, 0), checkpoint=keep)
    assert set(saved) == {("codec", 10), ("bridge", 10), ("bridge", 20)}
    state = torch.load(io.BytesIO(saved[(stage, step)]), weights_only=True)
    consumed = step if stage == "codec" else cfg.codec.steps + 2 + step
    resumed = train_models(cfg, _stream(cfg, images, consumed), resume=state)

    for a, b in zip(full.denoiser.parameters(), resumed.denoiser.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(full.codec.parameters(), resumed.codec.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert resumed.codec.scale == pytest.approx(full.codec.scale, rel=1e-6)
    assert [e for e in resumed.history if e["stage"] == "resume"] == [
        {"stage": "resume", "from_stage": stage, "from_step": step}]
    assert resumed.history[-1]["step"] == cfg.denoiser.steps


def test_ddp_two_workers_step_equals_one_worker(ray_local, tmp_path):
    """One bridge step on a global batch of 8: 2 DDP workers x 4 == 1 worker x 8."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lasb.config import to_dict

    cfg = load_config("tiny", overrides=["bridge.sampler=ot_ode"])  # no q_sample noise

    def one_step(config: dict) -> None:
        import ray.train
        import ray.train.torch
        import torch

        from lasb.config import from_dict
        from lasb.denoiser import build_denoiser
        from lasb.train import bridge_step, schedule_for

        torch.set_num_threads(1)
        cfg = from_dict(config["cfg"])
        sched = schedule_for(cfg)
        torch.manual_seed(0)
        denoiser = build_denoiser(cfg.denoiser, cfg.codec.latent_channels, cfg.latent_size)
        model = ray.train.torch.prepare_model(denoiser)
        g = torch.Generator().manual_seed(1)
        shape = (8, cfg.codec.latent_channels, cfg.latent_size, cfg.latent_size)
        z0, z1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        n = torch.randint(0, sched.n_steps, (8,), generator=g)
        ctx = ray.train.get_context()
        k, r = ctx.get_world_size(), ctx.get_world_rank()
        part = slice(r * 8 // k, (r + 1) * 8 // k)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        bridge_step(model, opt, sched, z0[part], z1[part], cfg, n=n[part])
        if r == 0:
            torch.save(denoiser.state_dict(), config["out"])
        ray.train.report({"rank": r})

    params = {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}.pt")
        TorchTrainer(
            one_step, train_loop_config={"cfg": to_dict(cfg), "out": out},
            scaling_config=ScalingConfig(num_workers=workers,
                                         resources_per_worker={"CPU": 2 / workers}),
            run_config=RunConfig(name=f"ddp{workers}", storage_path=str(tmp_path / "runs")),
        ).fit()
        params[workers] = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    from lasb.denoiser import build_denoiser

    initial = build_denoiser(cfg.denoiser, cfg.codec.latent_channels, cfg.latent_size).state_dict()
    moved = max(float((params[1][k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3  # the step did change the weights
    for key in initial:
        torch.testing.assert_close(params[2][key], params[1][key], rtol=1e-4, atol=1e-6)


def _checkpointed(run_dir: Path) -> bool:
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return "resumable" in snapshot.read_text()
    except OSError:
        return False


def _kill_train_worker_after_first_checkpoint(run_dir: Path, deadline_s: float = 240) -> int:
    """SIGKILL the Ray Train worker process once a resumable checkpoint is registered."""
    from ray.util.state import list_actors

    t0 = time.monotonic()
    while not _checkpointed(run_dir):
        assert time.monotonic() - t0 < deadline_s, "no checkpoint was written"
        time.sleep(0.1)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 1
    pid = int(workers[0]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def _train_in_thread(fn, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


KILL_RUN = ["codec.steps=20", "denoiser.steps=400", "train.checkpoint_every=50",
            "train.log_every=50", "score.select=false"]


def _final_history(result) -> list[dict]:
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "history.json").read_text())


def test_killed_worker_resumes_from_its_last_checkpoint(ray_local, demo_data, tmp_path):
    """A real SIGKILL of the Train worker mid-run: Ray Train restarts it (FailureConfig), the new
    worker continues from the last checkpoint, not step 0, and finishes all steps."""
    from jobs import train as train_job

    cfg = load_config("tiny", overrides=KILL_RUN + ["train.max_failures=1"])
    images, _ = train_job.load_training_images(demo_data, "demo_texture", cfg)
    storage = tmp_path / "runs"
    thread, box = _train_in_thread(train_job.fit, cfg, images, str(storage), "killed")
    killed = _kill_train_worker_after_first_checkpoint(storage / "killed")
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    history = _final_history(box["result"])
    resumes = [e for e in history if e["stage"] == "resume"]
    assert len(resumes) == 1, f"worker {killed} was killed once: {resumes}"
    assert resumes[0]["from_stage"] == "bridge"
    assert 50 <= resumes[0]["from_step"] < cfg.denoiser.steps
    bridge_steps = [e["step"] for e in history if e["stage"] == "bridge"]
    assert bridge_steps[-1] == cfg.denoiser.steps
    # after the resume the log continues past the checkpoint instead of starting over
    after = bridge_steps[bridge_steps.index(resumes[0]["from_step"]) + 1:]
    assert after and after[0] > resumes[0]["from_step"]


def test_resume_option_continues_a_failed_run(ray_local, demo_data, tmp_path, capsys):
    """With no restarts allowed the kill fails the run; `lasb train --resume RUN` then continues
    it from its checkpoint with its own saved config and publishes the model."""
    import argparse

    from jobs import train as train_job
    from lasb import artifacts

    storage, registry = tmp_path / "runs", str(tmp_path / "registry")
    cfg = load_config("tiny", overrides=KILL_RUN + ["train.max_failures=0"])
    thread, box = _train_in_thread(train_job.run, cfg, demo_data, "demo_texture", registry,
                                   str(storage))
    run_dir = None
    t0 = time.monotonic()
    while run_dir is None and time.monotonic() - t0 < 120:
        found = sorted(storage.glob("demo_texture-*")) if storage.exists() else []
        run_dir = found[0] if found else None
        time.sleep(0.1)
    assert run_dir is not None
    _kill_train_worker_after_first_checkpoint(run_dir)
    thread.join(timeout=600)
    assert "error" in box, "the run should fail without restarts"

    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    args = parser.parse_args(["--data", demo_data, "--category", "demo_texture", "--registry",
                              registry, "--storage", str(storage), "--resume", run_dir.name])
    assert train_job.main(args) == 0
    version = artifacts.resolve_version(registry, "demo_texture")
    assert f"version {version}" in capsys.readouterr().out
    metrics = json.loads((Path(registry) / "demo_texture" / version / "metrics.json").read_text())
    assert metrics["run"] == run_dir.name
    final = [d for d in run_dir.glob("checkpoint_*") if (d / "history.json").exists()]
    assert len(final) == 1
    history = json.loads((final[0] / "history.json").read_text())
    resumes = [e for e in history if e["stage"] == "resume"]
    assert len(resumes) == 1 and 50 <= resumes[0]["from_step"] < cfg.denoiser.steps
    assert [e["step"] for e in history if e["stage"] == "bridge"][-1] == cfg.denoiser.steps


def test_many_categories_one_failing_does_not_stop_the_others(ray_local, demo_data, tmp_path):
    from jobs import train as train_job
    from lasb import artifacts

    root = tmp_path / "data"
    root.mkdir()
    (root / "good_cat").symlink_to(Path(demo_data) / "demo_texture")
    broken = root / "broken_cat" / "train" / "good"
    broken.mkdir(parents=True)
    for i in range(4):
        (broken / f"{i:03d}.png").write_bytes(b"not a png")
    cfg = load_config("tiny", overrides=["codec.steps=10", "denoiser.steps=10",
                                         "score.select=false"])
    registry = str(tmp_path / "registry")
    results = train_job.run_many(cfg, str(root), ["broken_cat", "good_cat"], registry,
                                 str(tmp_path / "runs"))
    assert "no usable train images" in results["broken_cat"]["error"]
    assert results["good_cat"]["version"] == artifacts.resolve_version(registry, "good_cat")


def test_unified_model_over_all_categories(ray_local, demo_data, tmp_path, capsys):
    import argparse

    from jobs import train as train_job
    from lasb import artifacts

    root = tmp_path / "data"
    root.mkdir()
    for name in ("cat_a", "cat_b"):
        (root / name).symlink_to(Path(demo_data) / "demo_texture")
    registry = str(tmp_path / "registry")
    parser = argparse.ArgumentParser()
    train_job.add_arguments(parser)
    args = parser.parse_args(["--data", str(root), "--categories", "all", "--unified",
                              "--registry", registry, "--storage", str(tmp_path / "runs"),
                              "--preset", "tiny", "codec.steps=10", "denoiser.steps=10",
                              "score.select=false"])
    assert train_job.main(args) == 0
    version = artifacts.resolve_version(registry, "unified")
    metrics = json.loads((Path(registry) / "unified" / version / "metrics.json").read_text())
    assert metrics["categories"] == ["cat_a", "cat_b"]
    single = len(list((Path(demo_data) / "demo_texture" / "train" / "good").iterdir()))
    assert metrics["n_train_images"] > single  # both categories' images, not one
    assert "categories cat_a, cat_b" in capsys.readouterr().out


def test_train_from_s3_shards_matches_the_folder(ray_local, s3_server, demo_data, tmp_path):
    """`lasb ingest` the demo category to moto S3, then train from the shards: the same normal
    training images and hold-out as from the folder (test rows are never read), and a model is
    published with checkpoints on S3 too."""
    import boto3

    from jobs import ingest as ingest_job
    from jobs import train as train_job
    from lasb import artifacts, storage

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket="shards")
    ingest_job.run(ingest_job.IngestOptions(demo_data, "s3://shards/demo", rows_per_shard=16))
    cfg = load_config("tiny", overrides=["codec.steps=10", "denoiser.steps=10",
                                         "score.select=false"])
    from_folder = train_job.load_training_images(demo_data, "demo_texture", cfg)
    from_shards = train_job.load_training_images("s3://shards/demo", "demo_texture", cfg)
    for a, b in zip(from_folder, from_shards, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="no normal train-split rows of category 'nope'"):
        train_job.load_training_images("s3://shards/demo", "nope", cfg)

    version = train_job.run(cfg, "s3://shards/demo", "demo_texture", "s3://shards/registry",
                            storage="s3://shards/runs")
    assert artifacts.resolve_version("s3://shards/registry", "demo_texture") == version
    fs, _ = storage.filesystem("s3://shards/runs")
    assert any(p.rsplit("/", 1)[-1].startswith("checkpoint_")
               for p in fs.find("shards/runs", withdirs=True))
