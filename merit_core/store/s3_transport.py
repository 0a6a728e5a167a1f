"""boto3 plumbing for one S3 bucket: the client, multipart transfers, and botocore
errors translated into :class:`StoreError` naming bucket, key and reason.

Retries, backoff and timeouts are botocore's own (``standard`` retry mode) and
multipart transfers are boto3's transfer manager, both set by :class:`TransferSettings`.
boto3 is imported on first use only. Credentials (a ``boto3.Session``) never leave the
process: pickling drops the session and client, and a credentials block is resolved
again in the new process (:mod:`merit_core.store.sessions`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from merit_core.store.errors import ObjectNotFoundError, StoreError, StoreUnreachableError
from merit_core.store.local import tmp_sibling
from merit_core.store.sessions import session_for_block, session_provider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferSettings:
    """S3 transfer, retry and timeout settings.

    Attributes:
        multipart_threshold: files at least this big (bytes) are uploaded/downloaded in parts.
        multipart_chunksize: part size in bytes (S3 needs >= 5 MiB except for the last part).
        max_concurrency: parallel part transfers per file.
        max_attempts: total tries per request (botocore ``standard`` retry mode:
            exponential backoff with jitter on throttling, 5xx and connection errors).
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for data on an open connection.

    The defaults bound an endpoint that accepts connections but never answers to
    3 × 8 s plus botocore's backoff (≤ 1 + 2 s): under 30 s (issue 15, point 8).
    """

    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 4
    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 8.0


def redact_url(url: str | None) -> str | None:
    """``url`` without ``user:password@`` (for repr and messages); None stays None."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def _unreachable_error_of(e: BaseException):
    """The botocore connection or timeout error behind ``e`` (connect/read timeout, refused
    or dropped connection), if any, following transfer wrappers' causes."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    err: BaseException | None = e
    for _ in range(5):
        if err is None or isinstance(err, (BotoConnectionError, HTTPClientError)):
            break
        err = err.__cause__ or getattr(err, "last_exception", None)
    return err if isinstance(err, (BotoConnectionError, HTTPClientError)) else None


def _client_error_of(e: BaseException):
    """The botocore ClientError behind ``e``, if any: boto3's transfer wrappers
    (S3UploadFailedError, RetriesExceededError) keep it as cause or last_exception."""
    from botocore.exceptions import ClientError

    err: BaseException | None = e
    for _ in range(5):
        if err is None or isinstance(err, ClientError):
            break
        err = err.__cause__ or getattr(err, "last_exception", None)
    return err if isinstance(err, ClientError) else None


class S3Transport:
    """Object operations on one bucket by full object key (prefix included).

    Args:
        bucket: bucket name.
        endpoint_url: e.g. ``http://minio:9000``; None for AWS.
        region: e.g. ``eu-west-1``; None for the chain's default.
        addressing_style: ``auto``, ``virtual`` or ``path``.
        transfer: :class:`TransferSettings`.
        session: a ``boto3.Session`` (kept in this process only), or None.
        credentials_block: a credentials block name for the session provider, or None.
            With neither, boto3's standard credential chain is used.
    """

    def __init__(self, bucket: str, endpoint_url: str | None, region: str | None, addressing_style: str,
                 transfer: TransferSettings, session: Any = None, credentials_block: str | None = None):
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self.addressing_style = addressing_style
        self.transfer = transfer
        self.credentials_block = credentials_block
        self._session = session
        self._session_given = session is not None
        self._provider = None  # the session provider a pickled copy brings along
        self._client = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the client, lock and session: credentials never leave the
        process; a credentials block's provider travels by reference (its name)."""
        state = dict(self.__dict__)
        state.update(_client=None, _lock=None, _session=None)
        if self.credentials_block:
            state["_provider"] = session_provider() or self._provider
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        """The boto3 S3 client (created on first use; thread-safe afterwards).

        Raises:
            StoreError: the credentials block cannot be resolved, or a session handed
                to another process's copy of the store was (deliberately) not pickled.
        """
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _boto3_session(self):
        import boto3

        if self._session is not None:
            return self._session
        if self.credentials_block:
            return session_for_block(self.credentials_block, self._provider)
        if self._session_given:
            raise StoreError(
                f"S3 store s3://{self.bucket}: it was handed a boto3.Session, which is not pickled "
                "into other processes; set store.credentials_block or use the standard AWS chain there"
            )
        return boto3.Session()

    def _make_client(self):
        from botocore.config import Config

        session = self._boto3_session()
        t = self.transfer
        config = Config(
            retries={"mode": "standard", "total_max_attempts": t.max_attempts},
            connect_timeout=t.connect_timeout,
            read_timeout=t.read_timeout,
            s3={"addressing_style": self.addressing_style},
            max_pool_connections=max(10, 2 * t.max_concurrency),
            signature_version="s3v4",  # SigV4 for presigned URLs too (botocore presigns SigV2 by default)
        )
        log.debug("S3 client for bucket %r, endpoint %r (region=%s, addressing=%s)",
                  self.bucket, redact_url(self.endpoint_url), self.region, self.addressing_style)
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

    def error(self, op: str, full_key: str, e: BaseException) -> StoreError:
        """``e`` (a boto3/botocore/s3transfer exception) as a StoreError naming bucket
        and key: :class:`ObjectNotFoundError` for a missing object."""
        client_error = _client_error_of(e)
        if client_error is not None:
            code = str(client_error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return ObjectNotFoundError(
                    f"s3://{self.bucket}/{full_key} does not exist (bucket {self.bucket!r}, key {full_key!r})"
                )
            if code == "NoSuchBucket":
                return StoreError(f"{op} failed: bucket {self.bucket!r} does not exist (key {full_key!r})")
        unreachable = _unreachable_error_of(e)
        if unreachable is not None:
            t = self.transfer
            return StoreUnreachableError(
                f"S3 endpoint {redact_url(self.endpoint_url) or 'AWS'} did not answer {op} for bucket "
                f"{self.bucket!r}, key {full_key!r}: {type(unreachable).__name__}: {unreachable} "
                f"({t.max_attempts} attempts, each with connect_timeout={t.connect_timeout:g} s and "
                f"read_timeout={t.read_timeout:g} s; raise store.max_attempts, store.connect_timeout_s or "
                "store.read_timeout_s for a slow endpoint)")
        return StoreError(
            f"S3 {op} failed for bucket {self.bucket!r}, key {full_key!r} "
            f"(endpoint {redact_url(self.endpoint_url) or 'AWS'}, up to {self.transfer.max_attempts} "
            f"attempts each): {type(e).__name__}: {e}"
        )

    def call(self, op: str, full_key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with boto3 errors re-raised through :meth:`error`."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import (
            RetriesExceededError as TransferRetriesExceeded,
        )
        from s3transfer.exceptions import S3DownloadFailedError, S3UploadFailedError

        transfer_errors = (TransferRetriesExceeded, S3DownloadFailedError, S3UploadFailedError)
        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError, Boto3Error, *transfer_errors) as e:
            raise self.error(op, full_key, e) from e

    def head(self, full_key: str) -> dict[str, Any] | None:
        """The object's metadata (boto3 ``head_object`` response), or None if absent."""
        try:
            return self.call("head_object", full_key, self.client.head_object, Bucket=self.bucket, Key=full_key)
        except ObjectNotFoundError:
            return None

    def list(self, full_prefix: str) -> list[str]:
        """Every object key starting with ``full_prefix`` (all pages)."""
        keys: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix)

        def collect():
            for page in pages:
                keys.extend(o["Key"] for o in page.get("Contents", []))

        self.call("list_objects_v2", full_prefix, collect)
        return keys

    def delete(self, full_keys: list[str]) -> None:
        """Delete objects, 1000 per request, in the order given.

        Raises:
            StoreError: naming the first key the server refused to delete.
        """
        for i in range(0, len(full_keys), 1000):
            batch = full_keys[i : i + 1000]
            resp = self.call(
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

    def put_bytes(self, full_key: str, body: bytes, content_type: str = "application/json") -> None:
        """Write one small object in a single request."""
        self.call("put_object", full_key, self.client.put_object, Bucket=self.bucket, Key=full_key, Body=body,
                  ContentType=content_type)

    def get_bytes(self, full_key: str) -> bytes:
        """Read one small object (:class:`ObjectNotFoundError` if absent)."""
        resp = self.call("get_object", full_key, self.client.get_object, Bucket=self.bucket, Key=full_key)
        return self.call("get_object", full_key, resp["Body"].read)

    def upload(self, path: Path, full_key: str) -> None:
        """Upload a local file (multipart above the threshold)."""
        self.call(
            "upload", full_key, self.client.upload_file, str(path), self.bucket, full_key, Config=self._transfer_config()
        )

    def download(self, full_key: str, dest: Path) -> None:
        """Download an object to ``dest`` atomically (temporary sibling, ``os.replace``)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(dest)
        try:
            self.call("download", full_key, self.client.download_file, self.bucket, full_key, str(tmp),
                      Config=self._transfer_config())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
