"""Image- and pixel-level anomaly-detection metrics.

Image level: AUROC, average precision and the best F1 over all thresholds.
Pixel level: AUROC, average precision and AUPRO (area under the per-region-overlap curve,
MVTec AD definition, computed exactly without a threshold grid).

Pixel inputs (``masks``, ``maps``) may be 3-D arrays ``(N, H, W)`` or sequences of 2-D arrays
(images may then differ in size); they are flattened into compact dtypes only once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "aupro",
    "evaluate",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "threshold_at_f1_max",
]

ArrayLike = Any
PixelInput = np.ndarray | Sequence[np.ndarray]

# MVTec AD's reference implementation labels regions with 8-connectivity.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- validation helpers


def _binary(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a uint8 0/1 array, raising if it holds anything but 0/1/bool."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.size and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be boolean or 0/1 numeric, got dtype {arr.dtype}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return arr.astype(np.uint8)


def _finite_scores(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a float array, raising on non-numeric or non-finite entries."""
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_image_inputs(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate 1-D labels/scores of equal length with both classes present."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"length mismatch: {y.shape[0]} labels vs {s.shape[0]} scores")
    y = _binary(y, "labels")
    s = _finite_scores(s, "scores")
    _check_both_classes(y, "labels")
    return y, s


def _check_both_classes(y: np.ndarray, name: str) -> None:
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous (1)" if n_pos else "normal (0)"
        raise ValueError(
            f"{name} contain a single class (only {only} among {y.size} entries); "
            "the metric needs both normal and anomalous samples"
        )


def _pixel_pairs(masks: PixelInput, maps: PixelInput) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate per-image (mask, map) pairs and return them as (uint8 mask, float map) lists."""
    if masks is None or maps is None:
        raise ValueError("both masks and maps are required for pixel metrics")
    if isinstance(masks, np.ndarray) and masks.ndim != 3:
        raise ValueError(f"masks array must be 3-D (N, H, W), got shape {masks.shape}")
    if isinstance(maps, np.ndarray) and maps.ndim != 3:
        raise ValueError(f"maps array must be 3-D (N, H, W), got shape {maps.shape}")
    if len(masks) != len(maps):
        raise ValueError(f"length mismatch: {len(masks)} masks vs {len(maps)} maps")
    if len(masks) == 0:
        raise ValueError("no images given for pixel metrics")
    pairs = []
    for i, (m, a) in enumerate(zip(masks, maps)):
        m_arr = np.asarray(m)
        a_arr = np.asarray(a)
        if m_arr.ndim != 2:
            raise ValueError(f"mask {i} must be 2-D (H, W), got shape {m_arr.shape}")
        if m_arr.shape != a_arr.shape:
            raise ValueError(
                f"shape mismatch at image {i}: mask {m_arr.shape} vs map {a_arr.shape}"
            )
        pairs.append((_binary(m_arr, f"mask {i}"), _finite_scores(a_arr, f"map {i}")))
    return pairs


def _flatten_pixels(masks: PixelInput, maps: PixelInput) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate all pixels into flat (uint8 labels, float scores) arrays."""
    pairs = _pixel_pairs(masks, maps)
    y = np.concatenate([m.ravel() for m, _ in pairs])
    s = np.concatenate([a.ravel() for _, a in pairs])
    _check_both_classes(y, "masks")
    return y, s


# --------------------------------------------------------------------------- image-level metrics


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level ROC AUC (labels: 1 = anomalous; higher score = more anomalous)."""
    y, s = _check_image_inputs(labels, scores)
    return float(roc_auc_score(y, s))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Image-level average precision (anomalous is the positive class)."""
    y, s = _check_image_inputs(labels, scores)
    return float(average_precision_score(y, s))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (``score >= t`` is positive)."""
    y, s = _check_image_inputs(labels, scores)
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last PR point (precision 1, recall 0) has no threshold.
    p, r = precision[: len(thresholds)], recall[: len(thresholds)]
    denom = p + r
    f1 = np.divide(2 * p * r, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def threshold_at_f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Threshold at which F1 is maximal (second value of :func:`f1_max`)."""
    return f1_max(labels, scores)[1]


# --------------------------------------------------------------------------- pixel-level metrics


def pixel_auroc(masks: PixelInput, maps: PixelInput) -> float:
    """Pixel-level ROC AUC over all pixels of all images."""
    y, s = _flatten_pixels(masks, maps)
    return float(roc_auc_score(y, s))


def pixel_ap(masks: PixelInput, maps: PixelInput) -> float:
    """Pixel-level average precision over all pixels of all images."""
    y, s = _flatten_pixels(masks, maps)
    return float(average_precision_score(y, s))


def pro_curve(masks: PixelInput, maps: PixelInput) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve: (FPR, PRO) arrays, starting at (0, 0), one point per
    distinct score threshold in descending order.

    Regions are the 8-connected components of each ground-truth mask; PRO is the mean over all
    regions (of all images) of the fraction of the region at or above the threshold; FPR is the
    fraction of all normal pixels at or above the threshold.
    """
    pairs = _pixel_pairs(masks, maps)
    neg_scores: list[np.ndarray] = []
    pos_scores: list[np.ndarray] = []
    pos_regions: list[np.ndarray] = []
    n_regions = 0
    for m, a in pairs:
        labeled, n = ndimage.label(m, structure=_STRUCTURE_8)
        anomalous = labeled > 0
        neg_scores.append(a[~anomalous])
        pos_scores.append(a[anomalous])
        pos_regions.append(labeled[anomalous].astype(np.int64) - 1 + n_regions)
        n_regions += n
    n_neg = sum(x.size for x in neg_scores)
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region, but all masks are empty")
    if n_neg == 0:
        raise ValueError("AUPRO needs normal pixels, but every pixel is anomalous")

    region_ids = np.concatenate(pos_regions)
    sizes = np.bincount(region_ids, minlength=n_regions)
    pro_weight = 1.0 / (n_regions * sizes[region_ids].astype(np.float64))

    scores = np.concatenate(neg_scores + pos_scores)
    is_neg = np.zeros(scores.size, dtype=np.int64)
    is_neg[:n_neg] = 1
    weights = np.zeros(scores.size, dtype=np.float64)
    weights[n_neg:] = pro_weight
    del neg_scores, pos_scores, pos_regions, region_ids, pro_weight

    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    # FPR from integer counts so values are exact multiples of 1 / n_neg.
    fpr = np.cumsum(is_neg[order]) / n_neg
    pro = np.cumsum(weights[order])
    # Keep the last index of each run of tied scores: the curve only exists between distinct
    # thresholds.
    last = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    keep = np.append(last, scores.size - 1)
    fpr = np.concatenate(([0.0], fpr[keep]))
    pro = np.concatenate(([0.0], pro[keep]))
    return fpr, pro


def aupro(masks: PixelInput, maps: PixelInput, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (perfect detector = 1.0).

    The exact curve of :func:`pro_curve` is integrated with the trapezoid rule, linearly
    interpolated at exactly ``fpr_limit``, and divided by ``fpr_limit``.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    # Number of curve points with FPR <= limit (at least 1: the (0, 0) start).
    idx = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:idx], pro[:idx]
    if idx < fpr.size:  # fpr[idx - 1] <= fpr_limit < fpr[idx]: interpolate on that segment
        x0, x1, y0, y1 = fpr[idx - 1], fpr[idx], pro[idx - 1], pro[idx]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_lim)
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))
    return area / fpr_limit


# --------------------------------------------------------------------------- convenience


def evaluate(
    labels: ArrayLike,
    scores: ArrayLike,
    masks: PixelInput | Sequence[np.ndarray | None] | None = None,
    maps: PixelInput | Sequence[np.ndarray | None] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All metrics in one dict.

    Keys: ``image_auroc``, ``image_ap``, ``f1_max`` and, when ``masks`` is given,
    ``pixel_auroc``, ``pixel_ap``, ``aupro``. ``masks``/``maps`` are aligned with ``labels``;
    images whose mask is ``None`` are left out of the pixel metrics (pass all-zero masks for
    normal images that should count).
    """
    result = {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "f1_max": f1_max(labels, scores)[0],
    }
    if masks is None:
        return result
    if maps is None:
        raise ValueError("masks were given without maps")
    n = len(np.asarray(labels))
    if len(masks) != n:
        raise ValueError(f"length mismatch: {len(masks)} masks vs {n} labels")
    if len(maps) != n:
        raise ValueError(f"length mismatch: {len(maps)} maps vs {n} labels")
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray):
        sel_masks, sel_maps = masks, maps
    else:
        keep = [i for i in range(n) if masks[i] is not None]
        if any(maps[i] is None for i in keep):
            raise ValueError("an image with a mask has no anomaly map (maps entry is None)")
        sel_masks = [masks[i] for i in keep]
        sel_maps = [maps[i] for i in keep]
    result["pixel_auroc"] = pixel_auroc(sel_masks, sel_maps)
    result["pixel_ap"] = pixel_ap(sel_masks, sel_maps)
    result["aupro"] = aupro(sel_masks, sel_maps, fpr_limit=fpr_limit)
    return result
