"""Uniform average: θ̄ = (1/K) Σ_k θ_k (the weights passed in are ignored)."""

from __future__ import annotations

import torch

from merit_core.merge.registry import register
from merit_core.merge.token_weighted import merge_tensor as weighted_sum


@register("uniform", weights="uniform")
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """Plain mean of ``tensors`` (float32 in, float32 out)."""
    equal = torch.full((len(tensors),), 1.0 / len(tensors), dtype=weights.dtype)
    return weighted_sum(tensors, equal)
