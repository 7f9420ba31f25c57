"""`lasb ingest SRC DST`: images (MVTec folders or a lake) -> Parquet shards, with Ray Data.

    lasb ingest SRC DST [--rows-per-shard N] [--shard-mb MB] [--category C --split S]

SRC is a local folder or ``s3://`` prefix: an MVTec-layout dataset (or one category of it) or
loose images. DST is a local folder or ``s3://`` prefix; it receives

* ``part-<index>-<hash>.parquet``: the shards, DESIGN.md schema (:data:`lasb.ingest.SHARD_SCHEMA`),
  one row per valid, distinct image, in URI order;
* ``_rejects.parquet``: every other input file with its reason (:data:`lasb.ingest.REASONS`);
* ``_summary.json``: counts, bytes, seconds, MB/s (also printed);
* ``_commits/``: one marker per written shard (its per-file records), for resuming;
* ``_manifest.json``, written last: the shard list. A DST without it is incomplete.

``_``-prefixed files are skipped by ``pyarrow.parquet.read_table(DST)`` and
``ray.data.read_parquet(DST)``, which therefore see exactly the shards.

How it runs: the driver lists SRC (sorted) and cuts the images into shards by ``--rows-per-shard``
and/or ``--shard-mb`` from the listing alone, so names and contents depend only on the input
and the settings. Ray Data runs one CPU task per shard (``map_batches``): read the files (several
GETs in flight), sha256, decode-check, write the shard and its marker. The driver then rejects
duplicates (same sha256 as an image with a smaller URI, which stays), rewrites the few shards
that held one, and writes the rejects, the summary and the manifest. A rerun skips shards whose
marker exists (``--force`` redoes them) and deletes shards of earlier runs over other input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lasb import ingest, storage
from lasb.data import DEFAULT_MAX_PIXELS

log = logging.getLogger("lasb.ingest")

COMMITS = "_commits"
REJECTS_FILE = "_rejects.parquet"
SUMMARY_FILE = "_summary.json"
MANIFEST_FILE = ingest.MANIFEST_FILE
FORMAT = 1
_OWN_FILES = (REJECTS_FILE, SUMMARY_FILE, MANIFEST_FILE)


@dataclass
class IngestOptions:
    src: str
    dst: str
    layout: str = "auto"  # "auto" | "mvtec" | "images"
    category: str | None = None
    split: str | None = None
    rows_per_shard: int | None = None
    shard_mb: float | None = 128.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    cpus_per_task: float = 1.0
    force: bool = False
    progress_every_s: float = 10.0

    def settings(self) -> dict:
        """What changes the rows: part of every shard name (a change rewrites the shards)."""
        return {"format": FORMAT, "layout": self.layout, "category": self.category,
                "split": self.split, "max_pixels": self.max_pixels}


# ---------------------------------------------------------------------------------------------
# destination layout and commit protocol
# ---------------------------------------------------------------------------------------------
class Destination:
    """DST: shards, per-shard commit markers, rejects, summary, manifest."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = storage.filesystem(self.url)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @staticmethod
    def shard_name(cid: str) -> str:
        return f"part-{cid}.parquet"

    def marker_path(self, cid: str) -> str:
        return self.path(COMMITS, f"part-{cid}.json")

    def _ls(self, *parts: str) -> list[str]:
        folder = self.path(*parts)
        self.fs.invalidate_cache()  # other processes write here: never trust a cached listing
        if not self.fs.exists(folder) or self.fs.isfile(folder):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]

    def check_owned(self) -> None:
        """Refuse a DST holding anything but an earlier ingest's files (never delete those)."""
        foreign = [n for n in self._ls() if not (
            n.startswith(".") or n == COMMITS or n in _OWN_FILES
            or (n.startswith("part-") and n.endswith(".parquet")))]
        if foreign:
            raise ValueError(f"destination {self.url} holds files that lasb ingest did not write "
                             f"({', '.join(sorted(foreign)[:5])}); use an empty or new folder")

    def committed(self, cids: set[str]) -> dict[str, list[dict]]:
        """{cid: records} of the planned shards whose shard and marker both exist."""
        shards = set(self._ls())
        out = {}
        for name in self._ls(COMMITS):
            cid = name.removeprefix("part-").removesuffix(".json")
            if cid in cids and self.shard_name(cid) in shards:
                with self.fs.open(self.path(COMMITS, name), "r") as f:
                    out[cid] = json.load(f)["records"]
        return out

    def remove_stale(self, cids: set[str]) -> int:
        """Delete shards and markers that are not in this plan (earlier runs, other input)."""
        keep = {self.shard_name(c) for c in cids}
        stale = [self.path(n) for n in self._ls()
                 if n.startswith("part-") and n.endswith(".parquet") and n not in keep]
        stale += [self.path(COMMITS, n) for n in self._ls(COMMITS)
                  if n.removeprefix("part-").removesuffix(".json") not in cids]
        for path in stale:
            self.fs.rm(path)
        return len(stale)

    def remove(self, name: str) -> None:
        self.fs.invalidate_cache()
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name))

    def write(self, data: bytes, *parts: str) -> None:
        storage.write_bytes_atomic(self.fs, self.path(*parts), data)

    def write_json(self, data: dict, *parts: str) -> None:
        self.write(json.dumps(data, indent=1, sort_keys=True).encode(), *parts)

    def read_shard(self, cid: str) -> pa.Table:
        self.fs.invalidate_cache()  # the shard was written by a Ray task, not through self.fs
        with self.fs.open(self.path(self.shard_name(cid)), "rb") as f:
            return pq.read_table(f)


