"""DRAEM-style synthetic defect generation (pure numpy).

A thresholded, randomly rotated Perlin noise map selects a region; a texture (from an
anomaly-source image set such as DTD, or derived from the image itself) is passed through a
few random colour/geometry augmenters and alpha-blended into that region with opacity
``beta ~ U(beta_min, 1]``::

    x1 = x0                               outside the mask
    x1 = (1 - beta) * x0 + beta * texture inside the mask

With probability ``clean_prob`` the sample stays clean (``x1 == x0``, empty mask). Every random
draw goes through the ``numpy.random.Generator`` passed in, so results are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAX_MASK_ATTEMPTS = 16


@dataclass
class AugmentConfig:
    """Parameters of the synthetic-defect generator.

    Perlin scale exponents are drawn independently per axis from
    ``perlin_min_scale..perlin_max_scale`` *inclusive*, i.e. scales ``2**0 .. 2**5`` by default
    (capped at the image size along each axis).
    """

    clean_prob: float = 0.5
    perlin_min_scale: int = 0
    perlin_max_scale: int = 5
    threshold: float = 0.5
    beta_min: float = 0.2
    n_augmenters: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.clean_prob <= 1.0:
            raise ValueError(f"clean_prob must be in [0, 1], got {self.clean_prob}")
        if not 0 <= self.perlin_min_scale <= self.perlin_max_scale:
            raise ValueError(
                "need 0 <= perlin_min_scale <= perlin_max_scale, got "
                f"{self.perlin_min_scale}, {self.perlin_max_scale}"
            )
        if not 0.0 <= self.beta_min < 1.0:
            raise ValueError(f"beta_min must be in [0, 1), got {self.beta_min}")
        if not 0 <= self.n_augmenters <= len(AUGMENTERS):
            raise ValueError(
                f"n_augmenters must be in [0, {len(AUGMENTERS)}], got {self.n_augmenters}"
            )


@dataclass
class SynthResult:
    """Full output of :func:`synthesize_details` (``beta``/``texture`` are None when clean)."""

    image: np.ndarray
    mask: np.ndarray
    beta: float | None
    texture: np.ndarray | None


# --------------------------------------------------------------------------- Perlin noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _perlin_at(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gradient noise at lattice coordinates ``(u, v) >= 0`` with random unit gradients."""
    nu = math.floor(float(u.max())) + 2
    nv = math.floor(float(v.max())) + 2
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(nu, nv))
    gu, gv = np.cos(angles), np.sin(angles)
    i0 = np.floor(u).astype(np.intp)
    j0 = np.floor(v).astype(np.intp)
    fu = u - i0
    fv = v - j0

    def corner(di: int, dj: int) -> np.ndarray:
        i, j = i0 + di, j0 + dj
        return gu[i, j] * (fu - di) + gv[i, j] * (fv - dj)

    wu, wv = _fade(fu), _fade(fv)
    n0 = corner(0, 0) * (1.0 - wu) + corner(1, 0) * wu
    n1 = corner(0, 1) * (1.0 - wu) + corner(1, 1) * wu
    return math.sqrt(2.0) * (n0 * (1.0 - wv) + n1 * wv)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    *,
    angle: float = 0.0,
) -> np.ndarray:
    """Classic 2-D gradient Perlin noise of ``shape`` with ``res`` lattice periods per axis.

    Values lie in about ``[-1, 1]``. ``shape`` need not be divisible by ``res``: pixel centres
    are mapped to continuous lattice coordinates. ``angle`` (degrees) rotates the noise pattern
    by rotating the sampling grid, so there are no empty corners.
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = float(res[0]), float(res[1])
    if h <= 0 or w <= 0 or ry <= 0 or rx <= 0:
        raise ValueError(f"shape and res must be positive, got shape={shape}, res={res}")
    py = (np.arange(h, dtype=np.float64) + 0.5 - h / 2.0)[:, None]
    px = (np.arange(w, dtype=np.float64) + 0.5 - w / 2.0)[None, :]
    if angle:
        a = math.radians(angle)
        ca, sa = math.cos(a), math.sin(a)
        py, px = ca * py - sa * px, sa * py + ca * px
    u = py * (ry / h)
    v = px * (rx / w)
    u, v = np.broadcast_arrays(u - u.min(), v - v.min())
    return _perlin_at(u, v, rng)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Boolean (H, W) mask: rotated Perlin noise with random per-axis scale, > threshold.

    Retries up to ``MAX_MASK_ATTEMPTS`` times if the mask is empty; may still return an empty
    mask after that (callers treat it as a clean sample).
    """
    h, w = int(shape[0]), int(shape[1])
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(MAX_MASK_ATTEMPTS):
        ey, ex = rng.integers(cfg.perlin_min_scale, cfg.perlin_max_scale + 1, size=2)
        res = (min(2 ** int(ey), h), min(2 ** int(ex), w))
        angle = float(rng.uniform(-90.0, 90.0))
        mask = perlin_noise((h, w), res, rng, angle=angle) > cfg.threshold
        if mask.any():
            break
    return mask


