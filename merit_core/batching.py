"""Batching and the SFT loss on response tokens (shared by conflict, eval, diagnostics)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from merit_core.data.types import IGNORE_INDEX, TokenizedExample


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    Returns a dict of int64 tensors of shape (B, L) with L the longest example:
    ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 = real token)
    and ``labels`` (padded with -100).

    Raises:
        ValueError: if ``examples`` is empty.
    """
    if not examples:
        raise ValueError("collate: empty list of examples")
    length = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :k] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_token_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield collated batches of ``batch_size`` examples in the given order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size], pad_token_id)


def response_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens of a batch.

    The label at position j is predicted from position j-1 (causal shift); positions
    with label -100 carry no loss. The loss is computed in float32 whatever the model
    dtype.

    Returns:
        (loss_sum, n_tokens): a float32 scalar tensor (nats, differentiable) and the
        number of loss-bearing tokens (int).
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum().item())


@torch.no_grad()
def mean_response_loss(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int = 8,
) -> float:
    """Mean response-token cross-entropy (nats/token) of ``model`` over ``examples``.

    Token-weighted over the whole list (sum of losses / number of response tokens).
    The model is put in eval mode.

    Raises:
        ValueError: if the examples carry no response token.
    """
    model.eval()
    total, count = 0.0, 0
    for batch in batches(examples, batch_size, pad_token_id):
        loss, n = response_loss_sum(model, batch)
        total += float(loss)
        count += n
    if count == 0:
        raise ValueError("mean_response_loss: the examples carry no response token")
    return total / count
