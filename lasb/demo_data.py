"""Small licence-clean MVTec-layout demo category, generated on the fly.

Normal images are random crops (small rotation, brightness and colour jitter) of a CC0
texture bundled inside scikit-image (``skimage.data.gravel``, ``brick`` or ``grass``; these
ship with the package and load without any download). Test defects are drawn with
``skimage.draw`` (no Perlin/DRAEM-style generator, so the demo does not share its defect
model with any synthetic-anomaly training scheme):

* ``scratch``: a long thin bright or dark anti-aliased polyline (1-3 px wide, 2-4 segments);
* ``hole``: a dark filled ellipse with a slightly lighter rim (3-15 % of the image area);
* ``stain``: a translucent coloured blob, random polygon or ellipse (3-15 % of the area).

Output is deterministic for a given seed (byte-identical PNGs on a rerun on the same
software stack) and generation is skipped when the folder is already complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

logger = logging.getLogger(__name__)

DEFECT_TYPES = ("scratch", "hole", "stain")
TEXTURES = ("gravel", "brick", "grass")
MARKER_FILE = ".lasb_demo.json"
_FORMAT_VERSION = 1
_SUPERSAMPLE = 4  # defects are rasterised at 4x and averaged down -> anti-aliased coverage
_MARGIN = 2  # defects stay this many pixels away from the border
# Tint applied to the greyscale texture so images are RGB with a natural colour cast.
_TINTS = {"gravel": (1.0, 0.93, 0.82), "brick": (1.0, 0.86, 0.78), "grass": (0.86, 1.0, 0.78)}
_STAIN_COLOURS = (
    (160, 75, 35),  # rust
    (45, 40, 30),  # oil
    (40, 70, 150),  # ink
    (70, 125, 60),  # algae
    (205, 165, 50),  # ochre
)


def _load_texture(name: str) -> np.ndarray:
    """Bundled CC0 scikit-image texture as float32 (H, W) greyscale."""
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; choose one of {', '.join(TEXTURES)}")
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    return image.astype(np.float32)


def _resize_float(image: np.ndarray, size: int) -> np.ndarray:
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
    return np.array(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def normal_image(
    texture: np.ndarray,
    size: int,
    rng: np.random.Generator,
    tint: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """One normal uint8 RGB (size, size, 3) image: a jittered random crop of ``texture``."""
    h, w = texture.shape
    crop = round(0.4 * min(h, w) * float(rng.uniform(0.93, 1.07)))
    window = int(np.ceil(crop * 1.25))  # room for a +-8 degree rotation without borders
    r0 = int(rng.integers(0, h - window + 1))
    c0 = int(rng.integers(0, w - window + 1))
    patch = texture[r0 : r0 + window, c0 : c0 + window]
    patch = ndimage.rotate(patch, rng.uniform(-8.0, 8.0), reshape=False, order=1, mode="reflect")
    off = (window - crop) // 2
    grey = _resize_float(patch[off : off + crop, off : off + crop], size)
    grey = grey * rng.uniform(0.9, 1.1) + rng.uniform(-8.0, 8.0)
    colour = np.asarray(tint if tint is not None else (1.0, 1.0, 1.0), dtype=np.float32)
    colour = colour * (1.0 + rng.normal(0.0, 0.015, 3)).astype(np.float32)
    return np.clip(np.round(grey[..., None] * colour), 0, 255).astype(np.uint8)


def _coverage(size: int, paint: Callable[[np.ndarray, Callable], None]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of shapes painted on a supersampled bool canvas.

    ``paint(canvas, to_hi)`` draws into ``canvas``; ``to_hi`` maps output-pixel coordinates
    (pixel i centred at i) to canvas coordinates.
    """
    f = _SUPERSAMPLE
    canvas = np.zeros((size * f, size * f), dtype=bool)

    def to_hi(x):
        return (np.asarray(x, dtype=np.float64) + 0.5) * f - 0.5

    paint(canvas, to_hi)
    return canvas.reshape(size, f, size, f).mean(axis=(1, 3))


