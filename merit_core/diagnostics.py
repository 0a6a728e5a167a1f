"""Diagnostics of the merge (MERIT_SPEC.md, "Theory the diagnostics compute").

With θ(0) the base, θ_i the branches, δ_i = θ_i − θ(0), weights w (normalised to sum 1)
and δ̄ = Σ w_i δ_i:

- :func:`displacement_norms`: ||θ − θ(0)||_2 of whole checkpoints (paper Table 1:
  ||θ_joint − θ(0)|| / ||θ̄ − θ(0)|| = 2.43 … 2.92).
- :func:`contraction`: Σ w_i ||δ_i||² = ||δ̄||² + Σ w_i ||δ_i − δ̄||² (holds for any
  convex weights; the spec states the uniform case), hence ||θ̄ − θ(0)||² ≤ Σ w_i ||δ_i||².
- :func:`lmc_barrier`: max_α [L((1−α)θ_a + αθ_b) − ((1−α)L_a + αL_b)] on 21 points
  (paper: 0.0 on all 10 paths).
- :func:`noise_flatness`: loss increase under Gaussian weight noise, σ ∈ {0.01, 0.05, 0.1}.
- :func:`merge_gain`: G = Σ w_i L(θ_i) − L(θ̄) ≈ ½ Σ w_i (δ_i − δ̄)ᵀ H (δ_i − δ̄).

Checkpoint functions stream Hugging Face safetensors directories (single file or sharded
with ``model.safetensors.index.json``) one tensor — and within a large tensor one block
of rows — at a time, accumulating in float64, so memory does not grow with model size.
Losses are :func:`merit_core.batching.mean_response_loss` (nats per response token).
This module never imports prefect.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from merit_core.batching import mean_response_loss
from merit_core.data.types import TokenizedExample

PathLike = str | os.PathLike
StateOrDir = Mapping[str, torch.Tensor] | PathLike

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_CHUNK_ELEMENTS = 1 << 22  # rows per block chosen so a float64 block is ≤ 32 MiB


# ---------------------------------------------------------------- streaming reader


class CheckpointReader:
    """Lazy tensor access to a safetensors HF directory (single file or sharded).

    ``names`` lists the stored tensor names; :meth:`blocks` yields a tensor as float64
    row blocks. Use as a context manager (closes the open files).

    Raises:
        FileNotFoundError: if the directory holds no safetensors file.
    """

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.directory / f for name, f in weight_map.items()}
        else:
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}")
            self._file_of = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    for name in h.keys():
                        self._file_of[name] = f
        self._handles: dict[Path, object] = {}
        self.tied_embeddings = _tied(self.directory)

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        f = self._file_of[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt").__enter__()
        return self._handles[f]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor in its stored dtype."""
        return self._handle(name).get_tensor(name)

    def blocks(self, name: str, chunk_elements: int = _CHUNK_ELEMENTS) -> Iterator[torch.Tensor]:
        """The tensor as float64 blocks of whole rows (dim 0), in order."""
        shape = self.shape(name)
        if len(shape) == 0 or shape[0] == 0:
            yield self.get(name).to(torch.float64)
            return
        row = math.prod(shape[1:]) or 1
        step = max(1, chunk_elements // row)
        sl = self._handle(name).get_slice(name)
        for start in range(0, shape[0], step):
            yield sl[start : start + step].to(torch.float64)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tied(directory: Path) -> bool | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text())
    tie = data.get("tie_word_embeddings")
    if tie is None and isinstance(data.get("text_config"), dict):
        tie = data["text_config"].get("tie_word_embeddings")
    return tie


