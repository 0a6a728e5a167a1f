"""PCA + recursive weighted-median split and the baselines (merit_core.split)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from merit_core.config import SplitConfig
from merit_core.refs import Partition
from merit_core.split import (
    SplitResult,
    kmeans_split,
    pca_split,
    random_split,
    split_sources,
)


def random_cosine(rng: np.random.Generator, t: int, d: int = 40, rank: int | None = None) -> np.ndarray:
    """Cosine matrix of t random vectors (symmetric PSD, unit diagonal)."""
    basis = rng.normal(size=(rank or d, d))
    g = rng.normal(size=(t, rank or d)) @ basis + 0.3 * rng.normal(size=(t, d))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g @ g.T


def reference_scores(c: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent PCA by numpy SVD of the column-centred C, max-|loading| positive."""
    centred = c - c.mean(axis=0)
    _, s, vt = np.linalg.svd(centred)
    vt = vt[:r].copy()
    for k in range(r):
        j = int(np.argmax(np.abs(vt[k])))
        vt[k] *= np.sign(vt[k, j])
    return centred @ vt.T, (s**2 / np.sum(s**2))[:r]


def check_partition(res: SplitResult, t: int, k: int) -> None:
    assert res.k == k and res.n_sources == t
    flat = [i for g in res.groups for i in g]
    assert sorted(flat) == list(range(t))  # disjoint and covering
    assert all(g and g == sorted(g) for g in res.groups)


def check_recursive(groups, scores, w, r, strict_bound: bool, level: int = 0) -> None:
    """Groups in pca_split order: first half of the list = lower half at this level.

    Checks, at every split: lower scores ≤ upper scores on PC `level`; the cut is the
    best contiguous cut that leaves each half enough sources for the remaining levels;
    and the halves differ by at most the largest single weight (always when
    `strict_bound`, else whenever the unconstrained best cut is feasible).
    """
    if level == r:
        assert len(groups) == 1
        return
    half = len(groups) // 2
    lower = [i for g in groups[:half] for i in g]
    upper = [i for g in groups[half:] for i in g]
    assert scores[lower, level].max() <= scores[upper, level].min() + 1e-9
    members = lower + upper
    order = sorted(members, key=lambda i: scores[i, level])
    ws = w[order]
    need = 2 ** (r - level - 1)
    diffs = {c: abs(ws[:c].sum() - ws[c:].sum()) for c in range(1, len(order))}
    feasible = {c: d for c, d in diffs.items() if need <= c <= len(order) - need}
    got = abs(w[lower].sum() - w[upper].sum())
    assert got <= min(feasible.values()) + 1e-9
    if strict_bound or min(feasible.values()) <= min(diffs.values()) + 1e-9:
        assert got <= w[members].max() + 1e-9
    check_recursive(groups[:half], scores, w, r, strict_bound, level + 1)
    check_recursive(groups[half:], scores, w, r, strict_bound, level + 1)


# --------------------------------------------------------------------------- pca_split


def test_rank1_two_opposed_clusters_separated_exactly():
    a, b = [0, 2, 5, 7], [1, 3, 4, 6]
    v = np.zeros(8)
    v[a], v[b] = 1.0, -1.0
    c = np.outer(v, v)  # rank 1: +1 within a cluster, -1 across
    res = pca_split(c, np.ones(8), r=1)
    check_partition(res, 8, 2)
    assert sorted(map(sorted, res.groups)) == [a, b]
    # sign convention: the first max-|loading| source (0) gets a positive score -> upper group
    assert res.groups == [b, a]
    assert res.scores.shape == (8, 1) and res.explained_variance_ratio[0] == pytest.approx(1.0)

    # unequal cluster sizes, equal cluster weights, plus symmetric noise
    rng = np.random.default_rng(0)
    a, b = [0, 1, 4], [2, 3, 5, 6, 7, 8, 9]
    v = np.zeros(10)
    v[a], v[b] = 1.0, -1.0
    noise = rng.normal(scale=0.05, size=(10, 10))
    c = np.outer(v, v) + (noise + noise.T) / 2
    w = np.ones(10)
    w[a] = 7 / 3
    res = pca_split(c, w, r=1)
    assert sorted(map(sorted, res.groups)) == [a, b]


