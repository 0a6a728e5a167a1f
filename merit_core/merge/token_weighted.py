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

# A weight with at most this many significant bits times a value with at most 24 (bfloat16,
# float16, float32 inputs) is exact in float64, so ``add_(t, alpha=c)`` (which may fuse
# the multiply-add) equals rounding the product first; token counts always qualify.
FUSED_BITS = 29


def _significant_bits(c: float) -> int:
    """Bits of the binary significand of ``c`` from its first to its last 1 (1.5 → 2)."""
    num, _den = abs(c).as_integer_ratio()
    return (num // (num & -num)).bit_length() if num else 0


def weighted_mean(tensors: list[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """(Σ_k c_k θ_k) / Σ_k c_k, summed left to right with each product rounded, divided once.

    Args:
        tensors: K float64 tensors of one shape, used as scratch: overwritten, the
            result is ``tensors[0]`` (a streaming merge allocates nothing per block).
        counts: K positive float64 weights (any scale: token counts, ones, ...).

    Exactness: each product c_k θ_k is rounded to float64 before it is added (for
    bfloat16/float16/float32 inputs and token-count weights it is exact anyway).

    Returns:
        ``tensors[0]``, holding the mean. K = 1 returns θ_0 bit for bit, signed zeros
        included (c θ / c is exact); with c_k = 1 the product is skipped (exact too).
    """
    c = [float(x) for x in counts]
    out = tensors[0]
    if c[0] != 1.0:
        out.mul_(c[0])
    fused = all(_significant_bits(ck) <= FUSED_BITS for ck in c)
    for ck, t in zip(c[1:], tensors[1:]):
        if fused or ck == 1.0:
            out.add_(t, alpha=ck)  # c_k θ_k exact here, so fused or not makes no difference
        else:
            out.add_(t.mul_(ck))
    total = 0.0
    for ck in c:
        total += ck
    return out.div_(total)


@register("token_weighted", weights="tokens", elementwise=True)
def merge_tensor(
    tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, *,
    counts: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """Σ_k N_k θ_k / Σ_k N_k of one block (float64 in, float64 out, shapes kept; the
    blocks are scratch, see :func:`weighted_mean`); ``counts`` are the token counts N_k
    (normalised ``weights`` when not given)."""
    return weighted_mean(tensors, weights if counts is None else counts)
