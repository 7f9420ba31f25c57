"""`lasb score`: Ray Data batch scoring on local Ray, local folders and moto S3.

Mixed categories (two published models), broken files, an unknown category, Parquet shards,
a SIGKILLed real subprocess resumed to exactly one row per input, and scores equal to calling
Detector.predict in-process on the same images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import score as score_job
from lasb import artifacts, storage
from lasb.cli import build_parser
from lasb.cli import main as lasb_main
from lasb.data import decode_image, load_image

REPO = Path(__file__).resolve().parents[1]
OTHER = "other_texture"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def registry(tiny_model, tmp_path_factory):
    """demo_texture (the tiny model) + other_texture (same networks, its own calibration)."""
    reg = str(tmp_path_factory.mktemp("score_registry"))
    folder, version = artifacts.fetch(tiny_model["registry"], tiny_model["category"])
    staging = tmp_path_factory.mktemp("staging")
    for name in ("codec", "denoiser"):
        shutil.copytree(folder / name, staging / name)
    for name in ("config.yaml", "calibration.json", "metrics.json"):
        shutil.copy(folder / name, staging / name)
    artifacts.publish(staging, reg, "demo_texture", version)
    cal = json.loads((staging / "calibration.json").read_text())
    span = cal["score_max"] - cal["score_min"]
    cal["threshold"] -= 0.25 * span  # another category's model: other scores, other labels
    cal["score_min"] -= 0.5 * span
    (staging / "calibration.json").write_text(json.dumps(cal))
    other_version = artifacts.publish(staging, reg, OTHER)
    return {"path": reg, "versions": {"demo_texture": version, OTHER: other_version}}


@pytest.fixture(scope="module")
def lake(tiny_model, tmp_path_factory):
    """IN/<category>/... with good and defective images of two categories plus bad files."""
    from lasb.demo_data import make_demo_category

    root = tmp_path_factory.mktemp("lake")
    demo = Path(tiny_model["data"]) / "demo_texture" / "test"
    picks = sorted(demo.glob("good/*.png"))[:3] + sorted(demo.glob("*/*.png"))[-3:]
    (root / "demo_texture").mkdir()
    for i, p in enumerate(picks):
        shutil.copy(p, root / "demo_texture" / f"{i:02d}_{p.parent.name}.png")
    wide = load_image(str(picks[-1]))
    wide = np.concatenate([wide, wide[:, :8]], axis=1)  # 40 x 32: maps at input size
    (root / "demo_texture" / "wide.png").write_bytes(_png(wide))
    other = make_demo_category(str(tmp_path_factory.mktemp("other")), OTHER, size=32, n_train=1,
                               n_test_good=2, n_test_defect=3, seed=1, texture="brick")
    (root / OTHER / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted(Path(other, "test").glob("*/*.png"))):
        shutil.copy(p, root / OTHER / "sub" / f"{i:02d}.png")
    good = (root / "demo_texture" / "00_good.png").read_bytes()
    bad = root / "demo_texture"
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "text.jpg").write_bytes(b"not an image, just text\n" * 10)
    (bad / "huge.png").write_bytes(_png(np.zeros((80, 80, 3), np.uint8)))  # > --max-pixels
    (root / "cable").mkdir()
    (root / "cable" / "x.png").write_bytes(good)  # no model for this category
    (root / "loose.png").write_bytes(good)  # no category folder
    (root / "notes.txt").write_text("not an image extension: not listed")
    return root


EXPECTED_ERRORS = {"empty.png": "empty file", "truncated.png": "truncated or corrupt image data",
                   "text.jpg": "not an image", "huge.png": "image too large",
                   "x.png": "unknown category", "loose.png": "no category"}


def _table(out: str) -> pa.Table:
    fs, root = storage.filesystem(out)
    parts = sorted(p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def _check_against_detector(rows: list[dict], registry: dict, read) -> None:
    """Scores of the job == Detector.predict in-process on the same bytes, per category."""
    from lasb.detector import Detector

    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        if r["error"] is None:
            by_cat.setdefault(r["category"], []).append(r)
    assert set(by_cat) == {"demo_texture", OTHER}
    for cat, group in by_cat.items():
        det = Detector.load(registry["path"], cat)
        preds = det.predict([decode_image(read(r["uri"]), r["uri"]) for r in group],
                            return_maps=False)
        for r, p in zip(group, preds):
            assert r["model_version"] == registry["versions"][cat] == p["model_version"]
            np.testing.assert_allclose(r["raw_score"], p["raw_score"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(r["pred_score"], p["pred_score"], rtol=1e-5, atol=1e-6)
            assert r["pred_label"] == p["pred_label"] and r["threshold"] == p["threshold"]


def _check_errors(rows: list[dict]) -> None:
    for r in rows:
        name = r["uri"].rsplit("/", 1)[-1]
        if name in EXPECTED_ERRORS:
            assert r["error"].startswith(EXPECTED_ERRORS[name]), r
            assert r["pred_score"] is None and r["raw_score"] is None and r["pred_label"] is None
        else:
            assert r["error"] is None, r
            assert 0.0 <= r["pred_score"] <= 1.0


# -- units ------------------------------------------------------------------------------------
def test_category_pattern_and_partition_ids_are_deterministic():
    rx = score_job.category_regex("{category}/")
    assert rx.search("bottle/test/good/000.png").group("category") == "bottle"
    assert rx.search("loose.png") is None
    rx = score_job.category_regex("lake/*/{category}/")
    assert rx.search("x/lake/2024/cable/a.png").group("category") == "cable"
    with pytest.raises(ValueError, match="category"):
        score_job.category_regex("no-placeholder/")
    listing = score_job.Listing("images", [f"/d/{i:03d}.png" for i in range(10)], [], [])
    a = score_job.make_partitions(listing, 4)
    assert [len(p.rows) for p in a] == [4, 4, 2]
    assert [p.pid for p in a] == [p.pid for p in score_job.make_partitions(listing, 4)]
    assert len({p.pid for p in a}) == 3
    assert score_job.parse_versions("a=v1,b=v2") == ("latest", {"a": "v1", "b": "v2"})
    assert score_job.error_kind("image too large: 1 x 2") == "image too large"


def test_storage_honours_the_endpoint_override(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem("s3://bucket/a/b")
    assert path == "bucket/a/b"
    assert fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:9"}
    pafs, path = storage.pyarrow_filesystem("s3://bucket/a")
    assert path == "bucket/a" and pafs.type_name == "s3"
    assert storage.worker_env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert not any("SECRET" in k or "KEY_ID" in k for k in storage.worker_env())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    assert storage.s3_endpoint() == "http://127.0.0.1:10"


# -- local folders ----------------------------------------------------------------------------
def test_local_lake_mixed_categories_bad_files_maps(ray_local, registry, lake, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["score", "--input", str(lake), "--registry", registry["path"], "--output", out,
            "--category-from", "{category}/", "--maps", "all", "--partition-size", "4",
            "--batch-size", "4", "--max-pixels", "3000"]
    assert lasb_main(args) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "partitions committed" in printed  # progress + summary

    table = pq.read_table(out)  # the output folder reads as one table (metadata is hidden)
    assert table.schema.names[:8] == ["uri", "category", "model_version", "pred_score",
                                      "raw_score", "threshold", "pred_label", "error"]
    rows = table.to_pylist()
    listed = sorted(str(p) for p in lake.rglob("*.png")) + [str(lake / "demo_texture/text.jpg")]
    assert sorted(r["uri"] for r in rows) == sorted(listed)  # every image once, .txt not listed
    _check_errors(rows)
    _check_against_detector(rows, registry, lambda uri: Path(uri).read_bytes())

    for r in rows:  # --maps all: a map and a mask at the input's resolution per scored image
        if r["error"] is None:
            size = Image.open(r["uri"]).size
            amap, mask = Image.open(r["map_path"]), Image.open(r["mask_path"])
            assert amap.size == size and mask.size == size
            assert set(np.unique(np.array(mask))) <= {0, 255}
            assert Path(r["map_path"]).is_relative_to(Path(out) / "_maps" / r["category"])
        else:
            assert r["map_path"] is None

    summary = json.loads((Path(out) / "_summary.json").read_text())
    assert summary["rows"] == len(rows) and summary["errors"] == len(EXPECTED_ERRORS)
    assert summary["errors_by_reason"] == {k: 1 for k in EXPECTED_ERRORS.values()}
    assert summary["anomalies"] == sum(r["pred_label"] == 1 for r in rows)
    assert summary["images_per_s"] > 0 and summary["skipped_non_image_files"] == 1
    assert summary["models"]["demo_texture"] == registry["versions"]["demo_texture"]
    assert summary["models"][OTHER] == registry["versions"][OTHER]
    assert summary["models"]["cable"].startswith("unknown category")

    # a rerun of a finished job commits nothing new; another job cannot reuse the output
    again = score_job.run(score_job.options_from_args(build_parser().parse_args(args)))
    assert again["partitions_skipped"] == summary["partitions"] and again["images_this_run"] == 0
    assert pq.read_table(out).num_rows == len(rows)
    code = lasb_main(["score", "--input", str(lake / "demo_texture"), "--registry",
                      registry["path"], "--output", out, "--category", "demo_texture"])
    assert code == 2 and "another scoring job" in capsys.readouterr().err


def test_parquet_shards_with_category_column(ray_local, registry, lake, tmp_path):
    images = sorted(lake.glob("demo_texture/0*.png"))[:4] + sorted(lake.glob(f"{OTHER}/sub/*"))
    shards = tmp_path / "shards"
    shards.mkdir()
    uris = []
    for k, chunk in enumerate((images[:5], images[5:])):
        rows = [{"image": p.read_bytes(), "uri": f"lake://{p.relative_to(lake)}",
                 "category": p.relative_to(lake).parts[0]} for p in chunk]
        rows[0]["image"] = b"" if k == 0 else rows[0]["image"]  # one empty image
        uris += [r["uri"] for r in rows]
        pq.write_table(pa.Table.from_pylist(rows), shards / f"shard-{k}.parquet", row_group_size=2)
    # metadata beside the shards, as `lasb ingest` writes it: not input rows
    pq.write_table(pa.table({"uri": ["x"], "reason": ["empty"]}), shards / "_rejects.parquet")
    (shards / "_summary.json").write_text("{}")
    summary = score_job.run(score_job.ScoreOptions(
        input=str(shards), registry=registry["path"], output=str(tmp_path / "out"),
        partition_size=3, batch_size=4))
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(uris)
    assert summary["errors_by_reason"] == {"empty file": 1}
    payload = {f"lake://{p.relative_to(lake)}": p.read_bytes() for p in images}
    _check_against_detector([r for r in rows if r["error"] is None], registry, payload.__getitem__)


# -- S3 (moto) -------------------------------------------------------------------------------
def test_s3_lake_registry_and_output(ray_local, s3_server, registry, lake):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket="lake")
    fs, _ = storage.filesystem("s3://lake")
    fs.put(str(lake) + "/", "lake/in/", recursive=True)
    fs.put(registry["path"] + "/", "lake/registry/", recursive=True)
    s3_registry = {"path": "s3://lake/registry", "versions": registry["versions"]}
    summary = score_job.run(score_job.ScoreOptions(
        input="s3://lake/in", registry=s3_registry["path"], output="s3://lake/out",
        category_from="{category}/", partition_size=5, batch_size=8, max_pixels=3000))
    rows = _table("s3://lake/out").to_pylist()
    n_images = len(list(lake.rglob("*.png"))) + 1
    assert len(rows) == len({r["uri"] for r in rows}) == n_images == summary["rows"]
    assert all(r["uri"].startswith("s3://lake/in/") for r in rows)
    _check_errors(rows)
    _check_against_detector(rows, s3_registry, lambda uri: storage.filesystem(uri)[0].cat_file(
        uri))
    assert fs.exists("lake/out/_summary.json") and fs.exists("lake/out/_job.json")


# -- crash and resume --------------------------------------------------------------------------
def test_sigkilled_job_resumes_to_exactly_one_row_per_input(ray_local, registry, lake, tmp_path):
    import ray

    src = lake / "demo_texture"
    big = tmp_path / "in"
    big.mkdir()
    n = 0
    for rep in range(8):  # 8 copies of the category's 7 good images = 56 inputs
        for p in sorted(src.glob("0*.png")) + [src / "wide.png"]:
            shutil.copy(p, big / f"r{rep}_{p.name}")
            n += 1
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lasb.cli", "score", "--input", str(big), "--registry",
           registry["path"], "--output", str(out), "--category", "demo_texture",
           "--partition-size", "2", "--batch-size", "2", "--maps", "all",
           "--address", ray.get_runtime_context().gcs_address]
    log = open(tmp_path / "job.log", "wb")  # noqa: SIM115 - a file, not a pipe that can fill up
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    commits = out / "_commits"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if commits.is_dir() and len(list(commits.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    done = len(list(commits.glob("*.json")))
    n_parts = (n + 1) // 2
    assert 3 <= done < n_parts, "the job was not killed partway"
    assert not (out / "_summary.json").exists()

    summary = score_job.run(score_job.ScoreOptions(
        input=str(big), registry=registry["path"], output=str(out), category="demo_texture",
        partition_size=2, batch_size=2, maps="all"))
    assert summary["partitions_skipped"] == done
    assert summary["partitions_written"] == n_parts - done
    uris = [r["uri"] for r in pq.read_table(out).to_pylist()]
    assert sorted(uris) == sorted(str(p) for p in big.iterdir())  # every input once, none twice
    assert len(list(commits.glob("*.json"))) == n_parts
