"""`lasb ingest`: MVTec folder + broken files -> Parquet shards on moto S3 and local disk.

Real local Ray (Ray Data tasks), real S3 API (moto's server on 127.0.0.1), and for retries a
real HTTP proxy in front of moto that answers 503 SlowDown to some requests.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from lasb import ingest, storage
from lasb.cli import main as lasb_main
from lasb.data import decode_image, decode_mask

CATEGORY = "demo_texture"
N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT = 6, 2, 3
BAD = {  # file under <category>/train/good -> expected reject reason
    "bad_empty.png": "empty",
    "bad_truncated.png": "truncated",
    "bad_text.png": "not an image",
    "bad_bomb.png": "too large",
    "bad_cmyk.jpg": "unsupported mode",
    "bad_deep.png": "unsupported mode",
    "zz_dup.png": "duplicate",
}
EXTRA = {"readme.txt": "not an image", f"{CATEGORY}/ground_truth/scratch/999_mask.png":
         "orphan mask"}
N_ROWS = N_TRAIN + N_TEST_GOOD + N_TEST_DEFECT
N_MASKS = N_TEST_DEFECT
N_FILES = N_ROWS + N_MASKS + len(BAD) + len(EXTRA)


# -- fixtures ---------------------------------------------------------------------------------
def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height with a few bytes of pixel data (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 32 px MVTec category plus broken files, a duplicate, a text file, an orphan mask."""
    from lasb.demo_data import make_demo_category

    root = tmp_path_factory.mktemp("ingest_src")
    make_demo_category(str(root), CATEGORY, size=32, n_train=N_TRAIN, n_test_good=N_TEST_GOOD,
                       n_test_defect=N_TEST_DEFECT, seed=0)
    good = root / CATEGORY / "train" / "good"
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    png = _encode(Image.fromarray(rgb))
    deep = Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 90).astype(np.uint16))
    data = {"bad_empty.png": b"", "bad_truncated.png": png[: len(png) // 2],
            "bad_text.png": b"hello, this is not an image\n" * 4,
            "bad_bomb.png": _png_header_only(10_000, 8_000),  # 80 Mpx > the 64 Mpx default
            "bad_cmyk.jpg": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
            "bad_deep.png": _encode(deep)}
    for name, blob in data.items():
        (good / name).write_bytes(blob)
    shutil.copy(good / "000.png", good / "zz_dup.png")
    (root / "readme.txt").write_text("generated test data\n")
    gt = root / CATEGORY / "ground_truth" / "scratch"
    shutil.copy(min(gt.iterdir()), gt / "999_mask.png")
    (root / ".DS_Store").write_bytes(b"hidden: not an input")
    return root


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket="ingest")
    return "s3://ingest"


def _upload(source: Path, url: str) -> None:
    fs, path = storage.filesystem(url)
    for p in sorted(source.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{path}/{p.relative_to(source).as_posix()}", p.read_bytes())


def _read(url: str) -> bytes:
    fs, path = storage.filesystem(url)
    return fs.cat_file(path)


def _shards(dst: str) -> dict[str, bytes]:
    """{name: bytes} of the shard files at dst."""
    fs, root = storage.filesystem(dst)
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in sorted(fs.ls(root, detail=False))
            if p.rsplit("/", 1)[-1].startswith("part-")}


def _table(dst: str):
    pafs, path = storage.pyarrow_filesystem(dst)
    return pq.read_table(path, filesystem=pafs)  # skips _rejects.parquet, _commits/, ...


def _rel(uri: str, prefix: str) -> str:
    return uri[len(prefix.rstrip("/")) + 1:]


