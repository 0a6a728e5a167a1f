"""Task arithmetic relative to θ(0): θ = θ(0) + λ · Σ_k w_k δ_k, δ_k = θ_k − θ(0).

Weights are normalised (Σ w_k = 1), so λ = 1 gives the weighted average of the
branches and λ = K with uniform weights gives the classic sum of task vectors.
"""

from __future__ import annotations

import torch

from merit_core.merge.registry import HyperParam, register

SCALE = HyperParam("scale", float, 1.0, "λ: multiplies the merged task vector", gt=0)


@register("task_arithmetic", needs_base=True, hyperparams=(SCALE,))
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, *, scale: float = 1.0, **kw
) -> torch.Tensor:
    """``base + scale · Σ_k w_k (tensors[k] − base)`` (float32 in, float32 out)."""
    delta = torch.zeros_like(base)
    for w, t in zip(weights, tensors):
        delta.add_(t - base, alpha=float(w))
    return base + scale * delta
