"""Stage *split*: the sources partitioned into K = 2^r groups (MERIT spec steps 2–3,
paper §3.2) from the conflict matrix; no store IO."""

from __future__ import annotations

import numpy as np

from merit_core.config import MeritConfig
from merit_core.refs import ConflictMatrix, MixtureRef, Partition
from merit_core.split import split_sources


def partition_sources(cfg: MeritConfig, report: ConflictMatrix, mixture: MixtureRef,
          strategy: str | None = None, seed: int | None = None) -> Partition:
    """Partition the sources of ``report`` into K = 2^r groups by ``strategy`` (default
    ``cfg.split.strategy``; ``random`` for the random-split baseline) and ``seed``.

    Source weights are training examples (``split.balance: samples``) or loss tokens
    (``tokens``), from ``mixture``.
    """
    scfg = cfg.split.model_copy(update={k: v for k, v in {"strategy": strategy, "seed": seed}.items() if v is not None})
    names = report.names
    if scfg.balance == "tokens":
        w = {n: float(mixture.get(n).loss_tokens) for n in names}
    else:
        w = {n: float(mixture.get(n).train) for n in names}
    return split_sources(np.asarray(report.matrix), np.asarray([w[n] for n in names]), scfg).partition(names)
