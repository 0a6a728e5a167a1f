"""Task arithmetic relative to θ(0): θ = θ(0) + λ · Σ_k w_k δ_k, δ_k = θ_k − θ(0).

Weights are normalised (w_k = c_k / Σ_j c_j, formed as one division of Σ_k c_k δ_k), so
λ = 1 gives the weighted average of the branches and λ = K with uniform weights gives
the classic sum of task vectors.
"""

from __future__ import annotations

import torch

from merit_core.merge.registry import HyperParam, register
from merit_core.merge.token_weighted import weighted_mean

SCALE = HyperParam("scale", float, 1.0, "λ: multiplies the merged task vector", gt=0)


@register("task_arithmetic", needs_base=True, hyperparams=(SCALE,), elementwise=True)
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, *, scale: float = 1.0,
    counts: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """``base + scale · Σ_k c_k (tensors[k] − base) / Σ_k c_k`` of one block (float64 in
    and out; ``tensors`` are scratch, overwritten); ``counts`` c_k default to the
    normalised ``weights``."""
    delta = weighted_mean([t.sub_(base) for t in tensors], weights if counts is None else counts)
    return delta.mul_(scale).add_(base)