@pytest.mark.parametrize("seed", range(30))
def test_pca_split_properties_random_psd(seed):
    rng = np.random.default_rng(seed)
    r = [1, 2, 3][seed % 3]
    t = int(rng.integers(2**r, 40))
    c = random_cosine(rng, t, rank=int(rng.integers(2, 6)))
    w = rng.integers(1, 500, size=t).astype(float)  # any positive weights
    res = pca_split(c, w, r)
    check_partition(res, t, 2**r)
    assert res.method == "pca" and res.scores.shape == (t, r) and res.explained_variance_ratio.shape == (r,)
    ref_scores, ref_evr = reference_scores(c, r)
    np.testing.assert_allclose(res.scores, ref_scores, atol=1e-8)
    np.testing.assert_allclose(res.explained_variance_ratio, ref_evr, atol=1e-10)
    assert res.group_weights == pytest.approx([w[g].sum() for g in res.groups])
    check_recursive(res.groups, res.scores, w, r, strict_bound=False)


@pytest.mark.parametrize("seed", range(10))
def test_pca_split_weight_bound_holds_at_every_split(seed):
    # weights of similar size and T well above K: the count constraint never binds,
    # so each split's halves differ by at most the largest single weight
    rng = np.random.default_rng(100 + seed)
    r = 3
    t = int(rng.integers(48, 80))
    c = random_cosine(rng, t)
    w = rng.uniform(1.0, 2.0, size=t)
    res = pca_split(c, w, r)
    check_partition(res, t, 8)
    check_recursive(res.groups, res.scores, w, r, strict_bound=True)


def test_pca_split_k_equals_t_and_r0():
    rng = np.random.default_rng(5)
    c = random_cosine(rng, 8)
    res = pca_split(c, np.arange(1, 9, dtype=float), r=3)
    check_partition(res, 8, 8)
    assert all(len(g) == 1 for g in res.groups)
    joint = pca_split(c, np.ones(8), r=0)
    assert joint.groups == [list(range(8))] and joint.scores is None and joint.explained_variance_ratio is None


def test_pca_split_deterministic_and_equivariant():
    rng = np.random.default_rng(7)
    t, r = 24, 2
    c = random_cosine(rng, t)
    w = rng.uniform(1, 3, size=t)
    res = pca_split(c, w, r)
    again = pca_split(c.copy(), w.copy(), r)
    assert again.groups == res.groups and np.array_equal(again.scores, res.scores)
    # scaling C does not change the split
    assert pca_split(2.5 * c, w, r).groups == res.groups
    # relabelling the sources relabels the groups, in the same group order: the sign
    # convention follows the data, not the source indices
    perm = rng.permutation(t)
    res_p = pca_split(c[np.ix_(perm, perm)], w[perm], r)
    assert [sorted(int(perm[i]) for i in g) for g in res_p.groups] == res.groups
    np.testing.assert_allclose(res_p.scores, res.scores[perm], atol=1e-8)


def test_pca_split_identical_sources_fall_back_to_index_order():
    res = pca_split(np.ones((4, 4)), np.ones(4), r=1)
    assert res.groups == [[0, 1], [2, 3]]
    assert np.all(res.scores == 0) and np.all(res.explained_variance_ratio == 0)


