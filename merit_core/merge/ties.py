"""TIES merging (Yadav et al., 2023) relative to θ(0), per tensor:

1. trim: keep the ``density`` fraction of largest-magnitude entries of each task vector
   δ_k = θ_k − θ(0) (k = ceil(density · numel) entries, the rest set to 0);
2. elect: γ = sign(Σ_k w_k δ̂_k), the sign with the larger weighted mass per entry;
3. disjoint mean: average, with weights w_k, only the δ̂_k whose sign agrees with γ
   (entries with no agreeing task vector stay at θ(0));

θ = θ(0) + λ · merged. With uniform weights this is the paper's unweighted TIES.
"""

from __future__ import annotations

import math

import torch

from merit_core.merge.registry import HyperParam, register
from merit_core.merge.task_arithmetic import SCALE

DENSITY = HyperParam("density", float, 0.2, "kept fraction of each task vector", gt=0, le=1)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``ceil(density · numel)`` largest-magnitude entries."""
    n = delta.numel()
    k = min(n, max(1, math.ceil(density * n)))
    if k == n:
        return delta.clone()
    flat = delta.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros((), dtype=delta.dtype)).reshape(delta.shape)


@register("ties", needs_base=True, hyperparams=(SCALE, DENSITY))
def merge_tensor(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    density: float = 0.2,
    **kw,
) -> torch.Tensor:
    """TIES merge of one tensor (float32 in, float32 out)."""
    trimmed = [trim(t - base, density) for t in tensors]
    mass = torch.zeros_like(base)
    for w, d in zip(weights, trimmed):
        mass.add_(d, alpha=float(w))
    elected = torch.sign(mass)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for w, d in zip(weights, trimmed):
        agree = (torch.sign(d) == elected) & (d != 0)
        num.add_(torch.where(agree, d, 0.0), alpha=float(w))
        den.add_(agree.to(base.dtype), alpha=float(w))
    merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(base.dtype).tiny), 0.0)
    return base + scale * merged
