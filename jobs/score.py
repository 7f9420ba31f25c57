"""`lasb score`: batch-score an image lake with Ray Data; Parquet out, resumable, exactly once.

    lasb score --input IN --registry R --output OUT [--category C | --category-from '{category}/']

IN is a local folder or an ``s3://`` prefix of loose images, or Parquet shards (DESIGN.md shard
schema: ``image`` bytes, optional ``uri`` and ``category``). OUT is a local folder or ``s3://``.

How it runs:

1. The driver lists the inputs (sorted, deterministic), assigns each a category (``--category``,
   a path pattern, or the shards' ``category`` column), resolves every category's model version
   once (so the whole job uses one version per category, also across a resume) and splits the
   inputs into partitions of ``--partition-size`` with deterministic ids.
2. Partitions whose commit marker exists in OUT are skipped. The rest flow through Ray Data:
   ``read_and_decode`` (CPU tasks: read, decode, check, pre-resize; a bad file becomes a row
   with ``error`` set) -> ``Scorer`` (``map_batches`` with a class: an actor pool, Detectors
   loaded once per actor and category, GPUs when present) -> the driver.
3. The driver collects the rows of each partition; once a partition is complete it writes
   ``OUT/part-<id>.parquet`` atomically, then the marker ``OUT/_commits/part-<id>.json``. A job
   killed at any point and run again redoes exactly the partitions without a marker, so the
   table ends with exactly one row per input.

OUT layout: ``part-*.parquet`` (the score table: ``pyarrow.parquet.read_table(OUT)``),
``_job.json`` (inputs, settings, model versions), ``_commits/``, ``_summary.json``, and with
``--maps`` ``_maps/<category>/<partition>-<index>_<name>_{map,mask}.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lasb import storage
from lasb.data import DEFAULT_MAX_PIXELS, SUPPORTED_EXTENSIONS

log = logging.getLogger("lasb.score")

JOB_FILE = "_job.json"
SUMMARY_FILE = "_summary.json"
COMMITS = "_commits"
MAPS = "_maps"
FORMAT = 1

# DESIGN.md score rows (+ the optional map paths)
SCORE_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("category", pa.string()),
    ("model_version", pa.string()),
    ("pred_score", pa.float64()),
    ("raw_score", pa.float64()),
    ("threshold", pa.float64()),
    ("pred_label", pa.int8()),
    ("error", pa.string()),
    ("map_path", pa.string()),
    ("mask_path", pa.string()),
])
# between the stages: where a row belongs, plus per-row stage timings
_KEYS = [("part", pa.int32()), ("pid", pa.string()), ("idx", pa.int32())]
DECODED_SCHEMA = pa.schema(_KEYS + [
    ("uri", pa.string()), ("category", pa.string()), ("model_version", pa.string()),
    ("error", pa.string()), ("pixels", pa.binary()), ("height", pa.int32()),
    ("width", pa.int32()), ("decode_s", pa.float64()),
])
SCORED_SCHEMA = pa.schema(_KEYS + list(SCORE_SCHEMA) + [
    ("decode_s", pa.float64()), ("score_s", pa.float64()), ("load_s", pa.float64()),
])

# error messages start with one of these; the summary counts errors by them
ERROR_KINDS = ("empty file", "truncated or corrupt image data", "not an image", "image too large",
               "unsupported mode", "cannot read file", "unknown category", "no category",
               "invalid category", "model not found", "model failed to load", "scoring failed")


def error_kind(message: str) -> str:
    for kind in ERROR_KINDS:
        if message.startswith(kind):
            return kind
    return "other"


# ---------------------------------------------------------------------------------------------
# listing and partitions (driver)
# ---------------------------------------------------------------------------------------------
@dataclass
class Listing:
    kind: str  # "images" | "parquet"
    uris: list[str]  # identity of each input row (the file URL, or the shard's uri column)
    keys: list[str]  # what categories are matched against: path relative to IN, or the uri
    columns: list[str | None]  # category from a shard column, else None
    shards: list[tuple[str, int, int]] = field(default_factory=list)  # (url, first, n) parquet
    skipped: int = 0  # files under IN that are not images (by extension)


def _url(fs, path: str) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if proto in ("file", "local") else f"{proto}://{path}"


def _find(fs, root: str) -> list[str]:
    fs.invalidate_cache()  # object-store listings are cached per filesystem instance
    if fs.isfile(root):
        return [root]
    if not fs.exists(root):
        raise FileNotFoundError(f"input {root!r} does not exist")
    return sorted(p for p in fs.find(root)
                  if not any(part.startswith(".") for part in p[len(root):].split("/")))


def list_inputs(input_url: str, fmt: str = "auto", exclude: str | None = None) -> Listing:
    """Every input row of IN in a deterministic order (sorted files, shard rows in order).

    ``exclude``: a location (the job's output) whose files are never inputs.
    """
    fs, root = storage.filesystem(input_url)
    root = root.rstrip("/")
    files = _find(fs, root)
    if exclude is not None:
        efs, eroot = storage.filesystem(exclude)
        if type(efs) is type(fs):
            files = [p for p in files if not (p + "/").startswith(eroot.rstrip("/") + "/")]
    if fmt in ("auto", "parquet"):
        # pyarrow's dataset convention: '_' files (lasb ingest's _rejects, _summary) are metadata
        data = [p for p in files if not any(part.startswith("_")
                                            for part in p[len(root):].split("/"))]
        parquet = [p for p in data if p.endswith(".parquet")]
        if fmt == "parquet" or (parquet and len(parquet) == len(data)):
            return _list_parquet(fs, parquet)
    images = [p for p in files if p.lower().endswith(SUPPORTED_EXTENSIONS)]
    rel = [p[len(root) + 1:] if p != root else p.rsplit("/", 1)[-1] for p in images]
    if len(images) < len(files):
        log.info("skipping %d files without an image extension (%s)", len(files) - len(images),
                 ", ".join(SUPPORTED_EXTENSIONS))
    return Listing("images", [_url(fs, p) for p in images], rel, [None] * len(images),
                   skipped=len(files) - len(images))


def _list_parquet(fs, paths: list[str]) -> Listing:
    uris, cols, shards = [], [], []
    for path in paths:
        url = _url(fs, path)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if "image" not in names:
                raise ValueError(f"Parquet shard {url} has no 'image' column "
                                 f"(columns: {', '.join(sorted(names))})")
            wanted = [c for c in ("uri", "category") if c in names]
            table = pf.read(columns=wanted) if wanted else None
            n = pf.metadata.num_rows
        shards.append((url, len(uris), n))
        u = table.column("uri").to_pylist() if "uri" in wanted else [None] * n
        uris += [x if x else f"{url}#{i}" for i, x in enumerate(u)]
        cols += table.column("category").to_pylist() if "category" in wanted else [None] * n
    return Listing("parquet", uris, list(uris), cols, shards)


def category_regex(pattern: str) -> re.Pattern:
    """'{category}/' -> the first path segment; '*' matches within one segment."""
    if "{category}" not in pattern:
        raise ValueError(f"--category-from {pattern!r} must contain '{{category}}'")
    parts = re.split(r"(\{category\}|\*)", pattern)
    rx = "".join("(?P<category>[^/]+)" if p == "{category}" else "[^/]*" if p == "*"
                 else re.escape(p) for p in parts)
    return re.compile(r"(?:^|/)" + rx)


def assign_categories(listing: Listing, category: str | None, pattern: str | None,
                      column: bool) -> tuple[list[str | None], list[str | None]]:
    """(category or None, error or None) for each input."""
    n = len(listing.uris)
    if category:
        return [category] * n, [None] * n
    if pattern:
        rx = category_regex(pattern)
        cats, errs = [], []
        for key in listing.keys:
            m = rx.search(key)
            cats.append(m.group("category") if m else None)
            errs.append(None if m else f"no category: {key!r} does not match --category-from "
                                       f"{pattern!r}")
        return cats, errs
    if column and listing.kind == "parquet":
        return (list(listing.columns),
                [None if c else "no category: the shard row has no category" for c in
                 listing.columns])
    raise ValueError("no category: give --category, --category-from PATTERN, or Parquet shards "
                     "with a 'category' column")


def parse_versions(spec: str | None) -> tuple[str, dict[str, str]]:
    """'V' -> (V, {}); 'a=V1,b=V2' -> ('latest', {a: V1, b: V2})."""
    if not spec:
        return "latest", {}
    if "=" not in spec:
        return spec, {}
    pins = {}
    for item in spec.split(","):
        cat, _, ver = item.partition("=")
        if not cat.strip() or not ver.strip():
            raise ValueError(f"--model-version {spec!r}: expected V or CATEGORY=V[,CATEGORY=V]")
        pins[cat.strip()] = ver.strip()
    return "latest", pins


def resolve_models(registry: str, categories: set[str], default: str,
                   pins: dict[str, str]) -> dict[str, dict]:
    """{category: {"version", "image_size"} or {"error"}}: one version per category per job."""
    from lasb import artifacts
    from lasb.config import config_from_yaml

    fs, root = storage.filesystem(registry)
    out = {}
    for cat in sorted(categories):
        try:
            artifacts.check_name("category", cat)
        except ValueError:
            out[cat] = {"error": f"invalid category name {cat!r}"}
            continue
        try:
            version = artifacts.resolve_version(registry, cat, pins.get(cat, default))
        except artifacts.ArtifactError:
            out[cat] = {"error": f"unknown category {cat!r}: no model for it in the registry"}
            continue
        except ValueError as exc:
            raise ValueError(f"--model-version: {exc}") from exc
        folder = storage.join(root, cat, version)
        if not fs.exists(storage.join(folder, artifacts.MANIFEST)):
            out[cat] = {"error": f"model not found: version {version} of {cat!r} is not in the "
                                 "registry (or is incomplete)"}
            continue
        with fs.open(storage.join(folder, "config.yaml"), "r") as f:
            size = config_from_yaml(f.read()).data.image_size
        out[cat] = {"version": version, "image_size": size}
    return out


@dataclass
class Partition:
    index: int
    pid: str
    rows: list[int]  # indices into the listing


def make_partitions(listing: Listing, size: int) -> list[Partition]:
    """Fixed-size chunks of the sorted inputs (per shard for Parquet); id = index + content hash."""
    if size < 1:
        raise ValueError("--partition-size must be >= 1")
    spans = ([(first, n) for _, first, n in listing.shards] if listing.kind == "parquet"
             else [(0, len(listing.uris))])
    parts = []
    for first, n in spans:
        for lo in range(first, first + n, size):
            rows = list(range(lo, min(lo + size, first + n)))
            digest = hashlib.sha1("\n".join(listing.uris[i] for i in rows).encode()).hexdigest()
            parts.append(Partition(len(parts), f"{len(parts):06d}-{digest[:12]}", rows))
    return parts


def listing_digest(listing: Listing, cats: list) -> str:
    h = hashlib.sha1()
    for uri, cat in zip(listing.uris, cats):
        h.update(f"{uri}\t{cat}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# stage 1: read and decode (Ray Data CPU tasks)
# ---------------------------------------------------------------------------------------------
def _read_shard_rows(url: str, lo: int, hi: int) -> list:
    """Encoded images of rows [lo, hi) of one Parquet shard, reading only their row groups."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        out, start = [], 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start < hi and start + n > lo:
                col = pf.read_row_group(g, columns=["image"]).column("image").to_pylist()
                out += col[max(lo - start, 0):min(hi - start, n)]
            start += n
    return out


def read_and_decode(batch: pa.Table, sizes: dict[str, int] | None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """Partition descriptors -> one row per input: decoded RGB pixels, or the error."""
    from lasb.data import ImageDecodeError, decode_image, resize_image

    cols = {name: [] for name in DECODED_SCHEMA.names}
    for text in batch.column("desc").to_pylist():
        d = json.loads(text)
        payloads = None
        if d["shard"]:
            try:
                payloads = _read_shard_rows(d["shard"], d["lo"], d["lo"] + len(d["uris"]))
            except Exception as exc:  # noqa: BLE001 - an unreadable shard fails its rows only
                payloads = exc
        for i, (uri, cat, ver, err) in enumerate(zip(d["uris"], d["cats"], d["versions"],
                                                     d["errors"])):
            t0 = time.perf_counter()
            pixels, h, w = None, None, None
            if err is None:
                try:
                    if isinstance(payloads, Exception):
                        raise OSError(f"cannot read file ({type(payloads).__name__}: "
                                      f"{payloads})")
                    data = payloads[i] if payloads is not None else _read_file(uri)
                    if data is None:
                        raise ImageDecodeError(uri, "empty file (no image bytes in the shard)")
                    image = decode_image(data, uri, max_pixels)
                    if sizes is not None:  # scores only: resize here, as predict would
                        image = resize_image(image, sizes[cat])
                    h, w = image.shape[:2]
                    pixels = np.ascontiguousarray(image).tobytes()
                except ImageDecodeError as exc:
                    err = exc.reason
                except OSError as exc:
                    err = str(exc) if str(exc).startswith("cannot read file") else \
                        f"cannot read file ({type(exc).__name__}: {exc})"
            for name, value in (("part", d["part"]), ("pid", d["pid"]), ("idx", i),
                                ("uri", uri), ("category", cat),
                                ("model_version", ver if err is None else None),
                                ("error", err), ("pixels", pixels), ("height", h), ("width", w),
                                ("decode_s", time.perf_counter() - t0)):
                cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=DECODED_SCHEMA)


def _read_file(uri: str) -> bytes:
    fs, path = storage.filesystem(uri)
    return fs.cat_file(path)


# ---------------------------------------------------------------------------------------------
# stage 2: score (Ray Data actor pool; one Scorer per actor)
# ---------------------------------------------------------------------------------------------
def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _safe_stem(uri: str) -> str:
    stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit("#", 1)[0].rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:80] or "image"


