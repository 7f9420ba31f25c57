"""`lasb serve`: run the scoring application on a local Ray (or `--address`) until Ctrl-C.

    lasb serve --registry R [--host 127.0.0.1] [--port 8000] [--token-file F]
               [--max-batch-size 8] [--batch-wait-ms 10] [--replicas 1] [--gpus-per-replica 0]

On a cluster use Serve's own tools with the config: `serve deploy serve/config.yaml`.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import time

from serve.auth import DEFAULT_TOKEN_ENV, load_token

log = logging.getLogger("lasb.serve")

APP_NAME = "lasb"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", required=True, help="model registry (folder or s3://)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help=f"bearer token file (default: ${DEFAULT_TOKEN_ENV}; "
                                        "neither set = no auth)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests per model call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits to fill")
    p.add_argument("--models-per-replica", type=int, default=3, help="LRU bound per replica")
    p.add_argument("--replicas", type=int, default=1, help="Scorer replicas")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0)
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit")
    p.add_argument("--max-pixels", type=int, default=16_000_000, help="image pixel limit")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")


def scorer_options(args: argparse.Namespace) -> dict:
    return {
        "num_replicas": args.replicas,
        "ray_actor_options": {"num_cpus": args.cpus_per_replica,
                              "num_gpus": args.gpus_per_replica},
        # at least max_batch_size in flight per replica, or batches never fill
        "max_ongoing_requests": max(64, 2 * args.max_batch_size),
        "user_config": {"max_batch_size": args.max_batch_size,
                        "batch_wait_timeout_s": args.batch_wait_ms / 1000},
    }


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def start(args: argparse.Namespace) -> str:
    """Deploy the app; returns its base URL."""
    from ray import serve

    from jobs.common import init_ray
    from serve.app import AppArgs, make_app

    token = load_token(args.token_file)  # fail now, not in a replica, on a bad token file
    if token is None and not _is_loopback(args.host):
        log.warning("serving on %s without a bearer token: set --token-file or $%s", args.host,
                    DEFAULT_TOKEN_ENV)
    init_ray(args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    # replicas run in other working directories: hand them absolute paths
    registry = args.registry if "://" in args.registry else os.path.abspath(args.registry)
    token_file = os.path.abspath(args.token_file) if args.token_file else None
    app_args = AppArgs(registry=registry, token_file=token_file,
                       max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                       models_per_replica=args.models_per_replica)
    serve.run(make_app(app_args, scorer_options(args)), name=APP_NAME, route_prefix="/")
    return f"http://{args.host}:{args.port}"


def main(args: argparse.Namespace) -> int:
    from ray import serve

    url = start(args)
    print(f"serving {args.registry} on {url} (API docs: {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
    return 0
