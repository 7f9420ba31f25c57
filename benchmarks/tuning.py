"""Tuning benchmark: does `lasb tune` (pseudo-validation only) find a better config?

    .venv/bin/python benchmarks/tuning.py [--data ../shared/datasets] [--category magnetic_tile]
        [--trials 12] [--time-budget 3600] [--objective pareto] [key=value ...]
    .venv/bin/python benchmarks/tuning.py --smoke      # tiny preset, generated data, 2 trials

1. `lasb tune` (jobs.tune, the CLI's code path) on a view of the data root that holds only
   `<category>/train`: the search cannot read the test split.
2. The test split (read only here, for this report): every trial's last checkpoint is scored at
   the trial's NFE/sampler; its pseudo-validation AUROC (recomputed on the full fixed
   pseudo-validation set, also for trials ASHA stopped early) is set against its test AUROC:
   Spearman and Kendall rank correlation, and whether pseudo-validation picks the test-best.
3. The default config and the tuned config (`best.yaml`) are each trained with `lasb train`
   (jobs.train.run: Ray Train, calibration, publishing) and evaluated on the test split.
4. The smallest NFE within 0.5 AUROC points of the best: the tuned model scored at NFE
   1, 2, 4, 8, 16 on pseudo-validation (what a user can see) and on the test split; and across
   trials (pseudo-validation).

Prints tables and writes benchmarks/results/tuning-<timestamp>.json.
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
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np
import pandas as pd

log = logging.getLogger("lasb.benchmark")
TOLERANCE = 0.005  # 0.5 AUROC points


def train_only_view(data: str, category: str, work: Path) -> str:
    root = work / "train_only"
    (root / category).mkdir(parents=True, exist_ok=True)
    link = root / category / "train"
    if not link.exists():
        link.symlink_to(Path(data).resolve() / category / "train")
    return str(root)


def run_search(args, data_view: str, registry: str, store: str) -> dict:
    from jobs import tune as tune_job

    parser = argparse.ArgumentParser()
    tune_job.add_arguments(parser)
    argv = ["--data", data_view, "--category", args.category, "--registry", registry,
            "--storage", store, "--name", f"{args.category}-{args.stamp}",
            "--trials", str(args.trials), "--objective", args.objective,
            "--preset", args.preset, "--seed", str(args.seed)]
    if args.time_budget:
        argv += ["--time-budget", str(args.time_budget)]
    if args.val_source:
        argv += ["--val-source", args.val_source]
    argv += args.extra + args.overrides
    t0 = time.perf_counter()
    if tune_job.main(parser.parse_args(argv)) != 0:
        raise RuntimeError("the search was interrupted")
    summary = json.loads(Path(registry, args.category, "tuning", "summary.json").read_text())
    summary["search_seconds"] = time.perf_counter() - t0
    return summary


def auroc_pair(det, images, labels, masks, **kw) -> dict:
    from lasb import metrics

    t0 = time.perf_counter()
    raw = det.raw(list(images), **kw)
    ms = 1000 * (time.perf_counter() - t0) / len(images)
    return {"image_auroc": metrics.image_auroc(labels, raw.scores),
            "pixel_auroc": metrics.pixel_auroc(masks, raw.maps), "ms_per_image": ms}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets"))
    p.add_argument("--category", default="magnetic_tile")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--time-budget", type=float, default=3600.0,
                   help="seconds after which no new trial starts (default one hour)")
    p.add_argument("--objective", default="pareto", choices=["auroc", "pareto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-source", help="anomaly source of validation defects (default auto)")
    p.add_argument("--nfe", default="1,2,4,8,16")
    p.add_argument("--work", default="/tmp/lasb-bench-tuning")
    p.add_argument("--skip-trials-test", action="store_true",
                   help="do not score every trial's checkpoint on the test split")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset on a generated category, 2 trials: checks the script runs")
    p.add_argument("overrides", nargs="*", help="base config overrides for tuning and both "
                   "trainings, e.g. denoiser.steps=400")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("diffusers", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)  # the driver shares the cores with Ray workers
    args.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(args.work) / args.stamp
    work.mkdir(parents=True, exist_ok=True)
    args.extra = []
    if args.smoke:
        from lasb.demo_data import make_demo_category

        args.data = str(work / "data")
        args.category = "demo_texture"
        make_demo_category(args.data, args.category, size=32, n_train=48, n_test_good=20,
                           n_test_defect=30, seed=0)
        args.preset, args.trials, args.time_budget = "tiny", 2, None
        args.overrides = ["codec.steps=10", "denoiser.steps=30", "train.log_every=10",
                          *args.overrides]
        args.extra = ["--probe-images", "4"]
        args.nfe = "1,2,4"

    from jobs import train as train_job
    from jobs.tune import TuneSpec, resolve_validation_source
    from lasb.config import from_dict, load_config, to_dict
    from lasb.detector import Detector
    from lasb.evaluate import evaluate, load_test_split
    from lasb.tuning import validation_set

    registry, store = str(work / "registry"), str(work / "runs")
    out: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                 "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                 "args": {k: v for k, v in vars(args).items() if k != "stamp"}}

    # 1. the search (train split only)
    summary = run_search(args, train_only_view(args.data, args.category, work), registry, store)
    out["search"] = {k: summary[k] for k in ("n_trials", "n_completed", "n_stopped_early",
                                             "n_errors", "best", "best_params", "validation",
                                             "search_seconds")}
    spec = TuneSpec(**json.loads(Path(summary["experiment"], "lasb_tune.json").read_text()))
    base = from_dict(spec.base)
    trials = pd.read_csv(Path(summary["tuning_dir"], "trials.csv")).to_dict("records")

    # the fixed pseudo-validation set, rebuilt exactly as the search built it
    _images, holdout = train_job.load_training_images(args.data, args.category, base)
    val_src, _ = resolve_validation_source(spec, base)
    pv_images, pv_labels, pv_masks = validation_set(holdout, spec.val_seed, base.augment, val_src)
    # the test split: read from here on, for this report only
    _, test_images, test_masks, test_labels, _ = load_test_split(
        args.data, args.category, base.data.image_size, base.data.max_pixels)

    # 2. pseudo-validation vs test for every trial
    rows = []
    if not args.skip_trials_test:
        for t in trials:
            ckpt = t.get("checkpoint")
            if not isinstance(ckpt, str) or not Path(ckpt).is_dir():
                continue
            det = Detector.from_dir(ckpt, verify=False)
            pv = auroc_pair(det, pv_images, pv_labels, pv_masks)
            test = auroc_pair(det, test_images, test_labels, test_masks)
            rows.append({"trial_id": t["trial_id"], "status": t["status"], "nfe": t["nfe"],
                         "sampler": t.get("bridge.sampler"),
                         "pv_image_auroc": pv["image_auroc"], "pv_pixel_auroc": pv["pixel_auroc"],
                         "test_image_auroc": test["image_auroc"],
                         "test_pixel_auroc": test["pixel_auroc"],
                         "test_ms_per_image": test["ms_per_image"]})
            log.info("trial %s: %s", t["trial_id"], rows[-1])
    agreement = {}
    if len(rows) >= 3:
        from scipy.stats import kendalltau, spearmanr

        for level in ("image", "pixel"):
            a = [r[f"pv_{level}_auroc"] for r in rows]
            b = [r[f"test_{level}_auroc"] for r in rows]
            agreement[level] = {
                "spearman": float(spearmanr(a, b).statistic),
                "kendall": float(kendalltau(a, b).statistic),
                "pv_pick_test_auroc": b[int(np.argmax(a))], "test_best_auroc": max(b),
            }
    out["trials"] = rows
    out["agreement"] = agreement

    # 3. default vs tuned, each trained by `lasb train` and evaluated on the test split
    default_cfg = load_config(args.preset, None, args.overrides)
    tuned_path = str(Path(summary["tuning_dir"], "best.yaml"))
    tuned_cfg = load_config(args.preset, tuned_path)
    compare = {}
    models = {}
    for name, cfg in (("default", default_cfg), ("tuned", tuned_cfg)):
        t0 = time.perf_counter()
        version = train_job.run(cfg, args.data, args.category, registry, storage=store)
        det = Detector.load(registry, args.category, version)
        models[name] = det
        compare[name] = {**evaluate(det, args.data, args.category),
                         "train_seconds": time.perf_counter() - t0, "version": version,
                         "nfe": cfg.bridge.nfe, "sampler": cfg.bridge.sampler}
        log.info("%s: %s", name, compare[name])
    out["default_vs_tuned"] = compare
    out["tuned_config"] = to_dict(tuned_cfg)

    # 4. the smallest NFE within 0.5 AUROC points of the best
    det = models["tuned"]
    nfe_rows = {}
    for nfe in [int(n) for n in args.nfe.split(",")]:
        if nfe >= det.cfg.bridge.n_steps:
            continue
        nfe_rows[nfe] = {"pv": auroc_pair(det, pv_images, pv_labels, pv_masks, nfe=nfe),
                         "test": auroc_pair(det, test_images, test_labels, test_masks, nfe=nfe)}

    def smallest(split: str) -> dict:
        best = max(r[split]["image_auroc"] for r in nfe_rows.values())
        nfe = min(n for n, r in nfe_rows.items() if r[split]["image_auroc"] >= best - TOLERANCE)
        return {"best_image_auroc": best, "smallest_nfe_within_0.5": nfe,
                "image_auroc_at_that_nfe": nfe_rows[nfe][split]["image_auroc"]}

    done = [t for t in trials if t["status"] == "completed"]
    across = {}
    if done:
        best_pv = max(t["pv_image_auroc"] for t in done)
        close = [t for t in done if t["pv_image_auroc"] >= best_pv - TOLERANCE]
        across = {"best_pv_image_auroc": best_pv,
                  "smallest_nfe_within_0.5": int(min(t["nfe"] for t in close))}
    out["nfe"] = {"tuned_model": {str(k): v for k, v in nfe_rows.items()},
                  "tuned_model_pv": smallest("pv"), "tuned_model_test": smallest("test"),
                  "across_trials_pv": across}

    # report
    print(f"\n{args.category}: {summary['n_trials']} trials in {summary['search_seconds']:.0f} s "
          f"({summary['n_completed']} completed, {summary['n_stopped_early']} stopped early, "
          f"{summary['n_errors']} failed); best trial {summary['best']['trial_id']}: "
          f"{json.dumps(summary['best_params'])}")
    print("\nper trial (last checkpoint; pseudo-validation on the full fixed set):")
    print(f"{'trial':<10} {'status':<10} {'nfe':>4} {'sampler':<11} {'pv img':>7} {'test img':>8} "
          f"{'pv pix':>7} {'test pix':>8}")
    for r in sorted(rows, key=lambda r: -r["pv_image_auroc"]):
        print(f"{r['trial_id']:<10} {r['status']:<10} {r['nfe']:>4} {r['sampler']!s:<11} "
              f"{100 * r['pv_image_auroc']:7.1f} {100 * r['test_image_auroc']:8.1f} "
              f"{100 * r['pv_pixel_auroc']:7.1f} {100 * r['test_pixel_auroc']:8.1f}")
    for level, a in agreement.items():
        print(f"{level} AUROC, pseudo-val vs test: Spearman {a['spearman']:+.2f}, Kendall "
              f"{a['kendall']:+.2f}; pseudo-val's pick scores {100 * a['pv_pick_test_auroc']:.1f} "
              f"on test (test-best {100 * a['test_best_auroc']:.1f})")
    print("\ntest split, trained by lasb train:")
    print(f"{'config':<8} {'img AUROC':>9} {'pix AUROC':>9} {'AUPRO':>6} {'ms/img':>7} "
          f"{'nfe':>4} {'train s':>8}")
    for name, r in compare.items():
        print(f"{name:<8} {100 * r['image_auroc']:9.1f} {100 * r['pixel_auroc']:9.1f} "
              f"{100 * r['aupro']:6.1f} {r['ms_per_image']:7.1f} {r['nfe']:>4} "
              f"{r['train_seconds']:8.0f}")
    print("\ntuned model by NFE (image AUROC): "
          + ", ".join(f"NFE {n}: pv {100 * r['pv']['image_auroc']:.1f} / test "
                      f"{100 * r['test']['image_auroc']:.1f} ({r['test']['ms_per_image']:.0f} ms)"
                      for n, r in nfe_rows.items()))
    for key in ("tuned_model_pv", "tuned_model_test", "across_trials_pv"):
        print(f"smallest NFE within 0.5 points of the best ({key}): {out['nfe'][key]}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    path = results / f"tuning-{'smoke-' if args.smoke else ''}{args.stamp}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
