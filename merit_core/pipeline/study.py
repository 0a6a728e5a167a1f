"""The MERIT study protocol (docs/study.md), written once and run by two executors.

:func:`run_study` reads like the experiment:

1. θ(0), the training mixture and the out-of-mixture benchmark suite;
2. conflict estimation once (source gradients cached in the store) and the PCA
   partition for every r of ``study.r_values``;
3. θ(0) on held-out and benchmark data;
4. for every seed: joint training (K = 1), MERIT-rD (the PCA groups, merged with token
   weights and, when ``study.uniform_merge``, with uniform weights) and a random split
   into the same K groups drawn with this seed — one epoch each over the same data,
   this seed's data order; then every model on held-out and benchmark data, and its
   displacement ||θ − θ(0)||.

Each stage is a call on a :class:`StudyOps`: the Prefect flow ``merit-study``
(flows/study.py) passes its tasks, :func:`plain_ops` the bare
:mod:`merit_core.pipeline` functions (no Prefect: how the study runs on a GPU machine
without Prefect, bench/gpu/). Both produce one :class:`SeedRecord` per seed — what that
seed contributes to the report — so seeds run in different sessions, on different
machines, accumulate: :func:`combine` rebuilds the report's inputs from every record.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from merit_core.benchmarks import BenchmarkSuite
from merit_core.config import MeritConfig
from merit_core.refs import (
    BranchRef,
    ConflictMatrix,
    MixtureRef,
    ModelRef,
    Partition,
    SketchRef,
    StageTiming,
)
from merit_core.store import ArtifactStore
from merit_core.study import (
    ModelResult,
    Seed,
    merit_label,
    model_result,
    r_values,
    random_label,
    uniform_label,
)

logger = logging.getLogger("merit")


@dataclass(frozen=True)
class StudyOps:
    """The stage calls of a study: the :mod:`merit_core.pipeline` stage functions with the
    store already bound (``fn(config, ...)``; ``displacement(config, base, models)``), and
    ``run_branches(config, base, mixture, groups, run_id, label) -> list[BranchRef]``
    (one branch per group, however the executor runs them) and
    ``source_gradients(config, base, mixture) -> list[SketchRef]`` (every source, in
    mixture order, however the executor batches them)."""

    prepare_base: Callable[..., ModelRef]
    resolve_mixture: Callable[..., MixtureRef]
    resolve_benchmarks: Callable[..., BenchmarkSuite]
    source_gradients: Callable[..., list[SketchRef]]
    conflict: Callable[..., ConflictMatrix]
    split: Callable[..., Partition]
    run_branches: Callable[..., list[BranchRef]]
    merge: Callable[..., ModelRef]
    evaluate: Callable[..., dict]
    evaluate_benchmarks: Callable[..., dict | None]
    displacement: Callable[..., dict[str, float]]


def plain_ops(store: ArtifactStore) -> StudyOps:
    """The :mod:`merit_core.pipeline` stage functions on ``store``, branches trained one
    after another in this process (``run.branch_execution: local`` without Prefect)."""
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.branches import train_branch
    from merit_core.pipeline.conflict import build_conflict_matrix, source_gradients
    from merit_core.pipeline.evaluate import (
        displacement,
        evaluate_benchmarks,
        evaluate_model,
        resolve_benchmarks,
    )
    from merit_core.pipeline.merge import merge_branches
    from merit_core.pipeline.mixture import resolve_mixture
    from merit_core.pipeline.partition import partition_sources

    def run_branches(config, base, mix, groups, run_id, label):
        return [train_branch(config, store, base, mix, g, run_id, label, k) for k, g in enumerate(groups)]

    def on_store(fn):
        return lambda config, *args, **kwargs: fn(config, store, *args, **kwargs)

    return StudyOps(
        prepare_base=on_store(prepare_base), resolve_mixture=on_store(resolve_mixture),
        resolve_benchmarks=on_store(resolve_benchmarks),
        source_gradients=lambda config, base, mix: source_gradients(config, store, base, mix.sources,
                                                                    threads=config.conflict.threads),
        conflict=on_store(build_conflict_matrix), split=partition_sources, run_branches=run_branches,
        merge=on_store(merge_branches), evaluate=on_store(evaluate_model),
        evaluate_benchmarks=on_store(evaluate_benchmarks),
        displacement=lambda config, base, models: displacement(store, base, models),
    )


def stage_timer(timings: list[StageTiming], log: logging.Logger | logging.LoggerAdapter = logger):
    """A context-manager factory: ``with stage("name"):`` logs the stage's wall time and
    appends it to ``timings`` (for the reports)."""

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        timings.append(StageTiming(stage=name, seconds=time.perf_counter() - t0))
        log.info("stage %s: %.1f s", name, timings[-1].seconds)

    return stage


def with_sections(config: MeritConfig, **sections: dict) -> MeritConfig:
    """A copy of ``config`` with fields of some sections replaced, e.g. ``train={"seed": 1}``."""
    return config.model_copy(update={k: getattr(config, k).model_copy(update=v) for k, v in sections.items()})


def environment() -> dict[str, Any]:
    """Where a seed ran: host, device, torch / transformers versions (for the report)."""
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {"host": platform.node(), "device": device, "cuda": torch.version.cuda, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


class SeedRecord(BaseModel):
    """Everything one finished seed contributes to the study report. Stored as
    ``runs/<study-id>/seeds/<index>/record.json`` in the artifact store (a manifest
    directory), and as ``seeds/seed-<index>.json`` in a results folder."""

    study_id: str
    config: dict = Field(description="MeritConfig of the run (JSON).")
    seed: dict = Field(description="index, train_seed, split_seed.")
    mixture: MixtureRef
    suite: BenchmarkSuite
    conflict: ConflictMatrix
    partitions: dict[int, Partition]
    random_partitions: dict[str, Partition]
    results: list[ModelResult] = Field(description="This seed's models, and θ(0) (seed None) as evaluated here.")
    timings: list[StageTiming]
    environment: dict = Field(default_factory=dict)


def run_study(config: MeritConfig, ops: StudyOps, *, study_id: str, seeds: Sequence[Seed],
              log: logging.Logger | logging.LoggerAdapter = logger,
              on_seed: Callable[[SeedRecord], None] | None = None) -> list[SeedRecord]:
    """Run the study protocol (module docstring) for ``seeds``; return one record per seed.

    ``on_seed`` is called with each record as soon as its seed is finished (the callers
    store it, so a later failure loses no finished seed). The shared stages (θ(0),
    gradients, θ(0) evaluation) are timed once and reported with every seed of this call.
    """
    timings: list[StageTiming] = []
    stage = stage_timer(timings, log)

    def evaluate(model: ModelRef, label: str, seed: int | None, branches=(), disp: float | None = None):
        model = model.model_copy(update={"label": label if seed is None else f"{label}-s{seed}"})
        return model_result(label, seed, ops.evaluate(config, model, mixture),
                            ops.evaluate_benchmarks(config, model, suite), disp, branches)

    # 1. θ(0), the training mixture, the out-of-mixture benchmarks (never trained on).
    with stage("prepare base, mixture, benchmarks"):
        base = ops.prepare_base(config)
        mixture = ops.resolve_mixture(config, base)
        suite = ops.resolve_benchmarks(config, base)

    # 2. Conflict estimation once (source gradients cached in the store); PCA split per r.
    with stage("source gradients, conflict matrix, PCA splits"):
        sketches = ops.source_gradients(config, base, mixture)
        conflict = ops.conflict(config, sketches)
        partitions = {r: ops.split(with_sections(config, split={"r": r}), conflict, mixture) for r in r_values(config)}

    # 3. θ(0) once.
    with stage("evaluate θ(0)"):
        base_result = evaluate(base, "base", None)
    shared = list(timings)

    # 4. Every seed: joint, MERIT-rD (token-weighted and uniform merge), random split.
    records = []
    env = environment()
    for seed in seeds:
        timings[:] = []
        cfg = with_sections(config, train={"seed": seed.train_seed}, split={"seed": seed.split_seed})
        run_id = f"{study_id}-s{seed.index}"
        trained: dict[str, tuple[ModelRef, list]] = {}
        random_partitions = {}
        with stage(f"seed {seed.index}: train and merge"):
            joint = ops.run_branches(cfg, base, mixture, [mixture.names], run_id, "joint")
            trained["joint"] = (ModelRef(key=joint[0].key, uri=joint[0].uri, label="joint"), joint)
            for r in r_values(config):
                cfg_r = with_sections(cfg, split={"r": r})
                merit = ops.run_branches(cfg_r, base, mixture, partitions[r].groups, run_id, merit_label(r))
                trained[merit_label(r)] = (ops.merge(cfg_r, base, merit, run_id, merit_label(r)), merit)
                if config.study.uniform_merge:
                    uniform = with_sections(cfg_r, merge={"method": "uniform"})
                    trained[uniform_label(r)] = (ops.merge(uniform, base, merit, run_id, uniform_label(r)), merit)
                rnd = ops.split(cfg_r, conflict, mixture, strategy="random")
                random_partitions[f"seed {seed.index} / r={r}"] = rnd
                rnd_branches = ops.run_branches(cfg_r, base, mixture, rnd.groups, run_id, random_label(r))
                trained[random_label(r)] = (ops.merge(cfg_r, base, rnd_branches, run_id, random_label(r)),
                                            rnd_branches)
        with stage(f"seed {seed.index}: evaluate"):
            disp = ops.displacement(config, base, {k: m for k, (m, _) in trained.items()}) \
                if config.study.displacement else {}
            results = [evaluate(m, label, seed.index, b, disp.get(label)) for label, (m, b) in trained.items()]
        record = SeedRecord(
            study_id=study_id, config=config.model_dump(mode="json"), seed=asdict(seed), mixture=mixture,
            suite=suite, conflict=conflict, partitions=partitions, random_partitions=random_partitions,
            results=[base_result, *results], timings=shared + list(timings), environment=env,
        )
        if on_seed is not None:
            on_seed(record)
        records.append(record)
    return records


class StudyRecordError(ValueError):
    """Seed records that cannot be reported together (names the records and the field)."""


def _training_setup(config: dict) -> dict:
    """The parts of a config that must agree between seeds of one study."""
    keep = ("data", "model", "conflict", "train", "merge", "eval")
    out = {k: config.get(k) for k in keep}
    out["train"] = {k: v for k, v in (out["train"] or {}).items() if k not in ("seed", "threads", "nproc_per_node")}
    out["split"] = {k: v for k, v in (config.get("split") or {}).items() if k != "seed"}
    out["study"] = {k: v for k, v in (config.get("study") or {}).items() if k not in ("seeds", "id")}
    return out


def combine(records: Sequence[SeedRecord], where: str = "seed records") -> dict[str, Any]:
    """The inputs of :func:`merit_core.report.write_study_report` from the records of
    every finished seed (any order, any sessions).

    θ(0)'s result, the mixture, suite, conflict matrix and PCA partitions come from the
    record of the lowest seed; every record must have the same training setup (config
    apart from seeds), mixture and benchmark content, and a distinct seed index.

    Raises:
        StudyRecordError: no records, a repeated seed, or records from different setups
            (names the seeds and what differs).
    """
    if not records:
        raise StudyRecordError(f"{where}: no finished seed to report")
    recs = sorted(records, key=lambda r: r.seed["index"])
    first = recs[0]
    seen: set[int] = set()
    for r in recs:
        i = r.seed["index"]
        if i in seen:
            raise StudyRecordError(f"{where}: seed {i} appears twice")
        seen.add(i)
        if r is first:
            continue
        a, b = _training_setup(first.config), _training_setup(r.config)
        for section in a:
            if a[section] != b[section]:
                raise StudyRecordError(f"{where}: seed {i} was run with a different {section} config than seed "
                                       f"{first.seed['index']}; a study compares seeds of one setup")
        if [s.content_hash for s in r.mixture.sources] != [s.content_hash for s in first.mixture.sources]:
            raise StudyRecordError(f"{where}: seed {i} trained on different data than seed {first.seed['index']}")
        if [b.content_hash for b in r.suite.benchmarks] != [b.content_hash for b in first.suite.benchmarks]:
            raise StudyRecordError(f"{where}: seed {i} used different benchmarks than seed {first.seed['index']}")
    config = MeritConfig.model_validate(first.config)
    config = with_sections(config, study={"seeds": len(recs)})
    results = [res for res in first.results if res.seed is None]
    random_partitions: dict[str, Partition] = {}
    timings: list[StageTiming] = []
    for r in recs:
        results += [res for res in r.results if res.seed is not None]
        random_partitions.update(r.random_partitions)
        timings += [t.model_copy(update={"stage": f"[seed {r.seed['index']} run] {t.stage}"}) for t in r.timings]
    return {
        "study_id": first.study_id, "config": config, "seeds": [Seed(**r.seed) for r in recs],
        "mixture": first.mixture, "suite": first.suite, "conflict": first.conflict,
        "partitions": first.partitions, "random_partitions": random_partitions, "results": results,
        "timings": timings, "environments": {r.seed["index"]: r.environment for r in recs},
    }


def record_path(folder: str | os.PathLike, index: int) -> Path:
    """``<folder>/seeds/seed-<index>.json``: a seed record in a results folder."""
    return Path(folder) / "seeds" / f"seed-{index}.json"


def write_record(folder: str | os.PathLike, record: SeedRecord) -> Path:
    """Write ``record`` into a results folder (atomically: a partial file never looks finished)."""
    path = record_path(folder, record.seed["index"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(record.model_dump_json(indent=1))
    os.replace(tmp, path)
    return path


def read_records(folder: str | os.PathLike) -> list[SeedRecord]:
    """Every seed record of a results folder (``seeds/seed-*.json``), by seed index.

    Raises:
        StudyRecordError: no record, or a file that is not a seed record (names it).
    """
    from pydantic import ValidationError

    files = sorted((Path(folder) / "seeds").glob("seed-*.json"))
    if not files:
        raise StudyRecordError(f"{folder}: no seed record (seeds/seed-<i>.json) to report")
    out = []
    for f in files:
        try:
            out.append(SeedRecord.model_validate_json(f.read_text()))
        except ValidationError as e:
            raise StudyRecordError(f"{f}: not a study seed record: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") \
                from None
    return sorted(out, key=lambda r: r.seed["index"])
