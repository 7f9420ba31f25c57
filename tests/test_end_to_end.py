"""Tiny preset trained through Ray Train on generated data, published, loaded and evaluated."""

import json

import numpy as np
import pytest

from lasb import artifacts
from lasb.cli import main as lasb_main
from lasb.data import list_samples, load_image
from lasb.detector import Detector
from lasb.evaluate import evaluate


@pytest.fixture(scope="module")
def detector(tiny_model):
    return Detector.load(tiny_model["registry"], tiny_model["category"])


def test_published_artifact_is_complete_and_calibrated(tiny_model):
    folder, version = artifacts.fetch(tiny_model["registry"], tiny_model["category"])
    assert version == tiny_model["version"]
    names = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"config.yaml", "calibration.json", "metrics.json"} <= set(names)
    assert any(n.startswith("codec/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("denoiser/") and n.endswith(".safetensors") for n in names)
    cal = json.loads((folder / "calibration.json").read_text())
    assert cal["score_min"] <= cal["threshold"] <= cal["score_max"]
    assert cal["n_normal"] >= 1  # held-out normal training images


def test_tiny_model_scores_real_drawn_defects_clearly_above_chance(detector, tiny_model):
    result = evaluate(detector, tiny_model["data"], tiny_model["category"])
    assert result["n_images"] == 50 and result["n_defective"] == 30
    # chance is 0.5; 30 defects vs 20 normals put chance results above 0.7 with p < 0.01
    assert result["image_auroc"] > 0.7, result
    assert result["pixel_auroc"] > 0.7, result


def test_predict_follows_the_response_contract(detector, tiny_model):
    samples = list_samples(tiny_model["data"], tiny_model["category"], "test")
    image = load_image(samples[-1].path)
    wide = np.concatenate([image, image[:, :16]], axis=1)  # not square, not the model size
    out = detector.predict([image, wide])
    for r, im in zip(out, [image, wide]):
        assert 0.0 <= r["pred_score"] <= 1.0
        assert r["pred_label"] == int(r["pred_score"] >= 0.5)
        assert r["anomaly_map"].shape == im.shape[:2] and r["pred_mask"].dtype == bool
        assert r["category"] == "demo_texture" and r["model_version"] == tiny_model["version"]
        assert r["threshold"] == detector.calibration["threshold"]


def test_scores_do_not_depend_on_batch_composition(detector, tiny_model):
    samples = list_samples(tiny_model["data"], tiny_model["category"], "test")
    images = [load_image(s.path) for s in samples[:5]]
    alone = detector.predict([images[3]], return_maps=False)[0]["raw_score"]
    together = detector.predict(images, return_maps=False)[3]["raw_score"]
    assert alone == pytest.approx(together, rel=1e-5)


def test_eval_command_writes_metrics_and_a_visual_report(tiny_model, tmp_path, capsys):
    code = lasb_main(["eval", "--data", tiny_model["data"], "--category", "demo_texture",
                      "--registry", tiny_model["registry"], "--out", str(tmp_path)])
    assert code == 0
    assert "image_auroc" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "report.png" in (tmp_path / "report.html").read_text()


def test_commands_fail_with_a_message_naming_the_cause(tiny_model, capsys):
    code = lasb_main(["eval", "--data", tiny_model["data"], "--category", "cable",
                      "--registry", tiny_model["registry"]])
    assert code == 2 and "unknown category 'cable'" in capsys.readouterr().err
    code = lasb_main(["train", "--data", tiny_model["data"], "--category", "demo_texture",
                      "--registry", tiny_model["registry"], "--preset", "tiny", "bridge.nfe=0"])
    assert code == 2 and "bridge.nfe" in capsys.readouterr().err
