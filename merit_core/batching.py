"""Batching and the SFT loss on response tokens (shared by conflict, eval, diagnostics)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from merit_core.data.types import IGNORE_INDEX, TokenizedExample


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch.

    Returns a dict of int64 tensors of shape (B, L) with L the longest example:
    ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 = real token)
    and ``labels`` (padded with -100); for image examples also their image inputs
    (:func:`merit_core.data.images.image_batch`: ``pixel_values``, ``image_grid_thw``,
    ``mm_token_type_ids`` (B, L), ...).

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
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.image_inputs for e in examples):
        from merit_core.data.images import image_batch

        out.update(image_batch([e.image_inputs for e in examples], length))
    return out


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

    Other entries of ``batch`` (image inputs of a vision-language model) go to the model
    as keyword arguments.

    Returns:
        (loss_sum, n_tokens): a float32 scalar tensor (nats, differentiable) and the
        number of loss-bearing tokens (int).
    """
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
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


# --- padding-free training batches (train.packing) ------------------------------------


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign examples to packed rows of at most ``capacity`` tokens (first-fit decreasing).

    Args:
        lengths: tokens per example (each ≤ ``capacity``).
        capacity: most tokens in one row (``train.pack_tokens``).

    Returns:
        Rows as lists of example indices; every index appears exactly once.

    Raises:
        ValueError: an example longer than ``capacity`` (names its index and length).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"pack_rows: example {i} has {n} tokens, more than a packed row's "
                             f"{capacity} (train.pack_tokens); raise train.pack_tokens to at least data.max_length")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


class PackedCollator:
    """Padding-free micro-batches for training (``train.packing``).

    The examples of one micro-step are concatenated into rows of at most ``pack_tokens``
    tokens (:func:`pack_rows`) with transformers' ``DataCollatorWithFlattening``: each
    example keeps its own ``position_ids`` (restarting at 0) and its first label is
    -100, so no token is predicted across an example boundary. There is no
    ``attention_mask``: with ``use_cache=False`` transformers reads the example
    boundaries from ``position_ids`` and gives each example a causal block of its own
    (checked per model by :func:`packing_supported`). Rows are right-padded to the
    longest row of the micro-step; the padding is a separate block with labels -100.

    The same examples go into the same optimizer step as with padded batches, so the
    loss, the gradients, the step count and N_k do not change (tests/test_packing.py).

    Returns from ``__call__``: int64 tensors ``input_ids``, ``labels``, ``position_ids``
    of shape (rows, width). ``real_positions`` / ``total_positions`` count the
    example tokens and all positions of the batches made so far.
    """

    def __init__(self, pad_token_id: int, pack_tokens: int):
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.pad_token_id = int(pad_token_id)
        self.pack_tokens = int(pack_tokens)
        self.real_positions = 0
        self.total_positions = 0

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        rows = pack_rows([len(f["input_ids"]) for f in features], self.pack_tokens)
        flat = [self._flatten([features[i] for i in row], return_tensors="pt") for row in rows]
        width = max(b["input_ids"].shape[1] for b in flat)
        out: dict[str, list[torch.Tensor]] = {"input_ids": [], "labels": [], "position_ids": []}
        for b in flat:
            pad = width - b["input_ids"].shape[1]
            fill = {"input_ids": torch.full((1, pad), self.pad_token_id, dtype=torch.long),
                    "labels": torch.full((1, pad), IGNORE_INDEX, dtype=torch.long),
                    "position_ids": torch.arange(pad, dtype=torch.long)[None]}
            for k in out:
                out[k].append(torch.cat([b[k].long(), fill[k]], dim=1) if pad else b[k].long())
        self.real_positions += sum(len(f["input_ids"]) for f in features)
        self.total_positions += len(rows) * width
        return {k: torch.cat(v, dim=0) for k, v in out.items()}

    @property
    def real_token_fraction(self) -> float:
        """Example tokens / all positions over the batches made so far (NaN before any)."""
        return self.real_positions / self.total_positions if self.total_positions else float("nan")


def padded_real_token_fraction(lengths_per_batch: Sequence[Sequence[int]]) -> float:
    """Example tokens / positions of right-padded batches (each batch padded to its
    longest example): the figure :class:`PackedCollator` improves on."""
    real = sum(sum(b) for b in lengths_per_batch)
    total = sum(len(b) * max(b) for b in lengths_per_batch if b)
    return real / total if total else float("nan")


@torch.no_grad()
def packing_supported(model: torch.nn.Module, tol: float | None = None) -> bool:
    """Whether ``model`` keeps packed examples apart when given restarting ``position_ids``
    and no attention mask (what :class:`PackedCollator` relies on).

    Runs two short random sequences packed into one row and the second alone; they must
    give the same logits (max abs difference ≤ ``tol`` · (1 + max |logit|)). A model
    whose attention lets the second sequence see the first, or that refuses the inputs,
    gets False. The model's training/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        device = param.device
        if tol is None:
            tol = 1e-4 if param.dtype == torch.float32 else 3e-2
        vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 0)
        if vocab < 2:
            return False
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, vocab, (6,), generator=g)
        b = torch.randint(0, vocab, (5,), generator=g)
        ids = torch.cat([a, b])[None].to(device)
        pos = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)
        try:
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 6:].float()
            solo = model(input_ids=b[None].to(device), use_cache=False).logits[0].float()
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            return False
        return bool((packed - solo).abs().max() <= tol * (1 + solo.abs().max()))
    finally:
        model.train(was_training)
