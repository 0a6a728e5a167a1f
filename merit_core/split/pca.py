"""MERIT's partition of the sources: PCA of C, then recursive weighted-median halving
(MERIT spec steps 2–3, Algorithm 1).

Column-centred PCA of the conflict matrix C (rows = sources as feature vectors), top-r
scores with a deterministic sign, then recursive 50/50 cuts at the weighted median
along PC1, PC2 inside each half, … down to K = 2^r groups.

Group order of :func:`pca_split`: group k's binary digits, most significant first,
say which half the sources fell in at each level (0 = lower scores on that PC, 1 =
higher). For r = 2: [PC1-low & PC2-low, PC1-low & PC2-high, PC1-high & PC2-low,
PC1-high & PC2-high].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from merit_core.split.inputs import check_group_count, check_matrix, check_weights
from merit_core.split.result import SplitResult

__all__ = ["pca_scores", "pca_split", "tie_key"]

_TIE_DIGITS = 10  # scores equal to 10 significant digits count as ties (broken by index)


def pca_scores(c: np.ndarray, r: int, sign: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-r scores (T, r) and explained-variance ratios (r,) of column-centred C, float64.

    ``sign="max_loading"`` flips each component so that its largest |loading| (first
    on ties) is positive; ``"sklearn"`` keeps scikit-learn's sign. A C whose columns
    are all constant (every source alike) gives zeros for both.
    """
    from sklearn.decomposition import PCA

    t = c.shape[0]
    centred = c - c.mean(axis=0, keepdims=True)
    if np.abs(centred).max() <= 1e-12 * max(1.0, float(np.abs(c).max())):
        # all sources look alike: no direction to split along; ties broken by index
        return np.zeros((t, r)), np.zeros(r)
    pca = PCA(n_components=r, svd_solver="full")
    scores = pca.fit_transform(c)
    components = pca.components_.copy()  # (r, T) loadings
    if sign == "max_loading":
        for k in range(r):
            a = np.abs(components[k])
            # first index whose |loading| is the maximum up to rounding: stable on ties
            j = int(np.flatnonzero(a >= a.max() * (1 - 1e-9))[0])
            if components[k, j] < 0:
                components[k] *= -1
                scores[:, k] *= -1
    evr = np.nan_to_num(np.asarray(pca.explained_variance_ratio_, dtype=np.float64))
    return np.asarray(scores, dtype=np.float64), evr


def tie_key(x: np.ndarray) -> np.ndarray:
    """``x`` scaled by its max |entry| and rounded to 10 digits: scores equal up to
    rounding sort as ties (then broken by source index)."""
    scale = float(np.abs(x).max()) or 1.0
    return np.round(x / scale, _TIE_DIGITS)


def _median_cut(order: list[int], w: np.ndarray, min_side: int) -> int:
    """Number of sources (in ``order``) that go to the lower half.

    The cut minimises |w_lower - w_upper| among cuts leaving ≥ ``min_side`` sources on
    each side (first minimiser on ties). Without that count constraint the difference
    is at most the largest single weight of the subgroup.
    """
    cum = np.cumsum(w[order])
    total = cum[-1]
    cuts = np.arange(min_side, len(order) - min_side + 1)
    diff = np.abs(2 * cum[cuts - 1] - total)
    return int(cuts[int(np.argmin(diff))])


def pca_split(c: Any, weights: Any, r: int, *, sign: str = "max_loading") -> SplitResult:
    """MERIT's partition: PCA of C, then recursive weighted-median halving (spec steps 2–3).

    Column-centre C (rows = sources as feature vectors) and take the top-r principal
    component scores (``sklearn.decomposition.PCA``). Sign convention
    (``sign="max_loading"``): each component is flipped so that its entry of largest
    |loading| (first one on ties) is positive; ``sign="sklearn"`` keeps scikit-learn's.
    Then cut all sources in two at the weighted median of their PC1 score, each half at
    the weighted median of its own sources' PC2 scores (global PCA), and so on, down to
    K = 2^r groups. A cut sorts its sources by score (ties, to 10 significant digits,
    by index) and falls where |w_lower - w_upper| is smallest, subject to each half
    keeping at least 2^(levels left) sources; when that count constraint does not bind
    (e.g. weights of similar size, T well above K), the two halves differ by at most
    the largest single weight of the subgroup. Every source goes wholly to one group.
    r = 0 gives one group (joint training).

    Args:
        c: (T, T) conflict matrix, symmetric (within 1e-6 relative), finite.
        weights: (T,) positive source sizes (examples or tokens).
        r: number of principal components / halving levels, K = 2^r ≤ T.
        sign: ``"max_loading"`` (default) or ``"sklearn"``.

    Returns:
        :class:`SplitResult` with ``method="pca"``, groups in the order described in
        the module docstring, ``scores`` (T, r) and ``explained_variance_ratio`` (r,)
        (both None when r = 0).

    Raises:
        ValueError: C not square / not symmetric / NaN or Inf; weights of the wrong
            length, non-finite or ≤ 0; r < 0 (or not an int); K = 2^r > T; bad sign.
    """
    c = check_matrix(c)
    t = c.shape[0]
    w = check_weights(weights, t)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"r must be an integer ≥ 0, got {r!r}")
    r = int(r)
    check_group_count(2**r, t, f"r = {r}")
    if sign not in ("max_loading", "sklearn"):
        raise ValueError(f"sign must be 'max_loading' or 'sklearn', got {sign!r}")
    if r == 0:
        return SplitResult([list(range(t))], "pca", w)

    scores, evr = pca_scores(c, r, sign)
    keys = tie_key(scores)

    def halve(members: list[int], level: int) -> list[list[int]]:
        if level == r:
            return [sorted(members)]
        order = sorted(members, key=lambda i: (keys[i, level], i))
        cut = _median_cut(order, w, 2 ** (r - level - 1))
        return halve(order[:cut], level + 1) + halve(order[cut:], level + 1)

    groups = halve(list(range(t)), 0)
    return SplitResult(groups, "pca", w, scores, evr)
