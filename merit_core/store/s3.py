"""A store in S3 or an S3-compatible server (MinIO, Ceph, ...): the manifest contract
on top of :class:`~merit_core.store.s3_transport.S3Transport` (boto3), with downloads
kept in the local :class:`~merit_core.store.cache.BlobCache`.

Credentials come from a ``boto3.Session`` handed in, a named credentials block resolved
by the registered session provider (:mod:`merit_core.store.sessions`), or boto3's
standard chain; they are never logged, pickled, written or shown in ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from merit_core.store.base import ArtifactStore, default_cache_dir
from merit_core.store.cache import BlobCache
from merit_core.store.errors import (
    CorruptArtifactError,
    IncompleteArtifactError,
    ObjectNotFoundError,
    StoreError,
)
from merit_core.store.keys import check_key, check_rel
from merit_core.store.manifest import MANIFEST_NAME, build_manifest, manifest_bytes
from merit_core.store.s3_transport import S3Transport, TransferSettings, redact_url

log = logging.getLogger(__name__)


class S3Store(ArtifactStore):
    """``s3://bucket/prefix`` through boto3, for AWS S3 and S3-compatible servers.

    Args:
        bucket: bucket name.
        prefix: key prefix inside the bucket ('' for the bucket root).
        endpoint_url: e.g. ``http://minio:9000``; None for AWS.
        region: e.g. ``eu-west-1``; None for the chain's default.
        addressing_style: ``auto``, ``virtual`` or ``path`` (``path`` for MinIO/Ceph).
        session: a ``boto3.Session`` to use (e.g. resolved from a credentials block by
            the Prefect layer). It stays in this process: a pickled copy of the store
            resolves ``credentials_block`` again, and without one refuses to guess.
        credentials_block: name of a credentials block (``store.credentials_block``),
            resolved on first use by the registered session provider
            (:func:`~merit_core.store.set_session_provider`) unless ``session`` is given.
            With neither, boto3's standard chain is used (env vars,
            ``AWS_PROFILE``/config files, container/instance role).
        cache_dir: local cache (default :func:`default_cache_dir`): staging dirs,
            downloaded files keyed by sha256, and fetched directories.
        transfer: :class:`TransferSettings`.

    Raises:
        StoreError: for an invalid bucket name, prefix or addressing style.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        *,
        session: Any = None,
        credentials_block: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        transfer: TransferSettings | None = None,
    ):
        if not bucket or "/" in bucket or bucket in (".", ".."):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        if addressing_style not in ("auto", "virtual", "path"):
            raise StoreError(f"addressing_style must be auto, virtual or path, not {addressing_style!r}")
        self.bucket = bucket
        self.prefix = check_key(prefix or "", what="S3 prefix", allow_empty=True)
        self.transport = S3Transport(bucket, endpoint_url, region, addressing_style, transfer or TransferSettings(),
                                     session=session, credentials_block=credentials_block)
        self.local_cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._cache = BlobCache(self.local_cache_dir)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def __repr__(self) -> str:
        return (
            f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={redact_url(self.transport.endpoint_url)!r})"
        )

    __str__ = __repr__

    @property
    def client(self):
        """The boto3 S3 client (created on first use; see :attr:`S3Transport.client`)."""
        return self.transport.client

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- directory artifacts ---------------------------------------------------------

    @property
    def _staging_root(self) -> Path:
        return self.local_cache_dir / "staging"

    def staging_dir(self, key: str) -> Path:
        check_key(key)
        self._staging_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=key.replace("/", "_")[:60] + "-", dir=self._staging_root))

    def commit_dir(self, key: str, local_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> str:
        key = check_key(key)
        src = Path(local_dir)
        if not src.is_dir():
            raise StoreError(f"commit_dir {self.uri_for(key)}: {src} is not a directory")
        base = self._full(key)
        manifest_key = f"{base}/{MANIFEST_NAME}"
        existing = self.transport.list(base + "/")
        nested = [k for k in existing if k.endswith("/" + MANIFEST_NAME) and k != manifest_key]
        if nested:
            raise StoreError(
                f"{self.uri_for(key)}: refusing to overwrite, it contains the committed artifact "
                f"s3://{self.bucket}/{nested[0][: -len(MANIFEST_NAME) - 1]}; directory artifacts must not nest"
            )
        if manifest_key in existing:  # an older version stops counting as complete first
            self.transport.delete([manifest_key])

        manifest = build_manifest(src, metadata)
        for rel, info in manifest["files"].items():
            log.debug("upload %s (%d bytes) -> s3://%s/%s/%s", rel, info["size"], self.bucket, base, rel)
            self.transport.upload(src / rel, f"{base}/{rel}")
        self.transport.put_bytes(manifest_key, manifest_bytes(manifest))  # last: the directory is now complete
        stale = [k for k in existing if k != manifest_key and k[len(base) + 1 :] not in manifest["files"]]
        if stale:
            self.transport.delete(stale)
        log.debug("committed %s (%d files)", self.uri_for(key), len(manifest["files"]))
        if src.resolve().parent == self._staging_root.resolve():
            shutil.rmtree(src, ignore_errors=True)
        return self.uri_for(key)

    def is_complete(self, key: str) -> bool:
        return self.transport.head(f"{self._full(check_key(key))}/{MANIFEST_NAME}") is not None

    def _read_manifest(self, key: str) -> tuple[dict[str, Any], bytes]:
        manifest_key = f"{self._full(key)}/{MANIFEST_NAME}"
        try:
            raw = self.transport.get_bytes(manifest_key)
        except ObjectNotFoundError:
            raise IncompleteArtifactError(
                f"{self.uri_for(key)} is incomplete or missing: no {MANIFEST_NAME} "
                "(never committed, or the upload was interrupted)"
            ) from None
        try:
            manifest = json.loads(raw)
            files = manifest["files"]
            for rel, info in files.items():
                check_rel(rel, self.uri_for(key))
                int(info["size"]), str(info["sha256"])
        except CorruptArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptArtifactError(f"{self.uri_for(key)}: unreadable {MANIFEST_NAME}: {e}") from None
        return manifest, raw

    def fetch_dir(self, key: str) -> Path:
        key = check_key(key)
        manifest, raw = self._read_manifest(key)
        base = self._full(key)
        for rel, info in sorted(manifest["files"].items()):
            full = f"{base}/{rel}"
            self._cache.ensure(
                info["size"], info["sha256"], lambda tmp, full=full: self.transport.download(full, tmp),
                f"s3://{self.bucket}/{full} (artifact {key!r}, file {rel!r})",
            )
        return self._cache.view(self.local_cache_dir / "s3" / self.bucket / base, manifest, raw, key)

    # -- single objects --------------------------------------------------------------

    def put_json(self, key: str, obj: Any) -> str:
        full = self._full(check_key(key))
        self.transport.put_bytes(full, json.dumps(obj, indent=2, sort_keys=True).encode())
        return self.uri_for(key)

    def get_json(self, key: str) -> Any:
        full = self._full(check_key(key))
        return json.loads(self.transport.get_bytes(full))

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        self.transport.upload(Path(path), self._full(check_key(key)))
        return self.uri_for(key)

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        key = check_key(key)
        out = Path(dest)
        if out.is_dir():
            out = out / key.rsplit("/", 1)[-1]
        self.transport.download(self._full(key), out)
        return out

    def exists(self, key: str) -> bool:
        return self.transport.head(self._full(check_key(key))) is not None

    def list_complete(self, prefix: str = "") -> list[str]:
        prefix = check_key(prefix, what="prefix", allow_empty=True)
        full = self._full(prefix) if prefix else self.prefix
        search = f"{full}/" if full else ""
        strip = len(self.prefix) + 1 if self.prefix else 0
        suffix = "/" + MANIFEST_NAME
        return sorted(k[strip : -len(suffix)] for k in self.transport.list(search) if k.endswith(suffix))

    def presigned_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A presigned GET URL of ``key`` (boto3 ``generate_presigned_url``; signed locally
        with this store's credentials, no request is made), valid ``expires_s`` seconds
        (at most 7 days with SigV4)."""
        from botocore.exceptions import BotoCoreError, ClientError

        params = {"Bucket": self.bucket, "Key": self._full(check_key(key))}
        try:
            return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=int(expires_s))
        except (BotoCoreError, ClientError) as e:
            raise StoreError(f"cannot presign {self.uri_for(key)}: {type(e).__name__}") from None

    def delete_prefix(self, prefix: str) -> None:
        full = self._full(check_key(prefix, what="prefix"))
        keys = self.transport.list(full + "/")
        if self.transport.head(full) is not None:
            keys.append(full)
        manifests = [k for k in keys if k.rsplit("/", 1)[-1] == MANIFEST_NAME]
        self.transport.delete(manifests)
        self.transport.delete([k for k in keys if k not in set(manifests)])

