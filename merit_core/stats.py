"""Paired comparisons over seeds: is a difference between two models larger than the
seed-to-seed noise? (issue 7; docs/study.md)

A study scores every model once per seed s = 0..N−1, so the comparisons are *paired*
by seed: d_s = metric(model, s) − metric(baseline, s). Over the N paired differences:

- mean and sample standard deviation (ddof = 1) — :func:`mean_std`;
- a Student-t confidence interval for the mean difference,
  d̄ ± t_{(1+c)/2, N−1} · s_d / √N — :func:`t_interval`;
- an exact two-sided sign test (``scipy.stats.binomtest``, p = ½): ties (d_s = 0)
  dropped, n = remaining seeds, k = seeds where the model is ahead, p = min(1, 2 ·
  Σ_{i ≤ min(k, n−k)} C(n, i) / 2ⁿ) — :func:`sign_test`. With n seeds the smallest
  attainable p is 2/2ⁿ (0.25 for 3 seeds), so the sign test can only confirm a
  difference with 6 or more seeds;
- :func:`summarise` puts them together and states the verdict in words: the difference
  "exceeds the noise" when the confidence interval excludes 0.

Pure functions of numbers (no I/O).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """d_s = a_s − b_s for paired per-seed scores.

    Raises:
        ValueError: different lengths or no pair.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_differences: {len(a)} scores against {len(b)}; pairs need one per seed each")
    if not a:
        raise ValueError("paired_differences: no scores")
    return [float(x) - float(y) for x, y in zip(a, b)]


def mean_std(x: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single value).

    Raises:
        ValueError: empty input.
    """
    n = len(x)
    if n == 0:
        raise ValueError("mean_std: no values")
    m = math.fsum(x) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in x) / (n - 1))


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def t_interval(x: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t confidence interval for the mean of ``x``:
    x̄ ± t_{(1+c)/2, n−1} · s / √n. (NaN, NaN) for fewer than two values."""
    n = len(x)
    m, s = mean_std(x)
    if n < 2:
        return math.nan, math.nan
    half = t_quantile((1 + confidence) / 2, n - 1) * s / math.sqrt(n)
    return m - half, m + half


@dataclass(frozen=True)
class SignTest:
    """Exact two-sided sign test of paired differences."""

    positives: int
    negatives: int
    ties: int
    p_value: float

    @property
    def n(self) -> int:
        """Non-tied pairs (the test's sample size)."""
        return self.positives + self.negatives


def sign_test(diffs: Sequence[float], tol: float = 0.0) -> SignTest:
    """Exact two-sided binomial sign test of H0: P(d > 0) = P(d < 0) = ½
    (``scipy.stats.binomtest`` of the positives among the non-tied pairs).

    Differences with |d| ≤ ``tol`` are ties and dropped. With n non-tied pairs and
    k = min(positives, negatives): p = min(1, 2 · Σ_{i=0..k} C(n, i) / 2ⁿ); p = 1 when
    n = 0.
    """
    from scipy.stats import binomtest

    pos = sum(1 for d in diffs if d > tol)
    neg = sum(1 for d in diffs if d < -tol)
    n = pos + neg
    p = float(binomtest(pos, n, 0.5, alternative="two-sided").pvalue) if n else 1.0
    return SignTest(pos, neg, len(diffs) - n, p)


class Comparison(BaseModel):
    """A paired comparison of one metric: ``model`` − ``baseline`` over seeds."""

    metric: str
    metric_key: str = Field("", description="Short name of the metric (e.g. bench_acc, heldout_loss).")
    model: str
    baseline: str
    higher_is_better: bool | None
    n: int
    model_scores: list[float]
    baseline_scores: list[float]
    diffs: list[float]
    mean_diff: float
    std_diff: float
    confidence: float
    ci_low: float
    ci_high: float
    positives: int
    negatives: int
    ties: int
    sign_p: float
    exceeds_noise: bool = Field(description="The confidence interval excludes 0.")
    sign_significant: bool = Field(description="Sign test p < alpha.")
    favours: str | None = Field(None, description="Which model the mean difference favours (None: no direction).")
    verdict: str


def _num(x: float, digits: int = 3) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:+.{digits}f}"


def summarise(model_scores: Sequence[float], baseline_scores: Sequence[float], *, metric: str, model: str,
              baseline: str, higher_is_better: bool | None = True, confidence: float = 0.95,
              alpha: float = 0.05, digits: int = 3) -> Comparison:
    """Paired comparison ``model − baseline`` of per-seed scores, with the verdict in words.

    ``higher_is_better``: True for accuracies, False for losses, None where the metric
    has no better direction (e.g. displacement) — the verdict then says larger/smaller.
    The difference "exceeds the noise" when the ``confidence`` t interval excludes 0;
    the sign test (p < ``alpha``) is reported beside it.
    """
    d = paired_differences(model_scores, baseline_scores)
    n = len(d)
    m, s = mean_std(d)
    lo, hi = t_interval(d, confidence)
    st = sign_test(d)
    exceeds = n >= 2 and not math.isnan(lo) and (lo > 0 or hi < 0)
    if m == 0 or higher_is_better is None:
        favours = None
    else:
        favours = model if (m > 0) == bool(higher_is_better) else baseline
    if higher_is_better is None:
        direction = "larger" if m > 0 else "smaller"
    else:
        direction = "better" if favours == model else "worse"
    pct = f"{confidence:.0%}"
    ci = f"{pct} CI [{_num(lo, digits)}, {_num(hi, digits)}]"
    ahead = st.positives if (higher_is_better is not False) else st.negatives
    sign = f"sign test: {ahead} of {n} seeds favour {model} over {baseline}" if higher_is_better is not None else \
        f"sign test: {st.positives} of {n} seeds larger"
    if st.ties:
        sign += f" ({st.ties} tie{'s' if st.ties > 1 else ''} dropped)"
    sign += f", p = {st.p_value:.3g}"
    if n < 2:
        verdict = (f"{metric}: one seed only ({model} − {baseline} = {_num(m, digits)}); the seed-to-seed noise "
                   "cannot be estimated — run more seeds")
    elif exceeds:
        verdict = (f"{metric}: {model} is {direction} than {baseline} by {abs(m):.{digits}f} ({ci} excludes 0) — "
                   f"the difference exceeds the seed-to-seed noise; {sign}")
        if not st.p_value < alpha:
            verdict += (f" (not significant on its own: with {st.n} non-tied seeds the smallest possible "
                        f"p is {min(1.0, 2 / 2 ** st.n) if st.n else 1.0:.3g})")
    else:
        verdict = (f"{metric}: no difference beyond the noise between {model} and {baseline} (mean difference "
                   f"{_num(m, digits)}, {ci} includes 0; {sign})")
        if st.p_value < alpha:
            verdict += "; the sign test does find a consistent direction"
    return Comparison(
        metric=metric, model=model, baseline=baseline, higher_is_better=higher_is_better, n=n,
        model_scores=[float(x) for x in model_scores], baseline_scores=[float(x) for x in baseline_scores],
        diffs=d, mean_diff=m, std_diff=s, confidence=confidence, ci_low=lo, ci_high=hi,
        positives=st.positives, negatives=st.negatives, ties=st.ties, sign_p=st.p_value,
        exceeds_noise=exceeds, sign_significant=st.p_value < alpha, favours=favours, verdict=verdict,
    )
