"""Streamed writing of Hugging Face safetensors shards, sha256 computed while writing.

The output shards are planned up front (``huggingface_hub.split_torch_state_dict_into_shards``
on meta tensors), so each shard's safetensors header — the byte layout of every tensor —
is known before any data exists. :class:`ShardWriter` then takes tensor data in plan
order, in pieces of any size, and a writer thread appends them to the shard files,
feeding each byte to sha256 as it goes out; a bounded queue caps the bytes waiting.
Each finished shard is fsynced, its pages released, and its digest recorded with
:func:`merit_core.store.manifest.remember_sha256`, so the manifest is built without
reading the shards back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from merit_core.merge.io import DTYPE_NAMES, SAFE_WEIGHTS_INDEX_NAME, SHARD_PATTERN, TensorInfo, byte_view
from merit_core.store.manifest import remember_sha256

# Bytes of tensor data that may wait for the writer thread.
QUEUE_BYTES = 64 << 20


def plan_shards(infos: dict[str, TensorInfo], max_shard_size: str | int):
    """Assign tensor names (in the given order) to output shard files.

    Returns:
        ``huggingface_hub.StateDictSplit`` (``filename_to_tensors``,
        ``tensor_to_filename``, ``is_sharded``, ``metadata``).
    """
    meta = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
    return split_torch_state_dict_into_shards(meta, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)


def safetensors_header(infos: dict[str, TensorInfo], names: list[str]) -> bytes:
    """The first bytes of a safetensors file holding ``names`` in this order: 8-byte
    little-endian length, then the JSON header (``__metadata__ = {"format": "pt"}``, as
    transformers expects) padded with spaces to a multiple of 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for n in names:
        info = infos[n]
        size = info.numel * info.dtype.itemsize
        header[n] = {"dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Writes tensors into the shards of a plan as a stream of pieces.

    Call :meth:`write` (pieces of a tensor, in order) or :meth:`add` (a whole tensor)
    for every planned tensor in plan order (``split.filename_to_tensors``, shard by
    shard), then :meth:`close`; :meth:`abort` after a failure. Memory held: at most
    ``queue_bytes`` of pieces waiting for the writer thread (plus the piece in hand).

    Attributes:
        split: the shard plan (see :func:`plan_shards`); ``order``: the tensor names in
            the order they must be written.
        sha256: ``{shard file name: hex digest}``, filled as shards are completed.

    Raises (from :meth:`write`, :meth:`add`, :meth:`close`):
        RuntimeError: a tensor out of plan order, a piece past the end of its tensor, a
            dtype other than planned, or unfinished tensors at :meth:`close`.
        OSError: the writer thread failed to write (re-raised here).
    """

    def __init__(self, directory: str | Path, infos: dict[str, TensorInfo], max_shard_size: str | int,
                 queue_bytes: int = QUEUE_BYTES):
        self.directory = Path(directory)
        self.infos = infos
        self.split = plan_shards(infos, max_shard_size)
        self.sha256: dict[str, str] = {}
        self._order = [(f, n) for f, names in self.split.filename_to_tensors.items() for n in names]
        self.order = [n for _, n in self._order]  # the tensor names in write order
        self._pos, self._done = 0, 0  # index in _order, bytes of the current tensor written
        self._open: str | None = None  # the shard file being written
        self._limit, self._queued = queue_bytes, 0
        self._cond = threading.Condition()
        self._q: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="merit-shard-writer", daemon=True)
        self._thread.start()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name`` (its shape must be the planned one)."""
        if tuple(tensor.shape) != self.infos[name].shape:
            raise RuntimeError(f"ShardWriter: tensor {name!r} has shape {list(tensor.shape)}, planned "
                               f"{list(self.infos[name].shape)}")
        self.write(name, tensor)

    def write(self, name: str, piece: torch.Tensor, on_written: Callable[[], None] | None = None) -> None:
        """Append ``piece`` (the next elements of tensor ``name``, its planned dtype,
        any shape) to the output. The writer keeps a reference until it is written: do
        not modify ``piece`` before ``on_written()`` is called (from the writer thread,
        once the piece is written — or dropped after a failure)."""
        self._raise_if_failed()
        self._skip_empty()
        if self._pos >= len(self._order) or self._order[self._pos][1] != name:
            current = self._order[self._pos][1] if self._pos < len(self._order) else None
            raise RuntimeError(f"ShardWriter: tensor {name!r} written out of order (expected {current!r})")
        info = self.infos[name]
        if piece.dtype != info.dtype:
            raise RuntimeError(f"ShardWriter: tensor {name!r} is {piece.dtype}, planned {info.dtype}")
        nbytes = piece.numel() * piece.element_size()
        if self._done + nbytes > self._size(self._pos):
            raise RuntimeError(f"ShardWriter: more data for tensor {name!r} than its {self._size(self._pos)} bytes")
        self._begin_tensor()
        self._put(("data", piece.contiguous(), on_written), nbytes)
        self._done += nbytes
        if self._done == self._size(self._pos):
            self._finish_tensor()

    def _size(self, pos: int) -> int:
        info = self.infos[self._order[pos][1]]
        return info.numel * info.dtype.itemsize

    def _begin_tensor(self) -> None:
        """Open the shard of the tensor at the current position unless it is open."""
        fname = self._order[self._pos][0]
        if self._open != fname:
            self._put(("open", fname, safetensors_header(self.infos, self.split.filename_to_tensors[fname])), 0)
            self._open = fname

    def _finish_tensor(self) -> None:
        """The current tensor is complete: close its shard when it is the shard's last."""
        fname = self._order[self._pos][0]
        self._pos, self._done = self._pos + 1, 0
        if self._pos == len(self._order) or self._order[self._pos][0] != fname:
            self._put(("close", fname), 0)
            self._open = None

    def _skip_empty(self) -> None:
        """Pass over planned tensors without bytes at the current position."""
        while self._pos < len(self._order) and self._size(self._pos) == 0:
            self._begin_tensor()
            self._finish_tensor()

    def _put(self, item: tuple, nbytes: int) -> None:
        with self._cond:
            while self._queued and self._queued + nbytes > self._limit and self._error is None:
                self._cond.wait()
            self._queued += nbytes
        self._q.put((item, nbytes))

    def _run(self) -> None:
        """The writer thread: open, append (hashing), fsync and close shard files."""
        out: ShardFile | None = None
        staging = StagingBuffer()
        while (got := self._q.get()) is not None:
            (kind, *args), nbytes = got
            try:
                if self._error is None and kind == "open":
                    out = ShardFile(self.directory / args[0], staging)
                    out.append(torch.frombuffer(bytearray(args[1]), dtype=torch.uint8))
                elif kind == "data":
                    if self._error is None:
                        out.append(args[0].reshape(-1).view(torch.uint8))
                elif self._error is None:  # close
                    self.sha256[args[0]] = out.close()
                    out = None
                    remember_sha256(self.directory / args[0], self.sha256[args[0]])
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer by _raise_if_failed
                self._error = e
            finally:
                if kind == "data" and args[1] is not None:
                    args[1]()
                with self._cond:
                    self._queued -= nbytes
                    self._cond.notify_all()
        if out is not None:
            out.abandon()
        staging.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> list[str]:
        """Wait for every shard to be written and synced, write the index (when
        sharded); returns the weight file names written."""
        self._skip_empty()
        self._stop()
        self._raise_if_failed()
        if self._pos != len(self._order):
            raise RuntimeError(f"ShardWriter: tensor {self._order[self._pos][1]!r} was not (fully) written")
        if self.split.is_sharded:
            index = {"metadata": dict(self.split.metadata), "weight_map": dict(self.split.tensor_to_filename)}
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(self.split.filename_to_tensors)

    def abort(self) -> None:
        """Stop the writer thread after a failure (the files written are left as they are)."""
        self._error = self._error or RuntimeError("ShardWriter aborted")
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


class StagingBuffer:
    """Two page-aligned 8 MiB buffers (anonymous maps) that O_DIRECT writes go out of,
    and the thread that writes them: one buffer fills while the other is on its way to
    the disk, so hashing and copying overlap the device writes."""

    SIZE = 8 << 20

    def __init__(self):
        self.maps = [mmap.mmap(-1, self.SIZE) for _ in range(2)]
        self.tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in self.maps]  # copies release the GIL
        self.cur = 0
        self._pending: list[Future | None] = [None, None]
        self._io = ThreadPoolExecutor(1, thread_name_prefix="merit-disk-write")

    @property
    def tensor(self) -> torch.Tensor:
        """The buffer being filled."""
        return self.tensors[self.cur]

    def submit(self, write: Callable[[memoryview, int], None], nbytes: int, offset: int) -> None:
        """Write the first ``nbytes`` of the buffer being filled at ``offset`` (in the
        background) and switch to the other buffer once its own write has finished."""
        self._pending[self.cur] = self._io.submit(write, memoryview(self.maps[self.cur])[:nbytes], offset)
        self.cur ^= 1
        self._wait(self.cur)

    def _wait(self, i: int) -> None:
        fut, self._pending[i] = self._pending[i], None
        if fut is not None:
            fut.result()

    def drain(self) -> None:
        """Wait for both buffers' writes (raising the first error)."""
        try:
            self._wait(self.cur ^ 1)
        finally:
            self._wait(self.cur)

    def close(self) -> None:
        self._io.shutdown(wait=True)


