"""The streaming merge loop: positioned reads ahead, merge maths, streamed writes.

The output is cut into *units* in write order: for an elementwise operator a block of
at most :func:`block_elements` elements of one tensor (so no tensor is ever held whole),
otherwise one whole tensor. A thread pool reads the units ahead, every input (and θ(0))
in parallel, with at most :data:`READ_BUDGET` bytes read and not yet merged (always at
least one unit); the calling thread merges a unit in cache-sized chunks of
:data:`CHUNK_ELEMENTS` and hands the result to :class:`~merit_core.merge.shards.ShardWriter`,
whose thread writes and hashes it. Every input byte is read once.

Peak memory of an elementwise merge is about READ_BUDGET + one unit's output +
``ShardWriter.queue_bytes``, whatever the size of the model or K; a whole-tensor
operator holds the largest tensor of every input (and its float32 copies) instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from merit_core.merge.io import Checkpoint, CheckpointReader, MergeError, TensorInfo
from merit_core.merge.registry import MergeMethod
from merit_core.merge.rounding import round_to
from merit_core.merge.shards import ShardWriter

# Bytes of input read ahead and not yet merged (all inputs together).
READ_BUDGET = 192 << 20
# Units that fit in READ_BUDGET at once: one merged while the others are read.
UNITS_IN_FLIGHT = 3
# Elements merged at a time inside a unit (float64 temporaries stay in the CPU caches).
CHUNK_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class Unit:
    """Elements ``[start, start + count)`` of tensor ``name`` (flattened); ``count``
    ``None`` means the whole tensor in its shape."""

    name: str
    info: TensorInfo
    start: int = 0
    count: int | None = None


@dataclass
class MergeJob:
    """Everything one merge needs besides the files: the operator, its weights (w
    normalised, counts before normalisation, both float64 (K,)) and hyper-parameters."""

    spec: MergeMethod
    weights: torch.Tensor
    counts: torch.Tensor
    settings: dict


def block_elements(n_sources: int, itemsize: int) -> int:
    """Elements per unit such that :data:`UNITS_IN_FLIGHT` units of ``n_sources`` inputs
    of ``itemsize`` bytes fit in :data:`READ_BUDGET` (a multiple of the chunk size)."""
    per_unit = READ_BUDGET // (UNITS_IN_FLIGHT * n_sources * itemsize)
    return max(CHUNK_ELEMENTS, per_unit // CHUNK_ELEMENTS * CHUNK_ELEMENTS)


def plan_units(order: list[str], infos: dict[str, TensorInfo], elementwise: bool, n_sources: int) -> list[Unit]:
    """The units of the output, in write order (see the module docstring)."""
    units = []
    for name in order:
        info = infos[name]
        if not elementwise or info.numel == 0:
            units.append(Unit(name, info))
            continue
        step = block_elements(n_sources, info.dtype.itemsize)
        units.extend(Unit(name, info, s, min(step, info.numel - s)) for s in range(0, info.numel, step))
    return units


def stream_merge(job: MergeJob, ckpts: list[Checkpoint], base: Checkpoint | None, writer: ShardWriter) -> None:
    """Merge every planned tensor of ``writer`` from ``ckpts`` (and ``base``) into it.

    Raises:
        MergeError: an input holds NaN/Inf (the message names the tensor and the input),
            non-float tensors differ, or a merged value overflows the output dtype.
    """
    sources = ckpts + ([base] if base is not None else [])
    units = plan_units(writer.order, writer.infos, job.spec.elementwise, len(sources))
    with ExitStack() as stack:
        readers = [stack.enter_context(c.open()) for c in sources]
        ahead = Prefetcher(readers, units, has_base=base is not None)
        stack.callback(ahead.close)
        for unit, parts in ahead:
            inputs, b = (parts[:-1], parts[-1]) if base is not None else (parts, None)
            if not unit.info.dtype.is_floating_point:
                writer.write(unit.name, _same_everywhere(unit.name, inputs, ckpts))
            elif job.spec.elementwise:
                writer.write(unit.name, _merge_block(job, unit, inputs, b, sources))
            else:
                writer.write(unit.name, _merge_whole(job, unit, inputs, b, ckpts, base))


class Prefetcher:
    """Iterates ``(unit, parts)``: ``parts`` the unit's elements from every reader (base
    last; ``None`` for θ(0) of a non-float tensor, which is not read), read ahead by a
    thread pool within :data:`READ_BUDGET` bytes. Call :meth:`close` when done."""

    def __init__(self, readers: list[CheckpointReader], units: list[Unit], has_base: bool):
        self.readers, self.units, self.has_base = readers, units, has_base
        self._pool = ThreadPoolExecutor(max_workers=min(8, len(readers)), thread_name_prefix="merit-read")
        self._pending: deque[tuple[Unit, list[Future | None], int]] = deque()

    def _submit(self, unit: Unit) -> int:
        futures: list[Future | None] = []
        nbytes = 0
        for i, r in enumerate(self.readers):
            if self.has_base and i == len(self.readers) - 1 and not unit.info.dtype.is_floating_point:
                futures.append(None)
                continue
            futures.append(self._pool.submit(r.read, unit.name, unit.start, unit.count))
            n = unit.info.numel if unit.count is None else unit.count
            nbytes += n * r.ckpt.tensors[unit.name].dtype.itemsize
        self._pending.append((unit, futures, nbytes))
        return nbytes

    def __iter__(self) -> Iterator[tuple[Unit, list[torch.Tensor | None]]]:
        queued, in_flight = iter(self.units), 0
        nxt = next(queued, None)
        while nxt is not None or self._pending:
            while nxt is not None and (not self._pending or in_flight + _unit_bytes(nxt, self.readers) <= READ_BUDGET):
                in_flight += self._submit(nxt)
                nxt = next(queued, None)
            unit, futures, nbytes = self._pending.popleft()
            parts = [None if f is None else f.result() for f in futures]
            yield unit, parts
            in_flight -= nbytes

    def close(self) -> None:
        """Cancel reads not started, wait for the running ones."""
        for _, futures, _ in self._pending:
            for f in futures:
                if f is not None:
                    f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


def _unit_bytes(unit: Unit, readers: list[CheckpointReader]) -> int:
    n = unit.info.numel if unit.count is None else unit.count
    return sum(n * r.ckpt.tensors[unit.name].dtype.itemsize for r in readers)


def _same_everywhere(name: str, parts: list[torch.Tensor], ckpts: list[Checkpoint]) -> torch.Tensor:
    """Integer/bool elements cannot be averaged: they must agree; returns the first's."""
    for c, t in zip(ckpts[1:], parts[1:]):
        if not torch.equal(t, parts[0]):
            raise MergeError(f"non-float tensor {name!r} differs between {ckpts[0].path} and input {c.path}")
    return parts[0]


