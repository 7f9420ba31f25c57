"""Accuracy benchmark: train the `cpu` preset per category, report test-split metrics.

    .venv/bin/python benchmarks/accuracy.py [--data ../shared/datasets] \
        [--categories magnetic_tile,mpdd_metal_plate] [key=value ...]

For each category: train through Ray (jobs.train.run: the same path as `lasb train`), then
score the test split (read only here, for this report) with the bridge at NFE 1, 2, 4, 10 for
the stochastic and the OT-ODE sampler, and with the codec-only baseline (same scoring, no
bridge). Prints a table and writes benchmarks/results/accuracy-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jobs import train as train_job
from lasb import metrics
from lasb.config import load_config, to_dict
from lasb.detector import Detector
from lasb.evaluate import format_table, load_test_split, score_split

log = logging.getLogger("lasb.benchmark")


def run_category(data: str, category: str, registry: str, storage: str, overrides: list[str],
                 nfes: list[int]) -> dict:
    cfg = load_config("cpu", None, overrides)
    t0 = time.perf_counter()
    version = train_job.run(cfg, data, category, registry, storage)
    train_s = time.perf_counter() - t0
    det = Detector.load(registry, category, version)
    _, images, masks, labels, errors = load_test_split(
        data, category, cfg.data.image_size, cfg.data.max_pixels)
    rows = {}
    settings = [("codec only (no bridge)", {"use_bridge": False})]
    for sampler in ("stochastic", "ot_ode"):
        settings += [(f"bridge {sampler} NFE {n}", {"nfe": n, "sampler": sampler}) for n in nfes]
    for name, kw in settings:
        raw, ms = score_split(det, images, **kw)
        rows[name] = {**metrics.evaluate(labels, raw.scores, masks, raw.maps),
                      "ms_per_image": ms}
        log.info("%s %s: %s", category, name, rows[name])
    cal = det.calibration
    return {
        "category": category,
        "version": version,
        "config": to_dict(cfg),
        "train_seconds_total": train_s,
        "n_test": len(images),
        "n_test_unreadable": len(errors),
        "pseudo_validation": cal["pseudo_validation"],
        "threshold": cal["threshold"],
        "results": rows,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "datasets"))
    p.add_argument("--categories", default="magnetic_tile,mpdd_metal_plate")
    p.add_argument("--nfe", default="1,2,4,10")
    p.add_argument("--work", default="/tmp/lasb-bench", help="registry and checkpoints")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "started": dt.datetime.now(dt.timezone.utc).isoformat(), "overrides": args.overrides,
           "categories": []}
    nfes = [int(n) for n in args.nfe.split(",")]
    for category in args.categories.split(","):
        res = run_category(args.data, category, f"{args.work}/registry", f"{args.work}/runs",
                           args.overrides, nfes)
        out["categories"].append(res)
        print(f"\n{category}: trained in {res['train_seconds_total']:.0f} s "
              f"(incl. Ray start, calibration); pseudo-validation image AUROC "
              f"{100 * res['pseudo_validation']['image_auroc']:.1f}")
        print(format_table(res["results"]))
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"accuracy-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
