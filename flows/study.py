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
from flows.common import resolve_config, study_id, study_run_name
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
    source_gradient_task,
    split_task,
    study_report_task,
)

PREFECT_OPS = StudyOps(
    prepare_base=prepare_base_task, resolve_mixture=resolve_mixture_task,
    resolve_benchmarks=resolve_benchmarks_task, source_gradient=source_gradient_task, conflict=conflict_task,
    split=split_task, run_branches=run_branches, merge=merge_task, evaluate=evaluate_task,
    evaluate_benchmarks=evaluate_benchmarks_task, displacement=displacement_task,
)


@flow(name="merit-study", flow_run_name=study_run_name, log_prints=True)
def merit_study(config_path: str | None = None, overrides: list[str] | None = None, n_seeds: int | None = None,
                first_seed: int = 0, config: MeritConfig | None = None) -> dict:
    """Train joint, MERIT and random-split models for seeds ``first_seed`` ..
    ``first_seed + n_seeds − 1`` (default ``study.seeds`` seeds from 0), evaluate them
    in and out of the mixture, and report — over every seed of the study finished in
    the store — whether the differences exceed the noise. The flow run is named after
    the study id; the config is published as the ``merit-config`` artifact.

    Args:
        config_path: MeritConfig YAML file, e.g. configs/study-cpu.yaml, read when the run
            starts. It wins: when set, the config form is ignored (the run log says so).
            Leave empty to use the form.
        overrides: key.path=value strings applied on top of config_path or the form, like
            `merit study --set`, e.g. study.r_values=[1,2].
        n_seeds: Seeds to train in this run (default: study.seeds).
        first_seed: Index of the first seed (0; higher continues a study run earlier,
            whose finished seeds the report includes).
        config: The whole config as a form; used only when config_path is empty.
    """
    log = get_run_logger()
    config, _ = resolve_config(config_path, overrides, config)
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
