"""Stages *source gradient* and *conflict matrix* (MERIT spec step 1, paper §3.1): the
sketched mean calibration gradient g_t of every source at θ(0), cached in the store,
and the T×T conflict matrix C from them.

The gradients of many sources run in batches (:func:`source_gradients`, θ(0) loaded once
per batch) that :func:`plan_source_gradients` balances over workers; where the batches
run is the caller's business (flows/gradients.py: local, process pool or deployment)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from merit_core.batching import batches
from merit_core.config import MeritConfig
from merit_core.conflict import conflict_matrix, make_sketcher
from merit_core.conflict import source_gradient as calibration_gradient
from merit_core.fanout import FANOUT_FIELDS, balanced_batches
from merit_core.models import load_model
from merit_core.pipeline.layout import sketch_key
from merit_core.pipeline.mixture import load_split
from merit_core.precision import default_device, resolve_bf16
from merit_core.refs import ConflictMatrix, GradientPlan, ModelRef, SketchRef, SourceInfo
from merit_core.store import ArtifactStore, CorruptArtifactError, ObjectNotFoundError
from merit_core.store.objects import delete_checked_file, get_checked_file, has_checked_file, put_checked_file

logger = logging.getLogger("merit")


def source_sketch_key(cfg: MeritConfig, base: ModelRef, source: SourceInfo) -> str:
    """Store key of g_t for this model, source content and the settings that change it
    (conflict section except ``kind``, which only C depends on, and the execution fields
    of :mod:`merit_core.fanout`, which do not change g_t; sketcher; trainable; dtype)."""
    settings = {
        "conflict": cfg.conflict.model_dump(exclude={"kind", *FANOUT_FIELDS}),
        "sketcher": make_sketcher(cfg.conflict).settings(),
        "trainable": cfg.model.trainable,
        "dtype": cfg.model.dtype,
    }
    return sketch_key(base.sha256, source.content_hash, settings)


def source_gradient(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, source: SourceInfo) -> SketchRef:
    """Sketch of the mean calibration gradient g_t of one source at θ(0): the batch of
    :func:`source_gradients` with this one source (stored sketch reused when present)."""
    return source_gradients(cfg, store, base, [source])[0]


def source_gradients(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, sources: Sequence[SourceInfo],
                     threads: int | None = None) -> list[SketchRef]:
    """Sketches of the mean calibration gradients g_t of ``sources`` at θ(0), one batch:
    θ(0) is loaded at most once (not at all when every sketch is stored already).

    A sketch in the store for the same model, source content and settings is reused
    (adding sources costs only their own gradients) once it passes verification
    (:func:`load_sketch`); a damaged one is recomputed with a warning naming its key. Each computed sketch is committed
    as soon as it is done, so a batch that fails part way keeps what it finished and a
    retry computes only the rest. The model is left unchanged after every source
    (:func:`merit_core.conflict.source_gradient`), so for a given torch thread count a
    sketch is bit-identical whatever batch it is computed in. Computed on the GPU when
    there is one.

    Args:
        threads: torch CPU threads while computing (restored afterwards); None keeps
            torch's current setting.

    Returns:
        One SketchRef per source, in the order of ``sources``: store key and dimension of
        the float32 sketch vector, ``cached`` when it was in the store already.

    Raises:
        ValueError: a source's calibration examples carry no response token.
        merit_core.store.StoreError: the store cannot be read or written.
    """
    refs: dict[str, SketchRef] = {}
    todo: list[tuple[SourceInfo, str]] = []
    for source in sources:
        key = source_sketch_key(cfg, base, source)
        stored = _verified_sketch(store, key, source.name)
        if stored is not None:
            refs[source.name] = SketchRef(source=source.name, key=key, dim=int(stored.shape[0]), cached=True)
            logger.info("source %s: reusing cached source gradient %s", source.name, key)
        else:
            todo.append((source, key))
    if todo:
        with _torch_threads(threads):
            model, pad, device = _load_base(cfg, store, base)
            for source, key in todo:
                refs[source.name] = _compute_sketch(cfg, store, model, pad, device, source, key)
    return [refs[s.name] for s in sources]


def plan_source_gradients(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, sources: Sequence[SourceInfo],
                          workers: int) -> GradientPlan:
    """Which sketches are stored already, and the other sources in ``min(workers, n)``
    batches of about equal calibration tokens (:func:`merit_core.fanout.balanced_batches`,
    deterministic; each batch keeps the order of ``sources``). Sources without token
    counts (``calibration_tokens`` 0, older references) are balanced by calibration
    examples instead, all of them, so costs stay in one unit.

    Raises:
        ValueError: ``workers < 1``.
        merit_core.store.StoreError: the store cannot be read.
    """
    cached, todo = [], []
    for source in sources:
        key = source_sketch_key(cfg, base, source)
        stored = _verified_sketch(store, key, source.name)
        if stored is not None:
            cached.append(SketchRef(source=source.name, key=key, dim=int(stored.shape[0]), cached=True))
        else:
            todo.append(source)
    by_tokens = all(s.calibration_tokens > 0 for s in todo)
    costs = [s.calibration_tokens if by_tokens else s.calibration for s in todo]
    groups = balanced_batches(costs, workers) if todo else []
    return GradientPlan(cached=cached, batches=[[todo[i] for i in g] for g in groups],
                        batch_tokens=[sum(todo[i].calibration_tokens for i in g) for g in groups])


def collect_source_gradients(cfg: MeritConfig, store: ArtifactStore, base: ModelRef,
                             sources: Sequence[SourceInfo]) -> list[SketchRef]:
    """The sketches of ``sources`` that workers elsewhere committed, read back from the
    store (``cached`` False: this run computed them).

    Raises:
        SketchStoreError: a sketch is missing (names the sources and keys).
        CorruptArtifactError: a sketch fails verification (names its key).
    """
    keys = [(s.name, source_sketch_key(cfg, base, s)) for s in sources]
    missing = [f"{name} ({key})" for name, key in keys if not has_checked_file(store, key)]
    if missing:
        raise SketchStoreError(f"{len(missing)} source gradient sketch(es) missing from store {store.uri}: "
                               + ", ".join(missing))
    return [_stored_ref(store, key, name, cached=False) for name, key in keys]


class SketchStoreError(RuntimeError):
    """A source-gradient sketch that a worker should have committed is not in the store."""


def _stored_ref(store: ArtifactStore, key: str, name: str, cached: bool) -> SketchRef:
    return SketchRef(source=name, key=key, dim=int(load_sketch(store, key).shape[0]), cached=cached)


def _verified_sketch(store: ArtifactStore, key: str, name: str) -> np.ndarray | None:
    """The stored sketch at ``key`` if it is there and passes :func:`load_sketch`'s
    checks, else None (to be recomputed). A damaged or missing sketch, or one stored
    without a checksum (before checksums were written), is removed with a warning naming
    the source and the key."""
    if not has_checked_file(store, key):
        if store.exists(key):
            logger.warning("source %s: cached source gradient sketch %s has no checksum and cannot be verified; "
                           "recomputing it", name, store.uri_for(key))
            delete_checked_file(store, key)
        return None
    try:
        return load_sketch(store, key)
    except (CorruptArtifactError, ObjectNotFoundError) as e:  # damaged, or the object gone beside its checksum
        logger.warning("source %s: cached source gradient sketch failed verification, recomputing it: %s", name, e)
        delete_checked_file(store, key)
        return None


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Within the block, torch uses ``threads`` CPU threads (None: unchanged)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_base(cfg: MeritConfig, store: ArtifactStore, base: ModelRef) -> tuple[torch.nn.Module, int, torch.device]:
    """θ(0) on the default device, with the pad id its batches use."""
    model, tokenizer = load_model(store.fetch_dir(base.key), dtype=cfg.model.dtype,
                                  trust_remote_code=cfg.model.trust_remote_code)
    device = default_device()
    model.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, pad, device


def _compute_sketch(cfg: MeritConfig, store: ArtifactStore, model: torch.nn.Module, pad: int,
                    device: torch.device, source: SourceInfo, key: str) -> SketchRef:
    """g_t of one source with the loaded θ(0), committed to the store at ``key``."""
    calib = load_split(store, source, "calibration")
    logger.info("source %s: calibration gradient at θ(0) over %d examples", source.name, len(calib))
    vec = calibration_gradient(model, batches(calib, cfg.conflict.batch_size, pad), trainable=cfg.model.trainable,
                               sketcher=make_sketcher(cfg.conflict),
                               bf16=resolve_bf16(cfg.conflict.bf16, device, "conflict.bf16"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sketch.npy"
        np.save(path, vec.astype(np.float32))
        put_checked_file(store, key, path)  # the object, then its checksum
    logger.info("source %s: computed source gradient sketch (dim %d) -> %s", source.name, vec.shape[0], key)
    return SketchRef(source=source.name, key=key, dim=int(vec.shape[0]), cached=False)


def load_sketch(store: ArtifactStore, key: str) -> np.ndarray:
    """One stored sketch, verified: float32 array of shape (sketch dim,), read without
    pickle after its bytes matched the checksum written with it
    (:func:`merit_core.store.objects.get_checked_file`).

    Raises:
        ObjectNotFoundError: the sketch or its checksum is not in the store.
        CorruptArtifactError: the bytes differ from the checksum, the file is not a
            ``.npy`` array, or the array is not a finite 1-D float32 vector (names the key).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = get_checked_file(store, key, Path(tmp) / "sketch.npy")
        try:
            vec = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise CorruptArtifactError(f"sketch {store.uri_for(key)} is not a readable .npy array: {e}") from None
    if vec.ndim != 1 or vec.dtype != np.float32 or vec.size == 0 or not np.isfinite(vec).all():
        raise CorruptArtifactError(f"sketch {store.uri_for(key)} is not a finite 1-D float32 vector "
                                   f"(shape {vec.shape}, dtype {vec.dtype})")
    return vec


def build_conflict_matrix(cfg: MeritConfig, store: ArtifactStore, sketches: Sequence[SketchRef]) -> ConflictMatrix:
    """The T×T conflict matrix C of the stored sketches, in their order (cosine by
    default, ``cfg.conflict.kind``)."""
    G = np.stack([load_sketch(store, s.key) for s in sketches])
    C = conflict_matrix(G, kind=cfg.conflict.kind)
    return ConflictMatrix(names=[s.source for s in sketches], kind=cfg.conflict.kind, matrix=C.tolist())
