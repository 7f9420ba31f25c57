"""Ingest building blocks: list a source, plan shards, read + hash + validate, shard tables.

Plain functions (no Ray here; ``jobs/ingest.py`` runs them in Ray Data tasks), so that each
step can be unit-tested and reused, e.g. :func:`read_shard_images` for a training reader.

Source layouts (local folder or ``s3://`` prefix):

* MVTec: ``[<category>/]{train,test}/<defect_type>/<file>`` and
  ``[<category>/]ground_truth/<defect_type>/<stem>_mask.png`` (the category is the folder name
  when SRC is the category folder itself). Masks are not rows: each is stored in the ``mask``
  column of its test image's row.
* Loose images (an "image lake"): any other file; ``category``/``split`` come from the command
  line (or stay null), ``label`` is 0 for ``split=train`` (training data is normal by
  definition) and null otherwise.

Accounting: every non-hidden file under SRC is *one* of: a shard row (an image), the mask of a
row, or a row of the rejects table with a reason (:data:`REASONS`). Duplicates (same sha256
as an image with a smaller URI) are rejected with reason ``duplicate`` so that
``files_seen == rows + masks_attached + rejected`` always holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lasb import storage
from lasb.data import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    decode_mask,
    resize_image,
)

log = logging.getLogger("lasb.ingest")

# DESIGN.md shard schema: one row per image
SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),  # the file's bytes, unchanged (PNG, JPEG, ...)
    ("uri", pa.string()),
    ("category", pa.string()),
    ("split", pa.string()),
    ("label", pa.int8()),  # 0 normal, 1 anomalous, null unknown
    ("defect_type", pa.string()),
    ("mask", pa.binary()),  # encoded PNG (255 = defect) or null
    ("width", pa.int32()),  # of the decoded, EXIF-oriented image
    ("height", pa.int32()),
    ("sha256", pa.string()),  # of ``image``
])
REJECTS_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("reason", pa.string()),  # one of REASONS
    ("detail", pa.string()),  # the full message (decoder error, "duplicate of <uri>", ...)
    ("size", pa.int64()),
    ("sha256", pa.string()),  # null when the file was not (or could not be) read
])
# per input file, produced by the read/validate tasks; rows and rejects are derived from these
RECORD_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("role", pa.string()),  # "image" | "mask" | "other"
    ("size", pa.int64()),
    ("sha256", pa.string()),
    ("reason", pa.string()),  # null = valid
    ("detail", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("owner", pa.string()),  # masks: the image uri they belong to
    ("chunk", pa.string()),
])

REASONS = ("empty", "truncated", "not an image", "too large", "unsupported mode", "unreadable",
           "duplicate", "orphan mask")
# lasb.data.ImageDecodeError reasons start with these
_DECODE_KINDS = (("empty file", "empty"), ("truncated", "truncated"),
                 ("not an image", "not an image"), ("image too large", "too large"),
                 ("unsupported mode", "unsupported mode"))
_SPLITS = ("train", "test")
_GROUND_TRUTH = "ground_truth"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_READ_THREADS = 8  # object stores: many small GETs in flight per task


def decode_kind(reason: str) -> str:
    """Map a lasb.data decode-error reason to one of :data:`REASONS`."""
    for prefix, kind in _DECODE_KINDS:
        if reason.startswith(prefix):
            return kind
    return "truncated"  # data.py reports every other decoder failure as corrupt data


# ---------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One input file and what it is, decided from its path alone (nothing read yet)."""

    uri: str
    size: int
    role: str  # "image" | "mask" | "other" (no image extension: rejected without reading)
    category: str | None = None
    split: str | None = None
    label: int | None = None
    defect_type: str | None = None
    mask: str | None = None  # image: uri of its ground-truth mask
    mask_size: int | None = None
    owner: str | None = None  # mask: uri of its image (None = orphan)


@dataclass
class SourceListing:
    layout: str  # "mvtec" | "images"
    entries: list[Entry]  # sorted by uri
    hidden: int  # hidden files/folders skipped (".DS_Store", ".git/...): not inputs


