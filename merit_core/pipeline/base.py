"""Stage *prepare base*: θ(0) into the store."""

from __future__ import annotations

import shutil
from pathlib import Path

from merit_core.config import MeritConfig
from merit_core.models import model_sha256, resolve_model_source
from merit_core.pipeline.layout import base_model_key
from merit_core.refs import ModelRef
from merit_core.store import ArtifactStore, default_cache_dir
from merit_core.store.objects import intact_dir


def prepare_base(cfg: MeritConfig, store: ArtifactStore) -> ModelRef:
    """Resolve θ(0) (GGUF conversion, local dir or hub id, ``cfg.model``) and commit it to
    ``models/<sha256>`` unless it is there already.

    Returns:
        ModelRef with the sha256 of the weights (the cache key of every source gradient).

    Raises:
        merit_core.models.ModelSourceError: the model source cannot be resolved.
        merit_core.store.StoreError: the store cannot be written.
    """
    local = Path(resolve_model_source(cfg.model, default_cache_dir() / "models"))
    sha = model_sha256(local)
    key = base_model_key(sha)
    if not intact_dir(store, key):  # missing, or damaged: committed again
        staging = store.staging_dir(key)
        for p in local.iterdir():
            if p.is_file() and p.name != "manifest.json":
                shutil.copy2(p, staging / p.name)
        store.commit_dir(key, staging, metadata={"kind": "base", "source": cfg.model.source, "sha256": sha})
    return ModelRef(key=key, uri=store.uri_for(key), sha256=sha, label="base")


def load_base_tokenizer(store: ArtifactStore, base: ModelRef, trust_remote_code: bool = False):
    """The tokenizer stored with θ(0) (``transformers.AutoTokenizer``; ``trust_remote_code``
    runs tokenizer code shipped with the model, ``model.trust_remote_code``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(store.fetch_dir(base.key), trust_remote_code=trust_remote_code)


def load_base_processor(store: ArtifactStore, base: ModelRef, trust_remote_code: bool = False):
    """The processor stored with θ(0) (``transformers.AutoProcessor``), or None for a text
    model (:func:`merit_core.vlm.load_processor`)."""
    from merit_core.vlm import load_processor

    return load_processor(store.fetch_dir(base.key), trust_remote_code=trust_remote_code)
