"""`lasb demo`: the whole path on a generated, licence-clean category.

Generates `demo_texture` (scikit-image's CC0 gravel texture with drawn scratches, holes and
stains as test defects: not the DRAEM generator used in training), trains the `cpu` preset
through Ray, evaluates on the test split and writes the report.
"""

from __future__ import annotations

import argparse
import os

from jobs import train as train_job
from lasb.config import load_config
from lasb.demo_data import make_demo_category


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="folder for data, registry and report")
    p.add_argument("--preset", default="cpu")
    p.add_argument("overrides", nargs="*", help="config overrides like denoiser.steps=500")


def main(args: argparse.Namespace) -> int:
    from lasb.detector import Detector
    from lasb.evaluate import evaluate, format_table

    cfg = load_config(args.preset, None, args.overrides)
    data = os.path.join(args.out, "data")
    registry = os.path.join(args.out, "registry")
    category = "demo_texture"
    make_demo_category(data, category, size=cfg.data.image_size)
    print(f"demo data: {os.path.join(data, category)}")
    version = train_job.run(cfg, data, category, registry,
                            storage=os.path.join(args.out, "runs"))
    det = Detector.load(registry, category, version)
    report = os.path.join(args.out, "report")
    rows = {"lasb bridge": evaluate(det, data, category, report),
            "codec only (no bridge)": evaluate(det, data, category, use_bridge=False)}
    print(format_table(rows))
    print(f"model: {registry}/{category}/{version}")
    print(f"report: {os.path.abspath(os.path.join(report, 'report.html'))}")
    return 0
