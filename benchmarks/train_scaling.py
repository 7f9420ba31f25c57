"""Training throughput: a plain in-process loop vs Ray Train with 1 and 2 workers, one run.

    .venv/bin/python benchmarks/train_scaling.py [--codec-steps 40] [--bridge-steps 120]
        [--configs preloaded,inline,ray1,ray2] [key=value ...]

All configurations train the same `cpu` preset (128 px) for the same number of steps on the
same generated category, one after the other, each in a fresh subprocess (so no configuration
inherits another's threads or Ray processes; Ray is started only for the Ray ones):

- `preloaded`: `lasb.train.train_models` in-process on pairs made before the clock starts
  (pre-loaded tensors: no data work while training);
- `inline`: the same loop making the pairs in-process as it goes (`lasb.pairs.iterate_pairs`);
- `ray1`: `jobs.train.fit` (the path of `lasb train`) with 1 worker, fed by the Ray Data stream
  (DRAEM augmentation in `map_batches` on a separate CPU task);
- `ray2`: the same with 2 DDP workers (gloo), 1 CPU and 1 torch thread each; its global batch is
  twice as large, so samples/s is the figure to compare.

Per stage, seconds per step is the mean over the steps after the first `--warmup` steps (taken
from the loop's own progress entries). Targets: ray1 within 10% of the plain loop (issue 4);
the Ray Data stream costs <= 15% against pre-loaded tensors (issue 3).
Prints a table; writes benchmarks/results/train_scaling-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch

log = logging.getLogger("lasb.benchmark")


def stage_rates(history: list[dict], warmup: int) -> dict:
    """Seconds per step per stage after `warmup` steps, from cumulative sec_per_step entries."""
    out = {}
    for stage in ("codec", "bridge"):
        entries = [e for e in history if e.get("stage") == stage]
        if not entries:
            continue
        last = entries[-1]
        first = next((e for e in entries if e["step"] >= warmup), entries[0])
        if last["step"] > first["step"]:
            secs = last["sec_per_step"] * last["step"] - first["sec_per_step"] * first["step"]
            out[stage] = secs / (last["step"] - first["step"])
        else:
            out[stage] = last["sec_per_step"]
    return out


def in_process(cfg, images, preloaded: bool) -> list[dict]:
    from jobs.train import stream_rows
    from lasb.pairs import iterate_pairs
    from lasb.train import train_models

    torch.set_num_threads(cfg.train.torch_threads or 1)
    stream = iterate_pairs(images, stream_rows(cfg), cfg.train.batch_size, cfg.augment,
                           cfg.train.seed)
    if preloaded:
        stream = iter(list(stream))
    return train_models(cfg, stream).history


def under_ray(cfg, images, workers: int) -> list[dict]:
    from dataclasses import replace

    from jobs.train import fit

    torch.set_num_threads(1)  # the driver only waits; leave the cores to the workers
    threads = max(1, cfg.train.torch_threads // workers)
    cfg = replace(cfg, train=replace(cfg.train, workers=workers, cpus_per_worker=1.0,
                                     torch_threads=threads, checkpoint_every=0))
    with tempfile.TemporaryDirectory() as storage:
        result = fit(cfg, images, storage, f"scaling{workers}")
        with result.checkpoint.as_directory() as folder:
            return json.loads((Path(folder) / "history.json").read_text())


def run_one(name: str, cfg, warmup: int) -> dict:
    from jobs.common import init_ray
    from jobs.train import load_training_images
    from lasb.demo_data import make_demo_category

    with tempfile.TemporaryDirectory() as data:
        make_demo_category(data, "bench", size=cfg.data.image_size, n_train=64, n_test_good=0,
                           n_test_defect=0, seed=0)
        images, _ = load_training_images(data, "bench", cfg)
        t0 = time.perf_counter()
        if name in ("preloaded", "inline"):
            history = in_process(cfg, images, preloaded=name == "preloaded")
            workers = 1
        else:
            workers = int(name.removeprefix("ray"))
            init_ray(num_cpus=workers + 1)  # workers + one data task, logically
            history = under_ray(cfg, images, workers)
    rates = stage_rates(history, warmup)
    global_batch = cfg.train.batch_size * workers
    return {"config": name, "workers": workers, "global_batch": global_batch,
            "wall_s": time.perf_counter() - t0,
            **{f"{k}_s_per_step": v for k, v in rates.items()},
            **{f"{k}_samples_per_s": global_batch / v for k, v in rates.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--codec-steps", type=int, default=40)
    p.add_argument("--bridge-steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--configs", default="preloaded,inline,ray1,ray2")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from lasb.config import load_config, to_dict

    cfg = load_config("cpu", None, [f"codec.steps={args.codec_steps}",
                                    f"denoiser.steps={args.bridge_steps}",
                                    "train.log_every=10", *args.overrides])
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, cfg, args.warmup)))
        return 0
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--codec-steps", str(args.codec_steps),
               "--bridge-steps", str(args.bridge_steps), "--warmup", str(args.warmup),
               *args.overrides]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        row = json.loads(next(line for line in done.stdout.splitlines()
                              if line.startswith("ROW "))[4:])
        log.info("%s", row)
        rows.append(row)

    base = {r["config"]: r for r in rows}
    ratios = {}
    for ref in ("preloaded", "inline"):
        for other in ("ray1", "ray2", "inline"):
            if ref in base and other in base and ref != other:
                for stage in ("codec", "bridge"):
                    key = f"{stage}_samples_per_s"
                    if key in base[ref] and key in base[other]:
                        ratios[f"{other}/{ref} {stage}"] = base[other][key] / base[ref][key]
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__, "gpu": torch.cuda.is_available()},
              "load_average_before_after": [load_before, os.getloadavg()[0]],
              "config": to_dict(cfg), "rows": rows, "throughput_ratios": ratios}
    print(f"\n{'config':<10} {'workers':>7} {'batch':>5} {'codec s/step':>12} "
          f"{'bridge s/step':>13} {'codec img/s':>11} {'bridge img/s':>12} {'wall s':>7}")
    for r in rows:
        print(f"{r['config']:<10} {r['workers']:>7} {r['global_batch']:>5} "
              f"{r.get('codec_s_per_step', float('nan')):>12.3f} "
              f"{r.get('bridge_s_per_step', float('nan')):>13.3f} "
              f"{r.get('codec_samples_per_s', float('nan')):>11.1f} "
              f"{r.get('bridge_samples_per_s', float('nan')):>12.1f} {r['wall_s']:>7.0f}")
    for k, v in ratios.items():
        print(f"throughput {k}: {v:.2f}")
    print(f"load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train_scaling-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