def url_of(fs, path: str) -> str:
    """The user-facing URI of ``path`` in ``fs``: the local path, or ``s3://bucket/key``."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _walk(fs, root: str, exclude: str | None) -> tuple[dict[str, int], int]:
    """{path: size} of the files under ``root`` (minus hidden ones and ``exclude``)."""
    fs.invalidate_cache()  # object-store listings are cached per filesystem instance
    if fs.isfile(root):
        return {root: int(fs.info(root)["size"])}, 0
    if not fs.exists(root):
        raise FileNotFoundError(f"source {root!r} does not exist")
    found = fs.find(root, detail=True)
    files, hidden = {}, 0
    skip = exclude.rstrip("/") + "/" if exclude else None
    for path, info in found.items():
        if info.get("type", "file") != "file":
            continue
        if skip and (path + "/").startswith(skip):
            continue
        if any(part.startswith(".") for part in path[len(root):].split("/")):
            hidden += 1
            continue
        files[path] = int(info.get("size") or 0)
    return files, hidden


def _mvtec_parts(rel: str, root_name: str) -> tuple[str, str, str, str] | None:
    """(category, folder, defect_type, name) for an MVTec-layout relative path, else None."""
    parts = rel.split("/")
    if len(parts) == 3 and parts[0] in (*_SPLITS, _GROUND_TRUTH):
        return root_name, parts[0], parts[1], parts[2]
    if len(parts) == 4 and parts[1] in (*_SPLITS, _GROUND_TRUTH):
        return parts[0], parts[1], parts[2], parts[3]
    return None


def _is_mvtec(rels: Iterable[str], root_name: str) -> bool:
    """A tree is MVTec-shaped when it has ``[<category>/]train/good/<file>``."""
    for rel in rels:
        p = _mvtec_parts(rel, root_name)
        if p and p[1] == "train" and p[2] == "good":
            return True
    return False


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_EXTENSIONS)


def _mask_names(stem: str) -> tuple[str, str]:
    return (f"{stem}_mask.png", f"{stem}.png")  # as lasb.data.list_samples pairs them


def list_source(src: str, layout: str = "auto", category: str | None = None,
                split: str | None = None, exclude: str | None = None) -> SourceListing:
    """Every input file under ``src``, classified and sorted by URI (deterministic).

    ``category``/``split`` label loose images (and override the MVTec category when given).
    ``exclude``: a location under ``src`` whose files are never inputs (the destination).
    """
    if layout not in ("auto", "mvtec", "images"):
        raise ValueError(f"layout must be auto, mvtec or images, got {layout!r}")
    if split is not None and split not in _SPLITS:
        raise ValueError(f"split must be train or test, got {split!r}")
    fs, root = storage.filesystem(src)
    root = root.rstrip("/")
    eroot = None
    if exclude is not None:
        efs, eroot = storage.filesystem(exclude)
        eroot = eroot if type(efs) is type(fs) else None
    files, hidden = _walk(fs, root, eroot)
    rel = {p: (p[len(root) + 1:] if p != root else p.rsplit("/", 1)[-1]) for p in files}
    root_name = root.rsplit("/", 1)[-1]
    if layout == "auto":
        layout = "mvtec" if _is_mvtec(rel.values(), root_name) else "images"

    masks: dict[tuple[str, str, str], str] = {}  # (category, defect, lower name) -> path
    if layout == "mvtec":
        for path in files:
            p = _mvtec_parts(rel[path], root_name)
            if p and p[1] == _GROUND_TRUTH and _is_image_name(p[3]):
                masks[(p[0], p[2], p[3].lower())] = path
    mask_paths = set(masks.values())

    entries: dict[str, Entry] = {}
    owners: dict[str, str] = {}
    for path in sorted(files):
        uri, size, name = url_of(fs, path), files[path], rel[path].rsplit("/", 1)[-1]
        if path in mask_paths:
            continue  # masks get their entry once their image is known (below)
        p = _mvtec_parts(rel[path], root_name) if layout == "mvtec" else None
        if p and p[1] == _GROUND_TRUTH:
            p = None  # an image under ground_truth/ that is not a mask name: a loose image
        if not _is_image_name(name):
            entries[path] = Entry(uri, size, "other")
            continue
        if p:
            cat, folder, defect, _ = p
            mask = None
            if folder == "test" and defect != "good":
                stem = os.path.splitext(name)[0]
                for candidate in _mask_names(stem):
                    mask = masks.get((cat, defect, candidate.lower()))
                    if mask is not None and mask not in owners:
                        owners[mask] = uri
                        break
                    mask = None
            entries[path] = Entry(uri, size, "image", category or cat, folder,
                                  0 if defect == "good" else 1, defect,
                                  mask=url_of(fs, mask) if mask else None,
                                  mask_size=files[mask] if mask else None)
        else:
            entries[path] = Entry(uri, size, "image", category, split,
                                  0 if split == "train" else None, None)
    for path in masks.values():
        entries[path] = Entry(url_of(fs, path), files[path], "mask",
                              owner=owners.get(path))
    ordered = sorted(entries.values(), key=lambda e: e.uri)
    return SourceListing(layout, ordered, hidden)


# ---------------------------------------------------------------------------------------------
# shard plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """A fixed slice of the sorted images (with their masks): becomes ``part-<cid>.parquet``."""

    index: int
    cid: str  # "<index>-<hash of uris, sizes and settings>": same input -> same name
    entries: list[Entry]

    @property
    def nbytes(self) -> int:
        return sum(e.size + (e.mask_size or 0) for e in self.entries)

    def descriptor(self) -> str:
        """JSON handed to a Ray task (the entries, with their mask sizes)."""
        return json.dumps({"index": self.index, "cid": self.cid,
                           "entries": [dataclasses.asdict(e) for e in self.entries]})


def plan_chunks(entries: Sequence[Entry], rows_per_shard: int | None, shard_mb: float | None,
                settings: dict) -> list[Chunk]:
    """Cut the sorted images into shards by row count and/or bytes (image + mask sizes).

    Only the listing decides the cut (never what the files turn out to contain), so a rerun
    over the same input gets the same chunks, names and contents. ``settings`` (anything that
    changes the rows, e.g. the pixel limit) is part of every chunk id.
    """
    if rows_per_shard is not None and rows_per_shard < 1:
        raise ValueError("--rows-per-shard must be >= 1")
    if shard_mb is not None and shard_mb <= 0:
        raise ValueError("--shard-mb must be > 0")
    if rows_per_shard is None and shard_mb is None:
        raise ValueError("give --rows-per-shard and/or --shard-mb")
    limit = shard_mb * 2**20 if shard_mb is not None else float("inf")
    groups: list[list[Entry]] = []
    current: list[Entry] = []
    nbytes = 0
    for e in (e for e in entries if e.role == "image"):
        size = e.size + (e.mask_size or 0)
        if current and ((rows_per_shard and len(current) >= rows_per_shard)
                        or nbytes + size > limit):
            groups.append(current)
            current, nbytes = [], 0
        current.append(e)
        nbytes += size
    if current:
        groups.append(current)
    salt = json.dumps(settings, sort_keys=True)
    chunks = []
    for i, group in enumerate(groups):
        h = hashlib.sha1(salt.encode())
        for e in group:
            h.update(f"{e.uri}\t{e.size}\t{e.mask}\t{e.mask_size}\n".encode())
        chunks.append(Chunk(i, f"{i:05d}-{h.hexdigest()[:12]}", group))
    return chunks


# ---------------------------------------------------------------------------------------------
# read + sha256 + validate (one chunk, inside a Ray task)
# ---------------------------------------------------------------------------------------------
def _read_all(fs, paths: list[str]) -> dict[str, bytes | OSError]:
    """Read whole files, several in flight (object-store GETs are latency-bound)."""

    def read(path: str) -> bytes | OSError:
        try:
            return fs.cat_file(path)
        except OSError as exc:  # missing, permissions, S3 errors after retries
            return exc
        except Exception as exc:  # noqa: BLE001 - botocore raises non-OSError types too
            return OSError(f"{type(exc).__name__}: {exc}")

    if len(paths) <= 1:
        return {p: read(p) for p in paths}
    with ThreadPoolExecutor(min(_READ_THREADS, len(paths))) as pool:
        return dict(zip(paths, pool.map(read, paths)))


def _mask_png(data: bytes, mask: np.ndarray) -> bytes:
    """The mask as PNG: the file itself when it is a PNG, else re-encoded (0/255 greyscale)."""
    if data.startswith(_PNG_MAGIC):
        return data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _record(uri: str, role: str, size: int, chunk: str, **kw) -> dict:
    rec = dict.fromkeys(RECORD_SCHEMA.names)
    rec.update(uri=uri, role=role, size=size, chunk=chunk, **kw)
    return rec


def _check(data: bytes | OSError, uri: str, decode, max_pixels: int):
    """(decoded, sha256, reason, detail) for one file's bytes."""
    if isinstance(data, OSError):
        return None, None, "unreadable", f"cannot read file ({type(data).__name__}: {data})"
    digest = hashlib.sha256(data).hexdigest()
    try:
        return decode(data, uri, max_pixels), digest, None, None
    except ImageDecodeError as exc:
        return None, digest, decode_kind(exc.reason), exc.reason


