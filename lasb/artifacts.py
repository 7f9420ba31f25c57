"""Model registry on local disk or S3 (fsspec): `<registry>/<category>/<version>/`.

A version holds codec/ and denoiser/ (safetensors), config.yaml, calibration.json,
metrics.json and manifest.json with the sha256 of every file. The manifest is written last:
a version without one is incomplete and never loaded. `<registry>/<category>/latest` names the
newest complete version. Loading verifies every hash, so a tampered file is refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
from pathlib import Path

from lasb import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ArtifactError(RuntimeError):
    """Missing, incomplete or tampered artifact; the message says which and where."""


def check_name(kind: str, name: str) -> str:
    """Category and version names become path parts: no separators, no '..'."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '-', '.' (max 128)"
        )
    return name


def _fs(url: str):
    return storage.filesystem(url)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_version() -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"v{now}-{secrets.token_hex(2)}"


def publish(staging: str | Path, registry: str, category: str, version: str | None = None) -> str:
    """Copy a local staging folder to the registry; manifest last, then the `latest` pointer."""
    check_name("category", category)
    version = check_name("version", version or new_version())
    staging = Path(staging)
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    if not files:
        raise ArtifactError(f"nothing to publish in {staging}")
    manifest = {
        "category": category,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
        "files": {p.relative_to(staging).as_posix(): sha256_file(p) for p in files},
    }
    fs, root = _fs(registry)
    dest = _join(root, category, version)
    if fs.exists(_join(dest, MANIFEST)):
        raise ArtifactError(f"version {version} of {category} already exists in {registry}")
    for p in files:
        target = _join(dest, p.relative_to(staging).as_posix())
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(p), target)
    with fs.open(_join(dest, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    with fs.open(_join(root, category, LATEST), "w") as f:
        f.write(version + "\n")
    log.info("published %s/%s/%s (%d files)", registry, category, version, len(files))
    return version


def list_versions(registry: str, category: str) -> list[str]:
    """Complete versions (those with a manifest), oldest first."""
    check_name("category", category)
    fs, root = _fs(registry)
    base = _join(root, category)
    if not fs.exists(base):
        return []
    out = []
    for entry in fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name != LATEST and fs.exists(_join(base, name, MANIFEST)):
            out.append(name)
    return sorted(out)


def list_categories(registry: str) -> list[str]:
    fs, root = _fs(registry)
    if not fs.exists(root):
        return []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=False)]
    return sorted(n for n in names if _NAME.match(n) and fs.exists(_join(root, n, LATEST)))


def resolve_version(registry: str, category: str, version: str = "latest") -> str:
    check_name("category", category)
    fs, root = _fs(registry)
    if version != LATEST:
        return check_name("version", version)
    pointer = _join(root, category, LATEST)
    if not fs.exists(pointer):
        known = list_categories(registry)
        raise ArtifactError(
            f"unknown category {category!r} in registry {registry}"
            + (f"; available: {', '.join(known)}" if known else "; the registry is empty")
        )
    with fs.open(pointer, "r") as f:
        return check_name("version", f.read().strip())


def verify(folder: str | Path) -> dict:
    """Check manifest + hashes of a local artifact folder; return the manifest."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise ArtifactError(
            f"{folder} has no {MANIFEST}: the artifact is incomplete (half-written?) or not one"
        )
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        raise ArtifactError(f"{mpath} is not a valid manifest: {exc}") from exc
    for rel, digest in files.items():
        path = folder / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise ArtifactError(f"{folder}: file {rel} listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{folder}: sha256 of {rel} does not match the manifest "
                                "(the file was modified or corrupted)")
    return manifest


def fetch(registry: str, category: str, version: str = "latest",
          cache_dir: str | None = None) -> tuple[Path, str]:
    """Return (local verified folder, version). Remote registries are copied to a cache."""
    version = resolve_version(registry, category, version)
    fs, root = _fs(registry)
    src = _join(root, category, version)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        if not os.path.isdir(src):
            raise ArtifactError(f"version {version} of {category} not found in {registry}")
        verify(src)
        return Path(src), version
    cache = Path(cache_dir or os.environ.get("LASB_CACHE", Path(tempfile.gettempdir()) / "lasb"))
    local = cache / category / version
    if (local / MANIFEST).exists():
        try:
            verify(local)
            return local, version
        except ArtifactError:
            log.warning("cached copy %s failed verification; downloading again", local)
    if not fs.exists(_join(src, MANIFEST)):
        raise ArtifactError(f"version {version} of {category} in {registry} has no {MANIFEST}")
    tmp = Path(tempfile.mkdtemp(dir=cache.mkdir(parents=True, exist_ok=True) or cache))
    fs.get(src + "/", str(tmp) + "/", recursive=True)
    verify(tmp)
    local.parent.mkdir(parents=True, exist_ok=True)
    import shutil

    try:
        tmp.rename(local)  # atomic; fails when another process (actor) got there first
    except OSError:
        try:
            verify(local)  # the other process's complete copy: use it
            shutil.rmtree(tmp, ignore_errors=True)
        except ArtifactError:  # a stale broken copy: replace it
            shutil.rmtree(local, ignore_errors=True)
            tmp.rename(local)
    return local, version
