"""Branch fan-out through a Prefect deployment (``run.branch_execution: deployment``).

Each partition becomes its own flow run of ``merit-branch`` on the deployment named by
``run.branch_deployment`` (``merit-branch/process``, ``merit-branch/docker-gpu``,
``merit-branch/k8s-gpu``), so every branch runs on whatever worker of that pool is
free, with no communication between branches (MERIT spec step 4).

The parent:

1. starts every child at once — ``run_deployment(..., timeout=0)`` — with the
   idempotency key ``<parent flow-run id>-<run id>-<label>-<index>``: a retried parent gets its
   existing children back instead of starting duplicates (a child that had failed is
   rescheduled; a completed one is reused);
2. waits for all of them together (one poll loop over the API);
3. fails with each failed child's own state message (e.g. the branch's ``TrainError``);
4. reads each branch's result from its manifest in the artifact store, not from
   Prefect's result storage: the store is the one thing parent and workers share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Scheduled

from merit_core import stages
from merit_core.artifacts import BranchCheckpoint, MixtureManifest, ModelRef
from merit_core.config import MeritConfig
from merit_core.store import LocalStore


class BranchRunError(RuntimeError):
    """A branch flow run started through a deployment did not produce its checkpoint;
    the message names the branch, the child flow run and its state message."""


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("merit.fanout")


def _parent_flow_run_id() -> str | None:
    return flow_run.get_id()


def idempotency_key(parent_id: str, run_id: str, label: str, index: int) -> str:
    """The key that makes a retried parent reuse its children: parent flow run + branch
    (``run_id`` too, since one parent may train several runs, e.g. a study's seeds)."""
    return f"{parent_id}-{run_id}-{label}-{index}"


def poll_seconds(elapsed: float) -> float:
    """Seconds between polls: 2 s at first, slowly up to 15 s for long branches."""
    return min(15.0, 2.0 + elapsed / 60.0)


def start_branch(deployment: str, parameters: dict, key: str, tags: list[str]) -> FlowRun:
    """Create (or, for a known idempotency key, get back) one child flow run without
    waiting for it; a child left failed/crashed/cancelled by an earlier attempt of the
    parent is rescheduled."""
    log = _logger()
    try:
        child = run_deployment(deployment, parameters=parameters, idempotency_key=key, as_subflow=True,
                               timeout=0, tags=tags)
    except ObjectNotFound:
        raise BranchRunError(
            f"deployment {deployment!r} (run.branch_deployment) does not exist on the Prefect API at "
            f"{PREFECT_API_URL.value() or '<ephemeral>'}; deploy it first, e.g. "
            f"`prefect --no-prompt deploy --name {deployment.split('/')[-1]}` from the repository root"
        ) from None
    state = child.state
    if state is not None and state.is_final() and not state.is_completed():
        log.warning("branch child %s (%s) is %s from an earlier attempt; rescheduling it",
                    child.name, child.id, state.name)
        reschedule(child.id, f"rescheduled by a retry of the parent ({key})")
    return child


def reschedule(flow_run_id: UUID, message: str) -> None:
    """Put a finished deployment flow run back in Scheduled (what `prefect flow-run retry`
    does); the branch resumes from its newest checkpoint in the store."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message=message), force=True)


def wait_for_flow_runs(ids: Sequence[UUID], timeout: float | None) -> dict[UUID, FlowRun]:
    """Poll until every flow run in ``ids`` is in a final state or ``timeout`` seconds
    passed; return the latest view of each."""
    log = _logger()
    latest: dict[UUID, FlowRun] = {}
    pending = set(ids)
    t0 = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending))))
            for r in runs:
                latest[r.id] = r
                if r.state is not None and r.state.is_final():
                    pending.discard(r.id)
                    log.info("branch flow run %s finished: %s", r.name, r.state.name)
            elapsed = time.monotonic() - t0
            if not pending or (timeout is not None and elapsed >= timeout):
                break
            time.sleep(poll_seconds(elapsed))
    return latest


def run_branches_on_deployment(config: MeritConfig, base: ModelRef, mixture: MixtureManifest,
                               groups: list[list[str]], run_id: str, label: str) -> list[BranchCheckpoint]:
    """Train one branch per group as separate flow runs of ``config.run.branch_deployment``,
    concurrently; return their checkpoints in group order (read from the store).

    Raises:
        BranchRunError: the deployment does not exist, a child ended in a state other than
            Completed (its state message is included), a child did not finish within
            ``run.branch_timeout_s``, or a completed child left no complete branch
            directory in the store.
    """
    log = _logger()
    parent = _parent_flow_run_id()
    if parent is None:
        raise BranchRunError("run.branch_execution='deployment' needs a Prefect flow run of `merit` as the parent "
                             "(run it with `prefect deployment run merit/full`)")
    deployment = config.run.branch_deployment
    store = stages.store_for(config)
    if isinstance(store, LocalStore):
        log.warning("store %s is a local directory: every worker of %s must see the same path "
                    "(use an s3:// store for workers on other machines)", store.uri, deployment)
    common = dict(config=config.model_dump(mode="json"), base=base.model_dump(mode="json"),
                  mixture=mixture.model_dump(mode="json"), run_id=run_id, label=label)
    children: list[FlowRun] = []
    for index, group in enumerate(groups):
        child = start_branch(deployment, {**common, "sources": list(group), "index": index},
                             idempotency_key(parent, run_id, label, index),
                             tags=[f"merit-run:{run_id}", f"merit:{label}"])
        log.info("branch %s/%d (%d sources) -> flow run %s (%s) of %s",
                 label, index, len(group), child.name, child.id, deployment)
        children.append(child)

    timeout = config.run.branch_timeout_s
    final = wait_for_flow_runs([c.id for c in children], timeout)

    errors = []
    for index, child in enumerate(children):
        run = final.get(child.id, child)
        state = run.state
        if state is None or not state.is_final():
            errors.append(f"branch {label}/{index} (flow run {run.name}, {run.id}) did not finish within "
                          f"run.branch_timeout_s={timeout} s; it is {state.name if state else 'without state'}")
        elif not state.is_completed():
            errors.append(f"branch {label}/{index} (flow run {run.name}, {run.id}) ended {state.name}: "
                          f"{state.message or 'no message'}")
    if errors:
        raise BranchRunError(f"{len(errors)} of {len(children)} branches on {deployment} failed:\n  "
                             + "\n  ".join(errors))

    results = []
    for index, group in enumerate(groups):
        key = stages.branch_key(run_id, label, index)
        if not store.is_complete(key):
            raise BranchRunError(
                f"branch {label}/{index}: flow run {children[index].name} completed but {store.uri_for(key)} has no "
                "manifest; the branch worker wrote to a different store than the parent (check store.uri)")
        ckpt = BranchCheckpoint.model_validate(store.get_json(f"{key}/manifest.json")["metadata"]["branch"])
        if sorted(ckpt.sources) != sorted(group):
            raise BranchRunError(f"branch {label}/{index}: {store.uri_for(key)} holds sources {ckpt.sources}, "
                                 f"expected {sorted(group)}")
        results.append(ckpt)
    return results
