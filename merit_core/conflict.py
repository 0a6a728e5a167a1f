"""Calibration gradients, sketches and the conflict matrix (MERIT spec step 1).

Algorithm 1, step 1 of Choi & Kim (arXiv 2606.01717): for every source t, the mean
SFT gradient g_t at θ(0) over a calibration sample, reduced to a sketch of fixed size,
then C_ij = <g_i/||g_i||, g_j/||g_j||> (cosine; the raw Gram matrix is an ablation).

Choices made here (the paper leaves them open):

- loss on response tokens only (labels -100 elsewhere), mean over *all* response
  tokens of all calibration batches of the source (token-weighted), model in eval
  mode (dropout off), gradients accumulated in float32;
- the flattened gradient is the concatenation of ``param.grad.reshape(-1)`` in
  ``model.named_parameters()`` order over the trainable parameters (tied parameters
  once). Every sketch depends on that order: the same model class, trainable subset
  and sketch settings give comparable sketches; change any of them and sketches from
  before are not comparable (put :meth:`Sketcher.settings` and the trainable names in
  cache keys).

Sketches never build a d × D matrix and never hold more than one chunk of one
parameter's hash/sign arrays, so their memory does not grow with the model.
"""

from __future__ import annotations

import fnmatch
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from merit_core.batching import response_loss_sum
from merit_core.config import ConflictConfig
from merit_core.precision import bf16_autocast

__all__ = [
    "VISION_NAME_PARTS",
    "CountSketch",
    "FullSketch",
    "Sketcher",
    "StrideSketch",
    "conflict_matrix",
    "make_sketcher",
    "source_gradient",
    "trainable_parameters",
]

# --------------------------------------------------------------------------- params

VISION_NAME_PARTS: tuple[str, ...] = (
    "vision*",  # vision_tower, vision_model, vision_embed_tokens (LLaVA, Gemma3, Mllama, Idefics)
    "visual*",  # Qwen2-VL / Qwen2.5-VL `visual` (includes its merger = projector)
    "multi_modal_projector",
    "mm_projector",
    "connector",  # Idefics3 / SmolVLM projector
    "image_newline",  # LLaVA-NeXT
)
"""Glob patterns matched against each dot-separated component of a parameter name;
a parameter with a matching component is excluded by ``trainable="lm"``."""


