"""How the source-gradient stage spreads over workers: the ``conflict`` section's execution
fields and the deterministic batching of sources into one batch per worker.

The fields live here, not in :mod:`merit_core.config`, as a base class of
:class:`~merit_core.config.ConflictConfig` (so they read ``conflict.execution`` etc.).
None of them changes a sketch's value at a given thread count, so none is part of a
sketch's cache key (:data:`FANOUT_FIELDS`). Pure Python: no torch, no prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["FANOUT_FIELDS", "GradientFanoutFields", "balanced_batches", "threads_per_worker"]


class GradientFanoutFields(BaseModel):
    """Where the per-source calibration gradients g_t are computed (``conflict.*``)."""

    execution: Literal["local", "processes", "deployment"] = Field(
        "local", description="'local': every source in this process, θ(0) loaded once; 'processes': `workers` "
        "batches of sources in a process pool on this machine; 'deployment': one flow run of `deployment` "
        "per batch, on whatever worker of its pool is free.")
    workers: int = Field(2, ge=1, description="processes / deployment: number of batches (one per worker; "
                         "θ(0) is loaded once per batch). Sources are balanced by calibration tokens.")
    deployment: str = Field("merit-gradients/process", description="execution=deployment: the deployment of "
                            "flow merit-gradients that computes one batch per flow run.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per batch. None: torch's default "
                                "for local and deployment, the machine's cores split evenly for processes. "
                                "On CPU a sketch's last bits depend on the thread count (float sums split "
                                "across threads); equal thread counts give bit-identical sketches in every mode.")


FANOUT_FIELDS: frozenset[str] = frozenset(GradientFanoutFields.model_fields)
"""Names of the execution fields: excluded from the sketch cache key."""


def balanced_batches(costs: Sequence[float], n: int) -> list[list[int]]:
    """Split items into ``min(n, len(costs))`` batches of about equal total cost,
    deterministically (greedy longest-processing-time: items by decreasing cost, ties by
    index, each to the batch with the smallest total so far, ties to the lower batch).

    Args:
        costs: one non-negative cost per item (e.g. calibration tokens of a source).
        n: number of batches wanted (workers).

    Returns:
        Batches of item indices, each in increasing index order; batches ordered by their
        smallest index; every index exactly once; no empty batch.

    Raises:
        ValueError: ``n < 1`` or a negative cost.
    """
    if n < 1:
        raise ValueError(f"balanced_batches: n={n} must be at least 1")
    if any(c < 0 for c in costs):
        raise ValueError(f"balanced_batches: costs must be non-negative, got {list(costs)}")
    k = min(n, len(costs))
    totals = [0.0] * k
    members: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(k), key=lambda b: (totals[b], b))
        totals[b] += costs[i]
        members[b].append(i)
    return sorted((sorted(m) for m in members), key=lambda m: m[0])


def threads_per_worker(threads: int | None, workers: int, cpus: int | None) -> int | None:
    """torch threads for each of ``workers`` parallel batches: ``threads`` when set, else
    an equal share of ``cpus`` cores (at least 1); ``None`` when ``cpus`` is unknown."""
    if threads is not None:
        return threads
    if not cpus:
        return None
    return max(1, cpus // max(1, workers))
