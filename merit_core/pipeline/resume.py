"""Run identity and crash recovery (issue 15, point 6): a run killed part-way (SIGKILL,
power cut) is continued by the next run of the same config on the same store.

Every run of the ``merit`` flow is recorded in the store's run index
(``run-records.json``, one :class:`RunRecord` per run id): its config fingerprint, its
status, and the process that owns it. When a run starts, :func:`claim_run` picks its
run id as ``run.resume`` says:

- ``auto`` (default): the newest unfinished run with the same fingerprint whose owner
  is dead (on this host: its process is gone; recorded ``failed``) is continued under
  its own run id, so its finished branches are reused and its unfinished branches
  resume from their checkpoints in the store; with none, a new run.
- ``never`` (``merit run --fresh``): always a new run.
- a run id (``merit run --resume RUN_ID``): continue that run (refused when unknown,
  finished, or made for another config).

A run owned by a live process on this host, or by a process on another host, is never
continued automatically (name it with ``--resume``). A finished run (:func:`finish_run`)
deletes its local work directories; :func:`collect_garbage` (``merit gc``) deletes the
checkpoints and work directories of dead unfinished runs and marks them abandoned.

The fingerprint (:func:`run_fingerprint`) covers the whole config except ``run.resume``
and ``run.name``'s run-id suffix, plus θ(0)'s and each source's content hash, so a
source file edited since the dead run starts a new run instead of resuming on other data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from merit_core.config import ConfigError, MeritConfig
from merit_core.refs import MixtureRef, ModelRef
from merit_core.store import ArtifactStore, ObjectNotFoundError, default_cache_dir, safe_key

logger = logging.getLogger("merit")

RUN_INDEX_KEY = "run-records.json"
"""Store key of the run index: ``{"runs": [RunRecord, ...]}``."""

Status = Literal["running", "failed", "finished", "abandoned"]


class RunRecord(BaseModel):
    """One run in the store's run index.

    Attributes:
        run_id: the run's id (store keys ``runs/<run_id>/...``).
        fingerprint: :func:`run_fingerprint` of its config and inputs (hex sha256).
        status: ``running`` (a process owns it), ``failed`` (its flow raised),
            ``finished`` (report written), ``abandoned`` (garbage-collected).
        host, pid: the process that last claimed it.
        started_at, updated_at: Unix times.
        flow_run_id: the Prefect flow run that last claimed it, if any.
    """

    run_id: str
    fingerprint: str
    status: Status
    host: str
    pid: int
    started_at: float
    updated_at: float
    flow_run_id: str | None = None


def run_fingerprint(config: MeritConfig, base: ModelRef, mixture: MixtureRef) -> str:
    """sha256 (hex) of what makes two runs the same run: the config without
    ``run.resume``, θ(0)'s store key (its weights' sha256) and every source's data key
    (its content hash)."""
    cfg = config.model_dump(mode="json")
    cfg.get("run", {}).pop("resume", None)
    payload = {"config": cfg, "base": base.key, "sources": sorted((s.name, s.key) for s in mixture.sources)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_runs(store: ArtifactStore) -> list[RunRecord]:
    """Every run recorded in ``store`` (oldest first); [] for a store without an index."""
    try:
        raw = store.get_json(RUN_INDEX_KEY)
    except ObjectNotFoundError:
        return []
    return [RunRecord.model_validate(r) for r in raw.get("runs", [])]


def _write_runs(store: ArtifactStore, records: Sequence[RunRecord]) -> None:
    store.put_json(RUN_INDEX_KEY, {"runs": [r.model_dump() for r in records]})


def _update(store: ArtifactStore, record: RunRecord) -> None:
    records = [r for r in read_runs(store) if r.run_id != record.run_id]
    _write_runs(store, [*records, record])


def owner_alive(record: RunRecord) -> bool:
    """Whether the process that owns ``record`` may still be running it: True for a
    ``running`` record of another host (unknowable from here) or of a live process on
    this host other than this one; False otherwise."""
    if record.status != "running":
        return False
    if record.host != socket.gethostname():
        return True
    if record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return _is_zombie(record.pid) is False


def _is_zombie(pid: int) -> bool | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return None


def resumable_runs(store: ArtifactStore, fingerprint: str) -> list[RunRecord]:
    """Unfinished runs of ``fingerprint`` whose owner is dead, newest first."""
    runs = [r for r in read_runs(store) if r.fingerprint == fingerprint and r.status in ("running", "failed")
            and not owner_alive(r)]
    return sorted(runs, key=lambda r: r.started_at, reverse=True)


def claim_run(store: ArtifactStore, config: MeritConfig, fingerprint: str, new_run_id: str,
              flow_run_id: str | None = None) -> RunRecord:
    """The run this process is to carry out, recorded as ``running`` and owned by it:
    a dead unfinished run of the same fingerprint, the run ``run.resume`` names, or a
    new run ``new_run_id`` (module docstring).

    Raises:
        ConfigError: ``run.resume`` names a run the store does not know, a finished or
            abandoned run, a run of another config, or a run whose owner still runs it.
    """
    mode = config.run.resume
    now = time.time()
    chosen: RunRecord | None = None
    if mode not in ("auto", "never"):
        chosen = next((r for r in read_runs(store) if r.run_id == mode), None)
        where = f"run.resume={mode!r} (merit run --resume)"
        if chosen is None:
            raise ConfigError(f"{where}: no run {mode!r} in the store {store.uri_for(RUN_INDEX_KEY)}")
        if chosen.status in ("finished", "abandoned"):
            raise ConfigError(f"{where}: run {mode!r} is {chosen.status}; nothing to resume")
        if chosen.fingerprint != fingerprint:
            raise ConfigError(f"{where}: run {mode!r} was made with another config or other data "
                              "(fingerprint differs); resume it with its own config")
        if owner_alive(chosen):
            raise ConfigError(f"{where}: run {mode!r} is still owned by process {chosen.pid} on {chosen.host}")
    elif mode == "auto":
        found = resumable_runs(store, fingerprint)
        chosen = found[0] if found else None
    if chosen is not None:
        logger.info("resuming run %s (%s, started %s by pid %d on %s): finished branches are reused, the others "
                    "continue from their checkpoints", chosen.run_id, chosen.status,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(chosen.started_at)), chosen.pid, chosen.host)
        record = chosen.model_copy(update={"status": "running", "host": socket.gethostname(), "pid": os.getpid(),
                                           "updated_at": now, "flow_run_id": flow_run_id})
    else:
        record = RunRecord(run_id=new_run_id, fingerprint=fingerprint, status="running", host=socket.gethostname(),
                           pid=os.getpid(), started_at=now, updated_at=now, flow_run_id=flow_run_id)
    _update(store, record)
    return record


def work_root(run_id: str) -> Path:
    """The local directory under which a run's branches keep their work directories
    (:func:`merit_core.pipeline.layout.work_dir_name` puts them under ``<run-id>/``)."""
    return default_cache_dir() / "work" / safe_key(run_id)


def end_run(store: ArtifactStore, run_id: str, status: Status = "finished") -> None:
    """Record ``run_id`` as ``status``; a finished run's local work directories go."""
    record = next((r for r in read_runs(store) if r.run_id == run_id), None)
    if record is not None:
        _update(store, record.model_copy(update={"status": status, "updated_at": time.time()}))
    if status in ("finished", "abandoned"):
        shutil.rmtree(work_root(run_id), ignore_errors=True)


def finish_run(store: ArtifactStore, run_id: str) -> None:
    """Record ``run_id`` finished and delete its local work directories."""
    end_run(store, run_id, "finished")


def collect_garbage(store: ArtifactStore, dry_run: bool = False) -> list[RunRecord]:
    """Abandon every unfinished run whose owner is dead: delete its branch checkpoints in
    the store and its local work directories, and record it ``abandoned`` (it can no
    longer be resumed; its finished branches stay). Returns the runs collected."""
    dead = [r for r in read_runs(store) if r.status in ("running", "failed") and not owner_alive(r)]
    for r in dead:
        logger.info("%s run %s (%s, pid %d on %s)", "would abandon" if dry_run else "abandoning", r.run_id,
                    r.status, r.pid, r.host)
        if dry_run:
            continue
        for key in store.list_complete(safe_key("runs", r.run_id)):
            parent = key.rstrip("/").rsplit("/", 1)[0]
            if parent.endswith("-checkpoints"):
                store.delete_prefix(key)
        end_run(store, r.run_id, "abandoned")
    return dead
