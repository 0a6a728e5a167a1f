"""Streaming one-shot merge of fine-tuned branches (MERIT spec step 5).

Each operator is one small module with the maths for a single tensor
(``merge_tensor(tensors, weights, base, **kw) -> Tensor``) that declares itself in
:mod:`merit_core.merge.registry` (θ(0) needed or not, weight policy, hyper-parameters,
elementwise or not); :data:`MERGE_METHODS` maps names to them and :func:`register` adds
new ones. Files are read by :mod:`merit_core.merge.io` (positioned reads, no memory
maps) and written by :mod:`merit_core.merge.shards` (streamed, sha256 while writing);
:mod:`merit_core.merge.stream` runs the loop between them.

The default ``token_weighted`` merge is θ̄ = Σ_k N_k θ_k / Σ_k N_k (paper §3.4): summed
in float64, divided once and rounded once, so a bfloat16/float16 result is the correctly
rounded float64 mean in every element. Its peak memory (and that of the other
elementwise operators: ``uniform``, ``task_arithmetic``) is a fixed budget of a few
hundred MB, independent of model size and K; ``ties`` and ``dare`` hold one whole
tensor of every input at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from merit_core.merge import dare, task_arithmetic, ties, token_weighted, uniform  # noqa: F401 (they register)
from merit_core.merge.io import (
    Checkpoint,
    MergeError,
    TensorInfo,
    copy_side_files,
    is_output_embedding,
)
from merit_core.merge.registry import (
    MERGE_METHODS,
    MergeMethod,
    get_method,
    hyperparameters,
    register,
)
from merit_core.merge.shards import ShardWriter
from merit_core.merge.stream import MergeJob, stream_merge
from merit_core.store.manifest import MANIFEST_NAME, write_manifest

__all__ = ["MERGE_METHODS", "MergeError", "MergeMethod", "get_method", "merge_checkpoints", "register"]

log = logging.getLogger(__name__)


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None,
    output: str | os.PathLike,
    method: str = "token_weighted",
    base: str | os.PathLike | None = None,
    *,
    max_shard_size: str | int = "2GB",
    metadata: dict[str, Any] | None = None,
    **hyperparams: float,
) -> Path:
    """Merge K Hugging Face safetensors model directories into one HF-loadable directory.

    Args:
        inputs: the K branch directories (single-file or sharded safetensors).
        weights: per-branch weights under the operator's weight policy (registry):
            ``token_weighted`` needs the trained token counts N_k (w_k = N_k / Σ N_j),
            ``uniform`` uses 1/K, the others normalise these (1/K for ``None``).
        output: the merged directory, returned. It is built in a hidden sibling
            directory, gets its ``manifest.json`` last and is then renamed into place
            (an existing ``output`` is replaced). A failed merge leaves no ``output``.
        method: a registered operator (a key of :data:`MERGE_METHODS`).
        base: θ(0), required by operators that declare ``needs_base`` (``task_arithmetic``,
            ``ties``, ``dare``); ignored by the others.
        max_shard_size: output shard limit (``"2GB"``, ``"50KB"`` or bytes).
        metadata: extra JSON fields stored in the manifest next to the merge record.
        **hyperparams: registered hyper-parameters (``scale`` λ, ``density``, ``seed``, ...),
            each checked against its declared range; the operator gets the ones it
            declares (defaults for those not given), the manifest records them.

    Raises:
        MergeError: unknown method or hyper-parameter, a value out of range, bad
            weights, missing base, or inputs that disagree (tensor names, shapes,
            dtypes, vocabulary size) or hold NaN/Inf — the message names the tensor
            and the input.
    """
    spec = get_method(method)
    output = Path(output)
    job = _check_arguments(spec, inputs, weights, output, base, hyperparams)
    ckpts = [Checkpoint(p) for p in inputs]
    base_ckpt = Checkpoint(base) if spec.needs_base else None
    infos = _check_compatible(ckpts, base_ckpt)

    tmp = output.parent / f".{output.name}.merging-{uuid.uuid4().hex[:8]}"
    writer = None
    try:
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, infos, max_shard_size)
        stream_merge(job, ckpts, base_ckpt, writer)
        record = {"weight_files": writer.close(), "copied_files": copy_side_files(ckpts[0].path, tmp),
                  **_merge_record(spec, weights, job.weights, job.settings, ckpts, base_ckpt)}
        write_manifest(tmp, metadata={"merge": record, **(metadata or {})})
        _replace_dir(tmp, output)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d inputs with %s into %s", len(ckpts), method, output)
    return output


def _check_arguments(
    spec: MergeMethod,
    inputs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None,
    output: Path,
    base: str | os.PathLike | None,
    hyperparams: dict[str, int | float],
) -> MergeJob:
    """Refuse bad arguments before any file is opened; return the operator with its
    weights (normalised and as given) and hyper-parameter values (:meth:`MergeMethod.settings`)."""
    if len(inputs) == 0:
        raise MergeError("merge_checkpoints needs at least one input")
    counts = _counts(weights, len(inputs), spec)
    if spec.needs_base and base is None:
        raise MergeError(f"merge method {spec.name!r} works on task vectors θ_k − θ(0) and needs base=θ(0)")
    settings = spec.settings(hyperparams)
    for p in [*inputs, *([base] if spec.needs_base else [])]:
        if Path(p).exists() and output.exists() and Path(p).resolve() == output.resolve():
            raise MergeError(f"output {output} is also an input; choose another output directory")
    return MergeJob(spec, counts / counts.sum(), counts, settings)


def _merge_record(spec: MergeMethod, weights: Sequence[float] | None, w: torch.Tensor,
                  settings: dict[str, int | float], ckpts: list[Checkpoint], base: Checkpoint | None) -> dict:
    """The manifest's merge record: operator, weights, inputs, hyper-parameters (every
    registered one; ``None`` where the operator does not take it)."""
    return {
        "method": spec.name,
        "weights": w.tolist(),
        "raw_weights": None if weights is None else [float(x) for x in weights],
        "inputs": [c.path.name for c in ckpts],
        "input_manifests_sha256": [_manifest_sha(c.path) for c in ckpts],
        "base": base.path.name if base else None,
        **{name: settings.get(name) for name in hyperparameters()},
    }


def _counts(weights: Sequence[float] | None, k: int, spec: MergeMethod) -> torch.Tensor:
    """The K positive float64 weights before normalisation under ``spec``'s weight
    policy: the given ones (token counts N_k for ``tokens``), or ones (``uniform``, or
    no weights given)."""
    if weights is None:
        if spec.weights == "tokens":
            raise MergeError(f"{spec.name} needs weights: the trained token count N_k of every input")
        return torch.ones(k, dtype=torch.float64)
    if len(weights) != k:
        raise MergeError(f"got {len(weights)} weights for {k} inputs")
    for i, x in enumerate(weights):
        if not (math.isfinite(float(x)) and float(x) > 0):
            raise MergeError(f"weight {i} is {x}; weights must be positive and finite")
    if spec.weights == "uniform":
        return torch.ones(k, dtype=torch.float64)
    return _power_of_two_scaled([float(x) for x in weights])


def _power_of_two_scaled(weights: list[float]) -> torch.Tensor:
    """``weights`` times the power of two that brings the largest into [0.5, 1), float64.

    Scaling by a power of two is exact, so the merged values are unchanged bit for bit,
    while Σ w_k and w_k θ_k can no longer overflow (weights of 1e308 would otherwise sum
    to inf and give an all-zero model).

    Raises:
        MergeError: a weight that underflows to zero or a subnormal after the scaling
            (a ratio to the largest weight below about 2^-1021): it would be ignored.
    """
    _, exp = math.frexp(max(weights))
    scaled = [math.ldexp(x, -exp) for x in weights]
    for i, (x, y) in enumerate(zip(weights, scaled)):
        if y < 2.0 ** -1021:
            raise MergeError(
                f"weight {i} is {x}: negligible next to the largest weight {max(weights)} "
                "(ratio below 2^-1021); drop that input or use comparable weights"
            )
    return torch.tensor(scaled, dtype=torch.float64)


def _check_compatible(ckpts: list[Checkpoint], base: Checkpoint | None) -> dict[str, TensorInfo]:
    """Compare headers and configs of all inputs (and base) before anything is written.

    Returns the tensors to write, in the first input's order; with tied word embeddings
    (``tie_word_embeddings: true``) ``*lm_head.weight`` is dropped from every input.
    """
    first = ckpts[0]
    everyone = ckpts + ([base] if base is not None else [])
    for c in everyone:
        if not (c.path / "config.json").is_file():
            raise MergeError(f"input {c.path} has no config.json")
    for c in everyone[1:]:
        for key in ("vocab_size", "tie_word_embeddings"):
            a, b = first.config_value(key), c.config_value(key)
            if a != b:
                raise MergeError(f"config {key} differs: {a} in {first.path}, {b} in {c.path}")

    def kept(c: Checkpoint) -> dict[str, TensorInfo]:
        if not first.tied_embeddings:
            return c.tensors
        return {n: i for n, i in c.tensors.items() if not is_output_embedding(n)}

    ref = kept(first)
    for c in everyone[1:]:
        other = kept(c)
        missing = [n for n in ref if n not in other]
        if missing:
            raise MergeError(f"tensor {missing[0]!r} of {first.path} is missing from input {c.path}")
        extra = [n for n in other if n not in ref]
        if extra:
            raise MergeError(f"tensor {extra[0]!r} of input {c.path} is not in {first.path}")
        for n, info in ref.items():
            o = other[n]
            if o.shape != info.shape:
                raise MergeError(
                    f"tensor {n!r} has shape {list(o.shape)} in input {c.path} but {list(info.shape)} in {first.path}"
                )
            if c is base:  # θ(0) may be stored in another float dtype; it is read in float32
                if o.dtype.is_floating_point != info.dtype.is_floating_point:
                    raise MergeError(
                        f"tensor {n!r} has dtype {o.dtype} in base {c.path} but {info.dtype} in {first.path}"
                    )
            elif o.dtype != info.dtype:
                raise MergeError(f"tensor {n!r} has dtype {o.dtype} in input {c.path} but {info.dtype} in {first.path}")
    return ref


def _manifest_sha(path: Path) -> str | None:
    p = path / MANIFEST_NAME
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing an existing ``dst`` (old one removed after)."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
