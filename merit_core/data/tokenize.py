"""Example -> token ids with a loss mask, within ``max_length``; truncation keeps the answer.

Token convention: :mod:`merit_core.data.format` (chat-formatted prompt ids, then response
ids ending with the end-of-turn token; loss on response ids only).

Truncation policy, for an example longer than ``max_length`` (all counts in tokens):

1. The chat template stays whole: the user text is cut and the template re-applied, so
   the prompt always ends with the generation prompt (``<|im_start|>assistant\\n``).
   ``overhead`` = prompt length with an empty user text (system turn + markers).
2. The response is kept whole when it fits beside ``min(MIN_PROMPT_TOKENS, user
   length)`` tokens of user text; otherwise it is cut from the right (its end-of-turn
   token goes first) to leave that much room for the prompt.
3. The user text is cut in the middle: its first quarter and last three quarters of the
   remaining budget are kept, joined by ``TRUNCATION_MARKER``. Long task definitions
   (``natural_instructions``) come first and the actual input and output cue (``A:``,
   ``Answer:``) come last, so both ends survive.
4. If not a single response token fits beside the template (``max_length ≤ overhead``),
   the example is dropped (``None``); :func:`resolve_mixture` counts drops.

A truncated example keeps its cut prompt in ``TokenizedExample.example.prompt`` so that
evaluation re-creates the same prompt ids; its ``response`` stays the full reference.
"""

from __future__ import annotations

from dataclasses import replace

from merit_core.data.format import prompt_ids, response_ids
from merit_core.data.types import IGNORE_INDEX, Example, TokenizedExample

MIN_PROMPT_TOKENS = 32
"""User-text tokens a long response must leave to the prompt (if the prompt has them)."""
TRUNCATION_MARKER = "\n[...]\n"
"""Put where the middle of a too-long user text was cut out."""
_MAX_TRIES = 8


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _cut_middle(tokenizer, ids: list[int], budget: int, marker_len: int) -> str:
    if budget <= 0:
        return ""
    if len(ids) <= budget:
        return _decode(tokenizer, ids)
    keep = budget - marker_len
    if keep < 8:
        return _decode(tokenizer, ids[-budget:])
    head = keep // 4
    return _decode(tokenizer, ids[:head]) + TRUNCATION_MARKER + _decode(tokenizer, ids[len(ids) - (keep - head) :])


def _make(p: list[int], r: list[int], source: str, example: Example, truncated: bool) -> TokenizedExample:
    return TokenizedExample(
        input_ids=p + r,
        labels=[IGNORE_INDEX] * len(p) + list(r),
        prompt_length=len(p),
        source=source,
        example=example,
        truncated=truncated,
    )


def tokenize_example(
    tokenizer,
    example: Example,
    max_length: int,
    chat_template: str | None = None,
    source: str = "",
) -> TokenizedExample | None:
    """Tokenize one example within ``max_length`` tokens (policy in the module docstring).

    Returns:
        The tokenized example (``truncated`` set when anything was cut), or ``None`` when
        ``max_length`` leaves no room for a single response token (dropped).

    Raises:
        ChatTemplateError: the tokenizer has no chat template and ``chat_template`` is None.
    """
    p = prompt_ids(tokenizer, example, chat_template)
    r = response_ids(tokenizer, example.response)
    if len(p) + len(r) <= max_length:
        return _make(p, r, source, example, False)

    overhead = len(prompt_ids(tokenizer, replace(example, prompt=""), chat_template))
    room = max_length - overhead  # for user text + response
    if room < 1:
        return None
    user = list(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    keep_r = min(len(r), max(1, room - min(MIN_PROMPT_TOKENS, len(user))))
    marker_len = len(tokenizer(TRUNCATION_MARKER, add_special_tokens=False)["input_ids"])
    budget = max_length - overhead - keep_r
    for _ in range(_MAX_TRIES):
        cut = replace(example, prompt=_cut_middle(tokenizer, user, budget, marker_len))
        p = prompt_ids(tokenizer, cut, chat_template)
        excess = len(p) + keep_r - max_length
        if excess <= 0:
            return _make(p, r[:keep_r], source, cut, True)
        if budget <= 0:  # re-tokenization merged across the cut and the empty prompt is too long
            keep_r -= excess
            if keep_r < 1:
                return None
        budget = max(0, budget - excess)
    return None
