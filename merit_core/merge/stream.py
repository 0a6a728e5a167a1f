"""The streaming merge loop: positioned reads ahead, merge maths, streamed writes.

The output is cut into *units* in write order: for an elementwise operator a block of
at most :func:`block_elements` elements of one tensor (so no tensor is ever held whole),
otherwise one whole tensor. A :class:`~merit_core.merge.prefetch.Prefetcher` reads the
units ahead, every input (and θ(0)) in parallel, into a fixed set of buffers of
:data:`READ_BUDGET` bytes in all; :data:`COMPUTE_THREADS` threads merge units in
cache-sized chunks of :data:`CHUNK_ELEMENTS` (float64 maths, one rounding) into a fixed
set of output buffers; :class:`~merit_core.merge.shards.ShardWriter`'s thread writes
and hashes them in order. Every input byte is read once.

Peak memory of an elementwise merge is therefore fixed: READ_BUDGET + (COMPUTE_THREADS
+ 2) output blocks + a few MB of scratch, whatever the size of the model or K. A
whole-tensor operator (``ties``, ``dare``) holds one tensor of every input and their
float32 copies instead, reading the next tensors ahead within READ_BUDGET.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from merit_core.merge.io import ALIGN, Checkpoint, MergeError, TensorInfo
from merit_core.merge.prefetch import BufferPool, Prefetcher, Unit
from merit_core.merge.registry import MergeMethod
from merit_core.merge.rounding import round_to
from merit_core.merge.shards import ShardWriter

# Bytes of input buffers (all inputs together), for the units being merged and read ahead.
READ_BUDGET = 384 << 20
# Threads merging blocks (torch runs single-threaded in each: small chunks gain nothing
# from its thread pool).
COMPUTE_THREADS = min(2, os.cpu_count() or 1)
# Units of input buffers: those being merged plus ten read ahead (deep enough that direct
# reads keep the disk busy: at 3B scale the merge then waits on reads for well under 1 s).
UNITS_IN_FLIGHT = COMPUTE_THREADS + 10
# Elements merged at a time inside a unit (float64 scratch stays in the CPU caches).
CHUNK_ELEMENTS = 1 << 18


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
        if not job.spec.elementwise:
            ahead = Prefetcher(readers, units, base is not None, None, READ_BUDGET)
            stack.callback(ahead.close)
            for unit, parts, release in ahead:
                inputs, b = (parts[:-1], parts[-1]) if base is not None else (parts, None)
                if unit.info.dtype.is_floating_point:
                    writer.write(unit.name, _merge_whole(job, unit, inputs, b, ckpts, base))
                else:
                    writer.write(unit.name, _same_everywhere(unit.name, inputs, ckpts))
                release()
            return
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)
        _stream_blocks(job, units, readers, sources, base is not None, writer, stack)


def _stream_blocks(job: MergeJob, units: list[Unit], readers, sources: list[Checkpoint], has_base: bool,
                   writer: ShardWriter, stack: ExitStack) -> None:
    """The elementwise loop: read ahead into pooled buffers, merge on COMPUTE_THREADS,
    write in order; output buffers go back to their pool once written."""
    in_bytes = max((u.numel * r.ckpt.tensors[u.name].dtype.itemsize for u in units for r in readers), default=0)
    in_pool = BufferPool(in_bytes + ALIGN, UNITS_IN_FLIGHT * len(readers))  # ALIGN: room for direct IO
    out_pool = BufferPool(max((u.numel * u.info.dtype.itemsize for u in units), default=0), COMPUTE_THREADS + 2)
    workers = ThreadPoolExecutor(COMPUTE_THREADS, thread_name_prefix="merit-merge")
    stack.callback(workers.shutdown, wait=True, cancel_futures=True)
    stack.callback(out_pool.close)  # runs first: wakes workers waiting for a buffer
    stack.callback(in_pool.close)
    ahead = Prefetcher(readers, units, has_base, in_pool, READ_BUDGET)
    stack.callback(ahead.close)
    done: deque[tuple[Unit, Future]] = deque()

    def flush() -> None:
        unit, fut = done.popleft()
        piece, buf = fut.result()
        writer.write(unit.name, piece, on_written=None if buf is None else (lambda b=buf: out_pool.give(b)))

    for unit, parts, release in ahead:
        if unit.info.dtype.is_floating_point:
            fut = workers.submit(_merge_block, job, unit, parts, has_base, sources, out_pool, release)
        else:
            fut = workers.submit(_same_block, unit.name, parts[: len(sources) - has_base], sources, release)
        done.append((unit, fut))
        while len(done) > COMPUTE_THREADS:
            flush()
    while done:
        flush()


def _same_block(name: str, parts: list[torch.Tensor], ckpts: list[Checkpoint], release) -> tuple[torch.Tensor, None]:
    try:
        return _same_everywhere(name, parts, ckpts).clone(), None
    finally:
        release()


def _same_everywhere(name: str, parts: list[torch.Tensor], ckpts: list[Checkpoint]) -> torch.Tensor:
    """Integer/bool elements cannot be averaged: they must agree; returns the first's."""
    for c, t in zip(ckpts[1:], parts[1:]):
        if not torch.equal(t, parts[0]):
            raise MergeError(f"non-float tensor {name!r} differs between {ckpts[0].path} and input {c.path}")
    return parts[0]


