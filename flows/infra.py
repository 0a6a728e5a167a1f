"""Where a deployment's flow run was meant to run: its work pool and, for container pools
(Docker, Kubernetes), its image. Used to name the infrastructure in the parent's error when
a branch flow run crashed, e.g. because its image cannot be pulled or started."""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun

log = logging.getLogger("merit.branches")


def job_variables_of(run: FlowRun) -> tuple[str | None, dict]:
    """The work pool name and the job variables a worker of it would use for ``run``: the
    pool's template defaults, then the deployment's ``job_variables``, then the run's own.

    Returns:
        (pool name or None, variables); (None, {}) for a run without a deployment.

    Raises:
        Exception: whatever the Prefect client raises when the API cannot be read.
    """
    if run.deployment_id is None:
        return None, {}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(run.deployment_id)
        pool_name = deployment.work_pool_name
        variables: dict = {}
        if pool_name:
            template = client.read_work_pool(pool_name).base_job_template or {}
            props = template.get("variables", {}).get("properties", {})
            variables = {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}
    variables.update(deployment.job_variables or {})
    variables.update(run.job_variables or {})
    return pool_name, variables


def describe_infrastructure(run: FlowRun) -> str:
    """``"work pool merit-docker-cpu, image merit-cpu:latest"`` for a deployment flow run
    (the image only where the pool's jobs have one); ``""`` when it cannot be told (no
    deployment, or the API could not be read: logged at DEBUG, the caller's error stands)."""
    try:
        pool, variables = job_variables_of(run)
    except Exception as e:  # noqa: BLE001 — a hint for an error message, never an error itself
        log.debug("could not read the work pool of flow run %s: %s: %s", run.id, type(e).__name__, e)
        return ""
    if pool is None:
        return ""
    image = variables.get("image")
    return f"work pool {pool}" + (f", image {image}" if image else "")
