"""Tests for lasb.metrics: sklearn agreement, hand-computed cases and brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from lasb.metrics import (
    aupro,
    evaluate,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pro_curve,
    threshold_at_f1_max,
)

_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# --------------------------------------------------------------------------- references


def brute_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 by looping over every unique threshold and counting by hand."""
    y = labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & y)
        fp = np.sum(pred & ~y)
        fn = np.sum(~pred & y)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


def f1_at(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    y = labels.astype(bool)
    pred = scores >= t
    tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
    return float(2 * tp / (2 * tp + fp + fn))


def brute_aupro(masks, maps, limit: float) -> float:
    """AUPRO from a threshold loop over all unique scores, np.interp and np.trapezoid."""
    region_scores, normal_parts = [], []
    for m, a in zip(masks, maps):
        m = np.asarray(m).astype(bool)
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        region_scores += [a[lab == k] for k in range(1, n + 1)]
        normal_parts.append(a[~m])
    normal_scores = np.concatenate(normal_parts)
    all_scores = np.concatenate([np.ravel(a) for a in maps])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        fprs.append(np.sum(normal_scores >= t) / normal_scores.size)
        pros.append(np.mean([np.mean(r >= t) for r in region_scores]))
    fprs, pros = np.asarray(fprs), np.asarray(pros)
    keep = fprs <= limit
    x, y = fprs[keep], pros[keep]
    if x[-1] < limit:
        x = np.append(x, limit)
        y = np.append(y, np.interp(limit, fprs, pros))
    return float(_trapezoid(y, x) / limit)


def random_blob_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Random rectangles, single pixels and diagonal pairs; at least one region overall."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(0, 4)):
            r, c = rng.integers(0, h - 1), rng.integers(0, w - 1)
            hh, ww = rng.integers(1, h // 2), rng.integers(1, w // 2)
            masks[i, r : r + hh, c : c + ww] = True
        if rng.random() < 0.5:
            masks[i, rng.integers(0, h), rng.integers(0, w)] = True
        if rng.random() < 0.5:  # diagonal pair: one region only under 8-connectivity
            r, c = rng.integers(0, h - 1), rng.integers(0, w - 1)
            masks[i, r, c] = masks[i, r + 1, c + 1] = True
    if not masks.any():
        masks[0, 1:3, 1:4] = True
    return masks


# --------------------------------------------------------------------------- image metrics


def test_image_metrics_match_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 200)
        scores = rng.normal(size=200) + labels * rng.uniform(0, 2)
        assert image_auroc(labels, scores) == pytest.approx(
            roc_auc_score(labels, scores), abs=1e-12
        )
        assert image_ap(labels, scores) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )
    # bool labels and list inputs work too
    labels = rng.random(50) < 0.3
    scores = rng.random(50)
    assert image_auroc(list(labels), list(scores)) == pytest.approx(roc_auc_score(labels, scores))


