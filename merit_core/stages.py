"""What each pipeline stage does with the store: read inputs, call the method, commit
outputs. Prefect-free; ``tasks/`` wraps each function in a @task, the CLI calls them
directly to run one stage on existing artifacts.

Every stage is idempotent: if its output directory is already complete in the store
(manifest present), it returns the existing reference instead of recomputing, so a
retried task or a re-run flow never redoes finished work.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from merit_core.artifacts import (
    BranchCheckpoint,
    ConflictReport,
    MixtureManifest,
    ModelRef,
    Partition,
    SketchRef,
    SourceInfo,
    read_examples,
    write_examples,
)
from merit_core.config import MeritConfig
from merit_core.data.types import TokenizedExample
from merit_core.store import ArtifactStore, open_store, safe_key

logger = logging.getLogger("merit")


def cache_root() -> Path:
    """Local cache for converted models and work dirs (``$MERIT_CACHE_DIR`` or
    ``~/.cache/merit``)."""
    return Path(os.environ.get("MERIT_CACHE_DIR", Path.home() / ".cache" / "merit"))


def store_for(cfg: MeritConfig) -> ArtifactStore:
    """The artifact store of a run (local directory or S3), from ``cfg.store``."""
    return open_store(cfg.store)


# --- prepare base -------------------------------------------------------------------


def prepare_base(cfg: MeritConfig) -> ModelRef:
    """Resolve θ(0) (GGUF conversion, local dir or hub id) and put it in the store under
    ``models/<sha>``.

    Returns:
        ModelRef with the weights' sha256 (the cache key of every source gradient).
    """
    from merit_core.models import model_sha256, resolve_model_source

    store = store_for(cfg)
    local = Path(resolve_model_source(cfg.model, cache_root() / "models"))
    sha = model_sha256(local)
    key = safe_key("models", sha)
    if not store.is_complete(key):
        staging = store.staging_dir(key)
        for p in local.iterdir():
            if p.is_file() and p.name != "manifest.json":
                shutil.copy2(p, staging / p.name)
        store.commit_dir(key, staging, metadata={"kind": "base", "source": cfg.model.source, "sha256": sha})
    return ModelRef(key=key, uri=store.uri_for(key), sha256=sha, label="base")


def load_base_tokenizer(store: ArtifactStore, base: ModelRef):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(store.fetch_dir(base.key))


# --- resolve mixture ---------------------------------------------------------------


def resolve_mixture(cfg: MeritConfig, base: ModelRef) -> MixtureManifest:
    """Load, tokenize and split every source; store the tokenized splits under
    ``data/<content-hash>/`` (train.jsonl, heldout.jsonl, calibration.jsonl)."""
    from merit_core.data import resolve_mixture as _resolve

    store = store_for(cfg)
    tokenizer = load_base_tokenizer(store, base)
    mixture = _resolve(cfg.data, tokenizer, cfg.conflict.calibration_size)
    infos = []
    for name in mixture.names:
        sd = mixture.sources[name]
        key = safe_key("data", sd.content_hash)
        if not store.is_complete(key):
            staging = store.staging_dir(key)
            write_examples(staging / "train.jsonl", sd.train)
            write_examples(staging / "heldout.jsonl", sd.heldout)
            write_examples(staging / "calibration.jsonl", sd.calibration)
            store.commit_dir(key, staging, metadata={"kind": "tokenized-source", "source": name})
        st = sd.stats
        spec = next(s for s in cfg.data.sources if s.name == name)
        infos.append(
            SourceInfo(
                name=name,
                kind=spec.kind,
                content_hash=sd.content_hash,
                key=key,
                examples=st.examples,
                train=st.train_examples,
                heldout=st.heldout_examples,
                calibration=st.calibration_examples,
                loss_tokens=st.loss_tokens,
                truncated=st.truncated,
                dropped=st.dropped,
                has_options=any(e.example is not None and e.example.options for e in sd.heldout),
            )
        )
    return MixtureManifest(sources=infos)


def load_split(store: ArtifactStore, source: SourceInfo, split: str) -> list[TokenizedExample]:
    """Tokenized examples of one split (``train``/``heldout``/``calibration``) of a source."""
    return read_examples(store.fetch_dir(source.key) / f"{split}.jsonl")


# --- conflict ------------------------------------------------------------------------


def sketch_key(cfg: MeritConfig, base: ModelRef, source: SourceInfo) -> str:
    """``sketches/<model-sha>/<source-hash>-<settings-hash>.npy``: the cache key of g_t
    (spec step 1: cache by model hash, source content hash, calibration settings)."""
    import hashlib

    from merit_core.conflict import make_sketcher

    settings = {
        "conflict": cfg.conflict.model_dump(exclude={"kind"}),  # C's kind is computed later
        "sketcher": make_sketcher(cfg.conflict).settings(),
        "trainable": cfg.model.trainable,
        "dtype": cfg.model.dtype,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return safe_key("sketches", base.sha256, f"{source.content_hash[:24]}-{digest}.npy")


def source_gradient(cfg: MeritConfig, base: ModelRef, source: SourceInfo) -> SketchRef:
    """Sketch of the mean calibration gradient g_t of one source at θ(0) (spec step 1).

    Reuses the stored sketch when one exists for the same model, source content and
    conflict settings (adding sources costs only their own gradients).
    """
    from merit_core.batching import batches
    from merit_core.conflict import make_sketcher
    from merit_core.conflict import source_gradient as _grad
    from merit_core.models import load_model
    from merit_core.precision import resolve_bf16

    store = store_for(cfg)
    key = sketch_key(cfg, base, source)
    if store.exists(key):
        vec = _load_sketch(store, key)
        logger.info("source %s: reusing cached source gradient %s", source.name, key)
        return SketchRef(source=source.name, key=key, dim=int(vec.shape[0]), cached=True)
    model, tokenizer = load_model(store.fetch_dir(base.key), dtype=cfg.model.dtype,
                                  trust_remote_code=cfg.model.trust_remote_code)
    model.to(_device())  # the GPU when there is one (the sketch is then computed there too)
    calib = load_split(store, source, "calibration")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vec = _grad(model, batches(calib, cfg.conflict.batch_size, pad), trainable=cfg.model.trainable,
                sketcher=make_sketcher(cfg.conflict), bf16=resolve_bf16(cfg.conflict.bf16, _device(), "conflict.bf16"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sketch.npy"
        np.save(path, vec.astype(np.float32))
        store.put_file(key, path)
    logger.info("source %s: computed source gradient sketch (dim %d) -> %s", source.name, vec.shape[0], key)
    return SketchRef(source=source.name, key=key, dim=int(vec.shape[0]), cached=False)


def _load_sketch(store: ArtifactStore, key: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        return np.load(store.get_file(key, Path(tmp) / "sketch.npy"), allow_pickle=False)


def conflict(cfg: MeritConfig, sketches: Sequence[SketchRef]) -> ConflictReport:
    """The T×T conflict matrix C from the stored sketches (cosine by default)."""
    from merit_core.conflict import conflict_matrix

    store = store_for(cfg)
    G = np.stack([_load_sketch(store, s.key) for s in sketches])
    C = conflict_matrix(G, kind=cfg.conflict.kind)
    return ConflictReport(names=[s.source for s in sketches], kind=cfg.conflict.kind, matrix=C.tolist())


def split(cfg: MeritConfig, report: ConflictReport, mixture: MixtureManifest,
          strategy: str | None = None, seed: int | None = None) -> Partition:
    """Split the sources into K = 2^r groups (spec steps 2–3) by ``strategy``
    (default ``cfg.split.strategy``; ``random`` for the random-split baseline)."""
    from merit_core.split import split_sources

    scfg = cfg.split.model_copy(update={k: v for k, v in {"strategy": strategy, "seed": seed}.items() if v is not None})
    names = report.names
    if scfg.balance == "tokens":
        w = {n: float(mixture.get(n).loss_tokens) for n in names}
    else:
        w = {n: float(mixture.get(n).train) for n in names}
    res = split_sources(np.asarray(report.matrix), np.asarray([w[n] for n in names]), scfg)
    return Partition(
        method=res.method,
        groups=res.named(names),
        weights=w,
        scores=None if res.scores is None else np.asarray(res.scores).tolist(),
        explained_variance_ratio=None
        if res.explained_variance_ratio is None
        else np.asarray(res.explained_variance_ratio).tolist(),
    )


# --- branch --------------------------------------------------------------------------


def branch_key(run_id: str, label: str, index: int) -> str:
    return safe_key("runs", run_id, label, "branches", str(index))


def train_branch(cfg: MeritConfig, base: ModelRef, mixture: MixtureManifest, sources: Sequence[str],
                 run_id: str, label: str, index: int,
                 after_checkpoint: Callable[[Path], None] | None = None) -> BranchCheckpoint:
    """Fine-tune θ(0) on the union of ``sources`` (spec step 4) and commit θ_k to
    ``runs/<run-id>/<label>/branches/<index>/``.

    Checkpoints go to ``.../branches/<index>-checkpoints/checkpoint-<step>/`` in the
    store as they are written; a restarted branch (retry, new worker) first fetches the
    newest complete one and resumes from it. Once θ_k is committed they are deleted.
    ``after_checkpoint`` is called with each local checkpoint dir once it is in the store
    (in-process branches only). With ``train.nproc_per_node`` > 1 the branch trains on
    that many processes under torchrun (:mod:`merit_core.launch`).
    """
    from merit_core.launch import resolve_nproc, run_distributed_branch
    from merit_core.train import check_train_setup
    from merit_core.train import train_branch as _train

    store = store_for(cfg)
    key = branch_key(run_id, label, index)
    if store.is_complete(key):
        meta = store.get_json(f"{key}/manifest.json")["metadata"]
        logger.info("branch %s/%d already complete in the store; reusing it", label, index)
        return BranchCheckpoint.model_validate(meta["branch"])
    examples: list[TokenizedExample] = []
    for name in sorted(sources):
        examples += load_split(store, mixture.get(name), "train")
    base_dir = store.fetch_dir(base.key)

    ckpt_prefix = key + "-checkpoints"
    work = cache_root() / "work" / safe_key(run_id, label, str(index))
    ckpt_dir = work / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _restore_newest_checkpoint(store, ckpt_prefix, ckpt_dir)

    def upload(path: Path) -> None:
        store.commit_dir(f"{ckpt_prefix}/{path.name}", path, metadata={"kind": "train-checkpoint"})
        if after_checkpoint is not None:
            after_checkpoint(path)

    out = store.staging_dir(key)
    nproc = resolve_nproc(cfg.train.nproc_per_node)
    check_train_setup(cfg.train, nproc)
    if nproc > 1 or cfg.train.deepspeed:  # torchrun (DDP / DeepSpeed ZeRO, which needs its env even on 1 GPU)
        write_examples(work / "examples.jsonl", examples)
        res = run_distributed_branch(
            {"config": cfg.model_dump(mode="json"), "base_dir": str(base_dir),
             "examples": str(work / "examples.jsonl"), "output_dir": str(out), "checkpoint_dir": str(ckpt_dir),
             "checkpoint_prefix": ckpt_prefix, "dtype": cfg.model.dtype},
            work, nproc)
    else:
        res = _train(base_dir, examples, out, cfg.train, checkpoint_dir=ckpt_dir,
                     dtype=cfg.model.dtype, on_checkpoint=upload)
    ref = BranchCheckpoint(
        index=index, label=label, key=key, uri=store.uri_for(key), sources=sorted(sources),
        trained_tokens=res.trained_tokens, examples=res.examples, steps=res.steps,
        train_loss=res.train_loss, wall_s=res.wall_s, resumed_from_step=res.resumed_from_step,
        processes=res.processes, packed=res.packed,
        real_token_fraction=None if math.isnan(res.real_token_fraction) else res.real_token_fraction,
    )
    store.commit_dir(key, Path(res.output_dir), metadata={"kind": "branch", "branch": ref.model_dump()})
    store.delete_prefix(ckpt_prefix)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("branch %s/%d: %d sources, %d examples, %d steps, N_k = %d tokens, train loss %.3f, %.1f s, "
                "%s real tokens%s", label, index, len(ref.sources), ref.examples, ref.steps, ref.trained_tokens,
                ref.train_loss, ref.wall_s, "–" if ref.real_token_fraction is None else
                f"{ref.real_token_fraction:.1%}", " (packed)" if ref.packed else "")
    return ref


def _restore_newest_checkpoint(store: ArtifactStore, prefix: str, ckpt_dir: Path) -> None:
    complete = store.list_complete(prefix)
    if not complete:
        return
    newest = max(complete, key=lambda k: int(k.rstrip("/").rsplit("-", 1)[-1]))
    dest = ckpt_dir / newest.rstrip("/").rsplit("/", 1)[-1]
    if not dest.exists():
        src = store.fetch_dir(newest)
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("manifest.json"))
    logger.info("restored training checkpoint %s for resume", newest)


# --- merge ---------------------------------------------------------------------------


def merge(cfg: MeritConfig, base: ModelRef, branches: Sequence[BranchCheckpoint], run_id: str,
          label: str) -> ModelRef:
    """Merge the K branches once (spec step 5): θ̄ = Σ_k w_k θ_k, w_k = N_k / Σ_j N_j
    with the default ``token_weighted`` operator; commit to ``runs/<id>/<label>/merged``."""
    from merit_core.merge import merge_checkpoints

    store = store_for(cfg)
    key = safe_key("runs", run_id, label, "merged")
    if store.is_complete(key):
        return ModelRef(key=key, uri=store.uri_for(key), label=label)
    inputs = [store.fetch_dir(b.key) for b in sorted(branches, key=lambda b: b.index)]
    weights = [float(b.trained_tokens) for b in sorted(branches, key=lambda b: b.index)]
    base_dir = store.fetch_dir(base.key) if cfg.merge.method in ("task_arithmetic", "ties", "dare") else None
    out = store.staging_dir(key)
    merge_checkpoints(
        inputs, weights, out, method=cfg.merge.method, base=base_dir, scale=cfg.merge.scale,
        density=cfg.merge.density, seed=cfg.merge.seed, max_shard_size=cfg.merge.max_shard_size,
        metadata={"branches": [b.key for b in branches], "trained_tokens": weights},
    )
    store.commit_dir(key, out, metadata={"kind": "merged", "method": cfg.merge.method,
                                         "branches": [b.key for b in branches], "trained_tokens": weights})
    return ModelRef(key=key, uri=store.uri_for(key), label=label)


# --- evaluate ------------------------------------------------------------------------


def evaluate(cfg: MeritConfig, model: ModelRef, mixture: MixtureManifest) -> dict:
    """Held-out metrics of one model on every source of the mixture (spec step 6,
    in-mixture); returns the EvalTable as a dict."""
    store = store_for(cfg)
    t0 = time.perf_counter()
    table = evaluate_model_dir(cfg, store.fetch_dir(model.key), mixture, name=model.label or model.key)
    logger.info("evaluated %s in %.1f s", model.label or model.key, time.perf_counter() - t0)
    return table.model_dump()


def evaluate_model_dir(cfg: MeritConfig, model_dir: str | Path, mixture: MixtureManifest, name: str | None = None):
    """:func:`merit_core.evaluate.evaluate_dir` of a local model directory on the
    mixture's held-out splits, with the ``eval`` settings of ``cfg``."""
    from merit_core.evaluate import evaluate_dir

    store = store_for(cfg)
    heldout = {s.name: load_split(store, s, "heldout") for s in mixture.sources}
    return evaluate_dir(
        model_dir, heldout, batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens, generate=cfg.eval.generate,
        multiple_choice=cfg.eval.multiple_choice, chat_template=cfg.data.chat_template,
        max_examples_per_source=cfg.eval.max_examples_per_source, bf16=_eval_bf16(cfg),
        name=name or str(model_dir),
    )


