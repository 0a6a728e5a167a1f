"""Input checks shared by the partition functions of :mod:`merit_core.split`.

Each check returns the validated float64 array or raises a ValueError that names the
offending entry (row/column, source index).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SYM_TOL = 1e-6  # max |C - Cᵀ| allowed, relative to max(1, max |C|)


def check_matrix(c: Any) -> np.ndarray:
    """The conflict matrix as float64 (T, T), symmetrised (½(C + Cᵀ)).

    Raises:
        ValueError: not square, empty (T = 0), NaN/Inf (names the first entry), or
            |C_ij − C_ji| above 1e-6 · max(1, max |C|) (names the worst pair).
    """
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


def check_weights(weights: Any, t: int) -> np.ndarray:
    """Per-source sizes as float64 (T,).

    Raises:
        ValueError: not one entry per source, non-finite or ≤ 0 (names the source).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != t:
        raise ValueError(f"weights must have one entry per source ({t}), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"weights must be finite; source {int(np.flatnonzero(~np.isfinite(w))[0])} is not")
    if (w <= 0).any():
        i = int(np.flatnonzero(w <= 0)[0])
        raise ValueError(f"weights must be > 0; source {i} has weight {w[i]}")
    return w


def check_group_count(k: int, t: int, what: str) -> None:
    """Raises ValueError (naming ``what`` when K > T) unless 1 ≤ K ≤ T."""
    if k < 1:
        raise ValueError(f"K must be ≥ 1, got {k}")
    if k > t:
        raise ValueError(f"{what} asks for K = {k} groups but there are only T = {t} sources (need K ≤ T)")