# --------------------------------------------------------------------------- augmenters


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _brightness_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mul = rng.uniform(0.6, 1.4)
    add = rng.uniform(-40.0, 40.0)
    mean = x.mean()
    return _to_u8((x.astype(np.float32) - mean) * mul + mean + add)


def _gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(0.5, 2.0)
    lut = _to_u8(255.0 * (np.arange(256) / 255.0) ** g)
    return lut[x]


def _sharpness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIL-like sharpness enhancement: factor < 1 blurs, > 1 sharpens."""
    sigma = rng.uniform(0.5, 2.0)
    factor = rng.uniform(0.0, 2.5)
    xf = x.astype(np.float32)
    blurred = ndimage.gaussian_filter(xf, sigma=(sigma, sigma, 0.0), mode="reflect")
    return _to_u8(blurred + factor * (xf - blurred))


_RGB2YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def _hue_saturation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hue rotation (chroma rotation in YIQ space) plus saturation scaling."""
    theta = rng.uniform(-math.pi / 2.0, math.pi / 2.0)
    sat = rng.uniform(0.5, 1.5)
    c, s = math.cos(theta) * sat, math.sin(theta) * sat
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    m = (_YIQ2RGB @ rot @ _RGB2YIQ).astype(np.float32)
    return _to_u8(x.astype(np.float32) @ m.T)


