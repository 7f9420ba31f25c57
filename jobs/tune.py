"""`lasb tune`: per-category hyperparameter search with Ray Tune and Optuna (seeded TPE).

    python -m jobs.tune --data DIR --category C --registry R [--trials 12] [--preset cpu]
        [--space FILE] [--objective auroc|pareto] [--max-ms-per-image B] [key=value ...]
    python -m jobs.tune --category C --registry R --resume      # after an interruption

Objective: pseudo-validation only. The category's normal training images are split as
`lasb train` splits them (the same hold-out); the hold-out plus one synthetic defect per image,
made with another anomaly source and seed than training, is fixed for the whole search. The
test split is never read.

Each trial applies its sampled values as overrides on the base config and trains through one
worker function, `trial_worker` (the same `lasb.train.train_models` as `lasb train`): in-process
inside the Tune function trainable for one worker, or as the worker of a Ray Train TorchTrainer
launched from the Tune function for several workers (with `TuneReportCallback`). During the
bridge stage it reports pseudo-validation AUROC on a small fixed subset every `--eval-every`
steps (ASHA stops weak trials there), then the full pseudo-validation metrics and the measured
scoring cost (ms per image of `Detector.raw` at the trial's NFE).

Results go to `<registry>/<category>/tuning/`: best.yaml (`lasb train --tuned` trains with
it), trials.csv / trials.parquet, pareto.csv, pareto.png, summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jobs.common import init_ray
from lasb import artifacts, metrics, storage
from lasb.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict
from lasb.tuning import (
    budget_objective,
    decoded_params,
    encode_choice,
    pareto_front,
    parse_space,
    plot_pareto,
    probe_indices,
    procedural_textures,
    trial_config,
    validation_set,
)

log = logging.getLogger("lasb.tune")

SPEC_FILE = "lasb_tune.json"
SHARED_CODEC = "shared_codec"
TUNING = "tuning"
METRICS = {"image": "pv_image_auroc", "pixel": "pv_pixel_auroc", "mean": "pv_mean_auroc"}
# keys that change stage 1 (the codec): with none of them in the space, one codec is trained
# per category and shared by all trials, which then train only the bridge
STAGE1_PREFIXES = ("codec.", "augment.", "data.", "train.seed", "train.batch_size",
                   "score.backbone", "score.layers")


@dataclasses.dataclass
class TuneSpec:
    """Everything a search needs; stored in the experiment folder so --resume needs no flags."""

    category: str
    data: str
    registry: str
    base: dict  # the resolved base config (preset + --config + overrides)
    space: dict  # the raw search-space mapping
    trials: int = 12
    objective: str = "auroc"  # "auroc" (one objective, optional cost budget) | "pareto"
    metric: str = "pv_image_auroc"
    max_ms_per_image: float | None = None
    seed: int = 0
    concurrent: int = 1
    cpus_per_trial: float | None = None  # default: train.cpus_per_worker (one worker)
    gpus_per_trial: float | None = None  # default: train.gpus_per_worker
    early_stop: str = "asha"  # "asha" | "none"
    asha_reduction: float = 2.0
    eval_every: int | None = None  # bridge steps between progress reports
    probe_images: int = 8  # normals (and as many defects) in each progress report
    val_seed: int = 20_241
    val_source: str = "auto"  # "auto" | "self" | a texture folder
    share_codec: str = "auto"  # "auto" | "yes" | "no"
    time_budget_s: float | None = None
    storage: str = ""
    name: str = ""

    @property
    def experiment(self) -> str:
        return storage.join(self.storage, self.name)

    def eval_interval(self, base: Config) -> int:
        every = self.eval_every or max(base.train.log_every, base.denoiser.steps // 4)
        log_every = base.train.log_every
        return max(log_every, math.ceil(every / log_every) * log_every)


# --------------------------------------------------------------------------- the trial


def _write_files(files: dict[str, bytes], folder: Path) -> Path:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _plain(metrics_: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in metrics_.items()
            if isinstance(v, (int, float, str, bool, np.generic))}


def trial_worker(config: dict) -> None:
    """One trial's training and evaluation: the Tune function calls it in-process (one worker)
    or Ray Train runs it on every worker (several). Rank 0 evaluates and reports metrics."""
    import torch

    from lasb.detector import Detector
    from lasb.train import TrainedModels, resolve_device, save_models, train_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)  # Ray preconfigures the root logger at WARNING
    cfg = from_dict(config["cfg"])
    spec = TuneSpec(**config["spec"])
    distributed = config["distributed"]
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker)))
    pv_images, pv_labels, pv_masks = config["pv"]
    probe_idx = probe_indices(pv_labels, spec.probe_images)
    base = from_dict(spec.base)
    eval_every = spec.eval_interval(base)
    steps = cfg.denoiser.steps

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run_cfg, skip_rows = cfg, 0
        if config.get("codec_files"):  # stage 1 was trained once for the whole search
            codec_dir = _write_files(config["codec_files"], work / "shared_codec")
            run_cfg = dataclasses.replace(
                cfg, codec=dataclasses.replace(cfg.codec, pretrained=str(codec_dir)))
            skip_rows = (cfg.codec.steps + 2) * cfg.train.batch_size  # rows stage 1 used

        if distributed:
            import ray.train
            import ray.train.torch

            rank = ray.train.get_context().get_world_rank()
            device = ray.train.torch.get_device()
            wrap = ray.train.torch.prepare_model
            shard = ray.train.get_dataset_shard("train")
            batches = iter(shard.iter_torch_batches(batch_size=cfg.train.batch_size,
                                                    drop_last=True))

            def send(entry: dict, ckpt: Path | None = None) -> None:
                ray.train.report(entry, checkpoint=ray.train.Checkpoint.from_directory(ckpt)
                                 if ckpt else None)
        else:
            from ray import tune

            from jobs.train import stream_rows
            from lasb.pairs import iterate_pairs

            rank, device, wrap = 0, resolve_device(), (lambda m: m)
            batches = iterate_pairs(config["train_images"], skip_rows + stream_rows(run_cfg),
                                    cfg.train.batch_size, cfg.augment, cfg.train.seed,
                                    config.get("source"), start=skip_rows)

            def send(entry: dict, ckpt: Path | None = None) -> None:
                tune.report(entry, checkpoint=tune.Checkpoint.from_directory(ckpt)
                            if ckpt else None)

        state: dict[str, Any] = {}

        def evaluate(codec, denoiser, idx: np.ndarray | None) -> dict:
            if "det" not in state:
                state["det"] = Detector(cfg, codec, denoiser, device=torch.device(device))
                state["det"].raw(list(pv_images[:1]))  # warm-up: first-call overheads
            det = state["det"]
            sel = slice(None) if idx is None else idx
            images, labels, masks = pv_images[sel], pv_labels[sel], pv_masks[sel]
            t0 = time.perf_counter()
            raw = det.raw(list(images))
            ms = 1000 * (time.perf_counter() - t0) / len(images)
            if idx is None:
                m = metrics.evaluate(labels, raw.scores, masks, raw.maps)
            else:
                m = {"image_auroc": metrics.image_auroc(labels, raw.scores),
                     "pixel_auroc": metrics.pixel_auroc(masks, raw.maps)}
            out = {f"pv_{k}": float(v) for k, v in m.items()}
            out["pv_mean_auroc"] = (out["pv_image_auroc"] + out["pv_pixel_auroc"]) / 2
            out.update(ms_per_image=ms, pv_images=len(images), nfe=cfg.bridge.nfe,
                       denoiser_params=sum(p.numel() for p in denoiser.parameters()))
            out["objective"] = budget_objective(out[spec.metric], ms, spec.max_ms_per_image)
            return out

        def checkpoint(codec, denoiser, tag: str) -> Path:
            folder = work / f"ckpt-{tag}"
            save_models(folder, TrainedModels(codec, denoiser, []), cfg)
            return folder

        def probe(codec, denoiser, step: int) -> dict:
            if step % eval_every or step >= steps or rank != 0:
                return {}
            state["ckpt"] = checkpoint(codec, denoiser, str(step))
            return evaluate(codec, denoiser, probe_idx)

        def report(entry: dict) -> None:
            step = entry.get("step", 0)
            if entry.get("stage") != "bridge" or step % eval_every or step >= steps:
                return  # every rank reaches the same reports: Ray Train needs that
            ckpt = state.pop("ckpt", None)
            send({**_plain(entry), "completed": False}, ckpt)
            if ckpt is not None:  # persisted by the report: a stopped trial leaves no copies
                shutil.rmtree(ckpt, ignore_errors=True)

        t0 = time.perf_counter()
        models = train_models(run_cfg, batches, device=device, wrap=wrap, report=report,
                              probe=probe)
        final: dict = {"stage": "final", "step": steps, "completed": True,
                       "train_seconds": time.perf_counter() - t0}
        ckpt = None
        if rank == 0:
            last = [h for h in models.history if h.get("stage") == "bridge"]
            final["loss"] = last[-1]["loss"] if last else float("nan")
            final.update(evaluate(models.codec, models.denoiser, None))
            ckpt = checkpoint(models.codec, models.denoiser, "final")
            (ckpt / "history.json").write_text(json.dumps(models.history))
        send(final, ckpt)


def run_trial(params: dict, payload: dict) -> None:
    """The Tune function trainable: one worker in-process, several through Ray Train."""
    from ray import tune

    spec = TuneSpec(**payload["spec"])
    cfg = trial_config(from_dict(spec.base), parse_space(spec.space), params)
    config = {"cfg": to_dict(cfg), "spec": payload["spec"], "pv": payload["pv"],
              "codec_files": payload.get("codec_files"), "distributed": cfg.train.workers > 1}
    if cfg.train.workers == 1:
        trial_worker({**config, "train_images": payload["train_images"],
                      "source": payload.get("source")})
        return

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.train import training_dataset

    run_cfg = cfg
    if payload.get("codec_files"):  # stage 1 skipped: the stream needs no codec rows
        run_cfg = dataclasses.replace(cfg, codec=dataclasses.replace(cfg.codec,
                                                                     pretrained="shared"))
    use_gpu = cfg.train.gpus_per_worker > 0
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    fs, root = storage.pyarrow_filesystem(storage.join(spec.storage, f"{spec.name}-train"))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    trainer = TorchTrainer(
        trial_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{tune.get_context().get_trial_id()}-{stamp}",
                             storage_path=root, storage_filesystem=fs,
                             callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train": training_dataset(payload["train_images"], run_cfg,
                                            payload.get("source"))},
    )
    trainer.fit()


# --------------------------------------------------------------------------- the search


def tune_space(space: dict) -> dict:
    """Validated search space -> Ray Tune param_space (flat dotted keys)."""
    from ray import tune

    out = {}
    for key, dim in space.items():
        a = dim.args
        if dim.kind == "fixed":
            continue  # applied by trial_config
        if dim.kind == "uniform":
            out[key] = tune.uniform(a[0], a[1])
        elif dim.kind == "loguniform":
            out[key] = tune.loguniform(a[0], a[1])
        elif dim.kind == "quniform":
            out[key] = tune.quniform(a[0], a[1], a[2])
        elif dim.kind == "int":
            out[key] = tune.randint(a[0], a[1] + 1)
        elif dim.kind == "logint":
            out[key] = tune.lograndint(a[0], a[1] + 1)
        elif dim.kind == "choice":
            out[key] = tune.choice([encode_choice(v) for v in a])
    if not out:
        raise ConfigError("the search space has no distributions (only fixed values)")
    return out


def _fs_read(url: str) -> bytes:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def _fs_exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return fs.exists(path)


def _fs_write(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)
    storage.write_bytes_atomic(fs, path, data)


def resolve_validation_source(spec: TuneSpec, base: Config):
    """(texture list or None, description): the validation defects' anomaly source differs from
    the training one (`data.anomaly_source`; None = the image's own texture)."""
    from lasb.augment import load_anomaly_source

    train_src = base.data.anomaly_source
    size = base.data.image_size
    choice = spec.val_source
    if choice == "auto":
        if train_src:
            return None, "the images' own textures (training uses " + train_src + ")"
        return procedural_textures(32, size, spec.val_seed), "procedural textures"
    if choice == "self":
        if not train_src:
            raise ConfigError("--val-source self: training already paints defects with the "
                              "images' own textures; choose a texture folder or 'auto'")
        return None, "the images' own textures"
    if train_src and os.path.abspath(choice) == os.path.abspath(train_src):
        raise ConfigError(f"--val-source {choice} is the training anomaly source: validation "
                          "defects must come from another source")
    return load_anomaly_source(choice, size), f"textures from {choice}"


def shares_codec(spec: TuneSpec, base: Config, space: dict) -> bool:
    if spec.share_codec == "no" or base.codec.pretrained:
        return False
    touches = [k for k in space if k.startswith(STAGE1_PREFIXES)]
    if spec.share_codec == "yes" and touches:
        raise ConfigError(f"--share-codec yes, but the space changes stage 1: {touches}")
    return not touches


def _train_codec(cfg_dict: dict, images: np.ndarray, source) -> dict[str, bytes]:
    """Stage 1 once for the search: the codec every trial starts from (a Ray task)."""
    import torch

    from lasb.pairs import iterate_pairs
    from lasb.train import train_models

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    cfg = from_dict(cfg_dict)
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker)))
    stage1 = dataclasses.replace(cfg, denoiser=dataclasses.replace(cfg.denoiser, steps=0))
    rows = (cfg.codec.steps + 3) * cfg.train.batch_size
    models = train_models(stage1, iterate_pairs(images, rows, cfg.train.batch_size,
                                                cfg.augment, cfg.train.seed, source))
    with tempfile.TemporaryDirectory() as tmp:
        models.codec.model.save_pretrained(tmp, safe_serialization=True)
        return _read_tree(Path(tmp))


