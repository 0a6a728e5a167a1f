"""How much a partition of the sources separates their gradients (split scores for the
study report; MERIT_SPEC "Theory")."""

from __future__ import annotations

from typing import Any

import numpy as np

from merit_core.split.baselines import random_split
from merit_core.split.inputs import check_matrix, check_weights

__all__ = ["conflict_structure", "split_score"]


def split_score(c: Any, weights: Any, groups: list[list[int]]) -> float:
    """Share of the sources' gradient scatter that a partition puts *between* groups.

    MERIT_SPEC "Theory": the merge gain is the curvature-weighted variance of the
    branch displacements, and for a balanced ±1 assignment s it is ∝ sᵀ M s with
    M_ij = g_iᵀ H g_j; the gradient Gram matrix is the cheap proxy for M (H ≈ I). With
    C the Gram matrix of the normalised gradients g̃_t (the cosine conflict matrix) and
    weights w_t, the group means μ_k = Σ_{t∈k} w_t g̃_t / W_k and the overall mean μ give

        between = Σ_k W_k ||μ_k||² − W ||μ||²,   total = Σ_t w_t C_tt − W ||μ||²,

    all computed from C alone (||μ_k||² = Σ_{i,j∈k} w_i w_j C_ij / W_k²). The score is
    between / total ∈ [0, 1]: 0 when every group has the same mean gradient (branches
    would move alike, nothing to gain from splitting), 1 when the sources inside each
    group share one gradient direction. For K = 2 and equal weights it is an affine
    function of sᵀ C s. A conflict-aware split should score above random splits.

    Args:
        c: (T, T) symmetric Gram/cosine matrix.
        weights: (T,) positive source weights (examples or tokens).
        groups: disjoint lists of source indices covering 0..T−1.

    Raises:
        ValueError: bad C or weights; groups that do not cover every source exactly once.
    """
    c = check_matrix(c)
    t = c.shape[0]
    w = check_weights(weights, t)
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(t)):
        raise ValueError(f"split_score: groups must cover sources 0..{t - 1} exactly once, got {groups}")
    big_w = w.sum()
    mean_sq = float(w @ c @ w) / big_w**2
    total = float(w @ np.diag(c)) - big_w * mean_sq
    between = -big_w * mean_sq
    for g in groups:
        wg = w[g]
        between += float(wg @ c[np.ix_(g, g)] @ wg) / wg.sum()
    return between / total if total > 0 else 0.0


def conflict_structure(c: Any, weights: Any, partitions: dict[int, list[list[int]]], *, n_random: int = 1000,
                       seed: int = 0, n_components: int = 8) -> dict[str, Any]:
    """How much structure the conflict matrix offers a split (for the study report).

    Returns a JSON-friendly dict:

    - ``negative_share``: fraction of off-diagonal entries C_ij < 0 (i ≠ j);
    - ``offdiag``: min, median, max of the off-diagonal entries;
    - ``explained_variance_ratio``: of the top ``n_components`` PCs of column-centred C
      (sklearn PCA, as the split uses);
    - ``splits``: per r of ``partitions`` (r -> groups): the partition's
      :func:`split_score`, and the scores of ``n_random`` random splits into the same
      K (:func:`random_split`, seeds ``seed`` .. ``seed + n_random − 1``): mean, std,
      and the share of random splits the partition beats (its percentile).

    Raises:
        ValueError: bad C or weights.
    """
    from sklearn.decomposition import PCA

    c = check_matrix(c)
    t = c.shape[0]
    w = check_weights(weights, t)
    off = c[~np.eye(t, dtype=bool)]
    evr = PCA(n_components=min(n_components, t)).fit(c).explained_variance_ratio_ if t > 1 else np.array([1.0])
    splits = {}
    for r, groups in partitions.items():
        k = len(groups)
        score = split_score(c, w, groups)
        rnd = np.array([split_score(c, w, random_split(w, k, seed + i).groups) for i in range(n_random)])
        splits[str(r)] = {"k": k, "score": score, "random_mean": float(rnd.mean()), "random_std": float(rnd.std()),
                          "beats_random": float((rnd < score).mean()), "n_random": n_random}
    return {
        "negative_share": float((off < 0).mean()) if off.size else 0.0,
        "offdiag": {"min": float(off.min()), "median": float(np.median(off)), "max": float(off.max())}
        if off.size else None,
        "explained_variance_ratio": [float(v) for v in evr],
        "splits": splits,
    }
