"""One branch per group, trained with no communication between branches (MERIT spec
step 4), in the mode ``run.branch_execution`` names:

- ``local``: one ``merit-branch`` subflow run after another, in this process;
- ``processes``: ``merit-branch`` subflow runs, each in a process of its own on this
  machine, ``run.max_parallel_branches`` at a time; a branch whose process dies is
  started again and resumes from its newest checkpoint, the others carry on;
- ``deployment``: one flow run of the deployment ``run.branch_deployment``
  (``merit-branch/process``, ``merit-branch/docker-gpu``, ``merit-branch/k8s-gpu``) per
  branch, so each runs on whatever worker of that pool is free.

For ``deployment`` the parent starts every child at once with the idempotency key
``<parent flow-run id>-<run id>-<label>-<index>`` (a retried parent gets its existing
children back; a child that had failed is rescheduled, a completed one reused), waits
for all of them with Prefect's :func:`prefect.flow_runs.wait_for_flow_run`, fails with
each failed child's own state message, and reads each branch's result from the artifact
store (the one thing parent and workers share), not from Prefect's result storage.
"""

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from uuid import UUID

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.exceptions import FlowRunWaitTimeout, ObjectNotFound
from prefect.flow_runs import wait_for_flow_run
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Scheduled
from prefect.task_runners import ProcessPoolTaskRunner
from prefect.utilities.asyncutils import run_coro_as_sync

from flows.common import BRANCH_RUN_NAME, run_logger
from flows.infra import describe_infrastructure
from merit_core.config import MeritConfig
from merit_core.pipeline.branches import branch_timing
from merit_core.refs import BranchRef, MixtureRef, ModelRef
from merit_core.train import planned_steps
from tasks import collect_branches_task, train_branch_task
from tasks.artifacts import Progress


class BranchRunError(RuntimeError):
    """A branch flow run started through a deployment did not produce its checkpoint;
    the message names the branch, the child flow run and its state message."""


@flow(name="merit-branch", flow_run_name=BRANCH_RUN_NAME)
def merit_branch(config: MeritConfig, base: ModelRef, mixture: MixtureRef, sources: list[str],
                 run_id: str, label: str, index: int) -> BranchRef:
    """Fine-tune one copy of θ(0) on the union of ``sources`` (spec step 4) and commit it to
    the store. Started by a ``merit`` or ``merit-study`` flow run, which fills in every
    parameter; the flow run is named ``<run_id>-<label>-branch-<index>``.

    Args:
        config: The parent run's resolved config (train, data and store sections apply).
        base: θ(0) in the store, from the parent's prepare-base stage.
        mixture: The parent's resolved mixture (where each source's tokenized splits are).
        sources: Names of the sources this branch trains on (one group of the partition).
        run_id: The parent run's id, e.g. merit-quick-1a2b3c4d (store keys, run names).
        label: Which partition the branch belongs to: merit, joint or random.
        index: The group's index k in the partition (0 .. K-1).
    """
    return train_branch_task(config, base, mixture, sources, run_id, label, index)


@task(name="branch-process", task_run_name="branch-process-{label}-{index}")
def _branch_in_process(config: MeritConfig, base: ModelRef, mixture: MixtureRef, sources: list[str],
                       run_id: str, label: str, index: int) -> BranchRef:
    return merit_branch(config, base, mixture, sources, run_id, label, index)


