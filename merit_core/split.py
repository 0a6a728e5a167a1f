"""Splitting T sources into K = 2^r groups (MERIT spec steps 2–3, Algorithm 1).

- :func:`pca_split` — the method: column-centred PCA of the conflict matrix C (rows =
  sources as feature vectors), top-r scores with a deterministic sign, then recursive
  50/50 splits at the weighted median along PC1, PC2 inside each half, … .
- :func:`random_split`, :func:`kmeans_split` — the baselines, same return type.
- :func:`split_sources` — dispatch on :class:`~merit_core.config.SplitConfig`.

Weights are per-source sizes: examples (``split.balance = "samples"``, the default)
or loss tokens (``"tokens"``); the caller passes whichever it wants balanced.

Group order of :func:`pca_split`: group k's binary digits, most significant first,
say which half the sources fell in at each level (0 = lower scores on that PC, 1 =
higher). For r = 2: [PC1-low & PC2-low, PC1-low & PC2-high, PC1-high & PC2-low,
PC1-high & PC2-high].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from merit_core.config import SplitConfig

__all__ = ["SplitResult", "conflict_structure", "kmeans_split", "pca_split", "random_split", "split_score",
           "split_sources"]

_SYM_TOL = 1e-6  # max |C - Cᵀ| allowed, relative to max(1, max |C|)
_TIE_DIGITS = 10  # scores equal to 10 significant digits count as ties (broken by index)


@dataclass
class SplitResult:
    """A partition of sources ``0 .. n_sources-1`` into groups.

    Attributes:
        groups: list of K groups, each a sorted list of source indices; disjoint,
            covering every source, none empty.
        method: ``"pca"``, ``"random"`` or ``"kmeans"``.
        n_sources: T (default: the number of indices in ``groups``).
        group_weights: total weight of each group (same order as ``groups``).
        scores: (T, r) float64 PCA scores (sign-fixed) or None (random, r = 0).
        explained_variance_ratio: (r,) float64 or None.
        params: settings that produced the split (r, K, seed, sign, …), JSON-friendly.
    """

    groups: list[list[int]]
    method: str
    n_sources: int = -1
    group_weights: list[float] = field(default_factory=list)
    scores: np.ndarray | None = None
    explained_variance_ratio: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_sources < 0:
            self.n_sources = sum(len(g) for g in self.groups)

    @property
    def k(self) -> int:
        """Number of groups."""
        return len(self.groups)

    def labels(self) -> np.ndarray:
        """(T,) int array: the group index of every source."""
        out = np.full(self.n_sources, -1, dtype=np.int64)
        for g, members in enumerate(self.groups):
            out[members] = g
        return out

    def named(self, names: list[str]) -> list[list[str]]:
        """Groups as source names; ``names[i]`` is source i.

        Raises:
            ValueError: ``len(names) != n_sources``.
        """
        if len(names) != self.n_sources:
            raise ValueError(f"SplitResult.named: got {len(names)} names for {self.n_sources} sources")
        return [[names[i] for i in g] for g in self.groups]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (lists and floats); inverse of :meth:`from_dict`."""
        return {
            "groups": [[int(i) for i in g] for g in self.groups],
            "method": self.method,
            "n_sources": int(self.n_sources),
            "group_weights": [float(w) for w in self.group_weights],
            "scores": None if self.scores is None else self.scores.tolist(),
            "explained_variance_ratio": None
            if self.explained_variance_ratio is None
            else self.explained_variance_ratio.tolist(),
            "params": dict(self.params),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplitResult":
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            groups=[list(map(int, g)) for g in d["groups"]],
            method=d["method"],
            n_sources=int(d["n_sources"]),
            group_weights=[float(w) for w in d.get("group_weights", [])],
            scores=None if d.get("scores") is None else np.asarray(d["scores"], dtype=np.float64),
            explained_variance_ratio=None
            if d.get("explained_variance_ratio") is None
            else np.asarray(d["explained_variance_ratio"], dtype=np.float64),
            params=dict(d.get("params", {})),
        )