def shared_codec_files(spec: TuneSpec, base: Config, images, source) -> dict[str, bytes]:
    """Train the shared codec (or reuse the one an interrupted search already trained)."""
    import ray

    folder = storage.join(spec.experiment, SHARED_CODEC)
    index_url = storage.join(folder, "files.json")
    if _fs_exists(index_url):
        index = json.loads(_fs_read(index_url))
        if index.get("base") == to_dict(base):
            log.info("reusing the shared codec of this search (%s)", folder)
            return {n: _fs_read(storage.join(folder, n)) for n in index["files"]}
    log.info("training the shared codec (stage 1, %d steps) once for all trials",
             base.codec.steps)
    cpus = spec.cpus_per_trial or base.train.cpus_per_worker
    task = ray.remote(num_cpus=cpus, num_gpus=spec.gpus_per_trial or 0)(_train_codec)
    files = ray.get(task.remote(to_dict(base), images, source))
    for name, data in files.items():
        _fs_write(storage.join(folder, name), data)
    index = {"files": sorted(files), "base": to_dict(base)}
    _fs_write(index_url, json.dumps(index).encode())  # written last: the codec is complete
    return files


def _searcher_and_scheduler(spec: TuneSpec, base: Config, space: dict):
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    if spec.objective == "pareto":
        searcher = OptunaSearch(metric=[spec.metric, "ms_per_image"], mode=["max", "min"],
                                sampler=sampler)
        sched_metric = spec.metric
    else:
        searcher = OptunaSearch(metric="objective", mode="max", sampler=sampler)
        sched_metric = "objective"
    scheduler = None
    if spec.early_stop == "asha":
        max_t = base.denoiser.steps
        if "denoiser.steps" in space:
            dim = space["denoiser.steps"]
            max_t = max(int(v) for v in (dim.args if dim.kind == "choice" else dim.args[:2]))
        scheduler = ASHAScheduler(time_attr="step", metric=sched_metric, mode="max",
                                  max_t=max_t, grace_period=spec.eval_interval(base),
                                  reduction_factor=spec.asha_reduction)
    return searcher, scheduler


