"""The numeric result of the partition functions, and its named form.

:class:`SplitResult` works with source indices and numpy arrays (what the maths
needs); :meth:`SplitResult.partition` turns it into the
:class:`~merit_core.refs.Partition` (source names, JSON) that stages exchange
and the store and reports hold. Partition is the only serialised partition type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from merit_core.refs import Partition


@dataclass(frozen=True, eq=False)
class SplitResult:
    """A partition of sources ``0 .. T-1`` into K groups (spec step 3).

    Attributes:
        groups: K groups, each a sorted list of source indices; disjoint, covering
            every source, none empty.
        method: ``"pca"``, ``"random"`` or ``"kmeans"``.
        weights: (T,) float64 per-source sizes (examples or loss tokens) the groups
            were balanced by.
        scores: (T, r) float64 PCA scores (sign-fixed), or None (random; r = 0).
        explained_variance_ratio: (r,) float64, or None with ``scores``.
    """

    groups: list[list[int]]
    method: str
    weights: np.ndarray
    scores: np.ndarray | None = None
    explained_variance_ratio: np.ndarray | None = None

    @property
    def k(self) -> int:
        """Number of groups K."""
        return len(self.groups)

    @property
    def n_sources(self) -> int:
        """Number of sources T."""
        return len(self.weights)

    @property
    def group_weights(self) -> list[float]:
        """Total weight of each group (same order as ``groups``)."""
        return [float(self.weights[g].sum()) for g in self.groups]

    def partition(self, names: Sequence[str]) -> Partition:
        """The partition with sources named: ``names[i]`` is source i (row i of C).

        Returns:
            :class:`~merit_core.refs.Partition` with groups of names, ``weights``
            name -> weight (in ``names`` order) and the scores as nested lists.

        Raises:
            ValueError: ``len(names) != n_sources``.
        """
        if len(names) != self.n_sources:
            raise ValueError(f"SplitResult.partition: got {len(names)} names for {self.n_sources} sources")
        return Partition(
            method=self.method,
            groups=[[names[i] for i in g] for g in self.groups],
            weights={n: float(w) for n, w in zip(names, self.weights)},
            scores=None if self.scores is None else self.scores.tolist(),
            explained_variance_ratio=None
            if self.explained_variance_ratio is None
            else self.explained_variance_ratio.tolist(),
        )
