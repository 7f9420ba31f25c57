"""`lasb train`: Ray Train TorchTrainer over a Ray Data stream of synthetic-defect pairs.

    python -m jobs.train --data DIR --category C --registry R [--preset cpu] [key=value ...]
    python -m jobs.train --data DIR --categories a,b|all --registry R      # one model each
    python -m jobs.train --data DIR --categories all --unified --registry R  # one for all
    python -m jobs.train --data DIR --category C --registry R --resume RUN   # continue a run

Driver: decode the category's normal training images, keep a seeded hold-out for calibration,
build the Ray Data stream (DRAEM augmentation in map_batches on CPU tasks), fit with
`train_loop_per_worker` (the same `lasb.train.train_models` everywhere), then calibrate on the
hold-out plus synthetic defects and publish a versioned artifact. Workers checkpoint every
`train.checkpoint_every` steps into `--storage`; a killed worker is restarted from the last
checkpoint (`train.max_failures`), and `--resume RUN` continues an interrupted run.
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


STATE_FILE = "state.pt"  # resumable training state inside a Ray Train checkpoint
RUN_CONFIG = "lasb-config.yaml"  # the run's full config, next to its checkpoints


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: ordinary PyTorch around lasb.train.train_models."""
    import ray.train
    import ray.train.torch
    import torch

    from lasb.train import save_models, train_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)  # Ray preconfigures the root logger at WARNING
    cfg = from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker)))

    def report_checkpoint(metrics: dict, fill) -> None:
        """Every rank reports; only rank 0 writes and attaches the checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                fill(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    resume = None
    previous = ray.train.get_checkpoint()
    if previous is not None:
        with previous.as_directory() as folder:
            if (Path(folder) / "codec").is_dir():  # the run had finished: hand its models back
                report_checkpoint({"stage": "done", "step": cfg.denoiser.steps},
                                  lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True))
                return
            resume = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        log.info("resuming from the %s stage at step %d", resume["stage"], resume["step"])

    shard = ray.train.get_dataset_shard("train")
    batches = iter(shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True))

    def report(entry: dict) -> None:
        ray.train.report({k: v for k, v in entry.items() if isinstance(v, (int, float, str))})

    def checkpoint(stage: str, step: int, build_state) -> None:
        report_checkpoint({"stage": stage, "step": step, "checkpoint": "resumable"},
                          lambda tmp: torch.save(build_state(), tmp / STATE_FILE))

    models = train_models(cfg, batches, device=ray.train.torch.get_device(),
                          wrap=ray.train.torch.prepare_model, report=report,
                          checkpoint=checkpoint, resume=resume)

    def final(tmp: Path) -> None:
        save_models(tmp, models, cfg)
        (tmp / "history.json").write_text(json.dumps(models.history))

    report_checkpoint({"stage": "done", "step": cfg.denoiser.steps}, final)


def stream_rows(cfg: Config) -> int:
    """Rows needed: codec steps + 2 scale batches + bridge steps (+1 slack), per worker."""
    codec_steps = 0 if cfg.codec.pretrained else cfg.codec.steps
    steps = codec_steps + 2 + cfg.denoiser.steps + 1
    return steps * cfg.train.batch_size * cfg.train.workers


def training_dataset(images: np.ndarray, cfg: Config, source=None):
    """Ray Data stream: ids -> (x0, x1) via lasb.pairs.make_pairs on CPU tasks."""
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
                   "source": source, "with_mask": False},
        concurrency=cfg.train.data_concurrency,
        num_cpus=1,
    )


def fit(cfg: Config, images: np.ndarray, storage: str, name: str, source=None):
    """Run the TorchTrainer; returns the Ray Train Result. A run `name` that already has
    checkpoints under `storage` continues from the latest one (Ray Train restores it)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lasb import storage as store

    fs, root = store.pyarrow_filesystem(storage)
    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=root, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        datasets={"train": training_dataset(images, cfg, source)},
    )
    return trainer.fit()