def _payload(spec: TuneSpec, base: Config, space: dict) -> tuple[dict, dict]:
    """Data shared by every trial (put in the object store once) + a description of it."""
    from jobs.train import load_training_images
    from lasb.augment import load_anomaly_source

    images, holdout = load_training_images(spec.data, spec.category, base)  # train/good only
    source = load_anomaly_source(base.data.anomaly_source, base.data.image_size)
    val_src, val_desc = resolve_validation_source(spec, base)
    pv = validation_set(holdout, spec.val_seed, base.augment, val_src)
    payload = {"spec": dataclasses.asdict(spec), "train_images": images, "source": source,
               "pv": pv}
    if shares_codec(spec, base, space):
        payload["codec_files"] = shared_codec_files(spec, base, images, source)
    info = {"n_train": len(images), "n_holdout_normal": len(holdout),
            "n_synthetic_defects": int(pv[1].sum()), "val_seed": spec.val_seed,
            "val_source": val_desc, "shared_codec": "codec_files" in payload}
    log.info("%s: %d training images; pseudo-validation = %d held-out normals + %d synthetic "
             "defects (%s, seed %d); shared codec: %s", spec.category, len(images),
             len(holdout), info["n_synthetic_defects"], val_desc, spec.val_seed,
             info["shared_codec"])
    return payload, info