def _eval_bf16(cfg: MeritConfig) -> bool:
    from merit_core.precision import resolve_bf16

    return resolve_bf16(cfg.eval.bf16, _device(), "eval.bf16")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- report --------------------------------------------------------------------------


def write_run_report(cfg: MeritConfig, run_id: str, **parts) -> tuple[dict, str]:
    """Write report.md/json and PNGs to ``runs/<run-id>/report/`` in the store.

    Returns:
        (report dict, report markdown with the store URI of every file).
    """
    from merit_core.report import write_report

    store = store_for(cfg)
    key = safe_key("runs", run_id, "report")
    staging = store.staging_dir(key)
    data = write_report(staging, run_id=run_id, **parts)
    md = (staging / "report.md").read_text()
    uri = store.commit_dir(key, staging, metadata={"kind": "report"})
    md += f"\n\nReport files: `{uri}` (report.md, report.json, PNGs)\n"
    data["report_uri"] = uri
    return data, md


# --- study: out-of-mixture benchmarks, displacement, study report (docs/study.md) ---


def resolve_benchmarks(cfg: MeritConfig, base: ModelRef):
    """Tokenize every benchmark of ``cfg.eval.benchmarks`` like held-out data (all
    examples for evaluation, at most ``eval.benchmark_max_examples``) and store them under
    ``benchmarks/<content-hash>/examples.jsonl``.

    Returns:
        BenchmarkSuite (empty when no benchmark is configured).
    """
    from merit_core.benchmarks import BenchmarkInfo, BenchmarkSuite, load_benchmark
    from merit_core.data import content_hash

    if not cfg.eval.benchmarks:
        return BenchmarkSuite(benchmarks=[])
    store = store_for(cfg)
    tokenizer = load_base_tokenizer(store, base)
    infos = []
    for spec in cfg.eval.benchmarks:
        examples, counts = load_benchmark(spec, tokenizer, max_length=cfg.data.max_length,
                                          max_examples=cfg.eval.benchmark_max_examples, seed=cfg.data.seed,
                                          chat_template=cfg.data.chat_template)
        digest = content_hash([], examples, [])
        key = safe_key("benchmarks", digest)
        if not store.is_complete(key):
            staging = store.staging_dir(key)
            write_examples(staging / "examples.jsonl", examples)
            store.commit_dir(key, staging, metadata={"kind": "tokenized-benchmark", "benchmark": spec.name})
        infos.append(BenchmarkInfo(name=spec.name, kind=spec.kind, task=spec.task or spec.path or spec.dataset or "",
                                   content_hash=digest, key=key, **counts))
        logger.info("benchmark %s: %d examples (%d multiple choice)", spec.name, counts["examples"],
                    counts["multiple_choice"])
    return BenchmarkSuite(benchmarks=infos)


