"""Correct rounding of float64 merge results to the checkpoint's dtype (one rounding).

``torch.Tensor.to(torch.bfloat16)`` (and ``to(torch.float16)``) from float64 goes through
float32: it rounds twice, and a value just above a bfloat16 midpoint can come out one
step low (``1 + 2**-8 + 2**-30`` gives 1.0 instead of 1.0078125). :func:`round_to` rounds
once, to nearest with ties to even, as IEEE 754 asks of a single conversion:

1. ``r = x.to(float32)`` (one correct rounding);
2. where ``r`` is not ``x`` and ``r`` is even (last significand bit 0), move ``r`` one
   float32 step towards ``x`` — the result is ``x`` rounded to float32 *to odd*;
3. ``r.to(dtype)`` (correct, ties to even).

Rounding to odd at a precision at least two bits wider than the target and then to
nearest gives the correctly rounded result (Boldo & Melquiond, "Emulation of FMA and
correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008);
float32 has 24 bits against 8 (bfloat16) and 11 (float16). Step 2 can only change the
outcome where ``r`` is a target midpoint, so it is applied only where that is possible:
bit patterns ending in a bfloat16 or float16 half-step, and float16's subnormal range.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

# Per target: (mask, value) of the low bits of a float32 that may be a target midpoint
# (the bits the target drops: 10...0), and |x| below which the target (or float32) is
# subnormal, where any pattern may be one.
_MIDPOINT = {torch.bfloat16: (0xFFFF, 0x8000, 2.0**-126), torch.float16: (0x1FFF, 0x1000, 2.0**-14)}


_LOW_WORD = 0 if sys.byteorder == "little" else 1  # the uint32 of a float64 holding its low bits


def round_to(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
             work: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (float64 or float32, any shape) rounded once, to nearest even, to ``dtype``.

    Args:
        x: the exact-as-possible result; float32 input is converted directly (a single
            rounding already), as is any ``dtype`` of float32 or wider.
        dtype: the output floating dtype (bfloat16, float16, float32, float64, float8).
        out: a tensor of ``dtype`` with ``x``'s number of elements to write into.
        work: a float32 tensor of at least ``x.numel()`` elements to use as scratch
            (saves an allocation per call in a streaming loop).

    Returns:
        ``out``, or a new tensor of ``dtype`` and ``x``'s shape. Values beyond the
        target's range become ±inf, as a conversion does.
    """
    if x.dtype != torch.float64 or dtype in (torch.float64, torch.float32):
        r = x
    else:
        r = torch.empty(x.shape, dtype=torch.float32) if work is None else work.reshape(-1)[:x.numel()].view(x.shape)
        r.copy_(x)
        if dtype in _MIDPOINT:
            _fix_midpoints(x, r, *_MIDPOINT[dtype])
        else:  # other narrow formats (float8): round every element to odd
            r = _to_odd(x, r)
    if out is None:
        return r.to(dtype)
    out.view(r.shape).copy_(r)
    return out


def _fix_midpoints(x: torch.Tensor, r: torch.Tensor, mask: int, half: int, subnormal: float) -> None:
    """Round ``r`` (``x`` rounded to float32) to odd, in place, where it may be a
    midpoint of the target: low bits equal to ``half`` under ``mask``, or |r| below
    ``subnormal``. One pass over ``r`` (numpy: faster than torch on integers); the few
    suspects are fixed one by one."""
    bits = r.reshape(-1).view(torch.int32).numpy()  # a view: written through
    suspect = (bits & mask) == half
    # r == x (exact ties, common: weighted means of few-bit values) needs nothing; for a
    # normal float32 r != x exactly when some of the 29 bits of x below its precision are set
    suspect &= (x.reshape(-1).numpy().view(np.uint32)[_LOW_WORD::2] & 0x1FFFFFFF) != 0
    suspect |= np.abs(bits.view(np.float32)) < subnormal  # float32 or target subnormal: check all
    idx = np.flatnonzero(suspect)
    if len(idx) == 0:
        return
    xs = x.reshape(-1).numpy()[idx]
    rs = bits[idx].view(np.float32).astype(np.float64)
    fix = (rs != xs) & ((bits[idx] & 1) == 0)
    step = np.where(np.abs(rs) > np.abs(xs), -1, 1).astype(np.int32)
    bits[idx] += np.where(fix, step, 0).astype(np.int32)


def _to_odd(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` rounded to float32 *to odd*, given ``r`` = ``x`` rounded to nearest:
    an inexact even ``r`` moves one step towards ``x`` (magnitude ±1 in its bits)."""
    back = r.to(torch.float64)
    bits = r.view(torch.int32)
    fix = (back != x) & ((bits & 1) == 0)
    step = torch.where(back.abs() > x.abs(), -1, 1).to(torch.int32)
    return torch.where(fix, bits + step, bits).view(torch.float32)
