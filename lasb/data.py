"""Image decoding and MVTec-AD style dataset listing.

Layout handled here::

    <root>/<category>/train/good/*                         normal training images
    <root>/<category>/test/good/*                          normal test images
    <root>/<category>/test/<defect>/*                      defective test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png  pixel masks (255 = defect)

Decoding is strict: every failure raises :class:`ImageDecodeError`, whose message names the
file and the cause, so a bad upload or a broken dataset file is reported instead of
silently producing a black or half-decoded image.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lasb import storage

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 64_000_000

# 8-bit modes converted to RGB (alpha dropped). "PA" and "RGBX" are 8-bit too and harmless.
_ACCEPTED_MODES = frozenset({"1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBX"})
_HINT = "convert the image to 8-bit RGB or 8-bit greyscale"
_MODE_DESCRIPTIONS = {
    "I": "32-bit integer",
    "F": "32-bit float",
    "CMYK": "CMYK colour space",
    "YCbCr": "YCbCr colour space",
    "LAB": "Lab colour space",
    "HSV": "HSV colour space",
}
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
}


class ImageDecodeError(ValueError):
    """An image (or mask) file could not be decoded; ``str()`` is ``"<uri>: <reason>"``."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):  # keep picklable (Ray ships exceptions between processes)
        return (type(self), (self.uri, self.reason))


def _sniff_format(data: bytes) -> str | None:
    """Name of the image format the leading bytes announce, if any."""
    for magic, name in _SIGNATURES.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _mode_reason(mode: str) -> str:
    """Reason text for an unsupported PIL mode."""
    if mode.startswith("I;16"):
        desc = "16-bit"
    else:
        desc = _MODE_DESCRIPTIONS.get(mode, "not an 8-bit greyscale/RGB mode")
    return f"unsupported mode {mode} ({desc}); {_HINT}"


