"""The manifest contract: a directory is complete only when its manifest.json exists.

``manifest.json`` is written last and lists every other file of the directory (relative
POSIX path, size in bytes, sha256 hex digest) plus free-form metadata. Readers call
:func:`verify_manifest` before using a directory. See ARCHITECTURE.md, "Store layout and
the manifest contract".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from merit_core.store.errors import CorruptArtifactError

MANIFEST_NAME = "manifest.json"


class ManifestError(CorruptArtifactError):
    """A directory has no manifest, its manifest is unreadable, or its files disagree
    with it (names the directory and the file). A :class:`CorruptArtifactError`, so the
    command line reports it as one line naming the culprit."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in ``chunk_size``-byte chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=4096)
def _sha256_of_version(path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> str:
    return sha256_file(path)


def sha256_file_cached(path: str | os.PathLike) -> str:
    """:func:`sha256_file`, computed once per process per version of the file: the
    cache key is (absolute path, size, mtime, ctime, inode), so a rewritten, replaced or
    touched file is hashed again. Stages fetch θ(0) many times in one run (every source
    gradient, branch and evaluation); its 0.5 GB are hashed once."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_of_version(str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


# sha256 of files whose writer computed it while writing, by file version (see remember_sha256).
_KNOWN_SHA256: dict[tuple[int, int, int, int, int], str] = {}
_KNOWN_LIMIT = 4096


def _version(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record the sha256 hex digest of a file its writer has just finished (computed
    while writing), so that :func:`build_manifest` in this process does not read the
    file back. The record is keyed by the file's version (device, inode, size, mtime,
    ctime), so it survives a rename of the file or its directory and a file changed
    afterwards is hashed again; the oldest records are dropped past 4096."""
    _KNOWN_SHA256[_version(os.stat(path))] = digest
    while len(_KNOWN_SHA256) > _KNOWN_LIMIT:
        del _KNOWN_SHA256[next(iter(_KNOWN_SHA256))]


def _manifest_sha256(path: Path) -> str:
    """The sha256 of ``path``: the writer's record when there is one (remember_sha256),
    else read from disk."""
    return _KNOWN_SHA256.get(_version(path.stat())) or sha256_file(path)


def list_files(directory: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of all regular files under ``directory`` except the manifest."""
    root = Path(directory)
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out.append(p.relative_to(root).as_posix())
    return out


def build_manifest(directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``directory`` into a manifest dict, without writing it.

    A file whose writer recorded its digest (:func:`remember_sha256`, e.g. the merge's
    shards) is not read again.

    Args:
        directory: an existing directory whose files are all written.
        metadata: JSON-serialisable extra fields stored under ``"metadata"``.

    Returns:
        ``{"files": {rel_path: {"size": int (bytes), "sha256": str (hex)}}, "metadata": {...}}``,
        one entry per file of :func:`list_files`.

    Raises:
        FileNotFoundError: if ``directory`` does not exist.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"build_manifest: no directory {root}")
    files = {
        rel: {"size": (root / rel).stat().st_size, "sha256": _manifest_sha256(root / rel)}
        for rel in list_files(root)
    }
    return {"files": files, "metadata": metadata or {}}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The exact bytes of ``manifest.json`` for a manifest dict (indented JSON, sorted
    keys, ASCII): what :func:`write_manifest` writes and the S3 store uploads."""
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def write_manifest(directory: str | os.PathLike, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``directory`` and write ``manifest.json`` last, atomically.

    Args:
        directory: an existing directory whose files are all written.
        metadata: JSON-serialisable extra fields stored under ``"metadata"``.

    Returns:
        The manifest as a dict (see :func:`build_manifest`).

    Raises:
        FileNotFoundError: if ``directory`` does not exist.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"write_manifest: no directory {root}")
    manifest = build_manifest(root, metadata)
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_bytes(manifest_bytes(manifest))
    os.replace(tmp, root / MANIFEST_NAME)
    return manifest


def is_complete(directory: str | os.PathLike) -> bool:
    """True when ``directory/manifest.json`` exists (the directory was committed)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Load ``manifest.json`` of a directory.

    Returns:
        The manifest dict, checked to have the shape :func:`build_manifest` gives
        (``files`` maps relative paths to ``size`` (int) and ``sha256`` (str)).

    Raises:
        ManifestError: if the directory has no manifest (it is incomplete), or the
            manifest is not valid JSON of that shape (names the file and what is wrong).
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} is incomplete: it has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path}: unreadable manifest, not valid JSON: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ManifestError(f"{path}: unreadable manifest, expected an object with a 'files' object")
    for rel, info in files.items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)):
            raise ManifestError(f"{path}: unreadable manifest, entry {rel!r} needs an integer 'size' and a "
                                "string 'sha256'")
    return manifest


def verify_manifest(directory: str | os.PathLike, check_hashes: bool = True) -> dict[str, Any]:
    """Check that every file listed in the manifest exists with its size (and sha256).

    Returns:
        The manifest dict.

    Raises:
        ManifestError: naming the first missing, resized or corrupted file.
    """
    root = Path(directory)
    manifest = read_manifest(root)
    for rel, info in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise ManifestError(f"{root}: file {rel} listed in the manifest is missing")
        if p.stat().st_size != info["size"]:
            raise ManifestError(f"{root}: file {rel} has size {p.stat().st_size}, manifest says {info['size']}")
        if check_hashes and sha256_file_cached(p) != info["sha256"]:
            raise ManifestError(f"{root}: file {rel} does not match its sha256 in the manifest (corrupted)")
    return manifest
