"""Held-out evaluation of one model, per source (MERIT_SPEC.md step 6): the per-source
loop, the ``loss`` metric, and loading a model directory. The metrics are described in
:mod:`merit_core.evaluate`; exact match is in :mod:`.generation`, multiple choice in
:mod:`.choice`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from tqdm.auto import tqdm

from merit_core.batching import batches, response_loss_sum
from merit_core.data.types import TokenizedExample
from merit_core.evaluate.choice import has_options, multiple_choice_accuracy
from merit_core.evaluate.generation import exact_match_rate
from merit_core.evaluate.inputs import model_device, pad_token_id
from merit_core.evaluate.table import EvalRow, EvalTable
from merit_core.precision import bf16_autocast

__all__ = ["check_vocab_fits", "evaluate_dir", "evaluate_model", "source_loss"]

logger = logging.getLogger("merit")


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
        name: label stored in ``EvalTable.model`` (and shown on the progress bar, which
            appears when stderr is a terminal).
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
    _check_settings(heldout, batch_size, mc_norm)
    pad_id = pad_token_id(tokenizer)
    with _inference(model, bf16):
        rows = [
            _evaluate_source(model, tokenizer, source, list(examples)[:max_examples_per_source],
                             batch_size=batch_size, max_new_tokens=max_new_tokens, generate=generate,
                             multiple_choice=multiple_choice, chat_template=chat_template,
                             mc_norm=mc_norm, pad_id=pad_id)
            for source, examples in tqdm(heldout.items(), total=len(heldout), unit="source", disable=None,
                                         desc=f"evaluate {name or 'model'}")
        ]
    return EvalTable.from_rows(rows, model=name)


def _check_settings(heldout: Mapping, batch_size: int, mc_norm: str) -> None:
    if not heldout:
        raise ValueError("evaluate_model: no held-out sources given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if mc_norm not in ("bytes", "tokens"):
        raise ValueError(f"mc_norm must be 'bytes' or 'tokens', got {mc_norm!r}")


@contextmanager
def _inference(model: torch.nn.Module, bf16: bool) -> Iterator[None]:
    """Eval mode and (when ``bf16``) bf16 autocast inside the block; the model's
    training/eval mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with bf16_autocast(model_device(model), bf16):
            yield
    finally:
        model.train(was_training)


def _evaluate_source(model, tokenizer, source: str, examples: list[TokenizedExample], *, batch_size: int,
                     max_new_tokens: int, generate: bool, multiple_choice: bool, chat_template: str | None,
                     mc_norm: str, pad_id: int) -> EvalRow:
    """One :class:`EvalRow`: loss, exact match and MC accuracy of one source's examples."""
    row = EvalRow(source=source, n=len(examples))
    if not examples:
        return row
    row.loss, row.n_tokens = source_loss(model, examples, batch_size, pad_id)
    if row.loss is not None and not math.isfinite(row.loss):
        note = f"non-finite held-out loss ({row.loss}) on source {source!r}: the model's logits overflow or are NaN"
        logger.warning("%s: %s", getattr(model, "name_or_path", "") or "model", note)
        row.warnings.append(note)
    if generate:
        row.exact_match = exact_match_rate(model, tokenizer, examples, batch_size, max_new_tokens, pad_id,
                                           chat_template)
    if multiple_choice:
        mc = [e for e in examples if has_options(e)]
        if mc:
            row.mc_accuracy, row.mc_accuracy_norm = multiple_choice_accuracy(
                model, tokenizer, mc, batch_size, pad_id, chat_template, mc_norm)
            row.n_mc = len(mc)
    return row


def source_loss(model, examples: Sequence[TokenizedExample], batch_size: int, pad_id: int) -> tuple[float | None, int]:
    """The ``loss`` metric of one source: token-weighted mean response-token loss
    (nats/token, :func:`merit_core.batching.response_loss_sum` over batches of
    ``batch_size`` padded with ``pad_id``) and the number of response tokens; the loss
    is None when there is no response token."""
    total, count = 0.0, 0
    for batch in batches(examples, batch_size, pad_id):
        loss, n = response_loss_sum(model, batch)
        total += float(loss)
        count += n
    return (total / count if count else None), count


def check_vocab_fits(model: torch.nn.Module, tokenizer, heldout: Mapping[str, Sequence[TokenizedExample]],
                     where: str) -> None:
    """Refuse a model whose input embedding has fewer rows than its tokenizer has tokens,
    or than the largest token id of the held-out data (an id past the last row would
    fail deep inside the embedding with an ``IndexError``).

    Args:
        model: a causal LM with ``get_input_embeddings()`` (a (rows, hidden) table).
        tokenizer: the tokenizer saved with it (``len(tokenizer)`` tokens).
        heldout: source name -> tokenized examples (ids of θ(0)'s tokenizer).
        where: the model directory, for the message.

    Raises:
        ModelDirError: naming ``where``, the two sizes and, for the data, the source.
    """
    from merit_core.models import ModelDirError

    rows = int(model.get_input_embeddings().weight.shape[0])
    if len(tokenizer) > rows:
        raise ModelDirError(f"model directory {where}: its tokenizer has {len(tokenizer)} tokens but the model's "
                            f"embedding has only {rows} rows; the tokenizer does not belong to these weights "
                            "(resize the embeddings, or save the matching tokenizer)")
    for source, examples in heldout.items():
        top = max((max(e.input_ids, default=-1) for e in examples), default=-1)
        if top >= rows:
            raise ModelDirError(f"model directory {where}: held-out data of source {source!r} uses token id {top}, "
                                f"but the model's embedding has only {rows} rows (a different tokenizer than "
                                "the run's θ(0))")


def evaluate_dir(
    model_dir: str | os.PathLike,
    heldout: Mapping[str, Sequence[TokenizedExample]],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> EvalTable:
    """Load a Hugging Face model directory (model + tokenizer) and run
    :func:`evaluate_model` on it; ``kwargs`` go to :func:`evaluate_model`.

    Args:
        device: where to run (default: cuda if available, else cpu).
        dtype: load dtype (default: the checkpoint's own).
        trust_remote_code: run model code shipped with the directory
            (``model.trust_remote_code``).

    Raises:
        ModelDirError: the tokenizer or the held-out token ids do not fit the model's
            embedding (:func:`check_vocab_fits`).
    """
    from transformers import AutoTokenizer

    from merit_core.vlm import auto_model_class

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = auto_model_class(model_dir).from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                        dtype=dtype or "auto")
    check_vocab_fits(model, tokenizer, heldout, str(model_dir))
    model.to(device)
    kwargs.setdefault("name", str(model_dir))
    return evaluate_model(model, tokenizer, heldout, **kwargs)
