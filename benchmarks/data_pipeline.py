"""Data-pipeline figures (issue 3): augmentation images/s per core, `lasb ingest` throughput to
local disk and to S3, and (with --train) the training step fed by Ray Data vs pre-loaded tensors.

    .venv/bin/python benchmarks/data_pipeline.py [--images 500] [--size 256] [--train]
    .venv/bin/python benchmarks/data_pipeline.py --images 40 --size 64      # smoke test

Augmentation: `lasb.augment.synthesize_batch` (DRAEM: Perlin mask, texture source, blend) on
--size px images in this process with one thread, i.e. images/s per core; once with the image
itself as texture source (the default) and once with a folder of textures when
../shared/datasets/dtd_textures exists.

Training feed (--train): runs `benchmarks/train_scaling.py --configs preloaded,ray1`, the same
`cpu` preset steps in-process on pre-made pairs vs under Ray Train fed by the Ray Data stream,
each in a fresh subprocess; the streaming cost is 1 - ray1/preloaded samples/s per stage.

Ingest measurements, on one generated PNG category (demo texture, MVTec layout, train/good),
each into a fresh destination, with one local Ray (started once, and warmed up by an untimed
20-image ingest, since the first Ray Data job also starts worker processes):

1. ``local -> local``: SRC and DST on this machine's disk;
2. ``local -> s3``: DST on a moto S3 server started by this script on 127.0.0.1;
3. ``s3 -> s3``: SRC uploaded to that server first, DST there too.

MB/s is the job's own figure: input bytes read / job wall time without ``ray.init`` (listing,
Ray Data read+sha256+decode-check+write tasks, dedup, rejects, summary, manifest). moto is a
Python server in this process, so the S3 figures measure lasb plus moto on 2 cores, not S3.
The machine's load average before/after is recorded; other load makes the numbers meaningless.

Structure: one function per measurement (``measure_ingest``) and a ``main`` that runs them,
so other measurements (training step fed by Ray Data vs preloaded tensors, augmentation
images/s) can be added next to them. Results are printed and merged into
``benchmarks/results/data_pipeline-<YYYYMMDD>.json`` under the key ``"ingest"``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("lasb.benchmark")


# -- setup ----------------------------------------------------------------------------------------
def make_images(root: Path, n: int, size: int) -> Path:
    """An MVTec-layout category with ``n`` normal ``size`` px PNGs (demo texture crops)."""
    from lasb.demo_data import make_demo_category

    make_demo_category(str(root), "bench", size=size, n_train=n, n_test_good=0,
                       n_test_defect=0, seed=0)
    return root


def start_moto() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 (free port), set as AWS_ENDPOINT_URL; fake keys only."""
    from moto.server import ThreadedMotoServer

    os.environ["AWS_ACCESS_KEY_ID"] = "testing"  # never real credentials against a test server
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="bench")
    return server, endpoint


def upload(folder: Path, url: str) -> None:
    from lasb import storage

    fs, path = storage.filesystem(url)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{path}/{p.relative_to(folder).as_posix()}", p.read_bytes())


# -- measurements ---------------------------------------------------------------------------------
def measure_ingest(name: str, src: str, dst: str, shard_mb: float,
                   cpus_per_task: float) -> dict:
    """One `lasb ingest` run (Ray already up); the job's summary figures."""
    from jobs import ingest as ingest_job

    t0 = time.perf_counter()
    summary = ingest_job.run(ingest_job.IngestOptions(
        src, dst, shard_mb=shard_mb, cpus_per_task=cpus_per_task, progress_every_s=30))
    wall = time.perf_counter() - t0
    return {"name": name, "src": src, "dst": dst, "files": summary["files_seen"],
            "rows": summary["rows"], "rejected": summary["rejected"],
            "shards": summary["shards"], "mb": summary["bytes_read"] / 1e6,
            "seconds": summary["seconds"], "wall_s": wall, "mb_per_s": summary["mb_per_s"],
            "images_per_s": summary["rows"] / max(wall - summary["seconds"]["ray_init"], 1e-9)}


def ingest_benchmarks(work: Path, n: int, size: int, shard_mb: float,
                      cpus_per_task: float) -> dict:
    """Ingest throughput local -> local, local -> s3 and s3 -> s3 (moto)."""
    from jobs.common import init_ray

    src = make_images(work / "src", n, size)
    server, _ = start_moto()  # first: Ray workers inherit the (fake) keys from here
    init_ray(num_cpus=os.cpu_count())
    try:
        # not timed: the first Ray Data job starts worker processes and imports lasb in them
        warm = make_images(work / "warm", 20, size)
        measure_ingest("warm-up", str(warm), str(work / "warm_dst"), shard_mb, cpus_per_task)
        runs = [measure_ingest("local -> local", str(src), str(work / "dst"), shard_mb,
                               cpus_per_task),
                measure_ingest("local -> s3", str(src), "s3://bench/dst", shard_mb,
                               cpus_per_task)]
        t0 = time.perf_counter()
        upload(src, "s3://bench/src")
        upload_s = time.perf_counter() - t0
        runs.append(measure_ingest("s3 -> s3", "s3://bench/src", "s3://bench/dst2", shard_mb,
                                   cpus_per_task))
    finally:
        server.stop()
    return {"images": n, "size": size, "shard_mb": shard_mb, "cpus_per_task": cpus_per_task,
            "moto_upload_s": upload_s, "runs": runs}