def load_training_images(data: str, category: str, cfg: Config):
    """(train images, hold-out images) of a category's normal training images; failures are
    reported, not hidden. `data` is an MVTec-layout folder or Parquet shards from `lasb ingest`
    (local or s3://); only train-split rows labelled normal are read."""
    if _is_mvtec_root(data, category):
        samples = list_samples(data, category, "train")
        train_s, hold_s = split_holdout(samples, cfg.data.holdout_fraction, cfg.train.seed)
        out = []
        for part, name in ((train_s, "train"), (hold_s, "hold-out")):
            loaded = load_samples(part, cfg.data.image_size, cfg.data.max_pixels)
            for err in loaded.errors:
                log.warning("skipped %s image: %s", name, err)
            out.append(loaded.images)
        train, holdout = out
    else:
        train, holdout = shard_training_images(data, category, cfg)
    for images, name in ((train, "train"), (holdout, "hold-out")):
        if len(images) == 0:
            raise ValueError(f"no usable {name} images for {category!r} under {data}")
    log.info("%s: %d training images, %d held out for calibration (%d px)", category,
             len(train), len(holdout), cfg.data.image_size)
    return train, holdout


def _is_mvtec_root(data: str, category: str) -> bool:
    """MVTec folders are local with `<category>/train`; anything else holding Parquet shards is
    read as shards (a local path without either gets list_samples' error naming the problem)."""
    from lasb import storage as store
    from lasb.ingest import shard_paths

    if store.is_local(data) and os.path.isdir(os.path.join(data, category, "train")):
        return True
    return store.is_local(data) and not shard_paths(data)


def _decode_rows(batch: dict, size: int, max_pixels: int) -> dict:
    """Ray Data task: encoded bytes -> uint8 (B, size, size, 3); undecodable rows keep their
    error text (shards were validated at ingest: this catches later damage)."""
    from lasb.data import ImageDecodeError, decode_image, resize_image

    images = np.zeros((len(batch["uri"]), size, size, 3), np.uint8)
    errors = []
    for i, (data, uri) in enumerate(zip(batch["image"], batch["uri"])):
        try:
            images[i] = resize_image(decode_image(bytes(data), str(uri), max_pixels), size)
            errors.append("")
        except ImageDecodeError as exc:
            errors.append(str(exc))
    return {"uri": np.asarray(batch["uri"], dtype=object), "pixels": images,
            "error": np.asarray(errors, dtype=object)}


def shard_training_images(uri: str, category: str, cfg: Config):
    """Normal train-split images of `category` from Parquet shards, decoded and resized by Ray
    Data tasks; the hold-out is split off by URI exactly as for folders."""
    import ray.data
    from ray.data.expressions import col, lit

    from lasb import storage as store
    from lasb.data import Sample
    from lasb.ingest import shard_paths

    shards = shard_paths(uri)
    if not shards:
        raise FileNotFoundError(f"{uri} is neither an MVTec-layout folder with {category}/train "
                                "nor a folder of Parquet shards (make them with `lasb ingest`)")
    init_ray(None, num_cpus=_cpus_needed(cfg))
    fs, _ = store.pyarrow_filesystem(shards[0])
    paths = [store.pyarrow_filesystem(s)[1] for s in shards]
    # pushed down to the file scan: other categories' images are never read into memory
    wanted = (col("category") == lit(category)) & (col("split") == lit("train")) & (
        col("label") == lit(0))
    ds = ray.data.read_parquet(paths, filesystem=fs).filter(expr=wanted)
    rows = ds.select_columns(["image", "uri"]).map_batches(_decode_rows, batch_size=64, batch_format="numpy",
                          fn_kwargs={"size": cfg.data.image_size,
                                     "max_pixels": cfg.data.max_pixels}).take_all()
    rows.sort(key=lambda r: r["uri"])
    for r in rows:
        if r["error"]:
            log.warning("skipped training image: %s", r["error"])
    rows = [r for r in rows if not r["error"]]
    if not rows:
        raise ValueError(f"no normal train-split rows of category {category!r} in the shards at "
                         f"{uri}")
    samples = [Sample(r["uri"], "train", 0, "good", None) for r in rows]
    train_s, hold_s = split_holdout(samples, cfg.data.holdout_fraction, cfg.train.seed)
    by_uri = {r["uri"]: r["pixels"] for r in rows}
    return (np.stack([by_uri[s.path] for s in train_s]),
            np.stack([by_uri[s.path] for s in hold_s]))


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
        address: str | None = None, resume: str | None = None) -> str:
    """Train one category end to end; returns the published version."""
    artifacts.check_name("category", category)
    images, holdout = load_training_images(data, category, cfg)
    return train_and_publish(cfg, images, holdout, category, registry, storage, address, resume)


