"""lasb tune: search space file, Pareto maths, and tiny searches on the local Ray cluster.

The searches run on a data root that holds only `train/` (a symlink): proof that tuning never
opens the test split.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from lasb.config import ConfigError, load_config
from lasb.tuning import (
    budget_objective,
    load_space,
    pareto_front,
    parse_space,
    trial_config,
)

ROOT = Path(__file__).resolve().parent.parent
CATEGORY = "demo_texture"
# tiny and quick: 10 codec steps (shared by all trials), 30 bridge steps, reports at 10 and 20
TINY = ["--preset", "tiny", "codec.steps=10", "denoiser.steps=30", "train.log_every=10"]


# --------------------------------------------------------------------------- no Ray


def test_default_space_covers_the_issue_and_converts_to_optuna():
    from ray.tune.search.optuna import OptunaSearch

    from jobs.tune import tune_space

    space, raw = load_space()
    assert space["bridge.beta_max"].kind == "loguniform"
    assert set(space["bridge.schedule"].args) == {"symmetric", "linear", "cosine"}
    assert space["bridge.n_steps"].kind == "choice"
    assert set(space["bridge.sampler"].args) == {"stochastic", "ot_ode"}
    assert list(space["bridge.nfe"].args) == [1, 2, 4, 8, 16]
    assert space["denoiser.lr"].kind == "loguniform"
    assert space["denoiser.block_out_channels"].encoded  # lists travel as YAML text
    dists = OptunaSearch.convert_search_space(tune_space(space))
    assert set(dists) == set(raw)
    assert dists["bridge.beta_max"].log and dists["denoiser.lr"].log


def test_any_config_key_can_be_searched_without_code_changes():
    space = parse_space({"augment.beta_min": {"uniform": [0.1, 0.5]},
                         "score.layers": {"choice": [[2, 4], [1, 2]]},
                         "denoiser.layers_per_block": {"int": [1, 2]},
                         "bridge.nfe": 3})  # a plain value: fixed for every trial
    cfg = trial_config(load_config("tiny"), space, {"augment.beta_min": 0.3,
                                                    "score.layers": "[1, 2]",
                                                    "denoiser.layers_per_block": 2.0})
    assert cfg.augment.beta_min == 0.3 and cfg.score.layers == (1, 2)
    assert cfg.denoiser.layers_per_block == 2 and cfg.bridge.nfe == 3


@pytest.mark.parametrize("raw, words", [
    ({"bridge.beta_maxx": {"uniform": [0.1, 1]}}, "beta_maxx"),
    ({"bridge.sampler": {"choice": ["stochastic", 3]}}, "bridge.sampler"),
    ({"data.image_size": {"choice": [32, 64]}}, "data.image_size"),
    ({"denoiser.lr": {"loguniform": [0, 1e-3]}}, "positive"),
    ({"denoiser.lr": {"normal": [0, 1]}}, "denoiser.lr"),
    ({"bridge.n_steps": {"int": [100, 10]}}, "low < high"),
])
def test_bad_search_spaces_fail_naming_the_key(raw, words):
    with pytest.raises(ConfigError, match=words):
        parse_space(raw)


def test_pareto_front_and_cost_budget():
    acc = np.array([0.90, 0.80, 0.95, 0.70, np.nan, 0.80])
    cost = np.array([10.0, 5.0, 20.0, 6.0, 1.0, 5.0])
    # 0.70@6 is dominated by 0.80@5; the two 0.80@5 points tie and both stay; NaN never
    assert pareto_front(acc, cost).tolist() == [True, True, True, False, False, True]
    assert budget_objective(0.8, 5.0, 10.0) == 0.8
    assert budget_objective(0.99, 20.0, 10.0) < -1 < budget_objective(0.0, 9.0, 10.0)
    assert budget_objective(0.99, 20.0, 10.0) < budget_objective(0.99, 15.0, 10.0)


# --------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def train_only(demo_data, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tune_train_only")
    (root / CATEGORY).mkdir()
    (root / CATEGORY / "train").symlink_to(f"{demo_data}/{CATEGORY}/train")
    return str(root)


def _lasb(*argv: str) -> int:
    from lasb.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def pareto_search(ray_local, train_only, tmp_path_factory):
    """4 trials, 2 at a time, multi-objective (AUROC vs ms/image), default search space."""
    assert [p.name for p in Path(train_only, CATEGORY).iterdir()] == ["train"]  # no test/
    work = tmp_path_factory.mktemp("tune_pareto")
    registry, store = str(work / "registry"), str(work / "runs")
    t0 = time.perf_counter()
    rc = _lasb("tune", "--data", train_only, "--category", CATEGORY, "--registry", registry,
               "--storage", store, "--trials", "4", "--concurrent", "2", "--seed", "3",
               "--objective", "pareto", "--probe-images", "4", *TINY)
    assert rc == 0
    return {"registry": registry, "storage": store, "seconds": time.perf_counter() - t0,
            "tuning": Path(registry) / CATEGORY / "tuning"}


def test_search_writes_best_config_trials_and_pareto_plot(pareto_search):
    tuning = pareto_search["tuning"]
    names = {p.relative_to(tuning).as_posix() for p in tuning.rglob("*") if p.is_file()}
    assert {"best.yaml", "trials.csv", "trials.parquet", "pareto.csv", "pareto.png",
            "summary.json"} <= names
    with Image.open(tuning / "pareto.png") as im:
        assert im.size[0] > 300
    csv = pd.read_csv(tuning / "trials.csv")
    assert len(csv) == 4 and len(pd.read_parquet(tuning / "trials.parquet")) == 4
    assert set(csv["status"]) <= {"completed", "stopped"}  # no trial failed
    summary = json.loads((tuning / "summary.json").read_text())
    assert summary["validation"]["n_holdout_normal"] == 12  # 25% of 48 training images
    assert summary["validation"]["val_source"] == "procedural textures"
    assert summary["validation"]["shared_codec"] is True
    front = csv[csv["pareto"]]
    assert len(front) >= 1 and {f"front/{t}.yaml" for t in front["trial_id"]} <= names


def test_trials_took_distinct_values_from_the_space(pareto_search):
    space, _ = load_space()
    csv = pd.read_csv(pareto_search["tuning"] / "trials.csv")
    keys = [k for k in space]
    combos = {tuple(row[k] for k in keys) for _, row in csv.iterrows()}
    assert len(combos) == 4  # every trial is a different point
    assert csv["bridge.beta_max"].nunique() == 4 and csv["denoiser.lr"].nunique() == 4
    for _, row in csv.iterrows():
        lo, hi = space["bridge.beta_max"].args
        assert lo <= row["bridge.beta_max"] <= hi
        assert row["bridge.schedule"] in space["bridge.schedule"].args
        assert row["bridge.nfe"] in space["bridge.nfe"].args
        assert yaml.safe_load(row["denoiser.block_out_channels"]) in \
            [list(v) for v in space["denoiser.block_out_channels"].args]


def test_best_config_is_loadable_and_used_by_train_tuned(pareto_search, monkeypatch):
    from jobs import train as train_job

    tuning = pareto_search["tuning"]
    summary = json.loads((tuning / "summary.json").read_text())
    cfg = load_config("cpu", tuning / "best.yaml")  # a complete config: the preset is moot
    params = summary["best_params"]
    assert cfg.bridge.beta_max == pytest.approx(params["bridge.beta_max"])
    assert cfg.bridge.nfe == params["bridge.nfe"] and cfg.bridge.sampler == params["bridge.sampler"]
    assert list(cfg.denoiser.block_out_channels) == params["denoiser.block_out_channels"]
    assert cfg.data.image_size == 32 and cfg.denoiser.steps == 30  # the tiny base + overrides
    assert summary["best"]["pareto"] and summary["best"]["completed"]
    assert cfg.codec.pretrained is None  # the search's shared codec does not leak out
    seen = {}
    monkeypatch.setattr(train_job, "run", lambda cfg, *a, **k: seen.setdefault("cfg", cfg) and "v1")
    assert _lasb("train", "--tuned", "--data", "unused", "--category", CATEGORY,
                 "--registry", pareto_search["registry"], "bridge.nfe=1") == 0
    assert seen["cfg"].bridge.beta_max == cfg.bridge.beta_max
    assert seen["cfg"].bridge.nfe == 1  # command-line overrides still apply on top


def test_trials_report_during_training_and_measure_cost(pareto_search):
    csv = pd.read_csv(pareto_search["tuning"] / "trials.csv")
    done = csv[csv["status"] == "completed"]
    assert len(done) >= 1
    assert (done["pv_images"] == 24).all()  # the full pseudo-validation set at the end
    assert done["ms_per_image"].gt(0).all() and done["pv_image_auroc"].between(0, 1).all()
    # per-report results: the progress reports (probe subset) came before the final one
    trial_dirs = [p for p in (Path(pareto_search["storage"]) / CATEGORY).iterdir()
                  if p.is_dir() and (p / "result.json").exists()]
    assert len(trial_dirs) == 4
    for d in trial_dirs:
        reports = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        assert reports[0]["step"] == 10 and reports[0]["pv_images"] == 8
        assert all("pv_image_auroc" in r and "ms_per_image" in r for r in reports)


def test_existing_search_is_not_overwritten(pareto_search, train_only, capsys):
    rc = _lasb("tune", "--data", train_only, "--category", CATEGORY, "--registry",
               pareto_search["registry"], "--storage", pareto_search["storage"], *TINY)
    assert rc == 2 and "--resume" in capsys.readouterr().err


def _finished_trials(exp: Path) -> dict[str, dict]:
    out = {}
    for d in exp.iterdir():
        path = d / "result.json"
        if d.is_dir() and path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if lines and lines[-1].get("completed"):
                out[lines[-1]["trial_id"]] = {"last": lines[-1], "text": path.read_text()}
    return out


def test_resume_after_interruption_keeps_finished_trials(ray_local, train_only, tmp_path):
    """Interrupt a search (SIGINT to `lasb tune`) after 2 of 3 trials, then --resume."""
    registry, store = str(tmp_path / "registry"), str(tmp_path / "runs")
    exp = Path(store) / CATEGORY
    args = ["tune", "--data", train_only, "--category", CATEGORY, "--registry", registry,
            "--storage", store, "--trials", "3", "--objective", "auroc",
            "--max-ms-per-image", "100000", "--early-stop", "none", "--probe-images", "4",
            *TINY]
    gcs = ray_local.get_runtime_context().gcs_address
    log_path = tmp_path / "interrupted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lasb.cli", *args, "--address", gcs],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None:
                if exp.exists() and len(_finished_trials(exp)) >= 2:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert len(_finished_trials(exp)) >= 2, log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log_path.read_text()
    assert rc == 3, output[-3000:]  # interrupted: nothing published yet
    assert "--resume" in output
    assert not (Path(registry) / CATEGORY / "tuning").exists()
    before = _finished_trials(exp)
    assert len(before) == 2, output[-3000:]

    assert _lasb("tune", "--category", CATEGORY, "--storage", store, "--resume") == 0
    after = _finished_trials(exp)
    assert len(after) == 3
    for trial_id, info in before.items():  # kept, not rerun: the same reports (timestamps too)
        assert after[trial_id]["text"] == info["text"]
    summary = json.loads((Path(registry) / CATEGORY / "tuning" / "summary.json").read_text())
    assert summary["n_trials"] == 3 and summary["n_completed"] == 3
    best = summary["best"]
    assert best["objective"] == max(t["last"]["objective"] for t in after.values())
    assert load_config("tiny", Path(registry) / CATEGORY / "tuning" / "best.yaml")


def test_several_workers_run_ray_train_inside_the_trial(ray_local, train_only, tmp_path):
    """--workers 2: each trial launches a TorchTrainer (DDP) and reports via TuneReportCallback."""
    registry, store = str(tmp_path / "registry"), str(tmp_path / "runs")
    rc = _lasb("tune", "--data", train_only, "--category", CATEGORY, "--registry", registry,
               "--storage", store, "--trials", "1", "--workers", "2", "--early-stop", "none",
               "--probe-images", "4", *TINY, "train.cpus_per_worker=0.5")
    assert rc == 0
    csv = pd.read_csv(Path(registry) / CATEGORY / "tuning" / "trials.csv")
    assert csv["status"].tolist() == ["completed"] and csv["pv_images"].tolist() == [24]
    runs = [p for p in (Path(store) / f"{CATEGORY}-train").iterdir() if p.is_dir()]
    assert len(runs) == 1  # the trial's own Ray Train run
    assert load_config("tiny", Path(registry) / CATEGORY / "tuning" / "best.yaml").train.workers == 2