def process_chunk(desc: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[pa.Table, list]:
    """Read, hash and validate a chunk's files: (shard table before dedup, per-file records).

    Images keep their original bytes; the decode is only the check (and gives width/height
    as a reader will see them: EXIF-oriented). A mask that fails its check is rejected alone;
    its image stays a row without a mask.
    """
    entries = [Entry(**e) for e in desc["entries"]]
    cid = desc["cid"]
    paths = {}
    for e in entries:
        for uri in (e.uri, e.mask):
            if uri:
                paths[uri] = storage.filesystem(uri)
    fs = next(iter(paths.values()))[0] if paths else None
    blobs = _read_all(fs, [p for _, p in paths.values()]) if fs else {}
    data = {uri: blobs[p] for uri, (_, p) in paths.items()}

    rows, records = [], []
    for e in entries:
        image, digest, reason, detail = _check(data[e.uri], e.uri, decode_image, max_pixels)
        ok = reason is None
        records.append(_record(e.uri, "image", e.size, cid, sha256=digest, reason=reason,
                               detail=detail, width=image.shape[1] if ok else None,
                               height=image.shape[0] if ok else None))
        mask_png = None
        if e.mask:
            mask, mdigest, mreason, mdetail = _check(data[e.mask], e.mask, decode_mask,
                                                     max_pixels)
            if mreason is None and not ok:
                mreason, mdetail = "orphan mask", f"its image {e.uri} was rejected ({reason})"
            records.append(_record(e.mask, "mask", e.mask_size, cid, sha256=mdigest, reason=mreason,
                                   detail=mdetail, owner=e.uri))
            if mreason is None:
                mask_png = _mask_png(data[e.mask], mask)
        if ok:
            rows.append({"image": data[e.uri], "uri": e.uri, "category": e.category,
                         "split": e.split, "label": e.label, "defect_type": e.defect_type,
                         "mask": mask_png, "width": image.shape[1], "height": image.shape[0],
                         "sha256": digest})
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), records