def evaluate_benchmarks(cfg: MeritConfig, model: ModelRef, suite) -> dict | None:
    """Out-of-mixture metrics of one model on every benchmark of ``suite`` (EvalTable
    dict), or None when the suite is empty."""
    from merit_core.benchmarks import evaluate_benchmarks_dir

    if not suite.benchmarks:
        return None
    store = store_for(cfg)
    examples = {b.name: read_examples(store.fetch_dir(b.key) / "examples.jsonl") for b in suite.benchmarks}
    t0 = time.perf_counter()
    table = evaluate_benchmarks_dir(store.fetch_dir(model.key), examples, batch_size=cfg.eval.batch_size,
                                    max_new_tokens=cfg.eval.max_new_tokens, chat_template=cfg.data.chat_template,
                                    name=model.label or model.key, bf16=_eval_bf16(cfg))
    logger.info("benchmarks of %s in %.1f s", model.label or model.key, time.perf_counter() - t0)
    return table.model_dump()


def displacement(cfg: MeritConfig, base: ModelRef, models: dict[str, ModelRef]) -> dict[str, float]:
    """||θ − θ(0)||_2 of each model (label -> norm), streamed from the store."""
    from merit_core.diagnostics import displacement_norms

    store = store_for(cfg)
    return displacement_norms(store.fetch_dir(base.key), {k: store.fetch_dir(m.key) for k, m in models.items()})


