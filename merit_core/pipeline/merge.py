"""Stage *merge* (MERIT spec step 5, paper §3.4): the K branches merged once into one
model, θ̄ = Σ_k w_k θ_k with w_k = N_k / Σ_j N_j under the default ``token_weighted``
operator."""

from __future__ import annotations

from collections.abc import Sequence

from merit_core.config import MeritConfig
from merit_core.merge import get_method, merge_checkpoints
from merit_core.pipeline.layout import merged_key
from merit_core.refs import BranchRef, ModelRef
from merit_core.store import ArtifactStore
from merit_core.store.objects import intact_dir


def merge_branches(cfg: MeritConfig, store: ArtifactStore, base: ModelRef, branches: Sequence[BranchRef],
          run_id: str, label: str) -> ModelRef:
    """Merge ``branches`` with ``cfg.merge`` and commit the result to
    ``runs/<run-id>/<label>/merged`` (returned as-is if already complete).

    The weights passed to the operator are the branches' trained tokens N_k, in branch
    order; θ(0) is fetched only for operators that work on task vectors.

    Raises:
        merit_core.merge.MergeError: the branches do not match (names, shapes, dtypes).
    """
    key = merged_key(run_id, label)
    if intact_dir(store, key):  # a damaged merged model is merged again
        return ModelRef(key=key, uri=store.uri_for(key), label=label)
    ordered = sorted(branches, key=lambda b: b.index)
    inputs = [store.fetch_dir(b.key) for b in ordered]
    weights = [float(b.trained_tokens) for b in ordered]
    base_dir = store.fetch_dir(base.key) if get_method(cfg.merge.method).needs_base else None
    out = store.staging_dir(key)
    merge_checkpoints(inputs, weights, out, base=base_dir, **cfg.merge.model_dump(),
                      metadata={"branches": [b.key for b in branches], "trained_tokens": weights})
    store.commit_dir(key, out, metadata={"kind": "merged", "method": cfg.merge.method,
                                         "branches": [b.key for b in branches], "trained_tokens": weights})
    return ModelRef(key=key, uri=store.uri_for(key), label=label)
