"""Tasks around the run index (merit_core.pipeline.resume): which run this flow run
carries out (a dead run of the same config is continued), and its end."""

from prefect import task
from prefect.runtime import flow_run

from merit_core.config import MeritConfig
from merit_core.pipeline.resume import claim_run, finish_run, run_fingerprint
from merit_core.refs import MixtureRef, ModelRef
from tasks.stages import STORAGE_RETRIES
from tasks.store import run_store


@task(name="claim-run", **STORAGE_RETRIES)
def claim_run_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, new_run_id: str) -> str:
    """The run id this flow run carries out: a dead unfinished run of the same config
    and data (``run.resume: auto``), the one ``run.resume`` names, or ``new_run_id``."""
    record = claim_run(run_store(config), config, run_fingerprint(config, base, mixture), new_run_id,
                       flow_run_id=flow_run.get_id())
    return record.run_id


@task(name="finish-run", **STORAGE_RETRIES)
def finish_run_task(config: MeritConfig, run_id: str) -> None:
    """Record the run finished and delete its local work directories."""
    finish_run(run_store(config), run_id)
