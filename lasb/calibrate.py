"""Thresholds from held-out normal training images plus synthetic defects (pseudo-validation).

Never from test images or labels. The synthetic defects use a seed (and optionally an anomaly
source) different from training's, so the threshold is not fitted to the training defects.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve

from lasb import metrics
from lasb.augment import AugmentConfig, synthesize_batch
from lasb.pairs import row_seeds


def pseudo_validation_set(normals: np.ndarray, seed: int, augment: AugmentConfig,
                          source=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """normals + one forced synthetic defect per normal -> (images, labels, masks)."""
    forced = AugmentConfig(**{**augment.__dict__, "clean_prob": 0.0})
    defects, masks = synthesize_batch(normals, row_seeds(np.arange(len(normals)), seed), forced,
                                      source)
    images = np.concatenate([normals, defects])
    labels = np.r_[np.zeros(len(normals), int), np.ones(len(defects), int)]
    all_masks = np.concatenate([np.zeros(normals.shape[:3], bool), masks > 0.5])
    return images, labels, all_masks


def _f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[np.argmax(f1[:-1])])


def calibrate(detector, normals: np.ndarray, seed: int, source=None) -> dict:
    """Score normals + synthetic defects; thresholds at F1-max; min/max for normalisation."""
    images, labels, masks = pseudo_validation_set(normals, seed, detector.cfg.augment, source)
    raw = detector.raw(list(images))
    scores, maps = raw.scores, raw.maps
    threshold = _f1_threshold(labels, scores)
    # the pixel threshold is fitted on a subsample of pixels: exact enough, bounded memory
    rng = np.random.default_rng(seed)
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    take = rng.choice(flat_maps.size, size=min(flat_maps.size, 2_000_000), replace=False)
    pixel_threshold = _f1_threshold(flat_masks[take], flat_maps[take])
    result = {
        "threshold": threshold,
        "score_min": float(scores.min()),
        "score_max": float(scores.max()),
        "pixel_threshold": pixel_threshold,
        "map_min": float(maps.min()),
        "map_max": float(maps.max()),
        "backbone": detector.cfg.score.backbone,
        "layers": list(detector.cfg.score.layers),
        "n_normal": int(len(normals)),
        "n_synthetic": int(len(normals)),
        "seed": int(seed),
    }
    result["pseudo_validation"] = metrics.evaluate(labels, scores, masks, maps)
    return result
