"""Local ArtifactStore, safe_key and open_store (no network). S3 is in test_store_s3.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merit_core.config import StoreConfig
from merit_core.store import (
    CorruptArtifactError,
    IncompleteArtifactError,
    LocalStore,
    ObjectNotFoundError,
    S3Store,
    StoreError,
    open_store,
    safe_key,
)
from merit_core.store.manifest import MANIFEST_NAME, read_manifest


def write_checkpoint(d: Path) -> dict[str, bytes]:
    """A small sharded checkpoint directory; returns {rel_path: bytes}."""
    files = {
        "model-00001-of-00002.safetensors": os.urandom(3000),
        "model-00002-of-00002.safetensors": os.urandom(1000),
        "model.safetensors.index.json": b'{"weight_map": {}}',
        "config.json": b'{"model_type": "llama"}',
        "tokenizer/tokenizer.json": b"{}",
    }
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return files


# --------------------------------------------------------------------------- safe_key


@pytest.mark.parametrize("name", ["../../x", "a/b", ".", "..", "/etc/passwd", "a\\b", "x\x00y", "ü name", "a" * 300])
def test_safe_key_neutralises_names_into_one_component(name):
    key = safe_key("runs", name, "branches", "0")
    parts = key.split("/")
    assert len(parts) == 4 and parts[0] == "runs" and parts[2:] == ["branches", "0"]
    comp = parts[1]
    assert comp not in ("", ".", "..")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in comp)
    assert len(comp) <= 200
    assert safe_key("runs", name, "branches", "0") == key  # deterministic


def test_safe_key_keeps_clean_names_and_distinguishes_escaped_ones():
    assert safe_key("runs", "demo-1", "branches", "0") == "runs/demo-1/branches/0"
    assert safe_key("sketches", "abc.npy") == "sketches/abc.npy"
    assert len({safe_key("a/b"), safe_key("a_b"), safe_key("a b"), safe_key("a:b")}) == 4


def test_safe_key_refuses_empty():
    with pytest.raises(ValueError, match="empty"):
        safe_key("runs", "")
    with pytest.raises(ValueError):
        safe_key()


def test_safe_key_cannot_escape_a_local_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    for evil in ["../../x", "/abs", "..", "a/../../b"]:
        store.put_json(safe_key("runs", evil, "report.json"), {"ok": 1})
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all((tmp_path / "store") in p.parents for p in written)


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "", "a//b", "a/./b", "a b"])
def test_store_methods_refuse_unsafe_keys(tmp_path, key):
    store = LocalStore(tmp_path)
    with pytest.raises(StoreError, match="safe_key"):
        store.put_json(key, {})
    with pytest.raises(StoreError, match="safe_key"):
        store.staging_dir(key)


# --------------------------------------------------------------------------- local store


def test_local_round_trip_manifest_last(tmp_path):
    store = LocalStore(tmp_path / "store")
    key = safe_key("runs", "r1", "branches", "0")
    d = store.staging_dir(key)
    assert d == tmp_path / "store" / key and list(d.iterdir()) == []
    files = write_checkpoint(d)
    assert not store.is_complete(key) and store.list_complete("runs") == []
    uri = store.commit_dir(key, d, {"step": 3})
    assert uri == (tmp_path / "store").resolve().as_uri() + "/" + key
    assert store.is_complete(key)
    m = read_manifest(d)
    assert set(m["files"]) == set(files) and m["metadata"] == {"step": 3}
    # manifest written last: its mtime is not older than any file's
    assert all((d / MANIFEST_NAME).stat().st_mtime_ns >= (d / r).stat().st_mtime_ns for r in files)
    got = store.fetch_dir(key)
    assert {r: (got / r).read_bytes() for r in files} == files
    assert store.list_complete("runs") == [key]
    assert store.list_complete() == [key]


def test_local_staging_dir_removes_stale_manifest_and_files(tmp_path):
    store = LocalStore(tmp_path)
    key = "runs/r/merged"
    d = store.staging_dir(key)
    write_checkpoint(d)
    store.commit_dir(key, d)
    d2 = store.staging_dir(key)
    assert d2 == d and list(d2.iterdir()) == []
    assert not store.is_complete(key)
    with pytest.raises(IncompleteArtifactError, match="runs/r/merged"):
        store.fetch_dir(key)


def test_local_commit_from_other_dir_copies_then_manifests(tmp_path):
    store = LocalStore(f"file://{tmp_path}/store")
    src = tmp_path / "src"
    files = write_checkpoint(src)
    key = "models/abc"
    # leave a stale complete version with an extra file
    old = store.staging_dir(key)
    (old / "old.bin").write_bytes(b"x")
    store.commit_dir(key, old)
    store.commit_dir(key, src, {"v": 2})
    got = store.fetch_dir(key)
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == sorted(
        [*files, MANIFEST_NAME]
    )
    assert not (src / MANIFEST_NAME).exists()  # the source dir is left untouched


def test_local_missing_manifest_is_incomplete(tmp_path):
    store = LocalStore(tmp_path)
    d = store.staging_dir("runs/r/branches/1")
    write_checkpoint(d)  # crashed before commit
    assert not store.is_complete("runs/r/branches/1")
    assert store.list_complete("runs") == []
    with pytest.raises(IncompleteArtifactError, match="runs/r/branches/1"):
        store.fetch_dir("runs/r/branches/1")


def test_local_corrupt_file_detected_naming_key_and_file(tmp_path):
    store = LocalStore(tmp_path)
    key = "runs/r/branches/0"
    d = store.staging_dir(key)
    write_checkpoint(d)
    store.commit_dir(key, d)
    p = d / "model-00001-of-00002.safetensors"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"runs/r/branches/0.*model-00001-of-00002\.safetensors"):
        store.fetch_dir(key)


def test_local_refuses_to_overwrite_nested_artifact(tmp_path):
    store = LocalStore(tmp_path)
    inner = store.staging_dir("runs/r/branches/0/checkpoints/step-1")
    (inner / "a").write_bytes(b"a")
    store.commit_dir("runs/r/branches/0/checkpoints/step-1", inner)
    with pytest.raises(StoreError, match="must not nest"):
        store.staging_dir("runs/r/branches/0")
    assert store.is_complete("runs/r/branches/0/checkpoints/step-1")


def test_local_objects_json_files_delete(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_json("runs/r/report/report.json", {"a": [1, 2]})
    assert store.get_json("runs/r/report/report.json") == {"a": [1, 2]}
    assert store.exists("runs/r/report/report.json") and not store.exists("runs/r/nothing")
    f = tmp_path / "sketch.npy"
    f.write_bytes(b"\x01\x02")
    store.put_file("sketches/m/s.npy", f)
    out = store.get_file("sketches/m/s.npy", tmp_path / "out")
    assert out.read_bytes() == b"\x01\x02"
    outdir = tmp_path / "dir"
    outdir.mkdir()
    assert store.get_file("sketches/m/s.npy", outdir) == outdir / "s.npy"
    assert not [p for p in (tmp_path / "s").rglob("*.tmp-*")]  # no temp leftovers
    with pytest.raises(ObjectNotFoundError):
        store.get_json("runs/r/none.json")
    d = store.staging_dir("runs/r/merged")
    write_checkpoint(d)
    store.commit_dir("runs/r/merged", d)
    store.delete_prefix("runs/r")
    assert not store.exists("runs/r/report/report.json") and store.list_complete() == []
    assert store.exists("sketches/m/s.npy")


# --------------------------------------------------------------------------- open_store


def test_open_store_by_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    s = open_store(StoreConfig(uri=str(tmp_path / "a")))
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "a").resolve()
    assert s.local_cache_dir == tmp_path / "cache"
    s = open_store(StoreConfig(uri=(tmp_path / "b").as_uri()))
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "b").resolve()
    s = open_store(
        StoreConfig(uri="s3://bucket/some/prefix/", endpoint_url="http://minio:9000", addressing_style="path")
    )
    assert isinstance(s, S3Store) and (s.bucket, s.prefix) == ("bucket", "some/prefix")
    assert s.uri == "s3://bucket/some/prefix" and s.uri_for("runs/x") == "s3://bucket/some/prefix/runs/x"
    with pytest.raises(StoreError, match="no bucket"):
        open_store(StoreConfig(uri="s3:///x"))
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store(StoreConfig(uri="gs://b/x"))


def test_store_module_does_not_import_prefect_or_boto3():
    code = "import sys, merit_core.store; print('prefect' in sys.modules, 'boto3' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_s3_repr_hides_credentials_and_endpoint_userinfo():
    import boto3

    session = boto3.Session(aws_access_key_id="AKIAREPRLEAKCHECK0001", aws_secret_access_key="repr-secret-never-shown")
    s = S3Store("bkt", "pre", endpoint_url="http://user:pw-in-url@minio:9000", session=session)
    for text in (repr(s), str(s), s.uri, s.uri_for("runs/x")):
        assert "AKIAREPRLEAKCHECK0001" not in text and "repr-secret" not in text and "pw-in-url" not in text
    assert "bkt" in repr(s) and "pre" in repr(s) and "minio:9000" in repr(s)


def test_s3_store_pickles_without_its_client(tmp_path):
    import pickle

    s = S3Store("bkt", "pre", endpoint_url="http://127.0.0.1:1", cache_dir=tmp_path)
    t = pickle.loads(pickle.dumps(s))
    assert repr(t) == repr(s) and t.transport._client is None
