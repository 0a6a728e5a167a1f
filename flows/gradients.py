"""Source gradients g_t at θ(0) (MERIT spec step 1), fanned out as ``conflict.execution``
names:

- ``local``: every source still to compute in one batch, in this process;
- ``processes``: ``conflict.workers`` batches in a Prefect ``ProcessPoolTaskRunner`` on
  this machine, its cores split evenly among them (unless ``conflict.threads``);
- ``deployment``: one flow run of ``conflict.deployment`` (flow ``merit-gradients``,
  e.g. ``merit-gradients/process``) per batch, on whatever worker of that pool is free.

A batch loads θ(0) once and computes its sources one after another
(:func:`merit_core.pipeline.conflict.source_gradients`). Sources whose sketch is in the
store already are not batched; the others are balanced over the batches by calibration
tokens, deterministically (:func:`merit_core.pipeline.conflict.plan_source_gradients`).
A sketch does not depend on its batch or worker: at equal torch thread counts every mode
gives bit-identical sketches under the same cache keys.

For ``deployment`` the parent starts every child at once with the idempotency key
``<parent flow-run id>-gradients-<digest of the batch's sketch keys>`` (a retried parent
with the same plan gets its children back, a failed one rescheduled), waits for them with
:func:`prefect.flow_runs.wait_for_flow_run`, fails with each failed child's state message,
and reads the sketches from the artifact store.
"""

import hashlib
import logging
import os

from prefect import flow
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ProcessPoolTaskRunner

from flows.branches import reschedule, wait_for_flow_runs
from flows.common import run_logger
from merit_core.config import MeritConfig
from merit_core.fanout import threads_per_worker
from merit_core.pipeline.conflict import source_sketch_key
from merit_core.refs import GradientPlan, MixtureRef, ModelRef, SketchRef, SourceInfo
from tasks import collect_source_gradients_task, plan_source_gradients_task, source_gradients_task
from tasks.artifacts import Progress


class GradientRunError(RuntimeError):
    """A source-gradient flow run started through a deployment did not finish its batch;
    the message names the batch, the child flow run and its state message."""


@flow(name="merit-gradients", flow_run_name="gradients-{batch}")
def merit_gradients(config: MeritConfig, base: ModelRef, sources: list[SourceInfo], batch: int = 0,
                    threads: int | None = None) -> list[SketchRef]:
    """Calibration gradients of one batch of sources at θ(0) (loaded once), each sketch
    committed to the store (spec step 1). Started by the `merit` flow with
    conflict.execution: deployment; all parameters come from the parent.

    Args:
        config: The parent run's resolved config.
        base: θ(0) in the artifact store (key, URI).
        sources: The sources of this batch (tokenized splits in the store).
        batch: Index of this batch in the parent's plan (0-based).
        threads: torch CPU threads for this batch (None: torch's default).
    """
    return source_gradients_task(config, base, sources, batch, threads)


def run_source_gradients(config: MeritConfig, base: ModelRef, mixture: MixtureRef) -> list[SketchRef]:
    """g_t of every source of ``mixture``, computed where ``config.conflict.execution``
    says (stored sketches reused); return their references in mixture order.

    Raises:
        GradientRunError: execution=deployment and a child flow run failed (see
            :func:`run_gradients_on_deployment`).
        ValueError: an unknown ``conflict.execution``.
    """
    mode = config.conflict.execution
    if mode not in ("local", "processes", "deployment"):
        raise ValueError(f"conflict.execution={mode!r}: use 'local', 'processes' or 'deployment'")
    plan = plan_source_gradients_task(config, base, mixture, 1 if mode == "local" else config.conflict.workers)
    _log_plan(config, mixture, plan)
    progress = Progress("source gradients", len(mixture.names))
    progress.set(len(plan.cached), " (reused from cache)" if plan.cached else "")
    if mode == "deployment" and plan.batches:
        computed = run_gradients_on_deployment(config, base, plan)
    elif mode == "processes" and len(plan.batches) > 1:
        computed = _run_in_processes(config, base, plan)
    else:
        threads = threads_per_worker(config.conflict.threads, 1, os.cpu_count()) if mode == "processes" \
            else config.conflict.threads
        computed = []
        for i, b in enumerate(plan.batches):
            computed += source_gradients_task(config, base, b, i, threads)
            progress.step(len(b))
    progress.set(len(mixture.names))
    by_name = {r.source: r for r in [*plan.cached, *computed]}
    return [by_name[name] for name in mixture.names]


def _run_in_processes(config: MeritConfig, base: ModelRef, plan: GradientPlan) -> list[SketchRef]:
    """One ``source-gradients`` task per batch in a process pool of one worker per batch."""
    workers = len(plan.batches)
    threads = threads_per_worker(config.conflict.threads, workers, os.cpu_count())
    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        futures = [runner.submit(source_gradients_task, parameters=dict(config=config, base=base, sources=b,
                                                                        batch=i, threads=threads))
                   for i, b in enumerate(plan.batches)]
        return [r for f in futures for r in f.result()]