def run_branches(config: MeritConfig, base: ModelRef, mixture: MixtureRef, groups: list[list[str]],
                 run_id: str, label: str, indices: Sequence[int] | None = None) -> list[BranchRef]:
    """Train one branch per group, independently, as ``config.run.branch_execution`` says;
    return their checkpoints in group order, each with the timing of its flow run
    (:class:`~merit_core.refs.BranchTiming`: queued, start-up, training, commit, counted
    from when this flow asked for the branch). A progress artifact of this flow run
    counts the finished branches.

    With ``processes`` and no ``train.threads``, each of the parallel branches gets an
    equal share of this machine's cores. ``indices``: the branch index of each group
    (default 0 .. len(groups) − 1), for an incremental run that trains only some groups.
    """
    mode = config.run.branch_execution
    if mode not in ("local", "processes", "deployment"):
        raise ValueError(f"run.branch_execution={mode!r}: use 'local', 'processes' or 'deployment'")
    indices = list(range(len(groups))) if indices is None else list(indices)
    _log_plan(config, mixture, groups, run_id, label, indices)
    args = [{"config": config, "base": base, "mixture": mixture, "sources": g, "run_id": run_id, "label": label,
             "index": k} for k, g in zip(indices, groups)]
    progress = Progress(f"{label}: branches trained", len(groups))
    if mode == "deployment":
        return run_branches_on_deployment(config, base, mixture, groups, run_id, label, progress, indices)
    refs, asked = [], []
    if mode == "local":
        for a in args:
            asked.append(time.time())
            refs.append(merit_branch(**a))
            progress.step()
        return _with_subflow_timings(refs, run_id, asked)
    workers = min(config.run.max_parallel_branches, len(groups))
    if config.train.threads is None:
        per = max(1, (os.cpu_count() or 1) // workers)
        config = config.model_copy(update={"train": config.train.model_copy(update={"threads": per})})
        args = [{**a, "config": config} for a in args]
    asked = [time.time()] * len(args)  # the processes' start-up counts as queueing
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merit-branch") as pool:
        futures = [pool.submit(contextvars.copy_context().run, branch_in_own_process, a) for a in args]
        for _ in concurrent.futures.as_completed(futures):
            progress.step()
        refs = [f.result() for f in futures]
    return _with_subflow_timings(refs, run_id, asked)


BRANCH_PROCESS_ATTEMPTS = 3
"""Tries of one branch whose process dies (killed, out of memory) with
``run.branch_execution: processes``; each retry resumes from the branch's newest
checkpoint in the store."""


def branch_in_own_process(parameters: dict) -> BranchRef:
    """Train one branch (``merit_branch(**parameters)``) in a process of its own (a
    one-worker :class:`~prefect.task_runners.ProcessPoolTaskRunner`), so that a branch
    whose process dies breaks no other branch's pool. A dead process is retried up to
    :data:`BRANCH_PROCESS_ATTEMPTS` times in a fresh process; the branch resumes from its
    newest checkpoint in the store (errors raised by the branch itself are not retried
    here: the ``train-branch`` task has its own retries).

    Raises:
        BranchRunError: the branch's process died on every attempt.
    """
    name = branch_run_name(parameters["run_id"], parameters["label"], parameters["index"])
    for attempt in range(1, BRANCH_PROCESS_ATTEMPTS + 1):
        try:
            with ProcessPoolTaskRunner(max_workers=1) as runner:
                return runner.submit(_branch_in_process, parameters=parameters).result()
        except BrokenProcessPool as err:
            if attempt == BRANCH_PROCESS_ATTEMPTS:
                raise BranchRunError(f"branch {name}: its process died on each of {attempt} attempts "
                                     f"(last: {err})") from err
            _logger().warning("branch %s: its process died (%s); starting it again (attempt %d of %d), from its "
                              "newest checkpoint in the store", name, err, attempt + 1, BRANCH_PROCESS_ATTEMPTS)
    raise AssertionError("unreachable")


def _log_plan(config: MeritConfig, mixture: MixtureRef, groups: list[list[str]], run_id: str, label: str,
              indices: Sequence[int]) -> None:
    """One line per branch before any trains, named as its flow run: its sources, examples
    and optimizer steps."""
    log = _logger()
    log.info("%s: %d branch%s (%s)", label, len(groups), "" if len(groups) == 1 else "es",
             config.run.branch_execution)
    for k, group in zip(indices, groups):
        n = sum(mixture.get(s).train for s in group)
        names = ", ".join(sorted(group)) if len(group) <= 6 else f"{len(group)} sources"
        log.info("%s (%d of %d): %s — %d examples, %d steps", branch_run_name(run_id, label, k), k + 1,
                 max(indices) + 1, names, n, planned_steps(n, config.train))


def branch_run_name(run_id: str, label: str, index: int) -> str:
    """The flow-run name of one branch: ``<run_id>-<label>-branch-<index>``."""
    return BRANCH_RUN_NAME.format(run_id=run_id, label=label, index=index)


# --- deployment fan-out -------------------------------------------------------------------


def with_timing(ref: BranchRef, run: FlowRun, asked_at: float | None = None) -> BranchRef:
    """``ref`` with the :class:`~merit_core.refs.BranchTiming` of ``run``, the flow run
    that trained it (:func:`merit_core.pipeline.branches.branch_timing`), counted from
    ``asked_at`` (Unix time the parent asked for it) or else from the run's creation; an
    end not yet recorded is taken as now."""
    created = asked_at or next((t.timestamp() for t in (run.created, run.expected_start_time) if t), None)
    if created is None:
        return ref
    end = (run.end_time or datetime.now(timezone.utc)).timestamp()
    start = run.start_time.timestamp() if run.start_time else None
    return ref.model_copy(update={"timing": branch_timing(ref, created, start, end)})


def _with_subflow_timings(refs: list[BranchRef], run_id: str, asked: list[float]) -> list[BranchRef]:
    """``refs`` with the timing of the ``merit-branch`` subflow runs of this flow run that
    trained them (matched on run id, label and index; the latest if several)."""
    parent = _parent_flow_run_id()
    if parent is None:
        return refs
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent)])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)
    latest: dict[tuple, FlowRun] = {}
    for r in runs:  # newest first
        latest.setdefault((r.parameters.get("run_id"), r.parameters.get("label"), r.parameters.get("index")), r)
    return [with_timing(ref, run, t) if (run := latest.get((run_id, ref.label, ref.index))) else ref
            for ref, t in zip(refs, asked)]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    return run_logger("merit.branches")