def seed_record_key(study_id: str, index: int) -> str:
    """``runs/<study-id>/seeds/<index>``: a finished seed's record (record.json + manifest)."""
    return safe_key("runs", study_id, "seeds", str(index))


def save_seed_record(cfg: MeritConfig, record) -> str:
    """Commit a :class:`merit_core.pipeline.study.SeedRecord` to the store; returns its URI."""
    store = store_for(cfg)
    key = seed_record_key(record.study_id, record.seed["index"])
    staging = store.staging_dir(key)
    (staging / "record.json").write_text(record.model_dump_json(indent=1))
    return store.commit_dir(key, staging, metadata={"kind": "study-seed", "seed": record.seed})


def load_seed_records(cfg: MeritConfig, study_id: str) -> list:
    """Every finished seed record of a study in the store (verified by its manifest), by seed."""
    from merit_core.pipeline.study import SeedRecord

    store = store_for(cfg)
    keys = store.list_complete(safe_key("runs", study_id, "seeds"))
    records = [SeedRecord.model_validate_json((store.fetch_dir(k.rstrip("/")) / "record.json").read_text())
               for k in keys]
    return sorted(records, key=lambda r: r.seed["index"])


def write_study_report(cfg: MeritConfig, study_id: str, records: Sequence) -> tuple[dict, str]:
    """Write the study's report.md/json and PNGs, built from the seed ``records``
    (:func:`merit_core.pipeline.study.combine`), to ``runs/<study-id>/report/``.

    Returns:
        (report dict, report markdown with the store URI of the files).
    """
    from merit_core.pipeline.study import combine
    from merit_core.report import write_study_report as _write

    store = store_for(cfg)
    key = safe_key("runs", study_id, "report")
    staging = store.staging_dir(key)
    data = _write(staging, **combine(records, where=f"study {study_id}"))
    md = (staging / "report.md").read_text()
    uri = store.commit_dir(key, staging, metadata={"kind": "study-report"})
    md += f"\n\nReport files: `{uri}` (report.md, report.json, PNGs)\n"
    data["report_uri"] = uri
    return data, md
