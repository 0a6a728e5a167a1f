"""ArtifactStore: where every stage's bulk output lives — a local directory or S3.

Branches run on workers that share nothing but this store, so each artifact arrives
whole or not at all (the manifest contract of ARCHITECTURE.md): a directory artifact is
committed by writing ``manifest.json`` *last*, listing every file with its size and
sha256; readers treat a directory without a manifest as missing and verify sizes and
hashes before use.

Two backends, chosen by :func:`open_store` from ``StoreConfig.uri``:

- :class:`LocalStore` — a path or ``file://`` URI (the default, ``./merit-store``).
- :class:`S3Store` — ``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, ...).
  Multipart transfers use boto3's transfer manager; retries, backoff and timeouts are
  botocore's own (``standard`` retry mode); after the last try a :class:`StoreError`
  names bucket, key and reason. Credentials come from the standard AWS chain or a named
  Prefect ``AwsCredentials`` block and are never logged, written or shown in ``repr``.

Object keys are built with :func:`safe_key`, which turns any name (a source called
``../../x``, a run name with a slash) into one harmless key component.

This module never imports prefect at import time (and boto3 only when an S3Store is
used); see docs/store.md for settings and examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

from merit_core.manifest import (
    MANIFEST_NAME,
    ManifestError,
    list_files,
    sha256_file,
    verify_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = [
    "ArtifactStore",
    "CorruptArtifactError",
    "IncompleteArtifactError",
    "LocalStore",
    "ObjectNotFoundError",
    "S3Store",
    "StoreError",
    "TransferSettings",
    "default_cache_dir",
    "open_store",
    "safe_key",
]


# --------------------------------------------------------------------------- errors


class StoreError(RuntimeError):
    """A store operation failed; the message names the store location, key and reason."""


class ObjectNotFoundError(StoreError):
    """The object or directory artifact does not exist in the store."""


class IncompleteArtifactError(ObjectNotFoundError):
    """A directory artifact has no manifest.json: never committed, or its upload was
    interrupted. Readers must treat it as missing."""


class CorruptArtifactError(StoreError):
    """A file of a committed artifact disagrees with its manifest (size or sha256)."""


# --------------------------------------------------------------------------- keys

_SAFE_PART = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._-]")
_MAX_PART = 200  # bytes; file systems allow 255 per component


def _safe_part(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"safe_key: key parts must be str, got {type(name).__name__}: {name!r}")
    if name == "":
        raise ValueError("safe_key: empty name (an object key component must not be empty)")
    if _SAFE_PART.fullmatch(name) and name not in (".", "..") and len(name) <= _MAX_PART:
        return name
    # Replace unsafe characters by '_', drop leading/trailing dots, and append a short
    # hash of the original so that different names ('a/b', 'a_b', 'a b') stay distinct.
    cleaned = _UNSAFE_CHAR.sub("_", name).strip(".")[: _MAX_PART - 9] or "_"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def safe_key(*parts: str) -> str:
    """Build an object key from names, one key component per name.

    A name made only of ``[A-Za-z0-9._-]`` (not ``.`` or ``..``, at most 200 characters)
    is kept as is. Any other name is neutralised deterministically: unsafe characters
    become ``_``, leading/trailing dots are dropped, and ``-<8 hex of sha256(name)>`` is
    appended so that distinct names keep distinct keys. ``'a/b'`` therefore stays one
    component (``a_b-<hash>``) and ``'../../x'`` or ``'/etc/passwd'`` can never escape
    the prefix they are placed under.

    Raises:
        ValueError: if no part is given or a part is empty.

    Example:
        ``safe_key("runs", "my run", "branches", "0")`` -> ``"runs/my_run-<hash>/branches/0"``
    """
    if not parts:
        raise ValueError("safe_key: at least one name is needed")
    return "/".join(_safe_part(p) for p in parts)


def _check_key(key: str, *, what: str = "key", allow_empty: bool = False) -> str:
    """Refuse keys that could escape the store root (use :func:`safe_key` to build them)."""
    if not isinstance(key, str):
        raise StoreError(f"{what} must be a str, got {type(key).__name__}")
    key = key.strip("/") if allow_empty else key
    if key == "" and allow_empty:
        return ""
    bad = [p for p in key.split("/") if p in ("", ".", "..") or not _SAFE_PART.fullmatch(p)]
    if key == "" or key.startswith("/") or bad:
        raise StoreError(
            f"unsafe {what} {key!r}: components must be non-empty, not '.' or '..', and use only "
            "[A-Za-z0-9._-]; build keys with merit_core.store.safe_key(...)"
        )
    return key


def _check_rel(rel: str, where: str) -> str:
    """A manifest's relative file path must stay inside its directory."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise CorruptArtifactError(f"{where}: manifest lists an unsafe file path {rel!r}")
    return rel


