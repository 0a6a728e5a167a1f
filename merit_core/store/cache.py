"""The local blob cache behind :meth:`S3Store.fetch_dir`.

Downloaded files are kept once per content, keyed by sha256
(``<cache>/blobs/sha256/<2 hex>/<sha>``), so a file shared by several artifacts or
versions is downloaded once. A fetched directory artifact is a read-only *view*: one
directory per manifest version (``<where>/@<16 hex of sha256(manifest.json)>``) whose
files are hard links to the blobs (copies where links are impossible) plus the
manifest itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merit_core.store.errors import CorruptArtifactError
from merit_core.store.local import tmp_sibling
from merit_core.store.manifest import (
    MANIFEST_NAME,
    ManifestError,
    sha256_file,
    verify_manifest,
)

log = logging.getLogger(__name__)


class BlobCache:
    """Content-addressed files and per-manifest views under ``root``.

    Args:
        root: the store's local cache directory (created on demand).
    """

    def __init__(self, root: Path):
        self.root = root

    def blob(self, sha: str) -> Path:
        """Where the file with sha256 hex digest ``sha`` is kept."""
        return self.root / "blobs" / "sha256" / sha[:2] / sha

    def _holds(self, size: int, sha: str) -> bool:
        blob = self.blob(sha)
        return blob.is_file() and blob.stat().st_size == size and sha256_file(blob) == sha

    def ensure(self, size: int, sha: str, download: Callable[[Path], None], what: str) -> Path:
        """The blob of ``size`` bytes and sha256 ``sha``, verified; fetched when missing
        or damaged.

        Args:
            size: expected size in bytes.
            sha: expected sha256 hex digest.
            download: writes the file's bytes to the path it is given.
            what: the object's name for messages (bucket, key, artifact and file).

        Returns:
            The blob's path.

        Raises:
            CorruptArtifactError: the downloaded bytes differ from ``size``/``sha``.
            Whatever ``download`` raises (the blob is then left as it was).
        """
        blob = self.blob(sha)
        if self._holds(size, sha):
            log.debug("cache hit %s", what)
            return blob
        tmp = tmp_sibling(blob)
        try:
            download(tmp)
            got_size, got_sha = tmp.stat().st_size, sha256_file(tmp)
            if got_size != size or got_sha != sha:
                raise CorruptArtifactError(
                    f"corrupted object {what}: got {got_size} bytes sha256 {got_sha[:16]}…, "
                    f"manifest says {size} bytes sha256 {sha[:16]}…"
                )
            os.replace(tmp, blob)
        finally:
            tmp.unlink(missing_ok=True)
        return blob

    def _view_matches(self, view: Path, manifest: dict[str, Any]) -> bool:
        """A view is still good when each file is the (just verified) blob itself, or
        else has the manifest's size and sha256."""
        for rel, info in manifest["files"].items():
            p, blob = view / rel, self.blob(info["sha256"])
            try:
                if os.path.samefile(p, blob):
                    continue
            except OSError:
                return False
            if p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
                return False
        return True

    def _assemble(self, view: Path, manifest: dict[str, Any], raw: bytes) -> None:
        """Build ``view`` from the blobs in a temporary sibling and rename it into place
        (another process assembling the same version first is fine)."""
        tmp_view = tmp_sibling(view)
        try:
            for rel, info in manifest["files"].items():
                dest = tmp_view / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blob(info["sha256"]), dest)
                except OSError:
                    shutil.copyfile(self.blob(info["sha256"]), dest)
            tmp_view.mkdir(parents=True, exist_ok=True)
            (tmp_view / MANIFEST_NAME).write_bytes(raw)
            try:
                os.rename(tmp_view, view)
            except OSError:  # another process assembled the same version first
                if not (view / MANIFEST_NAME).is_file():
                    raise
        finally:
            shutil.rmtree(tmp_view, ignore_errors=True)

    def view(self, where: Path, manifest: dict[str, Any], raw: bytes, key: str) -> Path:
        """The read-only directory of one manifest version, from blobs already ensured.

        Args:
            where: the artifact's folder in the cache; the view is ``where/@<16 hex>``.
            manifest: the parsed manifest (``{"files": {rel: {"size", "sha256"}}, ...}``).
            raw: the manifest's bytes as stored (written into the view verbatim).
            key: the artifact's key, for messages.

        Raises:
            CorruptArtifactError: the assembled view disagrees with its manifest.
        """
        view = where / f"@{hashlib.sha256(raw).hexdigest()[:16]}"
        if (view / MANIFEST_NAME).is_file():
            if self._view_matches(view, manifest):
                return view
            shutil.rmtree(view, ignore_errors=True)
        self._assemble(view, manifest, raw)
        try:
            verify_manifest(view, check_hashes=False)
        except ManifestError as e:
            raise CorruptArtifactError(f"artifact {key!r}: local copy failed verification: {e}") from e
        return view
