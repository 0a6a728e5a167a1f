"""``run.branch_execution: processes``: a branch whose process is killed (SIGKILL) is
started again and resumes from its newest checkpoint; the other branch keeps its work
and the flow completes (issue 15, point 7). Real Prefect server, real processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from tests.test_flow import _flow_runs_named, tiny_config


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _kill_branch_0_after_first_checkpoint(store: Path, cache: Path, killed: dict, stop: threading.Event) -> None:
    """SIGKILL the process training branch merit/0 (its work dir's ``pid`` file) as soon
    as its first checkpoint is committed to the store."""
    while not stop.is_set():
        ckpts = list(store.glob("runs/*/merit/branches/0-checkpoints/checkpoint-*/manifest.json"))
        pids = list(cache.glob("work/*/merit/0/pid"))
        if ckpts and pids:
            pid = int(pids[0].read_text())
            os.kill(pid, signal.SIGKILL)
            killed.update(pid=pid, at=time.time(), checkpoint=ckpts[0].parent.name)
            return
        time.sleep(0.02)


def test_killed_branch_process_is_retried_and_resumes(harness, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from flows.merit import merit

    cfg = tiny_config(tmp_path, tiny_model_dir, run={"branch_execution": "processes", "max_parallel_branches": 2},
                      train={"epochs": 4, "save_steps": 2, "threads": 1},
                      baselines={"joint": False, "random_split": False})
    killed: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_branch_0_after_first_checkpoint,
                              args=(tmp_path / "store", tmp_path / "cache", killed, stop), daemon=True)
    killer.start()
    try:
        state = merit(config=cfg, return_state=True)
    finally:
        stop.set()
        killer.join()
    assert killed, "branch 0 finished before its process could be killed"
    assert state.is_completed(), state.message
    b0, b1 = state.result()["branches"]["merit"]
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # really gone
    # the killed branch started again from a checkpoint and trained to the end
    assert b0["resumed_from_step"] >= int(killed["checkpoint"].rsplit("-", 1)[1]) and b0["steps"] == b1["steps"] > 0
    assert b0["started_at"] > killed["at"]
    # the other branch was not restarted: one flow run of it, trained from step 0; branch 0 had two
    run_id = state.result()["run_id"]
    names = [r.name for r in _flow_runs_named("merit-branch")]
    assert names.count(f"{run_id}-merit-branch-1") == 1 and names.count(f"{run_id}-merit-branch-0") == 2
    assert b1["resumed_from_step"] == 0
    assert not list((tmp_path / "store").glob("runs/*/merit/branches/*-checkpoints/*"))  # cleaned after commit