def test_pca_split_errors():
    c = random_cosine(np.random.default_rng(0), 6)
    w = np.ones(6)
    with pytest.raises(ValueError, match="must be square"):
        pca_split(np.ones((3, 4)), np.ones(3), 1)
    with pytest.raises(ValueError, match="must be square"):
        pca_split(np.ones(4), np.ones(4), 1)
    asym = c.copy()
    asym[0, 1] += 0.1
    with pytest.raises(ValueError, match=r"not symmetric: \|C\[0,1\] - C\[1,0\]\|"):
        pca_split(asym, w, 1)
    nan = c.copy()
    nan[2, 3] = nan[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at \[2, 3\]\)"):
        pca_split(nan, w, 1)
    inf = c.copy()
    inf[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        pca_split(inf, w, 1)
    with pytest.raises(ValueError, match=r"one entry per source \(6\)"):
        pca_split(c, np.ones(5), 1)
    with pytest.raises(ValueError, match="source 4 has weight 0"):
        pca_split(c, [1, 1, 1, 1, 0, 1], 1)
    with pytest.raises(ValueError, match="source 1 has weight -2"):
        pca_split(c, [1, -2, 1, 1, 1, 1], 1)
    with pytest.raises(ValueError, match="must be finite; source 0"):
        pca_split(c, [np.nan, 1, 1, 1, 1, 1], 1)
    with pytest.raises(ValueError, match="r must be an integer ≥ 0"):
        pca_split(c, w, -1)
    with pytest.raises(ValueError, match="r must be an integer ≥ 0"):
        pca_split(c, w, 1.5)
    with pytest.raises(ValueError, match=r"K = 8 groups but there are only T = 6"):
        pca_split(c, w, 3)
    with pytest.raises(ValueError, match="sign must be"):
        pca_split(c, w, 1, sign="random")


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_random_split_balanced_and_seeded(k):
    rng = np.random.default_rng(k)
    t = 20
    w = rng.integers(1, 100, size=t).astype(float)
    res = random_split(w, k, seed=3)
    check_partition(res, t, k)
    loads = [w[g].sum() for g in res.groups]
    assert max(loads) - min(loads) <= w.max()
    assert res.group_weights == pytest.approx(loads)
    assert random_split(w, k, seed=3).groups == res.groups
    if k > 1:
        assert len({json.dumps(random_split(w, k, seed=s).groups) for s in range(6)}) > 1
    assert res.method == "random" and res.scores is None


def test_random_split_errors():
    with pytest.raises(ValueError, match=r"K = 5 groups but there are only T = 4"):
        random_split(np.ones(4), 5, 0)
    with pytest.raises(ValueError, match="K must be ≥ 1"):
        random_split(np.ones(4), 0, 0)
    with pytest.raises(ValueError, match="source 2 has weight"):
        random_split([1, 1, 0, 1], 2, 0)


def _clustered(rng, sizes, d=30, noise=0.15):
    centres = rng.normal(size=(len(sizes), d))
    labels = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(len(labels))
    labels = labels[perm]
    g = centres[labels] + noise * rng.normal(size=(len(labels), d))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    truth = sorted(sorted(np.flatnonzero(labels == k).tolist()) for k in range(len(sizes)))
    return g @ g.T, truth


def test_kmeans_split_recovers_clusters():
    rng = np.random.default_rng(0)
    c, truth = _clustered(rng, [4, 5, 3])
    res = kmeans_split(c, rng.uniform(1, 3, size=12), k=3, seed=0)
    check_partition(res, 12, 3)
    assert sorted(res.groups) == truth and res.method == "kmeans"
    assert res.groups == sorted(res.groups, key=lambda g: g[0])
    c4, truth4 = _clustered(rng, [3, 3, 4, 2])
    res4 = kmeans_split(c4, np.ones(12), k=4, seed=1, n_components=3)
    assert sorted(res4.groups) == truth4
    assert kmeans_split(c4, np.ones(12), k=4, seed=1, n_components=3).groups == res4.groups
    c2, truth2 = _clustered(rng, [5, 7])
    assert sorted(kmeans_split(c2, np.ones(12), k=2, seed=0).groups) == truth2


def test_kmeans_split_errors():
    c = random_cosine(np.random.default_rng(1), 5)
    with pytest.raises(ValueError, match=r"K = 6 groups but there are only T = 5"):
        kmeans_split(c, np.ones(5), 6, 0)
    with pytest.raises(ValueError, match="not symmetric"):
        kmeans_split(c + np.triu(np.ones((5, 5)), 1), np.ones(5), 2, 0)
    # only two distinct sources: K-means cannot fill three clusters
    v = np.array([1.0, 1.0, 1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="clusters empty"):
        kmeans_split(np.outer(v, v), np.ones(5), 3, 0)


# --------------------------------------------------------------------------- result / dispatch


def test_split_result_partition_names_sources_and_keeps_the_json():
    c = random_cosine(np.random.default_rng(2), 6)
    w = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])
    res = pca_split(c, w, 1)
    names = [f"src{i}" for i in range(6)]
    p = res.partition(names)
    assert isinstance(p, Partition) and p.k == res.k == 2
    # the stored JSON: exactly these keys and values (stored runs and reports read it)
    assert json.loads(p.model_dump_json()) == {
        "method": "pca",
        "groups": [[f"src{i}" for i in g] for g in res.groups],
        "weights": {f"src{i}": float(w[i]) for i in range(6)},
        "scores": [[float(x) for x in row] for row in res.scores],
        "explained_variance_ratio": [float(x) for x in res.explained_variance_ratio],
    }
    assert list(p.weights) == names
    assert Partition.model_validate_json(p.model_dump_json()) == p
    assert random_split(w, 2, 0).partition(names).scores is None
    with pytest.raises(ValueError, match="got 5 names for 6 sources"):
        res.partition(names[:5])