def test_image_metrics_perfect_and_reversed() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert image_auroc(labels, scores) == 1.0
    assert image_ap(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert f1_max(labels, scores) == (1.0, 0.8)


def test_f1_max_hand_case() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # t=0.8: F1 2/3; t=0.4: 1/2; t=0.35: 4/5; t=0.1: 2/3
    f1, t = f1_max(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert t == 0.35
    assert threshold_at_f1_max(labels, scores) == 0.35


def test_f1_max_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(5, 120))
        labels = rng.integers(0, 2, n)
        labels[0], labels[1] = 0, 1
        if trial % 2:  # many ties
            scores = rng.integers(0, 6, n).astype(float) + labels * rng.integers(0, 3)
        else:
            scores = rng.normal(size=n) + labels * rng.uniform(0, 1.5)
        f1, t = f1_max(labels, scores)
        assert f1 == pytest.approx(brute_f1_max(labels, scores), abs=1e-12)
        assert f1_at(labels, scores, t) == pytest.approx(f1, abs=1e-12)


# --------------------------------------------------------------------------- pixel metrics


def test_pixel_auroc_and_ap_match_sklearn_on_flattened() -> None:
    rng = np.random.default_rng(2)
    masks = random_blob_masks(rng, 4, 12, 10)
    maps = rng.random((4, 12, 10)) + 0.5 * masks
    y, s = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # lists of per-image arrays (0/1 ints) give the same numbers
    assert pixel_auroc(list(masks.astype(int)), list(maps)) == pytest.approx(roc_auc_score(y, s))


def test_pixel_metrics_accept_images_of_different_sizes() -> None:
    rng = np.random.default_rng(3)
    m1, m2 = np.zeros((5, 7), bool), np.zeros((9, 4), bool)
    m1[1:3, 2:5] = True
    a1, a2 = rng.random((5, 7)), rng.random((9, 4))
    y = np.concatenate([m1.ravel(), m2.ravel()])
    s = np.concatenate([a1.ravel(), a2.ravel()])
    assert pixel_auroc([m1, m2], [a1, a2]) == pytest.approx(roc_auc_score(y, s))
    m2[6:8, 1:3] = True
    y = np.concatenate([m1.ravel(), m2.ravel()])
    assert pixel_ap([m1, m2], [a1, a2]) == pytest.approx(average_precision_score(y, s))
    assert aupro([m1, m2], [a1, a2]) == pytest.approx(
        brute_aupro([m1, m2], [a1, a2], 0.3), abs=1e-9
    )


# --------------------------------------------------------------------------- AUPRO hand cases


def test_aupro_perfect_map_is_one() -> None:
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 3:6, 3:6] = True
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(mask, mask.astype(float), fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map() -> None:
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 3:6, 3:6] = True
    maps = np.full((1, 10, 10), 0.7)
    fpr, pro = pro_curve(mask, maps)
    np.testing.assert_allclose(fpr, [0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0])
    # (0,0) -> (1,1); PRO(0.3) = 0.3; area 0.5 * 0.3 * 0.3 = 0.045; / 0.3 = 0.15
    assert aupro(mask, maps) == pytest.approx(0.15, abs=1e-12)
    assert aupro(mask, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def _two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """Region A (2x2, score 1) detected first; region B (3x3, score 0) below all normals."""
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 0:2, 0:2] = True  # A: 4 px
    mask[0, 5:8, 5:8] = True  # B: 9 px
    maps = np.full((1, 10, 10), 0.5)  # 87 normal pixels
    maps[0, 0:2, 0:2] = 1.0
    maps[0, 5:8, 5:8] = 0.0
    return mask, maps


