"""Batch-scoring throughput: `lasb score` (Ray Data actor pool) vs an in-process Detector loop.

    .venv/bin/python benchmarks/batch_scoring.py [--images 2000] [--preset cpu]
        [--registry R --category C]          # use a published model instead of training one
    .venv/bin/python benchmarks/batch_scoring.py --images 60 --preset tiny   # smoke test

One run of each, on the same generated PNG lake (demo texture, ~20% with drawn defects):

1. in-process: read bytes, decode, `Detector.predict` in batches, torch with --threads threads;
2. `lasb score` as a subprocess (local Ray started by the job), actor pool of --actors actors with
   one torch thread each; its images/s is taken from the job summary (Ray Data pipeline start to
   last commit, i.e. including actor start and model loading, excluding `ray.init`).

Also measured: the Detector's FLOPs per image (torch FlopCounterMode over `predict`: convs,
matmuls, attention), so achieved FLOP/s = FLOPs/image x images/s, against the FLOP/s of one
3x3 conv layer (64 -> 64 channels, 64x64, batch 8) timed here with the same thread counts:
in-process over the predict calls (vs the conv at --threads threads); for Ray over the whole
pipeline (vs actors x the 1-thread conv) and per actor while it scores (vs the 1-thread conv).
The machine's load average before/after is recorded: other load makes both numbers meaningless
(torch threads compete; see PLATFORM_NOTES, thread pitfall).
Target: Ray >= 85% of the in-process images/s; Detector >= 40% of the conv FLOP/s.
Prints a table and writes benchmarks/results/batch_scoring-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch

log = logging.getLogger("lasb.benchmark")


# -- model and data ------------------------------------------------------------------------------
def train_model(preset: str, work: Path, overrides: list[str]) -> tuple[str, str]:
    """Train `preset` in-process (no Ray) on a generated category and publish it."""
    from jobs.train import load_training_images, publish_trained, stream_rows
    from lasb.config import load_config
    from lasb.demo_data import make_demo_category
    from lasb.pairs import iterate_pairs
    from lasb.train import save_models, train_models

    cfg = load_config(preset, None, overrides)
    torch.set_num_threads(cfg.train.torch_threads or 1)
    data = work / "train_data"
    make_demo_category(str(data), "bench_texture", size=cfg.data.image_size, n_train=64,
                       n_test_good=0, n_test_defect=0, seed=0)
    images, holdout = load_training_images(str(data), "bench_texture", cfg)
    n_rows = stream_rows(cfg)
    t0 = time.perf_counter()
    models = train_models(cfg, iterate_pairs(images, n_rows, cfg.train.batch_size, cfg.augment,
                                             cfg.train.seed))
    registry = str(work / "registry")
    with tempfile.TemporaryDirectory() as tmp:
        save_models(tmp, models, cfg)
        publish_trained(tmp, cfg, holdout, registry, "bench_texture")
    log.info("trained %s preset in %.0f s", preset, time.perf_counter() - t0)
    return registry, "bench_texture"


def make_lake(root: Path, category: str, n: int, size: int) -> tuple[Path, list[str]]:
    """n PNGs (80% normal, 20% with drawn defects; deterministic): (input folder, sorted paths)."""
    from lasb.demo_data import make_demo_category

    n_defect = n // 5
    cat_dir = Path(make_demo_category(str(root), category, size=size, n_train=1,
                                      n_test_good=n - n_defect, n_test_defect=n_defect, seed=7))
    lake = cat_dir / "test"
    return lake, sorted(str(p) for p in lake.rglob("*.png"))


# -- measurements --------------------------------------------------------------------------------
def conv_flops_per_s(threads: int, reps: int = 5) -> float:
    """FLOP/s of one Conv2d(64, 64, 3x3) forward on (8, 64, 64, 64): best of `reps`."""
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(8, 64, 64, 64)
    flops = 2 * 64 * 64 * 9 * 64 * 64 * 8
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(reps):
            t0 = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return flops / best


def detector_flops_per_image(det, image: np.ndarray, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        det.predict([image] * batch, return_maps=False)
    return counter.get_total_flops() / batch


def in_process(registry: str, category: str, paths: list[str], batch: int,
               threads: int) -> dict:
    """The loop a user would write: read, decode, predict; everything timed."""
    from lasb.data import decode_image, read_bytes
    from lasb.detector import Detector

    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    det = Detector.load(registry, category)
    load_s = time.perf_counter() - t_start
    read_s = decode_s = predict_s = 0.0
    scores = []
    for lo in range(0, len(paths), batch):
        t0 = time.perf_counter()
        blobs = [read_bytes(p) for p in paths[lo:lo + batch]]
        t1 = time.perf_counter()
        images = [decode_image(b, p) for b, p in zip(blobs, paths[lo:lo + batch])]
        t2 = time.perf_counter()
        scores += [r["raw_score"] for r in det.predict(images, return_maps=False)]
        t3 = time.perf_counter()
        read_s, decode_s, predict_s = read_s + t1 - t0, decode_s + t2 - t1, predict_s + t3 - t2
    total = time.perf_counter() - t_start
    return {"images": len(paths), "seconds": total, "images_per_s": len(paths) / total,
            "stages_s": {"model_load": load_s, "read": read_s, "decode": decode_s,
                         "predict": predict_s},
            "predict_images_per_s": len(paths) / predict_s, "torch_threads": threads,
            "_det": det, "_scores": dict(zip(paths, scores))}


def ray_job(registry: str, category: str, lake: Path, out: Path, args) -> dict:
    """`lasb score` as a real subprocess on a fresh output folder."""
    if out.exists():
        shutil.rmtree(out)
    cpus = os.cpu_count() or 1
    actors = args.actors or cpus
    cpa = args.cpus_per_actor or max(0.25, round((cpus - 2 * args.decode_cpus) / actors, 2))
    cmd = [sys.executable, "-m", "lasb.cli", "score", "--input", str(lake), "--registry",
           registry, "--output", str(out), "--category", category, "--batch-size",
           str(args.batch), "--partition-size", str(args.partition_size), "--actors",
           str(actors), "--cpus-per-actor", str(cpa), "--decode-cpus", str(args.decode_cpus),
           "--torch-threads", "1"]
    log.info("running: %s", " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"lasb score failed with exit code {proc.returncode}")
    summary = json.loads((out / "_summary.json").read_text())
    return {"images": summary["rows"], "errors": summary["errors"],
            "images_per_s": summary["images_per_s"],
            "end_to_end_images_per_s": summary["rows"] / wall, "wall_seconds": wall,
            "stages_s": summary["seconds"], "actors": actors, "cpus_per_actor": cpa,
            "torch_threads_per_actor": 1,
            "progress_lines": [ln for ln in proc.stdout.splitlines() if "images/s" in ln][-3:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--registry", help="use this registry's model instead of training one")
    p.add_argument("--category")
    p.add_argument("--preset", default="cpu", help="preset to train when no --registry")
    p.add_argument("--image-size", type=int, help="size of the generated images (default: "
                                                  "the model's working size)")
    p.add_argument("--batch", type=int, default=16, help="images per predict call / actor call")
    p.add_argument("--partition-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the in-process loop (default: all cores)")
    p.add_argument("--actors", type=int, help="actor pool size (default: one per core)")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--decode-cpus", type=float, default=0.25)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lasb-bench-scoring"))
    p.add_argument("overrides", nargs="*", help="config overrides for the trained preset")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    if args.registry:
        if not args.category:
            p.error("--registry needs --category")
        registry, category = args.registry, args.category
    else:
        registry, category = train_model(args.preset, work / args.preset, args.overrides)
    from lasb import artifacts
    from lasb.config import config_from_yaml

    folder, version = artifacts.fetch(registry, category)
    cfg = config_from_yaml((folder / "config.yaml").read_text())
    size = args.image_size or cfg.data.image_size
    lake, paths = make_lake(work / f"lake-{size}px", category, args.images, size)

    load_before = os.getloadavg()[0]
    inproc = in_process(registry, category, paths, args.batch, args.threads)
    det = inproc.pop("_det")
    ref_scores = inproc.pop("_scores")
    ray_res = ray_job(registry, category, lake, work / "out", args)
    import pyarrow.parquet as pq

    rows = pq.read_table(work / "out").to_pylist()
    diff = max(abs(r["raw_score"] - ref_scores[r["uri"]]) for r in rows)

    from lasb.data import load_image

    flops_img = detector_flops_per_image(det, load_image(paths[0]), args.batch)
    conv_t = conv_flops_per_s(args.threads)
    conv_1 = conv_flops_per_s(1)
    achieved_in = flops_img * inproc["predict_images_per_s"]
    achieved_ray = flops_img * ray_res["images_per_s"]
    # while an actor runs the Detector (its busy seconds, summed over actors, from the summary)
    busy = ray_res["stages_s"]["score_actors"]
    achieved_actor = flops_img * (ray_res["images"] - ray_res["errors"]) / busy if busy else 0.0
    ratio = ray_res["images_per_s"] / inproc["images_per_s"]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "started": dt.datetime.now(dt.timezone.utc).isoformat(),
        # other load on the machine skews both numbers (torch threads compete): check this
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "model": {"registry": registry, "category": category, "version": version,
                  "image_size": cfg.data.image_size, "nfe": cfg.bridge.nfe},
        "images": args.images, "image_size": size, "batch": args.batch,
        "in_process": inproc, "ray": ray_res,
        "ray_vs_in_process": ratio, "target_ratio": 0.85,
        "max_abs_raw_score_diff": diff,
        "flops": {"detector_flops_per_image": flops_img,
                  "conv_flops_per_s_threads": conv_t, "conv_flops_per_s_1_thread": conv_1,
                  "in_process_detector_flops_per_s": achieved_in,
                  "in_process_fraction_of_conv": achieved_in / conv_t,
                  "ray_detector_flops_per_s": achieved_ray,
                  "ray_fraction_of_conv": achieved_ray / (conv_1 * ray_res["actors"]),
                  "ray_actor_busy_flops_per_s": achieved_actor,
                  "ray_actor_busy_fraction_of_conv": achieved_actor / conv_1,
                  "target_fraction": 0.40},
    }
    print(format_report(result))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"batch_scoring-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return 0


def format_report(r: dict) -> str:
    i, y, f = r["in_process"], r["ray"], r["flops"]
    g = 1e9
    lines = [
        (f"batch scoring: {r['images']} images of {r['image_size']} px, model "
        f"{r['model']['category']}/{r['model']['version']} ({r['model']['image_size']} px, "
        f"NFE {r['model']['nfe']}), {r['machine']['cpus']} CPUs, load average before/after "
        f"{r['load_average_before_after'][0]:.1f}/{r['load_average_before_after'][1]:.1f}"),
        f"  in-process ({i['torch_threads']} torch threads): {i['images_per_s']:.1f} images/s "
        f"({i['seconds']:.1f} s); stages s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in i["stages_s"].items()),
        f"  lasb score ({y['actors']} actors x {y['cpus_per_actor']} CPU, 1 thread): "
        f"{y['images_per_s']:.1f} images/s (pipeline), {y['end_to_end_images_per_s']:.1f} "
        f"images/s end to end incl. Ray start ({y['wall_seconds']:.1f} s); stages s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in y["stages_s"].items()),
        (f"  Ray / in-process: {r['ray_vs_in_process']:.0%} (target >= 85%); max |raw score "
        f"diff| {r['max_abs_raw_score_diff']:.2g}"),
        (f"  Detector: {f['detector_flops_per_image'] / g:.3f} GFLOP/image; in-process "
        f"{f['in_process_detector_flops_per_s'] / g:.2f} GFLOP/s = "
        f"{f['in_process_fraction_of_conv']:.0%} of conv {f['conv_flops_per_s_threads'] / g:.1f}"
        f" GFLOP/s ({i['torch_threads']} threads); Ray {f['ray_detector_flops_per_s'] / g:.2f} "
        f"GFLOP/s = {f['ray_fraction_of_conv']:.0%} of {y['actors']} x conv "
        f"{f['conv_flops_per_s_1_thread'] / g:.1f} GFLOP/s (1 thread); one actor while busy "
        f"{f['ray_actor_busy_flops_per_s'] / g:.2f} GFLOP/s = "
        f"{f['ray_actor_busy_fraction_of_conv']:.0%} (target >= 40%)"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
