"""Positioned tensor reading and streamed shard writing for Hugging Face safetensors directories.

The only safetensors reader and writer of merit_core (merge and diagnostics use it).
The format is small enough to handle directly: an 8-byte little-endian header length, a
JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, optional
``__metadata__``), then the raw little-endian tensor bytes.

:class:`Checkpoint` parses the headers of a model directory (single ``model.safetensors``
or shards + ``model.safetensors.index.json``) and reads any element range of a tensor
with ``os.preadv`` into a caller's buffer, releasing the page-cache pages it read
(``POSIX_FADV_DONTNEED``). Nothing is memory-mapped, so the resident memory of a reader
is its buffers, not the files (``safetensors.safe_open`` maps whole files, whose pages
count towards RSS and a container's memory limit). :class:`ShardWriter` (in
:mod:`merit_core.merge.shards`) streams the output.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"

# Files of an input directory that are not copied into the merged model: weights in any
# format, weight indexes, the manifest and trainer state belonging to one branch.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP_FILES = {"manifest.json", "manifest.json.tmp", "trainer_state.json"}

# Elements per block of :meth:`Checkpoint.blocks`: a float64 block is at most 32 MiB.
BLOCK_ELEMENTS = 1 << 22
# Direct IO: buffer and file-offset alignment, and the smallest read that uses it.
ALIGN = 4096
DIRECT_MIN = 1 << 20
# safetensors refuses headers over 100 MB; so do we (a corrupt length must not allocate).
MAX_HEADER_BYTES = 100_000_000

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class MergeError(ValueError):
    """Inputs cannot be merged; the message names the tensor and/or the input path."""


class MissingCheckpointError(MergeError, FileNotFoundError):
    """A checkpoint path is not a directory or holds no safetensors weights (the
    message names the path); both a :class:`MergeError` and a ``FileNotFoundError``."""


def is_output_embedding(name: str) -> bool:
    """Whether tensor ``name`` is the output embedding (``lm_head.weight`` at any depth),
    which a model with tied word embeddings shares with the input embedding."""
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor: ``offset`` is the absolute byte position of its
    data in ``file`` and ``nbytes`` its length (both 0 for a tensor not read from disk)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the checkpoint directory
    offset: int = 0
    nbytes: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, in the order of their data in the file.

    Raises:
        MergeError: a truncated file, an unreadable or oversized header, an unsupported
            dtype, or data offsets that disagree with the shape or lie outside the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise MergeError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise MergeError(f"{path}: header length {n} is larger than the file allows")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise MergeError(f"{path}: unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise MergeError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    out = {}
    for name, entry in sorted(header.items(), key=lambda kv: _begin(path, kv)):
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise MergeError(f"tensor {name!r} in {path} has unsupported dtype {entry.get('dtype')}")
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or 8 + n + end > size:
            raise MergeError(f"{path}: tensor {name!r} has data_offsets {[begin, end]} that do not fit "
                             f"its shape {list(shape)} ({dtype}) or the file ({size} bytes)")
        out[name] = TensorInfo(shape, dtype, path.name, 8 + n + begin, nbytes)
    return out


def _begin(path: Path, item: tuple[str, Any]) -> int:
    try:
        return int(item[1]["data_offsets"][0])
    except (TypeError, KeyError, IndexError, ValueError):
        raise MergeError(f"{path}: tensor {item[0]!r} has no valid data_offsets in the header") from None


def pread_into(fd: int, buf: memoryview, offset: int, path: Path | str = "", release: bool = True) -> None:
    """Fill ``buf`` from byte ``offset`` of ``fd`` (positioned reads, no file position),
    then (``release``) drop those pages from the page cache.

    Raises:
        MergeError: the file ends before ``buf`` is full.
    """
    start, view = offset, buf
    while view.nbytes:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise MergeError(f"{path}: file ends at byte {offset}, expected {start + buf.nbytes}")
        view, offset = view[got:], offset + got
    if buf.nbytes and release:
        os.posix_fadvise(fd, start, buf.nbytes, os.POSIX_FADV_DONTNEED)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor's memory (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


class Checkpoint:
    """Headers of a safetensors HF model directory; tensors are read on demand.

    ``tensors`` maps each stored name to its :class:`TensorInfo` (files in name order,
    tensors in data order); ``config`` is ``config.json`` (``{}`` if absent). Reads go
    through :meth:`open` (file descriptors held for the duration) or the one-shot
    :meth:`read`/:meth:`blocks`, which open and close the file themselves.

    Raises:
        MissingCheckpointError: the path is not a directory or has no safetensors weights.
        MergeError: an unreadable index or header, a file or tensor named by the index
            but missing, or an unsupported dtype.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        weight_map, files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise MergeError(f"input {self.path}: weight file {fname} listed in the index is missing")
            try:
                infos = read_header(fpath)
            except MergeError as e:
                raise MergeError(f"input {self.path}: cannot read {fname}: {e}") from e
            for name, info in infos.items():
                if not weight_map or weight_map.get(name) == fname:  # the index is authoritative
                    self.tensors[name] = info
        missing = sorted(set(weight_map) - set(self.tensors))
        if missing:
            raise MergeError(
                f"tensor {missing[0]!r} is listed in {self.path / SAFE_WEIGHTS_INDEX_NAME} "
                f"but not stored in {weight_map[missing[0]]}"
            )
        cfg = self.path / "config.json"
        self.config: dict = json.loads(cfg.read_text()) if cfg.is_file() else {}

    def _weight_files(self) -> tuple[dict[str, str], list[str]]:
        if not self.path.is_dir():
            raise MissingCheckpointError(f"input {self.path} is not a directory")
        index = self.path / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise MergeError(f"input {self.path}: unreadable {SAFE_WEIGHTS_INDEX_NAME}: {e}") from e
            return weight_map, sorted(set(weight_map.values()))
        if (self.path / SAFE_WEIGHTS_NAME).is_file():
            return {}, [SAFE_WEIGHTS_NAME]
        raise MissingCheckpointError(
            f"input {self.path} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})"
        )

    @property
    def names(self) -> list[str]:
        """The stored tensor names."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (``KeyError`` if not stored)."""
        return self.tensors[name].shape

    @contextmanager
    def open(self) -> Iterator[CheckpointReader]:
        """A :class:`CheckpointReader` whose file descriptors are closed on exit."""
        reader = CheckpointReader(self)
        try:
            yield reader
        finally:
            reader.close()

    def read(self, name: str) -> torch.Tensor:
        """Load one whole tensor (stored dtype and shape) from disk."""
        with self.open() as r:
            return r.read(name)

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as float64 blocks of whole rows (dim 0), in order.

        Each block holds at most :data:`BLOCK_ELEMENTS` elements (at least one row), so a
        streaming reduction over a large tensor never holds it whole; a 0-d tensor or
        one with no rows comes as a single block.
        """
        shape = self.shape(name)
        if len(shape) == 0 or shape[0] == 0:
            yield self.read(name).to(torch.float64)
            return
        row = math.prod(shape[1:])
        step = max(1, BLOCK_ELEMENTS // (row or 1))
        with self.open() as r:
            for start in range(0, shape[0], step):
                rows = min(step, shape[0] - start)
                yield r.read(name, start * row, rows * row).to(torch.float64).reshape(rows, *shape[1:])

    def config_value(self, key: str) -> Any:
        """``config[key]``, falling back to ``config["text_config"][key]`` (VLMs) when
        absent or null at the top level; ``None`` when neither has it."""
        value = self.config.get(key)
        if value is None:
            value = (self.config.get("text_config") or {}).get(key)
        return value

    @property
    def tied_embeddings(self) -> bool:
        """Whether the config ties the output embedding to the input embedding
        (``tie_word_embeddings``, also under ``text_config``; absent counts as untied)."""
        return bool(self.config_value("tie_word_embeddings"))


class CheckpointReader:
    """Positioned reads from one :class:`Checkpoint`; descriptors per weight file opened
    on first use and closed by :meth:`close`. Safe to use from several threads at once
    (``preadv`` has no shared file position).

    A read into a caller's buffer (``out``, with :data:`ALIGN` bytes to spare) of at
    least :data:`DIRECT_MIN` bytes takes its page-aligned middle with ``O_DIRECT``:
    the device writes straight into the buffer, sparing the CPU the page-cache copy
    (about a third of a streaming merge's CPU time on a 2-core machine). The two
    partial pages at its ends go through the page cache and stay there, so the
    neighbouring block finds them without reading them again. Filesystems that refuse
    ``O_DIRECT`` are read through the page cache, released as they go.
    """

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self._fds: dict[tuple[str, bool], int | None] = {}

    def _fd(self, fname: str, direct: bool = False) -> int | None:
        key = (fname, direct)
        if key not in self._fds:
            try:
                fd = os.open(self.ckpt.path / fname, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            except OSError:
                if not direct:
                    raise
                fd = None
            if self._fds.setdefault(key, fd) != fd and fd is not None:  # another thread won the race
                os.close(fd)
        return self._fds[key]

    def read(self, name: str, start: int = 0, count: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of tensor ``name`` (flattened, row-major),
        in its stored dtype; the whole tensor in its shape when ``count`` is ``None``.

        Args:
            out: a contiguous uint8 tensor of at least ``count × itemsize`` bytes to read
                into (reused buffers keep a streaming merge from allocating), ``ALIGN``
                more for direct IO; the result is then a view of it.

        Raises:
            KeyError: ``name`` is not stored. MergeError: the file is shorter than its header says.
        """
        info = self.ckpt.tensors[name]
        whole = count is None
        count = info.numel - start if whole else count
        if start < 0 or count < 0 or start + count > info.numel:
            raise ValueError(f"elements [{start}, {start + count}) are outside tensor {name!r} ({info.numel})")
        nbytes, off = count * info.dtype.itemsize, info.offset + start * info.dtype.itemsize
        if out is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        else:
            out = out.reshape(-1)
            shift = (off - out.data_ptr()) % ALIGN if out.numel() >= nbytes + ALIGN else 0
            buf = out[shift:shift + nbytes]  # ≡ off (mod ALIGN): the aligned middle lands aligned
        if not (out is not None and nbytes >= DIRECT_MIN and self._read_direct(info, off, buf)):
            pread_into(self._fd(info.file), byte_view(buf), off, self.ckpt.path / info.file)
        t = buf.view(info.dtype)
        return t.reshape(info.shape) if whole else t

    def _read_direct(self, info: TensorInfo, off: int, buf: torch.Tensor) -> bool:
        """Read ``buf`` from byte ``off``: partial pages buffered, the rest O_DIRECT.
        False (nothing read) where O_DIRECT is unavailable or ``buf`` is misaligned."""
        fd = self._fd(info.file, direct=True)
        if fd is None or (buf.data_ptr() - off) % ALIGN:
            return False
        a0, a1 = -(-off // ALIGN) * ALIGN, (off + buf.numel()) // ALIGN * ALIGN
        mid = byte_view(buf)[a0 - off:a1 - off]
        try:
            pread_into(fd, mid, a0, self.ckpt.path / info.file, release=False)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._fds[(info.file, True)] = None  # refused after all: page cache from now on
            return False
        whole = byte_view(buf)
        plain = self._fd(info.file)
        pread_into(plain, whole[:a0 - off], off, self.ckpt.path / info.file, release=False)
        pread_into(plain, whole[a1 - off:], a1, self.ckpt.path / info.file, release=False)
        return True

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every top-level non-weight file of ``src`` (config, generation config,
    tokenizer files, chat template, ...) into ``dst``; returns the names copied."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if not p.is_file() or p.name in _SKIP_FILES or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name.endswith(".index.json"):  # weight indexes of any format
            continue
        shutil.copy2(p, Path(dst) / p.name)
        copied.append(p.name)
    return copied