class Workspace:
    """Scratch for :func:`_merge_block`, one per compute thread (freed with the thread): a
    float64 chunk per source and a float32 chunk for rounding (nothing allocated per chunk)."""

    _local = threading.local()

    def __init__(self, n_sources: int):
        self.f64 = [torch.empty(CHUNK_ELEMENTS, dtype=torch.float64) for _ in range(n_sources)]
        self.f32 = torch.empty(CHUNK_ELEMENTS, dtype=torch.float32)

    @classmethod
    def mine(cls, n_sources: int) -> Workspace:
        """This thread's workspace for ``n_sources`` sources."""
        ws = getattr(cls._local, "ws", None)
        if ws is None or len(ws.f64) != n_sources:
            ws = cls._local.ws = cls(n_sources)
        return ws


def _merge_block(job: MergeJob, unit: Unit, srcs: list[torch.Tensor], has_base: bool, sources: list[Checkpoint],
                 out_pool: BufferPool, release) -> tuple[torch.Tensor, torch.Tensor]:
    """One unit of an elementwise operator (``srcs``: the inputs' blocks, θ(0)'s last):
    float64 maths chunk by chunk, each result rounded once into a pooled output buffer.
    Returns the unit's output (1-D) and the buffer holding it."""
    dtype = unit.info.dtype
    ws = Workspace.mine(len(srcs))
    buf = out_pool.take()
    try:
        out = buf[: unit.numel * dtype.itemsize].view(dtype)
        for s in range(0, unit.numel, CHUNK_ELEMENTS):
            e = min(s + CHUNK_ELEMENTS, unit.numel)
            if _unchanged(srcs, s, e, dtype):  # e.g. a frozen vision tower: θ(0) exactly
                out[s:e].copy_(srcs[0][s:e])
                continue
            xs = [w[: e - s].copy_(p[s:e]) for w, p in zip(ws.f64, srcs)]
            b = xs.pop() if has_base else None
            merged = job.spec(xs, job.weights, b, name=unit.name, counts=job.counts, **job.settings)
            piece = round_to(merged, dtype, out=out[s:e], work=ws.f32)
            if not _all_finite(piece):
                again = [p[s:e].to(torch.float64) for p in srcs]  # the scratch copies were overwritten
                _explain_non_finite(unit, again, sources, merged)
    except BaseException:
        out_pool.give(buf)
        raise
    finally:
        release()
    return out, buf


def _unchanged(srcs: list[torch.Tensor], s: int, e: int, dtype: torch.dtype) -> bool:
    """Whether elements ``s:e`` are bit for bit the same in every input (and θ(0), which is
    last in ``srcs`` when the operator uses it) and stored in the output dtype. Such a
    chunk is copied through: any merge of K equal values (with θ(0) equal to them) is that
    value, and so a tensor no branch changed (a frozen vision tower, ``model.trainable:
    lm``) leaves the merge as θ(0) exactly, whatever the weights' rounding."""
    first = srcs[0][s:e]
    if any(p.dtype != dtype for p in srcs):
        return False
    if any(not bool(p[s] == first[0]) for p in srcs[1:]):  # cheap early exit (NaN: not equal)
        return False
    return all(torch.equal(p[s:e], first) for p in srcs[1:])


def _merge_whole(job: MergeJob, unit: Unit, parts: list[torch.Tensor], base: torch.Tensor | None,
                 ckpts: list[Checkpoint], base_ckpt: Checkpoint | None) -> torch.Tensor:
    """One whole tensor of a whole-tensor operator, in float32 (float64 for float64)."""
    everything = [*parts, *([base] if base is not None else [])]
    if unit.info.numel and _unchanged([p.reshape(-1) for p in everything], 0, unit.info.numel, unit.info.dtype):
        return parts[0]
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


def _explain_non_finite(unit: Unit, xs: list[torch.Tensor], sources: list[Checkpoint], merged: torch.Tensor) -> None:
    """Raise the MergeError for a non-finite merged chunk ``xs`` (one per source): the
    first source holding NaN/Inf, else an overflow of the output dtype."""
    for x, c in zip(xs, sources):
        _checked(x, unit.name, c)
    raise MergeError(f"merged tensor {unit.name!r} is not finite in {unit.info.dtype} (overflow; lower scale?)"
                     + ("" if _all_finite(merged) else " (the float64 result is not finite)"))
