"""A forecast before training: how much each candidate partition would separate the
sources' gradients, and which r the conflict matrix supports (MERIT_SPEC "Theory":
split score sᵀ M s with the gradient Gram as the proxy for M; "what r to choose").

Computed from C alone, in well under a second for hundreds of sources, so a user can
choose r and K (``merit split CONFIG``) before any branch trains.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from merit_core.split.baselines import kmeans_split, random_split
from merit_core.split.inputs import check_matrix, check_weights
from merit_core.split.pca import pca_split
from merit_core.split.score import split_score

__all__ = ["forecast_markdown", "forecast_partitions", "suggest_r"]

MAX_SUGGESTED_R = 3
"""The paper's variants are MERIT-1D/2D/3D (K = 2, 4, 8); no larger r is suggested."""


def suggest_r(explained_variance_ratio: Any, t: int) -> tuple[int, str]:
    """A suggested r and the reason, from the explained variance of C's PCs.

    Rule: centred C (T sources) has at most T − 1 non-zero PCs, so isotropic conflicts
    (no structure) give each about 1/(T − 1) of the variance; the spec's theory says PCA
    beats a random split when the top eigenvalues dominate. r = the number of leading PCs
    whose share exceeds that isotropic level, capped at 3 (MERIT-3D) and at
    floor(log2(T/2)) so that every group keeps at least two sources on average.

    Args:
        explained_variance_ratio: shares of the leading PCs, largest first.
        t: number of sources T.

    Returns:
        (r, reason) with 0 ≤ r ≤ 3; r = 0 (joint training) when PC1 is not above the
        isotropic level.
    """
    evr = [float(v) for v in explained_variance_ratio]
    if t < 4:
        return 0, f"T = {t} sources: fewer than 4, too few for two groups of two"
    iso = 1.0 / (t - 1)
    cap = min(MAX_SUGGESTED_R, math.floor(math.log2(t / 2)))
    r = 0
    while r < min(cap, len(evr)) and evr[r] > iso:
        r += 1
    shares = ", ".join(f"PC{i + 1} {v:.0%}" for i, v in enumerate(evr[: max(r + 1, 1)]))
    if r == 0:
        return 0, (f"PC1 explains {evr[0] if evr else 0:.0%}, not above the isotropic share 1/(T−1) = {iso:.0%}: "
                   "no dominant conflict direction, a split is not expected to beat joint or random")
    why_stop = (f"PC{r + 1} is at or below it" if r < len(evr) and evr[r] <= iso
                else f"capped at r = {cap} (MERIT-{cap}D; at least two sources per group on average)")
    return r, f"{shares}; the first {r} exceed the isotropic share 1/(T−1) = {iso:.0%}, {why_stop}"


def forecast_partitions(c: Any, weights: Any, r: int, *, seed: int = 0, n_random: int = 200,
                        n_components: int = 8) -> dict:
    """Score candidate partitions of the sources into K = 2^r groups with
    :func:`split_score` (between-group share of the gradient scatter, MERIT_SPEC
    "Theory": sᵀ M s with the Gram of the normalised gradients as M).

    Candidates: PCA (:func:`pca_split`, MERIT), weighted K-means on the same PCA
    representation (:func:`kmeans_split`), and ``n_random`` balanced random splits
    (:func:`random_split`, seeds ``seed`` .. ``seed + n_random − 1``; reported as mean,
    std, min, max and the share of them PCA beats).

    Args:
        c: (T, T) conflict matrix (cosine or Gram). weights: (T,) positive source sizes.
        r: PCs / halving levels of the configured split (K = 2^r ≤ T).
        n_components: PCs whose explained variance is listed (capped at T).

    Returns:
        JSON-able dict: ``t``, ``r``, ``k``, ``candidates`` (list of {name, score, ...}),
        ``random`` (summary), ``pca_beats_random`` (share), ``explained_variance_ratio``
        (list), ``suggested_r``, ``reason``. With r = 0 (K = 1) every score is 0 and
        only the explained variance and the suggestion are meaningful.

    Raises:
        ValueError: bad C or weights, K > T.
    """
    from sklearn.decomposition import PCA

    c = check_matrix(c)
    t = c.shape[0]
    w = check_weights(weights, t)
    k = 2**r
    n_pc = min(n_components, max(1, t - 1))
    centred = c - c.mean(axis=0, keepdims=True)
    if t > 1 and np.abs(centred).max() > 1e-12:
        evr = [float(v) for v in np.nan_to_num(PCA(n_components=n_pc, svd_solver="full").fit(c)
                                               .explained_variance_ratio_)]
    else:
        evr = [0.0] * n_pc
    suggested, reason = suggest_r(evr, t)
    candidates = []
    pca = pca_split(c, w, r)
    pca_score = split_score(c, w, pca.groups)
    candidates.append({"name": f"PCA (MERIT-{r}D)" if r else "joint (K = 1)", "score": pca_score,
                       "group_weights": pca.group_weights})
    if k > 1:
        try:
            km = kmeans_split(c, w, k, seed)
            candidates.append({"name": "k-means", "score": split_score(c, w, km.groups),
                               "group_weights": km.group_weights})
        except ValueError as e:  # fewer distinct points than K: say so instead of a score
            candidates.append({"name": "k-means", "score": None, "note": str(e)})
    rnd = np.array([split_score(c, w, random_split(w, k, seed + i).groups) for i in range(n_random)]) \
        if k > 1 else np.zeros(1)
    random = {"n": int(rnd.size) if k > 1 else 0, "mean": float(rnd.mean()), "std": float(rnd.std()),
              "min": float(rnd.min()), "max": float(rnd.max())}
    candidates.append({"name": f"random balanced ({random['n']} seeds)", "score": random["mean"],
                       "std": random["std"], "min": random["min"], "max": random["max"]})
    return {"t": t, "r": r, "k": k, "candidates": candidates, "random": random,
            "pca_beats_random": float((rnd < pca_score).mean()) if k > 1 else None,
            "explained_variance_ratio": evr, "suggested_r": suggested, "reason": reason}


def forecast_markdown(f: dict) -> str:
    """The forecast of :func:`forecast_partitions` as markdown (report and ``merit split``)."""
    lines = [(f"Split score (share of the sources' gradient scatter between groups, 0–1, higher separates "
              f"more; gradient Gram as the proxy for M) of K = {f['k']} partitions of T = {f['t']} sources:"), "",
             "| partition | split score | notes |", "|---|---:|---|"]
    for cand in f["candidates"]:
        score = "–" if cand.get("score") is None else f"{cand['score']:.3f}"
        if "std" in cand:
            note = f"± {cand['std']:.3f} (min {cand['min']:.3f}, max {cand['max']:.3f})"
        elif "note" in cand:
            note = cand["note"]
        else:
            note = "group weights " + ", ".join(f"{x:.0f}" for x in cand.get("group_weights", []))
        lines.append(f"| {cand['name']} | {score} | {note} |")
    if f["pca_beats_random"] is not None:
        lines += ["", f"PCA beats {f['pca_beats_random']:.0%} of the random balanced splits."]
    lines += ["", "Explained variance per PC of C: "
              + ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(f["explained_variance_ratio"])),
              "", f"Suggested r = {f['suggested_r']} (K = {2 ** f['suggested_r']}): {f['reason']}."]
    return "\n".join(lines)
