"""The artifact store of a run, opened once per process for the tasks that run there."""

from __future__ import annotations

import functools

from merit_core.config import MeritConfig, StoreConfig
from merit_core.store import ArtifactStore, open_store


@functools.lru_cache(maxsize=8)
def _open(store_json: str) -> ArtifactStore:
    return open_store(StoreConfig.model_validate_json(store_json))


def run_store(config: MeritConfig) -> ArtifactStore:
    """The store named by ``config.store`` (local directory or S3), opened on first use in
    this process and reused by every later task with the same store settings.

    Raises:
        merit_core.store.StoreError: the store cannot be opened (bad URI, no credentials).
    """
    return _open(config.store.model_dump_json())