def _parent_flow_run_id() -> str | None:
    return flow_run.get_id()


def idempotency_key(parent_id: str, run_id: str, label: str, index: int) -> str:
    """The key that makes a retried parent reuse its children: parent flow run + branch
    (``run_id`` too, since one parent may train several runs, e.g. a study's seeds)."""
    return f"{parent_id}-{run_id}-{label}-{index}"


def start_branch(deployment: str, parameters: dict, key: str, tags: list[str], name: str | None = None) -> FlowRun:
    """Create (or, for a known idempotency key, get back) one child flow run named ``name``
    without waiting for it; a child left failed/crashed/cancelled by an earlier attempt of
    the parent is rescheduled.

    Raises:
        BranchRunError: the deployment does not exist on the Prefect API.
    """
    try:
        child = run_deployment(deployment, parameters=parameters, idempotency_key=key, as_subflow=True,
                               timeout=0, tags=tags, flow_run_name=name)
    except ObjectNotFound:
        raise BranchRunError(
            f"deployment {deployment!r} (run.branch_deployment) does not exist on the Prefect API at "
            f"{PREFECT_API_URL.value() or '<ephemeral>'}; deploy it first, e.g. "
            f"`prefect --no-prompt deploy --name {deployment.split('/')[-1]}` from the repository root"
        ) from None
    state = child.state
    if state is not None and state.is_final() and not state.is_completed():
        _logger().warning("branch child %s (%s) is %s from an earlier attempt; rescheduling it",
                          child.name, child.id, state.name)
        reschedule(child.id, f"rescheduled by a retry of the parent ({key})")
    return child


