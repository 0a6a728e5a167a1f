"""S3Store against a real S3 endpoint on 127.0.0.1 (moto in server mode; boto3 talks
HTTP to it unchanged). Faults: interrupted multipart uploads (in-process and a SIGKILLed
writer), a corrupted object, the endpoint dying mid-upload, an endpoint that never
answers, and credentials leaking into logs or files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
import uuid
from pathlib import Path

import boto3
import pytest

from merit_core.config import StoreConfig
from merit_core.store import (
    CorruptArtifactError,
    IncompleteArtifactError,
    ObjectNotFoundError,
    S3Store,
    StoreError,
    TransferSettings,
    open_store,
    set_session_provider,
)
from merit_core.store.manifest import MANIFEST_NAME

ACCESS_KEY = "AKIAMERITTESTLEAK4242"
SECRET_KEY = "merit-test-secret-DO-NOT-LEAK-7f3a9c"
MiB = 1024 * 1024
# Smallest legal multipart settings (S3 parts are >= 5 MiB) and a tight retry budget.
SMALL = TransferSettings(
    multipart_threshold=5 * MiB,
    multipart_chunksize=5 * MiB,
    max_concurrency=2,
    max_attempts=3,
    connect_timeout=1,
    read_timeout=5,
)
KEY = "runs/r1/branches/0"


@pytest.fixture(scope="module")
def endpoint(s3_endpoint):
    return s3_endpoint


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def raw_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture()
def bucket(endpoint):
    name = f"merit-{uuid.uuid4().hex[:12]}"
    raw_client(endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def make_store(endpoint, bucket, tmp_path):
    def make(cache: str = "cache", **kw) -> S3Store:
        kw.setdefault("transfer", SMALL)
        return S3Store(
            bucket,
            "merit/test",
            endpoint_url=endpoint,
            region="us-east-1",
            addressing_style="path",
            cache_dir=tmp_path / cache,
            **kw,
        )

    return make


def write_checkpoint(d: Path) -> dict[str, bytes]:
    """A sharded HF-style checkpoint; the shards are above the multipart threshold."""
    rng = os.urandom
    files = {
        "model-00001-of-00002.safetensors": rng(12 * MiB + 123),  # 3 parts
        "model-00002-of-00002.safetensors": rng(6 * MiB),  # 2 parts
        "model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}).encode(),
        "config.json": b'{"model_type": "llama"}',
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    }
    d.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return files


def count_calls(store: S3Store, op: str) -> list[int]:
    calls = [0]

    def hook(**_):
        calls[0] += 1

    store.client.meta.events.register(f"before-call.s3.{op}", hook)
    return calls


# --------------------------------------------------------------------------- round trip


def test_round_trip_sharded_checkpoint(make_store, endpoint, bucket):
    store = make_store()
    d = store.staging_dir(KEY)
    assert d.is_dir() and list(d.iterdir()) == []
    files = write_checkpoint(d)
    parts = count_calls(store, "UploadPart")
    uri = store.commit_dir(KEY, d, {"trained_tokens": 1234})
    assert uri == f"s3://{bucket}/merit/test/{KEY}"
    assert parts[0] == 5  # 3 + 2 parts: the shards went multipart
    assert not d.exists()  # the staging dir is cleaned up after the upload
    raw = raw_client(endpoint)
    etag = raw.head_object(Bucket=bucket, Key=f"merit/test/{KEY}/model-00001-of-00002.safetensors")["ETag"]
    assert etag.strip('"').endswith("-3")
    assert store.is_complete(KEY) and store.list_complete("runs") == [KEY] and store.list_complete() == [KEY]

    reader = make_store("reader-cache")  # another worker: empty cache
    got = reader.fetch_dir(KEY)
    assert {r: (got / r).read_bytes() for r in files} == files
    manifest = json.loads((got / MANIFEST_NAME).read_text())
    assert manifest["metadata"] == {"trained_tokens": 1234} and set(manifest["files"]) == set(files)

    gets = count_calls(reader, "GetObject")
    heads = count_calls(reader, "HeadObject")
    assert reader.fetch_dir(KEY) == got  # cached by hash: only the manifest is read again
    assert gets[0] == 1 and heads[0] == 0


def test_overwrite_removes_stale_objects_and_refuses_nesting(make_store, endpoint, bucket):
    store = make_store()
    d = store.staging_dir(KEY)
    (d / "old.bin").write_bytes(b"old")
    (d / "config.json").write_bytes(b"{}")
    store.commit_dir(KEY, d)
    d = store.staging_dir(KEY)
    (d / "config.json").write_bytes(b'{"v": 2}')
    store.commit_dir(KEY, d)
    keys = {o["Key"] for o in raw_client(endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"merit/test/{KEY}/config.json", f"merit/test/{KEY}/{MANIFEST_NAME}"}
    assert (store.fetch_dir(KEY) / "config.json").read_bytes() == b'{"v": 2}'
    outer = store.staging_dir("runs/r1")
    (outer / "x").write_bytes(b"x")
    with pytest.raises(StoreError, match="must not nest"):
        store.commit_dir("runs/r1", outer)


def test_single_objects_list_and_delete(make_store, tmp_path):
    store = make_store()
    store.put_json("runs/r1/report/report.json", {"acc": 0.5})
    assert store.get_json("runs/r1/report/report.json") == {"acc": 0.5}
    assert store.exists("runs/r1/report/report.json") and not store.exists("runs/r1/nope.json")
    with pytest.raises(ObjectNotFoundError, match="nope.json"):
        store.get_json("runs/r1/nope.json")
    src = tmp_path / "big.npy"
    src.write_bytes(os.urandom(6 * MiB))  # multipart both ways
    store.put_file("sketches/m/s.npy", src)
    assert store.get_file("sketches/m/s.npy", tmp_path / "out.npy").read_bytes() == src.read_bytes()
    with pytest.raises(ObjectNotFoundError):
        store.get_file("sketches/m/none.npy", tmp_path / "x")
    for k in ("runs/r1/branches/0", "runs/r1/branches/1", "runs/r2/merged"):
        d = store.staging_dir(k)
        (d / "a.txt").write_text(k)
        store.commit_dir(k, d)
    assert store.list_complete("runs/r1") == ["runs/r1/branches/0", "runs/r1/branches/1"]
    assert store.list_complete("runs/r1/branches/1") == ["runs/r1/branches/1"]
    store.delete_prefix("runs/r1")
    assert store.list_complete() == ["runs/r2/merged"] and not store.exists("runs/r1/report/report.json")
    assert store.exists("sketches/m/s.npy")


def test_presigned_urls_serve_the_report_figures(make_store, endpoint, tmp_path):
    import urllib.request

    from merit_core.pipeline.reports import report_for_viewer

    store = make_store()
    d = store.staging_dir("runs/r1/report")
    png = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)
    (d / "conflict_matrix.png").write_bytes(png)
    (d / "report.md").write_text("![conflict matrix](conflict_matrix.png)\n")
    store.commit_dir("runs/r1/report", d)
    url = store.presigned_url("runs/r1/report/conflict_matrix.png", expires_s=600)
    assert url.startswith(f"{endpoint}/{store.bucket}/merit/test/runs/r1/report/conflict_matrix.png?")
    assert "X-Amz-Expires=600" in url and "X-Amz-Signature=" in url and SECRET_KEY not in url
    with urllib.request.urlopen(url, timeout=10) as r:  # plain HTTP GET, no credentials
        assert r.read() == png
    # the report artifact's figure is such a URL; the file in the store keeps its relative path
    md = report_for_viewer(store, "runs/r1/report", "A ![conflict matrix](conflict_matrix.png), ![x](https://e/x.png)")
    signed = md.removeprefix("A ![conflict matrix](").removesuffix("), ![x](https://e/x.png)")
    assert signed.startswith(f"{endpoint}/") and "X-Amz-Signature=" in signed and "(" not in signed
    with urllib.request.urlopen(signed, timeout=10) as r:
        assert r.read() == png
    assert (store.fetch_dir("runs/r1/report") / "report.md").read_text() == "![conflict matrix](conflict_matrix.png)\n"


# --------------------------------------------------------------------------- faults


def test_interrupted_multipart_upload_leaves_no_manifest(make_store, endpoint, bucket):
    store = make_store()
    d = store.staging_dir(KEY)
    (d / "config.json").write_bytes(b"{}")
    store.commit_dir(KEY, d)  # an older complete version
    assert store.is_complete(KEY)

    d = store.staging_dir(KEY)
    write_checkpoint(d)
    parts = [0]

    def crash_after_two_parts(**_):
        parts[0] += 1
        if parts[0] > 2:
            raise RuntimeError("simulated worker crash during multipart upload")

    store.client.meta.events.register("before-call.s3.UploadPart", crash_after_two_parts)
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        store.commit_dir(KEY, d)

    reader = make_store("reader-cache")
    assert not reader.is_complete(KEY)
    assert reader.list_complete("runs") == []
    with pytest.raises(IncompleteArtifactError, match=f"merit/test/{KEY}"):
        reader.fetch_dir(KEY)
    # boto3's transfer manager aborted the multipart upload it had started
    assert raw_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    store.client.meta.events.unregister("before-call.s3.UploadPart", crash_after_two_parts)
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    store.commit_dir(KEY, d)  # a retry commits normally
    got = reader.fetch_dir(KEY)
    assert {r: (got / r).read_bytes() for r in files} == files


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from merit_core.store import S3Store, TransferSettings
    endpoint, bucket, cache = sys.argv[1:4]
    MiB = 1024 * 1024
    store = S3Store(bucket, "merit/test", endpoint_url=endpoint, region="us-east-1",
                    addressing_style="path", cache_dir=cache,
                    transfer=TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                              max_concurrency=1, max_attempts=2))
    d = store.staging_dir("runs/r1/branches/0")
    (d / "config.json").write_bytes(b"{}")
    (d / "model-00001-of-00001.safetensors").write_bytes(os.urandom(16 * MiB))
    n = [0]
    def preempt(**_):
        n[0] += 1
        if n[0] == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker is preempted: no cleanup at all
    store.client.meta.events.register("before-call.s3.UploadPart", preempt)
    store.commit_dir("runs/r1/branches/0", d)
    print("not killed")
    """
)


