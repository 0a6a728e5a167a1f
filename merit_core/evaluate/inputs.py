"""Model inputs shared by the scorers: an example's prompt ids, the pad id, the device."""

from __future__ import annotations

import torch

from merit_core.data.format import prompt_ids
from merit_core.data.types import TokenizedExample

__all__ = ["example_prompt", "model_device", "pad_token_id"]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def example_prompt(tokenizer, te: TokenizedExample, chat_template: str | None) -> list[int]:
    """The prompt ids of a tokenized example: its stored ``input_ids[:prompt_length]``, or,
    for an example stored without a prompt (``prompt_length == 0``), the ids
    :func:`merit_core.data.format.prompt_ids` makes from its untokenized example.

    Raises:
        ValueError: the example has neither prompt ids nor an untokenized example.
    """
    if te.prompt_length > 0:
        return list(te.input_ids[: te.prompt_length])
    if te.example is None:
        raise ValueError(f"example of source {te.source!r} has neither prompt ids nor an untokenized example")
    return prompt_ids(tokenizer, te.example, chat_template)
