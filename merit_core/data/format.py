"""The token convention every module shares: chat-formatted prompt ids + response ids.

prompt ids  = tokenizer.apply_chat_template([system?, user], add_generation_prompt=True)
response ids = tokenizer(response, add_special_tokens=False) + [end-of-turn id]

The end-of-turn id is ``tokenizer.eos_token_id`` (``<|im_end|>`` for SmolLM2). Loss is
on the response ids only (prompt labels are -100). Multiple-choice scoring and exact
match use the same prompt ids, so training and evaluation see identical prompts.
"""

from __future__ import annotations

from merit_core.data.types import Example


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template and none was given."""


def prompt_messages(example: Example) -> list[dict[str, str]]:
    """Chat messages of the prompt part: optional system turn, then the user turn."""
    msgs = []
    if example.system:
        msgs.append({"role": "system", "content": example.system})
    msgs.append({"role": "user", "content": example.prompt})
    return msgs


def prompt_ids(tokenizer, example: Example, chat_template: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt ending with the assistant generation prompt.

    Raises:
        ChatTemplateError: if neither the tokenizer nor ``chat_template`` gives a template.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"tokenizer {name!r} has no chat template; set data.chat_template in the config"
        )
    text = tokenizer.apply_chat_template(
        prompt_messages(example), add_generation_prompt=True, tokenize=False, chat_template=template
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def response_ids(tokenizer, text: str) -> list[int]:
    """Token ids of an answer followed by the end-of-turn token (eos)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids
