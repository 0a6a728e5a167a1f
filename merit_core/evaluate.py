"""Held-out evaluation of one model, per data source (MERIT_SPEC.md step 6).

Three metrics per source, all batched and computed under ``torch.no_grad`` in eval mode:

- ``loss``: mean answer-token cross-entropy in nats/token, token-weighted within the
  source (sum of response-token losses / number of response tokens), exactly the SFT
  loss of :func:`merit_core.batching.response_loss_sum` (prompt tokens masked, eos of
  the response included).
- ``exact_match``: greedy generation (``do_sample=False``, left-padded batches, stop at
  eos or ``max_new_tokens``) compared with ``example.response`` after SQuAD-style
  normalisation (:func:`normalize_answer`); mean over examples.
- ``mc_accuracy`` / ``mc_accuracy_norm``: for examples with ``options`` and ``correct``,
  each option is scored by the summed log-likelihood of ``response_ids(option)`` (option
  tokens + eos) after the prompt; the prediction is the first option with the highest
  score. ``mc_accuracy_norm`` divides each score by the option's length (UTF-8 bytes of
  the option text by default, as lm-evaluation-harness ``acc_norm``; or tokens).

Prompts are the tokenized example's own prompt ids (``input_ids[:prompt_length]``), i.e.
the ids :func:`merit_core.data.format.prompt_ids` produced for training, so training and
evaluation see identical prompts. This module never imports prefect.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, Field

from merit_core.batching import batches, response_loss_sum
from merit_core.data.format import prompt_ids, response_ids
from merit_core.data.types import IGNORE_INDEX, TokenizedExample
from merit_core.precision import bf16_autocast

METRICS: tuple[str, ...] = ("loss", "exact_match", "mc_accuracy", "mc_accuracy_norm")
"""Metric fields of an :class:`EvalRow`, in table order."""

MEAN_ROW = "mean"


class EvalRow(BaseModel):
    """Metrics of one source (or the mean row). ``None`` where a metric does not apply.

    Attributes:
        source: source name (``"mean"`` for the mean row).
        n: examples evaluated (for the mean row: the total over sources).
        n_tokens: response tokens that carried loss (mean row: the total).
        n_mc: examples scored by multiple choice (mean row: the total).
        loss: mean response-token cross-entropy, nats/token.
        exact_match: fraction in [0, 1] of normalised greedy generations equal to the
            normalised reference.
        mc_accuracy: fraction in [0, 1] of multiple-choice examples whose highest summed
            log-likelihood option is the correct one.
        mc_accuracy_norm: the same with length-normalised scores.
    """

    source: str
    n: int = 0
    n_tokens: int = 0
    n_mc: int = 0
    loss: float | None = None
    exact_match: float | None = None
    mc_accuracy: float | None = None
    mc_accuracy_norm: float | None = None


class EvalTable(BaseModel):
    """Per-source evaluation of one model: ``rows`` (one per source) and ``mean``.

    ``mean`` holds, for each metric, the unweighted mean over the sources where that
    metric exists (``None`` if it exists nowhere); its counts are totals.
    """

    model: str | None = None
    rows: list[EvalRow] = Field(default_factory=list)
    mean: EvalRow = Field(default_factory=lambda: EvalRow(source=MEAN_ROW))

    @classmethod
    def from_rows(cls, rows: Sequence[EvalRow], model: str | None = None) -> EvalTable:
        """Build a table from per-source rows, computing the mean row."""
        return cls(model=model, rows=list(rows), mean=mean_row(rows))

    def row(self, source: str) -> EvalRow:
        """The row of ``source`` (``"mean"`` gives the mean row). Raises KeyError."""
        if source == MEAN_ROW:
            return self.mean
        for r in self.rows:
            if r.source == source:
                return r
        raise KeyError(f"no row for source {source!r}; sources: {[r.source for r in self.rows]}")

    def metrics(self) -> list[str]:
        """Metric names that have a value in at least one row, in table order."""
        return [m for m in METRICS if getattr(self.mean, m) is not None]

    def to_dict(self) -> dict:
        """Plain JSON-able dict (same as ``model_dump()``)."""
        return self.model_dump()

    def to_markdown(self, digits: int = 4) -> str:
        """A markdown table: one line per source, then the mean row."""
        metrics = self.metrics()
        head = ["source", "n", *metrics]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in [*self.rows, self.mean]:
            name = f"**{r.source}**" if r is self.mean else r.source
            cells = [name, str(r.n), *(_fmt(getattr(r, m), digits) for m in metrics)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def mean_row(rows: Sequence[EvalRow]) -> EvalRow:
    """Mean over ``rows`` of each metric where it is not None; counts are summed."""
    out = EvalRow(
        source=MEAN_ROW,
        n=sum(r.n for r in rows),
        n_tokens=sum(r.n_tokens for r in rows),
        n_mc=sum(r.n_mc for r in rows),
    )
    for m in METRICS:
        vals = [getattr(r, m) for r in rows if getattr(r, m) is not None]
        setattr(out, m, sum(vals) / len(vals) if vals else None)
    return out


def compare(tables: Mapping[str, EvalTable], metrics: Sequence[str] | None = None, digits: int = 4) -> str:
    """Side-by-side markdown table of several models' evaluations.

    Rows are the union of sources (first-seen order) followed by the mean row; columns
    are metric × model (``loss base``, ``loss joint``, …), grouped by metric so that the
    models stand next to each other. Missing values print as ``–``.

    Args:
        tables: model label -> its :class:`EvalTable` (e.g. base / joint / merit / random).
        metrics: metric names to show (default: every metric present in any table).

    Raises:
        ValueError: if ``tables`` is empty or a metric name is unknown.
    """
    if not tables:
        raise ValueError("compare: no tables given")
    if metrics is None:
        metrics = [m for m in METRICS if any(getattr(t.mean, m) is not None for t in tables.values())]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"compare: unknown metrics {unknown}; known: {list(METRICS)}")
    sources: list[str] = []
    for t in tables.values():
        for r in t.rows:
            if r.source not in sources:
                sources.append(r.source)
    head = ["source", *(f"{m} {label}" for m in metrics for label in tables)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for src in [*sources, MEAN_ROW]:
        cells = [f"**{src}**" if src == MEAN_ROW else src]
        for m in metrics:
            for t in tables.values():
                try:
                    cells.append(_fmt(getattr(t.row(src), m), digits))
                except KeyError:
                    cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------- normalisation


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop ASCII punctuation, drop the articles
    a/an/the, collapse whitespace (in that order, as the SQuAD v1.1 script)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """True when the two strings are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    heldout: Mapping[str, Sequence[TokenizedExample]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    generate: bool = True,
    multiple_choice: bool = True,
    chat_template: str | None = None,
    max_examples_per_source: int | None = None,
    mc_norm: Literal["bytes", "tokens"] = "bytes",
    name: str | None = None,
    bf16: bool = False,
) -> EvalTable:
    """Evaluate ``model`` on held-out examples of each source (spec step 6, in-mixture).

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask).logits`` of
            shape (B, L, V); ``model.generate`` for exact match). Its training/eval mode
            is restored on return; weights are not changed.
        tokenizer: the model's tokenizer (eos = end-of-turn token, see
            :mod:`merit_core.data.format`); pad id = ``pad_token_id`` or else eos.
        heldout: source name -> tokenized held-out examples. A source with no example
            gets a row with ``n = 0`` and no metric.
        batch_size: sequences per forward pass / generate call (memory ∝ B·L·V logits).
        max_new_tokens: generation cap for exact match.
        generate: compute exact match (needs ``example.response`` or the response ids).
        multiple_choice: compute MC accuracy for examples with ``options`` and ``correct``.
        chat_template: only used to rebuild prompt ids for examples stored without a
            prompt (``prompt_length == 0``); otherwise the stored prompt ids are used.
        max_examples_per_source: evaluate only the first n examples of each source.
        mc_norm: length normalisation of ``mc_accuracy_norm``: ``"bytes"`` (UTF-8 bytes
            of the option text, min 1) or ``"tokens"`` (option tokens incl. eos).
        name: label stored in ``EvalTable.model``.
        bf16: run every forward pass and generation under bf16 autocast
            (:func:`merit_core.precision.bf16_autocast`; float32 weights and float32
            log-softmax). Compare only tables computed with the same setting.

    Returns:
        An :class:`EvalTable` with one row per source (in ``heldout`` order) and the mean.

    Raises:
        ValueError: if ``heldout`` is empty, ``batch_size < 1``, ``mc_norm`` is unknown,
            an example has neither prompt ids nor an untokenized example, or an
            example's ``correct`` is not an index into its ``options``.
    """
    if not heldout:
        raise ValueError("evaluate_model: no held-out sources given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if mc_norm not in ("bytes", "tokens"):
        raise ValueError(f"mc_norm must be 'bytes' or 'tokens', got {mc_norm!r}")
    pad_id = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with bf16_autocast(_device(model), bf16):
            rows = [
                _evaluate_source(model, tokenizer, source, list(examples)[:max_examples_per_source],
                                 batch_size=batch_size, max_new_tokens=max_new_tokens, generate=generate,
                                 multiple_choice=multiple_choice, chat_template=chat_template,
                                 mc_norm=mc_norm, pad_id=pad_id)
                for source, examples in heldout.items()
            ]
    finally:
        model.train(was_training)
    return EvalTable.from_rows(rows, model=name)


def _evaluate_source(model, tokenizer, source: str, examples: list[TokenizedExample], *, batch_size: int,
                     max_new_tokens: int, generate: bool, multiple_choice: bool, chat_template: str | None,
                     mc_norm: str, pad_id: int) -> EvalRow:
    """One :class:`EvalRow`: loss, exact match and MC accuracy of one source's examples."""
    row = EvalRow(source=source, n=len(examples))
    if not examples:
        return row
    row.loss, row.n_tokens = _source_loss(model, examples, batch_size, pad_id)
    if generate:
        row.exact_match = _source_exact_match(model, tokenizer, examples, batch_size, max_new_tokens, pad_id,
                                              chat_template)
    if multiple_choice:
        mc = [e for e in examples if _has_options(e)]
        if mc:
            row.mc_accuracy, row.mc_accuracy_norm = _source_mc(model, tokenizer, mc, batch_size, pad_id,
                                                               chat_template, mc_norm)
            row.n_mc = len(mc)
    return row


def evaluate_dir(
    model_dir: str | os.PathLike,
    heldout: Mapping[str, Sequence[TokenizedExample]],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> EvalTable:
    """Load a Hugging Face model directory (model + tokenizer, ``trust_remote_code=False``)
    and run :func:`evaluate_model` on it; ``kwargs`` go to :func:`evaluate_model`.

    Args:
        device: where to run (default: cuda if available, else cpu).
        dtype: load dtype (default: the checkpoint's own).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False, dtype=dtype or "auto")
    model.to(device)
    kwargs.setdefault("name", str(model_dir))
    return evaluate_model(model, tokenizer, heldout, **kwargs)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _source_loss(model, examples, batch_size: int, pad_id: int) -> tuple[float | None, int]:
    """Token-weighted mean response loss (nats/token) and the token count."""
    total, count = 0.0, 0
    for batch in batches(examples, batch_size, pad_id):
        loss, n = response_loss_sum(model, batch)
        total += float(loss)
        count += n
    return (total / count if count else None), count


def _prompt(tokenizer, te: TokenizedExample, chat_template: str | None) -> list[int]:
    if te.prompt_length > 0:
        return list(te.input_ids[: te.prompt_length])
    if te.example is None:
        raise ValueError(f"example of source {te.source!r} has neither prompt ids nor an untokenized example")
    return prompt_ids(tokenizer, te.example, chat_template)


def _reference(tokenizer, te: TokenizedExample) -> str:
    if te.example is not None:
        return te.example.response
    ids = [t for t in te.labels if t != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=True)


def _stop_ids(model, tokenizer) -> list[int]:
    if tokenizer.eos_token_id is not None:
        return [int(tokenizer.eos_token_id)]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int, stop_ids: Sequence[int]
) -> list[list[int]]:
    """Greedy continuation of a batch of prompts (left-padded), cut before the first stop id.

    Args:
        prompts: token id lists (any lengths). stop_ids: ids that end a generation; when
            empty, ``model.generate`` falls back to ``model.generation_config.eos_token_id``.

    Returns one list of new token ids per prompt (stop token excluded), at most
    ``max_new_tokens`` long.
    """
    device = _device(model)
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[i, length - len(p) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_token_id,
        eos_token_id=list(stop_ids) or None,
    )
    new = out[:, length:].tolist()
    stops = set(stop_ids)
    result = []
    for seq in new:
        cut = next((j for j, t in enumerate(seq) if t in stops), len(seq))
        result.append(seq[:cut])
    return result


def _source_exact_match(model, tokenizer, examples, batch_size, max_new_tokens, pad_id, chat_template) -> float:
    stop = _stop_ids(model, tokenizer)
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [_prompt(tokenizer, te, chat_template) for te in chunk]
        generated = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, pad_token_id=pad_id, stop_ids=stop)
        for te, ids in zip(chunk, generated):
            hits += exact_match(tokenizer.decode(ids, skip_special_tokens=True), _reference(tokenizer, te))
    return hits / len(examples)


def sequence_logprobs(
    model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, pad_token_id: int
) -> list[float]:
    """Summed log-probability (nats, float32 softmax) of each continuation given its prompt.

    Args:
        sequences: (prompt ids, continuation ids) pairs; continuation non-empty.

    Returns:
        One float per pair: Σ_j log p(c_j | prompt, c_<j).
    """
    device = _device(model)
    scores: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        length = max(len(p) + len(c) for p, c in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for j, (p, c) in enumerate(chunk):
            ids = list(p) + list(c)
            input_ids[j, : len(ids)] = torch.tensor(ids)
            attention_mask[j, : len(ids)] = 1
            labels[j, len(p) : len(ids)] = torch.tensor(list(c))
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        target = labels[:, 1:].to(device)
        mask = target != IGNORE_INDEX  # (B, L-1)
        picked = logits[:, :-1][mask].float()  # (n_tok, V): only continuation positions
        logp = torch.log_softmax(picked, dim=-1).gather(1, target[mask].unsqueeze(1)).squeeze(1)
        row = mask.nonzero()[:, 0]
        per_seq = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, row, logp.double())
        scores.extend(per_seq.tolist())
    return scores


def _has_options(te: TokenizedExample) -> bool:
    ex = te.example
    if ex is None or not ex.options or ex.correct is None:
        return False
    if not 0 <= ex.correct < len(ex.options):
        raise ValueError(f"source {te.source!r}: correct={ex.correct} is not an index into {len(ex.options)} options")
    return True


def _source_mc(model, tokenizer, examples, batch_size, pad_id, chat_template, mc_norm) -> tuple[float, float]:
    pairs, lengths, owners = [], [], []
    for k, te in enumerate(examples):
        prompt = _prompt(tokenizer, te, chat_template)
        for option in te.example.options:
            cont = response_ids(tokenizer, option)
            pairs.append((prompt, cont))
            lengths.append(len(cont) if mc_norm == "tokens" else max(1, len(option.encode("utf-8"))))
            owners.append(k)
    scores = sequence_logprobs(model, pairs, batch_size=batch_size, pad_token_id=pad_id)
    per_example: list[list[tuple[float, float]]] = [[] for _ in examples]
    for k, s, n in zip(owners, scores, lengths):
        per_example[k].append((s, s / n))
    acc = acc_norm = 0
    for te, opts in zip(examples, per_example):
        acc += _argmax([s for s, _ in opts]) == te.example.correct
        acc_norm += _argmax([s for _, s in opts]) == te.example.correct
    return acc / len(examples), acc_norm / len(examples)


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best