def test_killed_writer_leaves_no_manifest(make_store, endpoint, bucket, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, endpoint, bucket, str(tmp_path / "writer-cache")],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    raw = raw_client(endpoint)
    objects = [o["Key"] for o in raw.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert f"merit/test/{KEY}/config.json" in objects  # some files did land ...
    assert f"merit/test/{KEY}/{MANIFEST_NAME}" not in objects  # ... but never the manifest
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads")  # dangling parts (lifecycle rule)
    reader = make_store()
    assert not reader.is_complete(KEY) and reader.list_complete() == []
    with pytest.raises(IncompleteArtifactError, match=f"{KEY}.*incomplete"):
        reader.fetch_dir(KEY)


def test_corrupted_object_detected_with_key_named(make_store, endpoint, bucket):
    store = make_store()
    d = store.staging_dir(KEY)
    write_checkpoint(d)
    store.commit_dir(KEY, d)
    raw = raw_client(endpoint)
    obj = f"merit/test/{KEY}/model-00002-of-00002.safetensors"
    data = bytearray(raw.get_object(Bucket=bucket, Key=obj)["Body"].read())
    data[len(data) // 2] ^= 0x01  # one byte changed, same size
    raw.put_object(Bucket=bucket, Key=obj, Body=bytes(data))
    reader = make_store("reader-cache")
    with pytest.raises(CorruptArtifactError, match=rf"corrupted object s3://{bucket}/{obj}"):
        reader.fetch_dir(KEY)
    blobs = reader.local_cache_dir / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file() and ".tmp-" in p.name]  # nothing half-kept
    assert not (reader.local_cache_dir / "s3").exists() or not list((reader.local_cache_dir / "s3").rglob(MANIFEST_NAME))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_going_away_mid_upload_fails_fast(bucket, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                raw_client(endpoint).create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        store = S3Store(bucket, "merit/test", endpoint_url=endpoint, addressing_style="path",
                        cache_dir=tmp_path / "cache", transfer=SMALL)
        d = store.staging_dir(KEY)
        write_checkpoint(d)

        def kill_server(**_):
            if server.poll() is None:
                server.kill()
                server.wait()

        store.client.meta.events.register("before-call.s3.UploadPart", kill_server)
        t0 = time.monotonic()
        with pytest.raises(StoreError) as err:
            store.commit_dir(KEY, d)
        elapsed = time.monotonic() - t0
        msg = str(err.value)
        assert bucket in msg and KEY in msg and "attempts" in msg
        assert elapsed < 30, f"took {elapsed:.1f} s"
        print(f"\nFAULT endpoint killed mid-upload: {elapsed:.2f}s: {msg}")

        t0 = time.monotonic()
        with pytest.raises(StoreError, match=f"{bucket}.*{KEY}"):
            store.is_complete(KEY)  # unreachable is an error, never "not complete"
        with pytest.raises(StoreError, match="Could not connect"):
            store.fetch_dir(KEY)
        assert time.monotonic() - t0 < 20
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_unresponsive_endpoint_times_out(tmp_path):
    """A server that accepts connections but never answers: read timeouts, bounded retries."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(16)  # never accept(): the kernel completes the handshake, nobody replies
        port = lsock.getsockname()[1]
        store = S3Store("silent", "p", endpoint_url=f"http://127.0.0.1:{port}", addressing_style="path",
                        cache_dir=tmp_path / "cache",
                        transfer=TransferSettings(max_attempts=2, connect_timeout=1, read_timeout=1))
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"silent.*runs/x/report.json.*(timeout|Read timeout)") as err:
            store.put_json("runs/x/report.json", {"a": 1})
        print(f"\nFAULT silent endpoint: {time.monotonic() - t0:.2f}s: {err.value}")
        assert time.monotonic() - t0 < 15


# --------------------------------------------------------------------------- credentials


def test_credentials_absent_from_logs_files_and_repr(make_store, endpoint, bucket, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # everything, botocore included
    caplog.set_level(logging.DEBUG, logger="merit_core")  # tasks/logs.py gives merit's loggers INFO
    store = make_store()
    d = store.staging_dir(KEY)
    (d / "config.json").write_bytes(b"{}")
    (d / "model.safetensors").write_bytes(os.urandom(6 * MiB))
    store.commit_dir(KEY, d, {"note": "meta"})
    store.put_json("runs/r1/report/report.json", {"ok": True})
    fetched = store.fetch_dir(KEY)
    with pytest.raises(IncompleteArtifactError) as err:
        store.fetch_dir("runs/r1/branches/9")

    ours = [r for r in caplog.records if r.name.startswith("merit")]
    assert ours, "merit_core.store logs its transfers at DEBUG"
    for r in ours:
        assert ACCESS_KEY not in r.getMessage() and SECRET_KEY not in r.getMessage()
    # botocore's own DEBUG output shows the access key id in the Authorization header
    # (that is botocore's choice, documented); the secret never appears anywhere.
    assert all(SECRET_KEY not in r.getMessage() for r in caplog.records)
    assert SECRET_KEY not in caplog.text
    for text in (repr(store), str(store), store.uri, str(err.value), json.dumps(store.__getstate__(), default=str)):
        assert ACCESS_KEY not in text and SECRET_KEY not in text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "no-aws" not in p.name]
    assert any(p.name == MANIFEST_NAME for p in written) and fetched.is_dir()
    for p in written:
        b = p.read_bytes()
        assert ACCESS_KEY.encode() not in b and SECRET_KEY.encode() not in b, p
    raw = raw_client(endpoint)
    for o in raw.list_objects_v2(Bucket=bucket)["Contents"]:
        b = raw.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        assert ACCESS_KEY.encode() not in b and SECRET_KEY.encode() not in b, o["Key"]


BLOCK_KEY = "AKIABLOCKCREDS000042"
BLOCK_SECRET = "block-secret-never-logged-99"


class _FakeDoc:
    def __init__(self, data):
        self.data = data


class _FakePrefectClient:
    docs: dict = {}

    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_block_document_by_name(self, name, block_type_slug, include_secrets=True):
        from prefect.exceptions import ObjectNotFound

        assert block_type_slug == "aws-credentials" and include_secrets
        if name not in self.docs:
            raise ObjectNotFound(http_exc=Exception("404"))
        return _FakeDoc(self.docs[name])


@pytest.fixture()
def prefect_blocks():
    """tasks.credentials registered as the store's session provider (what importing the
    tasks package does); the provider registered before is restored afterwards."""
    import tasks.credentials

    previous = set_session_provider(tasks.credentials.session_from_block)
    yield tasks.credentials
    set_session_provider(previous)


@pytest.fixture()
def no_provider():
    """No session provider registered (merit_core without the Prefect layer)."""
    previous = set_session_provider(None)
    yield
    set_session_provider(previous)


@pytest.fixture()
def fake_blocks(monkeypatch):
    """The Prefect API client answers with two AwsCredentials block documents; prefect-aws
    is not installed; the environment holds no AWS keys."""
    import prefect.client.orchestration as orchestration

    monkeypatch.setitem(sys.modules, "prefect_aws", None)  # prefect-aws not installed
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setattr(orchestration, "get_client", _FakePrefectClient)
    monkeypatch.setattr(
        _FakePrefectClient,
        "docs",
        {
            "merit-s3": {"aws_access_key_id": BLOCK_KEY, "aws_secret_access_key": BLOCK_SECRET, "region_name": "us-east-1"},
            "assumes-role": {"assume_role_arn": "arn:aws:iam::123456789012:role/x"},
        },
    )


def _authorization_headers(store: S3Store) -> list[str]:
    seen: list[str] = []
    store.client.meta.events.register(
        "before-send.s3.*", lambda request, **_: seen.append(str(request.headers.get("Authorization", "")))
    )
    return seen


def test_prefect_block_credentials_without_prefect_aws(prefect_blocks, fake_blocks, endpoint, bucket, tmp_path,
                                                      caplog):
    caplog.set_level(logging.DEBUG, logger="merit_core")

    def cfg(block):
        return StoreConfig(uri=f"s3://{bucket}/p", endpoint_url=endpoint, addressing_style="path", credentials_block=block)

    store = open_store(cfg("merit-s3"), cache_dir=tmp_path / "cache")
    auth = _authorization_headers(store)
    store.put_json("runs/r/x.json", {"a": 1})
    assert store.get_json("runs/r/x.json") == {"a": 1}
    assert auth and all(f"Credential={BLOCK_KEY}/" in a for a in auth)
    assert BLOCK_KEY not in repr(store) and BLOCK_SECRET not in repr(store) and "merit-s3" not in repr(store)
    assert BLOCK_SECRET not in caplog.text and BLOCK_KEY not in caplog.text

    with pytest.raises(StoreError, match="aws-credentials/missing not found"):
        open_store(cfg("missing"), cache_dir=tmp_path / "cache").exists("runs/r/x.json")
    with pytest.raises(StoreError, match="assume_role_arn.*prefect-aws"):
        open_store(cfg("assumes-role"), cache_dir=tmp_path / "cache").exists("runs/r/x.json")


def test_prefect_block_credentials_with_prefect_aws(prefect_blocks, monkeypatch, endpoint, bucket, tmp_path):
    loaded = []

    class AwsCredentials:
        @classmethod
        def load(cls, name):
            loaded.append(name)
            return cls()

        def get_boto3_session(self):
            return boto3.Session(aws_access_key_id=BLOCK_KEY, aws_secret_access_key=BLOCK_SECRET)

    monkeypatch.setitem(sys.modules, "prefect_aws", types.SimpleNamespace(AwsCredentials=AwsCredentials))
    store = open_store(
        StoreConfig(uri=f"s3://{bucket}", endpoint_url=endpoint, region="us-east-1", addressing_style="path",
                    credentials_block="merit-s3"),
        cache_dir=tmp_path / "cache",
    )
    assert loaded == []  # resolved lazily, on first use
    auth = _authorization_headers(store)
    assert not store.exists("runs/none.json")
    assert loaded == ["merit-s3"] and auth and f"Credential={BLOCK_KEY}/" in auth[0]


def test_block_resolved_by_tasks_credentials_is_handed_to_the_store(prefect_blocks, fake_blocks, no_provider,
                                                                     endpoint, bucket, tmp_path):
    session = prefect_blocks.session_from_block("merit-s3")  # the Prefect layer resolves the block ...
    creds = session.get_credentials()
    assert (creds.access_key, creds.secret_key, session.region_name) == (BLOCK_KEY, BLOCK_SECRET, "us-east-1")
    cfg = StoreConfig(uri=f"s3://{bucket}/p", endpoint_url=endpoint, addressing_style="path", credentials_block="merit-s3")
    store = open_store(cfg, session=session, cache_dir=tmp_path / "cache")  # ... and hands the store a Session
    auth = _authorization_headers(store)
    store.put_json("runs/r/x.json", {"a": 1})
    assert store.get_json("runs/r/x.json") == {"a": 1}
    assert len(auth) == 2 and all(f"Credential={BLOCK_KEY}/" in a for a in auth)
    with pytest.raises(StoreError, match="aws-credentials/missing not found"):
        prefect_blocks.session_from_block("missing")
    with pytest.raises(StoreError, match="assume_role_arn.*prefect-aws"):
        prefect_blocks.session_from_block("assumes-role")


def test_credentials_block_without_a_provider_is_a_clear_error(no_provider, endpoint, bucket, tmp_path):
    cfg = StoreConfig(uri=f"s3://{bucket}/p", endpoint_url=endpoint, addressing_style="path", credentials_block="merit-s3")
    store = open_store(cfg, cache_dir=tmp_path / "cache")  # nothing is resolved yet
    with pytest.raises(StoreError, match=r"credentials_block='merit-s3'.*only be resolved where the Prefect layer"):
        store.exists("runs/r/x.json")


def test_a_session_handed_in_is_not_pickled(make_store, endpoint):
    session = boto3.Session(aws_access_key_id=BLOCK_KEY, aws_secret_access_key=BLOCK_SECRET, region_name="us-east-1")
    store = make_store(session=session)
    assert store.exists("runs/none.json") is False  # usable in this process
    blob = pickle.dumps(store)
    assert BLOCK_KEY.encode() not in blob and BLOCK_SECRET.encode() not in blob
    with pytest.raises(StoreError, match="not pickled"):
        pickle.loads(blob).exists("runs/none.json")  # a copy elsewhere refuses to guess credentials


def block_session(name: str) -> boto3.Session:
    """A session provider at module level (pickled by name into the child process)."""
    assert name == "merit-s3", name
    return boto3.Session(aws_access_key_id=BLOCK_KEY, aws_secret_access_key=BLOCK_SECRET, region_name="us-east-1")


# A fresh interpreter in which any `import prefect` (or prefect_aws) raises ImportError.
NO_PREFECT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoPrefect(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("prefect", "prefect_aws"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoPrefect())
    """
)