def reschedule(flow_run_id: UUID, message: str) -> None:
    """Put a finished deployment flow run back in Scheduled (what `prefect flow-run retry`
    does); the branch resumes from its newest checkpoint in the store."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(message=message), force=True)


def wait_for_flow_runs(ids: Sequence[UUID], timeout: float | None,
                       on_final: Callable[[], None] | None = None) -> dict[UUID, FlowRun]:
    """Wait, all together, until every flow run in ``ids`` is final or ``timeout`` seconds
    passed (:func:`prefect.flow_runs.wait_for_flow_run`, which follows the runs' state
    events); return the latest view of each. ``on_final`` is called (in a worker thread,
    in this context) each time one of them ends."""

    async def one(client, flow_run_id: UUID) -> FlowRun:
        try:
            run = await wait_for_flow_run(flow_run_id, timeout=timeout, client=client)
        except FlowRunWaitTimeout:
            return await client.read_flow_run(flow_run_id)
        if on_final is not None:
            await asyncio.to_thread(on_final)
        return run

    async def every() -> list[FlowRun]:
        async with get_client() as client:
            return await asyncio.gather(*(one(client, i) for i in ids))

    runs = run_coro_as_sync(every())
    for r in runs:
        if r.state is not None and r.state.is_final():
            _logger().info("flow run %s finished: %s", r.name, r.state.name)
    return {r.id: r for r in runs}


def _failures(children: Sequence[FlowRun], final: dict[UUID, FlowRun], label: str, timeout: float | None,
              indices: Sequence[int]) -> list[str]:
    errors = []
    for index, child in zip(indices, children):
        run = final.get(child.id, child)
        state = run.state
        if state is None or not state.is_final():
            errors.append(f"branch {label}/{index} (flow run {run.name}, {run.id}) did not finish within "
                          f"run.branch_timeout_s={timeout} s; it is {state.name if state else 'without state'}")
        elif not state.is_completed():
            where = describe_infrastructure(run) if state.is_crashed() else ""  # e.g. an image that cannot start
            errors.append(f"branch {label}/{index} (flow run {run.name}, {run.id}) ended {state.name}"
                          f"{f' on {where}' if where else ''}: {state.message or 'no message'}")
    return errors


def run_branches_on_deployment(config: MeritConfig, base: ModelRef, mixture: MixtureRef,
                               groups: list[list[str]], run_id: str, label: str,
                               progress: Progress | None = None,
                               indices: Sequence[int] | None = None) -> list[BranchRef]:
    """Train one branch per group as separate flow runs of ``config.run.branch_deployment``,
    concurrently; return their checkpoints in group order (read from the store), each
    with the timing of its flow run. ``progress`` advances as each child finishes.

    Raises:
        BranchRunError: no parent flow run, the deployment does not exist, a child ended in
            a state other than Completed (its state message is included), or a child did
            not finish within ``run.branch_timeout_s``.
        merit_core.pipeline.branches.BranchStoreError: a completed child left no complete
            branch directory in the store.
    """
    log = _logger()
    parent = _parent_flow_run_id()
    if parent is None:
        raise BranchRunError("run.branch_execution='deployment' needs a Prefect flow run of `merit` as the parent "
                             "(run it with `prefect deployment run merit/full`)")
    deployment = config.run.branch_deployment
    if not config.store.uri.startswith("s3://"):
        log.warning("store %s is a local directory: every worker of %s must see the same path "
                    "(use an s3:// store for workers on other machines)", config.store.uri, deployment)
    common = {"config": config.model_dump(mode="json"), "base": base.model_dump(mode="json"),
              "mixture": mixture.model_dump(mode="json"), "run_id": run_id, "label": label}
    children: list[FlowRun] = []
    indices = list(range(len(groups))) if indices is None else list(indices)
    for index, group in zip(indices, groups):
        child = start_branch(deployment, {**common, "sources": list(group), "index": index},
                             idempotency_key(parent, run_id, label, index),
                             tags=[f"merit-run:{run_id}", f"merit:{label}"], name=branch_run_name(run_id, label, index))
        log.info("branch %s/%d (%d sources) -> flow run %s (%s) of %s",
                 label, index, len(group), child.name, child.id, deployment)
        children.append(child)
    timeout = config.run.branch_timeout_s
    final = wait_for_flow_runs([c.id for c in children], timeout, on_final=progress.step if progress else None)
    errors = _failures(children, final, label, timeout, indices)
    if errors:
        raise BranchRunError(f"{len(errors)} of {len(children)} branches on {deployment} failed:\n  "
                             + "\n  ".join(errors))
    refs = collect_branches_task(config, run_id, label, groups, indices)
    return [with_timing(ref, final[child.id]) for ref, child in zip(refs, children)]
