"""The conflict matrix C of T sources from their gradient sketches (MERIT spec step 1).

C_ij = <g_i/||g_i||, g_j/||g_j||> (cosine, the paper) or the raw Gram matrix
<g_i, g_j> (an ablation), computed in float64 from the (T, D) stack of sketches.
"""

from __future__ import annotations

import numpy as np

__all__ = ["conflict_matrix"]


def conflict_matrix(sketches: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """Conflict matrix of T sources from their gradient sketches (spec step 1).

    Args:
        sketches: array (T, D), one (sketched) gradient per row, any real dtype.
        kind: ``"cosine"`` (default, the paper: C_ij = <g_i, g_j>/(||g_i|| ||g_j||),
            unit diagonal, clipped to [-1, 1]) or ``"gram"`` (raw inner products, an
            ablation).

    Returns:
        float64 array (T, T), exactly symmetric.

    Raises:
        ValueError: ``sketches`` not 2-D or empty, NaN/Inf (names the row), a zero
            row with ``kind="cosine"`` (names the row), or an unknown ``kind``.
    """
    if kind not in ("cosine", "gram"):
        raise ValueError(f"conflict_matrix: kind must be 'cosine' or 'gram', got {kind!r}")
    g = np.asarray(sketches)
    if g.ndim != 2:
        raise ValueError(f"conflict_matrix: sketches must be 2-D (T, D), got shape {g.shape}")
    if g.shape[0] < 1 or g.shape[1] < 1:
        raise ValueError(f"conflict_matrix: sketches must have T ≥ 1 rows and D ≥ 1 columns, got shape {g.shape}")
    g = g.astype(np.float64)
    bad = ~np.isfinite(g).all(axis=1)
    if bad.any():
        raise ValueError(f"conflict_matrix: sketch row {int(np.flatnonzero(bad)[0])} contains NaN or Inf")
    if kind == "cosine":
        norms = np.linalg.norm(g, axis=1)
        zero = norms == 0
        if zero.any():
            raise ValueError(
                f"conflict_matrix: sketch row {int(np.flatnonzero(zero)[0])} has zero norm; its cosine is undefined"
            )
        g = g / norms[:, None]
    c = g @ g.T
    c = 0.5 * (c + c.T)
    if kind == "cosine":
        np.fill_diagonal(c, 1.0)
        np.clip(c, -1.0, 1.0, out=c)
    return c
