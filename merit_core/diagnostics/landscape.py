"""Loss landscape around the merge: linear-mode-connectivity barrier and noise flatness.

Losses are :func:`merit_core.batching.mean_response_loss` (nats per response token).
The model's weights and train/eval mode are restored after every measurement.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from merit_core.batching import mean_response_loss
from merit_core.data.types import TokenizedExample
from merit_core.merge.io import Checkpoint

StateOrDir = Mapping[str, torch.Tensor] | str | os.PathLike


def load_state(source: StateOrDir) -> Mapping[str, torch.Tensor]:
    """A state dict: returned as is, or read whole from a safetensors HF directory."""
    if isinstance(source, Mapping):
        return source
    r = Checkpoint(source)
    return {name: r.read(name) for name in r.names}


def _named_tensors(model: torch.nn.Module, include_buffers: bool) -> list[tuple[list[str], torch.Tensor]]:
    """Each distinct floating parameter (and persistent buffer) once, with all its names
    (tied weights have several)."""
    aliases: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), ([], p))[0].append(name)
    if include_buffers:
        persistent = set(model.state_dict().keys())
        for name, b in model.named_buffers(remove_duplicate=False):
            if name in persistent:
                aliases.setdefault(id(b), ([], b))[0].append(name)
    return [(names, t) for names, t in aliases.values() if t.is_floating_point()]


def _lookup(state: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor | None:
    for n in names:
        if n in state:
            return state[n]
    return None


class _Restore:
    """Context manager: snapshot the model's floating tensors, restore them on exit."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.saved = [(t, t.detach().clone()) for _, t in _named_tensors(self.model, include_buffers=True)]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for t, copy in self.saved:
                t.copy_(copy)
        self.model.train(self.training)


