"""DARE (Yu et al., 2024) relative to θ(0), with a linear combination:

δ̃_k = m_k ⊙ δ_k / p,   m_k ~ Bernoulli(p) per entry, p = ``density``
θ = θ(0) + λ · Σ_k w_k δ̃_k      (E[δ̃_k] = δ_k).

The masks are reproducible: each (tensor name, input index) gets its own generator
seeded from sha256(seed, name, k), independent of the order tensors are visited.
"""

from __future__ import annotations

import hashlib

import torch

from merit_core.merge.registry import HyperParam, register
from merit_core.merge.task_arithmetic import SCALE
from merit_core.merge.ties import DENSITY

SEED = HyperParam("seed", int, 0, "seed of the random drop masks")


def mask_seed(seed: int, name: str, k: int) -> int:
    """A 63-bit generator seed derived from the run seed, tensor name and input index."""
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keep_mask(shape: torch.Size, density: float, seed: int, name: str, k: int) -> torch.Tensor:
    """Bernoulli(density) boolean mask for input ``k`` of tensor ``name``."""
    g = torch.Generator().manual_seed(mask_seed(seed, name, k))
    return torch.rand(shape, generator=g) < density


@register("dare", needs_base=True, hyperparams=(SCALE, DENSITY, SEED))
def merge_tensor(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    base: torch.Tensor | None = None,
    *,
    name: str = "",
    scale: float = 1.0,
    density: float = 0.2,
    seed: int = 0,
    **kw,
) -> torch.Tensor:
    """DARE merge of one tensor (float32 in, float32 out)."""
    delta = torch.zeros_like(base)
    for k, (w, t) in enumerate(zip(weights, tensors)):
        d = t - base
        if density < 1.0:
            d = torch.where(keep_mask(d.shape, density, seed, name, k), d / density, 0.0)
        delta.add_(d, alpha=float(w))
    return base + scale * delta