def _log_plan(config: MeritConfig, mixture: MixtureRef, plan: GradientPlan) -> None:
    """One line for the stage, one per batch: its sources and calibration tokens."""
    log = _logger()
    n, b = plan.todo, len(plan.batches)
    log.info("source gradients: %d source%s in %d batch%s on %d worker%s (%s); %d of %d reused from cache",
             n, "" if n == 1 else "s", b, "" if b == 1 else "es", b, "" if b == 1 else "s",
             config.conflict.execution, len(plan.cached), len(mixture.sources))
    for i, (batch, tokens) in enumerate(zip(plan.batches, plan.batch_tokens)):
        names = ", ".join(s.name for s in batch) if len(batch) <= 6 else f"{len(batch)} sources"
        log.info("gradients-%d (%d of %d): %s — %d calibration tokens", i, i + 1, b, names, tokens)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    return run_logger("merit.gradients")


# --- deployment fan-out -------------------------------------------------------------------


def _parent_flow_run_id() -> str | None:
    return flow_run.get_id()


def idempotency_key(parent_id: str, config: MeritConfig, base: ModelRef, batch: list[SourceInfo]) -> str:
    """The key that makes a retried parent reuse a child: parent flow run + the batch's
    sketch keys (model, source contents, settings), so a changed plan starts new children."""
    keys = "\n".join(source_sketch_key(config, base, s) for s in batch)
    return f"{parent_id}-gradients-{hashlib.sha256(keys.encode()).hexdigest()[:16]}"


def start_batch(deployment: str, parameters: dict, key: str, tags: list[str]) -> FlowRun:
    """Create (or, for a known idempotency key, get back) one child flow run without
    waiting; a child left failed/crashed/cancelled by an earlier attempt is rescheduled.

    Raises:
        GradientRunError: the deployment does not exist on the Prefect API.
    """
    try:
        child = run_deployment(deployment, parameters=parameters, idempotency_key=key, as_subflow=True,
                               timeout=0, tags=tags)
    except ObjectNotFound:
        raise GradientRunError(
            f"deployment {deployment!r} (conflict.deployment) does not exist on the Prefect API at "
            f"{PREFECT_API_URL.value() or '<ephemeral>'}; deploy it first, e.g. "
            f"`prefect --no-prompt deploy --name merit-gradients/{deployment.split('/')[-1]}`"
        ) from None
    state = child.state
    if state is not None and state.is_final() and not state.is_completed():
        _logger().warning("gradient child %s (%s) is %s from an earlier attempt; rescheduling it",
                          child.name, child.id, state.name)
        reschedule(child.id, f"rescheduled by a retry of the parent ({key})")
    return child


def run_gradients_on_deployment(config: MeritConfig, base: ModelRef, plan: GradientPlan) -> list[SketchRef]:
    """One flow run of ``config.conflict.deployment`` per batch of ``plan``, concurrently;
    return the batches' sketch references (read from the store) in batch order.

    Raises:
        GradientRunError: no parent flow run, the deployment does not exist, or a child
            ended in a state other than Completed (its state message is included).
        merit_core.pipeline.conflict.SketchStoreError: a completed child left a sketch
            missing from the store.
    """
    parent = _parent_flow_run_id()
    if parent is None:
        raise GradientRunError("conflict.execution='deployment' needs a Prefect flow run of `merit` as the parent "
                               "(run it with `prefect deployment run merit/full`)")
    deployment = config.conflict.deployment
    if not config.store.uri.startswith("s3://"):
        _logger().warning("store %s is a local directory: every worker of %s must see the same path "
                          "(use an s3:// store for workers on other machines)", config.store.uri, deployment)
    common = dict(config=config.model_dump(mode="json"), base=base.model_dump(mode="json"),
                  threads=config.conflict.threads)
    children = []
    for i, batch in enumerate(plan.batches):
        params = {**common, "sources": [s.model_dump(mode="json") for s in batch], "batch": i}
        child = start_batch(deployment, params, idempotency_key(parent, config, base, batch),
                            tags=[f"merit-run:{config.run.name}", "merit:gradients"])
        _logger().info("gradients-%d (%d sources) -> flow run %s (%s) of %s", i, len(batch), child.name,
                       child.id, deployment)
        children.append(child)
    final = wait_for_flow_runs([c.id for c in children], None)
    errors = []
    for i, child in enumerate(children):
        state = final.get(child.id, child).state
        if state is None or not state.is_completed():
            errors.append(f"gradients-{i} (flow run {child.name}, {child.id}) ended "
                          f"{state.name if state else 'without state'}: {state.message if state else ''}")
    if errors:
        raise GradientRunError(f"{len(errors)} of {len(children)} source-gradient batches on {deployment} failed:"
                               "\n  " + "\n  ".join(errors))
    return collect_source_gradients_task(config, base, [s for b in plan.batches for s in b])
