"""The baseline partitions of the sources: random (balanced) and K-means."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from merit_core.split.inputs import check_group_count, check_matrix, check_weights
from merit_core.split.pca import pca_scores, tie_key
from merit_core.split.result import SplitResult

__all__ = ["kmeans_split", "random_placement", "random_split"]


def random_split(weights: Any, k: int, seed: int = 0) -> SplitResult:
    """Baseline: random partition into K groups, balanced by weight, seeded.

    Sources are visited in a random order (``numpy.random.default_rng(seed)``) and
    each goes to the currently lightest group (lowest index on ties). The first K
    sources therefore land in K distinct groups (none empty), and the heaviest and
    lightest groups differ by at most the largest single weight. Groups are returned
    sorted by their smallest source index.

    Raises:
        ValueError: bad weights, K < 1 or K > T.
    """
    w = check_weights(weights, len(np.atleast_1d(np.asarray(weights))))
    t = w.shape[0]
    k = int(k)
    check_group_count(k, t, "random_split")
    order = np.random.default_rng(seed).permutation(t)
    groups: list[list[int]] = [[] for _ in range(k)]
    load = np.zeros(k)
    for i in order:
        g = int(np.argmin(load))
        groups[g].append(int(i))
        load[g] += w[i]
    groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
    return SplitResult(groups, "random", w)


def random_placement(loads: Any, weights: Any, seeds: Sequence[Any]) -> list[int]:
    """Extend a random balanced split by new sources with :func:`random_split`'s own rule
    (an incremental run's random-split baseline, docs/incremental.md).

    The new sources are visited in a random order and each joins the currently lightest
    group, as in :func:`random_split`; the randomness of source i comes from its own
    generator ``numpy.random.default_rng(seeds[i])`` (its first draw is its place in the
    order, its second breaks a tie between equally light groups), so the placement of a
    source does not depend on which others are new. Joining the lightest group keeps the
    spread of the loads (heaviest − lightest) at most max(spread before, largest new
    weight): the balance bound of :func:`random_split`.

    Args:
        loads: (K,) current weight of each group (0 for an empty group).
        weights: (n,) weight of each new source.
        seeds: n seeds (anything ``default_rng`` takes), one per new source.

    Returns:
        n group indices in 0 .. K−1, source i's group at position i.

    Raises:
        ValueError: bad weights, no group, negative or non-finite loads, or a seed count
            other than n.
    """
    load = np.array(loads, dtype=np.float64).reshape(-1)
    if load.size == 0 or not np.all(np.isfinite(load)) or np.any(load < 0):
        raise ValueError(f"random_placement: loads must be K ≥ 1 finite non-negative numbers, got {load.tolist()}")
    n = len(seeds)
    if n == 0:
        return []
    w = check_weights(weights, n)
    rngs = [np.random.default_rng(s) for s in seeds]
    order = np.argsort([r.random() for r in rngs], kind="stable")
    groups = [0] * n
    for i in order:
        lightest = np.flatnonzero(load == load.min())
        g = int(lightest[0] if lightest.size == 1 else rngs[i].choice(lightest))
        groups[i] = g
        load[g] += w[i]
    return groups


def kmeans_split(
    c: Any, weights: Any, k: int, seed: int = 0, *, n_components: int | None = None, n_init: int = 10
) -> SplitResult:
    """Baseline: weighted K-means on the PCA scores of the column-centred C.

    The representation is the one MERIT splits on: the top ``n_components`` PCA scores
    (default ``max(1, ceil(log2 K))``, i.e. r for K = 2^r; capped at T), sign-fixed as
    in :func:`pca_split`. ``sklearn.cluster.KMeans(n_clusters=K, n_init=n_init,
    random_state=seed)`` with ``sample_weight = weights``. Groups are not balanced.
    Groups are returned sorted by their smallest source index.

    Raises:
        ValueError: same input checks as :func:`pca_split`; K < 1 or K > T; and when
            K-means leaves a cluster empty (fewer than K distinct points in the
            representation) — no silent fallback.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    c = check_matrix(c)
    t = c.shape[0]
    w = check_weights(weights, t)
    k = int(k)
    check_group_count(k, t, "kmeans_split")
    if n_components is None:
        n_components = max(1, int(np.ceil(np.log2(k))))
    n_components = min(int(n_components), t)
    scores, evr = pca_scores(c, n_components, "max_loading")
    if k == 1:
        groups = [list(range(t))]
    else:
        with warnings.catch_warnings():  # too few distinct points: reported below as ValueError
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(scores, sample_weight=w)
        groups = [sorted(np.flatnonzero(labels == g).tolist()) for g in range(k)]
        if any(not g for g in groups):
            n_distinct = len(np.unique(tie_key(scores), axis=0))
            raise ValueError(
                f"kmeans_split: K-means left {sum(not g for g in groups)} of K = {k} clusters empty "
                f"({n_distinct} distinct points in the {n_components}-D PCA representation)"
            )
        groups.sort(key=lambda g: g[0])
    return SplitResult(groups, "kmeans", w, scores, evr)
