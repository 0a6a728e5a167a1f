"""Single objects with a checksum: the manifest contract for one file.

A directory artifact is verified against its ``manifest.json``; a single stored object
(a source-gradient sketch) gets the same protection from a small JSON sidecar
``<key>.sha256`` holding its size and sha256, written *after* the object. An object
counts as stored only when its sidecar exists, and :func:`get_checked_file` verifies the
bytes it reads against the sidecar before anyone uses them. :func:`intact_dir` is the
reuse check for directory artifacts. See docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from merit_core.store.base import ArtifactStore
from merit_core.store.errors import CorruptArtifactError, ObjectNotFoundError
from merit_core.store.manifest import sha256_file

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
"""Key suffix of an object's checksum sidecar (``<key>.sha256``, JSON ``{"size", "sha256"}``)."""


def checksum_key(key: str) -> str:
    """The key of ``key``'s checksum sidecar."""
    return key + CHECKSUM_SUFFIX


def put_checked_file(store: ArtifactStore, key: str, path: str | os.PathLike) -> str:
    """Store the file ``path`` at ``key``, then its checksum sidecar (last).

    Returns:
        The object's URI.

    Raises:
        OSError: ``path`` cannot be read.
        StoreError: the store cannot be written (the object then does not count as stored).
    """
    p = Path(path)
    info = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    uri = store.put_file(key, p)
    store.put_json(checksum_key(key), info)  # last: the object is now complete
    return uri


def has_checked_file(store: ArtifactStore, key: str) -> bool:
    """True when ``key`` was stored completely by :func:`put_checked_file` (its sidecar
    exists). Says nothing about whether the bytes are still good: :func:`get_checked_file`
    checks that."""
    return store.exists(checksum_key(key))


def get_checked_file(store: ArtifactStore, key: str, dest: str | os.PathLike) -> Path:
    """Copy the object ``key`` to ``dest`` and verify it against its checksum sidecar.

    Args:
        dest: a file path, or an existing directory to put the file in.

    Returns:
        The verified local file.

    Raises:
        ObjectNotFoundError: the object or its sidecar is missing (names the URI).
        CorruptArtifactError: the sidecar is unreadable, or the bytes differ from it in
            size or sha256 (names the URI); the local copy is removed.
    """
    side = checksum_key(key)
    if not store.exists(side):
        raise ObjectNotFoundError(f"{store.uri_for(key)} has no checksum {side!r} (never stored completely)")
    try:
        info = store.get_json(side)
        size, sha = int(info["size"]), str(info["sha256"])
    except ObjectNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CorruptArtifactError(f"{store.uri_for(side)}: unreadable checksum of {key!r}: {e}") from None
    out = store.get_file(key, dest)
    got_size, got_sha = out.stat().st_size, sha256_file(out)
    if got_size != size or got_sha != sha:
        out.unlink(missing_ok=True)
        raise CorruptArtifactError(
            f"corrupted object {store.uri_for(key)}: got {got_size} bytes sha256 {got_sha[:16]}…, "
            f"its checksum says {size} bytes sha256 {sha[:16]}…"
        )
    return out


def delete_checked_file(store: ArtifactStore, key: str) -> None:
    """Remove an object and its sidecar (sidecar first, so a partial delete never leaves
    an object that counts as stored)."""
    store.delete_prefix(checksum_key(key))
    store.delete_prefix(key)


def intact_dir(store: ArtifactStore, key: str) -> bool:
    """True when the directory artifact ``key`` is committed and its files match its
    manifest (the verification of :meth:`ArtifactStore.fetch_dir`, which this calls; on
    S3 that downloads the files into the local blob cache, where later reads find them).

    For a stage that reuses what an earlier run stored: False means "write it again".
    A committed but damaged artifact gets a warning naming its key.
    """
    if not store.is_complete(key):
        return False
    try:
        store.fetch_dir(key)
    except CorruptArtifactError as e:
        log.warning("stored artifact %s failed verification; writing it again: %s", store.uri_for(key), e)
        return False
    return True
