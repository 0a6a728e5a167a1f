"""The study: every model trained once per seed and compared with its baselines over
the seeds (issue 7; docs/study.md).

A study trains every model once per seed s = 0..N−1 — joint training with data-order
seed ``train.seed + s``, MERIT with the same data-order seed, a random split drawn with
``split.seed + s`` — and evaluates them on the same held-out and benchmark examples, so
the comparisons are *paired* by seed (:mod:`merit_core.stats`). This module holds the
plan (:func:`seeds`, :func:`model_labels`, :func:`comparisons`), what is measured per
model (:class:`ModelResult`, :class:`Metric`) and :func:`summarise_study`, which turns
the results into means ± standard deviations and paired comparisons.

Everything here is a pure function of numbers and the config (no I/O, no prefect).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from merit_core.config import MeritConfig
from merit_core.stats import mean_std, summarise

# ---------------------------------------------------------------- the study plan


@dataclass(frozen=True)
class Seed:
    """One repetition: data-order seed of every training run, seed of the random split."""

    index: int
    train_seed: int
    split_seed: int


def seeds(cfg: MeritConfig, n: int | None = None, first: int = 0) -> list[Seed]:
    """The study's repetitions: ``train.seed + i`` and ``split.seed + i`` for
    i = first .. first + n − 1 (``n`` defaults to ``study.seeds``). Seeds run in later
    sessions continue the numbering with ``first``.

    Raises:
        ValueError: n < 1 or first < 0.
    """
    n = cfg.study.seeds if n is None else n
    if n < 1:
        raise ValueError(f"a study needs at least one seed, got {n}")
    if first < 0:
        raise ValueError(f"the first seed index must be ≥ 0, got {first}")
    return [Seed(i, cfg.train.seed + i, cfg.split.seed + i) for i in range(first, first + n)]


def r_values(cfg: MeritConfig) -> list[int]:
    """MERIT-rD variants of the study (``study.r_values``, default ``[split.r]``)."""
    return list(cfg.study.r_values or [cfg.split.r])


def merit_label(r: int) -> str:
    return f"merit-r{r}"


def uniform_label(r: int) -> str:
    return f"merit-r{r}-uniform"


def random_label(r: int) -> str:
    return f"random-r{r}"


def model_labels(cfg: MeritConfig) -> list[str]:
    """Models trained per seed, in report order (``base`` is trained by nobody)."""
    out = ["joint"]
    for r in r_values(cfg):
        out.append(merit_label(r))
        if cfg.study.uniform_merge:
            out.append(uniform_label(r))
        out.append(random_label(r))
    return out


def comparisons(cfg: MeritConfig) -> list[tuple[str, str]]:
    """(model, baseline) pairs the report tests: MERIT − joint, MERIT − random split,
    token-weighted − uniform merge, for every r."""
    out = []
    for r in r_values(cfg):
        out += [(merit_label(r), "joint"), (merit_label(r), random_label(r))]
        if cfg.study.uniform_merge:
            out.append((merit_label(r), uniform_label(r)))
    return out


def check_study_config(cfg: MeritConfig) -> None:
    """Refuse settings under which the comparison is not budget-matched.

    Raises:
        ValueError: ``train.max_steps > 0`` (every branch would take max_steps, K times the
            joint budget; a study counts epochs so joint training and the branches see the
            same examples the same number of times).
    """
    if cfg.train.max_steps and cfg.train.max_steps > 0:
        raise ValueError(
            f"train.max_steps={cfg.train.max_steps}: a study needs epoch-based training (train.max_steps: -1) so "
            "that joint training and the branches see the same examples the same number of times"
        )


# ---------------------------------------------------------------- per-model results


class ModelResult(BaseModel):
    """Everything measured for one model of one seed (``seed`` None: θ(0))."""

    label: str
    seed: int | None = None
    heldout: dict = Field(description="EvalTable dict on the in-mixture held-out data.")
    benchmarks: dict | None = Field(None, description="EvalTable dict on the out-of-mixture benchmarks.")
    displacement: float | None = None
    branches: int = 0
    steps: int = 0
    trained_tokens: int = 0
    examples: int = 0
    train_wall_s: float = 0.0


def model_result(label: str, seed: int | None, heldout: dict, benchmarks: dict | None = None,
                 displacement: float | None = None, branches: Sequence = ()) -> ModelResult:
    """A :class:`ModelResult` with the training budget summed over ``branches``
    (:class:`merit_core.refs.BranchRef`; for a merged model: all K branches)."""
    return ModelResult(
        label=label, seed=seed, heldout=heldout, benchmarks=benchmarks, displacement=displacement,
        branches=len(branches), steps=sum(b.steps for b in branches),
        trained_tokens=sum(b.trained_tokens for b in branches), examples=sum(b.examples for b in branches),
        train_wall_s=sum(b.wall_s for b in branches),
    )


@dataclass(frozen=True)
class Metric:
    """A number read from a :class:`ModelResult`; ``higher_is_better`` None: no direction."""

    name: str
    title: str
    higher_is_better: bool | None
    get: Callable[[ModelResult], float | None]


def _mean_of(table_key: str, field: str) -> Callable[[ModelResult], float | None]:
    def get(m: ModelResult) -> float | None:
        table = getattr(m, table_key)
        return None if table is None else table["mean"].get(field)

    return get


def _bench(name: str, norm: bool = False) -> Callable[[ModelResult], float | None]:
    from merit_core.benchmarks import score, score_norm

    def get(m: ModelResult) -> float | None:
        if m.benchmarks is None:
            return None
        for row in m.benchmarks["rows"]:
            if row["source"] == name:
                return (score_norm if norm else score)(row)
        return None

    return get


def _bench_avg(norm: bool) -> Callable[[ModelResult], float | None]:
    from merit_core.benchmarks import average, score, score_norm

    return lambda m: None if m.benchmarks is None else average(m.benchmarks, score_norm if norm else score)


def headline_metrics() -> list[Metric]:
    """The study's main metrics: out-of-mixture first (the paper's claim), then in-mixture."""
    return [
        Metric("bench_acc", "benchmarks: mean accuracy (out-of-mixture)", True, _bench_avg(False)),
        Metric("bench_acc_norm", "benchmarks: mean length-normalised accuracy", True, _bench_avg(True)),
        Metric("heldout_loss", "in-mixture held-out loss (nats/token)", False, _mean_of("heldout", "loss")),
        Metric("heldout_exact_match", "in-mixture exact match", True, _mean_of("heldout", "exact_match")),
        Metric("heldout_mc_accuracy", "in-mixture multiple-choice accuracy", True, _mean_of("heldout", "mc_accuracy")),
        Metric("displacement", "displacement ||θ − θ(0)||", None, lambda m: m.displacement),
    ]


def benchmark_metrics(names: Sequence[str]) -> list[Metric]:
    """One metric per benchmark: its headline score (:func:`merit_core.benchmarks.score`)."""
    return [Metric(f"bench:{n}", n, True, _bench(n)) for n in names]


def per_seed(results: Sequence[ModelResult], label: str, metric: Metric) -> list[float | None]:
    """``metric`` of model ``label`` for each seed, in seed order."""
    rows = sorted((r for r in results if r.label == label), key=lambda r: r.seed if r.seed is not None else -1)
    return [metric.get(r) for r in rows]


def summarise_study(results: Sequence[ModelResult], pairs: Sequence[tuple[str, str]], metrics: Sequence[Metric],
                    confidence: float = 0.95) -> dict:
    """Mean ± std per model and metric, and the paired comparisons.

    Returns:
        ``{"models": {label: {metric: {"values", "mean", "std"}}}, "comparisons": [Comparison dicts]}``;
        metrics without a value for some seed of a model are left out for that model.
    """
    labels = list(dict.fromkeys(r.label for r in results))
    models: dict[str, dict] = {}
    for label in labels:
        models[label] = {}
        for m in metrics:
            vals = per_seed(results, label, m)
            if vals and all(v is not None for v in vals):
                mean, std = mean_std(vals)
                models[label][m.name] = {"values": vals, "mean": mean, "std": std}
    out = []
    for model, baseline in pairs:
        for m in metrics:
            a, b = per_seed(results, model, m), per_seed(results, baseline, m)
            if a and len(a) == len(b) and all(v is not None for v in a + b):
                c = summarise(a, b, metric=m.title, model=model, baseline=baseline,
                              higher_is_better=m.higher_is_better, confidence=confidence)
                out.append(c.model_copy(update={"metric_key": m.name}).model_dump())
    return {"models": models, "comparisons": out}


def budget_rows(results: Sequence[ModelResult]) -> Mapping[str, dict]:
    """Per model: mean optimizer steps, trained tokens, examples seen and training wall
    time over seeds, and whether every seed saw the same tokens as joint training."""
    out: dict[str, dict] = {}
    joint = {r.seed: r.trained_tokens for r in results if r.label == "joint"}
    for label in dict.fromkeys(r.label for r in results if r.seed is not None):
        rs = [r for r in results if r.label == label]
        out[label] = {
            "branches": rs[0].branches,
            "steps": mean_std([r.steps for r in rs])[0],
            "trained_tokens": mean_std([r.trained_tokens for r in rs])[0],
            "examples": mean_std([r.examples for r in rs])[0],
            "train_wall_s": mean_std([r.train_wall_s for r in rs])[0],
            "same_tokens_as_joint": all(joint.get(r.seed) == r.trained_tokens for r in rs) if joint else None,
        }
    return out