class Scorer:
    """Actor state: Detectors loaded lazily, once per category, reused for every batch."""

    def __init__(self, registry: str, output: str, maps: str | None = None,
                 torch_threads: int = 1, device: str | None = None):
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        logging.getLogger("diffusers").setLevel(logging.ERROR)  # no 'accelerate' hint per load
        self.registry, self.output, self.maps, self.device = registry, output, maps, device
        self.detectors: dict[tuple[str, str], object] = {}

    def _detector(self, category: str, version: str):
        key = (category, version)
        if key not in self.detectors:
            from lasb.detector import Detector

            try:
                self.detectors[key] = Detector.load(self.registry, category, version,
                                                    device=self.device)
            except Exception as exc:  # noqa: BLE001 - tampered/unreadable model: rows fail
                log.warning("cannot load %s/%s: %s", category, version, exc)
                self.detectors[key] = f"model failed to load: {type(exc).__name__}: {exc}"
        return self.detectors[key]

    def _predict(self, det, images: list[np.ndarray]) -> list:
        """Predictions, or an error string per image when scoring raises."""
        maps = self.maps is not None
        try:
            return det.predict(images, return_maps=maps)
        except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
            out = []
            for im in images:
                try:
                    out.append(det.predict([im], return_maps=maps)[0])
                except Exception as exc:  # noqa: BLE001
                    out.append(f"scoring failed: {type(exc).__name__}: {exc}")
            return out

    def _write_maps(self, row: dict, pred: dict) -> tuple[str, str]:
        fs, root = storage.filesystem(self.output)
        name = f"{row['pid']}-{row['idx']:05d}_{_safe_stem(row['uri'])}"
        folder = storage.join(root, MAPS, row["category"])
        paths = []
        for suffix, arr in (("map", np.round(pred["anomaly_map"] * 255).astype(np.uint8)),
                            ("mask", pred["pred_mask"].astype(np.uint8) * 255)):
            path = storage.join(folder, f"{name}_{suffix}.png")
            storage.write_bytes_atomic(fs, path, _png(arr))
            paths.append(_url(fs, path))
        return paths[0], paths[1]

    def __call__(self, batch: pa.Table) -> pa.Table:
        t_start = time.perf_counter()
        rows = batch.to_pylist()
        out = [{name: row.get(name) for name in SCORED_SCHEMA.names} for row in rows]
        groups: dict[tuple[str, str], list[int]] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                groups.setdefault((row["category"], row["model_version"]), []).append(i)
        load_s = 0.0
        for (cat, version), idx in groups.items():
            t0 = time.perf_counter()
            det = self._detector(cat, version)
            load_s += time.perf_counter() - t0
            if isinstance(det, str):
                preds = [det] * len(idx)
            else:
                images = [np.frombuffer(rows[i]["pixels"], dtype=np.uint8)
                          .reshape(rows[i]["height"], rows[i]["width"], 3) for i in idx]
                preds = self._predict(det, images)
            for i, pred in zip(idx, preds):
                r = out[i]
                if isinstance(pred, str):
                    r["error"], r["model_version"] = pred, None
                    continue
                r.update({k: pred[k] for k in ("pred_score", "raw_score", "threshold",
                                                "pred_label", "model_version")})
                if self.maps == "all" or (self.maps and pred["pred_label"]):
                    r["map_path"], r["mask_path"] = self._write_maps(rows[i], pred)
        per_row = (time.perf_counter() - t_start - load_s) / max(len(rows), 1)
        for r in out:
            r["score_s"], r["load_s"] = per_row, 0.0
        if out:
            out[0]["load_s"] = load_s
        return pa.Table.from_pylist(out, schema=SCORED_SCHEMA)


