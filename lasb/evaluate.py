"""`lasb eval`: metrics on an MVTec-layout test split, a printed table, JSON and a visual report.

The test split is read here and only here (and in benchmarks that report on it); it never
feeds training, tuning or calibration.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lasb import metrics
from lasb.data import list_samples, load_samples

log = logging.getLogger(__name__)


def load_test_split(data: str, category: str, size: int, max_pixels: int):
    samples = list_samples(data, category, "test")
    loaded = load_samples(samples, size, max_pixels)
    for err in loaded.errors:
        log.warning("test image not scored: %s", err)
    kept = [samples[i] for i in loaded.kept]
    labels = np.array([s.label for s in kept])
    return kept, loaded.images, loaded.masks, labels, loaded.errors


def score_split(detector, images: np.ndarray, **raw_kw) -> tuple[object, float]:
    """Run detector.raw over all images; returns (RawOutput, ms per image)."""
    t0 = time.perf_counter()
    raw = detector.raw(list(images), **raw_kw)
    return raw, 1000 * (time.perf_counter() - t0) / max(1, len(images))


def evaluate(detector, data: str, category: str, out_dir: str | None = None, **raw_kw) -> dict:
    """Metrics (image AUROC/AP/F1-max, pixel AUROC/AP, AUPRO@0.3) on the test split."""
    cfg = detector.cfg
    samples, images, masks, labels, errors = load_test_split(
        data, category, cfg.data.image_size, cfg.data.max_pixels)
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"the test split of {category!r} needs both normal and defective images")
    raw, ms = score_split(detector, images, **raw_kw)
    result = metrics.evaluate(labels, raw.scores, masks, raw.maps)
    result.update({"n_images": len(images), "n_defective": int(labels.sum()),
                   "n_unreadable": len(errors), "ms_per_image": ms})
    if detector.calibration:
        pred = raw.scores >= detector.calibration["threshold"]
        result["accuracy_at_threshold"] = float((pred == labels.astype(bool)).mean())
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        write_report(out, category, detector, samples, images, masks, labels, raw, result)
        log.info("report written to %s", out / "report.html")
    return result


def format_table(rows: dict[str, dict]) -> str:
    keys = ["image_auroc", "image_ap", "f1_max", "pixel_auroc", "pixel_ap", "aupro",
            "ms_per_image"]
    head = f"{'':<28}" + "".join(f"{k:>13}" for k in keys)
    lines = [head]
    for name, r in rows.items():
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{'-':>13}" if v is None else
                         f"{v:>13.1f}" if k == "ms_per_image" else f"{100 * v:>13.1f}")
        lines.append(f"{name:<28}" + "".join(cells))
    return "\n".join(lines)


# -- visual report ---------------------------------------------------------------------------

def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map [0,1] to a blue-cyan-yellow-red ramp (uint8 RGB)."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], float)
    pos = v * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = pos - lo
    return (stops[lo[..., 0]] * (1 - frac) + stops[lo[..., 0] + 1] * frac).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (image * (1 - alpha) + heat_colors(amap) * alpha).astype(np.uint8)


def _mask_rgb(mask: np.ndarray) -> np.ndarray:
    return np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)


def write_report(out: Path, category: str, detector, samples, images, masks, labels, raw,
                 result: dict, n_rows: int = 12) -> None:
    cal = detector.calibration or {}
    lo, hi = cal.get("map_min", raw.maps.min()), cal.get("map_max", raw.maps.max())
    pix_thr = cal.get("pixel_threshold", np.quantile(raw.maps, 0.99))
    norm = (raw.maps - lo) / max(hi - lo, 1e-12)
    # the most and least anomalous defects, and the most suspicious normals
    order = np.argsort(-raw.scores)
    defects = [i for i in order if labels[i] == 1]
    normals = [i for i in order if labels[i] == 0]
    picks = defects[: n_rows // 3] + defects[-(n_rows // 3):] + normals[: n_rows - 2 * (n_rows // 3)]
    picks = list(dict.fromkeys(picks))
    cols = ["input", "repaired", "anomaly map", "ground truth", "predicted mask"]
    tiles = []
    for i in picks:
        row = [images[i], raw.repaired[i], overlay(images[i], norm[i]), _mask_rgb(masks[i]),
               _mask_rgb(raw.maps[i] >= pix_thr)]
        tiles.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                     for t in row], axis=1))
    grid = np.concatenate(tiles, axis=0)
    scale = max(1, 160 // images.shape[1])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(out / "report.png")
    metric_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
                          for k, v in result.items() if isinstance(v, (int, float)))
    sample_rows = "".join(
        f"<tr><td>{n}</td><td>{html.escape(samples[i].defect_type)}</td>"
        f"<td>{html.escape(Path(samples[i].path).name)}</td><td>{raw.scores[i]:.4g}</td></tr>"
        for n, i in enumerate(picks))
    thr = f"{cal['threshold']:.4g}" if "threshold" in cal else "n/a"
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>lasb report: {html.escape(category)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px}}</style></head><body>
<h1>lasb evaluation: {html.escape(category)}</h1>
<p>model version {html.escape(detector.version or 'unpublished')}; image threshold {thr}
(calibrated on held-out normal training images + synthetic defects, not on this test set)</p>
<h2>Metrics (test split)</h2><table>{metric_rows}</table>
<h2>Samples</h2><p>Columns: {', '.join(cols)}. Rows in the order below.</p>
<table><tr><th>row</th><th>type</th><th>file</th><th>raw score</th></tr>{sample_rows}</table>
<p><img src="report.png" alt="report grid"></p></body></html>"""
    (out / "report.html").write_text(page)
