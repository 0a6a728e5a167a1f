"""Streaming one-shot merge of fine-tuned branches (MERIT spec step 5).

Each operator is one small module with the maths for a single tensor
(``merge_tensor(tensors, weights, base, **kw) -> Tensor``, float32 in and out) that
declares itself in :mod:`merit_core.merge.registry` (θ(0) needed or not, weight
policy, hyper-parameters); :data:`MERGE_METHODS` maps names to them and
:func:`register` adds new ones. File handling (lazy reading, sharded writing) lives in
:mod:`merit_core.merge.io`.

:func:`merge_checkpoints` streams one tensor name at a time from every input, so peak
memory is about one output shard plus K float32 copies of one tensor, independent of
K × model size.
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

from merit_core.store.manifest import MANIFEST_NAME, write_manifest
from merit_core.merge import dare, task_arithmetic, ties, token_weighted, uniform  # noqa: F401 (they register)
from merit_core.merge.io import (
    Checkpoint,
    MergeError,
    ShardWriter,
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
    w, settings = _check_arguments(spec, inputs, weights, output, base, hyperparams)
    ckpts = [Checkpoint(p) for p in inputs]
    base_ckpt = Checkpoint(base) if spec.needs_base else None
    infos = _check_compatible(ckpts, base_ckpt)

    tmp = output.parent / f".{output.name}.merging-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, infos, max_shard_size)
        for name, info in infos.items():
            writer.add(name, _merge_one(spec, name, info, ckpts, base_ckpt, w, settings))
        record = {"weight_files": writer.close(), "copied_files": copy_side_files(ckpts[0].path, tmp),
                  **_merge_record(spec, weights, w, settings, ckpts, base_ckpt)}
        write_manifest(tmp, metadata={"merge": record, **(metadata or {})})
        _replace_dir(tmp, output)
    except BaseException:
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
) -> tuple[torch.Tensor, dict[str, int | float]]:
    """Refuse bad arguments before any file is opened; return the K float64 weights
    and the operator's hyper-parameter values (:meth:`MergeMethod.settings`)."""
    if len(inputs) == 0:
        raise MergeError("merge_checkpoints needs at least one input")
    w = _normalise_weights(weights, len(inputs), spec)
    if spec.needs_base and base is None:
        raise MergeError(f"merge method {spec.name!r} works on task vectors θ_k − θ(0) and needs base=θ(0)")
    settings = spec.settings(hyperparams)
    for p in [*inputs, *([base] if spec.needs_base else [])]:
        if Path(p).exists() and output.exists() and Path(p).resolve() == output.resolve():
            raise MergeError(f"output {output} is also an input; choose another output directory")
    return w, settings


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


def _normalise_weights(weights: Sequence[float] | None, k: int, spec: MergeMethod) -> torch.Tensor:
    """The K float64 merge weights (summing to 1) under ``spec``'s weight policy."""
    if weights is None:
        if spec.weights == "tokens":
            raise MergeError(f"{spec.name} needs weights: the trained token count N_k of every input")
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if len(weights) != k:
        raise MergeError(f"got {len(weights)} weights for {k} inputs")
    for i, x in enumerate(weights):
        if not (math.isfinite(float(x)) and float(x) > 0):
            raise MergeError(f"weight {i} is {x}; weights must be positive and finite")
    if spec.weights == "uniform":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    return w / w.sum()


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


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. Fast path: a (vectorised) sum is finite iff every entry is,
    unless the sum overflows — then the exact elementwise check decides."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _load(c: Checkpoint, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read one tensor (cast to ``dtype`` if given) and refuse NaN/Inf."""
    t = c.read(name)
    if dtype is not None:
        t = t.to(dtype)
    if t.dtype.is_floating_point and not _all_finite(t):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise MergeError(f"tensor {name!r} of input {c.path} contains {bad}")
    return t


def _merge_one(
    spec: MergeMethod,
    name: str,
    info: TensorInfo,
    ckpts: list[Checkpoint],
    base: Checkpoint | None,
    w: torch.Tensor,
    settings: dict[str, int | float],
) -> torch.Tensor:
    """Merge tensor ``name`` of every input: accumulate in float32, return the inputs' dtype."""
    if not info.dtype.is_floating_point:  # integer/bool buffers cannot be averaged: must agree
        tensors = [_load(c, name) for c in ckpts]
        for c, t in zip(ckpts[1:], tensors[1:]):
            if not torch.equal(t, tensors[0]):
                raise MergeError(f"non-float tensor {name!r} differs between {ckpts[0].path} and input {c.path}")
        return tensors[0]
    same = _unchanged(name, ckpts, base)
    if same is not None:
        return same
    acc = torch.float64 if info.dtype == torch.float64 else torch.float32
    tensors = [_load(c, name, acc) for c in ckpts]
    b = _load(base, name, acc) if base is not None else None
    merged = spec(tensors, w, b, name=name, **settings).to(info.dtype)
    if not _all_finite(merged):
        raise MergeError(f"merged tensor {name!r} is not finite in {info.dtype} (overflow; lower scale?)")
    return merged


def _unchanged(name: str, ckpts: list[Checkpoint], base: Checkpoint | None) -> torch.Tensor | None:
    """The tensor itself when every input (and θ(0), when given) holds it bit for bit,
    else None. A tensor no branch changed (a frozen vision tower, model.trainable=lm)
    thus leaves the merge as θ(0) exactly, as every operator would give it in exact
    arithmetic (a weighted mean of K equal values; zero task vectors)."""
    first = _load(ckpts[0], name)
    others = [*ckpts[1:], *([base] if base is not None else [])]
    for c in others:
        if not torch.equal(_load(c, name), first):
            return None
    return first


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