def static_records(entries: Iterable[Entry]) -> list[dict]:
    """Records of the files rejected from their listing alone (never read)."""
    out = []
    for e in entries:
        if e.role == "other":
            ext = os.path.splitext(e.uri)[1] or "(none)"
            out.append(_record(e.uri, "other", e.size, "", reason="not an image",
                               detail=f"not an image: extension {ext} is not one of "
                                      f"{', '.join(SUPPORTED_EXTENSIONS)}"))
        elif e.role == "mask" and e.owner is None:
            out.append(_record(e.uri, "mask", e.size, "", reason="orphan mask",
                               detail="no test image matches this ground-truth mask"))
    return out


def find_duplicates(records: Iterable[dict]) -> dict[str, str]:
    """{uri: uri it duplicates} among valid images; the smallest URI of each group stays."""
    first: dict[str, str] = {}
    dups: dict[str, str] = {}
    for rec in sorted((r for r in records if r["role"] == "image" and r["reason"] is None),
                      key=lambda r: r["uri"]):
        keep = first.setdefault(rec["sha256"], rec["uri"])
        if keep != rec["uri"]:
            dups[rec["uri"]] = keep
    return dups


def apply_duplicates(records: list[dict], dups: dict[str, str]) -> list[dict]:
    """Records with duplicates (and the masks riding on them) turned into rejects."""
    out = []
    for rec in records:
        rec = dict(rec)
        if rec["role"] == "image" and rec["uri"] in dups:
            rec["reason"], rec["detail"] = "duplicate", f"duplicate of {dups[rec['uri']]}"
        elif rec["role"] == "mask" and rec["reason"] is None and rec["owner"] in dups:
            rec["reason"] = "orphan mask"
            rec["detail"] = f"its image {rec['owner']} was rejected (duplicate)"
        out.append(rec)
    return out