def _trainable(spec: TuneSpec, base: Config, payload: dict):
    from ray import tune

    if base.train.workers > 1:
        # the trial function only drives a Ray Train run whose workers hold the CPUs/GPUs;
        # {"cpu": 0} alone is rejected by Tune, a token memory request makes it valid
        resources: dict = {"cpu": 0, "memory": 1}
    else:
        resources = {"cpu": spec.cpus_per_trial or base.train.cpus_per_worker}
        gpus = spec.gpus_per_trial if spec.gpus_per_trial is not None \
            else base.train.gpus_per_worker
        if gpus:
            resources["gpu"] = gpus
    return tune.with_resources(tune.with_parameters(run_trial, payload=payload), resources)


def validate(spec: TuneSpec, base: Config, space: dict) -> None:
    """Fail before any work on settings that cannot run."""
    artifacts.check_name("category", spec.category)
    artifacts.check_name("experiment", spec.name)
    if spec.objective not in ("auroc", "pareto"):
        raise ConfigError(f"objective must be 'auroc' or 'pareto', got {spec.objective!r}")
    if spec.max_ms_per_image is not None and spec.objective == "pareto":
        raise ConfigError("--max-ms-per-image applies to --objective auroc (the Pareto mode "
                          "returns every trade-off)")
    if spec.val_seed == base.train.seed:
        raise ConfigError("--val-seed must differ from train.seed: validation defects must not "
                          "be the training defects")
    if "train.workers" in space:
        raise ConfigError("train.workers cannot be searched: use --workers")
    if spec.trials < 1 or spec.concurrent < 1:
        raise ConfigError("--trials and --concurrent must be >= 1")
    if spec.metric not in METRICS.values():
        raise ConfigError(f"unknown metric {spec.metric!r}")


