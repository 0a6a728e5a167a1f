"""Token-weighted average (MERIT, spec step 5): θ̄ = Σ_k N_k θ_k / Σ_k N_k.

N_k is the number of training tokens of branch k (the paper's w_k = N_k / Σ_j N_j).
The caller passes the token counts; :func:`merit_core.merge.merge_checkpoints` streams
the checkpoints through :func:`merge_tensor` in float64 blocks and rounds each result
once to the checkpoint's dtype, so a bfloat16 or float16 merge is the correctly rounded
value of the float64 weighted mean, element for element.
"""

from __future__ import annotations

import torch

from merit_core.merge.registry import register


def weighted_mean(tensors: list[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """(Σ_k c_k θ_k) / Σ_k c_k, summed left to right with each product rounded, divided once.

    Args:
        tensors: K float64 tensors of one shape (not modified).
        counts: K positive float64 weights (any scale: token counts, ones, ...).

    Returns:
        A new float64 tensor of that shape. Starts from c_0 θ_0 rather than zeros, so
        K = 1 returns θ_0 bit for bit, signed zeros included.
    """
    c = [float(x) for x in counts]
    out = tensors[0] * c[0]
    for ck, t in zip(c[1:], tensors[1:]):
        out += t * ck
    total = 0.0
    for ck in c:
        total += ck
    return out.div_(total)


@register("token_weighted", weights="tokens", elementwise=True)
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, *,
    counts: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """Σ_k N_k θ_k / Σ_k N_k of one block (float64 in, float64 out, shapes kept);
    ``counts`` are the token counts N_k (normalised ``weights`` when not given)."""
    return weighted_mean(tensors, weights if counts is None else counts)
