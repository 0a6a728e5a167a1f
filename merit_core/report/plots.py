"""The reports' figures (matplotlib, Agg backend, PNG at 110 dpi): the conflict matrix as
a heat map, the sources in PCA coordinates coloured by group, grouped bars with error
bars for the study.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from merit_core.refs import ConflictMatrix, Partition

HEATMAP = "conflict_matrix.png"
PCA_PLOT = "pca_groups.png"
BENCH_PLOT = "benchmarks.png"
HELDOUT_PLOT = "heldout_loss.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_conflict(report: ConflictMatrix, path: str | Path) -> Path:
    """Heat map of the T×T conflict matrix (cosine similarities of g̃_t) as a PNG.

    The colour scale is symmetric around 0 (±max |C_ij|). Returns ``path``.
    """
    plt = _pyplot()
    C = np.asarray(report.matrix)
    t = len(report.names)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * t + 2), max(3.5, 0.45 * t + 1.5)))
    lim = float(np.max(np.abs(C))) if C.size else 1.0
    im = ax.imshow(C, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(t), report.names, rotation=90, fontsize=7)
    ax.set_yticks(range(t), report.names, fontsize=7)
    ax.set_title(f"conflict matrix C ({report.kind})")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_pca(report: ConflictMatrix, partition: Partition, path: str | Path) -> Path | None:
    """Sources in the first two PCA coordinates of C, coloured by MERIT group (PNG).

    ``partition.scores``: T rows of r PCA scores, in ``report.names`` order; with r = 1 the
    second axis is zero. Returns ``path``, or None (nothing written) when the partition
    has no scores.
    """
    if not partition.scores:
        return None
    plt = _pyplot()
    S = np.asarray(partition.scores, dtype=float)
    if S.ndim == 1 or S.shape[1] == 1:
        S = np.column_stack([S.reshape(-1), np.zeros(S.shape[0])])
    group_of = {n: k for k, g in enumerate(partition.groups) for n in g}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(report.names):
        k = group_of.get(name, -1)
        ax.scatter(S[i, 0], S[i, 1], color=cmap(k % 10), s=40)
        ax.annotate(name, (S[i, 0], S[i, 1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    evr = partition.explained_variance_ratio or []
    ax.set_xlabel(f"PC1 ({evr[0]:.0%} var)" if len(evr) > 0 else "PC1")
    ax.set_ylabel(f"PC2 ({evr[1]:.0%} var)" if len(evr) > 1 else "PC2")
    ax.set_title(f"sources by PCA score, coloured by group (K={partition.k})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_bars(values: Mapping[str, Mapping[str, tuple[float, float]]], path: str | Path, *, ylabel: str,
              title: str) -> Path:
    """Grouped bars (PNG): one group per category, one bar per model, error bars ±1 std.

    ``values``: model -> category -> (mean, std); a missing category draws no bar, a NaN
    std no error bar. Returns ``path``.
    """
    plt = _pyplot()
    models = list(values)
    cats = list(dict.fromkeys(c for v in values.values() for c in v))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) * max(1, len(models)) * 0.35 + 2), 4.5))
    x = np.arange(len(cats))
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(models):
        mean = [values[m].get(c, (np.nan, np.nan))[0] for c in cats]
        err = [0.0 if not np.isfinite(values[m].get(c, (0, np.nan))[1]) else values[m][c][1] for c in cats]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, mean, width, yerr=err, capsize=2, label=m, color=cmap(i % 10))
    ax.set_xticks(x, cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