def run(spec: TuneSpec, resume: bool = False, address: str | None = None,
        top: int = 10) -> dict | None:
    """Run (or resume) one category's search; returns the summary, or None if interrupted."""
    from ray import tune

    base = from_dict(spec.base)
    space = parse_space(spec.space)
    validate(spec, base, space)
    need = (base.train.workers * base.train.cpus_per_worker + base.train.data_concurrency
            if base.train.workers > 1 else (spec.cpus_per_trial or base.train.cpus_per_worker))
    init_ray(address, num_cpus=max(os.cpu_count() or 1, math.ceil(need * spec.concurrent)))
    fs, exp_path = storage.pyarrow_filesystem(spec.experiment)

    payload, info = _payload(spec, base, space)
    trainable = _trainable(spec, base, payload)
    if resume:
        log.info("resuming %s (finished trials are kept, unfinished ones restart)",
                 spec.experiment)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False,
                                   storage_filesystem=fs)
    else:
        searcher, scheduler = _searcher_and_scheduler(spec, base, space)
        fs_root, root = storage.pyarrow_filesystem(spec.storage)
        _fs_write(storage.join(spec.experiment, SPEC_FILE),
                  json.dumps(dataclasses.asdict(spec), indent=2).encode())
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(space),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=spec.trials,
                                        max_concurrent_trials=spec.concurrent,
                                        time_budget_s=spec.time_budget_s),
            run_config=tune.RunConfig(name=spec.name, storage_path=root,
                                      storage_filesystem=fs_root, verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    results = tuner.fit()
    # the saved experiment state is what a resume sees: any trial not TERMINATED/ERROR there
    # (or fewer trials than asked, without a time budget) means the search was interrupted
    saved = tune.ExperimentAnalysis(exp_path, storage_filesystem=fs).trials
    unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    if unfinished or (len(saved) < spec.trials and spec.time_budget_s is None):
        print(f"lasb tune {spec.category}: interrupted with {results.num_terminated} finished "
              f"trial(s); resume with: lasb tune --category {spec.category} --registry "
              f"{spec.registry} --storage {spec.storage} --name {spec.name} --resume")
        return None
    rows = collect_rows(results, spec, space)
    summary = publish_results(rows, spec, base, space, info)
    print(format_trials(rows, spec, top))
    best = summary["best"]
    print(f"best {spec.category}: trial {best['trial_id']} {spec.metric} "
          f"{best[spec.metric]:.4f}, {best['ms_per_image']:.1f} ms/image -> "
          f"{summary['tuning_dir']}/best.yaml")
    return summary


# --------------------------------------------------------------------------- results


def collect_rows(results, spec: TuneSpec, space: dict) -> list[dict]:
    """One row per trial: status, sampled values, last reported metrics, Pareto membership."""
    rows = []
    for r in results:
        m = r.metrics or {}
        params = decoded_params(space, r.config or {})
        found = re.search(r"run_trial_([0-9a-f_]+?)_\d+_", Path(str(r.path)).name)
        row = {"trial_id": m.get("trial_id") or (found.group(1) if found else str(r.path)),
               "status": ("error" if r.error else "completed" if m.get("completed")
                          else "stopped"),
               "completed": bool(m.get("completed")) and not r.error,
               "step": m.get("step"),
               **{k: encode_choice(v) for k, v in params.items()},
               **{k: m.get(k) for k in ("pv_image_auroc", "pv_pixel_auroc", "pv_mean_auroc",
                                        "pv_image_ap", "pv_f1_max", "pv_aupro",
                                        "ms_per_image", "objective", "nfe",
                                        "denoiser_params", "pv_images", "loss",
                                        "train_seconds")},
               "checkpoint": (r.checkpoint.path if r.checkpoint else m.get("checkpoint_path")),
               "error": str(r.error).splitlines()[0][:300] if r.error else None,
               "_params": params}
        rows.append(row)
    done = [r for r in rows if r["completed"]]
    front = pareto_front(np.array([r[spec.metric] for r in done], float),
                         np.array([r["ms_per_image"] for r in done], float))
    for r in rows:
        r["pareto"] = False
    for r, f in zip(done, front):
        r["pareto"] = bool(f)
    return rows


def pick_best(rows: list[dict], spec: TuneSpec) -> dict:
    done = [r for r in rows if r["completed"]]
    if not done:
        errors = {r["error"] for r in rows if r["error"]}
        raise RuntimeError("no trial completed" + (f"; errors: {errors}" if errors else ""))
    if spec.objective == "pareto":  # the most accurate point of the front (cheaper on ties)
        return max((r for r in done if r["pareto"]),
                   key=lambda r: (r[spec.metric], -r["ms_per_image"]))
    return max(done, key=lambda r: (r["objective"], -r["ms_per_image"]))


def _table(rows: list[dict], columns: list[str]):
    import pandas as pd

    return pd.DataFrame([{c: r.get(c) for c in columns} for r in rows], columns=columns)


def publish_results(rows: list[dict], spec: TuneSpec, base: Config, space: dict,
                    info: dict) -> dict:
    """Write best.yaml, trials.csv/.parquet, pareto.csv/.png, summary.json to the registry."""
    best = pick_best(rows, spec)
    best_cfg = trial_config(base, space, {k: encode_choice(v)
                                          for k, v in best["_params"].items()})
    folder = storage.join(spec.registry, spec.category, TUNING)
    params = list(space)
    columns = (["trial_id", "status", "step", *[k for k in params if space[k].kind != "fixed"],
                "pv_image_auroc", "pv_pixel_auroc", "pv_mean_auroc", "pv_image_ap",
                "pv_f1_max", "pv_aupro", "ms_per_image", "objective", "nfe", "denoiser_params",
                "pv_images", "loss", "train_seconds", "pareto", "checkpoint", "error"])
    table = _table(rows, columns)
    created = dt.datetime.now(dt.timezone.utc).isoformat()
    header = (f"# lasb tune: best config for {spec.category} ({created})\n"
              f"# trial {best['trial_id']}: {spec.metric} {best[spec.metric]:.4f} on "
              f"pseudo-validation, {best['ms_per_image']:.1f} ms/image measured\n"
              f"# train with: lasb train --tuned --category {spec.category} --registry "
              f"{spec.registry} --data ...\n")
    files = {"best.yaml": (header + dump_yaml(best_cfg)).encode(),
             "trials.csv": table.to_csv(index=False).encode()}
    buf = io.BytesIO()
    table.astype({c: "string" for c in ("checkpoint", "error", "status", "trial_id")}
                 ).to_parquet(buf, index=False)
    files["trials.parquet"] = buf.getvalue()
    front = [r for r in rows if r["pareto"]]
    files["pareto.csv"] = _table(sorted(front, key=lambda r: r["ms_per_image"]),
                                 columns).to_csv(index=False).encode()
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_pareto(rows, Path(tmp) / "pareto.png", spec.metric,
                          f"{spec.category}: {len(rows)} trials "
                          f"({sum(r['completed'] for r in rows)} completed)",
                          spec.max_ms_per_image)
        files["pareto.png"] = png.read_bytes()
    if spec.objective == "pareto":
        for r in front:
            cfg = trial_config(base, space, {k: encode_choice(v) for k, v in r["_params"].items()})
            files[f"front/{r['trial_id']}.yaml"] = dump_yaml(cfg).encode()
    summary = {
        "category": spec.category, "created": created, "objective": spec.objective,
        "metric": spec.metric, "max_ms_per_image": spec.max_ms_per_image,
        "n_trials": len(rows), "n_completed": sum(r["completed"] for r in rows),
        "n_stopped_early": sum(r["status"] == "stopped" for r in rows),
        "n_errors": sum(r["status"] == "error" for r in rows),
        "best": {k: v for k, v in best.items() if k != "_params"},
        "best_params": best["_params"],
        "pareto_front": [{k: v for k, v in r.items() if k != "_params"} for r in front],
        "validation": info, "experiment": spec.experiment, "search_space": spec.space,
        "tuning_dir": folder,
    }
    files["summary.json"] = json.dumps(summary, indent=2, default=str).encode()
    for name, data in files.items():
        _fs_write(storage.join(folder, name), data)
    log.info("wrote %s to %s", ", ".join(sorted(files)), folder)
    return summary


def format_trials(rows: list[dict], spec: TuneSpec, top: int = 10) -> str:
    """The top trials as a text table (best first; '*' marks the Pareto front)."""
    key = "objective" if spec.objective == "auroc" else spec.metric

    def rank(r):
        return (r["completed"], r.get(key) if r.get(key) is not None else -math.inf)

    shown = sorted(rows, key=rank, reverse=True)[:top]
    params = [k for k in (shown[0]["_params"] if shown else {})]
    head = ["trial", "status", *[p.split(".")[-1] for p in params], "img AUROC", "pix AUROC",
            "ms/img", "front"]
    lines = []
    for r in shown:
        vals = [r["trial_id"], r["status"] + ("" if r["completed"] else f"@{r['step']}")]
        for p in params:
            v = r["_params"].get(p)
            vals.append(f"{v:.3g}" if isinstance(v, float) else
                        ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        for k, fmt in (("pv_image_auroc", "{:.4f}"), ("pv_pixel_auroc", "{:.4f}"),
                       ("ms_per_image", "{:.1f}")):
            vals.append(fmt.format(r[k]) if r.get(k) is not None else "-")
        vals.append("*" if r["pareto"] else "")
        lines.append(vals)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    title = (f"top {len(shown)} of {len(rows)} trials for {spec.category}, pseudo-validation "
             "metrics (stopped@N: stopped early at bridge step N, on the probe subset; "
             "front: * = Pareto-optimal)")
    return "\n".join([title, fmt.format(*head), *(fmt.format(*v) for v in lines)])


def fetch_best_config(registry: str, category: str) -> str:
    """Local path of `<registry>/<category>/tuning/best.yaml` (downloaded if remote)."""
    url = storage.join(registry, artifacts.check_name("category", category), TUNING,
                       "best.yaml")
    if storage.is_local(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f"no tuned config for {category}: {url} does not exist "
                                    "(run lasb tune first)")
        return url
    if not _fs_exists(url):
        raise FileNotFoundError(f"no tuned config for {category}: {url} does not exist")
    fd, path = tempfile.mkstemp(suffix="-best.yaml")
    with os.fdopen(fd, "wb") as f:
        f.write(_fs_read(url))
    return path


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="MVTec-layout root (only <category>/train/good is read)")
    p.add_argument("--category", required=True)
    p.add_argument("--registry", help="model registry (folder or s3://); results go to "
                   "<registry>/<category>/tuning/")
    p.add_argument("--preset", default="cpu", help="tiny | cpu | paper")
    p.add_argument("--config", help="YAML file with config overrides (the base of every trial)")
    p.add_argument("--space", help="search-space YAML (default: jobs/search_space.yaml)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--objective", choices=["auroc", "pareto"], default="auroc",
                   help="auroc: maximise pseudo-validation AUROC (within --max-ms-per-image); "
                   "pareto: maximise AUROC and minimise ms/image, return the front")
    p.add_argument("--metric", choices=sorted(METRICS), default="image",
                   help="pseudo-validation AUROC to maximise: image, pixel or their mean")
    p.add_argument("--max-ms-per-image", type=float,
                   help="cost budget (measured ms per image) for --objective auroc")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--concurrent", type=int, default=1, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float,
                   help="CPUs per (one-worker) trial (default train.cpus_per_worker)")
    p.add_argument("--gpus-per-trial", type=float)
    p.add_argument("--workers", type=int, help="Ray Train workers per trial (default 1: "
                   "in-process; more: a TorchTrainer launched from each trial)")
    p.add_argument("--early-stop", choices=["asha", "none"], default="asha")
    p.add_argument("--eval-every", type=int, help="bridge steps between progress reports "
                   "(default denoiser.steps/4)")
    p.add_argument("--probe-images", type=int, default=8,
                   help="normals (and as many synthetic defects) per progress report")
    p.add_argument("--val-source", default="auto", help="anomaly source of the validation "
                   "defects: auto, self (the image's texture) or a texture folder; never the "
                   "training source")
    p.add_argument("--val-seed", type=int, default=20_241)
    p.add_argument("--share-codec", choices=["auto", "yes", "no"], default="auto",
                   help="train stage 1 once for all trials (auto: when the space has no "
                   "codec/augment/data keys)")
    p.add_argument("--time-budget", type=float, help="stop starting trials after this many s")
    p.add_argument("--storage", help="Ray Tune storage, folder or s3:// (default ./runs/tune)")
    p.add_argument("--name", help="experiment name (default: the category)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted search (its settings are read from storage)")
    p.add_argument("--top", type=int, default=10, help="rows of the printed table")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("overrides", nargs="*", help="base config overrides like codec.steps=100")


