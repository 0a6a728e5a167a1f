"""Multiple-choice accuracy by option log-likelihood (the ``mc_accuracy`` and
``mc_accuracy_norm`` metrics of :mod:`merit_core.evaluate`).

For examples with ``options`` and ``correct``, each option is scored by the summed
log-likelihood of ``response_ids(option)`` (option tokens + eos) after the prompt; the
prediction is the first option with the highest score. ``mc_accuracy_norm`` divides
each score by the option's length (UTF-8 bytes of the option text by default, as
lm-evaluation-harness ``acc_norm``; or tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merit_core.data.format import response_ids
from merit_core.data.types import IGNORE_INDEX, TokenizedExample
from merit_core.evaluate.inputs import example_prompt, model_device

__all__ = ["has_options", "multiple_choice_accuracy", "sequence_logprobs"]

def sequence_logprobs(
    model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, pad_token_id: int,
    images: Sequence[str | None] | None = None,
) -> list[float]:
    """Summed log-probability (nats, float32 softmax) of each continuation given its prompt.

    Args:
        sequences: (prompt ids, continuation ids) pairs; continuation non-empty.
        images: per pair, the prompt's ``image_inputs`` file or None (vision-language
            models; :func:`merit_core.data.images.image_batch`).

    Returns:
        One float per pair: Σ_j log p(c_j | prompt, c_<j).
    """
    device = model_device(model)
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
        extra = {}
        if images is not None and any(images[i : i + batch_size]):
            from merit_core.data.images import image_batch

            extra = {k: v.to(device) for k, v in image_batch(images[i : i + batch_size], length).items()}
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra).logits
        target = labels[:, 1:].to(device)
        mask = target != IGNORE_INDEX  # (B, L-1)
        picked = logits[:, :-1][mask].float()  # (n_tok, V): only continuation positions
        logp = torch.log_softmax(picked, dim=-1).gather(1, target[mask].unsqueeze(1)).squeeze(1)
        row = mask.nonzero()[:, 0]
        per_seq = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, row, logp.double())
        scores.extend(per_seq.tolist())
    return scores


def has_options(te: TokenizedExample) -> bool:
    """Whether the example is scored by multiple choice (it has ``options`` and ``correct``).

    Raises:
        ValueError: ``correct`` is not an index into ``options`` (names the source).
    """
    ex = te.example
    if ex is None or not ex.options or ex.correct is None:
        return False
    if not 0 <= ex.correct < len(ex.options):
        raise ValueError(f"source {te.source!r}: correct={ex.correct} is not an index into {len(ex.options)} options")
    return True


def multiple_choice_accuracy(model, tokenizer, examples: Sequence[TokenizedExample], batch_size: int, pad_id: int,
                             chat_template: str | None, mc_norm: str) -> tuple[float, float]:
    """``(mc_accuracy, mc_accuracy_norm)`` of examples that all have options
    (:func:`has_options`): the fraction in [0, 1] whose highest-scoring option is
    ``correct``, with summed option log-likelihoods (:func:`sequence_logprobs`), and
    with those scores divided by the option length (``mc_norm``: ``"bytes"``, UTF-8
    bytes of the option text, min 1; or ``"tokens"``, option tokens incl. eos).
    """
    pairs, lengths, owners = [], [], []
    for k, te in enumerate(examples):
        prompt = example_prompt(tokenizer, te, chat_template)
        for option in te.example.options:
            cont = response_ids(tokenizer, option)
            pairs.append((prompt, cont))
            lengths.append(len(cont) if mc_norm == "tokens" else max(1, len(option.encode("utf-8"))))
            owners.append(k)
    scores = sequence_logprobs(model, pairs, batch_size=batch_size, pad_token_id=pad_id,
                               images=[examples[k].image_inputs for k in owners])
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
