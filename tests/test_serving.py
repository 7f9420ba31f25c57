"""The Ray Serve scoring app, started once through `lasb serve`'s own code on 127.0.0.1.

Two real tiny categories (demo_texture from the session fixture, other_texture trained here
in-process) and a third one whose artifact we corrupt and repair. Answers are compared with
Detector.predict in this process.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from lasb import artifacts
from lasb.data import list_samples

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 64 * 1024
MAX_PIXELS = 256 * 256
SCORE = "/v1/categories/{}/score"


def _train_tiny(root: str, category: str, registry: str) -> str:
    """The tiny preset trained in-process (no Ray: faster) and published like `lasb train`."""
    from jobs.train import load_training_images, publish_trained, stream_rows
    from lasb.config import load_config
    from lasb.pairs import iterate_pairs
    from lasb.train import save_models, train_models

    cfg = load_config("tiny", overrides=["codec.steps=30", "denoiser.steps=40"])
    images, holdout = load_training_images(root, category, cfg)
    batches = iterate_pairs(images, stream_rows(cfg), cfg.train.batch_size, cfg.augment,
                            cfg.train.seed)
    models = train_models(cfg, batches)
    with tempfile.TemporaryDirectory() as tmp:
        save_models(tmp, models, cfg)
        return publish_trained(tmp, cfg, holdout, registry, category)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> str:
    from lasb.demo_data import make_demo_category

    data = str(tmp_path_factory.mktemp("other_data"))
    make_demo_category(data, "other_texture", size=32, n_train=48, n_test_good=4,
                       n_test_defect=6, seed=1, texture="brick")
    return data


@pytest.fixture(scope="module")
def registry(tiny_model, other_data, tmp_path_factory) -> Path:
    """demo_texture (copied), other_texture (trained here), broken_texture (to corrupt)."""
    reg = tmp_path_factory.mktemp("serve_registry")
    shutil.copytree(Path(tiny_model["registry"]) / "demo_texture", reg / "demo_texture")
    _train_tiny(other_data, "other_texture", str(reg))
    src, _ = artifacts.fetch(str(reg), "demo_texture")
    artifacts.publish(src, str(reg), "broken_texture")  # publish skips the old manifest
    return reg


@pytest.fixture(scope="module")
def images(tiny_model, other_data) -> dict[str, list[bytes]]:
    """Encoded test images per category, as a client would send them."""
    out = {}
    for cat, root in (("demo_texture", tiny_model["data"]), ("other_texture", other_data)):
        samples = list_samples(root, cat, "test")
        out[cat] = [Path(s.path).read_bytes() for s in samples[-4:]]
    return out


@pytest.fixture(scope="module")
def detectors(registry):
    from lasb.detector import Detector

    return {c: Detector.load(str(registry), c) for c in ("demo_texture", "other_texture")}


@pytest.fixture(scope="module")
def server(ray_local, registry, tmp_path_factory):
    from ray import serve

    from lasb.cli import build_parser
    from serve import cli as serve_cli

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = build_parser().parse_args([
        "serve", "--registry", str(registry), "--port", str(port), "--token-file",
        str(token_file), "--max-batch-size", "8", "--batch-wait-ms", "200",
        "--models-per-replica", "2", "--max-body-mb", str(MAX_BODY / 2**20),
        "--max-pixels", str(MAX_PIXELS)])
    assert args.func is serve_cli.main
    url = serve_cli.start(args)
    yield url
    serve.delete(serve_cli.APP_NAME)
    serve.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _from_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.array(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def _assert_clean_error(r: httpx.Response, status: int, *fragments: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail"}, body
    assert "Traceback" not in r.text and 'File "' not in r.text
    for f in fragments:
        assert f in str(body["detail"]), body


# -- health, auth, listing, docs ----------------------------------------------------------

def test_health_and_readiness_need_no_token(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_a_bearer_token_is_required(client, images):
    img = images["demo_texture"][0]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = client.post(SCORE.format("demo_texture"), content=img,
                        headers={**headers, "Content-Type": "image/png"})
        _assert_clean_error(r, 401, "bearer token")
        assert r.headers["www-authenticate"] == "Bearer"
        _assert_clean_error(client.get("/v1/models", headers=headers), 401)


def test_models_lists_categories_and_versions(client, registry):
    models = {m["category"]: m for m in client.get("/v1/models", headers=AUTH).json()["models"]}
    assert set(models) == {"demo_texture", "other_texture", "broken_texture"}
    for cat, m in models.items():
        assert m["latest"] == artifacts.resolve_version(str(registry), cat)
        assert m["versions"] == [m["latest"]]


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/categories/{category}/score"]["post"]
    assert {"image/png", "application/octet-stream", "multipart/form-data",
            "application/json"} <= set(op["requestBody"]["content"])
    assert {"401", "404", "413", "415", "422", "503"} <= set(op["responses"])
    assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()
    assert {"/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


# -- scoring ------------------------------------------------------------------------------

def test_raw_multipart_and_json_bodies_give_detector_predict_answers(client, images, detectors):
    data = images["demo_texture"][-1]
    image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    wide = np.concatenate([image, image[:, :8]], axis=1)  # the map comes back at input size
    for im in (image, wide):
        expected = detectors["demo_texture"].predict([im])[0]
        body = _png(im)
        responses = [
            client.post(SCORE.format("demo_texture"), content=body,
                        params={"return_map": True, "return_mask": True},
                        headers={**AUTH, "Content-Type": "image/png"}),
            client.post(SCORE.format("demo_texture"), files={"image": ("x.png", body)},
                        params={"return_map": "true", "return_mask": "true"}, headers=AUTH),
            client.post(SCORE.format("demo_texture"), headers=AUTH, json={
                "image": base64.b64encode(body).decode(), "return_map": True,
                "return_mask": True}),
        ]
        for r in responses:
            assert r.status_code == 200, r.text
            got = r.json()
            for key in ("pred_label", "category", "model_version", "threshold"):
                assert got[key] == expected[key], key
            for key in ("pred_score", "raw_score"):
                assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
            assert got["batch_size"] >= 1
            amap = _from_data_url(got["anomaly_map"])
            assert amap.shape == im.shape[:2] and amap.dtype == np.uint8
            assert np.abs(amap / 255.0 - expected["anomaly_map"]).max() <= 0.5 / 255 + 1e-4
            mask = _from_data_url(got["pred_mask"])
            assert ((mask == 255) == expected["pred_mask"]).mean() > 0.999
    # maps are only sent when asked for
    r = client.post(SCORE.format("demo_texture"), content=data,
                    headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and "anomaly_map" not in r.json()
    assert "pred_mask" not in r.json()


def test_concurrent_requests_to_two_categories_get_their_own_model_and_batch(
        server, images, detectors):
    jobs = [(cat, i) for i in range(4) for _ in range(2)
            for cat in ("demo_texture", "other_texture")]
    expected = {cat: detectors[cat].predict(
        [np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[cat]],
        return_maps=False) for cat in detectors}

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=60) as c:
            return await asyncio.gather(*[
                c.post(SCORE.format(cat), content=images[cat][i],
                       headers={**AUTH, "Content-Type": "image/png"}) for cat, i in jobs])

    responses = asyncio.run(run())
    sizes = []
    for (cat, i), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        got, want = r.json(), expected[cat][i]
        assert got["category"] == cat and got["model_version"] == want["model_version"]
        assert got["raw_score"] == pytest.approx(want["raw_score"], rel=1e-4, abs=1e-6)
        assert got["pred_score"] == pytest.approx(want["pred_score"], rel=1e-4, abs=1e-6)
        sizes.append(got["batch_size"])
    # the two models really differ, so a mixed-up answer would have been caught above
    assert detectors["demo_texture"].version != detectors["other_texture"].version
    assert max(sizes) >= 2, sizes  # requests shared a model call
    assert max(sizes) <= 8, sizes  # max_batch_size


# -- bad requests -------------------------------------------------------------------------

def test_category_names_are_validated(client, images):
    img = images["demo_texture"][0]
    headers = {**AUTH, "Content-Type": "image/png"}
    for name in ("a..b", ".env", "x" * 200):
        _assert_clean_error(client.post(SCORE.format(name), content=img, headers=headers),
                            400, "invalid category name")
    # an encoded '/' never reaches the handler as part of a name
    r = client.post("/v1/categories/..%2F..%2Fetc/score", content=img, headers=headers)
    assert r.status_code == 404 and "Traceback" not in r.text
    _assert_clean_error(client.post(SCORE.format("cable"), content=img, headers=headers),
                        404, "unknown category 'cable'")


def test_unsupported_media_type_is_415(client, images):
    img = images["demo_texture"][0]
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        r = client.post(SCORE.format("demo_texture"), content=img,
                        headers={**AUTH, "Content-Type": ctype})
        _assert_clean_error(r, 415, "unsupported Content-Type")
    r = client.post(SCORE.format("demo_texture"), content=img, headers=AUTH)  # no type
    _assert_clean_error(r, 415)


def test_size_limits_are_413(client):
    headers = {**AUTH, "Content-Type": "image/png"}
    big = np.random.default_rng(0).integers(0, 256, (MAX_BODY + 1000,), dtype=np.uint8).tobytes()
    _assert_clean_error(client.post(SCORE.format("demo_texture"), content=big, headers=headers),
                        413, "exceeds the limit")

    def chunked():  # no Content-Length: the limit holds while streaming
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    _assert_clean_error(client.post(SCORE.format("demo_texture"), content=chunked(),
                                    headers=headers), 413, "exceeds the limit")
    wide = _png(np.zeros((300, 300, 3), np.uint8))  # small file, too many pixels
    assert len(wide) < MAX_BODY
    _assert_clean_error(client.post(SCORE.format("demo_texture"), content=wide, headers=headers),
                        413, "image too large")


def test_undecodable_images_are_422_with_the_reason(client, images):
    png = images["demo_texture"][0]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(buf, format="PNG")
    cases = [(b"", "empty"), (b"definitely not an image", "not an image"),
             (png[:60], "truncated"), (buf.getvalue(), "16-bit")]
    for body, reason in cases:
        r = client.post(SCORE.format("demo_texture"), content=body,
                        headers={**AUTH, "Content-Type": "image/png"})
        _assert_clean_error(r, 422, "cannot decode image", reason)
    r = client.post(SCORE.format("demo_texture"), headers=AUTH, files={"other": ("x", png)})
    _assert_clean_error(r, 422, "field named 'image'")
    r = client.post(SCORE.format("demo_texture"), headers=AUTH, json={"image": "@@not base64"})
    _assert_clean_error(r, 422, "base64")
    r = client.post(SCORE.format("demo_texture"), headers=AUTH, json={"picture": "x"})
    _assert_clean_error(r, 422, "invalid JSON body")
    r = client.post(SCORE.format("demo_texture"), content=png, params={"return_map": "maybe"},
                    headers={**AUTH, "Content-Type": "image/png"})
    _assert_clean_error(r, 422, "return_map")
    r = client.post(SCORE.format("demo_texture"), content=b"{not json",
                    headers={**AUTH, "Content-Type": "application/json"})
    _assert_clean_error(r, 422, "invalid JSON body")


def test_a_model_that_fails_to_load_is_503_until_repaired(client, images, registry):
    version = artifacts.resolve_version(str(registry), "broken_texture")
    target = registry / "broken_texture" / version / "calibration.json"
    good = target.read_bytes()
    target.write_bytes(good + b" ")  # the manifest's sha256 no longer matches
    headers = {**AUTH, "Content-Type": "image/png"}
    try:
        for _ in range(2):  # a failed load is not cached: every request retries it
            r = client.post(SCORE.format("broken_texture"), content=images["demo_texture"][0],
                            headers=headers)
            _assert_clean_error(r, 503, "could not be loaded", "sha256")
            assert str(registry) not in r.text  # no server paths in answers
            assert r.headers["retry-after"]
    finally:
        target.write_bytes(good)
    r = client.post(SCORE.format("broken_texture"), content=images["demo_texture"][0],
                    headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["category"] == "broken_texture"
    # with 2 models per replica, demo_texture may have been evicted: it loads again
    r = client.post(SCORE.format("demo_texture"), content=images["demo_texture"][0],
                    headers=headers)
    assert r.status_code == 200, r.text


# -- configuration ------------------------------------------------------------------------

def test_cluster_config_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs, build_app

    path = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)  # what `serve deploy` checks first
    (app,) = raw["applications"]
    assert app["import_path"] == "serve.app:build_app"
    assert build_app(app["args"]) is not None
    AppArgs.model_validate(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Scorer", "Ingress"}  # unknown names fail only at deploy time
    scorer = deployments["Scorer"]
    assert scorer["ray_actor_options"]["num_gpus"] == 1
    assert scorer["max_ongoing_requests"] >= scorer["user_config"]["max_batch_size"]


def test_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from serve.auth import load_token

    monkeypatch.delenv("LASB_SERVE_TOKEN", raising=False)
    assert load_token(None) is None
    monkeypatch.setenv("LASB_SERVE_TOKEN", "from-env")
    assert load_token(None) == "from-env"
    f = tmp_path / "t"
    f.write_text("from-file\n")
    assert load_token(str(f)) == "from-file"  # the file wins
    f.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_token(str(f))
    with pytest.raises(ValueError, match="cannot read"):
        load_token(str(tmp_path / "missing"))
