"""Object keys: building harmless keys from arbitrary names, and refusing unsafe ones.

A key is ``/``-separated components relative to the store root, each made only of
``[A-Za-z0-9._-]`` and never ``.`` or ``..``, so no key can escape its store or prefix.
"""

from __future__ import annotations

import hashlib
import re

from merit_core.store.errors import CorruptArtifactError, StoreError

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
        TypeError: if a part is not a str.

    Example:
        ``safe_key("runs", "my run", "branches", "0")`` -> ``"runs/my_run-<hash>/branches/0"``
    """
    if not parts:
        raise ValueError("safe_key: at least one name is needed")
    return "/".join(_safe_part(p) for p in parts)


def check_key(key: str, *, what: str = "key", allow_empty: bool = False) -> str:
    """Return ``key`` if it cannot escape the store root (build keys with :func:`safe_key`).

    Args:
        key: ``/``-separated key.
        what: what the key is, for the message (``key``, ``prefix``, ``S3 prefix``).
        allow_empty: accept ``""`` (the store root) and strip surrounding ``/``.

    Raises:
        StoreError: for a non-str key, or a component that is empty, ``.``, ``..`` or
            uses characters outside ``[A-Za-z0-9._-]``.
    """
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


def check_rel(rel: str, where: str) -> str:
    """Return a manifest's relative file path ``rel`` if it stays inside its directory.

    Raises:
        CorruptArtifactError: naming ``where`` (the artifact) and the unsafe path.
    """
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise CorruptArtifactError(f"{where}: manifest lists an unsafe file path {rel!r}")
    return rel
