"""Tests for lasb.augment (DRAEM-style synthetic defects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lasb.augment import (
    AUGMENTERS,
    AugmentConfig,
    blend,
    load_anomaly_source,
    perlin_mask,
    perlin_noise,
    synthesize,
    synthesize_batch,
    synthesize_details,
)

SIZE = 64


def _image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Textured test image: smooth colour gradient plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy * 200, xx * 200, (1 - yy) * 150 + 50], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def _source(n: int = 3, size: int = 80) -> list[np.ndarray]:
    rng = np.random.default_rng(123)
    return [rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8) for _ in range(n)]


DEFECT = AugmentConfig(clean_prob=0.0)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("source", [None, _source()])
def test_same_seed_same_output(source: list[np.ndarray] | None) -> None:
    img = _image()
    for seed in range(4):
        a = synthesize(img, np.random.default_rng(seed), DEFECT, source)
        b = synthesize(img, np.random.default_rng(seed), DEFECT, source)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_different_seeds_differ() -> None:
    img = _image()
    outs = [synthesize(img, np.random.default_rng(s), DEFECT) for s in range(5)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not np.array_equal(outs[i][1], outs[j][1])
            assert not np.array_equal(outs[i][0], outs[j][0])


def test_input_not_mutated() -> None:
    img = _image()
    before = img.copy()
    synthesize(img, np.random.default_rng(0), DEFECT)
    np.testing.assert_array_equal(img, before)


# --------------------------------------------------------------------------- mask / image


@pytest.mark.parametrize("source", [None, _source()])
def test_mask_image_agreement(source: list[np.ndarray] | None) -> None:
    img = _image(1)
    for seed in range(8):
        res = synthesize_details(img, np.random.default_rng(seed), DEFECT, source)
        x1, mask = res.image, res.mask
        assert x1.dtype == np.uint8 and x1.shape == img.shape
        assert mask.dtype == np.float32 and mask.shape == img.shape[:2]
        assert set(np.unique(mask)) <= {0.0, 1.0}
        m = mask.astype(bool)
        assert m.any(), "clean_prob=0 must give a non-empty mask"
        np.testing.assert_array_equal(x1[~m], img[~m])
        changed = np.any(x1 != img, axis=-1)[m].mean()
        assert changed > 0.6, f"seed {seed}: only {changed:.2f} of mask pixels changed"
        assert res.beta is not None and 0.2 < res.beta <= 1.0
        expected = (1 - res.beta) * img.astype(np.float64) + res.beta * res.texture
        assert np.abs(x1[m].astype(np.float64) - expected[m]).max() <= 0.5 + 1e-4


def test_blend_formula() -> None:
    rng = np.random.default_rng(0)
    x0 = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tex = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:10, 2:12] = True
    out = blend(x0, tex, mask, 0.3)
    np.testing.assert_array_equal(out[~mask], x0[~mask])
    expected = np.rint(0.7 * x0.astype(np.float64) + 0.3 * tex)
    assert np.abs(out[mask] - expected[mask]).max() <= 1
    np.testing.assert_array_equal(blend(x0, tex, mask, 1.0)[mask], tex[mask])


def test_augmenters_keep_shape_and_dtype() -> None:
    img = _image(2, size=32)[:, :24]  # non-square
    for name, fn in AUGMENTERS.items():
        out = fn(img, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.shape == img.shape, name


# --------------------------------------------------------------------------- clean fraction


def test_clean_fraction_default() -> None:
    img = _image(3, size=24)
    cfg = AugmentConfig()
    empty = [not synthesize(img, np.random.default_rng(s), cfg)[1].any() for s in range(400)]
    assert abs(np.mean(empty) - 0.5) <= 0.08


def test_clean_prob_zero_all_defects() -> None:
    img = _image(4, size=24)
    for s in range(60):
        x1, mask = synthesize(img, np.random.default_rng(s), AugmentConfig(clean_prob=0.0))
        assert mask.any()
        assert not np.array_equal(x1, img)


def test_clean_prob_one_all_clean() -> None:
    img = _image(5, size=24)
    for s in range(30):
        x1, mask = synthesize(img, np.random.default_rng(s), AugmentConfig(clean_prob=1.0))
        np.testing.assert_array_equal(x1, img)
        assert not mask.any() and mask.dtype == np.float32


# --------------------------------------------------------------------------- Perlin


def test_perlin_range_and_shape() -> None:
    rng = np.random.default_rng(0)
    for shape, res in [((50, 37), (4, 3)), ((64, 64), (1, 1)), ((33, 70), (32, 8))]:
        n = perlin_noise(shape, res, rng)
        assert n.shape == shape
        assert np.all(np.abs(n) <= 1.1)
        assert n.std() > 0.05
    rot = perlin_noise((45, 61), (4, 4), rng, angle=30.0)
    assert rot.shape == (45, 61) and np.all(np.abs(rot) <= 1.1)


def _mean_abs_grad(n: np.ndarray, axis: int) -> float:
    return float(np.abs(np.diff(n, axis=axis)).mean())


def test_perlin_smoothness_by_scale() -> None:
    for axis in (0, 1):
        coarse = [
            _mean_abs_grad(perlin_noise((128, 128), (1, 1), np.random.default_rng(s)), axis)
            for s in range(3)
        ]
        fine = [
            _mean_abs_grad(perlin_noise((128, 128), (32, 32), np.random.default_rng(s)), axis)
            for s in range(3)
        ]
        assert max(coarse) * 5 < min(fine), axis


def test_perlin_anisotropic_res() -> None:
    n = perlin_noise((128, 128), (1, 32), np.random.default_rng(0))
    assert _mean_abs_grad(n, 1) > 5 * _mean_abs_grad(n, 0)
    n = perlin_noise((128, 128), (32, 1), np.random.default_rng(0))
    assert _mean_abs_grad(n, 0) > 5 * _mean_abs_grad(n, 1)


def test_perlin_deterministic_and_mask_bool() -> None:
    a = perlin_noise((40, 40), (4, 4), np.random.default_rng(7))
    b = perlin_noise((40, 40), (4, 4), np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    m = perlin_mask((40, 30), np.random.default_rng(7), AugmentConfig())
    assert m.dtype == bool and m.shape == (40, 30)


# --------------------------------------------------------------------------- batch


def test_batch_matches_rows() -> None:
    images = np.stack([_image(s, size=32) for s in range(4)])
    seeds = np.array([3, 17, 99, 2**40], dtype=np.int64)
    cfg = AugmentConfig()
    x1, masks = synthesize_batch(images, seeds, cfg)
    assert x1.shape == images.shape and x1.dtype == np.uint8
    assert masks.shape == images.shape[:3] and masks.dtype == np.float32
    for i in range(len(seeds)):
        r = synthesize(images[i], np.random.default_rng(int(seeds[i])), cfg)
        np.testing.assert_array_equal(x1[i], r[0])
        np.testing.assert_array_equal(masks[i], r[1])


def test_batch_rejects_bad_input() -> None:
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        synthesize_batch(images.astype(np.float32), np.arange(2), DEFECT)
    with pytest.raises(ValueError):
        synthesize_batch(images[..., 0], np.arange(2), DEFECT)
    with pytest.raises(ValueError):
        synthesize_batch(images, np.arange(3), DEFECT)


# --------------------------------------------------------------------------- anomaly source


def test_load_anomaly_source(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    paths = [tmp_path / "a.png", tmp_path / "sub" / "b.png", tmp_path / "c.PNG"]
    for i, p in enumerate(paths):
        arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(p)
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "gray.png")  # -> RGB
    (tmp_path / "notes.txt").write_text("ignore me")
    src = load_anomaly_source(str(tmp_path), 48)
    assert src is not None and len(src) == 4
    for t in src:
        assert t.dtype == np.uint8 and t.shape == (48, 48, 3)
    x1, mask = synthesize(_image(size=40), np.random.default_rng(0), DEFECT, src)
    assert x1.shape == (40, 40, 3) and mask.any()


def test_load_anomaly_source_none_missing_empty(tmp_path: Path) -> None:
    assert load_anomaly_source(None, 32) is None
    missing = tmp_path / "no_such_textures"
    with pytest.raises(FileNotFoundError, match="no_such_textures"):
        load_anomaly_source(str(missing), 32)
    empty = tmp_path / "empty_textures"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_textures"):
        load_anomaly_source(str(empty), 32)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((16, 16, 3), dtype=np.float32),
        np.zeros((16, 16, 3), dtype=np.int64),
        np.zeros((16, 16), dtype=np.uint8),
        np.zeros((16, 16, 4), dtype=np.uint8),
        np.zeros((1, 16, 16, 3), dtype=np.uint8),
    ],
)
def test_synthesize_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        synthesize(bad, np.random.default_rng(0), DEFECT)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        AugmentConfig(clean_prob=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(perlin_min_scale=4, perlin_max_scale=2)
    with pytest.raises(ValueError):
        AugmentConfig(n_augmenters=len(AUGMENTERS) + 1)


def test_perlin_angle_rotates_pattern() -> None:
    n = perlin_noise((128, 128), (1, 32), np.random.default_rng(0), angle=90.0)
    assert _mean_abs_grad(n, 0) > 5 * _mean_abs_grad(n, 1)
    n = perlin_noise((128, 128), (1, 32), np.random.default_rng(0), angle=45.0)
    g0, g1 = _mean_abs_grad(n, 0), _mean_abs_grad(n, 1)
    assert 0.5 < g0 / g1 < 2.0