# ---------------------------------------------------------------------------------------------
# the Ray Data stage
# ---------------------------------------------------------------------------------------------
def ingest_chunks(batch: pa.Table, dst: str, max_pixels: int) -> pa.Table:
    """``map_batches`` function: for each chunk descriptor, read + sha256 + validate its files,
    write the shard, then its commit marker; return the per-file records to the driver."""
    dest = Destination(dst)
    out = []
    for text in batch.column("desc").to_pylist():
        desc = json.loads(text)
        t0 = time.perf_counter()
        table, records = ingest.process_chunk(desc, max_pixels)
        dest.write(ingest.parquet_bytes(table), dest.shard_name(desc["cid"]))
        dest.write_json({"chunk": desc["cid"], "records": records,
                         "seconds": time.perf_counter() - t0},
                        COMMITS, f"part-{desc['cid']}.json")
        out.extend(records)
    return pa.Table.from_pylist(out, schema=ingest.RECORD_SCHEMA)


def _execute(opts: IngestOptions, pending: list[ingest.Chunk], address: str | None,
             times: dict) -> list[dict]:
    """Run the shard tasks on Ray Data; log progress; return the records of all their files."""
    import ray.data

    from jobs.common import init_ray

    t0 = time.perf_counter()
    init_ray(address)
    times["ray_init"] = time.perf_counter() - t0
    env = {"env_vars": storage.worker_env()} if storage.worker_env() else None
    descs = [{"desc": c.descriptor()} for c in pending]
    ds = ray.data.from_items(descs, override_num_blocks=len(descs))
    ds = ds.map_batches(ingest_chunks, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"dst": opts.dst, "max_pixels": opts.max_pixels},
                        num_cpus=opts.cpus_per_task, runtime_env=env)

    total_files = sum(len(c.entries) for c in pending)
    total_bytes = sum(c.nbytes for c in pending)
    records: list[dict] = []
    done_chunks, nbytes, t0 = set(), 0, time.perf_counter()
    last = t0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        records.extend(batch.to_pylist())
        done_chunks.update(pc.unique(batch.column("chunk")).to_pylist())
        nbytes += int(pc.sum(batch.column("size")).as_py() or 0)
        now = time.perf_counter()
        if now - last >= opts.progress_every_s:
            last = now
            images = sum(1 for r in records if r["role"] == "image")
            print(f"lasb ingest: {len(done_chunks)}/{len(pending)} shards, {images}/"
                  f"{total_files} images, {nbytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB, "
                  f"{nbytes / 1e6 / (now - t0):.1f} MB/s", flush=True)
    return records


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
def _dedup_shards(dest: Destination, chunks: list[ingest.Chunk], dups: dict[str, str]) -> int:
    """Drop duplicate rows from the shards that hold them; idempotent (a clean shard stays)."""
    rewritten = 0
    by_cid = {c.cid: c for c in chunks}
    for cid in sorted({cid for cid, c in by_cid.items() if any(e.uri in dups for e in c.entries)}):
        table = dest.read_shard(cid)
        keep = pc.invert(pc.is_in(table.column("uri"), value_set=pa.array(sorted(dups))))
        if int(pc.sum(keep).as_py() or 0) == table.num_rows:
            continue  # already deduplicated by an earlier run
        dest.write(ingest.parquet_bytes(table.filter(keep)), dest.shard_name(cid))
        rewritten += 1
    return rewritten


