"""`lasb` command line: one subcommand per job (`lasb ingest`, `lasb train`, `lasb eval`,
`lasb demo`, `lasb serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _eval_main(args: argparse.Namespace) -> int:
    from lasb.detector import Detector
    from lasb.evaluate import evaluate, format_table

    det = Detector.load(args.registry, args.category, args.version)
    out = args.out or os.path.join("reports", args.category, det.version)
    result = evaluate(det, args.data, args.category, out, nfe=args.nfe, sampler=args.sampler)
    print(format_table({f"{args.category} {det.version}": result}))
    print(f"report: {os.path.join(out, 'report.html')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jobs import demo as demo_job
    from jobs import ingest as ingest_job
    from jobs import score as score_job
    from jobs import train as train_job
    from jobs import tune as tune_job
    from serve import cli as serve_cli

    parser = argparse.ArgumentParser(prog="lasb", description="Latent Anomaly Schrödinger Bridge")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="images (MVTec folders or a lake, local or s3://) -> "
                       "Parquet shards + rejects table, with Ray Data")
    ingest_job.add_arguments(p)
    p.set_defaults(func=ingest_job.main)

    p = sub.add_parser("train", help="train one category on Ray and publish it to a registry")
    train_job.add_arguments(p)
    p.set_defaults(func=train_job.main)

    p = sub.add_parser("tune", help="search hyperparameters of a category (Ray Tune + Optuna) "
                       "on pseudo-validation; best config to the registry")
    tune_job.add_arguments(p)
    p.set_defaults(func=tune_job.main)

    p = sub.add_parser("eval", help="metrics and a visual report on a category's test split")
    p.add_argument("--data", required=True, help="MVTec-layout root folder")
    p.add_argument("--category", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--version", default="latest")
    p.add_argument("--out", help="report folder (default reports/<category>/<version>)")
    p.add_argument("--nfe", type=int, help="override the number of sampling steps")
    p.add_argument("--sampler", choices=["stochastic", "ot_ode"])
    p.set_defaults(func=_eval_main)

    p = sub.add_parser("score", help="batch-score images (folder, s3:// or Parquet) to Parquet")
    score_job.add_arguments(p)
    p.set_defaults(func=score_job.main)

    p = sub.add_parser("demo", help="generate a small texture category, train, evaluate, report")
    demo_job.add_arguments(p)
    p.set_defaults(func=demo_job.main)

    p = sub.add_parser("serve", help="online scoring API (Ray Serve) for a registry's models")
    serve_cli.add_arguments(p)
    p.set_defaults(func=serve_cli.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "filelock", "fsspec", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # the message names the cause (bad config, unknown category, unreadable data, ...)
        logging.getLogger("lasb").debug("failure", exc_info=True)
        print(f"lasb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