def test_aupro_two_regions_one_missed() -> None:
    mask, maps = _two_region_case()
    # curve: (0,0) -> (0,0.5) [A] -> (1,0.5) [normals] -> (1,1) [B]
    fpr, pro = pro_curve(mask, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0])
    # plateau PRO 0.5 on [0, 0.3] -> 0.5 (per-region mean, not pixel-weighted 4/13)
    assert aupro(mask, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_two_regions_vertical_jump_inside_range() -> None:
    mask, maps = _two_region_case()
    normal_idx = np.flatnonzero(~mask.ravel())
    flat = maps.ravel()
    flat[normal_idx[:10]] = 0.8  # 10 normals above B
    flat[mask.ravel() & (flat == 0.0)] = 0.6  # B detected once those 10 FPs are in
    maps = flat.reshape(mask.shape)
    f = 10 / 87
    # curve: (0,0) -> (0,.5) -> (f,.5) -> (f,1) -> (1,1)
    expected = (0.5 * f + 1.0 * (0.3 - f)) / 0.3
    assert aupro(mask, maps) == pytest.approx(expected, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True  # diagonal pair: one region (4-conn would give two)
    mask[0, 7, 7] = True
    maps = np.full((1, 10, 10), 0.5)
    maps[0, 1, 1] = maps[0, 2, 2] = 1.0
    maps[0, 7, 7] = 0.0
    # 2 regions, one detected before any FP -> 0.5 (with 4-connectivity it would be 2/3)
    assert aupro(mask, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_pooled_across_images() -> None:
    # the two regions of _two_region_case on two images: same curve (100 extra normals at 0.5)
    m2 = np.zeros((2, 10, 10), dtype=bool)
    m2[0, 0:2, 0:2] = True
    m2[1, 5:8, 5:8] = True
    a2 = np.full((2, 10, 10), 0.5)
    a2[0, 0:2, 0:2] = 1.0
    a2[1, 5:8, 5:8] = 0.0
    assert aupro(m2, a2) == pytest.approx(0.5, abs=1e-12)


def test_aupro_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(4)
    masks = random_blob_masks(rng, 3, 12, 12)
    maps = rng.random((3, 12, 12)) + 0.4 * masks
    assert aupro(masks, np.exp(3 * maps) - 7) == pytest.approx(aupro(masks, maps), abs=1e-12)


def test_aupro_matches_brute_force_threshold_loop() -> None:
    rng = np.random.default_rng(5)
    limits = [0.3, 0.05, 0.5, 1.0, 0.3, 0.17]
    for trial in range(18):
        n, h, w = int(rng.integers(1, 4)), int(rng.integers(6, 14)), int(rng.integers(6, 14))
        masks = random_blob_masks(rng, n, h, w)
        if masks.all():
            masks[0, 0, 0] = False
        maps = rng.random((n, h, w)) + rng.uniform(0, 1) * masks
        if trial % 3 == 0:
            maps = np.round(maps, 1)  # heavy ties
        limit = limits[trial % len(limits)]
        got = aupro(masks, maps, fpr_limit=limit)
        want = brute_aupro(masks, maps, limit)
        assert got == pytest.approx(want, abs=1e-9), (trial, limit)
        fpr, pro = pro_curve(masks, maps)
        assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-15)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_keys_and_mask_selection() -> None:
    rng = np.random.default_rng(6)
    labels = np.array([0, 1, 0, 1, 1, 0])
    scores = rng.random(6) + labels
    masks_all = random_blob_masks(rng, 6, 8, 8)
    masks_all[labels == 0] = False
    maps_all = rng.random((6, 8, 8)) + 0.3 * masks_all
    out = evaluate(labels, scores)
    assert set(out) == {"image_auroc", "image_ap", "f1_max"}
    assert out["f1_max"] == pytest.approx(brute_f1_max(labels, scores))

    masks: list[np.ndarray | None] = list(masks_all)
    maps: list[np.ndarray | None] = list(maps_all)
    masks[2] = None  # image without ground truth: excluded from pixel metrics
    maps[2] = None
    out = evaluate(labels, scores, masks, maps)
    assert set(out) == {"image_auroc", "image_ap", "f1_max", "pixel_auroc", "pixel_ap", "aupro"}
    sel = [0, 1, 3, 4, 5]
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks_all[sel], maps_all[sel]))
    assert out["pixel_ap"] == pytest.approx(pixel_ap(masks_all[sel], maps_all[sel]))
    assert out["aupro"] == pytest.approx(aupro(masks_all[sel], maps_all[sel]))
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    full = evaluate(labels, scores, masks_all, maps_all)
    assert full["aupro"] == pytest.approx(aupro(masks_all, maps_all))


# --------------------------------------------------------------------------- bad input


def test_bad_image_inputs_raise() -> None:
    with pytest.raises(ValueError, match="length mismatch"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="single class"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="single class"):
        f1_max([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        image_ap([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        image_auroc([[0, 1]], [[0.1, 0.2]])


def test_bad_pixel_inputs_raise() -> None:
    mask, maps = _two_region_case()
    with pytest.raises(ValueError, match="length mismatch"):
        pixel_auroc([mask[0], mask[0]], [maps[0]])
    with pytest.raises(ValueError, match="shape mismatch"):
        pixel_auroc(mask, maps[:, :5])
    with pytest.raises(ValueError, match="single class"):
        pixel_auroc(np.zeros_like(mask), maps)
    with pytest.raises(ValueError, match="anomalous region"):
        aupro(np.zeros_like(mask), maps)
    with pytest.raises(ValueError, match="normal pixels"):
        aupro(np.ones_like(mask), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(mask, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="3-D"):
        pixel_ap(mask[0], maps[0])
    with pytest.raises(ValueError, match="length mismatch"):
        evaluate([0, 1], [0.1, 0.9], [mask[0]], [maps[0]])
    with pytest.raises(ValueError, match="without maps"):
        evaluate([0, 1], [0.1, 0.9], [mask[0], mask[0]])