def _channel_permutation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    perms = ((0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
    return np.ascontiguousarray(x[..., list(perms[int(rng.integers(len(perms)))])])


def _solarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = int(rng.integers(32, 129))
    return np.where(x >= t, 255 - x, x).astype(np.uint8)


def _posterize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(1, 5))
    return (x & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def _equalize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(x)
    n = x.shape[0] * x.shape[1]
    for ch in range(x.shape[2]):
        c = x[..., ch]
        cdf = np.cumsum(np.bincount(c.ravel(), minlength=256))
        cdf_min = cdf[cdf > 0][0]
        if n == cdf_min:
            out[..., ch] = c
            continue
        lut = _to_u8((cdf - cdf_min) / (n - cdf_min) * 255.0)
        out[..., ch] = lut[c]
    return out


def _autocontrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo = x.min(axis=(0, 1), keepdims=True).astype(np.float32)
    hi = x.max(axis=(0, 1), keepdims=True).astype(np.float32)
    scale = 255.0 / np.maximum(hi - lo, 1.0)
    return _to_u8((x - lo) * scale)


def _rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation by 90/180/270 (180 only for non-square) or a small affine rotation."""
    if rng.random() < 0.5:
        k = int(rng.integers(1, 4)) if x.shape[0] == x.shape[1] else 2
        return np.ascontiguousarray(np.rot90(x, k, axes=(0, 1)))
    angle = rng.uniform(-45.0, 45.0)
    return ndimage.rotate(x, angle, axes=(1, 0), reshape=False, order=1, mode="reflect")


def _flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    axis = int(rng.integers(2))
    return np.ascontiguousarray(np.flip(x, axis=axis))


def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - x).astype(np.uint8)


Augmenter = Callable[[np.ndarray, np.random.Generator], np.ndarray]

AUGMENTERS: dict[str, Augmenter] = {
    "brightness_contrast": _brightness_contrast,
    "gamma": _gamma,
    "sharpness": _sharpness,
    "hue_saturation": _hue_saturation,
    "channel_permutation": _channel_permutation,
    "solarize": _solarize,
    "posterize": _posterize,
    "equalize": _equalize,
    "autocontrast": _autocontrast,
    "rotate": _rotate,
    "flip": _flip,
    "invert": _invert,
}
_AUG_NAMES = tuple(AUGMENTERS)


def augment_texture(
    texture: np.ndarray, rng: np.random.Generator, n: int = 3
) -> tuple[np.ndarray, list[str]]:
    """Apply ``n`` distinct randomly chosen augmenters (random order); returns (image, names)."""
    idx = rng.choice(len(_AUG_NAMES), size=n, replace=False)
    names = [_AUG_NAMES[int(i)] for i in idx]
    out = texture
    for name in names:
        out = AUGMENTERS[name](out, rng)
    return out, names


# --------------------------------------------------------------------------- textures


def load_anomaly_source(folder: str | None, size: int) -> list[np.ndarray] | None:
    """Load ``*.jpg|*.jpeg|*.png`` under ``folder`` (recursive) as RGB uint8 (size, size, 3).

    Returns None when ``folder`` is None. Raises FileNotFoundError if the folder is missing and
    ValueError if it holds no images.
    """
    if folder is None:
        return None
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"anomaly source folder not found: {folder}")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(f"anomaly source folder has no .jpg/.jpeg/.png images: {folder}")
    out = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            out.append(np.asarray(im, dtype=np.uint8).copy())
    return out


def _fit_texture(tex: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Random-crop ``tex`` to (h, w) if it is large enough, otherwise resize it."""
    th, tw = tex.shape[:2]
    if (th, tw) == (h, w):
        return tex
    if th >= h and tw >= w:
        y = int(rng.integers(0, th - h + 1))
        x = int(rng.integers(0, tw - w + 1))
        return tex[y : y + h, x : x + w]
    return np.asarray(Image.fromarray(tex).resize((w, h), Image.BILINEAR), dtype=np.uint8)


def _self_texture(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture derived from the image: a flipped copy or a patch-shuffled copy."""
    h, w = image.shape[:2]
    if rng.random() < 0.5 or min(h, w) < 4:
        axes = [(0,), (1,), (0, 1)][int(rng.integers(3))]
        return np.ascontiguousarray(np.flip(image, axis=axes))
    g = int(rng.integers(2, min(8, min(h, w) // 2) + 1))
    ph, pw = h // g, w // g
    out = image.copy()
    block = image[: g * ph, : g * pw].reshape(g, ph, g, pw, 3).transpose(0, 2, 1, 3, 4)
    block = block.reshape(g * g, ph, pw, 3)
    perm = rng.permutation(g * g)
    if np.array_equal(perm, np.arange(g * g)):
        perm = np.roll(perm, 1)
    shuffled = block[perm].reshape(g, g, ph, pw, 3).transpose(0, 2, 1, 3, 4)
    out[: g * ph, : g * pw] = shuffled.reshape(g * ph, g * pw, 3)
    return out


def blend(x0: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``(1-beta)*x0 + beta*texture`` inside ``mask`` (rounded), exactly ``x0`` outside."""
    mixed = _to_u8((1.0 - beta) * x0.astype(np.float32) + beta * texture.astype(np.float32))
    return np.where(mask.astype(bool)[..., None], mixed, x0)


# --------------------------------------------------------------------------- synthesis


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"{name} must be a uint8 numpy array, got {getattr(image, 'dtype', image)}"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name} must have shape (H, W, 3), got {image.shape}")


def synthesize_details(
    image: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    source: list[np.ndarray] | None = None,
) -> SynthResult:
    """Like :func:`synthesize` but also returns the blend opacity and augmented texture."""
    _check_image(image)
    h, w = image.shape[:2]
    empty = np.zeros((h, w), dtype=np.float32)
    if rng.random() < cfg.clean_prob:
        return SynthResult(image.copy(), empty, None, None)
    mask = perlin_mask((h, w), rng, cfg)
    if not mask.any():
        return SynthResult(image.copy(), empty, None, None)

    if source:
        tex = source[int(rng.integers(len(source)))]
        _check_image(tex, "anomaly source image")
        tex = _fit_texture(tex, h, w, rng)
    else:
        tex = _self_texture(image, rng)
    tex, _ = augment_texture(tex, rng, cfg.n_augmenters)
    if tex.shape != image.shape:  # defensive: geometry augmenters keep the shape
        tex = _fit_texture(tex, h, w, rng)
    if np.abs(tex.astype(np.int16) - image.astype(np.int16)).mean() < 1.0:
        tex = _invert(tex, rng)  # augmenters cancelled out: make sure the defect is visible

    beta = float(1.0 - rng.uniform(0.0, 1.0 - cfg.beta_min))  # U(beta_min, 1]
    x1 = blend(image, tex, mask, beta)
    return SynthResult(x1, mask.astype(np.float32), beta, tex)


def synthesize(
    image: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    source: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM synthetic defect: returns (x1 uint8 (H, W, 3), mask float32 (H, W) in {0, 1})."""
    res = synthesize_details(image, rng, cfg, source)
    return res.image, res.mask


def synthesize_batch(
    images: np.ndarray,
    seeds: np.ndarray,
    cfg: AugmentConfig,
    source: list[np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row :func:`synthesize` with ``np.random.default_rng(int(seeds[i]))``.

    ``images`` is uint8 (B, H, W, 3); returns x1 uint8 (B, H, W, 3) and masks float32 (B, H, W).
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(
            f"images must be a uint8 numpy array, got {getattr(images, 'dtype', images)}"
        )
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3), got {images.shape}")
    seeds = np.asarray(seeds)
    if seeds.shape != (images.shape[0],):
        raise ValueError(f"seeds must have shape ({images.shape[0]},), got {seeds.shape}")
    x1 = np.empty_like(images)
    masks = np.empty(images.shape[:3], dtype=np.float32)
    for i in range(images.shape[0]):
        x1[i], masks[i] = synthesize(images[i], np.random.default_rng(int(seeds[i])), cfg, source)
    return x1, masks
