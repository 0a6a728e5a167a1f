"""Reading merge inputs ahead: reusable byte buffers and a thread pool of positioned reads.

:class:`Prefetcher` reads the units of a merge (blocks of a tensor, or whole tensors)
from every input at once, a few units ahead of the merge, into buffers from a
:class:`BufferPool` (block units) or freshly allocated (whole tensors, at most
``budget`` bytes ahead). Reusing a fixed set of buffers keeps the resident memory flat:
nothing is allocated per block, and so nothing is left in per-thread allocator arenas.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from merit_core.merge.io import CheckpointReader, TensorInfo


@dataclass(frozen=True)
class Unit:
    """Elements ``[start, start + count)`` of tensor ``name`` (flattened); ``count``
    ``None`` means the whole tensor in its shape."""

    name: str
    info: TensorInfo
    start: int = 0
    count: int | None = None

    @property
    def numel(self) -> int:
        return self.info.numel if self.count is None else self.count


class PoolClosed(RuntimeError):
    """The merge stopped while a thread waited for a buffer."""


class BufferPool:
    """``count`` uint8 buffers of ``nbytes`` each, handed out by :meth:`take` (waiting
    while all are out) and returned by :meth:`give`; thread-safe. Memory is allocated
    once, up front (pages become resident when first written)."""

    def __init__(self, nbytes: int, count: int):
        self.nbytes, self.count = nbytes, count
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        for _ in range(count):
            self._free.put(torch.empty(nbytes, dtype=torch.uint8))

    def take(self) -> torch.Tensor:
        """A free buffer. Raises :class:`PoolClosed` once :meth:`close` was called."""
        while True:
            if self._closed:
                raise PoolClosed("the merge was stopped")
            try:
                return self._free.get(timeout=0.2)
            except queue.Empty:
                continue

    def give(self, buf: torch.Tensor) -> None:
        self._free.put(buf)

    def available(self) -> int:
        return self._free.qsize()

    def close(self) -> None:
        """Wake every :meth:`take` waiting, with :class:`PoolClosed`."""
        self._closed = True


class Prefetcher:
    """Iterates ``(unit, parts, release)`` in unit order: ``parts`` the unit's elements
    from every reader (θ(0) last; ``None`` for θ(0) of a non-float tensor, not read),
    ``release()`` to call once they are no longer needed (returns their buffers).

    Block units are read into ``pool`` buffers (as many units ahead as free buffers
    allow); whole tensors into new memory, up to ``budget`` bytes ahead (always one).
    Call :meth:`close` when done (also after an error).
    """

    def __init__(self, readers: list[CheckpointReader], units: list[Unit], has_base: bool,
                 pool: BufferPool | None, budget: int):
        self.readers, self.units, self.has_base, self.pool, self.budget = readers, units, has_base, pool, budget
        self._exec = ThreadPoolExecutor(max_workers=min(8, len(readers)), thread_name_prefix="merit-read")
        self._pending: deque[tuple[Unit, list[Future | None], Callable[[], None]]] = deque()
        self._lock = threading.Lock()
        self._in_flight = 0  # bytes of whole-tensor units read ahead and not released

    def _reads(self, unit: Unit) -> list[CheckpointReader | None]:
        """The readers this unit is read from (``None``: θ(0) of a non-float tensor)."""
        skip_base = self.has_base and not unit.info.dtype.is_floating_point
        return [None if skip_base and i == len(self.readers) - 1 else r for i, r in enumerate(self.readers)]

    def _nbytes(self, unit: Unit) -> int:
        return sum(unit.numel * r.ckpt.tensors[unit.name].dtype.itemsize for r in self._reads(unit) if r)

    def _pooled(self, unit: Unit) -> bool:
        return self.pool is not None and unit.count is not None

    def _can_submit(self, unit: Unit) -> bool:
        if not self._pending:
            return True
        if self._pooled(unit):
            return self.pool.available() >= sum(r is not None for r in self._reads(unit))
        with self._lock:
            return self._in_flight + self._nbytes(unit) <= self.budget

    def _submit(self, unit: Unit) -> None:
        futures: list[Future | None] = []
        bufs: list[torch.Tensor] = []
        for r in self._reads(unit):
            buf = self.pool.take() if r is not None and self._pooled(unit) else None
            if buf is not None:
                bufs.append(buf)
            futures.append(None if r is None else self._exec.submit(r.read, unit.name, unit.start, unit.count, buf))
        nbytes = 0 if self._pooled(unit) else self._nbytes(unit)
        with self._lock:
            self._in_flight += nbytes
        self._pending.append((unit, futures, self._releaser(bufs, nbytes)))

    def _releaser(self, bufs: list[torch.Tensor], nbytes: int) -> Callable[[], None]:
        def release() -> None:
            for b in bufs:
                self.pool.give(b)
            bufs.clear()
            with self._lock:
                self._in_flight -= nbytes

        return release

    def __iter__(self) -> Iterator[tuple[Unit, list[torch.Tensor | None], Callable[[], None]]]:
        queued = iter(self.units)
        nxt = next(queued, None)
        while nxt is not None or self._pending:
            while nxt is not None and self._can_submit(nxt):
                self._submit(nxt)
                nxt = next(queued, None)
            unit, futures, release = self._pending.popleft()
            try:
                parts = [None if f is None else f.result() for f in futures]
            except BaseException:
                release()
                raise
            yield unit, parts, release

    def close(self) -> None:
        """Cancel reads not started, wait for the running ones."""
        for _, futures, _ in self._pending:
            for f in futures:
                if f is not None:
                    f.cancel()
        self._pending.clear()
        self._exec.shutdown(wait=True)