def _is_vision(name: str) -> bool:
    return any(fnmatch.fnmatchcase(part, pat) for part in name.split(".") for pat in VISION_NAME_PARTS)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def trainable_parameters(
    model: torch.nn.Module, trainable: str | list[str] = "all"
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that branch training updates and the conflict gradient covers.

    Args:
        model: any ``torch.nn.Module``.
        trainable:
            - ``"all"``: every parameter with ``requires_grad``;
            - ``"lm"``: as ``"all"`` minus the vision tower / multimodal projector
              (a name component matching one of :data:`VISION_NAME_PARTS`);
            - a list of name patterns: every parameter (frozen or not) whose full name
              matches one pattern — a glob (``fnmatch``, case-sensitive, against the
              whole name, e.g. ``"model.layers.*.mlp.*"``) or, with a ``"re:"`` prefix,
              a regular expression searched in the name (``"re:layers\\.[01]\\."``).

    Returns:
        ``(name, parameter)`` pairs in ``model.named_parameters()`` order; a parameter
        shared under several names (tied embeddings) appears once, under its first name.

    Raises:
        ValueError: unknown mode string, empty pattern list, or nothing selected (the
            message names the patterns).
    """
    named = list(model.named_parameters())  # de-duplicates tied parameters
    if isinstance(trainable, str):
        if trainable == "all":
            out = [(n, p) for n, p in named if p.requires_grad]
        elif trainable == "lm":
            out = [(n, p) for n, p in named if p.requires_grad and not _is_vision(n)]
        else:
            raise ValueError(
                f"trainable must be 'all', 'lm' or a list of name patterns, got {trainable!r}"
            )
    else:
        patterns = list(trainable)
        if not patterns:
            raise ValueError("trainable: empty list of name patterns")
        out = [(n, p) for n, p in named if any(_matches(n, pat) for pat in patterns)]
    if not out:
        raise ValueError(
            f"trainable={trainable!r} selects no parameter of {type(model).__name__} "
            f"({len(named)} parameters, e.g. {[n for n, _ in named[:3]]})"
        )
    return out


# --------------------------------------------------------------------------- sketches

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64 increment (golden ratio)
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_CHUNK = 1 << 20  # entries hashed at once: bounds the temporary arrays to ~50 MB
_CUDA_CHUNK = 1 << 24  # on a GPU: ~0.8 GB of temporaries per chunk


def _mix64_int(z: int) -> int:
    """splitmix64 finaliser on a Python int (mod 2^64)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array, in place (wrap-around arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(_M1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(_M2)
    z ^= z >> np.uint64(31)
    return z


def _flat_chunks(
    named_grads: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(global_offset, flat_chunk)`` over the concatenated flattened tensors."""
    offset = 0
    for _, g in named_grads:
        flat = g.detach().reshape(-1)
        n = flat.numel()
        for a in range(0, n, _CHUNK):
            yield offset + a, flat[a : a + _CHUNK]
        offset += n


def _to_numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.to(device="cpu", dtype=dtype).numpy()


class Sketcher(ABC):
    """Maps the flattened concatenated gradient (length d) to a float32 vector (D,).

    Every sketcher is linear in the gradient and sees the parameters in the order
    given; the order is part of the sketch's definition.
    """

    name: str

    @abstractmethod
    def sketch(self, named_grads: Iterable[tuple[str, torch.Tensor]]) -> np.ndarray:
        """Sketch of the concatenation of the flattened tensors, float32, shape (D,)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """JSON-friendly settings that fully define the sketch (for cache keys)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class FullSketch(Sketcher):
    """The identity: the flattened gradient itself (D = d). Tests and small models."""

    name = "full"

    def sketch(self, named_grads: Iterable[tuple[str, torch.Tensor]]) -> np.ndarray:
        parts = [_to_numpy(g.detach().reshape(-1), torch.float32) for _, g in named_grads]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.name}


class StrideSketch(Sketcher):
    """The paper's sketch: keep entries whose global index i satisfies i % stride == 0.

    The index runs over the concatenation of all tensors (the offset carries across
    parameters), so D = ceil(d / stride). With stride 5 the paper measured Pearson
    0.988 against full-gradient similarities.
    """

    name = "stride"

    def __init__(self, stride: int = 5):
        if int(stride) < 1:
            raise ValueError(f"StrideSketch: stride must be ≥ 1, got {stride}")
        self.stride = int(stride)

    def sketch(self, named_grads: Iterable[tuple[str, torch.Tensor]]) -> np.ndarray:
        s, offset, parts = self.stride, 0, []
        for _, g in named_grads:
            flat = g.detach().reshape(-1)
            start = (-offset) % s
            parts.append(_to_numpy(flat[start::s], torch.float32))
            offset += flat.numel()
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def settings(self) -> dict[str, Any]:
        return {"kind": self.name, "stride": self.stride}


class CountSketch(Sketcher):
    """Seeded count-sketch: y[h(i)] += σ(i) · x[i], D = ``dim``.

    h and σ come from a pure integer hash of (seed, global index i): with
    ``key = splitmix64_mix(seed)`` and ``z = splitmix64_mix(key + (i + 1) · 0x9E3779B97F4A7C15
    mod 2^64)`` (the i-th output of splitmix64 started at ``key``), ``h(i) = z mod dim``
    and ``σ(i) = +1`` if the top bit of z is 0 else -1. Only integer arithmetic, so the
    same seed, dimension and parameter order give bit-identical sketches on every
    machine (sums are taken in float64 in index order, then cast to float32). Gradients
    on a GPU are sketched there (:meth:`_sketch_cuda`), with the same buckets and signs.
    E[<Sx, Sy>] = <x, y>; the error of a cosine is about (1 - c²)/sqrt(dim).
    """

    name = "countsketch"

    def __init__(self, dim: int = 8192, seed: int = 0):
        if int(dim) < 1:
            raise ValueError(f"CountSketch: dim must be ≥ 1, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        self._key = _mix64_int(self.seed & _MASK64)

    def hash(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Buckets (int64, in [0, dim)) and signs (float64, ±1) of global indices."""
        z = np.asarray(index, dtype=np.uint64) + np.uint64(1)
        z *= np.uint64(_GAMMA)
        z += np.uint64(self._key)
        _mix64(z)
        if self.dim & (self.dim - 1) == 0:  # power of two: same as z mod dim, faster
            bucket = (z & np.uint64(self.dim - 1)).astype(np.int64)
        else:
            bucket = (z % np.uint64(self.dim)).astype(np.int64)
        sign = 1.0 - 2.0 * (z >> np.uint64(63)).astype(np.float64)
        return bucket, sign

    def hash_torch(self, start: int, n: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`hash` of the indices ``start .. start + n − 1`` computed with torch int64
        arithmetic on ``device`` (multiplication and addition wrap mod 2^64 like uint64;
        logical right shifts are arithmetic shifts masked to the low 64 − k bits), so the
        buckets and signs are bit-identical to :meth:`hash`. Returns (int64 buckets,
        float64 signs)."""
        def to_i64(u: int) -> int:
            return u - (1 << 64) if u >= 1 << 63 else u

        def shr(z: torch.Tensor, k: int) -> torch.Tensor:
            return (z >> k) & ((1 << (64 - k)) - 1)

        z = torch.arange(start + 1, start + n + 1, dtype=torch.int64, device=device)
        z = z * to_i64(_GAMMA) + to_i64(self._key)
        z = (z ^ shr(z, 30)) * to_i64(_M1)
        z = (z ^ shr(z, 27)) * to_i64(_M2)
        z = z ^ shr(z, 31)
        if self.dim & (self.dim - 1) == 0:
            bucket = z & (self.dim - 1)
        else:  # unsigned z mod dim from its top 63 bits and its last bit
            bucket = ((shr(z, 1) % self.dim) * 2 + (z & 1)) % self.dim
        sign = 1.0 - 2.0 * (z < 0).to(torch.float64)
        return bucket, sign

    def sketch(self, named_grads: Iterable[tuple[str, torch.Tensor]]) -> np.ndarray:
        named_grads = list(named_grads)
        if named_grads and named_grads[0][1].is_cuda:
            return self._sketch_cuda(named_grads)
        out = np.zeros(self.dim, dtype=np.float64)
        for start, chunk in _flat_chunks(named_grads):
            n = chunk.numel()
            if n == 0:
                continue
            bucket, sign = self.hash(np.arange(start, start + n, dtype=np.uint64))
            out += np.bincount(bucket, weights=sign * _to_numpy(chunk, torch.float64), minlength=self.dim)
        return out.astype(np.float32)

    def _sketch_cuda(self, named_grads: list[tuple[str, torch.Tensor]]) -> np.ndarray:
        """The same sketch with gradients on a GPU: the hash on the GPU
        (:meth:`hash_torch`), float64 sums by ``index_add_`` — bit-identical buckets and
        signs, but the GPU adds in no fixed order, so a sum may differ from the CPU's in
        the last float64 bits (far below the float32 result's resolution)."""
        device = named_grads[0][1].device
        out = torch.zeros(self.dim, dtype=torch.float64, device=device)
        offset = 0
        for _, g in named_grads:
            flat = g.detach().reshape(-1)
            for a in range(0, flat.numel(), _CUDA_CHUNK):
                chunk = flat[a : a + _CUDA_CHUNK]
                bucket, sign = self.hash_torch(offset + a, chunk.numel(), device)
                out.index_add_(0, bucket, sign * chunk.to(torch.float64))
            offset += flat.numel()
        return out.to(torch.float32).cpu().numpy()

    def settings(self) -> dict[str, Any]:
        return {"kind": self.name, "dim": self.dim, "seed": self.seed, "hash": "splitmix64-v1"}


def make_sketcher(cfg: ConflictConfig) -> Sketcher:
    """The sketcher a :class:`ConflictConfig` asks for (``sketch``: countsketch with
    ``sketch_dim`` and ``seed``, stride with ``stride``, or full)."""
    if cfg.sketch == "countsketch":
        return CountSketch(dim=cfg.sketch_dim, seed=cfg.seed)
    if cfg.sketch == "stride":
        return StrideSketch(stride=cfg.stride)
    if cfg.sketch == "full":
        return FullSketch()
    raise ValueError(f"unknown sketch {cfg.sketch!r}; expected countsketch, stride or full")


# --------------------------------------------------------------------------- gradient


def source_gradient(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    trainable: str | list[str] = "all",
    sketcher: Sketcher | None = None,
    bf16: bool = False,
) -> np.ndarray:
    """Sketch of the mean SFT gradient of one source at θ(0) (spec step 1, Algorithm 1).

    g = ∇_θ [ Σ_batches Σ_response-tokens CE ] / (number of response tokens), over the
    trainable parameters only (:func:`trainable_parameters`), with the model in eval
    mode (dropout off). Per-batch losses come from
    :func:`merit_core.batching.response_loss_sum` (float32 CE, causal shift, labels
    -100 ignored). Gradients are accumulated in float32: in ``param.grad`` when every
    trainable parameter is float32; otherwise (bf16/fp16 models) each batch's
    mean-loss gradient is added, times its token count, into float32 buffers, so
    nothing is summed in low precision.

    The model is left as it was: parameter values, ``requires_grad`` flags and the
    train/eval mode of every submodule are restored, and every ``.grad`` is ``None``
    before and after (existing ``.grad`` values are discarded).

    Args:
        model: causal LM (``model(input_ids=, attention_mask=).logits``) at θ(0).
        batches: dicts of int64 tensors ``input_ids``, ``attention_mask``, ``labels``
            (B, L) as made by :func:`merit_core.batching.batches`.
        trainable: parameter subset, see :func:`trainable_parameters`.
        sketcher: reduces the gradient; ``None`` = :class:`FullSketch` (the full
            flattened gradient, d entries).
        bf16: run the forward/backward passes under bf16 autocast
            (:func:`merit_core.precision.bf16_autocast`; the caller checks device
            support with :func:`merit_core.precision.resolve_bf16`). Gradients still
            accumulate in float32; on the 7-source tiny-Llama test set the cosines
            move by at most 3.4e-4 (tests/test_precision.py).

    Returns:
        float32 array (D,): the sketch of the mean gradient.

    Raises:
        ValueError: the batches carry no response token, or ``trainable`` selects
            nothing.
    """
    sketcher = sketcher or FullSketch()
    params = trainable_parameters(model, trainable)
    selected = {id(p) for _, p in params}
    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_modes = [m.training for m in model.modules()]
    # any non-float32 parameter: float32 buffers for every selected parameter
    low_precision = {n: p for n, p in params} if any(p.dtype != torch.float32 for _, p in params) else {}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in low_precision.items()}
    n_tokens = 0
    device = all_params[0].device if all_params else torch.device("cpu")
    try:
        for p in all_params:
            p.grad = None
            p.requires_grad_(id(p) in selected)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                with bf16_autocast(device, bf16):
                    loss_sum, n = response_loss_sum(model, batch)
                if n == 0:
                    continue
                n_tokens += n
                if low_precision:
                    (loss_sum / n).backward()
                    for name, p in low_precision.items():
                        if p.grad is not None:
                            acc[name].add_(p.grad.float(), alpha=float(n))
                            p.grad = None
                else:
                    loss_sum.backward()  # float32 .grad accumulates the sum
        if n_tokens == 0:
            raise ValueError("source_gradient: the calibration batches carry no response token (all labels -100)")

        def mean_grads() -> Iterator[tuple[str, torch.Tensor]]:
            for name, p in params:
                if name in acc:
                    g = acc[name]
                elif p.grad is not None:
                    g = p.grad.float()
                else:  # parameter not reached by the loss: zero gradient
                    g = torch.zeros_like(p, dtype=torch.float32)
                yield name, g / n_tokens

        return sketcher.sketch(mean_grads())
    finally:
        for p, flag in zip(all_params, saved_flags):
            p.grad = None
            p.requires_grad_(flag)
        for m, mode in zip(model.modules(), saved_modes):
            m.training = mode


# --------------------------------------------------------------------------- matrix


def conflict_matrix(sketches: np.ndarray, kind: str = "cosine") -> np.ndarray:
    """Conflict matrix of T sources from their gradient sketches (spec step 1).

    Args:
        sketches: array (T, D), one (sketched) gradient per row, any real dtype.
        kind: ``"cosine"`` (default, the paper: C_ij = <g_i, g_j>/(||g_i|| ||g_j||),
            unit diagonal, clipped to [-1, 1]) or ``"gram"`` (raw inner products, an
            ablation).

    Returns:
        float64 array (T, T), exactly symmetric.

    Raises:
        ValueError: ``sketches`` not 2-D or empty, NaN/Inf (names the row), a zero
            row with ``kind="cosine"`` (names the row), or an unknown ``kind``.
    """
    if kind not in ("cosine", "gram"):
        raise ValueError(f"conflict_matrix: kind must be 'cosine' or 'gram', got {kind!r}")
    g = np.asarray(sketches)
    if g.ndim != 2:
        raise ValueError(f"conflict_matrix: sketches must be 2-D (T, D), got shape {g.shape}")
    if g.shape[0] < 1 or g.shape[1] < 1:
        raise ValueError(f"conflict_matrix: sketches must have T ≥ 1 rows and D ≥ 1 columns, got shape {g.shape}")
    g = g.astype(np.float64)
    bad = ~np.isfinite(g).all(axis=1)
    if bad.any():
        raise ValueError(f"conflict_matrix: sketch row {int(np.flatnonzero(bad)[0])} contains NaN or Inf")
    if kind == "cosine":
        norms = np.linalg.norm(g, axis=1)
        zero = norms == 0
        if zero.any():
            raise ValueError(
                f"conflict_matrix: sketch row {int(np.flatnonzero(zero)[0])} has zero norm; its cosine is undefined"
            )
        g = g / norms[:, None]
    c = g @ g.T
    c = 0.5 * (c + c.T)
    if kind == "cosine":
        np.fill_diagonal(c, 1.0)
        np.clip(c, -1.0, 1.0, out=c)
    return c
