"""The MERIT study as a Prefect flow (docs/study.md): does splitting and merging help on
this mixture, beyond the seed-to-seed noise?

``merit-study`` runs the study protocol of :mod:`merit_core.pipeline.study` — θ(0),
mixture and benchmarks; conflict estimation once and a PCA partition per r; per seed
joint training, MERIT-rD and a random split into the same K, every model evaluated in
and out of the mixture — with each stage a Prefect task and each branch a
``merit-branch`` flow run (local, processes or deployment). Every finished seed is
stored as a record; the report is rebuilt from *all* seed records of the study in the
store, so seeds run later (``first_seed``) add to it.
"""


from prefect import flow, get_run_logger

from flows.branches import run_branches
from flows.common import resolve_config, study_id
from flows.gradients import run_source_gradients
from merit_core.config import MeritConfig
from merit_core.pipeline.study import StudyOps, run_study, with_sections
from merit_core.study import check_study_config, r_values, seeds
from tasks import (
    conflict_task,
    displacement_task,
    evaluate_benchmarks_task,
    evaluate_task,
    load_seed_records_task,
    merge_task,
    prepare_base_task,
    resolve_benchmarks_task,
    resolve_mixture_task,
    save_seed_record_task,
    split_task,
    study_report_task,
)

PREFECT_OPS = StudyOps(
    prepare_base=prepare_base_task, resolve_mixture=resolve_mixture_task,
    resolve_benchmarks=resolve_benchmarks_task, source_gradients=run_source_gradients, conflict=conflict_task,
    split=split_task, run_branches=run_branches, merge=merge_task, evaluate=evaluate_task,
    evaluate_benchmarks=evaluate_benchmarks_task, displacement=displacement_task,
)


@flow(name="merit-study", flow_run_name="study-{config.run.name}", log_prints=True)
def merit_study(config: MeritConfig, n_seeds: int | None = None, first_seed: int = 0,
                config_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """Train joint, MERIT and random-split models for seeds ``first_seed`` ..
    ``first_seed + n_seeds − 1`` (default ``study.seeds`` seeds from 0), evaluate them
    in and out of the mixture, and report — over every seed of the study finished in
    the store — whether the differences exceed the noise. ``config_path`` /
    ``overrides`` as in flow ``merit``."""
    log = get_run_logger()
    config = resolve_config(config, config_path, overrides)
    if n_seeds is not None:
        config = with_sections(config, study={"seeds": n_seeds})
    check_study_config(config)
    study = study_id(config)
    todo = seeds(config, first=first_seed)
    log.info("study %s: seeds %s, r in %s", study, [s.index for s in todo], r_values(config))
    run_study(config, PREFECT_OPS, study_id=study, seeds=todo, log=log,
              on_seed=lambda record: save_seed_record_task(config, record))
    records = load_seed_records_task(config, study)
    report = study_report_task(config, study, records=records)
    log.info("study report (%d seeds): %s", len(records), report["report_uri"])
    return report
