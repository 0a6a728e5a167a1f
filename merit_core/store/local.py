"""A store on a local or shared file system, and the atomic local file IO every
backend uses (write to a hidden temporary sibling, then ``os.replace``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from merit_core.store.base import ArtifactStore, default_cache_dir
from merit_core.store.errors import (
    CorruptArtifactError,
    IncompleteArtifactError,
    ObjectNotFoundError,
    StoreError,
)
from merit_core.store.keys import check_key
from merit_core.store.manifest import (
    MANIFEST_NAME,
    ManifestError,
    list_files,
    verify_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)


def tmp_sibling(path: Path) -> Path:
    """A fresh hidden temporary path next to ``path`` (``.<name>.tmp-<12 hex>``), on the
    same file system so that ``os.replace`` onto ``path`` is atomic."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (parents created) so that readers see the old file or
    the whole new one, never a part: temporary sibling, fsync, ``os.replace``.

    Raises:
        OSError: if the directory cannot be created or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy the file ``src`` to ``dest`` (parents created) through a temporary sibling
    and ``os.replace``, so ``dest`` is never seen half-written.

    Raises:
        OSError: if ``src`` cannot be read or ``dest`` written.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(dest)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


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
        return self.root / check_key(key, allow_empty=allow_empty)

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
        atomic_write_bytes(self._path(key), json.dumps(obj, indent=2, sort_keys=True).encode())
        return self.uri_for(key)

    def get_json(self, key: str) -> Any:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"{self.uri_for(key)} does not exist")
        return json.loads(path.read_text())

    def put_file(self, key: str, path: str | os.PathLike) -> str:
        atomic_copy(Path(path), self._path(key))
        return self.uri_for(key)

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFoundError(f"{self.uri_for(key)} does not exist")
        out = Path(dest)
        if out.is_dir():
            out = out / src.name
        atomic_copy(src, out)
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

