"""The one filesystem layer: local paths and object stores (``s3://``) through fsspec/s3fs.

Everything that reads or writes a user-given location (registries, image lakes, score
outputs) goes through :func:`filesystem`, so an S3-compatible endpoint (MinIO, moto, ...) is
configured in one place: the standard ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
environment variables. Credentials come from the standard AWS chain (environment, shared
config, instance profile); this module never reads, passes on or logs them.

:func:`worker_env` lists the non-secret storage settings of this process, so a Ray driver can
hand them to its tasks and actors (``runtime_env={"env_vars": worker_env()}``) on a cluster
whose workers were started without them.

Retries are set here too, once for both clients (botocore under s3fs, and pyarrow's S3
client): throttling (503 SlowDown) and transient errors (5xx, timeouts, dropped connections)
are retried with exponential backoff and jitter. The standard AWS variables
``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` tune them; without them lasb uses 10 attempts in
botocore's ``standard`` mode (AWS SDKs default to 3 attempts, too few for a long ingest of
millions of objects against a throttling prefix).
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

import fsspec

# Non-secret settings that decide *where* S3 requests go; safe to forward to Ray workers.
_FORWARDED = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
              "AWS_EC2_METADATA_DISABLED", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")
DEFAULT_MAX_ATTEMPTS = 10  # first try included
DEFAULT_RETRY_MODE = "standard"  # botocore: backoff with jitter; "adaptive" adds rate limiting


def protocol(url: str) -> str:
    """'file' for local paths, else the URL scheme ('s3', 'gs', 'memory', ...)."""
    scheme = urlparse(str(url)).scheme
    return "file" if scheme in ("", "file") or len(scheme) == 1 else scheme  # 1 = drive letter


def is_local(url: str) -> bool:
    return protocol(url) == "file"


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_retries() -> dict:
    """botocore retry settings: ``{"total_max_attempts": N, "mode": M}`` (AWS env vars win).

    N counts the first try, as ``AWS_MAX_ATTEMPTS`` does (botocore's own ``max_attempts`` key
    would count retries only).

    ``standard`` mode retries throttling codes (SlowDown, Throttling, ...), HTTP 500/502/503/
    504, timeouts and connection errors, sleeping ``rand(0, 1) * min(scale * 2**i, 20 s)``
    in between (scale 1 s for throttling, 50 ms otherwise; botocore's retries/standard.py).
    """
    try:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    except ValueError as exc:
        raise ValueError(f"AWS_MAX_ATTEMPTS must be an integer, got "
                         f"{os.environ['AWS_MAX_ATTEMPTS']!r}") from exc
    mode = os.environ.get("AWS_RETRY_MODE") or DEFAULT_RETRY_MODE
    if mode not in ("standard", "adaptive", "legacy"):
        raise ValueError(f"AWS_RETRY_MODE must be standard, adaptive or legacy, got {mode!r}")
    return {"total_max_attempts": max(attempts, 1), "mode": mode}


def storage_options(url: str) -> dict:
    """fsspec keyword arguments for ``url`` (no credentials: those come from the AWS chain)."""
    if protocol(url) in ("s3", "s3a"):
        options: dict = {"config_kwargs": {"retries": s3_retries()}}
        endpoint = s3_endpoint()
        if endpoint:
            # no region_name in client_kwargs: s3fs would send it as a bucket LocationConstraint
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a local path or URL."""
    url = str(url)
    if is_local(url):
        url = os.path.abspath(url.removeprefix("file://"))
    return fsspec.core.url_to_fs(url, **storage_options(url))


def pyarrow_filesystem(url: str):
    """(pyarrow.fs.FileSystem, path) for Ray Data / pyarrow readers and writers."""
    import pyarrow.fs as pafs

    url = str(url)
    if is_local(url):
        return pafs.LocalFileSystem(), os.path.abspath(url.removeprefix("file://"))
    if protocol(url) in ("s3", "s3a"):
        parsed = urlparse(url)
        # pyarrow's own AWS SDK client: same attempt count, standard backoff
        kwargs = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=s3_retries()["total_max_attempts"])}
        endpoint = s3_endpoint()
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or ep.path
            kwargs["scheme"] = ep.scheme or "https"
            kwargs["region"] = (os.environ.get("AWS_REGION")
                                or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' (URLs and local paths alike)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write a whole file so readers see either nothing or all of it.

    Local: write a temporary sibling, then rename over the target. Object stores: one PUT,
    which is atomic by itself (an object is visible only once completely uploaded).
    """
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs.pipe_file(path, data)


def worker_env() -> dict[str, str]:
    """Non-secret storage settings of this process, to forward to Ray workers."""
    return {k: os.environ[k] for k in _FORWARDED if os.environ.get(k)}


def open_url(url: str, mode: str = "rb"):
    """fsspec.open with this module's settings (a context manager)."""
    return fsspec.open(url, mode, **storage_options(url))
