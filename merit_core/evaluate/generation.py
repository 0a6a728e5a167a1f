"""Exact match of greedy generations (the ``exact_match`` metric of
:mod:`merit_core.evaluate`).

Greedy generation (``do_sample=False``, left-padded batches, stop at eos or
``max_new_tokens``) compared with ``example.response`` after SQuAD-style
normalisation (:func:`normalize_answer`); the metric is the mean over examples.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch

from merit_core.data.types import IGNORE_INDEX, TokenizedExample
from merit_core.evaluate.inputs import example_prompt, model_device

__all__ = ["exact_match", "exact_match_rate", "greedy_generate", "normalize_answer"]

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


def greedy_generate(
    model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_token_id: int, stop_ids: Sequence[int],
    images: Sequence[str | None] | None = None,
) -> list[list[int]]:
    """Greedy continuation of a batch of prompts (left-padded), cut before the first stop id.

    Args:
        prompts: token id lists (any lengths). stop_ids: ids that end a generation; when
            empty, ``model.generate`` falls back to ``model.generation_config.eos_token_id``.
        images: per prompt, its ``image_inputs`` file or None (vision-language models;
            :func:`merit_core.data.images.image_batch`).

    Returns one list of new token ids per prompt (stop token excluded), at most
    ``max_new_tokens`` long.
    """
    device = model_device(model)
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attention_mask[i, length - len(p) :] = 1
    extra = {}
    if images is not None and any(images):
        from merit_core.data.images import image_batch

        extra = {k: v.to(device) for k, v in image_batch(images, length, [length - len(p) for p in prompts]).items()}
    out = model.generate(
        **extra,
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


def exact_match_rate(model, tokenizer, examples: Sequence[TokenizedExample], batch_size: int, max_new_tokens: int,
                     pad_id: int, chat_template: str | None) -> float:
    """Fraction in [0, 1] of ``examples`` whose greedy continuation of the prompt
    (:func:`greedy_generate`, batches of ``batch_size``, stop at the tokenizer's eos or
    else the model's generation eos) matches the reference response (:func:`exact_match`).

    Raises:
        ValueError: an example has neither prompt ids nor an untokenized example.
    """
    stop = _stop_ids(model, tokenizer)
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [example_prompt(tokenizer, te, chat_template) for te in chunk]
        generated = greedy_generate(model, prompts, max_new_tokens=max_new_tokens, pad_token_id=pad_id, stop_ids=stop,
                                    images=[te.image_inputs for te in chunk])
        for te, ids in zip(chunk, generated):
            hits += exact_match(tokenizer.decode(ids, skip_special_tokens=True), _reference(tokenizer, te))
    return hits / len(examples)


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
