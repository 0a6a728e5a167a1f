"""The store's errors: one base class, :class:`StoreError`, whose message names the
store location, key and reason; subclasses say what a caller may want to handle."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store operation failed; the message names the store location, key and reason."""


class ObjectNotFoundError(StoreError):
    """The object or directory artifact does not exist in the store."""


class IncompleteArtifactError(ObjectNotFoundError):
    """A directory artifact has no manifest.json: never committed, or its upload was
    interrupted. Readers must treat it as missing."""


class CorruptArtifactError(StoreError):
    """A file of a committed artifact disagrees with its manifest (size or sha256)."""


class StoreUnreachableError(StoreError):
    """The S3 endpoint did not connect or did not answer within the configured limits
    (``store.connect_timeout_s``, ``store.read_timeout_s``, ``store.max_attempts``);
    botocore has already retried it. The message names the endpoint and the limits."""