def run_unified(cfg: Config, data: str, categories: list[str], name: str, registry: str,
                storage: str | None = None, address: str | None = None,
                resume: str | None = None) -> str:
    """One model for several categories (the paper's unified setting), published as `name`."""
    artifacts.check_name("model", name)
    parts = [load_training_images(data, c, cfg) for c in categories]
    images = np.concatenate([p[0] for p in parts])
    holdout = np.concatenate([p[1] for p in parts])
    return train_and_publish(cfg, images, holdout, name, registry, storage, address, resume,
                             {"categories": categories})


def run_many(cfg: Config, data: str, categories: list[str], registry: str,
             storage: str | None = None, address: str | None = None) -> dict[str, dict]:
    """A model per category, as many at once as the cluster's CPUs allow. A failing category
    is recorded (`{"error": ...}`) and does not stop the others."""
    from concurrent.futures import ThreadPoolExecutor

    import ray

    init_ray(address, num_cpus=_cpus_needed(cfg))
    parallel = max(1, int(ray.cluster_resources().get("CPU", 1) // _cpus_needed(cfg)))
    log.info("training %d categories, %d at a time", len(categories), parallel)
    with ThreadPoolExecutor(parallel, thread_name_prefix="train") as pool:
        futures = {c: pool.submit(run, cfg, data, c, registry, storage, address)
                   for c in categories}
        results = {}
        for category, future in futures.items():
            try:
                results[category] = {"version": future.result()}
            except Exception as e:  # noqa: BLE001 - reported per category, the others go on
                log.error("category %s failed: %s: %s", category, type(e).__name__, e)
                results[category] = {"error": f"{type(e).__name__}: {e}"}
    return results


def _cpus_needed(cfg: Config) -> int:
    need = cfg.train.workers * cfg.train.cpus_per_worker + cfg.train.data_concurrency
    return max(os.cpu_count() or 1, int(np.ceil(need)))


def default_storage(storage: str | None) -> str:
    return os.path.abspath(storage or "runs") if "://" not in (storage or "") else storage


def train_and_publish(cfg: Config, images: np.ndarray, holdout: np.ndarray, category: str,
                      registry: str, storage: str | None = None, address: str | None = None,
                      resume: str | None = None, extra_metrics: dict | None = None) -> str:
    """Fit on `images` (new run, or continue run `resume`), calibrate on `holdout`, publish."""
    from lasb import storage as store

    t0 = time.perf_counter()
    source = load_anomaly_source(cfg.data.anomaly_source, cfg.data.image_size)
    init_ray(address, num_cpus=_cpus_needed(cfg))
    storage = default_storage(storage)
    name = resume or f"{category}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"
    fs, run_dir = store.filesystem(store.join(storage, name))
    if not resume:
        fs.makedirs(run_dir, exist_ok=True)
        store.write_bytes_atomic(fs, f"{run_dir}/{RUN_CONFIG}", dump_yaml(cfg).encode())
    log.info("run %s (checkpoints in %s)", name, store.join(storage, name))
    result = fit(cfg, images, storage, name, source)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    train_seconds = time.perf_counter() - t0
    with result.checkpoint.as_directory() as ckpt:
        version = publish_trained(ckpt, cfg, holdout, registry, category,
                                  {"train_seconds": train_seconds, "run": name,
                                   "n_train_images": len(images), **(extra_metrics or {})})
    log.info("published %s/%s/%s after %.0f s", registry, category, version,
             time.perf_counter() - t0)
    return version


def resume_config(storage: str | None, run_name: str) -> Config:
    """The config an interrupted run was started with (read from its storage folder)."""
    from lasb import storage as store
    from lasb.config import config_from_yaml

    url = store.join(default_storage(storage), artifacts.check_name("run", run_name), RUN_CONFIG)
    fs, path = store.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"no run {run_name!r} to resume: {url} does not exist "
                                "(give the same --storage as the interrupted run)")
    return config_from_yaml(fs.cat_file(path).decode())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="MVTec-layout root folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--category", help="train this category")
    which.add_argument("--categories", help="comma-separated names, or 'all' (every folder "
                       "under --data with train/good): one model per category, or one in all "
                       "with --unified")
    p.add_argument("--unified", nargs="?", const="unified", metavar="NAME",
                   help="with --categories: train one model on all of them, published as NAME "
                   "(default 'unified')")
    p.add_argument("--registry", required=True, help="model registry (folder or s3://)")
    p.add_argument("--preset", default="cpu", help="tiny | cpu | paper")
    p.add_argument("--config", help="YAML file with config overrides")
    p.add_argument("--tuned", action="store_true", help="use the config lasb tune found: "
                   "<registry>/<category>/tuning/best.yaml (instead of --config)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default from config)")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--storage", help="Ray Train storage for checkpoints, folder or s3:// "
                   "(default ./runs)")
    p.add_argument("--resume", metavar="RUN", help="continue the interrupted run RUN (its name "
                   "under --storage, printed when it started) with its own config")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="config overrides like bridge.nfe=4")


