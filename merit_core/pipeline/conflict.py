"""Stages *source gradient* and *conflict matrix* (MERIT spec step 1, paper §3.1): the
sketched mean calibration gradient g_t of every source at θ(0), cached in the store,
and the T×T conflict matrix C from them."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from merit_core.batching import batches
from merit_core.config import MeritConfig
from merit_core.conflict import conflict_matrix, make_sketcher
from merit_core.conflict import source_gradient as calibration_gradient
from merit_core.models import load_model
from merit_core.pipeline.layout import sketch_key
from merit_core.pipeline.mixture import load_split
from merit_core.precision import default_device, resolve_bf16
from merit_core.refs import ConflictMatrix, ModelRef, SketchRef, SourceInfo
from merit_core.store import ArtifactStore

logger = logging.getLogger("merit")


def source_sketch_key(cfg: MeritConfig, base: ModelRef, source: SourceInfo) -> str:
    """Store key of g_t for this model, source content and the settings that change it
    (conflict section except ``kind``, which only C depends on; sketcher; trainable; dtype)."""
    settings = {
        "conflict": cfg.conflict.model_dump(exclude={"kind"}),
        "sketcher": make_sketcher(cfg.conflict).settings(),
        "trainable": cfg.model.trainable,
        "dtype": cfg.model.dtype,
    }
    return sketch_key(base.sha256, source.content_hash, settings)


def source_gradient(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, source: SourceInfo) -> SketchRef:
    """Sketch of the mean calibration gradient g_t of one source at θ(0).

    Reuses the stored sketch when one exists for the same model, source content and
    settings (adding sources costs only their own gradients). Computed on the GPU when
    there is one.

    Returns:
        SketchRef: store key and dimension of the float32 sketch vector, ``cached``.
    """
    key = source_sketch_key(cfg, base, source)
    if store.exists(key):
        vec = load_sketch(store, key)
        logger.info("source %s: reusing cached source gradient %s", source.name, key)
        return SketchRef(source=source.name, key=key, dim=int(vec.shape[0]), cached=True)
    calib = load_split(store, source, "calibration")
    logger.info("source %s: calibration gradient at θ(0) over %d examples", source.name, len(calib))
    model, tokenizer = load_model(store.fetch_dir(base.key), dtype=cfg.model.dtype,
                                  trust_remote_code=cfg.model.trust_remote_code)
    device = default_device()
    model.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vec = calibration_gradient(model, batches(calib, cfg.conflict.batch_size, pad), trainable=cfg.model.trainable,
                               sketcher=make_sketcher(cfg.conflict),
                               bf16=resolve_bf16(cfg.conflict.bf16, device, "conflict.bf16"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sketch.npy"
        np.save(path, vec.astype(np.float32))
        store.put_file(key, path)
    logger.info("source %s: computed source gradient sketch (dim %d) -> %s", source.name, vec.shape[0], key)
    return SketchRef(source=source.name, key=key, dim=int(vec.shape[0]), cached=False)


def load_sketch(store: ArtifactStore, key: str) -> np.ndarray:
    """One stored sketch: float32 array of shape (sketch dim,), read without pickle."""
    with tempfile.TemporaryDirectory() as tmp:
        return np.load(store.get_file(key, Path(tmp) / "sketch.npy"), allow_pickle=False)


def build_conflict_matrix(cfg: MeritConfig, store: ArtifactStore, sketches: Sequence[SketchRef]) -> ConflictMatrix:
    """The T×T conflict matrix C of the stored sketches, in their order (cosine by
    default, ``cfg.conflict.kind``)."""
    G = np.stack([load_sketch(store, s.key) for s in sketches])
    C = conflict_matrix(G, kind=cfg.conflict.kind)
    return ConflictMatrix(names=[s.source for s in sketches], kind=cfg.conflict.kind, matrix=C.tolist())