# ---------------------------------------------------------------------------------------------
# commit protocol (driver)
# ---------------------------------------------------------------------------------------------
class Output:
    """OUT: part files, commit markers, the job manifest and the summary."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = storage.filesystem(self.url)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def part_path(self, pid: str) -> str:
        return self.path(f"part-{pid}.parquet")

    def marker_path(self, pid: str) -> str:
        return self.path(COMMITS, f"part-{pid}.json")

    def read_json(self, *parts: str) -> dict | None:
        path = self.path(*parts)
        self.fs.invalidate_cache()  # other processes write here: never trust a cached listing
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def write_json(self, data: dict, *parts: str) -> None:
        text = json.dumps(data, indent=1, sort_keys=True).encode()
        storage.write_bytes_atomic(self.fs, self.path(*parts), text)

    def committed(self) -> dict[str, dict]:
        """{pid: marker} of committed partitions."""
        folder = self.path(COMMITS)
        self.fs.invalidate_cache()
        if not self.fs.exists(folder):
            return {}
        out = {}
        for entry in self.fs.ls(folder, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("part-") and name.endswith(".json"):
                with self.fs.open(entry, "r") as f:
                    out[name[5:-5]] = json.load(f)
        return out

    def is_empty(self) -> bool:
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return True
        return not self.fs.ls(self.root, detail=False)

    def commit(self, pid: str, rows: list[dict]) -> dict:
        """Write the part file (atomically), then its marker: the partition is done."""
        table = pa.Table.from_pylist(rows, schema=SCORE_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(self.fs, self.part_path(pid), buf.getvalue())
        errors = Counter(error_kind(r["error"]) for r in rows if r["error"] is not None)
        marker = {"partition": pid, "rows": len(rows), "errors": dict(errors),
                  "anomalies": sum(1 for r in rows if r["pred_label"] == 1),
                  "committed": dt.datetime.now(dt.timezone.utc).isoformat()}
        self.write_json(marker, COMMITS, f"part-{pid}.json")
        return marker


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
@dataclass
class ScoreOptions:
    input: str
    registry: str
    output: str
    category: str | None = None
    category_from: str | None = None
    category_column: bool = True
    model_version: str | None = None
    input_format: str = "auto"
    maps: str | None = None  # None | "anomalous" | "all"
    partition_size: int = 256
    batch_size: int = 16
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    decode_cpus: float = 0.25
    torch_threads: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress_every_s: float = 5.0


def _settings(opts: ScoreOptions) -> dict:
    """What must match for a rerun to continue the same job."""
    return {k: getattr(opts, k) for k in ("input", "registry", "category", "category_from",
                                          "category_column", "model_version", "input_format",
                                          "maps", "partition_size", "max_pixels")}


def _resources(opts: ScoreOptions) -> tuple[int, float, float]:
    """(pool size, CPUs per actor, GPUs per actor) for this cluster."""
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    gpa = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if opts.actors:
        n = opts.actors
    elif gpa > 0:
        n = max(1, int(gpus // gpa))
    else:  # keep room for the decode tasks
        n = max(1, int((float(res.get("CPU", 1)) - opts.decode_cpus) // opts.cpus_per_actor))
    return n, opts.cpus_per_actor, gpa


def _prepare(opts: ScoreOptions, out: Output) -> tuple[dict, list[Partition], Listing, list]:
    """List, assign categories, resolve models; create or check the job manifest."""
    listing = list_inputs(opts.input, opts.input_format, exclude=opts.output)
    if not listing.uris:
        raise ValueError(f"no input images under {opts.input}")
    cats, errs = assign_categories(listing, opts.category, opts.category_from,
                                   opts.category_column)
    partitions = make_partitions(listing, opts.partition_size)
    digest = listing_digest(listing, cats)
    job = out.read_json(JOB_FILE)
    if job is not None:
        diff = [k for k, v in _settings(opts).items() if job["settings"].get(k) != v]
        if job.get("listing_sha1") != digest:
            diff.append("input listing")
        if diff:
            raise ValueError(f"output {opts.output} holds another scoring job (different "
                             f"{', '.join(diff)}); use a new --output")
        models = job["models"]  # the versions the job started with, also for new partitions
        log.info("resuming the job in %s (model versions as first resolved: %s)", opts.output,
                 {c: m.get("version") for c, m in models.items()})
    else:
        if not out.is_empty():
            raise ValueError(f"output {opts.output} exists and is not a lasb score output; "
                             "use an empty or new folder")
        default, pins = parse_versions(opts.model_version)
        models = resolve_models(opts.registry, {c for c in cats if c}, default, pins)
        job = {"format": FORMAT, "settings": _settings(opts), "listing_sha1": digest,
               "n_inputs": len(listing.uris), "n_partitions": len(partitions),
               "models": models,
               "created": dt.datetime.now(dt.timezone.utc).isoformat()}
        out.write_json(job, JOB_FILE)
    for i, cat in enumerate(cats):
        if errs[i] is None and cat and "error" in models.get(cat, {"error": "?"}):
            errs[i] = models[cat]["error"]
    return models, partitions, listing, list(zip(cats, errs))


def _descriptor(p: Partition, listing: Listing, assigned: list, models: dict) -> str:
    shard, lo = "", 0
    if listing.kind == "parquet":
        for url, first, n in listing.shards:
            if first <= p.rows[0] < first + n:
                shard, lo = url, p.rows[0] - first
    cats = [assigned[i][0] for i in p.rows]
    return json.dumps({
        "part": p.index, "pid": p.pid, "shard": shard, "lo": lo,
        "uris": [listing.uris[i] for i in p.rows], "cats": cats,
        "versions": [models.get(c, {}).get("version") if c else None for c in cats],
        "errors": [assigned[i][1] for i in p.rows],
    })


def run(opts: ScoreOptions, address: str | None = None) -> dict:
    """Score every input of opts.input exactly once into opts.output; returns the summary."""
    t_job = time.perf_counter()
    out = Output(opts.output)
    models, partitions, listing, assigned = _prepare(opts, out)
    t_listed = time.perf_counter()
    done = out.committed()
    pending = [p for p in partitions if p.pid not in done]
    n_pending_rows = sum(len(p.rows) for p in pending)
    print(f"lasb score: {len(listing.uris)} inputs ({listing.kind}) in {len(partitions)} "
          f"partitions; {len(partitions) - len(pending)} already committed, {len(pending)} to "
          f"score ({n_pending_rows} images); models: "
          f"{ {c: m.get('version', m.get('error')) for c, m in models.items()} }", flush=True)

    stages = Counter()
    new_markers: dict[str, dict] = {}
    t_pipe = time.perf_counter()
    if pending:
        new_markers = _execute(opts, out, pending, listing, assigned, models, stages, address)
    t_end = time.perf_counter()

    markers = {**done, **new_markers}
    missing = [p.pid for p in partitions if p.pid not in markers]
    if missing:
        raise RuntimeError(f"{len(missing)} partitions were not committed: {missing[:5]}")
    errors = Counter()
    for m in markers.values():
        errors.update(m["errors"])
    rows = sum(m["rows"] for m in markers.values())
    scored_now = sum(m["rows"] for m in new_markers.values())
    summary = {
        "output": opts.output,
        "rows": rows,
        "scored": rows - sum(errors.values()),
        "errors": sum(errors.values()),
        "errors_by_reason": dict(sorted(errors.items())),
        "anomalies": sum(m["anomalies"] for m in markers.values()),
        "partitions": len(partitions),
        "partitions_skipped": len(done),
        "partitions_written": len(new_markers),
        "images_this_run": scored_now,
        # from the start of the Ray Data pipeline (Ray already up) to the last commit
        "images_per_s": (scored_now / (t_end - t_pipe - stages["ray_init_s"])
                         if scored_now else 0.0),
        "models": {c: m.get("version", m.get("error")) for c, m in models.items()},
        "seconds": {
            "total": time.perf_counter() - t_job,
            "list_and_resolve": t_listed - t_job,
            "ray_init": stages["ray_init_s"],
            "pipeline": t_end - t_pipe - stages["ray_init_s"],
            # summed over tasks/actors (CPU-time-like; they overlap in wall time)
            "decode_tasks": stages["decode_s"],
            "score_actors": stages["score_s"],
            "model_load": stages["load_s"],
            "commit": stages["commit_s"],
            "first_row": stages["first_row_s"],
        },
        "skipped_non_image_files": listing.skipped,
    }
    out.write_json(summary, SUMMARY_FILE)
    print(format_summary(summary), flush=True)
    return summary


def _execute(opts: ScoreOptions, out: Output, pending: list[Partition], listing: Listing,
             assigned: list, models: dict, stages: Counter, address: str | None) -> dict:
    import ray
    import ray.data

    from jobs.common import init_ray

    t0 = time.perf_counter()
    init_ray(address)
    stages["ray_init_s"] = time.perf_counter() - t0
    n_actors, cpa, gpa = _resources(opts)
    env = {"env_vars": storage.worker_env()} if storage.worker_env() else None
    sizes = None if opts.maps else {c: m["image_size"] for c, m in models.items()
                                    if "image_size" in m}
    log.info("actor pool: %d x (%.2g CPU, %.2g GPU), batch %d, torch threads %d", n_actors, cpa,
             gpa, opts.batch_size, opts.torch_threads)
    descs = [{"desc": _descriptor(p, listing, assigned, models)} for p in pending]
    ds = ray.data.from_items(descs, override_num_blocks=len(descs))
    ds = ds.map_batches(read_and_decode, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"sizes": sizes, "max_pixels": opts.max_pixels},
                        num_cpus=opts.decode_cpus, runtime_env=env)
    ds = ds.map_batches(Scorer, batch_size=opts.batch_size, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=n_actors),
                        fn_constructor_kwargs={"registry": opts.registry,
                                               "output": opts.output, "maps": opts.maps,
                                               "torch_threads": opts.torch_threads},
                        num_cpus=cpa, num_gpus=gpa or None, runtime_env=env)

    expected = {p.index: (p.pid, len(p.rows)) for p in pending}
    buffers: dict[int, dict[int, dict]] = {}
    markers: dict[str, dict] = {}
    total = sum(n for _, n in expected.values())
    seen, errors, t0, last = 0, 0, time.perf_counter(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        if not seen:
            stages["first_row_s"] = time.perf_counter() - t0
        for key in ("decode_s", "score_s", "load_s"):
            stages[key] += float(pc.sum(batch.column(key)).as_py() or 0.0)
        for row in batch.select(["part", "idx"] + SCORE_SCHEMA.names).to_pylist():
            part = row.pop("part")
            buf = buffers.setdefault(part, {})
            if row["idx"] not in buf:
                seen += 1
                errors += row["error"] is not None
            buf[row.pop("idx")] = row
            pid, n = expected[part]
            if len(buf) == n:
                tc = time.perf_counter()
                markers[pid] = out.commit(pid, [buf[i] for i in range(n)])
                stages["commit_s"] += time.perf_counter() - tc
                del buffers[part]
        now = time.perf_counter()
        if now - last >= opts.progress_every_s or seen == total:
            last = now
            print(f"lasb score: {seen}/{total} images, {len(markers)}/{len(expected)} "
                  f"partitions committed, {errors} errors, {seen / (now - t0):.1f} images/s",
                  flush=True)
    return markers


def format_summary(s: dict) -> str:
    lines = [
        (f"lasb score: {s['rows']} rows in {s['output']}: {s['scored']} scored, "
         f"{s['anomalies']} anomalous, {s['errors']} errors"),
        (f"  partitions: {s['partitions']} ({s['partitions_skipped']} already committed, "
         f"{s['partitions_written']} written now)"),
        f"  this run: {s['images_this_run']} images, {s['images_per_s']:.1f} images/s",
    ]
    for kind, n in s["errors_by_reason"].items():
        lines.append(f"  error: {kind}: {n}")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in s["seconds"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True,
                   help="folder or s3:// prefix of images, or of Parquet shards")
    p.add_argument("--registry", required=True, help="model registry (folder or s3://)")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--category", help="score every image with this category's model")
    g.add_argument("--category-from", metavar="PATTERN",
                   help="category from the path relative to --input, e.g. '{category}/'")
    p.add_argument("--no-category-column", action="store_true",
                   help="ignore the 'category' column of Parquet shards")
    p.add_argument("--model-version", metavar="V|C=V,...",
                   help="pin a model version (default: each category's latest)")
    p.add_argument("--input-format", choices=["auto", "images", "parquet"], default="auto")
    p.add_argument("--maps", nargs="?", const="anomalous", choices=["anomalous", "all"],
                   help="also write anomaly-map and mask PNGs (for anomalous images, or all)")
    p.add_argument("--partition-size", type=int, default=256,
                   help="inputs per output file / commit (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="images per actor call")
    p.add_argument("--actors", type=int, help="actor pool size (default: fit the cluster)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float,
                   help="GPUs per actor (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--decode-cpus", type=float, default=0.25, help="CPUs per decode task")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per actor")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")


def options_from_args(args: argparse.Namespace) -> ScoreOptions:
    return ScoreOptions(
        input=args.input, registry=args.registry, output=args.output, category=args.category,
        category_from=args.category_from, category_column=not args.no_category_column,
        model_version=args.model_version, input_format=args.input_format, maps=args.maps,
        partition_size=args.partition_size, batch_size=args.batch_size, actors=args.actors,
        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        decode_cpus=args.decode_cpus, torch_threads=args.torch_threads,
        max_pixels=args.max_pixels)


def main(args: argparse.Namespace) -> int:
    run(options_from_args(args), args.address)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
