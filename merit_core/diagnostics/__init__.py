"""Diagnostics of the merge (MERIT_SPEC.md, "Theory the diagnostics compute").

With θ(0) the base, θ_i the branches, δ_i = θ_i − θ(0), weights w (normalised to sum 1)
and δ̄ = Σ w_i δ_i:

- :func:`displacement_norms`: ||θ − θ(0)||_2 of whole checkpoints (paper Table 1:
  ||θ_joint − θ(0)|| / ||θ̄ − θ(0)|| = 2.43 … 2.92).
- :func:`contraction`: Σ w_i ||δ_i||² = ||δ̄||² + Σ w_i ||δ_i − δ̄||² (holds for any
  convex weights; the spec states the uniform case), hence ||θ̄ − θ(0)||² ≤ Σ w_i ||δ_i||².
- :func:`merge_gain`: G = Σ w_i L(θ_i) − L(θ̄) ≈ ½ Σ w_i (δ_i − δ̄)ᵀ H (δ_i − δ̄).
- :func:`lmc_barrier`: max_α [L((1−α)θ_a + αθ_b) − ((1−α)L_a + αL_b)] on 21 points
  (paper: 0.0 on all 10 paths).
- :func:`noise_flatness`: loss increase under Gaussian weight noise, σ ∈ {0.01, 0.05, 0.1}.

The first three live in :mod:`.displacement` (checkpoints streamed through
:class:`merit_core.merge.io.Checkpoint`), the loss-landscape ones in :mod:`.landscape`.
This package never imports prefect.
"""

from merit_core.diagnostics.displacement import (
    contraction,
    displacement_norms,
    merge_gain,
)
from merit_core.diagnostics.landscape import lmc_barrier, load_state, noise_flatness

__all__ = ["contraction", "displacement_norms", "lmc_barrier", "load_state", "merge_gain", "noise_flatness"]
