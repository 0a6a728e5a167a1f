"""Where every artifact lives in the store: the one module that builds store keys.

All keys are built with :func:`merit_core.store.safe_key` from sanitised parts, so a run
name or source name can never escape its prefix. The layout (docs/architecture.md):

```
models/<sha256>/                                  θ(0): safetensors + tokenizer
data/<content-hash>/                              train.jsonl, heldout.jsonl, calibration.jsonl
benchmarks/<content-hash>/                        examples.jsonl
sketches/<model-sha>/<source-hash>-<settings>.npy one source gradient sketch g_t
runs/<run-id>/<label>/branches/<k>/               θ_k of branch k
runs/<run-id>/<label>/branches/<k>-checkpoints/   Trainer checkpoints while k trains
runs/<run-id>/<label>/merged/                     the merged model
runs/<run-id>/merit/split-state/                  what an incremental run reuses (split-state.json)
runs/<run-id>/baselines-state/                    the joint / random baselines it reuses (baselines-state.json)
index/split-states.json                           fingerprint -> the runs' split states (lookup without a listing)
runs/<run-id>/report/                             report.md/json and PNGs of a run or study
runs/<study-id>/seeds/<index>/                    record.json of one finished study seed
```
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from merit_core.store import safe_key


def base_model_key(sha256: str) -> str:
    """``models/<sha256>``: θ(0), addressed by the sha256 of its weights."""
    return safe_key("models", sha256)


def source_data_key(content_hash: str) -> str:
    """``data/<content-hash>``: the tokenized train/heldout/calibration examples of a source."""
    return safe_key("data", content_hash)


def benchmark_key(content_hash: str) -> str:
    """``benchmarks/<content-hash>``: the tokenized examples of one benchmark."""
    return safe_key("benchmarks", content_hash)


def sketch_key(model_sha256: str, source_content_hash: str, settings: dict[str, Any]) -> str:
    """``sketches/<model-sha>/<source-hash>-<settings-hash>.npy``: the cache key of g_t
    (MERIT spec step 1: by model hash, source content hash and calibration settings).

    Args:
        settings: JSON-able settings that change the sketch (conflict section, sketcher
            parameters, trainable parameters, dtype); hashed with sorted keys.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return safe_key("sketches", model_sha256, f"{source_content_hash[:24]}-{digest}.npy")


def branch_key(run_id: str, label: str, index: int) -> str:
    """``runs/<run-id>/<label>/branches/<index>``: θ_k of one branch."""
    return safe_key("runs", run_id, label, "branches", str(index))


def branch_checkpoints_prefix(run_id: str, label: str, index: int) -> str:
    """``runs/<run-id>/<label>/branches/<index>-checkpoints``: the Trainer checkpoints of a
    branch while it trains (``checkpoint-<step>`` under it); deleted once θ_k is committed."""
    return branch_key(run_id, label, index) + "-checkpoints"


def checkpoint_key(prefix: str, name: str) -> str:
    """``<prefix>/<name>``: one Trainer checkpoint (``checkpoint-<step>``) under a branch's
    :func:`branch_checkpoints_prefix`."""
    return f"{prefix}/{safe_key(name)}"


def merged_key(run_id: str, label: str) -> str:
    """``runs/<run-id>/<label>/merged``: the merged model of one partition."""
    return safe_key("runs", run_id, label, "merged")


def split_state_key(run_id: str) -> str:
    """``runs/<run-id>/merit/split-state``: PCA axes, thresholds, groups and branches of a
    run whose branches are committed (merit_core.pipeline.incremental)."""
    return safe_key("runs", run_id, "merit", "split-state")


SPLIT_STATE_INDEX_KEY = "index/split-states.json"
"""Store key of the split-state index: ``{"version": 1, "states": {fingerprint: [entry, ...]}}``
(merit_core.pipeline.incremental), so an incremental run finds its previous run with one
read instead of a listing of every object under ``runs/``."""


def baselines_state_key(run_id: str) -> str:
    """``runs/<run-id>/baselines-state``: sources, content hashes, random groups and branches
    of a run's joint and random-split baselines, committed after their branches
    (merit_core.pipeline.baselines_rerun)."""
    return safe_key("runs", run_id, "baselines-state")


def report_key(run_id: str) -> str:
    """``runs/<run-id>/report``: report.md/json and PNGs of a run, or of a study (its id)."""
    return safe_key("runs", run_id, "report")


def seed_records_prefix(study_id: str) -> str:
    """``runs/<study-id>/seeds``: every finished seed record of a study."""
    return safe_key("runs", study_id, "seeds")


def seed_record_key(study_id: str, index: int) -> str:
    """``runs/<study-id>/seeds/<index>``: a finished seed's record (record.json + manifest)."""
    return safe_key("runs", study_id, "seeds", str(index))


def run_id(name: str, flow_run_id: str | None) -> str:
    """The id of a run or study: its name and the first 8 characters of the Prefect flow
    run id (``local`` without one), sanitised for use as a key part."""
    return safe_key(f"{name}-{(flow_run_id or 'local')[:8]}")


def study_id(configured: str | None, name: str, flow_run_id: str | None) -> str:
    """The id of a study: ``study.id`` when set (so seeds run later add to it), else
    ``<name>-study-<first 8 characters of the flow run id>``; sanitised."""
    return safe_key(configured or f"{name}-study-{(flow_run_id or 'local')[:8]}")


def work_dir_name(run_id: str, label: str, index: int) -> str:
    """Name of a branch's local work directory (under the cache), unique per branch."""
    return safe_key(run_id, label, str(index))
