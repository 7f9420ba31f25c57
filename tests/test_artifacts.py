"""Registry: round trip, manifest written last, tampered or half-written versions refused."""

import json

import pytest

from lasb import artifacts


def make_staging(tmp_path, content=b"weights"):
    staging = tmp_path / "staging"
    (staging / "codec").mkdir(parents=True)
    (staging / "codec" / "model.safetensors").write_bytes(content)
    (staging / "config.yaml").write_text("bridge: {}\n")
    return staging


def test_publish_then_fetch_round_trip(tmp_path):
    registry = str(tmp_path / "reg")
    v1 = artifacts.publish(make_staging(tmp_path, b"one"), registry, "bottle")
    folder, version = artifacts.fetch(registry, "bottle")
    assert version == v1
    assert (folder / "codec" / "model.safetensors").read_bytes() == b"one"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"codec/model.safetensors", "config.yaml"}
    v2 = artifacts.publish(make_staging(tmp_path / "b", b"two"), registry, "bottle", "v2")
    assert artifacts.resolve_version(registry, "bottle") == v2 == "v2"
    assert artifacts.list_versions(registry, "bottle") == sorted([v1, "v2"])
    assert artifacts.fetch(registry, "bottle", v1)[1] == v1  # pinned version still loads


def test_tampered_file_is_refused(tmp_path):
    registry = str(tmp_path / "reg")
    v = artifacts.publish(make_staging(tmp_path), registry, "bottle")
    (tmp_path / "reg" / "bottle" / v / "codec" / "model.safetensors").write_bytes(b"evil")
    with pytest.raises(artifacts.ArtifactError, match="sha256 of codec/model.safetensors"):
        artifacts.fetch(registry, "bottle")


def test_half_written_version_without_manifest_is_refused(tmp_path):
    registry = str(tmp_path / "reg")
    v = artifacts.publish(make_staging(tmp_path), registry, "bottle")
    (tmp_path / "reg" / "bottle" / v / "manifest.json").unlink()
    with pytest.raises(artifacts.ArtifactError, match="incomplete"):
        artifacts.fetch(registry, "bottle", v)
    assert artifacts.list_versions(registry, "bottle") == []


def test_missing_file_listed_in_manifest_is_refused(tmp_path):
    registry = str(tmp_path / "reg")
    v = artifacts.publish(make_staging(tmp_path), registry, "bottle")
    (tmp_path / "reg" / "bottle" / v / "config.yaml").unlink()
    with pytest.raises(artifacts.ArtifactError, match="config.yaml .*missing"):
        artifacts.fetch(registry, "bottle")


def test_unknown_category_lists_the_known_ones(tmp_path):
    registry = str(tmp_path / "reg")
    artifacts.publish(make_staging(tmp_path), registry, "bottle")
    with pytest.raises(artifacts.ArtifactError, match="unknown category 'cable'.*bottle"):
        artifacts.fetch(registry, "cable")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 200])
def test_category_names_cannot_escape_the_registry(tmp_path, name):
    with pytest.raises(ValueError, match="invalid category name"):
        artifacts.publish(make_staging(tmp_path), str(tmp_path / "reg"), name)


def test_existing_version_is_never_overwritten(tmp_path):
    registry = str(tmp_path / "reg")
    artifacts.publish(make_staging(tmp_path), registry, "bottle", "v1")
    with pytest.raises(artifacts.ArtifactError, match="already exists"):
        artifacts.publish(make_staging(tmp_path / "x"), registry, "bottle", "v1")