class ShardFile:
    """One output file being written in order, its sha256 fed as the bytes arrive.

    Data goes out through a :class:`StagingBuffer` in 8 MiB ``O_DIRECT`` writes: a
    buffered write costs this process about a CPU second per GB of page-cache work, a
    direct one almost nothing. The last partial buffer goes through the page cache (no
    alignment needed), as does everything where the filesystem refuses ``O_DIRECT``
    (tmpfs, some network filesystems).
    """

    def __init__(self, path: Path, staging: StagingBuffer):
        self.path, self.staging = path, staging
        self.digest = hashlib.sha256()
        self.size = self.fill = self.issued = 0  # bytes appended, staged, handed to the disk thread
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.dfd: int | None = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError):
            self.dfd = None

    def append(self, data: torch.Tensor) -> None:
        """Append the bytes of the 1-D uint8 tensor ``data``."""
        self.digest.update(byte_view(data))
        self.size += data.numel()
        pos, n, cap = 0, data.numel(), self.staging.SIZE
        while pos < n:
            take = min(cap - self.fill, n - pos)
            self.staging.tensor[self.fill:self.fill + take].copy_(data[pos:pos + take])
            self.fill, pos = self.fill + take, pos + take
            if self.fill == cap:
                self.staging.submit(self._pwrite, cap, self.issued)
                self.issued, self.fill = self.issued + cap, 0

    def _pwrite(self, view: memoryview, offset: int) -> None:
        """(The disk thread.) Write ``view`` at ``offset``: O_DIRECT, else buffered."""
        if self.dfd is not None:
            try:
                return _pwrite_all(self.dfd, view, offset)
            except OSError as e:  # O_DIRECT refused at write time: buffered from now on
                if e.errno != errno.EINVAL:
                    raise
                os.close(self.dfd)
                self.dfd = None
        _pwrite_all(self.fd, view, offset)

    def close(self) -> str:
        """Write the staged tail, wait for the disk thread, fsync, close; returns the
        sha256 hex digest."""
        self.staging.drain()
        _pwrite_all(self.fd, memoryview(self.staging.maps[self.staging.cur])[:self.fill], self.issued)
        os.fsync(self.fd)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.abandon()
        return self.digest.hexdigest()

    def abandon(self) -> None:
        """Close the descriptors (after a failure, without finishing the file)."""
        with contextlib.suppress(Exception):  # the failure that brought us here is reported already
            self.staging.drain()
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at byte ``offset`` of ``fd``."""
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