def _open_checked(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    """Open, validate (size and mode from the header), decode and EXIF-orient an image."""
    if len(data) == 0:
        raise ImageDecodeError(uri, "empty file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's warning-level bomb check.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(uri, f"image too large: {exc}") from exc
    except Image.DecompressionBombWarning as exc:  # if a global filter turned it into an error
        raise ImageDecodeError(uri, f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        fmt = _sniff_format(data)
        if fmt is not None:
            reason = f"truncated or corrupt image data ({fmt} header is incomplete or damaged)"
        else:
            reason = f"not an image (format not recognised; file starts with {data[:16]!r})"
        raise ImageDecodeError(uri, reason) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(
            uri, f"truncated or corrupt image data ({type(exc).__name__}: {exc})"
        ) from exc

    width, height = im.size
    n_pixels = width * height
    if n_pixels > max_pixels:
        raise ImageDecodeError(
            uri,
            f"image too large: {width} x {height} = {n_pixels} pixels exceeds the limit of "
            f"{max_pixels}",
        )
    if im.mode not in _ACCEPTED_MODES:
        raise ImageDecodeError(uri, _mode_reason(im.mode))

    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # multi-frame (GIF/TIFF/WebP): use the first frame
        im.load()
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(uri, f"image too large: {exc}") from exc
    except Exception as exc:  # PIL raises many exception types for damaged data
        raise ImageDecodeError(
            uri, f"truncated or corrupt image data ({type(exc).__name__}: {exc})"
        ) from exc

    try:
        im = ImageOps.exif_transpose(im)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the image
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", uri, exc)
    return im


def decode_image(
    data: bytes, uri: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode encoded image bytes to a uint8 RGB array of shape (H, W, 3).

    Greyscale, palette and alpha images are converted to RGB (alpha is dropped), the first
    frame of multi-frame files is used and the EXIF orientation is applied. Raises
    :class:`ImageDecodeError` naming ``uri`` and the cause for anything else.
    """
    im = _open_checked(data, uri, max_pixels)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def decode_mask(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a ground-truth mask to a bool (H, W) array: greyscale value > 127 is a defect."""
    im = _open_checked(data, uri, max_pixels)
    if im.mode != "L":
        im = im.convert("L")
    return np.array(im, dtype=np.uint8) > 127


def read_bytes(path: str) -> bytes:
    """Read a whole file through lasb.storage (local paths and URIs such as ``s3://``)."""
    with storage.open_url(path, "rb") as f:
        return f.read()


def load_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one image file to uint8 RGB (H, W, 3)."""
    return decode_image(read_bytes(path), uri=path, max_pixels=max_pixels)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB (or greyscale) uint8 image to (size, size, 3) with antialiased bilinear."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.shape[:2] == (size, size):
        return image.copy()
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.array(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool (H, W) mask to (size, size): bilinear on 0/1 floats, then > 0.5."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    if mask.shape == (size, size):
        return mask.astype(bool)
    pil = Image.fromarray(mask.astype(np.float32))
    return np.array(pil.resize((size, size), Image.Resampling.BILINEAR)) > 0.5


@dataclass
class Sample:
    """One image of an MVTec-style category."""

    path: str
    split: str  # "train" | "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal
    mask_path: str | None


def _is_image_file(folder: str, name: str) -> bool:
    return (
        not name.startswith(".")
        and name.lower().endswith(SUPPORTED_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, name))
    )


def _image_files(folder: str) -> list[str]:
    """Sorted names of the supported image files in ``folder`` (hidden files skipped)."""
    names = sorted(os.listdir(folder))
    keep = [n for n in names if _is_image_file(folder, n)]
    skipped = [n for n in names if n not in keep and not n.startswith(".")]
    if skipped:
        logger.debug("%s: skipping %d non-image entries: %s", folder, len(skipped), skipped[:5])
    return keep


def list_categories(root: str) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that contain ``train/good``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} does not exist or is not a directory")
    return sorted(
        name
        for name in os.listdir(root)
        if not name.startswith(".") and os.path.isdir(os.path.join(root, name, "train", "good"))
    )


def _find_mask(gt_dir: str, stem: str, lookup: dict[str, str]) -> str | None:
    for candidate in (f"{stem}_mask.png", f"{stem}.png"):
        name = lookup.get(candidate.lower())
        if name is not None:
            return os.path.join(gt_dir, name)
    return None


def list_samples(root: str, category: str, split: str) -> list[Sample]:
    """List the images of one split of a category, in a deterministic order.

    ``train`` returns ``train/good`` only. ``test`` returns ``test/good`` first, then each
    defect folder in alphabetical order; files are sorted by name inside a folder. Defect
    images are paired with ``ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``);
    without one, ``mask_path`` is None.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    available = list_categories(root)
    if category not in available:
        names = ", ".join(available) if available else "(none)"
        raise ValueError(f"unknown category {category!r} under {root}; available: {names}")
    cat_dir = os.path.join(root, category)
    split_dir = os.path.join(cat_dir, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split folder {split_dir} does not exist")

    samples: list[Sample] = []
    if split == "train":
        good_dir = os.path.join(split_dir, "good")
        others = [
            n
            for n in sorted(os.listdir(split_dir))
            if n != "good" and not n.startswith(".") and os.path.isdir(os.path.join(split_dir, n))
        ]
        if others:
            logger.warning("%s: ignoring non-'good' training folders %s", split_dir, others)
        names = _image_files(good_dir)
        if not names:
            raise ValueError(f"no training images in {good_dir}")
        return [Sample(os.path.join(good_dir, n), "train", 0, "good", None) for n in names]

    defect_dirs = sorted(
        n
        for n in os.listdir(split_dir)
        if not n.startswith(".") and os.path.isdir(os.path.join(split_dir, n))
    )
    if "good" in defect_dirs:
        defect_dirs.remove("good")
        defect_dirs.insert(0, "good")
    n_missing = 0
    for defect in defect_dirs:
        folder = os.path.join(split_dir, defect)
        names = _image_files(folder)
        if defect == "good":
            samples.extend(Sample(os.path.join(folder, n), "test", 0, "good", None) for n in names)
            continue
        gt_dir = os.path.join(cat_dir, "ground_truth", defect)
        lookup = {}
        if os.path.isdir(gt_dir):
            lookup = {n.lower(): n for n in os.listdir(gt_dir) if not n.startswith(".")}
        for n in names:
            mask_path = _find_mask(gt_dir, os.path.splitext(n)[0], lookup)
            n_missing += mask_path is None
            samples.append(Sample(os.path.join(folder, n), "test", 1, defect, mask_path))
    if n_missing:
        logger.warning("%s: %d defect images have no ground-truth mask", split_dir, n_missing)
    if not samples:
        logger.warning("%s: no test images found", split_dir)
    return samples


def split_holdout(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split normal training samples at random into (train, holdout), deterministically.

    The holdout gets ``round(fraction * n)`` samples, at least 1 when ``fraction > 0`` and
    ``n >= 2``, and at most ``n - 1``. Both lists keep the input order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    anomalous = [s.path for s in samples if s.label != 0]
    if anomalous:
        raise ValueError(
            f"split_holdout expects normal samples only; got anomalous {anomalous[:3]}"
        )
    n = len(samples)
    n_hold = 0
    if fraction > 0 and n >= 2:
        n_hold = min(max(round(fraction * n), 1), n - 1)
    if fraction > 0 and n_hold == 0:
        logger.warning("holdout is empty: only %d training sample(s)", n)
    held = set(np.random.default_rng(seed).permutation(n)[:n_hold].tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    holdout = [s for i, s in enumerate(samples) if i in held]
    return train, holdout


class LoadedSamples(NamedTuple):
    """Result of :func:`load_samples`; nothing is dropped silently.

    ``images[j]`` and ``masks[j]`` belong to ``samples[kept[j]]``. ``errors[j]`` (a
    ``"<path>: <reason>"`` string) explains why ``samples[failed[j]]`` was not loaded.
    ``kept`` and ``failed`` are ascending and together cover every input index once.
    """

    images: np.ndarray  # uint8 (len(kept), size, size, 3)
    masks: np.ndarray  # bool (len(kept), size, size); all False where a sample has no mask
    errors: list[str]
    kept: list[int]
    failed: list[int]


def load_samples(
    samples: Sequence[Sample], size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> LoadedSamples:
    """Decode and resize samples (and their masks) to ``size`` x ``size``.

    Files that cannot be read or decoded (image or mask) are reported in ``errors`` /
    ``failed`` and left out of the arrays; see :class:`LoadedSamples`.
    """
    n = len(samples)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    kept: list[int] = []
    failed: list[int] = []
    errors: list[str] = []
    for i, sample in enumerate(samples):
        current = sample.path
        try:
            image = load_image(sample.path, max_pixels=max_pixels)
            mask = None
            if sample.mask_path is not None:
                current = sample.mask_path
                mask = decode_mask(read_bytes(sample.mask_path), sample.mask_path, max_pixels)
        except ImageDecodeError as exc:
            failed.append(i)
            errors.append(str(exc))
            continue
        except OSError as exc:  # missing file, permissions, remote storage errors
            failed.append(i)
            errors.append(f"{current}: cannot read file ({type(exc).__name__}: {exc})")
            continue
        j = len(kept)
        images[j] = resize_image(image, size)
        if mask is not None:
            if mask.shape != image.shape[:2]:
                logger.warning(
                    "%s: mask size %s differs from image size %s; resizing both to %d",
                    sample.mask_path,
                    mask.shape[::-1],
                    image.shape[1::-1],
                    size,
                )
            masks[j] = resize_mask(mask, size)
        kept.append(i)
    if failed:
        logger.warning("%d of %d images could not be loaded: %s", len(failed), n, errors[:3])
        images = images[: len(kept)].copy()
        masks = masks[: len(kept)].copy()
    return LoadedSamples(images, masks, errors, kept, failed)
