"""Thresholds from held-out normal training images plus synthetic defects (pseudo-validation).

Never from test images or labels. The synthetic defects use a seed (and optionally an anomaly
source) different from training's, so the threshold is not fitted to the training defects.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from lasb import metrics
from lasb.augment import AugmentConfig, synthesize_batch
from lasb.detector import score_maps
from lasb.features import build_backbone
from lasb.pairs import row_seeds

log = logging.getLogger(__name__)


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


# Scoring choices searched on pseudo-validation (the bridge runs once; only scoring varies).
SCORING_SPACE = {
    "layers": ((2, 4, 7), (1, 2, 4), (4, 7, 10)),
    "compare": ("reconstruction", "input"),
    "image_score": ("max", "topk"),
}


def select_scoring(detector, images: np.ndarray, labels: np.ndarray, masks: np.ndarray):
    """Pick layers / comparison / image score by (image AUROC + pixel AUROC) / 2 on the
    pseudo-validation set. Returns (best ScoreConfig, table of every candidate)."""
    cfg = detector.cfg
    repairs = list(detector.repairs(list(images)))
    table = []
    for layers in SCORING_SPACE["layers"]:
        backbone = build_backbone(cfg.score.backbone, layers, cfg.data.image_size)
        if backbone is not None:
            backbone = backbone.to(detector.device)
        for compare in SCORING_SPACE["compare"]:
            for image_score in SCORING_SPACE["image_score"]:
                score = dataclasses.replace(cfg.score, layers=layers, compare=compare,
                                            image_score=image_score)
                trial = dataclasses.replace(cfg, score=score)
                parts = [score_maps(backbone, x if compare == "input" else recon, rep, trial)
                         for x, recon, rep in repairs]
                scores = torch.cat([p[0] for p in parts]).cpu().numpy()
                maps = torch.cat([p[1] for p in parts]).cpu().numpy()
                image_auroc = metrics.image_auroc(labels, scores)
                pixel_auroc = metrics.pixel_auroc(masks[labels == 1], maps[labels == 1])
                table.append({"layers": list(layers), "compare": compare,
                              "image_score": image_score, "image_auroc": image_auroc,
                              "pixel_auroc": pixel_auroc,
                              "objective": (image_auroc + pixel_auroc) / 2, "score": score})
    best = max(table, key=lambda r: r["objective"])
    for row in table:
        log.info("pseudo-val scoring %s %-14s %-4s image AUROC %.3f pixel AUROC %.3f%s",
                 row["layers"], row["compare"], row["image_score"], row["image_auroc"],
                 row["pixel_auroc"], "  <- chosen" if row is best else "")
    return best["score"], [{k: v for k, v in r.items() if k != "score"} for r in table]


def calibrate(detector, normals: np.ndarray, seed: int, source=None,
              select: bool = False) -> tuple[dict, object]:
    """Score normals + synthetic defects; thresholds at F1-max; min/max for normalisation.

    With `select`, first choose the scoring settings on the same pseudo-validation set.
    Returns (calibration dict, detector with the chosen scoring).
    """
    images, labels, masks = pseudo_validation_set(normals, seed, detector.cfg.augment, source)
    selection = None
    if select:
        best, selection = select_scoring(detector, images, labels, masks)
        detector = detector.with_scoring(best)
    raw = detector.raw(list(images))
    scores, maps = raw.scores, raw.maps
    threshold = metrics.threshold_at_f1_max(labels, scores)
    # the pixel threshold is fitted on a subsample of pixels: exact enough, bounded memory
    rng = np.random.default_rng(seed)
    flat_maps, flat_masks = maps.reshape(-1), masks.reshape(-1)
    take = rng.choice(flat_maps.size, size=min(flat_maps.size, 2_000_000), replace=False)
    pixel_threshold = metrics.threshold_at_f1_max(flat_masks[take], flat_maps[take])
    result = {
        "threshold": threshold,
        "score_min": float(scores.min()),
        "score_max": float(scores.max()),
        "pixel_threshold": pixel_threshold,
        "map_min": float(maps.min()),
        "map_max": float(maps.max()),
        "backbone": detector.cfg.score.backbone,
        "layers": list(detector.cfg.score.layers),
        "n_normal": len(normals),
        "n_synthetic": len(normals),
        "seed": int(seed),
    }
    result["pseudo_validation"] = metrics.evaluate(labels, scores, masks, maps)
    if selection is not None:
        result["scoring_search"] = selection
    return result, detector
