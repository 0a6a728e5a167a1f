"""ArtifactStore: where every stage's bulk output lives — a local directory or S3.

Branches run on workers that share nothing but this store, so each artifact arrives
whole or not at all (the manifest contract of ARCHITECTURE.md): a directory artifact is
committed by writing ``manifest.json`` *last*, listing every file with its size and
sha256; readers treat a directory without a manifest as missing and verify sizes and
hashes before use.

Two backends, chosen by :func:`open_store` from ``StoreConfig.uri``:

- :class:`LocalStore` — a path or ``file://`` URI (the default, ``./merit-store``).
- :class:`S3Store` — ``s3://bucket/prefix`` through boto3 (AWS S3, MinIO, Ceph, ...).

Modules: ``keys`` (safe object keys), ``manifest`` (the manifest contract), ``errors``,
``base`` (the interface), ``local``, ``s3`` and ``s3_transport`` (boto3), ``cache``
(downloaded blobs and fetched views), ``sessions`` (credentials blocks -> boto3
sessions through a provider the Prefect layer registers). Nothing here imports
prefect, and boto3 only when an S3Store is used; see docs/store.md.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from merit_core.store.base import ArtifactStore, default_cache_dir
from merit_core.store.errors import (
    CorruptArtifactError,
    IncompleteArtifactError,
    ObjectNotFoundError,
    StoreError,
    StoreUnreachableError,
)
from merit_core.store.keys import safe_key
from merit_core.store.local import LocalStore
from merit_core.store.s3 import S3Store
from merit_core.store.s3_transport import TransferSettings
from merit_core.store.sessions import set_session_provider

__all__ = [
    "ArtifactStore",
    "CorruptArtifactError",
    "IncompleteArtifactError",
    "LocalStore",
    "ObjectNotFoundError",
    "S3Store",
    "StoreError",
    "StoreUnreachableError",
    "TransferSettings",
    "default_cache_dir",
    "open_store",
    "safe_key",
    "set_session_provider",
]


def transfer_settings(cfg: Any) -> TransferSettings:
    """:class:`TransferSettings` with the S3 limits of ``cfg`` (a StoreConfig): seconds to
    connect, seconds to wait for an answer, and attempts per request (botocore's own
    retries); the defaults where ``cfg`` has none of them."""
    default = TransferSettings()
    return TransferSettings(connect_timeout=getattr(cfg, "connect_timeout_s", default.connect_timeout),
                            read_timeout=getattr(cfg, "read_timeout_s", default.read_timeout),
                            max_attempts=getattr(cfg, "max_attempts", default.max_attempts))


def open_store(
    cfg: Any,
    *,
    cache_dir: str | os.PathLike | None = None,
    transfer: TransferSettings | None = None,
    session: Any = None,
) -> ArtifactStore:
    """The store named by ``cfg`` (a :class:`merit_core.config.StoreConfig`).

    ``s3://bucket/prefix`` -> :class:`S3Store`; ``file://...`` or a plain path ->
    :class:`LocalStore`. S3 timeouts and attempts come from ``cfg`` (``connect_timeout_s``,
    ``read_timeout_s``, ``max_attempts``) unless ``transfer`` is given. Nothing is
    contacted here: S3 credentials are resolved on first use — ``session`` (a ``boto3.Session``) if given, else the block named by
    ``cfg.credentials_block`` through the registered session provider, else boto3's
    standard chain.

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
            session=session,
            credentials_block=cfg.credentials_block,
            cache_dir=cache_dir,
            transfer=transfer or transfer_settings(cfg),
        )
    if scheme in ("", "file"):
        return LocalStore(uri, cache_dir=cache_dir)
    raise StoreError(f"store.uri {uri!r}: unsupported scheme {scheme!r} (use a path, file:// or s3://)")