def _check_accounting(listing: ingest.SourceListing, records: list[dict]) -> None:
    """Each input file has exactly one record; anything else is a bug, not a data problem."""
    seen = Counter(r["uri"] for r in records)
    missing = [e.uri for e in listing.entries if e.uri not in seen]
    twice = [u for u, n in seen.items() if n > 1]
    if missing or twice or len(seen) != len(listing.entries):
        raise RuntimeError(f"ingest accounting broken: {len(missing)} files without a record "
                           f"({missing[:3]}), {len(twice)} with several ({twice[:3]})")


def run(opts: IngestOptions, address: str | None = None) -> dict:
    """Ingest opts.src into opts.dst; returns (and writes, and prints) the summary."""
    t_start = time.perf_counter()
    times = {"ray_init": 0.0}
    dest = Destination(opts.dst)
    dest.check_owned()
    listing = ingest.list_source(opts.src, opts.layout, opts.category, opts.split,
                                 exclude=opts.dst)
    if not listing.entries:
        raise ValueError(f"no input files under {opts.src}")
    chunks = ingest.plan_chunks(listing.entries, opts.rows_per_shard, opts.shard_mb,
                                opts.settings())
    cids = {c.cid for c in chunks}
    dest.remove(MANIFEST_FILE)  # from here until the end, DST is "in progress"
    n_stale = dest.remove_stale(cids)
    done = {} if opts.force else dest.committed(cids)
    pending = [c for c in chunks if c.cid not in done]
    times["list"] = time.perf_counter() - t_start
    print(f"lasb ingest: {len(listing.entries)} files ({listing.layout} layout) in {opts.src}; "
          f"{len(chunks)} shards, {len(done)} already written, {len(pending)} to write"
          + (f"; removed {n_stale} stale files of an earlier run" if n_stale else ""),
          flush=True)

    records = ingest.static_records(listing.entries)
    for cid in sorted(done):
        records += done[cid]
    t_pipe = time.perf_counter()
    if pending:
        records += _execute(opts, pending, address, times)
    times["pipeline"] = time.perf_counter() - t_pipe - times["ray_init"]

    t_fin = time.perf_counter()
    dups = ingest.find_duplicates(records)
    records = ingest.apply_duplicates(records, dups)
    _check_accounting(listing, records)
    n_dedup = _dedup_shards(dest, chunks, dups)
    dest.write(ingest.parquet_bytes(ingest.rejects_table(records)), REJECTS_FILE)
    rows_by_chunk = Counter(r["chunk"] for r in records
                            if r["role"] == "image" and r["reason"] is None)
    times["finalise"] = time.perf_counter() - t_fin
    times["total"] = time.perf_counter() - t_start

    summary = _summary(opts, listing, chunks, records, dups, done, pending, n_dedup, times)
    dest.write_json(summary, SUMMARY_FILE)
    dest.write_json({
        "format": FORMAT, "source": opts.src, "layout": listing.layout,
        "settings": opts.settings(), "rows": summary["rows"],
        "shards": [{"file": dest.shard_name(c.cid), "rows": rows_by_chunk[c.cid]}
                   for c in chunks],
        "rejects": REJECTS_FILE, "summary": SUMMARY_FILE,
        "completed": dt.datetime.now(dt.timezone.utc).isoformat(),
    }, MANIFEST_FILE)
    print(format_summary(summary), flush=True)
    return summary