def _merge_block(job: MergeJob, unit: Unit, parts: list[torch.Tensor], base: torch.Tensor | None,
                 sources: list[Checkpoint]) -> torch.Tensor:
    """One unit of an elementwise operator: float64 maths chunk by chunk, each result
    rounded once into the output dtype. Returns the unit's output (1-D)."""
    dtype = unit.info.dtype
    out = torch.empty(len(parts[0]), dtype=dtype)
    f64 = torch.float64
    for s in range(0, len(out), CHUNK_ELEMENTS):
        e = min(s + CHUNK_ELEMENTS, len(out))
        xs = [p[s:e].to(f64) for p in parts]
        b = base[s:e].to(f64) if base is not None else None
        merged = job.spec(xs, job.weights, b, name=unit.name, counts=job.counts, **job.settings)
        piece = round_to(merged, dtype, out=out[s:e])
        if not _all_finite(piece):
            _explain_non_finite(unit, s, [*xs, *([b] if b is not None else [])], sources, merged)
    return out


def _merge_whole(job: MergeJob, unit: Unit, parts: list[torch.Tensor], base: torch.Tensor | None,
                 ckpts: list[Checkpoint], base_ckpt: Checkpoint | None) -> torch.Tensor:
    """One whole tensor of a whole-tensor operator, in float32 (float64 for float64)."""
    acc = torch.float64 if unit.info.dtype == torch.float64 else torch.float32
    tensors = [_checked(p.to(acc), unit.name, c) for p, c in zip(parts, ckpts)]
    b = _checked(base.to(acc), unit.name, base_ckpt) if base is not None else None
    merged = round_to(job.spec(tensors, job.weights, b, name=unit.name, **job.settings), unit.info.dtype)
    if not _all_finite(merged):
        raise MergeError(f"merged tensor {unit.name!r} is not finite in {unit.info.dtype} (overflow; lower scale?)")
    return merged


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. Fast path: a (vectorised) sum is finite iff every entry is,
    unless the sum overflows — then the exact elementwise check decides."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _checked(t: torch.Tensor, name: str, c: Checkpoint) -> torch.Tensor:
    if not _all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise MergeError(f"tensor {name!r} of input {c.path} contains {bad}")
    return t


def _explain_non_finite(unit: Unit, start: int, xs: list[torch.Tensor], sources: list[Checkpoint],
                        merged: torch.Tensor) -> None:
    """Raise the MergeError for a non-finite merged chunk: the first input holding
    NaN/Inf (elements from ``unit.start + start``), else an overflow of the output dtype."""
    for x, c in zip(xs, sources):
        _checked(x, unit.name, c)
    raise MergeError(f"merged tensor {unit.name!r} is not finite in {unit.info.dtype} (overflow; lower scale?)"
                     + ("" if _all_finite(merged) else " (the float64 result is not finite)"))