# --------------------------------------------------------------------------- checks


def _check_matrix(c: Any) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"conflict matrix must be square (T, T), got shape {c.shape}")
    if c.shape[0] < 1:
        raise ValueError("conflict matrix is empty (T = 0)")
    if not np.isfinite(c).all():
        i, j = np.argwhere(~np.isfinite(c))[0]
        raise ValueError(f"conflict matrix contains NaN or Inf (first at [{i}, {j}])")
    asym = np.abs(c - c.T)
    tol = _SYM_TOL * max(1.0, float(np.abs(c).max()))
    if asym.max() > tol:
        i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
        raise ValueError(
            f"conflict matrix is not symmetric: |C[{i},{j}] - C[{j},{i}]| = {asym[i, j]:.3g} > {tol:.3g}"
        )
    return 0.5 * (c + c.T)


def _check_weights(weights: Any, t: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != t:
        raise ValueError(f"weights must have one entry per source ({t}), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"weights must be finite; source {int(np.flatnonzero(~np.isfinite(w))[0])} is not")
    if (w <= 0).any():
        i = int(np.flatnonzero(w <= 0)[0])
        raise ValueError(f"weights must be > 0; source {i} has weight {w[i]}")
    return w


def _check_k(k: int, t: int, what: str) -> None:
    if k > t:
        raise ValueError(f"{what} asks for K = {k} groups but there are only T = {t} sources (need K ≤ T)")


def _group_weights(groups: list[list[int]], w: np.ndarray) -> list[float]:
    return [float(w[g].sum()) for g in groups]


# --------------------------------------------------------------------------- PCA


def _pca_scores(c: np.ndarray, r: int, sign: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-r scores (T, r) and explained-variance ratios (r,) of column-centred C."""
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


def _tie_key(x: np.ndarray) -> np.ndarray:
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
    """MERIT split: PCA of C, then recursive weighted-median splits (spec steps 2–3).

    Column-centre C (rows = sources as feature vectors) and take the top-r principal
    component scores (``sklearn.decomposition.PCA``). Sign convention
    (``sign="max_loading"``): each component is flipped so that its entry of largest
    |loading| (first one on ties) is positive; ``sign="sklearn"`` keeps scikit-learn's.
    Then split all sources at the weighted median of their PC1 score, each half at
    the weighted median of its own sources' PC2 scores (global PCA), and so on, down to
    K = 2^r groups. A split sorts its sources by score (ties, to 10 significant digits,
    by index) and cuts where |w_lower - w_upper| is smallest, subject to each half
    keeping at least 2^(levels left) sources; when that count constraint does not bind
    (e.g. weights of similar size, T well above K), the two halves differ by at most
    the largest single weight of the subgroup. Every source goes wholly to one group.
    r = 0 gives one group (joint training).

    Args:
        c: (T, T) conflict matrix, symmetric (within 1e-6 relative), finite.
        weights: (T,) positive source sizes (examples or tokens).
        r: number of principal components / split levels, K = 2^r ≤ T.
        sign: ``"max_loading"`` (default) or ``"sklearn"``.

    Returns:
        :class:`SplitResult` with ``method="pca"``, groups in the order described in
        the module docstring, ``scores`` (T, r) and ``explained_variance_ratio`` (r,)
        (both None when r = 0).

    Raises:
        ValueError: C not square / not symmetric / NaN or Inf; weights of the wrong
            length, non-finite or ≤ 0; r < 0 (or not an int); K = 2^r > T; bad sign.
    """
    c = _check_matrix(c)
    t = c.shape[0]
    w = _check_weights(weights, t)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise ValueError(f"r must be an integer ≥ 0, got {r!r}")
    r = int(r)
    _check_k(2**r, t, f"r = {r}")
    if sign not in ("max_loading", "sklearn"):
        raise ValueError(f"sign must be 'max_loading' or 'sklearn', got {sign!r}")
    params = {"r": r, "k": 2**r, "sign": sign}
    if r == 0:
        groups = [list(range(t))]
        return SplitResult(groups, "pca", t, _group_weights(groups, w), None, None, params)

    scores, evr = _pca_scores(c, r, sign)
    keys = _tie_key(scores)

    def split(members: list[int], level: int) -> list[list[int]]:
        if level == r:
            return [sorted(members)]
        order = sorted(members, key=lambda i: (keys[i, level], i))
        cut = _median_cut(order, w, 2 ** (r - level - 1))
        return split(order[:cut], level + 1) + split(order[cut:], level + 1)

    groups = split(list(range(t)), 0)
    return SplitResult(groups, "pca", t, _group_weights(groups, w), scores, evr, params)


# --------------------------------------------------------------------------- baselines


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
    w = _check_weights(weights, len(np.atleast_1d(np.asarray(weights))))
    t = w.shape[0]
    k = int(k)
    if k < 1:
        raise ValueError(f"K must be ≥ 1, got {k}")
    _check_k(k, t, "random_split")
    order = np.random.default_rng(seed).permutation(t)
    groups: list[list[int]] = [[] for _ in range(k)]
    load = np.zeros(k)
    for i in order:
        g = int(np.argmin(load))
        groups[g].append(int(i))
        load[g] += w[i]
    groups = sorted((sorted(g) for g in groups), key=lambda g: g[0])
    params = {"k": k, "seed": int(seed)}
    return SplitResult(groups, "random", t, _group_weights(groups, w), None, None, params)


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

    c = _check_matrix(c)
    t = c.shape[0]
    w = _check_weights(weights, t)
    k = int(k)
    if k < 1:
        raise ValueError(f"K must be ≥ 1, got {k}")
    _check_k(k, t, "kmeans_split")
    if n_components is None:
        n_components = max(1, int(np.ceil(np.log2(k))))
    n_components = min(int(n_components), t)
    scores, evr = _pca_scores(c, n_components, "max_loading")
    params = {"k": k, "seed": int(seed), "n_components": n_components, "n_init": n_init}
    if k == 1:
        groups = [list(range(t))]
    else:
        with warnings.catch_warnings():  # too few distinct points: reported below as ValueError
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(scores, sample_weight=w)
        groups = [sorted(np.flatnonzero(labels == g).tolist()) for g in range(k)]
        if any(not g for g in groups):
            n_distinct = len(np.unique(_tie_key(scores), axis=0))
            raise ValueError(
                f"kmeans_split: K-means left {sum(not g for g in groups)} of K = {k} clusters empty "
                f"({n_distinct} distinct points in the {n_components}-D PCA representation)"
            )
        groups.sort(key=lambda g: g[0])
    return SplitResult(groups, "kmeans", t, _group_weights(groups, w), scores, evr, params)


def split_sources(c: Any, weights: Any, cfg: SplitConfig) -> SplitResult:
    """Dispatch on ``cfg.strategy`` with K = 2^cfg.r: ``pca`` → :func:`pca_split`,
    ``random`` → :func:`random_split` (C unused, may be None), ``kmeans`` →
    :func:`kmeans_split`; ``cfg.seed`` seeds the baselines. ``cfg.balance`` is the
    caller's business: pass sample counts or token counts as ``weights``."""
    if cfg.strategy == "pca":
        return pca_split(c, weights, cfg.r)
    if cfg.strategy == "random":
        return random_split(weights, 2**cfg.r, cfg.seed)
    if cfg.strategy == "kmeans":
        return kmeans_split(c, weights, 2**cfg.r, cfg.seed)
    raise ValueError(f"unknown split strategy {cfg.strategy!r}; expected pca, random or kmeans")


# --------------------------------------------------------------------------- split score


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
    c = _check_matrix(c)
    t = c.shape[0]
    w = _check_weights(weights, t)
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

    c = _check_matrix(c)
    t = c.shape[0]
    w = _check_weights(weights, t)
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
