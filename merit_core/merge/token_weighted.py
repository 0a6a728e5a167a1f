"""Token-weighted average (MERIT, spec step 5): θ̄ = Σ_k w_k θ_k, w_k = N_k / Σ_j N_j.

N_k is the number of training tokens of branch k; the caller passes the token counts
and :func:`merit_core.merge.merge_checkpoints` normalises them.
"""

from __future__ import annotations

import torch

from merit_core.merge.registry import register


@register("token_weighted", weights="tokens")
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """Weighted sum of ``tensors`` with normalised ``weights`` (float32 in, float32 out).

    Starts from ``w_0 · θ_0`` rather than zeros so that K = 1 (w = 1) returns θ_0 bit
    for bit, signed zeros included.
    """
    out = tensors[0] * float(weights[0])
    for w, t in zip(weights[1:], tensors[1:]):
        out.add_(t, alpha=float(w))
    return out