def rejects_table(records: Iterable[dict]) -> pa.Table:
    rows = [{k: r[k] for k in REJECTS_SCHEMA.names} for r in records if r["reason"] is not None]
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["uri"]), schema=REJECTS_SCHEMA)


def parquet_bytes(table: pa.Table, row_group_size: int = 256) -> bytes:
    """Serialise a shard: no compression or dictionary on the (already encoded) image bytes.

    pyarrow writes no timestamps, so the same table gives the same bytes on a rerun.
    """
    binary = {f.name for f in table.schema if pa.types.is_binary(f.type)}
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size,
                   compression={f.name: ("none" if f.name in binary else "snappy")
                                for f in table.schema},
                   use_dictionary=[f.name for f in table.schema if f.name not in binary])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# reading shards back
# ---------------------------------------------------------------------------------------------
MANIFEST_FILE = "_manifest.json"


def shard_paths(uri: str) -> list[str]:
    """URIs of the shards at ``uri``: the manifest's list when there is one, else the folder's
    ``*.parquet`` files (``_``/``.``-prefixed ones skipped, as pyarrow and Ray Data do)."""
    fs, root = storage.filesystem(uri)
    root = root.rstrip("/")
    fs.invalidate_cache()
    if fs.isfile(root):
        return [url_of(fs, root)]
    manifest = storage.join(root, MANIFEST_FILE)
    if fs.exists(manifest):
        with fs.open(manifest, "r") as f:
            return [url_of(fs, storage.join(root, s["file"])) for s in json.load(f)["shards"]]
    return [url_of(fs, p) for p in sorted(fs.find(root))
            if p.endswith(".parquet")
            and not any(part[:1] in ("_", ".") for part in p[len(root):].split("/"))]


def read_shard_images(uri: str, category: str | None, split: str | None = "train",
                      size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
                      ) -> tuple[list[np.ndarray] | np.ndarray, list[str]]:
    """Decode the images of one category/split from shards: (images, errors).

    ``images`` is a list of uint8 (H, W, 3) arrays, or one (N, size, size, 3) array when
    ``size`` is given; ``errors`` holds ``"<uri>: <reason>"`` for rows that no longer decode
    (shards were validated at ingest, so this stays empty unless a shard was altered). Rows
    are in shard order (sorted URIs). Meant for in-memory training of small categories; big
    ones stream through Ray Data instead.
    """
    filters = [(k, "=", v) for k, v in (("category", category), ("split", split))
               if v is not None]
    images, errors = [], []
    for shard in shard_paths(uri):
        pafs, path = storage.pyarrow_filesystem(shard)
        table = pq.read_table(path, filesystem=pafs, columns=["image", "uri"],
                              filters=filters or None)
        for data, row_uri in zip(table.column("image").to_pylist(),
                                 table.column("uri").to_pylist()):
            try:
                image = decode_image(data, row_uri, max_pixels)
            except ImageDecodeError as exc:
                errors.append(str(exc))
                continue
            images.append(resize_image(image, size) if size else image)
    if size:
        return (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)), errors
    return images, errors


def count_reasons(records: Iterable[dict]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        if r["reason"] is not None:
            counts[r["reason"]] += 1
    return dict(sorted(counts.items()))
