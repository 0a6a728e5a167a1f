"""Streaming one-shot merge of fine-tuned branches (MERIT spec step 5).

Each operator is one small module with the maths for a single tensor
(``merge_tensor(tensors, weights, base, **kw) -> Tensor``, float32 in and out);
:data:`MERGE_METHODS` maps names to them and :func:`register` adds new ones. File
handling (lazy reading, sharded writing) lives in :mod:`merit_core.merge.io`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from merit_core.store.manifest import MANIFEST_NAME, write_manifest
from merit_core.merge import dare, task_arithmetic, ties, token_weighted, uniform
from merit_core.merge.io import Checkpoint, MergeError, ShardWriter, TensorInfo, copy_side_files

__all__ = ["MERGE_METHODS", "MergeError", "MergeMethod", "merge_checkpoints", "register"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeMethod:
    """A registered operator: ``fn(tensors, weights, base, **kw)`` for one tensor.

    ``needs_base``: the operator works on task vectors θ_k − θ(0) and requires ``base``.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool = False

    def __call__(self, tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None, **kw):
        return self.fn(tensors, weights, base, **kw)


MERGE_METHODS: dict[str, MergeMethod] = {
    m.NAME: MergeMethod(m.NAME, m.merge_tensor, m.NEEDS_BASE)
    for m in (token_weighted, uniform, task_arithmetic, ties, dare)
}


def register(name: str, *, needs_base: bool = False):
    """Decorator adding a per-tensor operator to :data:`MERGE_METHODS` under ``name``."""

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        MERGE_METHODS[name] = MergeMethod(name, fn, needs_base)
        return fn

    return deco


def merge_checkpoints(
    inputs: Sequence[str | os.PathLike],
    weights: Sequence[float] | None,
    output: str | os.PathLike,
    method: str = "token_weighted",
    base: str | os.PathLike | None = None,
    *,
    scale: float = 1.0,
    density: float = 0.2,
    seed: int = 0,
    max_shard_size: str | int = "2GB",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Merge K Hugging Face safetensors model directories into one HF-loadable directory.

    Args:
        inputs: the K branch directories (single-file or sharded safetensors).
        weights: per-branch weights; for ``token_weighted`` the branches' trained token
            counts N_k (required), normalised to w_k = N_k / Σ N_j. Other methods use
            equal weights when ``None``; ``uniform`` always uses equal weights.
        output: the merged directory. It is built in a hidden sibling directory, gets
            its ``manifest.json`` last and is then renamed into place (an existing
            ``output`` is replaced). A failed merge leaves no ``output``.
        method: a key of :data:`MERGE_METHODS`.
        base: θ(0), required by ``task_arithmetic``, ``ties`` and ``dare``.
        scale, density, seed: λ, kept fraction and mask seed of the task-vector methods.
        max_shard_size: output shard limit (``"2GB"``, ``"50KB"`` or bytes).
        metadata: extra JSON fields stored in the manifest next to the merge record.

    Returns:
        The output directory.

    Raises:
        MergeError: unknown method, bad weights, missing base, or inputs that disagree
            (tensor names, shapes, dtypes, vocabulary size) or hold NaN/Inf — the
            message names the tensor and the input.
    """
    spec = MERGE_METHODS.get(method)
    if spec is None:
        raise MergeError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    if len(inputs) == 0:
        raise MergeError("merge_checkpoints needs at least one input")
    w = _normalise_weights(weights, len(inputs), method)
    if spec.needs_base and base is None:
        raise MergeError(f"merge method {method!r} works on task vectors θ_k − θ(0) and needs base=θ(0)")
    if not (math.isfinite(scale) and scale > 0):
        raise MergeError(f"scale must be a positive finite number, got {scale}")
    if not 0 < density <= 1:
        raise MergeError(f"density must be in (0, 1], got {density}")

    output = Path(output)
    sources = [Path(p) for p in inputs] + ([Path(base)] if spec.needs_base else [])
    for p in sources:
        if p.exists() and output.exists() and p.resolve() == output.resolve():
            raise MergeError(f"output {output} is also an input; choose another output directory")

    ckpts = [Checkpoint(p) for p in inputs]
    base_ckpt = Checkpoint(base) if spec.needs_base else None
    infos = _check_compatible(ckpts, base_ckpt)

    tmp = output.parent / f".{output.name}.merging-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, infos, max_shard_size)
        kw = {"scale": scale, "density": density, "seed": seed}
        for name, info in infos.items():
            writer.add(name, _merge_one(spec, name, info, ckpts, base_ckpt, w, kw))
        weight_files = writer.close()
        copied = copy_side_files(ckpts[0].path, tmp)
        record = {
            "method": method,
            "weights": w.tolist(),
            "raw_weights": None if weights is None else [float(x) for x in weights],
            "inputs": [c.path.name for c in ckpts],
            "input_manifests_sha256": [_manifest_sha(c.path) for c in ckpts],
            "base": base_ckpt.path.name if base_ckpt else None,
            "scale": scale if spec.needs_base else None,
            "density": density if method in ("ties", "dare") else None,
            "seed": seed if method == "dare" else None,
            "weight_files": weight_files,
            "copied_files": copied,
        }
        write_manifest(tmp, metadata={"merge": record, **(metadata or {})})
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("merged %d inputs with %s into %s", len(ckpts), method, output)
    return output


def _normalise_weights(weights: Sequence[float] | None, k: int, method: str) -> torch.Tensor:
    if weights is None:
        if method == "token_weighted":
            raise MergeError("token_weighted needs weights: the trained token count N_k of every input")
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if len(weights) != k:
        raise MergeError(f"got {len(weights)} weights for {k} inputs")
    for i, x in enumerate(weights):
        if not (math.isfinite(float(x)) and float(x) > 0):
            raise MergeError(f"weight {i} is {x}; weights must be positive and finite")
    if method == "uniform":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    return w / w.sum()


def _is_tied(c: Checkpoint) -> bool:
    return bool(c.config_value("tie_word_embeddings"))


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
    tied = _is_tied(first)

    def kept(c: Checkpoint) -> dict[str, TensorInfo]:
        if not tied:
            return c.tensors
        return {n: i for n, i in c.tensors.items() if not (n == "lm_head.weight" or n.endswith(".lm_head.weight"))}

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
    kw: dict[str, Any],
) -> torch.Tensor:
    """Merge tensor ``name`` of every input: accumulate in float32, return the inputs' dtype."""
    if not info.dtype.is_floating_point:  # integer/bool buffers cannot be averaged: must agree
        tensors = [_load(c, name) for c in ckpts]
        for c, t in zip(ckpts[1:], tensors[1:]):
            if not torch.equal(t, tensors[0]):
                raise MergeError(f"non-float tensor {name!r} differs between {ckpts[0].path} and input {c.path}")
        return tensors[0]
    acc = torch.float64 if info.dtype == torch.float64 else torch.float32
    tensors = [_load(c, name, acc) for c in ckpts]
    b = _load(base, name, acc) if base is not None else None
    merged = spec(tensors, w, b, name=name, **kw).to(info.dtype)
    if not _all_finite(merged):
        raise MergeError(f"merged tensor {name!r} is not finite in {info.dtype} (overflow; lower scale?)")
    return merged


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
