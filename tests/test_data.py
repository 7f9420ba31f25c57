"""Tests for lasb.data (decoding, MVTec listing, loading) and lasb.demo_data."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from scipy import ndimage

from lasb.data import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    Sample,
    decode_image,
    decode_mask,
    list_categories,
    list_samples,
    load_image,
    load_samples,
    resize_image,
    resize_mask,
    split_holdout,
)
from lasb.demo_data import DEFECT_TYPES, add_defect, make_demo_category, normal_image

RNG = np.random.default_rng(1234)
RGB = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- bad images

_PNG = encode(Image.fromarray(RGB))
_JPEG = encode(Image.fromarray(RGB), "JPEG", quality=90)
_GREY16 = Image.fromarray((np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16))
assert _GREY16.mode == "I;16"

BAD_CASES = [
    ("empty.png", b"", {}, ["empty file"]),
    ("half.png", _PNG[: len(_PNG) // 2], {}, ["truncated"]),
    ("half.jpg", _JPEG[: len(_JPEG) // 2], {}, ["truncated"]),
    ("notes.png", b"hello, this is a text file\n" * 5, {}, ["not an image"]),
    ("deep.png", encode(_GREY16), {}, ["unsupported mode I;16", "16-bit", "8-bit"]),
    ("print.jpg", encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), {}, ["CMYK", "8-bit"]),
    (
        "big.png",
        encode(Image.fromarray(np.zeros((200, 200, 3), np.uint8))),
        {"max_pixels": 1000},
        ["image too large", "200 x 200 = 40000 pixels", "limit of 1000"],
    ),
]


@pytest.mark.parametrize("name,data,kwargs,keywords", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_images_raise_decode_error_naming_file_and_cause(
    tmp_path, name, data, kwargs, keywords
):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError) as info:
        load_image(str(path), **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.uri == str(path)
    assert name in str(err)
    assert str(err) == f"{path}: {err.reason}"
    for keyword in keywords:
        assert keyword in err.reason


def test_decode_error_is_picklable():
    err = pickle.loads(pickle.dumps(ImageDecodeError("a.png", "empty file")))
    assert (err.uri, err.reason, str(err)) == ("a.png", "empty file", "a.png: empty file")


def test_decode_mask_has_same_error_handling():
    with pytest.raises(ImageDecodeError, match="m_mask.png: not an image"):
        decode_mask(b"GIF? no", "m_mask.png")


def test_size_limit_is_checked_before_pixels_are_decoded(monkeypatch):
    loads = []
    original = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = encode(Image.fromarray(np.zeros((200, 200, 3), np.uint8)))
    with pytest.raises(ImageDecodeError, match="image too large"):
        decode_image(data, "small.png", max_pixels=1000)
    assert loads == []
    decode_image(data, "small.png")  # the spy does see a normal decode
    assert loads


@pytest.mark.parametrize("width,height", [(10_000, 8_000), (100_000, 100_000)])
def test_huge_header_without_pixel_data_is_rejected_as_too_large(width, height):
    # If pixels were decoded first, this would fail as "truncated" instead.
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_header_only(width, height), "bomb.png")
    assert info.value.reason.startswith("image too large")
    if width * height < 89_000_000:  # below PIL's own bomb limit: our exact message
        assert f"{width} x {height} = {width * height} pixels" in info.value.reason
        assert str(DEFAULT_MAX_PIXELS) in info.value.reason


def test_small_header_without_pixel_data_is_truncated():
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(png_header_only(40, 30), "short.png")


# --------------------------------------------------------------------------- good images


def test_lossless_png_roundtrip_preserves_values():
    out = decode_image(encode(Image.fromarray(RGB)))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, RGB)
    out[0, 0] = 0  # result is a normal writable array


def test_greyscale_png_becomes_three_equal_channels():
    grey = RGB[..., 0]
    out = decode_image(encode(Image.fromarray(grey)))
    assert out.shape == (40, 60, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_rgba_drops_alpha_and_la_and_1bit_work():
    alpha = np.full((40, 60, 1), 7, np.uint8)
    out = decode_image(encode(Image.fromarray(np.concatenate([RGB, alpha], axis=2))))
    np.testing.assert_array_equal(out, RGB)
    grey = Image.fromarray(RGB[..., 0])
    la = Image.merge("LA", (grey, Image.fromarray(RGB[..., 1])))
    out = decode_image(encode(la))
    assert out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out[..., 2], RGB[..., 0])
    bits = Image.fromarray(RGB[..., 0] > 128)
    np.testing.assert_array_equal(decode_image(encode(bits))[..., 1], (RGB[..., 0] > 128) * 255)


def test_palette_png_becomes_rgb():
    pal = Image.fromarray(RGB).quantize(colors=8)
    assert pal.mode == "P"
    np.testing.assert_array_equal(decode_image(encode(pal)), np.array(pal.convert("RGB")))


def test_multiframe_gif_uses_first_frame():
    frames = [Image.fromarray(np.full((6, 8, 3), v, np.uint8)) for v in (30, 200)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(data, "anim.gif")
    assert out.shape == (6, 8, 3)
    assert abs(int(out.mean()) - 30) <= 2


def test_exif_orientation_is_applied():
    stored = np.zeros((100, 150, 3), np.uint8)  # H=100, W=150
    stored[:50, :75] = (255, 0, 0)  # red block top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, "cam.jpg")
    assert out.shape == (150, 100, 3)
    top_right = out[:75, 50:].reshape(-1, 3).mean(axis=0)
    top_left = out[:75, :50].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[1] < 40
    assert top_left[0] < 40


def test_decode_mask_thresholds_greyscale():
    values = np.array([[0, 100, 127], [128, 200, 255]], np.uint8)
    mask = decode_mask(encode(Image.fromarray(values)), "m.png")
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, values > 127)
    rgb_mask = np.repeat(values[..., None], 3, axis=2)
    np.testing.assert_array_equal(decode_mask(encode(Image.fromarray(rgb_mask)), "m.png"), mask)


def test_resize_image_and_mask():
    out = resize_image(RGB, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert resize_image(RGB[..., 0], 16).shape == (16, 16, 3)
    mask = np.zeros((40, 60), bool)
    mask[10:30, 20:50] = True
    small = resize_mask(mask, 20)
    assert small.shape == (20, 20) and small.dtype == bool
    assert small[10, 10] and not small[0, 0]
    assert abs(small.mean() - mask.mean()) < 0.05


# --------------------------------------------------------------------------- MVTec listing


def _write_png(path, value: int = 0, size=(8, 8)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "data"
    cat = root / "cat_a"
    for rel in ["train/good/001.png", "train/good/000.png", "test/good/000.png"]:
        _write_png(str(cat / rel), 50)
    for rel in ["test/crack/000.png", "test/crack/001.png", "test/color/000.png"]:
        _write_png(str(cat / rel), 200)
    _write_png(str(cat / "test/crack/002.JPG"), 200)
    (cat / "train/good/.hidden.png").write_bytes(b"")
    (cat / "train/good/notes.txt").write_text("not an image")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    os.makedirs(cat / "ground_truth/crack")
    Image.fromarray(mask).save(cat / "ground_truth/crack/000_mask.png")
    Image.fromarray(mask).save(cat / "ground_truth/crack/001.png")  # plain <stem>.png
    _write_png(str(root / "cat_b/train/good/000.png"))
    os.makedirs(root / "not_a_category/test")
    os.makedirs(root / "cat_c/train/good")  # empty
    return root


def test_list_categories(tree):
    assert list_categories(str(tree)) == ["cat_a", "cat_b", "cat_c"]
    with pytest.raises(FileNotFoundError):
        list_categories(str(tree / "missing"))


def test_list_samples_train(tree):
    train = list_samples(str(tree), "cat_a", "train")
    good = tree / "cat_a/train/good"
    assert [s.path for s in train] == [str(good / "000.png"), str(good / "001.png")]
    assert all(s.split == "train" and s.label == 0 and s.defect_type == "good" for s in train)
    assert all(s.mask_path is None for s in train)


def test_list_samples_test_labels_masks_and_order(tree):
    test = list_samples(str(tree), "cat_a", "test")
    rel = [os.path.relpath(s.path, tree / "cat_a/test") for s in test]
    assert rel == [
        "good/000.png",
        "color/000.png",
        "crack/000.png",
        "crack/001.png",
        "crack/002.JPG",
    ]
    assert [s.label for s in test] == [0, 1, 1, 1, 1]
    assert [s.defect_type for s in test] == ["good", "color", "crack", "crack", "crack"]
    gt = tree / "cat_a/ground_truth/crack"
    assert [s.mask_path for s in test] == [
        None,
        None,
        str(gt / "000_mask.png"),
        str(gt / "001.png"),
        None,
    ]
    assert test == list_samples(str(tree), "cat_a", "test")  # deterministic


def test_list_samples_errors(tree):
    with pytest.raises(
        ValueError, match=r"unknown category 'nope' under .*available: cat_a, cat_b"
    ):
        list_samples(str(tree), "nope", "train")
    with pytest.raises(FileNotFoundError, match=r"cat_b.test"):
        list_samples(str(tree), "cat_b", "test")
    with pytest.raises(ValueError, match=r"cat_c.train.good"):
        list_samples(str(tree), "cat_c", "train")
    with pytest.raises(ValueError, match="split"):
        list_samples(str(tree), "cat_a", "val")


def test_load_samples_reports_failures_and_keeps_masks(tree):
    test = list_samples(str(tree), "cat_a", "test")
    bad = tree / "cat_a/test/crack/003.png"
    bad.write_text("broken")
    broken_mask = tree / "cat_a/ground_truth/crack/004_mask.png"
    broken_mask.write_bytes(b"")
    samples = test + [
        Sample(str(bad), "test", 1, "crack", None),
        Sample(str(tree / "cat_a/test/crack/000.png"), "test", 1, "crack", str(broken_mask)),
        Sample(str(tree / "cat_a/test/crack/missing.png"), "test", 1, "crack", None),
    ]
    out = load_samples(samples, 16)
    images, masks, errors, kept, failed = out  # plain tuple unpacking works too
    assert kept == [0, 1, 2, 3, 4] and failed == [5, 6, 7]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert masks.shape == (5, 16, 16) and masks.dtype == bool
    assert len(errors) == 3
    assert "003.png" in errors[0] and "not an image" in errors[0]
    assert "004_mask.png" in errors[1] and "empty file" in errors[1]
    assert "missing.png" in errors[2] and "cannot read" in errors[2]
    assert not masks[[0, 1, 4]].any()
    assert masks[2].sum() > 0 and masks[3].sum() > 0
    assert int(images[0].mean()) == 50 and int(images[2].mean()) == 200


# --------------------------------------------------------------------------- holdout


def _normals(n: int) -> list[Sample]:
    return [Sample(f"/x/{i:03d}.png", "train", 0, "good", None) for i in range(n)]


def test_split_holdout_deterministic_disjoint_covering():
    samples = _normals(20)
    train, hold = split_holdout(samples, 0.25, seed=7)
    assert (train, hold) == split_holdout(samples, 0.25, seed=7)
    assert len(hold) == 5 and len(train) == 15
    assert {s.path for s in train}.isdisjoint(s.path for s in hold)
    assert sorted([s.path for s in train + hold]) == [s.path for s in samples]
    assert [s.path for s in train] == sorted(s.path for s in train)  # input order kept
    other = [split_holdout(samples, 0.25, seed=s)[1] for s in range(8, 12)]
    assert any(h != hold for h in other)


def test_split_holdout_edge_cases():
    assert split_holdout(_normals(2), 0.01, 0)[1].__len__() == 1
    assert len(split_holdout(_normals(3), 0.9, 0)[0]) == 1  # never empties train
    assert split_holdout(_normals(5), 0.0, 0) == (_normals(5), [])
    assert split_holdout(_normals(1), 0.5, 0) == (_normals(1), [])
    with pytest.raises(ValueError):
        split_holdout(_normals(5), 1.0, 0)
    with pytest.raises(ValueError, match="normal"):
        split_holdout([Sample("/x/a.png", "test", 1, "crack", None)], 0.5, 0)


# --------------------------------------------------------------------------- demo data

DEMO = {"size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 6, "seed": 3}


@pytest.fixture(scope="module")
def demo_roots(tmp_path_factory):
    a = tmp_path_factory.mktemp("demo_a")
    b = tmp_path_factory.mktemp("demo_b")
    return make_demo_category(str(a), **DEMO), make_demo_category(str(b), **DEMO)


def _files(cat_dir: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(cat_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, cat_dir)] = f.read()
    return out


def test_demo_layout(demo_roots):
    cat = demo_roots[0]
    assert os.path.basename(cat) == "demo_texture"
    assert sorted(os.listdir(os.path.join(cat, "train", "good"))) == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
    ]
    assert sorted(os.listdir(os.path.join(cat, "test"))) == ["good", "hole", "scratch", "stain"]
    assert len(os.listdir(os.path.join(cat, "test", "good"))) == 2
    for kind in DEFECT_TYPES:
        assert sorted(os.listdir(os.path.join(cat, "test", kind))) == ["000.png", "001.png"]
        gt = sorted(os.listdir(os.path.join(cat, "ground_truth", kind)))
        assert gt == ["000_mask.png", "001_mask.png"]


def test_demo_defects_have_valid_masks(demo_roots):
    cat = demo_roots[0]
    for kind in DEFECT_TYPES:
        for stem in ("000", "001"):
            image = load_image(os.path.join(cat, "test", kind, stem + ".png"))
            mask_path = os.path.join(cat, "ground_truth", kind, stem + "_mask.png")
            with open(mask_path, "rb") as f:
                raw = np.array(Image.open(f))
            assert set(np.unique(raw)) <= {0, 255}
            mask = raw > 127
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert mask.any()
            # within bounds: the defect does not touch the image border
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            if kind in ("hole", "stain"):
                assert 0.03 <= mask.mean() <= 0.15
            else:  # scratches are long and thin
                rows, cols = np.nonzero(mask)
                assert np.hypot(np.ptp(rows), np.ptp(cols)) >= 0.4 * 64
                assert mask.mean() < 0.05


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_defect_changes_match_mask(kind):
    from lasb.demo_data import _load_texture

    texture = _load_texture("gravel")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        base = normal_image(texture, 64, rng)
        image, mask = add_defect(base, kind, rng)
        diff = np.abs(image.astype(int) - base.astype(int)).max(axis=2)
        changed = diff > 12
        # every visible change lies on or right next to the mask (anti-aliased edges) ...
        assert not (changed & ~ndimage.binary_dilation(mask, iterations=2)).any()
        # ... and the masked region is clearly changed
        assert diff[mask].mean() > 25


def test_demo_is_deterministic_and_idempotent(demo_roots, tmp_path):
    cat_a, cat_b = demo_roots
    files_a = _files(cat_a)
    assert files_a == _files(cat_b)
    mtimes = {p: os.stat(os.path.join(cat_a, p)).st_mtime_ns for p in files_a}
    assert make_demo_category(os.path.dirname(cat_a), **DEMO) == cat_a
    assert {p: os.stat(os.path.join(cat_a, p)).st_mtime_ns for p in files_a} == mtimes
    other = make_demo_category(str(tmp_path), **{**DEMO, "seed": 4, "n_test_defect": 3})
    assert _files(other)["train/good/000.png"] != files_a["train/good/000.png"]


def test_demo_refuses_to_overwrite_foreign_folder(tmp_path):
    os.makedirs(tmp_path / "demo_texture" / "train" / "good")
    with pytest.raises(FileExistsError):
        make_demo_category(str(tmp_path), **DEMO)


def test_demo_is_readable_by_list_and_load_samples(demo_roots):
    root = os.path.dirname(demo_roots[0])
    assert list_categories(root) == ["demo_texture"]
    train = list_samples(root, "demo_texture", "train")
    test = list_samples(root, "demo_texture", "test")
    assert len(train) == 4 and len(test) == 8
    assert [s.label for s in test] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(s.mask_path is not None for s in test if s.label == 1)
    loaded = load_samples(test, 32)
    assert loaded.errors == [] and loaded.kept == list(range(8))
    assert loaded.masks[:2].sum() == 0
    assert all(loaded.masks[i].any() for i in range(2, 8))


def test_demo_texture_is_bundled_with_scikit_image():
    import skimage.data

    folder = os.path.dirname(skimage.data.__file__)
    assert os.path.isfile(os.path.join(folder, "gravel.png"))