def main(args: argparse.Namespace) -> int:
    from lasb.data import list_categories

    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"train.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"train.gpus_per_worker={args.gpus_per_worker}")
    if args.unified and not args.categories:
        raise ValueError("--unified needs --categories (the categories to train on)")
    if args.resume:
        if args.categories and not args.unified:
            raise ValueError("--resume continues one run: give --category (or --unified)")
        if args.config or args.tuned or overrides:
            raise ValueError("--resume uses the interrupted run's own config: drop --config, "
                             "--tuned, --workers and key=value overrides")
        cfg = resume_config(args.storage, args.resume)
    else:
        config = args.config
        if args.tuned:
            if config:
                raise ValueError("--tuned and --config both name a config file: give one")
            if not args.category:
                raise ValueError("--tuned reads one category's tuning result: give --category")
            from jobs.tune import fetch_best_config

            config = fetch_best_config(args.registry, args.category)
            log.info("training with the tuned config %s", config)
        cfg = load_config(args.preset, config, overrides)

    if args.category:
        version = run(cfg, args.data, args.category, args.registry, args.storage, args.address,
                      args.resume)
        print(f"published {args.category} version {version} to {args.registry}")
        return 0
    categories = (list_categories(args.data) if args.categories == "all"
                  else [c.strip() for c in args.categories.split(",") if c.strip()])
    if not categories:
        raise ValueError(f"no categories to train: --categories {args.categories!r} under "
                         f"{args.data}")
    if args.unified:
        version = run_unified(cfg, args.data, categories, args.unified, args.registry,
                              args.storage, args.address, args.resume)
        print(f"published {args.unified} (categories {', '.join(categories)}) version "
              f"{version} to {args.registry}")
        return 0
    results = run_many(cfg, args.data, categories, args.registry, args.storage, args.address)
    width = max(len(c) for c in results)
    for category, outcome in results.items():
        print(f"{category:<{width}}  " + (f"published version {outcome['version']}"
                                          if "version" in outcome else f"FAILED {outcome['error']}"))
    failed = [c for c, o in results.items() if "error" in o]
    print(f"{len(results) - len(failed)} of {len(results)} categories published to {args.registry}")
    return 1 if failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