# --------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    """``$MERIT_CACHE_DIR`` if set, else ``~/.cache/merit``."""
    env = os.environ.get("MERIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "merit"


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dest)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _build_manifest(directory: Path, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest dict :func:`write_manifest` would write, without writing it
    (same format: ``{"files": {rel: {"size", "sha256"}}, "metadata": {...}}``)."""
    files = {
        rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_file(directory / rel)}
        for rel in list_files(directory)
    }
    return {"files": files, "metadata": metadata or {}}


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def _redact_url(url: str | None) -> str | None:
    """Drop ``user:password@`` from a URL (for repr and messages)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


# --------------------------------------------------------------------------- interface


class ArtifactStore(ABC):
    """Object storage for merit artifacts: single objects (JSON, files) and directory
    artifacts that follow the manifest contract.

    Keys are ``/``-separated, relative to the store root, and built with :func:`safe_key`
    (unsafe keys are refused with :class:`StoreError`). Directory artifacts must not nest:
    a committed directory's key may not be a prefix of another committed directory's key
    (checkpoints of a branch go beside the branch's final directory, not inside it).

    Writing a directory artifact::

        d = store.staging_dir(key)      # empty local dir
        model.save_pretrained(d)        # write files
        uri = store.commit_dir(key, d)  # upload; manifest.json last

    Reading one::

        d = store.fetch_dir(key)        # verified local dir, or IncompleteArtifactError
    """

    uri: str
    local_cache_dir: Path

    def uri_for(self, key: str) -> str:
        """The URI of ``key`` in this store (what travels between Prefect tasks)."""
        key = _check_key(key, allow_empty=True)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    @abstractmethod
    def staging_dir(self, key: str) -> Path:
        """An empty local directory to write the directory artifact ``key`` into before
        :meth:`commit_dir`. Any earlier content at ``key`` stops counting as complete."""

    @abstractmethod
    def commit_dir(self, key: str, local_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> str:
        """Store every file of ``local_dir`` under ``key`` and write ``manifest.json`` last.

        Returns:
            The artifact URI.
        """

    @abstractmethod
    def is_complete(self, key: str) -> bool:
        """True when the directory artifact ``key`` has its manifest (was committed)."""

    @abstractmethod
    def fetch_dir(self, key: str) -> Path:
        """A local directory with the artifact's files, verified against its manifest.

        Raises:
            IncompleteArtifactError: no manifest (missing or interrupted upload).
            CorruptArtifactError: a file differs from the manifest (names key and file).
            StoreError: the store could not be reached after the retry budget.
        """

    @abstractmethod
    def put_json(self, key: str, obj: Any) -> str:
        """Write a JSON object atomically; returns its URI."""

    @abstractmethod
    def get_json(self, key: str) -> Any:
        """Read a JSON object (:class:`ObjectNotFoundError` if absent)."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike) -> str:
        """Store one file atomically; returns its URI."""

    @abstractmethod
    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        """Copy one object to ``dest`` (a file path, or an existing directory to put it
        in) atomically; returns the written path."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True when the single object ``key`` exists (use :meth:`is_complete` for
        directory artifacts)."""

    @abstractmethod
    def list_complete(self, prefix: str = "") -> list[str]:
        """Sorted keys of committed directory artifacts at or under ``prefix``."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under ``prefix`` (manifests first, so a partial delete
        never leaves a directory that looks complete)."""


# --------------------------------------------------------------------------- local


class LocalStore(ArtifactStore):
    """A directory on a local or shared file system; ``root`` is a path or ``file://`` URI.

    Files are written through a temporary sibling and ``os.replace``; directory
    artifacts are written in place and become complete when ``manifest.json`` appears.
    """

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        root_s = os.fspath(root)
        if root_s.startswith("file://"):
            parsed = urlparse(root_s)
            if parsed.netloc in ("", "localhost"):
                root_s = url2pathname(parsed.path)
            else:  # 'file://relative/dir' — not standard, but what people type
                root_s = parsed.netloc + url2pathname(parsed.path)
        self.root = Path(root_s).expanduser().resolve()
        self.uri = self.root.as_uri()
        self.local_cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def _path(self, key: str, allow_empty: bool = False) -> Path:
        return self.root / _check_key(key, allow_empty=allow_empty)

    def _clear_dir(self, key: str, path: Path) -> None:
        """Remove an earlier artifact at ``path``: manifest first, then the rest."""
        if path.is_file():
            path.unlink()
        if not path.exists():
            return
        nested = [p for p in path.rglob(MANIFEST_NAME) if p.parent != path]
        if nested:
            inner = nested[0].parent.relative_to(self.root).as_posix()
            raise StoreError(
                f"{self.uri_for(key)}: refusing to overwrite, it contains the committed artifact "
                f"{inner!r}; directory artifacts must not nest"
            )
        (path / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(path)

    def staging_dir(self, key: str) -> Path:
        path = self._path(key)
        self._clear_dir(key, path)
        path.mkdir(parents=True)
        return path

    def commit_dir(self, key: str, local_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> str:
        final = self._path(key)
        src = Path(local_dir)
        if not src.is_dir():
            raise StoreError(f"commit_dir {self.uri_for(key)}: {src} is not a directory")
        if src.resolve() != final.resolve():
            self._clear_dir(key, final)
            final.mkdir(parents=True)
            for rel in list_files(src):
                (final / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, final / rel)
        else:
            (final / MANIFEST_NAME).unlink(missing_ok=True)
        manifest = write_manifest(final, metadata)  # last: the directory is now complete
        log.debug("committed %s (%d files)", self.uri_for(key), len(manifest["files"]))
        return self.uri_for(key)

    def is_complete(self, key: str) -> bool:
        return (self._path(key) / MANIFEST_NAME).is_file()

    def fetch_dir(self, key: str) -> Path:
        path = self._path(key)
        if not (path / MANIFEST_NAME).is_file():
            raise IncompleteArtifactError(
                f"{self.uri_for(key)} is incomplete or missing: no {MANIFEST_NAME} "
                "(never committed, or the writer was interrupted)"
            )
        try:
            verify_manifest(path)
        except ManifestError as e:
            raise CorruptArtifactError(f"artifact {key!r} failed verification: {e}") from e
        return path

    def put_json(self, key: str, obj: Any) -> str:
        _atomic_write_bytes(self._path(key), json.dumps(obj, indent=2, sort_keys=True).encode())
        return self.uri_for(key)

    def get_json(self, key: str) -> Any:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"{self.uri_for(key)} does not exist")
        return json.loads(path.read_text())

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        _atomic_copy(Path(path), self._path(key))
        return self.uri_for(key)

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFoundError(f"{self.uri_for(key)} does not exist")
        out = Path(dest)
        if out.is_dir():
            out = out / src.name
        _atomic_copy(src, out)
        return out

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_complete(self, prefix: str = "") -> list[str]:
        base = self._path(prefix, allow_empty=True)
        if not base.is_dir():
            return []
        keys = []
        for m in base.rglob(MANIFEST_NAME):
            rel = m.parent.relative_to(self.root).as_posix()
            if m.is_file() and not any(p.startswith(".") for p in rel.split("/")):
                keys.append(rel)
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_file():
            path.unlink()
            return
        if not path.exists():
            return
        for m in path.rglob(MANIFEST_NAME):
            m.unlink(missing_ok=True)
        shutil.rmtree(path)


# --------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class TransferSettings:
    """S3 transfer, retry and timeout settings.

    Attributes:
        multipart_threshold: files at least this big are uploaded/downloaded in parts.
        multipart_chunksize: part size (S3 needs >= 5 MiB except for the last part).
        max_concurrency: parallel part transfers per file.
        max_attempts: total tries per request (botocore ``standard`` retry mode:
            exponential backoff with jitter on throttling, 5xx and connection errors).
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for data on an open connection.
    """

    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 4
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


_CREDENTIALS_BLOCK_TYPE = "aws-credentials"


def _session_from_prefect_block(name: str):
    """A boto3 Session from the Prefect ``AwsCredentials`` block called ``name``.

    With ``prefect-aws`` installed this is ``AwsCredentials.load(name).get_boto3_session()``
    (which also handles ``assume_role_arn``). Without it, the block document is read
    through the Prefect API client (type slug ``aws-credentials``, secrets included) and
    its key id / secret / session token / profile / region fields build the session;
    a block that needs ``assume_role_arn`` then asks for prefect-aws. Prefect is imported
    here, only when a block is configured.
    """
    import boto3

    try:
        from prefect_aws import AwsCredentials  # type: ignore[import-not-found]
    except ImportError:
        AwsCredentials = None
    if AwsCredentials is not None:
        try:
            return AwsCredentials.load(name).get_boto3_session()
        except Exception as e:  # noqa: BLE001 — re-raised with the block named
            raise StoreError(
                f"could not load Prefect AwsCredentials block {name!r}: {type(e).__name__}: {e}"
            ) from None

    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
    except ImportError as e:
        raise StoreError(
            f"store.credentials_block={name!r} needs prefect (and preferably prefect-aws) "
            f"installed: {e}"
        ) from None
    try:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(
                name=name, block_type_slug=_CREDENTIALS_BLOCK_TYPE, include_secrets=True
            )
    except ObjectNotFound:
        raise StoreError(
            f"Prefect block {_CREDENTIALS_BLOCK_TYPE}/{name} not found (create it in the UI or "
            "with prefect-aws: AwsCredentials(...).save(name))"
        ) from None
    except Exception as e:  # noqa: BLE001 — e.g. the Prefect API is unreachable
        raise StoreError(
            f"could not read Prefect block {_CREDENTIALS_BLOCK_TYPE}/{name}: {type(e).__name__}"
        ) from None

    data = dict(doc.data or {})

    def field(k: str) -> str | None:
        v = data.get(k)
        if v is not None and hasattr(v, "get_secret_value"):
            v = v.get_secret_value()
        return v or None

    if field("assume_role_arn"):
        raise StoreError(
            f"Prefect block {_CREDENTIALS_BLOCK_TYPE}/{name} uses assume_role_arn; "
            "install prefect-aws (pip install prefect-aws) to use it"
        )
    return boto3.Session(
        aws_access_key_id=field("aws_access_key_id"),
        aws_secret_access_key=field("aws_secret_access_key"),
        aws_session_token=field("aws_session_token"),
        profile_name=field("profile_name"),
        region_name=field("region_name"),
    )


class S3Store(ArtifactStore):
    """``s3://bucket/prefix`` through boto3, for AWS S3 and S3-compatible servers.

    Args:
        bucket: bucket name.
        prefix: key prefix inside the bucket ('' for the bucket root).
        endpoint_url: e.g. ``http://minio:9000``; None for AWS.
        region: e.g. ``eu-west-1``; None for the chain's default.
        addressing_style: ``auto``, ``virtual`` or ``path`` (``path`` for MinIO/Ceph).
        credentials: None for the standard AWS chain (env vars, ``AWS_PROFILE``/config
            files, container/instance role); a ``str`` names a Prefect AwsCredentials
            block (resolved lazily, on first use); or a ``boto3.Session`` / an object
            with ``get_boto3_session()`` (a loaded block).
        cache_dir: local cache (default :func:`default_cache_dir`): staging dirs,
            downloaded files keyed by sha256, and fetched directories.
        transfer: :class:`TransferSettings`.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        credentials: Any = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        transfer: TransferSettings | None = None,
    ):
        if not bucket or "/" in bucket or bucket in (".", ".."):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        if addressing_style not in ("auto", "virtual", "path"):
            raise StoreError(f"addressing_style must be auto, virtual or path, not {addressing_style!r}")
        self.bucket = bucket
        self.prefix = _check_key(prefix or "", what="S3 prefix", allow_empty=True)
        self.endpoint_url = endpoint_url
        self.region = region
        self.addressing_style = addressing_style
        self._credentials = credentials
        self.transfer = transfer or TransferSettings()
        self.local_cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None
        self._lock = threading.Lock()

    # -- identity (never the credentials) --------------------------------------------

    def __repr__(self) -> str:
        return (
            f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={_redact_url(self.endpoint_url)!r})"
        )

    __str__ = __repr__

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- boto3 plumbing -----------------------------------------------------------------

    @property
    def client(self):
        """The boto3 S3 client (created on first use; thread-safe afterwards)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        import boto3
        from botocore.config import Config

        creds = self._credentials
        if creds is None:
            session = boto3.Session()
        elif isinstance(creds, str):
            session = _session_from_prefect_block(creds)
        elif isinstance(creds, boto3.Session):
            session = creds
        elif hasattr(creds, "get_boto3_session"):
            session = creds.get_boto3_session()
        else:
            raise StoreError(
                f"S3Store credentials must be None, a Prefect block name, a boto3.Session or a "
                f"block with get_boto3_session(), not {type(creds).__name__}"
            )
        t = self.transfer
        config = Config(
            retries={"mode": "standard", "total_max_attempts": t.max_attempts},
            connect_timeout=t.connect_timeout,
            read_timeout=t.read_timeout,
            s3={"addressing_style": self.addressing_style},
            max_pool_connections=max(10, 2 * t.max_concurrency),
        )
        log.debug("S3 client for %r (region=%s, addressing=%s)", self, self.region, self.addressing_style)
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        t = self.transfer
        return TransferConfig(
            multipart_threshold=t.multipart_threshold,
            multipart_chunksize=t.multipart_chunksize,
            max_concurrency=t.max_concurrency,
            num_download_attempts=t.max_attempts,
            use_threads=True,
        )

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, op: str, full_key: str, e: BaseException) -> StoreError:
        """Translate a boto3/botocore exception into a StoreError naming bucket and key."""
        from botocore.exceptions import ClientError

        where = f"s3://{self.bucket}/{full_key}"
        code = None
        err = e
        # boto3's transfer wrappers (S3UploadFailedError, RetriesExceededError) keep the cause.
        for _ in range(5):
            if err is None or isinstance(err, ClientError):
                break
            err = err.__cause__ or getattr(err, "last_exception", None)
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return ObjectNotFoundError(f"{where} does not exist (bucket {self.bucket!r}, key {full_key!r})")
            if code == "NoSuchBucket":
                return StoreError(f"{op} failed: bucket {self.bucket!r} does not exist (key {full_key!r})")
        reason = f"{type(e).__name__}: {e}"
        return StoreError(
            f"S3 {op} failed for bucket {self.bucket!r}, key {full_key!r} "
            f"(endpoint {_redact_url(self.endpoint_url) or 'AWS'}, up to {self.transfer.max_attempts} "
            f"attempts each): {reason}"
        )

    def _call(self, op: str, full_key: str, fn, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded
        from s3transfer.exceptions import S3DownloadFailedError, S3UploadFailedError

        transfer_errors = (TransferRetriesExceeded, S3DownloadFailedError, S3UploadFailedError)
        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error, *transfer_errors) as e:
            raise self._error(op, full_key, e) from e

    def _head(self, full_key: str) -> dict[str, Any] | None:
        try:
            return self._call("head_object", full_key, self.client.head_object, Bucket=self.bucket, Key=full_key)
        except ObjectNotFoundError:
            return None

    def _list(self, full_prefix: str) -> list[str]:
        keys: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix)

        def collect():
            for page in pages:
                keys.extend(o["Key"] for o in page.get("Contents", []))

        self._call("list_objects_v2", full_prefix, collect)
        return keys

    def _delete(self, full_keys: list[str]) -> None:
        for i in range(0, len(full_keys), 1000):
            batch = full_keys[i : i + 1000]
            resp = self._call(
                "delete_objects",
                batch[0],
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"S3 delete failed for bucket {self.bucket!r}, key {first.get('Key')!r}: "
                    f"{first.get('Code')}: {first.get('Message')}"
                )

    def _upload(self, path: Path, full_key: str) -> None:
        self._call(
            "upload", full_key, self.client.upload_file, str(path), self.bucket, full_key, Config=self._transfer_config()
        )

    def _download(self, full_key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest)
        try:
            self._call(
                "download",
                full_key,
                self.client.download_file,
                self.bucket,
                full_key,
                str(tmp),
                Config=self._transfer_config(),
            )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    # -- directory artifacts ---------------------------------------------------------

    @property
    def _staging_root(self) -> Path:
        return self.local_cache_dir / "staging"

    def staging_dir(self, key: str) -> Path:
        _check_key(key)
        self._staging_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=key.replace("/", "_")[:60] + "-", dir=self._staging_root))

    def commit_dir(self, key: str, local_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> str:
        key = _check_key(key)
        src = Path(local_dir)
        if not src.is_dir():
            raise StoreError(f"commit_dir {self.uri_for(key)}: {src} is not a directory")
        base = self._full(key)
        manifest_key = f"{base}/{MANIFEST_NAME}"
        existing = self._list(base + "/")
        nested = [k for k in existing if k.endswith("/" + MANIFEST_NAME) and k != manifest_key]
        if nested:
            raise StoreError(
                f"{self.uri_for(key)}: refusing to overwrite, it contains the committed artifact "
                f"s3://{self.bucket}/{nested[0][: -len(MANIFEST_NAME) - 1]}; directory artifacts must not nest"
            )
        if manifest_key in existing:  # an older version stops counting as complete first
            self._delete([manifest_key])

        manifest = _build_manifest(src, metadata)
        for rel, info in manifest["files"].items():
            log.debug("upload %s (%d bytes) -> s3://%s/%s/%s", rel, info["size"], self.bucket, base, rel)
            self._upload(src / rel, f"{base}/{rel}")
        self._call(
            "put_object",
            manifest_key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=manifest_key,
            Body=_manifest_bytes(manifest),
            ContentType="application/json",
        )  # last: the directory is now complete
        stale = [k for k in existing if k != manifest_key and k[len(base) + 1 :] not in manifest["files"]]
        if stale:
            self._delete(stale)
        log.debug("committed %s (%d files)", self.uri_for(key), len(manifest["files"]))
        if src.resolve().parent == self._staging_root.resolve():
            shutil.rmtree(src, ignore_errors=True)
        return self.uri_for(key)

    def is_complete(self, key: str) -> bool:
        return self._head(f"{self._full(_check_key(key))}/{MANIFEST_NAME}") is not None

    def _read_manifest(self, key: str) -> tuple[dict[str, Any], bytes]:
        manifest_key = f"{self._full(key)}/{MANIFEST_NAME}"
        try:
            resp = self._call("get_object", manifest_key, self.client.get_object, Bucket=self.bucket, Key=manifest_key)
            raw = self._call("get_object", manifest_key, resp["Body"].read)
        except ObjectNotFoundError:
            raise IncompleteArtifactError(
                f"{self.uri_for(key)} is incomplete or missing: no {MANIFEST_NAME} "
                "(never committed, or the upload was interrupted)"
            ) from None
        try:
            manifest = json.loads(raw)
            files = manifest["files"]
            for rel, info in files.items():
                _check_rel(rel, self.uri_for(key))
                int(info["size"]), str(info["sha256"])
        except CorruptArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptArtifactError(f"{self.uri_for(key)}: unreadable {MANIFEST_NAME}: {e}") from None
        return manifest, raw

    def _blob(self, sha: str) -> Path:
        return self.local_cache_dir / "blobs" / "sha256" / sha[:2] / sha

    def _view_matches(self, view: Path, manifest: dict[str, Any]) -> bool:
        """A fetched directory is still good when each file is the (just verified) blob
        itself, or else has the manifest's size and sha256."""
        for rel, info in manifest["files"].items():
            p, blob = view / rel, self._blob(info["sha256"])
            try:
                if os.path.samefile(p, blob):
                    continue
            except OSError:
                return False
            if p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
                return False
        return True

    def fetch_dir(self, key: str) -> Path:
        key = _check_key(key)
        manifest, raw = self._read_manifest(key)
        base = self._full(key)
        for rel, info in sorted(manifest["files"].items()):
            blob = self._blob(info["sha256"])
            if blob.is_file() and blob.stat().st_size == info["size"] and sha256_file(blob) == info["sha256"]:
                log.debug("cache hit %s/%s", base, rel)
                continue
            tmp = _tmp_sibling(blob)
            try:
                self._download(f"{base}/{rel}", tmp)
                size = tmp.stat().st_size
                sha = sha256_file(tmp)
                if size != info["size"] or sha != info["sha256"]:
                    raise CorruptArtifactError(
                        f"corrupted object s3://{self.bucket}/{base}/{rel} (artifact {key!r}, file {rel!r}): "
                        f"got {size} bytes sha256 {sha[:16]}…, manifest says {info['size']} bytes "
                        f"sha256 {info['sha256'][:16]}…"
                    )
                os.replace(tmp, blob)
            finally:
                tmp.unlink(missing_ok=True)

        # Assemble a read-only view: one directory per manifest version, files hard-linked
        # from the hash-keyed blob cache (copied where links are impossible).
        msha = hashlib.sha256(raw).hexdigest()[:16]
        view = self.local_cache_dir / "s3" / self.bucket / base / f"@{msha}"
        if (view / MANIFEST_NAME).is_file():
            if self._view_matches(view, manifest):
                return view
            shutil.rmtree(view, ignore_errors=True)
        tmp_view = _tmp_sibling(view)
        try:
            for rel in manifest["files"]:
                dest = tmp_view / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                blob = self._blob(manifest["files"][rel]["sha256"])
                try:
                    os.link(blob, dest)
                except OSError:
                    shutil.copyfile(blob, dest)
            tmp_view.mkdir(parents=True, exist_ok=True)
            (tmp_view / MANIFEST_NAME).write_bytes(raw)
            try:
                os.rename(tmp_view, view)
            except OSError:  # another process assembled the same version first
                if not (view / MANIFEST_NAME).is_file():
                    raise
        finally:
            shutil.rmtree(tmp_view, ignore_errors=True)
        try:
            verify_manifest(view, check_hashes=False)
        except ManifestError as e:
            raise CorruptArtifactError(f"artifact {key!r}: local copy failed verification: {e}") from e
        return view

    # -- single objects --------------------------------------------------------------

    def put_json(self, key: str, obj: Any) -> str:
        full = self._full(_check_key(key))
        body = json.dumps(obj, indent=2, sort_keys=True).encode()
        self._call(
            "put_object", full, self.client.put_object, Bucket=self.bucket, Key=full, Body=body,
            ContentType="application/json",
        )
        return self.uri_for(key)

    def get_json(self, key: str) -> Any:
        full = self._full(_check_key(key))
        resp = self._call("get_object", full, self.client.get_object, Bucket=self.bucket, Key=full)
        return json.loads(self._call("get_object", full, resp["Body"].read))

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        self._upload(Path(path), self._full(_check_key(key)))
        return self.uri_for(key)

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        key = _check_key(key)
        out = Path(dest)
        if out.is_dir():
            out = out / key.rsplit("/", 1)[-1]
        self._download(self._full(key), out)
        return out

    def exists(self, key: str) -> bool:
        return self._head(self._full(_check_key(key))) is not None

    def list_complete(self, prefix: str = "") -> list[str]:
        prefix = _check_key(prefix, what="prefix", allow_empty=True)
        full = self._full(prefix) if prefix else self.prefix
        search = f"{full}/" if full else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        suffix = "/" + MANIFEST_NAME
        return sorted(k[strip : -len(suffix)] for k in self._list(search) if k.endswith(suffix))

    def delete_prefix(self, prefix: str) -> None:
        full = self._full(_check_key(prefix, what="prefix"))
        keys = self._list(full + "/")
        if self._head(full) is not None:
            keys.append(full)
        manifests = [k for k in keys if k.rsplit("/", 1)[-1] == MANIFEST_NAME]
        self._delete(manifests)
        self._delete([k for k in keys if k not in set(manifests)])


# --------------------------------------------------------------------------- factory


def open_store(cfg: Any, *, cache_dir: str | os.PathLike | None = None, transfer: TransferSettings | None = None) -> ArtifactStore:
    """The store named by ``cfg`` (a :class:`merit_core.config.StoreConfig`).

    ``s3://bucket/prefix`` -> :class:`S3Store`; ``file://...`` or a plain path ->
    :class:`LocalStore`. Nothing is contacted here: S3 credentials (and a Prefect block,
    if ``cfg.credentials_block`` is set) are resolved on first use.

    Raises:
        StoreError: for an unsupported scheme or an ``s3://`` URI without a bucket.
    """
    uri = str(cfg.uri)
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("s3", "s3a"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StoreError(f"store.uri {uri!r} has no bucket (expected s3://bucket/prefix)")
        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            addressing_style=cfg.addressing_style,
            credentials=cfg.credentials_block,
            cache_dir=cache_dir,
            transfer=transfer,
        )
    if scheme in ("", "file"):
        return LocalStore(uri, cache_dir=cache_dir)
    raise StoreError(f"store.uri {uri!r}: unsupported scheme {scheme!r} (use a path, file:// or s3://)")
