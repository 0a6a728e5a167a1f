"""Partitioning the T sources into K = 2^r groups, one training branch per group (MERIT
spec steps 2–3, Algorithm 1).

In this package "split" always means such a partition of the *sources* (the config
section ``split``: ``r``, ``strategy``, ``balance``, ``seed``), never the
train/held-out/calibration split of one source's examples (:mod:`merit_core.data`).

- :func:`pca_split` (:mod:`.pca`) — the method: PCA of the conflict matrix C, then
  recursive weighted-median halving along PC1, PC2, … .
- :func:`random_split`, :func:`kmeans_split` (:mod:`.baselines`) — the baselines.
- :func:`split_sources` — dispatch on :class:`~merit_core.config.SplitConfig`.
- :func:`split_score`, :func:`conflict_structure` (:mod:`.score`) — how much a
  partition separates the sources' gradients (study report).

Every partition function returns a :class:`SplitResult` (:mod:`.result`: source
indices, numpy arrays); :meth:`SplitResult.partition` names the sources and gives the
:class:`~merit_core.refs.Partition` that stages exchange and store.

Weights are per-source sizes: examples (``split.balance = "samples"``, the default)
or loss tokens (``"tokens"``); the caller passes whichever it wants balanced.
"""

from __future__ import annotations

from typing import Any

from merit_core.config import SplitConfig
from merit_core.split.baselines import kmeans_split, random_split
from merit_core.split.pca import pca_split
from merit_core.split.result import SplitResult
from merit_core.split.score import conflict_structure, split_score

__all__ = ["SplitResult", "conflict_structure", "kmeans_split", "pca_split", "random_split", "split_score",
           "split_sources"]


def split_sources(c: Any, weights: Any, cfg: SplitConfig) -> SplitResult:
    """Partition the sources as ``cfg`` says, with K = 2^cfg.r groups.

    Dispatch on ``cfg.strategy``: ``pca`` → :func:`pca_split`, ``random`` →
    :func:`random_split` (C unused, may be None), ``kmeans`` → :func:`kmeans_split`;
    ``cfg.seed`` seeds the baselines. ``cfg.balance`` is the caller's business: pass
    sample counts or token counts as ``weights``.

    Args:
        c: (T, T) conflict matrix (see :func:`pca_split`); None for ``random``.
        weights: (T,) positive source sizes.

    Raises:
        ValueError: unknown strategy, or the chosen function's input errors.
    """
    if cfg.strategy == "pca":
        return pca_split(c, weights, cfg.r)
    if cfg.strategy == "random":
        return random_split(weights, 2**cfg.r, cfg.seed)
    if cfg.strategy == "kmeans":
        return kmeans_split(c, weights, 2**cfg.r, cfg.seed)
    raise ValueError(f"unknown split strategy {cfg.strategy!r}; expected pca, random or kmeans")