# -- report ---------------------------------------------------------------------------------------
def format_ingest(r: dict) -> str:
    lines = [(f"ingest: {r['images']} PNGs of {r['size']} px, shards of {r['shard_mb']} MB, "
              f"{r['cpus_per_task']} CPU per task"),
             (f"  {'run':<16}{'MB':>8}{'shards':>8}{'s (no Ray start)':>18}{'MB/s':>8}"
              f"{'images/s':>10}")]
    for run in r["runs"]:
        busy = run["wall_s"] - run["seconds"]["ray_init"]
        lines.append(f"  {run['name']:<16}{run['mb']:>8.1f}{run['shards']:>8}{busy:>18.2f}"
                     f"{run['mb_per_s']:>8.1f}{run['images_per_s']:>10.0f}")
    return "\n".join(lines)


def measure_augmentation(size: int, n: int = 64, seconds: float = 10.0) -> dict:
    """DRAEM synthesis images/s on one core, per texture source."""
    import numpy as np
    import torch

    from lasb.augment import AugmentConfig, load_anomaly_source, synthesize_batch
    from lasb.demo_data import make_demo_category

    torch.set_num_threads(1)
    out = {"size": size}
    with tempfile.TemporaryDirectory() as tmp:
        make_demo_category(tmp, "aug", size=size, n_train=n, n_test_good=0, n_test_defect=0,
                           seed=0)
        folder = Path(tmp, "aug", "train", "good")
        from lasb.data import decode_image

        images = np.stack([decode_image(p.read_bytes(), str(p)) for p in sorted(folder.iterdir())])
        dtd = HERE.parent.parent / "shared" / "datasets" / "dtd_textures"
        sources = {"self": None}
        if dtd.is_dir():
            sources["dtd_textures"] = load_anomaly_source(str(dtd), size)
        for name, source in sources.items():
            done, t0, seed = 0, time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                seeds = np.arange(seed, seed + len(images))
                synthesize_batch(images, seeds, AugmentConfig(), source)
                done, seed = done + len(images), seed + len(images)
            out[f"{name}_images_per_s_per_core"] = done / (time.perf_counter() - t0)
    return out


def measure_training_feed() -> dict:
    """train_scaling.py's preloaded vs ray1 rows (the script runs each in a subprocess)."""
    import subprocess

    before = set((HERE / "results").glob("train_scaling-*.json"))
    subprocess.run([sys.executable, str(HERE / "train_scaling.py"), "--configs",
                    "preloaded,ray1"], check=True)
    path = max(set((HERE / "results").glob("train_scaling-*.json")) - before)
    rows = {r["config"]: r for r in json.loads(path.read_text())["rows"]}
    return {"source": path.name, "rows": rows,
            "streaming_cost": {stage: 1 - rows["ray1"][f"{stage}_samples_per_s"]
                               / rows["preloaded"][f"{stage}_samples_per_s"]
                               for stage in ("codec", "bridge")}}


def write_results(key: str, data: dict) -> Path:
    """Merge ``data`` under ``key`` into today's results file (other measurements stay)."""
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"data_pipeline-{dt.datetime.now(dt.timezone.utc):%Y%m%d}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[key] = data
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--shard-mb", type=float, default=8.0,
                        help="small enough that ~500 images make several shards (parallel tasks)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--train", action="store_true",
                        help="also compare training fed by Ray Data with pre-loaded tensors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for k, v in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(k, v)

    load_before = os.getloadavg()
    augmentation = measure_augmentation(args.size)
    print("augmentation (DRAEM, 1 core, {size} px): ".format(**augmentation) + ", ".join(
        f"{k.removesuffix('_images_per_s_per_core')} {v:.1f} images/s"
        for k, v in augmentation.items() if k != "size"))
    print(f"results: {write_results('augmentation', augmentation)}")
    if args.train:
        feed = measure_training_feed()
        print("training fed by Ray Data vs pre-loaded tensors, streaming cost: " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in feed["streaming_cost"].items()))
        print(f"results: {write_results('training_feed', feed)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="lasb-dp-"))
    try:
        ingest = ingest_benchmarks(work, args.images, args.size, args.shard_mb,
                                   args.cpus_per_task)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ingest.update({"load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                   "cpus": os.cpu_count(), "python": platform.python_version(),
                   "measured": dt.datetime.now(dt.timezone.utc).isoformat()})
    print(format_ingest(ingest))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"results: {write_results('ingest', ingest)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
