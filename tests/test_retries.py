"""User errors are not retried by Prefect; transient errors still are (issue 15, point 9).

Real Prefect server (prefect_test_harness); the tasks use the retry settings of
tasks/stages.py with the delays set to 0 s (``with_options``), so each test is fast and
counts attempts from the task run's ``run_count`` on the API."""

from __future__ import annotations

import asyncio
import time

import pytest
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from merit_core.data import DataError
from merit_core.models import ModelSourceError
from merit_core.store import StoreError, StoreUnreachableError
from merit_core.train import TrainSetupError
from tasks.stages import STORAGE_RETRIES, TRAIN_RETRIES


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def go():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return asyncio.run(go())


def _attempts(retries: dict, errors: list[BaseException]) -> tuple[int, object]:
    """Run a task with ``retries`` (delays 0) that raises ``errors`` in turn, then returns
    "ok"; return how often it ran and the flow's final state."""
    calls = []

    @task(name="flaky", **{**retries, "retry_delay_seconds": 0})
    def flaky():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "ok"

    @flow(name="retry-probe")
    def probe():
        return flaky()

    state = probe(return_state=True)
    return len(calls), state


@pytest.mark.parametrize("retries", [STORAGE_RETRIES, TRAIN_RETRIES], ids=["storage", "train"])
@pytest.mark.parametrize("error", [
    DataError("source 'beta': beta.jsonl line 4: malformed JSON"),
    ModelSourceError("model.source '/nope': no such file or directory"),
    TrainSetupError("train.deepspeed needs CUDA"),
    StoreUnreachableError("S3 endpoint http://127.0.0.1:9 did not answer head_object"),
], ids=lambda e: type(e).__name__)
def test_user_errors_are_not_retried(harness, retries, error):
    n, state = _attempts(retries, [error] * 3)
    assert n == 1, f"{type(error).__name__} was tried {n} times"
    assert state.is_failed() and type(error).__name__ in state.message


@pytest.mark.parametrize("retries", [STORAGE_RETRIES, TRAIN_RETRIES], ids=["storage", "train"])
def test_transient_errors_are_retried(harness, retries):
    errors = [StoreError("S3 put_object failed: ConnectionClosedError"), ConnectionResetError("peer reset")]
    n, state = _attempts(retries, errors)
    assert n == 3 and state.is_completed() and state.result() == "ok"


def test_bad_model_source_fails_the_merit_flow_on_the_first_attempt(harness, tmp_path):
    from flows.merit import merit
    from tests.test_flow import tiny_config

    cfg = tiny_config(tmp_path, tmp_path / "no-such-model")
    t0 = time.perf_counter()
    state = merit(config=cfg, return_state=True)
    wall = time.perf_counter() - t0
    assert state.is_failed() and "ModelSourceError" in state.message and "no-such-model" in state.message
    (prep,) = [t for t in _task_runs(state.state_details.flow_run_id) if t.name.startswith("prepare-base")]
    assert prep.run_count == 1, f"prepare-base ran {prep.run_count} times"
    assert wall < 5 + 20, f"{wall:.1f} s: the failure waited for retries"  # main: 5 s + 20 s of retry delays