def _check_output(dst: str, src: str, summary: dict) -> None:
    """Accounting, reasons, schema, labels/masks and pixels of one ingest output."""
    assert summary["files_seen"] == N_FILES
    assert summary["rows"] + summary["masks_attached"] + summary["rejected"] == N_FILES
    assert (summary["rows"], summary["masks_attached"]) == (N_ROWS, N_MASKS)
    table = _table(dst)
    assert table.schema.equals(ingest.SHARD_SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == len({r["uri"] for r in rows}) == N_ROWS

    rejects = _table(storage.join(dst, ingest_job.REJECTS_FILE)).to_pylist()
    assert len(rejects) == summary["rejected"]
    reasons = {_rel(r["uri"], src): r["reason"] for r in rejects}
    expected = {f"{CATEGORY}/train/good/{k}": v for k, v in BAD.items()} | EXTRA
    assert reasons == expected
    dup = next(r for r in rejects if r["reason"] == "duplicate")
    assert dup["detail"] == f"duplicate of {src}/{CATEGORY}/train/good/000.png"
    assert summary["duplicates"] == 1 and summary["duplicate_examples"][0]["uri"] == dup["uri"]
    counts = {}
    for v in expected.values():
        counts[v] = counts.get(v, 0) + 1
    assert summary["rejected_by_reason"] == counts
    by_uri = {_rel(r["uri"], src): r for r in rejects}
    assert "80000000 pixels" in by_uri[f"{CATEGORY}/train/good/bad_bomb.png"]["detail"]
    assert "CMYK" in by_uri[f"{CATEGORY}/train/good/bad_cmyk.jpg"]["detail"]

    splits = {}
    for r in rows:
        original = _read(r["uri"])
        assert r["image"] == original and r["sha256"] == hashlib.sha256(original).hexdigest()
        pixels = decode_image(r["image"], r["uri"])
        assert (r["height"], r["width"]) == pixels.shape[:2] == (32, 32)
        assert r["category"] == CATEGORY
        rel = _rel(r["uri"], src).split("/")
        assert (r["split"], r["defect_type"]) == (rel[1], rel[2])
        assert r["label"] == (0 if rel[2] == "good" else 1)
        assert (r["mask"] is not None) == (r["label"] == 1)
        if r["mask"] is not None:
            stem = rel[3].rsplit(".", 1)[0]
            mask_uri = f"{src}/{CATEGORY}/ground_truth/{rel[2]}/{stem}_mask.png"
            assert np.array_equal(decode_mask(r["mask"], "m"), decode_mask(_read(mask_uri), "m"))
        splits[r["split"]] = splits.get(r["split"], 0) + 1
    assert splits == {"train": N_TRAIN, "test": N_TEST_GOOD + N_TEST_DEFECT}

    manifest = json.loads(_read(storage.join(dst, ingest_job.MANIFEST_FILE)))
    assert sorted(s["file"] for s in manifest["shards"]) == sorted(_shards(dst))
    assert sum(s["rows"] for s in manifest["shards"]) == N_ROWS
    written = json.loads(_read(storage.join(dst, ingest_job.SUMMARY_FILE)))
    assert written == json.loads(json.dumps(summary))


# -- without Ray --------------------------------------------------------------------------------
def test_listing_classifies_and_plan_is_deterministic(source):
    listing = ingest.list_source(str(source))
    assert listing.layout == "mvtec" and listing.hidden == 2  # .DS_Store, the demo marker
    assert len(listing.entries) == N_FILES
    roles = {e.uri: e for e in listing.entries}
    defect = [e for e in listing.entries if e.role == "image" and e.label == 1]
    assert len(defect) == N_TEST_DEFECT and all(roles[e.mask].owner == e.uri for e in defect)
    assert roles[str(source / "readme.txt")].role == "other"
    assert roles[str(source / CATEGORY / "ground_truth/scratch/999_mask.png")].owner is None

    images = [e for e in listing.entries if e.role == "image"]
    a = ingest.plan_chunks(listing.entries, 4, None, {"x": 1})
    assert len(images) == 18 and [len(c.entries) for c in a] == [4, 4, 4, 4, 2]
    assert [c.cid for c in a] == [c.cid for c in ingest.plan_chunks(listing.entries, 4, None,
                                                                      {"x": 1})]
    assert a[0].cid != ingest.plan_chunks(listing.entries, 4, None, {"x": 2})[0].cid
    by_mb = ingest.plan_chunks(listing.entries, None, 0.01, {})  # ~10 kB per shard
    assert all(c.nbytes <= 0.01 * 2**20 or len(c.entries) == 1 for c in by_mb)
    assert sum(len(c.entries) for c in by_mb) == len(images)

    lake = ingest.list_source(str(source / CATEGORY / "train"), category="c", split="train")
    assert lake.layout == "images"
    assert {(e.category, e.split, e.label) for e in lake.entries} == {("c", "train", 0)}


def test_unreadable_file_is_rejected(tmp_path):
    ok = tmp_path / "ok.png"
    ok.write_bytes(_encode(Image.fromarray(np.zeros((8, 8, 3), np.uint8))))
    entries = [ingest.Entry(str(ok), ok.stat().st_size, "image", "c", "train", 0, "good"),
               ingest.Entry(str(tmp_path / "gone.png"), 10, "image", "c", "train", 0, "good")]
    table, records = ingest.process_chunk(
        json.loads(ingest.Chunk(0, "00000-x", entries).descriptor()))
    assert table.column("uri").to_pylist() == [str(ok)]
    gone = records[1]
    assert gone["reason"] == "unreadable" and gone["detail"].startswith("cannot read file")


# -- S3 (moto) and local, through Ray Data --------------------------------------------------
def test_ingest_s3_accounts_for_every_file_and_reruns_idempotently(ray_local, bucket, source):
    src, dst = f"{bucket}/src", f"{bucket}/shards"
    _upload(source, src)
    opts = ingest_job.IngestOptions(src, dst, rows_per_shard=4)
    summary = ingest_job.run(opts)
    assert summary["shards"] == summary["shards_written"] == 5  # 18 images, 4 per shard
    unread = sum((source / name).stat().st_size for name in EXTRA)  # rejected from the listing
    assert summary["bytes_read"] == summary["bytes_seen"] - unread
    assert summary["mb_per_s"] > 0
    _check_output(dst, src, summary)
    first = _shards(dst)

    again = ingest_job.run(opts)  # committed shards are skipped
    assert again["shards_skipped"] == 5 and again["shards_written"] == 0
    assert _shards(dst) == first
    _check_output(dst, src, again)

    forced = ingest_job.run(ingest_job.IngestOptions(src, dst, rows_per_shard=4, force=True))
    assert forced["shards_written"] == 5
    assert _shards(dst) == first  # same names, same bytes: deterministic shards

    # the Ray Data reader sees the shards only (the _-prefixed files are skipped)
    import ray.data

    pafs, path = storage.pyarrow_filesystem(dst)
    assert ray.data.read_parquet(path, filesystem=pafs).count() == N_ROWS


def test_ingest_local_cli_replaces_stale_shards(ray_local, source, tmp_path, capsys):
    dst = str(tmp_path / "shards")
    assert lasb_main(["ingest", str(source), dst, "--rows-per-shard", "4"]) == 0
    assert len(_shards(dst)) == 5
    assert lasb_main(["ingest", str(source), dst, "--shard-mb", "1"]) == 0  # one shard now
    out = capsys.readouterr().out
    assert "removed 10 stale files" in out and f"{N_FILES} files -> {N_ROWS} rows" in out
    assert len(_shards(dst)) == 1
    _check_output(dst, str(source), json.loads(Path(dst, "_summary.json").read_text()))

    images, errors = ingest.read_shard_images(dst, CATEGORY, "train", size=32)
    assert errors == [] and images.shape == (N_TRAIN, 32, 32, 3)
    good = sorted((source / CATEGORY / "train" / "good").glob("00*.png"))
    assert np.array_equal(images, np.stack([decode_image(p.read_bytes()) for p in good]))

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.csv").write_text("a,b\n")
    assert lasb_main(["ingest", str(source), str(tmp_path / "foreign")]) == 2
    assert "did not write" in capsys.readouterr().err


# -- retries against a real HTTP endpoint -----------------------------------------------------
class FlakyProxy(http.server.ThreadingHTTPServer):
    """HTTP proxy to moto that answers 503 SlowDown to the first ``first`` requests and then
    to every ``every``-th one: S3 throttling, as seen by the client."""

    daemon_threads = True

    def __init__(self, upstream: str, first: int, every: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.removeprefix("http://")
        self.first, self.every = first, every
        self.requests = self.throttled = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def should_throttle(self) -> bool:
        with self.lock:
            self.requests += 1
            n = self.requests
            hit = n <= self.first or (self.every and n % self.every == 0)
            self.throttled += bool(hit)
            return bool(hit)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection"})

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                out += self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return out
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        if self.server.should_throttle():
            payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                       b"<Message>Please reduce your request rate.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in self._HOP}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.server.upstream, timeout=30)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in self._HOP and not (k.lower() == "content-length"
                                                   and self.command != "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@pytest.fixture()
def flaky(s3_server, monkeypatch):
    proxy = FlakyProxy(s3_server, first=3, every=7)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # forwarded to Ray tasks by worker_env
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_s3_reads_and_ingest_retry_after_throttling(ray_local, bucket, source, flaky):
    blob = _encode(Image.fromarray(np.full((8, 8, 3), 7, np.uint8)))
    storage.filesystem(bucket)[0].pipe_file("ingest/flaky/one.png", blob)  # 3 x 503 first
    assert flaky.throttled >= 3 and flaky.requests >= 4
    assert _read(f"{bucket}/flaky/one.png") == blob
    pafs, path = storage.pyarrow_filesystem(f"{bucket}/flaky/one.png")
    flaky.first, seen = flaky.requests + 2, flaky.throttled  # pyarrow's client: 2 more 503s
    with pafs.open_input_stream(path) as f:
        assert f.read() == blob
    assert flaky.throttled >= seen + 2

    src = f"{bucket}/src"
    if not storage.filesystem(src)[0].exists("ingest/src/readme.txt"):
        _upload(source, src)
    before = flaky.throttled
    summary = ingest_job.run(ingest_job.IngestOptions(src, f"{bucket}/flaky_shards",
                                                      rows_per_shard=9))
    assert flaky.throttled > before + 3  # the Ray tasks' GETs and PUTs were throttled too
    assert (summary["rows"], summary["rejected"]) == (N_ROWS, len(BAD) + len(EXTRA))
    assert len(_table(f"{bucket}/flaky_shards")) == N_ROWS
