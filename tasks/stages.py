"""Thin @task wrappers, one per stage of ARCHITECTURE.md's data-flow table.

No maths here: each task calls one stage of :mod:`merit_core.pipeline` on the run's store
(:func:`tasks.store.run_store`) and, where a person wants to see something, publishes a
Prefect artifact. Retries are declared on the
stages that touch training or storage; source gradients are cached in the artifact store
by (model sha, source content hash, conflict settings) — see ``source_gradient_task``.
"""



from prefect import task
from prefect.artifacts import create_table_artifact

from merit_core.benchmarks import BenchmarkSuite
from merit_core.config import MeritConfig
from merit_core.errors import is_user_error
from merit_core.pipeline import reports
from merit_core.pipeline.base import prepare_base
from merit_core.pipeline.branches import collect_branches, train_branch
from merit_core.pipeline.conflict import (
    build_conflict_matrix,
    collect_source_gradients,
    plan_source_gradients,
    source_gradient,
    source_gradients,
)
from merit_core.pipeline.evaluate import (
    displacement,
    evaluate_benchmarks,
    evaluate_model,
    resolve_benchmarks,
)
from merit_core.pipeline.merge import merge_branches
from merit_core.pipeline.mixture import resolve_mixture
from merit_core.pipeline.partition import partition_sources
from merit_core.pipeline.study import SeedRecord
from merit_core.refs import (
    BranchRef,
    ConflictMatrix,
    GradientPlan,
    MixtureRef,
    ModelRef,
    Partition,
    SketchRef,
    SourceInfo,
)
from tasks.artifacts import TrainProgressArtifact, publish_branch, publish_run_report, publish_study_report
from tasks.store import run_store


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry a failed task unless it failed on a user error
    (:func:`merit_core.errors.is_user_error`: bad config or data, a missing model source,
    settings this machine cannot train with, an S3 endpoint that did not answer within
    ``store.*`` limits): the same input fails the same way. Transient failures retry."""
    return not is_user_error(state.result(raise_on_failure=False))


STORAGE_RETRIES = {"retries": 2, "retry_delay_seconds": [5, 20], "retry_condition_fn": retry_unless_user_error}
TRAIN_RETRIES = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": retry_unless_user_error}


@task(name="prepare-base", **STORAGE_RETRIES)
def prepare_base_task(config: MeritConfig) -> ModelRef:
    return prepare_base(config, run_store(config))


@task(name="resolve-mixture", **STORAGE_RETRIES)
def resolve_mixture_task(config: MeritConfig, base: ModelRef) -> MixtureRef:
    mixture = resolve_mixture(config, run_store(config), base)
    create_table_artifact(
        key="mixture", table=[s.model_dump(exclude={"key"}) for s in mixture.sources],
        description="Resolved training mixture: examples, splits and loss tokens per source",
    )
    return mixture


@task(name="source-gradient", task_run_name="source-gradient-{source.name}", **STORAGE_RETRIES)
def source_gradient_task(config: MeritConfig, base: ModelRef, source: SourceInfo) -> SketchRef:
    """g_t of one source. Cached in the artifact store under
    ``sketches/<model-sha>/<source-hash>-<settings-hash>.npy`` rather than in Prefect's
    result cache: the store is what every worker shares, and a cache entry there cannot
    outlive the sketch it points to (a Prefect cache hit could, after a store is wiped)."""
    return source_gradient(config, run_store(config), base, source)


@task(name="plan-source-gradients", **STORAGE_RETRIES)
def plan_source_gradients_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, workers: int) -> GradientPlan:
    """Sketches already stored, and the other sources in at most ``workers`` batches."""
    return plan_source_gradients(config, run_store(config), base, mixture.sources, workers)


@task(name="source-gradients", task_run_name="source-gradients-{batch}", **STORAGE_RETRIES)
def source_gradients_task(config: MeritConfig, base: ModelRef, sources: list[SourceInfo], batch: int = 0,
                          threads: int | None = None) -> list[SketchRef]:
    """g_t of a batch of sources with θ(0) loaded once; cached per source in the store
    like ``source_gradient_task`` (a retry recomputes only the sketches not committed)."""
    return source_gradients(config, run_store(config), base, sources, threads=threads)


@task(name="collect-source-gradients", **STORAGE_RETRIES)
def collect_source_gradients_task(config: MeritConfig, base: ModelRef, sources: list[SourceInfo]) -> list[SketchRef]:
    """The sketches that flow runs on other workers committed, read back from the store."""
    return collect_source_gradients(config, run_store(config), base, sources)


@task(name="conflict-matrix")
def conflict_task(config: MeritConfig, sketches: list[SketchRef]) -> ConflictMatrix:
    return build_conflict_matrix(config, run_store(config), sketches)


@task(name="split")
def split_task(config: MeritConfig, conflict: ConflictMatrix, mixture: MixtureRef,
               strategy: str | None = None) -> Partition:
    return partition_sources(config, conflict, mixture, strategy=strategy)


@task(name="train-branch", task_run_name="train-{label}-{index}", **TRAIN_RETRIES)
def train_branch_task(config: MeritConfig, base: ModelRef, mixture: MixtureRef, sources: list[str],
                      run_id: str, label: str, index: int) -> BranchRef:
    """Train one branch; its optimizer steps drive a progress artifact, and the finished
    branch is published as a table artifact (sources, steps, tokens, loss, θ_k's URI)."""
    progress = TrainProgressArtifact(f"training {label}-branch-{index}")
    ref = train_branch(config, run_store(config), base, mixture, sources, run_id, label, index, on_progress=progress)
    publish_branch(ref)
    return ref


@task(name="collect-branches", task_run_name="collect-{label}", **STORAGE_RETRIES)
def collect_branches_task(config: MeritConfig, run_id: str, label: str, groups: list[list[str]],
                          indices: list[int] | None = None) -> list[BranchRef]:
    """The branches that flow runs on other workers committed, read back from the store."""
    return collect_branches(run_store(config), run_id, label, groups, indices)


@task(name="merge", task_run_name="merge-{label}", **STORAGE_RETRIES)
def merge_task(config: MeritConfig, base: ModelRef, branches: list[BranchRef], run_id: str,
               label: str) -> ModelRef:
    return merge_branches(config, run_store(config), base, branches, run_id, label)


@task(name="evaluate", task_run_name="evaluate-{model.label}")
def evaluate_task(config: MeritConfig, model: ModelRef, mixture: MixtureRef) -> dict:
    return evaluate_model(config, run_store(config), model, mixture)


@task(name="report", **STORAGE_RETRIES)
def report_task(config: MeritConfig, run_id: str, **parts) -> dict:
    """Write the report to the store and publish it as Prefect artifacts."""
    store = run_store(config)
    report, md = reports.write_run_report(store, run_id, **parts)
    publish_run_report(store, report, md)
    return report


# --- study (flows/study.py) ---------------------------------------------------------


@task(name="resolve-benchmarks", **STORAGE_RETRIES)
def resolve_benchmarks_task(config: MeritConfig, base: ModelRef) -> BenchmarkSuite:
    """Out-of-mixture benchmarks, tokenized like held-out data (merit_core.benchmarks)."""
    suite = resolve_benchmarks(config, run_store(config), base)
    if suite.benchmarks:
        create_table_artifact(key="benchmarks", table=[b.model_dump(exclude={"key"}) for b in suite.benchmarks],
                              description="Out-of-mixture benchmarks: examples per benchmark (never trained on)")
    return suite


@task(name="evaluate-benchmarks", task_run_name="benchmarks-{model.label}")
def evaluate_benchmarks_task(config: MeritConfig, model: ModelRef, suite: BenchmarkSuite) -> dict | None:
    return evaluate_benchmarks(config, run_store(config), model, suite)


@task(name="displacement", **STORAGE_RETRIES)
def displacement_task(config: MeritConfig, base: ModelRef, models: dict[str, ModelRef]) -> dict[str, float]:
    """||θ − θ(0)|| of each model (merit_core.diagnostics.displacement_norms)."""
    return displacement(run_store(config), base, models)


@task(name="save-seed-record", task_run_name="seed-record-{record.seed[index]}", **STORAGE_RETRIES)
def save_seed_record_task(config: MeritConfig, record: SeedRecord) -> str:
    """Store a finished seed's record (merit_core.pipeline.study.SeedRecord)."""
    return reports.save_seed_record(run_store(config), record)


@task(name="load-seed-records", **STORAGE_RETRIES)
def load_seed_records_task(config: MeritConfig, study_id: str) -> list[SeedRecord]:
    """Every finished seed record of the study in the store."""
    return reports.load_seed_records(run_store(config), study_id)


@task(name="study-report", **STORAGE_RETRIES)
def study_report_task(config: MeritConfig, study_id: str, records: list[SeedRecord]) -> dict:
    """Write the study report (from every finished seed's record) to the store and
    publish it as Prefect artifacts."""
    store = run_store(config)
    report, md = reports.write_study_report(store, study_id, records)
    publish_study_report(store, study_id, md)
    create_table_artifact(
        key="merit-study-comparisons",
        table=[{k: c[k] for k in ("model", "baseline", "metric", "mean_diff", "ci_low", "ci_high", "sign_p",
                                  "exceeds_noise")} for c in report["summary"]["comparisons"]],
        description="Paired comparisons over seeds (model − baseline)",
    )
    return report
