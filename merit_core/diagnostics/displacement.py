"""Displacement and norm contraction of the merge, streamed from checkpoints.

Checkpoint functions read Hugging Face safetensors directories (single file or sharded
with ``model.safetensors.index.json``) through :class:`merit_core.merge.io.Checkpoint`
one tensor — and within a large tensor one block of rows — at a time, accumulating in
float64, so memory does not grow with model size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from merit_core.merge.io import Checkpoint, is_output_embedding

PathLike = str | os.PathLike


def _common_names(readers: Mapping[str, Checkpoint]) -> tuple[list[str], list[str]]:
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
        if is_output_embedding(name) and (missing or any(r.tied_embeddings for r in readers.values())):
            skipped.append(name)
            continue
        if missing:
            raise ValueError(f"tensor {name!r} is missing from {missing[0]!r} ({readers[missing[0]].path})")
        shapes = {lab: r.shape(name) for lab, r in readers.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"tensor {name!r} has different shapes: {shapes}")
        names.append(name)
    return names, skipped


def _zip_blocks(readers: Sequence[Checkpoint], name: str) -> Iterator[tuple[torch.Tensor, ...]]:
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
        FileNotFoundError: a directory without safetensors
            (:class:`merit_core.merge.io.MissingCheckpointError`).
    """
    labels = list(model_dirs)
    readers = {"base": Checkpoint(base_dir)}
    readers.update({f"model {lab!r}": Checkpoint(model_dirs[lab]) for lab in labels})
    names, _ = _common_names(readers)
    sq = [0.0] * len(labels)
    rs = list(readers.values())
    for name in names:
        for blocks in _zip_blocks(rs, name):
            b0 = blocks[0]
            for i, b in enumerate(blocks[1:]):
                sq[i] += float(torch.sum((b - b0) ** 2))
    return {lab: math.sqrt(s) for lab, s in zip(labels, sq)}


def _labelled(branch_dirs: Sequence[PathLike] | Mapping[str, PathLike],
              weights: Sequence[float] | Mapping[str, float]) -> tuple[list[str], list[PathLike], list[float]]:
    """Branch labels, directories and normalised weights of :func:`contraction`'s arguments."""
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
    return labels, dirs, _normalised(weights, len(dirs))


def _contraction_sums(readers: Mapping[str, Checkpoint], w: list[float], merged: bool, joint: bool) -> dict:
    """Accumulate the squared norms of :func:`contraction` block by block (float64).

    ``readers`` holds base, the K branches, then merged (if ``merged``) and joint (if ``joint``).
    """
    k = len(w)
    branch_sq = [0.0] * k
    mean_sq = var = merged_sq = resid_sq = joint_sq = 0.0
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
            if merged:
                dm = rest[0] - base
                merged_sq += float(torch.sum(dm**2))
                resid_sq += float(torch.sum((dm - mean) ** 2))
            if joint:
                joint_sq += float(torch.sum((rest[-1] - base) ** 2))
    return {"branch_sq": branch_sq, "mean_sq": mean_sq, "var": var, "merged_sq": merged_sq,
            "resid_sq": resid_sq, "joint_sq": joint_sq, "skipped": skipped}


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
        FileNotFoundError: a directory without safetensors.
    """
    labels, dirs, w = _labelled(branch_dirs, weights)
    readers = {"base": Checkpoint(base_dir)}
    readers.update({f"branch {lab!r}": Checkpoint(d) for lab, d in zip(labels, dirs)})
    extra = {"merged": merged_dir, "joint": joint_dir}
    readers.update({lab: Checkpoint(d) for lab, d in extra.items() if d is not None})
    s = _contraction_sums(readers, w, merged_dir is not None, joint_dir is not None)
    weighted = sum(wi * x for wi, x in zip(w, s["branch_sq"]))
    out: dict = {
        "branches": labels,
        "weights": w,
        "branch_sq_norms": s["branch_sq"],
        "weighted_sq_norm": weighted,
        "mean_sq_norm": s["mean_sq"],
        "variance": s["var"],
        "identity_rel_error": abs(weighted - (s["mean_sq"] + s["var"])) / max(weighted, 1e-300),
        "contraction_ratio": math.sqrt(s["mean_sq"] / weighted) if weighted > 0 else float("nan"),
        "skipped": s["skipped"],
    }
    if merged_dir is not None:
        out["merged_sq_norm"] = s["merged_sq"]
        out["merged_residual_sq"] = s["resid_sq"]
    if joint_dir is not None:
        out["joint_norm"] = math.sqrt(s["joint_sq"])
        denom = math.sqrt(s["merged_sq"] if merged_dir is not None else s["mean_sq"])
        out["joint_over_merged"] = out["joint_norm"] / denom if denom > 0 else float("inf")
    return out


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