def spec_from_args(args: argparse.Namespace) -> tuple[TuneSpec, bool]:
    """Build the spec (new search) or read it back from storage (--resume)."""
    store = args.storage or "runs/tune"
    store = store if "://" in store else os.path.abspath(store)
    name = args.name or args.category
    spec_url = storage.join(store, name, SPEC_FILE)
    if args.resume:
        if not _fs_exists(spec_url):
            raise FileNotFoundError(f"nothing to resume: {spec_url} does not exist")
        spec = TuneSpec(**json.loads(_fs_read(spec_url)))
        if spec.category != args.category:
            raise ValueError(f"{spec_url} is a search for {spec.category}, not {args.category}")
        spec.data = args.data or spec.data
        spec.registry = args.registry or spec.registry
        return spec, True
    if not args.data or not args.registry:
        raise ValueError("--data and --registry are required for a new search")
    if _fs_exists(spec_url):
        raise ValueError(f"a search named {name!r} already exists in {store}: continue it with "
                         "--resume, or choose another --name / --storage")
    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"train.workers={args.workers}")
    base = load_config(args.preset, args.config, overrides)
    from lasb.tuning import load_space

    space, raw_space = load_space(args.space)
    spec = TuneSpec(
        category=args.category, data=args.data, registry=args.registry, base=to_dict(base),
        space=raw_space, trials=args.trials, objective=args.objective,
        metric=METRICS[args.metric], max_ms_per_image=args.max_ms_per_image, seed=args.seed,
        concurrent=args.concurrent, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, early_stop=args.early_stop,
        eval_every=args.eval_every, probe_images=args.probe_images,
        val_source=args.val_source, val_seed=args.val_seed, share_codec=args.share_codec,
        time_budget_s=args.time_budget, storage=store, name=name)
    validate(spec, base, space)
    return spec, False


def main(args: argparse.Namespace) -> int:
    spec, resume = spec_from_args(args)
    summary = run(spec, resume=resume, address=args.address, top=args.top)
    return 0 if summary is not None else 3


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
