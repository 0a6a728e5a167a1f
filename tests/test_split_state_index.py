"""The split-state index: an incremental run finds the newest finished run with its
settings by reading ``index/split-states.json`` instead of listing every object under
``runs/``; a store written before the index existed is listed once and indexed; entries
whose state was deleted are skipped. Local and S3 (moto server on 127.0.0.1) stores."""

from __future__ import annotations

import uuid

import boto3
import pytest

from merit_core.config import StoreConfig
from merit_core.pipeline.incremental import STATE_FILE, SplitState, find_previous_state
from merit_core.pipeline.layout import SPLIT_STATE_INDEX_KEY, split_state_key
from merit_core.store import open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "local":
        return open_store(StoreConfig(uri=str(tmp_path / "store")))
    endpoint = request.getfixturevalue("s3_endpoint")
    for k, v in {"AWS_ACCESS_KEY_ID": "AKIAMERITINDEXTEST01", "AWS_SECRET_ACCESS_KEY": "index-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    bucket = f"merit-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return open_store(StoreConfig(uri=f"s3://{bucket}/m", endpoint_url=endpoint, region="us-east-1",
                                  addressing_style="path"))


def _commit_state(store, run_id: str, fingerprint: str, created_at: float) -> str:
    """A split state committed the way a run before the index did it (no index entry)."""
    state = SplitState(run_id=run_id, created_at=created_at, fingerprint=fingerprint, r=1,
                       sources={"a": "h1", "b": "h2"}, axes_sources=["a", "b"], axes_sketch_keys=["s/a", "s/b"],
                       axes={}, scores={"a": [1.0], "b": [-1.0]}, groups=[["a"], ["b"]], branches=[])
    key = split_state_key(run_id)
    staging = store.staging_dir(key)
    (staging / STATE_FILE).write_text(state.model_dump_json())
    store.commit_dir(key, staging, metadata={"kind": "split-state"})
    return key


def test_old_store_is_indexed_once_and_newest_matching_state_wins(store):
    _commit_state(store, "r-old", "fp1", 100.0)
    _commit_state(store, "r-new", "fp1", 200.0)
    _commit_state(store, "r-other", "fp2", 300.0)
    assert not store.exists(SPLIT_STATE_INDEX_KEY)

    found = find_previous_state(store, "fp1", exclude_run="r-now")
    assert found is not None and found.run_id == "r-new"
    index = store.get_json(SPLIT_STATE_INDEX_KEY)["states"]  # built from the one listing
    assert sorted(e["run_id"] for e in index["fp1"]) == ["r-new", "r-old"]
    assert [e["run_id"] for e in index["fp2"]] == ["r-other"]
    assert find_previous_state(store, "fp3", exclude_run="r-now") is None
    # a run never finds itself
    assert find_previous_state(store, "fp1", exclude_run="r-new").run_id == "r-old"


def test_index_is_read_instead_of_listing_and_deleted_states_are_skipped(store):
    _commit_state(store, "r-old", "fp1", 100.0)
    _commit_state(store, "r-new", "fp1", 200.0)
    assert find_previous_state(store, "fp1", exclude_run="x").run_id == "r-new"
    # A state committed without an index entry is not seen: the lookup reads the index, not a listing.
    _commit_state(store, "r-unindexed", "fp1", 300.0)
    assert find_previous_state(store, "fp1", exclude_run="x").run_id == "r-new"
    # The newest indexed run was deleted by hand: the next newest is used.
    store.delete_prefix("runs/r-new")
    assert find_previous_state(store, "fp1", exclude_run="x").run_id == "r-old"
    # A garbled index is rebuilt from a listing (which now also sees r-unindexed).
    store.put_json(SPLIT_STATE_INDEX_KEY, ["not", "an", "index"])
    assert find_previous_state(store, "fp1", exclude_run="x").run_id == "r-unindexed"
    assert "fp1" in store.get_json(SPLIT_STATE_INDEX_KEY)["states"]