def _summary(opts: IngestOptions, listing: ingest.SourceListing, chunks: list[ingest.Chunk],
             records: list[dict], dups: dict[str, str], done: dict, pending: list,
             n_dedup: int, times: dict) -> dict:
    roles = Counter(e.role for e in listing.entries)
    ok = Counter(r["role"] for r in records if r["reason"] is None)
    bytes_read = sum(c.nbytes for c in pending)
    # throughput of this run's ingest work: listing to manifest, without starting Ray
    busy = max(times["total"] - times["ray_init"], 1e-9)
    return {
        "source": opts.src, "destination": opts.dst, "layout": listing.layout,
        "files_seen": len(listing.entries),
        "images": roles["image"], "masks": roles["mask"], "other_files": roles["other"],
        "hidden_skipped": listing.hidden,
        "rows": ok["image"], "masks_attached": ok["mask"],
        "rejected": sum(1 for r in records if r["reason"] is not None),
        "rejected_by_reason": ingest.count_reasons(records),
        "duplicates": len(dups),
        "duplicate_examples": [{"uri": u, "duplicate_of": k} for u, k in sorted(dups.items())][:100],
        "shards": len(chunks), "shards_skipped": len(done), "shards_written": len(pending),
        "shards_deduplicated": n_dedup,
        "bytes_seen": sum(e.size for e in listing.entries),
        "bytes_read": bytes_read,
        "mb_per_s": bytes_read / 1e6 / busy,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "settings": {"rows_per_shard": opts.rows_per_shard, "shard_mb": opts.shard_mb,
                     **opts.settings()},
    }


def format_summary(s: dict) -> str:
    lines = [
        (f"lasb ingest: {s['files_seen']} files -> {s['rows']} rows in {s['shards']} shards "
         f"({s['masks_attached']} masks attached), {s['rejected']} rejected; {s['destination']}"),
        (f"  shards: {s['shards_written']} written, {s['shards_skipped']} already done, "
         f"{s['shards_deduplicated']} deduplicated"),
        (f"  this run: {s['bytes_read'] / 1e6:.1f} MB read in {s['seconds']['total']:.1f} s "
         f"(Ray start {s['seconds']['ray_init']:.1f} s): {s['mb_per_s']:.1f} MB/s"),
    ]
    for reason, n in s["rejected_by_reason"].items():
        lines.append(f"  rejected: {reason}: {n}")
    for d in s["duplicate_examples"][:5]:
        lines.append(f"  duplicate: {d['uri']} = {d['duplicate_of']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="MVTec-layout folder or image lake (path or s3://)")
    p.add_argument("dst", metavar="DST", help="output folder or s3:// prefix for the shards")
    p.add_argument("--layout", choices=["auto", "mvtec", "images"], default="auto",
                   help="auto: MVTec when SRC has [<category>/]train/good/")
    p.add_argument("--category", help="category of loose images (overrides MVTec folder names)")
    p.add_argument("--split", choices=["train", "test"],
                   help="split of loose images (train implies label 0)")
    p.add_argument("--rows-per-shard", type=int, help="at most N images per shard")
    p.add_argument("--shard-mb", type=float, default=128.0,
                   help="target input MB per shard (default 128; 0 = no byte limit)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="reject images above this many pixels (decompression bombs)")
    p.add_argument("--cpus-per-task", type=float, default=1.0,
                   help="CPUs per shard task (below 1 for S3-latency-bound reads)")
    p.add_argument("--force", action="store_true", help="rewrite shards already committed")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")


def options_from_args(args: argparse.Namespace) -> IngestOptions:
    return IngestOptions(src=args.src, dst=args.dst, layout=args.layout,
                         category=args.category, split=args.split,
                         rows_per_shard=args.rows_per_shard,
                         shard_mb=args.shard_mb or None, max_pixels=args.max_pixels,
                         cpus_per_task=args.cpus_per_task, force=args.force)


def main(args: argparse.Namespace) -> int:
    run(options_from_args(args), args.address)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
