"""`lasb train`: Ray Train TorchTrainer over a Ray Data stream of synthetic-defect pairs.

    python -m jobs.train --data DIR --category C --registry R [--preset cpu] [key=value ...]

Driver: decode the category's normal training images, keep a seeded hold-out for calibration,
build the Ray Data stream (DRAEM augmentation in map_batches on CPU tasks), fit with
`train_loop_per_worker` (the same `lasb.train.train_models` everywhere), then calibrate on the
hold-out plus synthetic defects and publish a versioned artifact.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.common import init_ray
from lasb import artifacts
from lasb.augment import load_anomaly_source
from lasb.config import Config, dump_yaml, from_dict, load_config, to_dict
from lasb.data import list_samples, load_samples, split_holdout

log = logging.getLogger("lasb.train")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: ordinary PyTorch around lasb.train.train_models."""
    import ray.train
    import ray.train.torch
    import torch

    from lasb.train import save_models, train_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)  # Ray preconfigures the root logger at WARNING
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker)))
    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True))

    def report(entry: dict) -> None:
        ray.train.report({k: v for k, v in entry.items() if isinstance(v, (int, float, str))})

    models = train_models(cfg, batches, device=ray.train.torch.get_device(),
                          wrap=ray.train.torch.prepare_model, report=report)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            save_models(tmp, models, cfg)
            (Path(tmp) / "history.json").write_text(json.dumps(models.history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"stage": "done", "step": cfg.denoiser.steps}, checkpoint=checkpoint)


def stream_rows(cfg: Config) -> int:
    """Rows needed: codec steps + 2 scale batches + bridge steps (+1 slack), per worker."""
    codec_steps = 0 if cfg.codec.pretrained else cfg.codec.steps
    steps = codec_steps + 2 + cfg.denoiser.steps + 1
    return steps * cfg.train.batch_size * cfg.train.workers


def training_dataset(images: np.ndarray, cfg: Config, source=None):
    """Ray Data stream: ids -> (x0, x1, mask) via lasb.pairs.make_pairs on CPU tasks."""
    import ray
    import ray.data

    from lasb.pairs import make_pairs

    n_rows = stream_rows(cfg)
    # small blocks: the no-progress guard counts time between blocks taken by the trainer
    blocks = max(4, n_rows // (cfg.train.batch_size * 4))
    return ray.data.range(n_rows, override_num_blocks=blocks).map_batches(
        make_pairs,
        batch_size=cfg.train.batch_size,
        batch_format="numpy",
        fn_kwargs={"images": images, "augment": cfg.augment, "seed": cfg.train.seed,
                   "source": source},
        concurrency=cfg.train.data_concurrency,
        num_cpus=1,
    )


def fit(cfg: Config, images: np.ndarray, storage: str, name: str, source=None):
    """Run the TorchTrainer; returns the Ray Train Result."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": training_dataset(images, cfg, source)},
    )
    return trainer.fit()


def load_training_images(data: str, category: str, cfg: Config):
    """(train images, hold-out images) from train/good only; failures are reported, not hidden."""
    samples = list_samples(data, category, "train")
    train_s, hold_s = split_holdout(samples, cfg.data.holdout_fraction, cfg.train.seed)
    out = []
    for part, name in ((train_s, "train"), (hold_s, "hold-out")):
        loaded = load_samples(part, cfg.data.image_size, cfg.data.max_pixels)
        for err in loaded.errors:
            log.warning("skipped %s image: %s", name, err)
        if len(loaded.images) == 0:
            raise ValueError(f"no usable {name} images for {category!r} under {data}")
        out.append(loaded.images)
    log.info("%s: %d training images, %d held out for calibration (%d px)", category,
             len(out[0]), len(out[1]), cfg.data.image_size)
    return out[0], out[1]


def publish_trained(checkpoint_dir: str, cfg: Config, holdout: np.ndarray, registry: str,
                    category: str, extra_metrics: dict | None = None) -> str:
    """Calibrate the trained models on the hold-out + synthetic defects and publish them."""
    from lasb.calibrate import calibrate
    from lasb.detector import Detector

    det = Detector.from_dir(checkpoint_dir, verify=False, category=category)
    calibration, det = calibrate(det, holdout, cfg.score.calibration_seed,
                                 select=cfg.score.select)
    pv = calibration["pseudo_validation"]
    log.info("calibrated on %d normal + %d synthetic: threshold %.4g, pseudo-val image AUROC "
             "%.3f, pixel AUROC %.3f", len(holdout), len(holdout), calibration["threshold"],
             pv["image_auroc"], pv["pixel_auroc"])
    with tempfile.TemporaryDirectory() as staging:
        for part in ("codec", "denoiser"):
            shutil.copytree(Path(checkpoint_dir) / part, Path(staging) / part)
        (Path(staging) / "config.yaml").write_text(dump_yaml(det.cfg))  # with chosen scoring
        (Path(staging) / "calibration.json").write_text(json.dumps(calibration, indent=2))
        metrics = {"pseudo_validation": pv, **(extra_metrics or {})}
        (Path(staging) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return artifacts.publish(staging, registry, category)


def run(cfg: Config, data: str, category: str, registry: str, storage: str | None = None,
        address: str | None = None) -> str:
    """Train one category end to end; returns the published version."""
    artifacts.check_name("category", category)
    t0 = time.perf_counter()
    images, holdout = load_training_images(data, category, cfg)
    source = load_anomaly_source(cfg.data.anomaly_source, cfg.data.image_size)
    need = cfg.train.workers * cfg.train.cpus_per_worker + cfg.train.data_concurrency
    init_ray(address, num_cpus=max(os.cpu_count() or 1, int(np.ceil(need))))
    storage = os.path.abspath(storage or "runs") if "://" not in (storage or "") else storage
    name = f"{category}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    result = fit(cfg, images, storage, name, source)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    train_seconds = time.perf_counter() - t0
    with result.checkpoint.as_directory() as ckpt:
        version = publish_trained(ckpt, cfg, holdout, registry, category,
                                  {"train_seconds": train_seconds,
                                   "n_train_images": len(images)})
    log.info("published %s/%s/%s after %.0f s", registry, category, version,
             time.perf_counter() - t0)
    return version


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="MVTec-layout root folder")
    p.add_argument("--category", required=True)
    p.add_argument("--registry", required=True, help="model registry (folder or s3://)")
    p.add_argument("--preset", default="cpu", help="tiny | cpu | paper")
    p.add_argument("--config", help="YAML file with config overrides")
    p.add_argument("--tuned", action="store_true", help="use the config lasb tune found: "
                   "<registry>/<category>/tuning/best.yaml (instead of --config)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default from config)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--storage", help="Ray Train storage path for checkpoints (default ./runs)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="config overrides like bridge.nfe=4")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"train.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"train.gpus_per_worker={args.gpus_per_worker}")
    config = args.config
    if getattr(args, "tuned", False):
        if config:
            raise ValueError("--tuned and --config both name a config file: give one")
        from jobs.tune import fetch_best_config

        config = fetch_best_config(args.registry, args.category)
        log.info("training with the tuned config %s", config)
    cfg = load_config(args.preset, config, overrides)
    version = run(cfg, args.data, args.category, args.registry, args.storage, args.address)
    print(f"published {args.category} version {version} to {args.registry}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