def _scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    lo, hi = _MARGIN + 1.5, size - 1 - _MARGIN - 1.5
    for _ in range(500):
        n_seg = int(rng.integers(2, 5))
        weights = rng.uniform(0.6, 1.4, n_seg)
        lengths = weights / weights.sum() * rng.uniform(0.5, 0.85) * size
        angle = rng.uniform(0.0, 2 * np.pi)
        points = [rng.uniform(0.15 * size, 0.85 * size, 2)]
        for length in lengths:
            points.append(points[-1] + length * np.array([np.sin(angle), np.cos(angle)]))
            angle += rng.uniform(-0.7, 0.7)
        pts = np.array(points)
        if pts.min() >= lo and pts.max() <= hi:
            break
    else:
        pts = np.clip(pts, lo, hi)
    half_width = rng.uniform(0.5, 1.5) * _SUPERSAMPLE

    def paint(canvas, to_hi):
        hp = to_hi(pts)
        for p0, p1 in itertools.pairwise(hp):
            d = p1 - p0
            n = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-9) * half_width
            quad = np.array([p0 + n, p1 + n, p1 - n, p0 - n])
            rr, cc = draw.polygon(quad[:, 0], quad[:, 1], shape=canvas.shape)
            canvas[rr, cc] = True
        for p in hp:  # round joints and caps
            rr, cc = draw.disk(tuple(p), half_width, shape=canvas.shape)
            canvas[rr, cc] = True

    cov = _coverage(size, paint)
    target = rng.uniform(215, 250) if rng.random() < 0.5 else rng.uniform(10, 40)
    alpha = (cov * rng.uniform(0.75, 0.95))[..., None]
    out = image.astype(np.float32) * (1 - alpha) + target * alpha
    return out, cov > 0.25


def _place_centre(
    rng: np.random.Generator, size: int, half_h: float, half_w: float
) -> tuple[float, float]:
    r = rng.uniform(half_h + _MARGIN + 1, size - 1 - half_h - _MARGIN - 1)
    c = rng.uniform(half_w + _MARGIN + 1, size - 1 - half_w - _MARGIN - 1)
    return r, c


def _hole(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    area = rng.uniform(0.04, 0.13) * size * size  # area of the hole including its rim
    ratio = rng.uniform(0.55, 1.0)
    a = np.sqrt(area / (np.pi * ratio))
    b = ratio * a
    rim = max(1.0, rng.uniform(1.5, 3.0) * size / 128)
    rotation = rng.uniform(-np.pi, np.pi)
    r, c = _place_centre(rng, size, a, a)
    f = _SUPERSAMPLE

    def ellipse(ra, rb):
        def paint(canvas, to_hi):
            rr, cc = draw.ellipse(
                to_hi(r), to_hi(c), ra * f, rb * f, shape=canvas.shape, rotation=rotation
            )
            canvas[rr, cc] = True

        return _coverage(size, paint)

    outer = ellipse(a, b)
    inner = ellipse(a - rim, b - rim)
    ring = np.clip(outer - inner, 0, 1)[..., None]
    inner = inner[..., None]
    src = image.astype(np.float32)
    dark = src * rng.uniform(0.15, 0.3) + rng.uniform(5, 20)
    out = src * (1 - inner) + dark * inner
    out = out + ring * rng.uniform(0.15, 0.3) * (255 - out)
    return out, outer >= 0.5


def _stain(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    area = rng.uniform(0.04, 0.13) * size * size
    if rng.random() < 0.5:  # random star-shaped polygon
        n = int(rng.integers(7, 13))
        step = 2 * np.pi / n
        theta = np.arange(n) * step + rng.uniform(-0.3, 0.3, n) * step + rng.uniform(0, step)
        radius = rng.uniform(0.65, 1.35, n)
        ys, xs = radius * np.sin(theta), radius * np.cos(theta)
        unit_area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
        scale = np.sqrt(area / unit_area)
        ys, xs = ys * scale, xs * scale
        r, c = _place_centre(rng, size, np.abs(ys).max(), np.abs(xs).max())

        def paint(canvas, to_hi):
            rr, cc = draw.polygon(to_hi(ys + r), to_hi(xs + c), shape=canvas.shape)
            canvas[rr, cc] = True

    else:  # ellipse
        ratio = rng.uniform(0.5, 1.0)
        a = np.sqrt(area / (np.pi * ratio))
        rotation = rng.uniform(-np.pi, np.pi)
        r, c = _place_centre(rng, size, a, a)
        f = _SUPERSAMPLE

        def paint(canvas, to_hi):
            rr, cc = draw.ellipse(
                to_hi(r), to_hi(c), a * f, ratio * a * f, shape=canvas.shape, rotation=rotation
            )
            canvas[rr, cc] = True

    cov = _coverage(size, paint)
    soft = ndimage.gaussian_filter(cov, 0.8)[..., None]
    colour = np.asarray(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))], np.float32)
    alpha = soft * rng.uniform(0.35, 0.6)
    out = image.astype(np.float32) * (1 - alpha) + colour * alpha
    return out, cov >= 0.5


_DEFECT_FUNCS = {"scratch": _scratch, "hole": _hole, "stain": _stain}