def _is_output_embedding(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


def _common_names(readers: Mapping[str, CheckpointReader]) -> tuple[list[str], list[str]]:
    """Tensor names to compare (base order) and the skipped tied output embeddings.

    A tied ``lm_head.weight`` (config ``tie_word_embeddings``, or stored in only some
    directories) is skipped: it repeats the input embedding and would count it twice.

    Raises:
        ValueError: a tensor missing from one directory, or different shapes.
    """
    base = next(iter(readers.values()))
    union = dict.fromkeys(base.names)
    for r in readers.values():
        union.update(dict.fromkeys(r.names))
    names, skipped = [], []
    for name in union:
        missing = [lab for lab, r in readers.items() if name not in r]
        if _is_output_embedding(name) and (missing or any(r.tied_embeddings for r in readers.values())):
            skipped.append(name)
            continue
        if missing:
            raise ValueError(f"tensor {name!r} is missing from {missing[0]!r} ({readers[missing[0]].directory})")
        shapes = {lab: r.shape(name) for lab, r in readers.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"tensor {name!r} has different shapes: {shapes}")
        names.append(name)
    return names, skipped


def _zip_blocks(readers: Sequence[CheckpointReader], name: str) -> Iterator[tuple[torch.Tensor, ...]]:
    return zip(*(r.blocks(name) for r in readers))


def _normalised(weights: Sequence[float], k: int, what: str = "weights") -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != k:
        raise ValueError(f"{what}: expected {k} values, got {len(w)}")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"{what} must be finite and ≥ 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"{what} must not all be 0, got {w}")
    return [x / total for x in w]


# ---------------------------------------------------------------- norms


def displacement_norms(base_dir: PathLike, model_dirs: Mapping[str, PathLike]) -> dict[str, float]:
    """||θ − θ(0)||_2 over all tensors, for each model directory.

    Args:
        base_dir: θ(0) as a safetensors HF directory.
        model_dirs: label -> directory with the same tensors (names and shapes).

    Returns:
        label -> Euclidean norm of the parameter displacement (float64 accumulation,
        parameter units). A tied ``lm_head.weight`` is counted once (as the embedding).

    Raises:
        ValueError: a tensor missing from a directory or a shape mismatch (named).
        FileNotFoundError: a directory without safetensors.
    """
    labels = list(model_dirs)
    readers = {"base": CheckpointReader(base_dir)}
    readers.update({f"model {lab!r}": CheckpointReader(model_dirs[lab]) for lab in labels})
    try:
        names, _ = _common_names(readers)
        sq = [0.0] * len(labels)
        rs = list(readers.values())
        for name in names:
            for blocks in _zip_blocks(rs, name):
                b0 = blocks[0]
                for i, b in enumerate(blocks[1:]):
                    sq[i] += float(torch.sum((b - b0) ** 2))
    finally:
        for r in readers.values():
            r.close()
    return {lab: math.sqrt(s) for lab, s in zip(labels, sq)}


def contraction(
    base_dir: PathLike,
    branch_dirs: Sequence[PathLike] | Mapping[str, PathLike],
    weights: Sequence[float] | Mapping[str, float],
    merged_dir: PathLike | None = None,
    joint_dir: PathLike | None = None,
) -> dict:
    """Norm contraction of the merge (spec: "norm contraction"), streamed in float64.

    With w normalised to sum 1 (token counts may be passed as they are), δ_i = θ_i − θ(0),
    δ̄ = Σ w_i δ_i:  Σ w_i ||δ_i||² = ||δ̄||² + Σ w_i ||δ_i − δ̄||²; each side is
    accumulated separately so ``identity_rel_error`` checks it.

    Args:
        base_dir: θ(0). branch_dirs: K branch directories (sequence, or label -> dir).
        weights: K non-negative weights (sequence in branch order, or label -> weight).
        merged_dir: optional θ̄ written by the merge; adds ||θ̄ − θ(0)||² and the residual
            ||θ̄ − (θ(0) + δ̄)||² (0 up to rounding for a token-weighted merge).
        joint_dir: optional joint-training checkpoint; adds ||δ_joint|| and the paper's
            ratio ||δ_joint|| / ||θ̄ − θ(0)|| (merged_dir if given, else δ̄).

    Returns:
        dict of floats (squared norms in parameter units²) and lists:
        ``weights`` (normalised), ``branch_sq_norms`` (||δ_i||²), ``weighted_sq_norm``
        (Σ w_i||δ_i||²), ``mean_sq_norm`` (||δ̄||²), ``variance`` (Σ w_i||δ_i − δ̄||²),
        ``identity_rel_error`` (|lhs − rhs| / max(lhs, tiny)), ``contraction_ratio``
        (||δ̄|| / sqrt(Σ w_i||δ_i||²) ≤ 1), and when given ``merged_sq_norm``,
        ``merged_residual_sq``, ``joint_norm``, ``joint_over_merged``; ``skipped``: tied
        tensors left out.

    Raises:
        ValueError: no branch, wrong number / negative weights, tensor mismatches.
    """
    if isinstance(branch_dirs, Mapping):
        labels, dirs = list(branch_dirs), list(branch_dirs.values())
    else:
        dirs = list(branch_dirs)
        labels = [str(i) for i in range(len(dirs))]
    if not dirs:
        raise ValueError("contraction: no branch directories given")
    if isinstance(weights, Mapping):
        missing = [lab for lab in labels if lab not in weights]
        if missing:
            raise ValueError(f"contraction: no weight for branches {missing}")
        weights = [weights[lab] for lab in labels]
    w = _normalised(weights, len(dirs))
    k = len(dirs)
    readers = {"base": CheckpointReader(base_dir)}
    readers.update({f"branch {lab!r}": CheckpointReader(d) for lab, d in zip(labels, dirs)})
    if merged_dir is not None:
        readers["merged"] = CheckpointReader(merged_dir)
    if joint_dir is not None:
        readers["joint"] = CheckpointReader(joint_dir)
    branch_sq = [0.0] * k
    mean_sq = var = merged_sq = resid_sq = joint_sq = 0.0
    try:
        names, skipped = _common_names(readers)
        rs = list(readers.values())
        for name in names:
            for blocks in _zip_blocks(rs, name):
                base, branches, rest = blocks[0], blocks[1 : k + 1], blocks[k + 1 :]
                deltas = [b - base for b in branches]
                mean = sum(wi * d for wi, d in zip(w, deltas))
                mean_sq += float(torch.sum(mean**2))
                for i, d in enumerate(deltas):
                    branch_sq[i] += float(torch.sum(d**2))
                    var += w[i] * float(torch.sum((d - mean) ** 2))
                j = 0
                if merged_dir is not None:
                    dm = rest[j] - base
                    merged_sq += float(torch.sum(dm**2))
                    resid_sq += float(torch.sum((dm - mean) ** 2))
                    j += 1
                if joint_dir is not None:
                    joint_sq += float(torch.sum((rest[j] - base) ** 2))
    finally:
        for r in readers.values():
            r.close()
    weighted = sum(wi * s for wi, s in zip(w, branch_sq))
    out: dict = {
        "branches": labels,
        "weights": w,
        "branch_sq_norms": branch_sq,
        "weighted_sq_norm": weighted,
        "mean_sq_norm": mean_sq,
        "variance": var,
        "identity_rel_error": abs(weighted - (mean_sq + var)) / max(weighted, 1e-300),
        "contraction_ratio": math.sqrt(mean_sq / weighted) if weighted > 0 else float("nan"),
        "skipped": skipped,
    }
    if merged_dir is not None:
        out["merged_sq_norm"] = merged_sq
        out["merged_residual_sq"] = resid_sq
    if joint_dir is not None:
        out["joint_norm"] = math.sqrt(joint_sq)
        denom = math.sqrt(merged_sq if merged_dir is not None else mean_sq)
        out["joint_over_merged"] = out["joint_norm"] / denom if denom > 0 else float("inf")
    return out


# ---------------------------------------------------------------- in-memory helpers


def load_state(source: StateOrDir) -> Mapping[str, torch.Tensor]:
    """A state dict: returned as is, or read whole from a safetensors HF directory."""
    if isinstance(source, Mapping):
        return source
    with CheckpointReader(source) as r:
        return {name: r.get(name) for name in r.names}


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


# ---------------------------------------------------------------- loss landscape


@torch.no_grad()
def lmc_barrier(
    model: torch.nn.Module,
    state_a: StateOrDir,
    state_b: StateOrDir,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    points: int = 21,
    batch_size: int = 8,
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
    a, b = load_state(state_a), load_state(state_b)
    pairs = []
    for names, t in _named_tensors(model, include_buffers=True):
        ta, tb = _lookup(a, names), _lookup(b, names)
        is_param = isinstance(t, torch.nn.Parameter)
        if ta is None or tb is None:
            if is_param:
                side = "state_a" if ta is None else "state_b"
                raise ValueError(f"parameter {names[0]!r} is missing from {side}")
            continue
        for label, s in (("state_a", ta), ("state_b", tb)):
            if tuple(s.shape) != tuple(t.shape):
                raise ValueError(
                    f"parameter {names[0]!r}: shape {tuple(s.shape)} in {label}, model has {tuple(t.shape)}"
                )
        pairs.append((t, ta.to(t.device, torch.float32), tb.to(t.device, torch.float32)))
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
            losses.append(mean_response_loss(model, examples, pad_token_id, batch_size))
    la, lb = losses[0], losses[-1]
    excess = [loss - ((1 - al) * la + al * lb) for al, loss in zip(alphas, losses)]
    return {"alphas": alphas, "losses": losses, "excess": excess, "barrier": max(excess), "loss_a": la, "loss_b": lb}


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
        base_loss = mean_response_loss(model, examples, pad_token_id, batch_size)
        sums = [0.0] * len(sigmas)
        for d in range(draws):
            for k, sigma in enumerate(sigmas):
                gen = torch.Generator(device="cpu").manual_seed(seed + d)
                for p in params:
                    orig = originals[id(p)]
                    z = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device)
                    scale = float(orig.float().pow(2).mean().sqrt()) if relative else 1.0
                    p.copy_(orig.float() + (sigma * scale) * z)
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


def merge_gain(losses_branches: Sequence[float], weights: Sequence[float], loss_merged: float) -> float:
    """Merge gain G = Σ w_i L(θ_i) − L(θ̄) (spec; ≈ ½ Σ w_i (δ_i − δ̄)ᵀ H (δ_i − δ̄)).

    Args:
        losses_branches: L(θ_i) of each branch on the same data (nats/token).
        weights: branch weights (e.g. token counts), normalised here to sum 1.
        loss_merged: L(θ̄) on that data.

    Returns:
        G in nats/token; positive when the merged model beats the branches' weighted loss.

    Raises:
        ValueError: length mismatch, negative / all-zero weights, no branch.
    """
    if not losses_branches:
        raise ValueError("merge_gain: no branch losses")
    w = _normalised(weights, len(losses_branches))
    return sum(wi * float(li) for wi, li in zip(w, losses_branches)) - float(loss_merged)
