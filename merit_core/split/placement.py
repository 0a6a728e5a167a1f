"""Placing new sources into an existing PCA partition, and how far the conflict
structure moved (incremental runs, docs/incremental.md).

:func:`pca_split` cuts the sources at weighted medians of their PCA scores. To add a
source to a finished split *with the same rule*, keep what the cut was made of:

- the PCA axes of the column-centred C (column means μ (T,) and sign-fixed loadings
  V (r, T), the same sklearn PCA and sign convention as :func:`pca_split`);
- one threshold per cut: the node with binary prefix p (level ``len(p)``) splits its
  sources at θ_p, half-way between the highest score of its lower half and the lowest
  of its upper half on PC ``len(p)+1``.

A new source's feature vector x (T,) is its row of C against the T sources the axes
were fitted on; its scores are z = V (x − μ) (what ``PCA.transform`` computes), and it
descends the cut tree: bit b_l = [z_l ≥ θ_prefix], group index = the bits read as a
binary number (the group order of :func:`pca_split`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from merit_core.split.inputs import check_matrix

__all__ = ["SplitAxes", "fit_axes", "max_principal_angle_deg"]


@dataclass(frozen=True)
class SplitAxes:
    """The PCA axes and cut thresholds of a finished PCA partition (module docstring).

    Attributes:
        mean: (T,) column means μ of C (float64).
        components: (r, T) sign-fixed loadings V (float64).
        thresholds: binary prefix of a cut-tree node ("" is the root) -> θ_p.
    """

    mean: np.ndarray
    components: np.ndarray
    thresholds: dict[str, float]

    @property
    def r(self) -> int:
        """Number of PCs / cut levels."""
        return int(self.components.shape[0])

    def project(self, features: Any) -> np.ndarray:
        """Scores z = (x − μ) Vᵀ of feature rows x.

        Args:
            features: (m, T) rows of C of m sources against the T fitted sources.

        Returns:
            (m, r) float64 scores.

        Raises:
            ValueError: not (m, T) or not finite.
        """
        x = np.atleast_2d(np.asarray(features, dtype=np.float64))
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"SplitAxes.project: features have {x.shape[1]} columns, the axes were fitted on "
                             f"T = {self.mean.shape[0]} sources")
        if not np.isfinite(x).all():
            raise ValueError("SplitAxes.project: features contain NaN or Inf")
        return (x - self.mean) @ self.components.T

    def place(self, scores: Any) -> list[int]:
        """Group index of each row of (m, r) ``scores``, by descending the cut tree."""
        out = []
        for z in np.atleast_2d(np.asarray(scores, dtype=np.float64)):
            prefix = ""
            for level in range(self.r):
                prefix += "1" if z[level] >= self.thresholds[prefix] else "0"
            out.append(int(prefix, 2) if prefix else 0)
        return out

    def to_json(self) -> dict:
        """JSON-able form (lists of floats); :meth:`from_json` reads it back."""
        return {"mean": self.mean.tolist(), "components": self.components.tolist(), "thresholds": self.thresholds}

    @classmethod
    def from_json(cls, data: dict) -> SplitAxes:
        """Inverse of :meth:`to_json`."""
        return cls(np.asarray(data["mean"], dtype=np.float64), np.asarray(data["components"], dtype=np.float64),
                   {str(k): float(v) for k, v in data["thresholds"].items()})


def fit_axes(c: Any, groups: Sequence[Sequence[int]], r: int) -> tuple[SplitAxes, np.ndarray]:
    """The axes and thresholds behind a :func:`pca_split` partition of C.

    The PCA is the one :func:`pca_split` runs (``sklearn.decomposition.PCA``, full SVD,
    each component flipped so that its largest |loading|, first on ties, is positive);
    the thresholds come from ``groups`` themselves, so placing one of the T fitted
    sources again gives back its own group.

    Args:
        c: (T, T) conflict matrix the partition was made from.
        groups: K = 2^r groups of source indices in :func:`pca_split`'s order.
        r: number of PCs (≥ 1).

    Returns:
        (axes, scores): :class:`SplitAxes` and the (T, r) scores of the fitted sources.

    Raises:
        ValueError: bad C, r < 1, or not 2^r groups.
    """
    from sklearn.decomposition import PCA

    c = check_matrix(c)
    t = c.shape[0]
    if r < 1 or len(groups) != 2**r:
        raise ValueError(f"fit_axes: need r ≥ 1 and 2^r groups, got r = {r} and {len(groups)} groups")
    pca = PCA(n_components=r, svd_solver="full").fit(c)
    comps = pca.components_.astype(np.float64).copy()
    for k in range(r):
        a = np.abs(comps[k])
        j = int(np.flatnonzero(a >= a.max() * (1 - 1e-9))[0])
        if comps[k, j] < 0:
            comps[k] *= -1
    mean = pca.mean_.astype(np.float64)
    scores = (c - mean) @ comps.T
    group_of = np.empty(t, dtype=int)
    for k, g in enumerate(groups):
        group_of[list(g)] = k
    bits = [format(k, f"0{r}b") for k in group_of]
    thresholds: dict[str, float] = {}
    for level in range(r):
        for prefix in sorted({b[:level] for b in bits}):
            lower = [i for i in range(t) if bits[i].startswith(prefix + "0")]
            upper = [i for i in range(t) if bits[i].startswith(prefix + "1")]
            if not lower or not upper:
                raise ValueError(f"fit_axes: cut {prefix!r} has an empty side; groups are not a pca_split result")
            thresholds[prefix] = 0.5 * (float(scores[lower, level].max()) + float(scores[upper, level].min()))
    return SplitAxes(mean, comps, thresholds), scores


def max_principal_angle_deg(a: Any, b: Any) -> float:
    """Largest principal angle, in degrees, between the column spans of ``a`` and ``b``
    (``scipy.linalg.subspace_angles``); both (n, r) on the same n sources.

    Used as "how far the conflict structure moved": ``a`` the stored top-r scores of the
    sources a finished run split, ``b`` their top-r scores in the new C. 0° means the
    same r-dimensional arrangement, 90° an orthogonal one. A span that has lost rank
    (all-zero scores) counts as 90°.
    """
    from scipy.linalg import subspace_angles

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"max_principal_angle_deg: shapes differ, {a.shape} vs {b.shape}")
    if np.linalg.matrix_rank(a) < a.shape[1] or np.linalg.matrix_rank(b) < b.shape[1]:
        return 90.0
    return float(math.degrees(float(np.max(subspace_angles(a, b)))))