def add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of ``kind`` on a uint8 RGB image; return (new uint8 image, bool mask)."""
    if kind not in _DEFECT_FUNCS:
        raise ValueError(f"unknown defect type {kind!r}; choose one of {', '.join(DEFECT_TYPES)}")
    out, mask = _DEFECT_FUNCS[kind](image, rng)
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask


def _defect_counts(n_test_defect: int) -> dict[str, int]:
    base, extra = divmod(n_test_defect, len(DEFECT_TYPES))
    return {t: base + (i < extra) for i, t in enumerate(DEFECT_TYPES)}


def _count_files(folder: str, suffix: str = ".png") -> int:
    if not os.path.isdir(folder):
        return 0
    return sum(1 for n in os.listdir(folder) if n.endswith(suffix) and not n.startswith("."))


def _is_complete(cat_dir: str, n_train: int, n_test_good: int, counts: dict[str, int]) -> bool:
    if _count_files(os.path.join(cat_dir, "train", "good")) != n_train:
        return False
    if _count_files(os.path.join(cat_dir, "test", "good")) != n_test_good:
        return False
    for kind, n in counts.items():
        if _count_files(os.path.join(cat_dir, "test", kind)) != n:
            return False
        if _count_files(os.path.join(cat_dir, "ground_truth", kind), "_mask.png") != n:
            return False
    return True


def _read_marker(cat_dir: str) -> dict | None:
    try:
        with open(os.path.join(cat_dir, MARKER_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save_png(array: np.ndarray, path: str) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _generate(out_dir: str, params: dict, counts: dict[str, int]) -> None:
    size, seed = params["size"], params["seed"]
    texture = _load_texture(params["texture"])
    tint = _TINTS[params["texture"]]
    width = max(3, len(str(max(params["n_train"], params["n_test_good"], *counts.values()) - 1)))

    def name(i: int) -> str:
        return f"{i:0{width}d}"

    streams = [("train", "good", params["n_train"]), ("test", "good", params["n_test_good"])]
    for stream, (split, kind, n) in enumerate(streams):
        folder = os.path.join(out_dir, split, kind)
        os.makedirs(folder)
        for i in range(n):
            rng = np.random.default_rng([seed, stream, i])
            _save_png(
                normal_image(texture, size, rng, tint), os.path.join(folder, name(i) + ".png")
            )
    for k, kind in enumerate(DEFECT_TYPES):
        if counts[kind] == 0:
            continue
        folder = os.path.join(out_dir, "test", kind)
        gt_folder = os.path.join(out_dir, "ground_truth", kind)
        os.makedirs(folder)
        os.makedirs(gt_folder)
        for i in range(counts[kind]):
            rng = np.random.default_rng([seed, 2 + k, i])
            image, mask = add_defect(normal_image(texture, size, rng, tint), kind, rng)
            _save_png(image, os.path.join(folder, name(i) + ".png"))
            _save_png(mask.astype(np.uint8) * 255, os.path.join(gt_folder, name(i) + "_mask.png"))
    with open(os.path.join(out_dir, MARKER_FILE), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=1, sort_keys=True)


def make_demo_category(
    root: str,
    category: str = "demo_texture",
    size: int = 128,
    n_train: int = 160,
    n_test_good: int = 30,
    n_test_defect: int = 45,
    seed: int = 0,
    texture: str = "gravel",
) -> str:
    """Create (or reuse) the demo category ``root/category`` in MVTec layout; return its path.

    Defects are split evenly over :data:`DEFECT_TYPES`. An existing complete folder is
    returned untouched. A folder previously generated here with other parameters (or left
    incomplete) is regenerated; an incomplete folder not made by this function raises
    :class:`FileExistsError` rather than being overwritten. Writes go to a temporary folder
    that is renamed into place, so a crash never leaves a half-written category behind.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0:
        raise ValueError("n_train must be >= 1 and the test counts >= 0")
    _load_texture(texture)  # validate the name early
    cat_dir = os.path.join(root, category)
    counts = _defect_counts(n_test_defect)
    params = {
        "version": _FORMAT_VERSION,
        "texture": texture,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "seed": seed,
    }
    if os.path.exists(cat_dir):
        marker = _read_marker(cat_dir)
        complete = _is_complete(cat_dir, n_train, n_test_good, counts)
        if complete and (marker is None or marker == params):
            return cat_dir
        if marker is None:
            raise FileExistsError(
                f"{cat_dir} exists but does not hold the expected demo images and was not "
                "generated by make_demo_category; remove it or choose another root/category"
            )
        logger.info("regenerating demo category %s (parameters changed or incomplete)", cat_dir)
        shutil.rmtree(cat_dir)

    os.makedirs(root, exist_ok=True)
    tmp_dir = os.path.join(root, f".{category}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    try:
        _generate(tmp_dir, params, counts)
        try:
            os.rename(tmp_dir, cat_dir)
        except OSError:
            # Another process finished first: keep its copy if it is the same data.
            if _read_marker(cat_dir) == params and _is_complete(
                cat_dir, n_train, n_test_good, counts
            ):
                return cat_dir
            raise
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(
        "generated demo category %s: %d train, %d test good, %s defects in %.1fs",
        cat_dir,
        n_train,
        n_test_good,
        counts,
        time.perf_counter() - start,
    )
    return cat_dir
