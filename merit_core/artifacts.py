"""Small pydantic objects passed between pipeline stages (ARCHITECTURE.md, "Data flow").

Only URIs, keys, hashes and counts travel between tasks; tensors and examples stay in
the artifact store. Every object here serialises to a few KB of JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from merit_core.data.types import Example, TokenizedExample


class ModelRef(BaseModel):
    """A model directory in the store: θ(0), a branch θ_k or a merged θ̄."""

    key: str = Field(description="Store key of the HF model directory.")
    uri: str = Field(description="Full URI of the directory (for people and logs).")
    sha256: str = Field("", description="sha256 of the weights (θ(0): cache key of sketches).")
    label: str = ""


class SourceInfo(BaseModel):
    """One resolved source: counts and the store key of its tokenized splits."""

    name: str
    kind: str
    content_hash: str
    key: str = Field(description="Store key of the tokenized splits directory.")
    examples: int
    train: int
    heldout: int
    calibration: int
    loss_tokens: int
    truncated: int = 0
    dropped: int = 0
    has_options: bool = False


class MixtureManifest(BaseModel):
    """The resolved training mixture (spec: T sources with n_t examples each)."""

    sources: list[SourceInfo]

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


class ConflictReport(BaseModel):
    """The T×T conflict matrix C (spec step 1) in source order ``names``."""

    names: list[str]
    kind: str
    matrix: list[list[float]]


class Partition(BaseModel):
    """A split of the sources into K groups (spec step 3), with the PCA representation."""

    method: str
    groups: list[list[str]]
    weights: dict[str, float]
    scores: list[list[float]] | None = None
    explained_variance_ratio: list[float] | None = None

    @property
    def k(self) -> int:
        return len(self.groups)


class TrainStats(BaseModel):
    """What one branch's training run reports (:func:`merit_core.train.train_branch`)."""

    trained_tokens: int = Field(description="N_k: loss-bearing (response) tokens trained on, counted with "
                                "multiplicity over epochs (the token-weighted merge weight).")
    examples: int = Field(description="Training examples in the branch (one epoch).")
    steps: int = Field(description="Optimizer steps taken.")
    train_loss: float = Field(description="Mean training loss reported by the Trainer (nats/token; NaN if none).")
    wall_s: float = Field(description="Wall time of training in seconds.")
    resumed_from_step: int = Field(0, description="Step of the checkpoint the run resumed from (0 if none).")
    processes: int = Field(1, description="Training processes (GPUs) of this branch (torchrun when > 1).")
    packed: bool = Field(False, description="Trained on padding-free packed batches (train.packing).")
    real_token_fraction: float | None = Field(
        None, description="Example tokens / all trained positions (padding excluded), rank 0's batches.")


class BranchCheckpoint(TrainStats):
    """One finished branch θ_k: where it lives, its sources, and its :class:`TrainStats`
    (N_k for the token-weighted merge)."""

    index: int
    label: str
    key: str
    uri: str
    sources: list[str]


class StageTiming(BaseModel):
    stage: str
    seconds: float


# --- tokenized example (de)serialisation for the store ------------------------------


def example_to_dict(e: TokenizedExample) -> dict:
    ex = e.example
    return {
        "input_ids": e.input_ids,
        "labels": e.labels,
        "prompt_length": e.prompt_length,
        "source": e.source,
        "truncated": e.truncated,
        "example": None
        if ex is None
        else {
            "prompt": ex.prompt,
            "response": ex.response,
            "options": list(ex.options) if ex.options is not None else None,
            "correct": ex.correct,
            "system": ex.system,
        },
    }


def example_from_dict(d: dict) -> TokenizedExample:
    ex = d.get("example")
    example = None
    if ex is not None:
        example = Example(
            prompt=ex["prompt"],
            response=ex["response"],
            options=tuple(ex["options"]) if ex.get("options") is not None else None,
            correct=ex.get("correct"),
            system=ex.get("system"),
        )
    return TokenizedExample(
        input_ids=list(d["input_ids"]),
        labels=list(d["labels"]),
        prompt_length=int(d["prompt_length"]),
        source=d.get("source", ""),
        example=example,
        truncated=bool(d.get("truncated", False)),
    )


def write_examples(path: str | Path, examples: Sequence[TokenizedExample]) -> None:
    """Write tokenized examples as JSON Lines (one example per line)."""
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps(example_to_dict(e)) + "\n")


def read_examples(path: str | Path) -> list[TokenizedExample]:
    """Read tokenized examples written by :func:`write_examples`.

    Raises:
        ValueError: naming the file and line of a malformed record.
    """
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(example_from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{i}: malformed tokenized example ({err})") from err
    return out