def test_split_sources_dispatch():
    rng = np.random.default_rng(3)
    c = random_cosine(rng, 10)
    w = rng.uniform(1, 2, size=10)
    assert split_sources(c, w, SplitConfig(r=2, strategy="pca")).groups == pca_split(c, w, 2).groups
    assert split_sources(None, w, SplitConfig(r=1, strategy="random", seed=4)).groups == random_split(w, 2, 4).groups
    assert split_sources(c, w, SplitConfig(r=2, strategy="kmeans", seed=1)).groups == kmeans_split(c, w, 4, 1).groups
    assert split_sources(c, w, SplitConfig(r=0)).groups == [list(range(10))]


# --- split score and conflict structure (study report) ---------------------------------


def _direct_split_score(g, w, groups):
    """between/total scatter of the normalised gradient vectors, from the vectors themselves."""
    gt = g / np.linalg.norm(g, axis=1, keepdims=True)
    mu = (w[:, None] * gt).sum(0) / w.sum()
    total = sum(w[i] * np.sum((gt[i] - mu) ** 2) for i in range(len(w)))
    between = 0.0
    for grp in groups:
        wk = w[grp].sum()
        mk = (w[grp, None] * gt[grp]).sum(0) / wk
        between += wk * np.sum((mk - mu) ** 2)
    return between / total


@pytest.mark.parametrize("seed", range(4))
def test_split_score_equals_between_group_scatter_of_the_vectors(seed):
    from merit_core.split import split_score

    rng = np.random.default_rng(seed)
    t = 11
    g = rng.normal(size=(t, 40))
    gt = g / np.linalg.norm(g, axis=1, keepdims=True)
    c = gt @ gt.T
    w = rng.uniform(1, 5, size=t)
    groups = [list(x) for x in np.array_split(rng.permutation(t), 3)]
    assert abs(split_score(c, w, groups) - _direct_split_score(g, w, groups)) < 1e-10
    assert abs(split_score(c, w, [list(range(t))])) < 1e-12  # one group: nothing between
    assert abs(split_score(c, w, [[i] for i in range(t)]) - 1.0) < 1e-10  # singletons: everything between


def test_conflict_structure_pca_beats_random_on_two_opposed_clusters():
    from merit_core.split import conflict_structure, split_score

    rng = np.random.default_rng(0)
    d = rng.normal(size=30)
    g = np.concatenate([d + 0.3 * rng.normal(size=(6, 30)), -d + 0.3 * rng.normal(size=(6, 30))])
    gt = g / np.linalg.norm(g, axis=1, keepdims=True)
    c = gt @ gt.T
    w = np.ones(12)
    p = pca_split(c, w, 1)
    s = conflict_structure(c, w, {1: p.groups}, n_random=200)
    assert s["negative_share"] == pytest.approx(((c < 0) & ~np.eye(12, dtype=bool)).sum() / (12 * 11))
    assert s["negative_share"] > 0.4
    assert s["explained_variance_ratio"][0] > 0.5
    assert s["splits"]["1"]["score"] == pytest.approx(split_score(c, w, p.groups))
    assert s["splits"]["1"]["score"] > s["splits"]["1"]["random_mean"] + 2 * s["splits"]["1"]["random_std"]
    assert s["splits"]["1"]["beats_random"] > 0.95
    with pytest.raises(ValueError, match="exactly once"):
        split_score(c, w, [[0, 1], [1, 2]])
