"""The store interface every backend implements (:class:`ArtifactStore`)."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from merit_core.store.keys import check_key


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
        key = check_key(key, allow_empty=True)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def presigned_url(self, key: str, expires_s: int = 7 * 24 * 3600) -> str | None:
        """An HTTP(S) URL that reads the single object ``key`` without credentials for
        ``expires_s`` seconds (for links in the Prefect UI), or None where the store has
        no such thing: a local directory has only its ``file://`` URI (:meth:`uri_for`).

        Raises:
            StoreError: the URL cannot be signed (no credentials).
        """
        check_key(key)
        return None

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



def default_cache_dir() -> Path:
    """The default :attr:`ArtifactStore.local_cache_dir`: ``$MERIT_CACHE_DIR`` if set,
    else ``~/.cache/merit`` (staging directories and downloaded S3 files live there)."""
    env = os.environ.get("MERIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "merit"