UNPICKLE_AND_USE = NO_PREFECT + textwrap.dedent(
    """
    import pickle
    store = pickle.loads(sys.stdin.buffer.read())
    seen = []
    store.client.meta.events.register(
        "before-send.s3.*", lambda request, **_: seen.append(str(request.headers.get("Authorization", ""))))
    store.put_json("runs/r/child.json", {"from": "child"})
    print(store.get_json("runs/r/child.json")["from"], all("Credential=%s/" % sys.argv[1] in a for a in seen),
          len(seen), "prefect" in sys.modules)
    """
)


def test_pickled_store_gets_its_block_session_in_another_process(no_provider, endpoint, bucket, tmp_path):
    set_session_provider(block_session)  # restored by no_provider
    cfg = StoreConfig(uri=f"s3://{bucket}/p", endpoint_url=endpoint, addressing_style="path", credentials_block="merit-s3")
    store = open_store(cfg, cache_dir=tmp_path / "cache")
    blob = pickle.dumps(store)
    assert BLOCK_KEY.encode() not in blob and BLOCK_SECRET.encode() not in blob
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    proc = subprocess.run([sys.executable, "-c", UNPICKLE_AND_USE, BLOCK_KEY], input=blob, capture_output=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["child", "True", "2", "False"]
    raw = raw_client(endpoint).get_object(Bucket=bucket, Key="p/runs/r/child.json")["Body"].read()
    assert json.loads(raw) == {"from": "child"}


ROUND_TRIP_WITHOUT_PREFECT = NO_PREFECT + textwrap.dedent(
    """
    import importlib, json, pkgutil
    from pathlib import Path
    import merit_core.store
    for m in pkgutil.iter_modules(merit_core.store.__path__):
        importlib.import_module("merit_core.store." + m.name)
    from merit_core.config import StoreConfig
    from merit_core.store import open_store

    try:
        import prefect  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the prefect blocker did not work")
    endpoint, bucket, work = sys.argv[1:4]
    cfg = StoreConfig(uri=f"s3://{bucket}/np", endpoint_url=endpoint, region="us-east-1", addressing_style="path")
    store = open_store(cfg, cache_dir=Path(work) / "cache")
    src = Path(work) / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "config.json").write_bytes(b'{"a": 1}')
    store.commit_dir("runs/r/branches/0", src, {"tokens": 7})
    got = store.fetch_dir("runs/r/branches/0")
    store.put_json("runs/r/x.json", {"b": 2})
    print(json.dumps({
        "files": {p.relative_to(got).as_posix(): p.read_bytes().hex() for p in got.rglob("*") if p.is_file()},
        "json": store.get_json("runs/r/x.json"),
        "complete": store.list_complete("runs"),
        "prefect_loaded": any(n.split(".")[0] == "prefect" for n in sys.modules),
    }))
    """
)


def test_store_and_s3_round_trip_in_a_process_without_prefect(endpoint, bucket, tmp_path):
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP_WITHOUT_PREFECT, endpoint, bucket, str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = bytes(range(256)) * 40
    manifest = json.loads(raw_client(endpoint).get_object(
        Bucket=bucket, Key="np/runs/r/branches/0/manifest.json")["Body"].read())
    assert manifest["files"]["model.safetensors"] == {"size": 10240, "sha256": hashlib.sha256(weights).hexdigest()}
    assert manifest["metadata"] == {"tokens": 7}
    assert out["files"] == {
        "model.safetensors": weights.hex(),
        "sub/config.json": b'{"a": 1}'.hex(),
        MANIFEST_NAME: json.dumps(manifest, indent=2, sort_keys=True).encode().hex(),
    }
    assert out["json"] == {"b": 2} and out["complete"] == ["runs/r/branches/0"]
    assert out["prefect_loaded"] is False