def _endpoints(model: torch.nn.Module, a: Mapping[str, torch.Tensor],
               b: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(model tensor, θ_a's, θ_b's value in float32 on its device) for each floating
    parameter and persistent buffer found in both states.

    Raises:
        ValueError: a parameter missing from a state, or a state's shape differs (named).
    """
    pairs = []
    for names, t in _named_tensors(model, include_buffers=True):
        ta, tb = _lookup(a, names), _lookup(b, names)
        if ta is None or tb is None:
            if isinstance(t, torch.nn.Parameter):
                side = "state_a" if ta is None else "state_b"
                raise ValueError(f"parameter {names[0]!r} is missing from {side}")
            continue
        for label, s in (("state_a", ta), ("state_b", tb)):
            if tuple(s.shape) != tuple(t.shape):
                raise ValueError(
                    f"parameter {names[0]!r}: shape {tuple(s.shape)} in {label}, model has {tuple(t.shape)}"
                )
        pairs.append((t, ta.to(t.device, torch.float32), tb.to(t.device, torch.float32)))
    return pairs


@torch.no_grad()
def lmc_barrier(
    model: torch.nn.Module,
    state_a: StateOrDir,
    state_b: StateOrDir,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    points: int = 21,
    batch_size: int = 8,
    *,
    loss_b: float | None = None,
) -> dict:
    """Linear-mode-connectivity loss barrier on the path θ_a → θ_b (spec; paper: 21 points).

    For α on ``points`` evenly spaced values in [0, 1], the weights (1−α)θ_a + αθ_b
    (computed in float32, written in the model's dtype; α = 0 and 1 load θ_a and θ_b
    exactly) are loaded into ``model`` and L(α) = mean response loss on ``examples``.
    barrier = max_α [L(α) − ((1−α)L(0) + αL(1))] ≥ 0 (the endpoints contribute 0).

    Args:
        model: a model of the architecture of both states; its weights and train/eval
            mode are restored on return (one extra copy of the weights in memory).
        state_a, state_b: state dicts or safetensors HF directories. Tensors are matched
            by name, a tied weight under any of its names; persistent buffers absent
            from a state keep the model's value.
        examples: tokenized examples (loss on response tokens).
        points: number of α values (≥ 2).
        loss_b: L(θ_b) on ``examples`` when the caller already measured it (e.g. θ̄ at
            the end of every branch's path); that pass is then skipped.

    Returns:
        dict: ``alphas`` (list), ``losses`` (nats/token), ``excess`` (L(α) minus the
        linear interpolation of the endpoint losses), ``barrier`` (max excess),
        ``loss_a``, ``loss_b``.

    Raises:
        ValueError: points < 2, no examples, or a parameter missing from a state / with
            a different shape (named).
    """
    if points < 2:
        raise ValueError(f"points must be ≥ 2, got {points}")
    if not examples:
        raise ValueError("lmc_barrier: no examples")
    pairs = _endpoints(model, load_state(state_a), load_state(state_b))
    alphas = [i / (points - 1) for i in range(points)]
    losses = []
    with _Restore(model):
        for alpha in alphas:
            for t, ta, tb in pairs:
                if alpha == 0.0:
                    t.copy_(ta)
                elif alpha == 1.0:
                    t.copy_(tb)
                else:
                    t.copy_(torch.lerp(ta, tb, alpha))
            known = alpha == 1.0 and loss_b is not None
            losses.append(float(loss_b) if known else mean_response_loss(model, examples, pad_token_id, batch_size))
    la, lb = losses[0], losses[-1]
    excess = [loss - ((1 - al) * la + al * lb) for al, loss in zip(alphas, losses)]
    return {"alphas": alphas, "losses": losses, "excess": excess, "barrier": max(excess), "loss_a": la, "loss_b": lb}


def _set_noisy(params: list[torch.Tensor], originals: Mapping[int, torch.Tensor], sigma: float, seed: int,
               relative: bool) -> None:
    """p ← original + σ·s_p·z for each parameter, z ~ N(0, I) drawn in float32 on the CPU
    from ``torch.Generator().manual_seed(seed)`` in ``params`` order (see noise_flatness)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in params:
        orig = originals[id(p)]
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
        scale = float(orig.float().pow(2).mean().sqrt()) if relative else 1.0
        p.copy_(orig.float() + (sigma * scale) * z)


@torch.no_grad()
def noise_flatness(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    sigmas: Sequence[float] = (0.01, 0.05, 0.1),
    *,
    seed: int = 0,
    relative: bool = True,
    draws: int = 1,
    batch_size: int = 8,
    base_loss: float | None = None,
) -> dict:
    """Loss increase under Gaussian weight noise (spec "flatness"), weights restored after.

    Each floating parameter p (every tied parameter once; buffers untouched) becomes
    p + σ·s_p·z with z ~ N(0, I) and s_p = RMS(p) = ||p|| / sqrt(numel) when ``relative``
    (default: σ is a fraction of each tensor's own scale, so σ = 0.1 means noise with 10%
    of the tensor's RMS), or s_p = 1 when not (absolute σ in parameter units).
    z is drawn on the CPU in float32 from ``torch.Generator().manual_seed(seed + d)`` for
    draw d, parameters in ``named_parameters`` order, so results do not depend on the
    device; the same z serves every σ of a draw (common random numbers).

    Args:
        sigmas: noise levels (≥ 0). draws: noise samples averaged per σ (≥ 1).
        base_loss: the model's loss on ``examples`` without noise when the caller already
            measured it; that pass is then skipped.

    Returns:
        dict: ``base_loss`` (nats/token), ``sigmas``, ``losses`` (mean over draws per σ),
        ``increase`` (losses − base_loss), ``relative``, ``seed``, ``draws``.

    Raises:
        ValueError: no examples, a negative σ, draws < 1.
    """
    if not examples:
        raise ValueError("noise_flatness: no examples")
    if any(s < 0 or not math.isfinite(s) for s in sigmas):
        raise ValueError(f"sigmas must be finite and ≥ 0, got {list(sigmas)}")
    if draws < 1:
        raise ValueError(f"draws must be ≥ 1, got {draws}")
    params = [t for _, t in _named_tensors(model, include_buffers=False)]
    with _Restore(model) as snap:
        originals = {id(t): c for t, c in snap.saved}
        if base_loss is None:
            base_loss = mean_response_loss(model, examples, pad_token_id, batch_size)
        sums = [0.0] * len(sigmas)
        for d in range(draws):
            for k, sigma in enumerate(sigmas):
                _set_noisy(params, originals, sigma, seed + d, relative)
                sums[k] += mean_response_loss(model, examples, pad_token_id, batch_size)
    losses = [s / draws for s in sums]
    return {
        "base_loss": base_loss,
        "sigmas": list(sigmas),
        "losses": losses,
        "increase": [loss - base_loss for loss in losses],
        "relative": relative,
        "seed": seed,
        "draws": draws,
    }
