"""Serving benchmark: bounded load on loopback against the batched and an unbatched Scorer.

    .venv/bin/python benchmarks/serving.py [--registry R --category C] [--duration 15]
        [--requests 3000] [--concurrency 1 8 32] [--max-batch-size 32] [--batch-wait-ms 10]

Without --registry a tiny model is trained in-process on a generated category (~20 s). Two
Serve apps run side by side, identical but for the Scorer's `user_config` (batched:
max_batch_size N; unbatched: 1), at /batched and /unbatched; only one is under load at a
time (Ray's CPU count is raised so both fit logically). Cells are interleaved (for each
concurrency: batched, then unbatched) so background load drifts hit both alike. Each cell is bounded: it stops after
--duration seconds or --requests requests, whichever comes first, and counts status codes.
The client runs in this process on the same cores as the server: figures are for the whole
loop on this machine. Prints a table; writes benchmarks/results/serving-<timestamp>.json.
Target: batched >= 3x unbatched requests/s at concurrency 32, with zero 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
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
sys.path.insert(0, str(HERE.parent))

import aiohttp
import numpy as np

log = logging.getLogger("lasb.benchmark")
# per-request access logs cost CPU on the same cores; off for both configurations alike
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


def train_tiny(work: str) -> tuple[str, str]:
    """A tiny model on a generated category, trained in-process like the serving tests do."""
    from jobs.train import load_training_images, publish_trained, stream_rows
    from lasb.config import load_config
    from lasb.demo_data import make_demo_category
    from lasb.pairs import iterate_pairs
    from lasb.train import save_models, train_models

    data, registry, category = f"{work}/data", f"{work}/registry", "demo_texture"
    make_demo_category(data, category, size=32, n_train=48, n_test_good=4, n_test_defect=6)
    cfg = load_config("tiny")
    images, holdout = load_training_images(data, category, cfg)
    models = train_models(cfg, iterate_pairs(images, stream_rows(cfg), cfg.train.batch_size,
                                             cfg.augment, cfg.train.seed))
    with tempfile.TemporaryDirectory() as tmp:
        save_models(tmp, models, cfg)
        publish_trained(tmp, cfg, holdout, registry, category)
    return registry, category


def request_image(registry: str, category: str, path: str | None) -> bytes:
    """The given file, or a random PNG at the model's working size (compute does not depend
    on the content)."""
    from PIL import Image

    from lasb import artifacts
    from lasb.config import config_from_yaml

    if path:
        return Path(path).read_bytes()
    folder, _ = artifacts.fetch(registry, category)
    size = config_from_yaml((folder / "config.yaml").read_text()).data.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


async def load(url: str, body: bytes, concurrency: int, duration: float,
               max_requests: int) -> dict:
    """`concurrency` closed-loop clients until the time or request budget is spent."""
    latencies: list[float] = []
    batches: list[int] = []
    codes: dict[str, int] = {}
    sent = 0
    headers = {"Content-Type": "image/png"}
    # aiohttp, not httpx: the client shares the cores with the server, and costs less per call
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def worker() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                try:
                    async with client.post(url, data=body, headers=headers) as r:
                        key = str(r.status)
                        answer = await r.json() if r.status == 200 else None
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    key, answer = type(exc).__name__, None
                codes[key] = codes.get(key, 0) + 1
                if answer is not None:
                    latencies.append(time.perf_counter() - start)
                    batches.append(answer["batch_size"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "concurrency": concurrency, "requests": sent, "ok": len(latencies),
        "seconds": elapsed, "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": float(np.mean(batches)) if batches else 0.0,
        "status": codes,
        "n_5xx": sum(n for k, n in codes.items() if k.startswith("5")),
        "n_failed": sum(n for k, n in codes.items() if k != "200"),
    }


def deploy(name: str, registry: str, max_batch_size: int, wait_s: float) -> None:
    from ray import serve

    from serve.app import AppArgs, make_app

    options = {"max_ongoing_requests": 64,
               "user_config": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}}
    serve.run(make_app(AppArgs(registry=registry), options), name=name,
              route_prefix=f"/{name}", logging_config=QUIET)


def table(rows: list[dict]) -> str:
    head = (f"{'config':<10} {'conc':>4} {'requests':>8} {'ok':>6} {'req/s':>8} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'batch':>6} {'5xx':>4} {'failed':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['config']:<10} {r['concurrency']:>4} {r['requests']:>8} {r['ok']:>6} "
                     f"{r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                     f"{r['mean_batch']:>6.2f} {r['n_5xx']:>4} {r['n_failed']:>6}")
    return "\n".join(lines)


def batching_ceiling(registry: str, category: str, batch: int, seconds: float = 6.0) -> dict:
    """Detector.predict in this process, 1 thread (a Scorer replica's share): ms per image at
    batch 1 vs `batch`. Their ratio bounds what batching can gain on this hardware."""
    from lasb.detector import Detector

    det = Detector.load(registry, category)
    size = det.cfg.data.image_size
    images = list(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8))
    out = {}
    for b in (1, batch):
        det.predict(images[:b])  # first-call allocations
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            det.predict(images[:b])
            n += b
        out[f"ms_per_image_batch_{b}"] = 1000 * (time.perf_counter() - t0) / n
    out["ratio"] = out["ms_per_image_batch_1"] / out[f"ms_per_image_batch_{batch}"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", help="model registry (default: train a tiny model)")
    p.add_argument("--category", default="demo_texture")
    p.add_argument("--image", help="image file to send (default: random PNG at model size)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per cell (max)")
    p.add_argument("--requests", type=int, default=3000, help="requests per cell (max)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "ray.serve"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    torch.set_num_threads(1)  # this process (client, training) shares the cores with Serve
    work = tempfile.mkdtemp(prefix="lasb-serving-bench-")  # tiny model, Ray session logs
    try:
        return run(args, work)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: str) -> int:
    from ray import serve

    from jobs.common import init_ray

    started, load_before = dt.datetime.now(dt.timezone.utc), os.getloadavg()
    registry, category = (args.registry, args.category) if args.registry else train_tiny(work)
    registry = registry if "://" in registry else os.path.abspath(registry)
    body = request_image(registry, category, args.image)
    ceiling = batching_ceiling(registry, category, args.max_batch_size)
    log.info("model alone, 1 thread: %s", ceiling)

    os.environ.setdefault("RAY_TMPDIR", work)
    # both apps' replicas must fit (2 x (Scorer 1 + Ingress 0.25) CPUs); one is busy at a time
    init_ray(num_cpus=max(4, os.cpu_count() or 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    configs = {"batched": (args.max_batch_size, args.batch_wait_ms / 1000),
               "unbatched": (1, 0.0)}
    rows = []
    try:
        for name, (size, wait) in configs.items():
            deploy(name, registry, size, wait)
        for c in args.concurrency:
            for name, (size, wait) in configs.items():
                url = f"http://127.0.0.1:{port}/{name}/v1/categories/{category}/score"
                # warm-up: model load (first cell), connections, first-call allocations
                asyncio.run(load(url, body, c, duration=2.0, max_requests=2 * c))
                row = asyncio.run(load(url, body, c, args.duration, args.requests))
                row.update(config=name, max_batch_size=size, batch_wait_timeout_s=wait)
                log.info("%s c=%d: %.1f req/s, p50 %.1f ms, p99 %.1f ms, batch %.2f, %s", name,
                         c, row["rps"], row["p50_ms"], row["p99_ms"], row["mean_batch"],
                         row["status"])
                rows.append(row)
    finally:
        serve.shutdown()

    print(table(rows))
    by = {(r["config"], r["concurrency"]): r for r in rows}
    top = max(args.concurrency)
    ratio = by[("batched", top)]["rps"] / max(by[("unbatched", top)]["rps"], 1e-9)
    n_5xx = sum(r["n_5xx"] for r in rows)
    met = ratio >= 3.0 and n_5xx == 0
    print(f"batched / unbatched throughput at concurrency {top}: {ratio:.2f}x; 5xx: {n_5xx}; "
          f"target (>= 3x, zero 5xx): {'met' if met else 'NOT met'}")
    print(f"model alone (Detector.predict, 1 thread): "
          f"{ceiling['ms_per_image_batch_1']:.1f} ms/image at batch 1, "
          f"{ceiling[f'ms_per_image_batch_{args.max_batch_size}']:.1f} at batch "
          f"{args.max_batch_size}: batching can gain at most {ceiling['ratio']:.2f}x here")
    # other work on the same cores changes every figure: record how busy the machine was
    load_after = os.getloadavg()
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "started": started.isoformat(),
        "registry": args.registry or "(tiny model trained for this run)", "category": category,
        "image_bytes": len(body),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows, "ratio_at_max_concurrency": ratio, "target_met": met,
        "model_batching_ceiling": ceiling,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"serving-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
