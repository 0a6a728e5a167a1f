"""Uniform average: θ̄ = (Σ_k θ_k) / K (the weights passed in are ignored)."""

from __future__ import annotations

import torch

from merit_core.merge.registry import register
from merit_core.merge.token_weighted import weighted_mean


@register("uniform", weights="uniform", elementwise=True)
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """Plain mean of one block (float64 in, float64 out; ``tensors`` are scratch, see
    :func:`~merit_core.merge.token_weighted.weighted_mean`): summed, divided once by K."""
    return weighted_mean(tensors, torch.ones(len(tensors), dtype=torch.float64))
