"""Stages *evaluate*, *resolve benchmarks*, *evaluate benchmarks* and *displacement*
(MERIT spec step 6): every model on the held-out part of every source, and on
out-of-mixture benchmarks that no branch trained on."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from merit_core.benchmarks import (
    BenchmarkInfo,
    BenchmarkSuite,
    evaluate_benchmarks_dir,
    load_benchmark,
)
from merit_core.config import MeritConfig
from merit_core.data import content_hash
from merit_core.diagnostics import displacement_norms
from merit_core.evaluate import EvalTable, evaluate_dir
from merit_core.models import check_model_dir
from merit_core.pipeline.base import load_base_processor, load_base_tokenizer
from merit_core.pipeline.layout import benchmark_key
from merit_core.pipeline.mixture import load_split, read_stored_examples, with_stored_images
from merit_core.precision import default_device, resolve_bf16
from merit_core.refs import (
    MixtureRef,
    ModelRef,
    write_examples,
)
from merit_core.store import ArtifactStore
from merit_core.store.objects import intact_dir

logger = logging.getLogger("merit")


def evaluate_model(cfg: MeritConfig, store: ArtifactStore, model: ModelRef, mixture: MixtureRef) -> dict:
    """Held-out metrics of one stored model on every source of the mixture.

    Returns:
        The :class:`merit_core.evaluate.EvalTable` as a dict (one row per source, a mean row).
    """
    t0 = time.perf_counter()
    table = evaluate_model_dir(cfg, store, store.fetch_dir(model.key), mixture, name=model.label or model.key,
                               verify=False)  # fetch_dir verified it
    logger.info("evaluated %s in %.1f s", model.label or model.key, time.perf_counter() - t0)
    return table.model_dump()


def evaluate_model_dir(cfg: MeritConfig, store: ArtifactStore, model_dir: str | Path, mixture: MixtureRef,
                       name: str | None = None, verify: bool = True) -> EvalTable:
    """:func:`merit_core.evaluate.evaluate_dir` of a local model directory on the
    mixture's held-out splits, with the ``eval`` settings of ``cfg``; ``verify`` False
    skips :func:`merit_core.models.check_model_dir` for a directory the store verified.

    Raises:
        merit_core.models.ModelDirError: ``model_dir`` is not a model directory, its
            files disagree with its manifest (:func:`merit_core.models.check_model_dir`),
            or its vocabulary does not fit its embedding.
    """
    if verify:
        model_dir = check_model_dir(model_dir)
    heldout = {s.name: load_split(store, s, "heldout") for s in mixture.sources}
    return evaluate_dir(
        model_dir, heldout, trust_remote_code=cfg.model.trust_remote_code, batch_size=cfg.eval.batch_size,
        max_new_tokens=cfg.eval.max_new_tokens, generate=cfg.eval.generate,
        multiple_choice=cfg.eval.multiple_choice, chat_template=cfg.data.chat_template,
        max_examples_per_source=cfg.eval.max_examples_per_source, bf16=_eval_bf16(cfg),
        name=name or str(model_dir),
    )


def _eval_bf16(cfg: MeritConfig) -> bool:
    return resolve_bf16(cfg.eval.bf16, default_device(), "eval.bf16")


def resolve_benchmarks(cfg: MeritConfig, store: ArtifactStore, base: ModelRef) -> BenchmarkSuite:
    """Tokenize every benchmark of ``cfg.eval.benchmarks`` like held-out data (at most
    ``eval.benchmark_max_examples`` each) and store them under
    ``benchmarks/<content-hash>/examples.jsonl``.

    Returns:
        BenchmarkSuite (empty when no benchmark is configured).
    """
    if not cfg.eval.benchmarks:
        return BenchmarkSuite(benchmarks=[])
    tokenizer = load_base_tokenizer(store, base, cfg.model.trust_remote_code)
    processor = load_base_processor(store, base, cfg.model.trust_remote_code)
    infos = []
    for spec in cfg.eval.benchmarks:
        examples, counts = load_benchmark(spec, tokenizer, max_length=cfg.data.max_length,
                                          max_examples=cfg.eval.benchmark_max_examples, seed=cfg.data.seed,
                                          chat_template=cfg.data.chat_template, processor=processor)
        digest = content_hash([], examples, [])
        key = benchmark_key(digest)
        if not intact_dir(store, key):  # missing, or damaged: written again
            staging = store.staging_dir(key)
            write_examples(staging / "examples.jsonl", with_stored_images(examples, staging))
            store.commit_dir(key, staging, metadata={"kind": "tokenized-benchmark", "benchmark": spec.name})
        infos.append(BenchmarkInfo(name=spec.name, kind=spec.kind, task=spec.task or spec.path or spec.dataset or "",
                                   content_hash=digest, key=key, **counts))
        logger.info("benchmark %s: %d examples (%d multiple choice)", spec.name, counts["examples"],
                    counts["multiple_choice"])
    return BenchmarkSuite(benchmarks=infos)


def evaluate_benchmarks(cfg: MeritConfig, store: ArtifactStore, model: ModelRef, suite: BenchmarkSuite) -> dict | None:
    """Out-of-mixture metrics of one model on every benchmark of ``suite`` (EvalTable
    dict), or None when the suite is empty."""
    if not suite.benchmarks:
        return None
    examples = {b.name: read_stored_examples(store.fetch_dir(b.key), "examples.jsonl") for b in suite.benchmarks}
    t0 = time.perf_counter()
    table = evaluate_benchmarks_dir(store.fetch_dir(model.key), examples, batch_size=cfg.eval.batch_size,
                                    trust_remote_code=cfg.model.trust_remote_code,
                                    max_new_tokens=cfg.eval.max_new_tokens, chat_template=cfg.data.chat_template,
                                    name=model.label or model.key, bf16=_eval_bf16(cfg))
    logger.info("benchmarks of %s in %.1f s", model.label or model.key, time.perf_counter() - t0)
    return table.model_dump()


def displacement(store: ArtifactStore, base: ModelRef, models: dict[str, ModelRef]) -> dict[str, float]:
    """||θ − θ(0)||_2 over all weights of each model (label -> norm), streamed from the store."""
    return displacement_norms(store.fetch_dir(base.key), {k: store.fetch_dir(m.key) for k, m in models.items()})
