"""JSON Lines and Parquet sources, and the record -> Example rule shared with ``hf``.

A record (one JSON line, Parquet row or dataset row) becomes an :class:`Example` in one
of two ways:

- prompt/response: ``record[spec.prompt_field]`` is the user turn and
  ``record[spec.response_field]`` the answer (strings; numbers are turned into text);
- chat: ``record[spec.messages_field]`` is a list of ``{"role", "content"}`` messages
  (or LLaVA's ``{"from": "human"|"gpt"|"system", "value"}``).
  The *last* ``assistant`` message is the response. A leading ``system`` message becomes
  the system prompt. The turns between are the prompt: a single user turn is used as
  is; several turns are written out as ``"User: …\\n\\nAssistant: …\\n\\nUser: …"``.
  Turns after the last assistant message are ignored.

``spec.system_prompt`` applies to records without their own system message. With
``spec.image_field`` the record's images are read too (:mod:`merit_core.data.images`:
paths relative to the file, bytes, Image columns) and the prompt must hold one
``<image>`` per image. Every error names the source, the file and line (or row), and
the field (or the image path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from merit_core.config import SourceSpec
from merit_core.data.errors import DataError, where
from merit_core.data.types import Example

_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _as_text(value: Any, field: str, at: str) -> str:
    """``value`` as text: a string as is, a number as its text.

    Raises:
        DataError: null, another type, or a string that is not valid Unicode text (a lone
            UTF-16 surrogate such as ``"\\ud800"``, which JSON allows but no tokenizer
            takes); names ``at`` (source, file and line) and the field.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(at + f"field {field!r} is not valid Unicode text: a lone surrogate "
                            f"{value[e.start]!r} at character {e.start}") from None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise DataError(at + f"field {field!r} is null; it must be text")
    raise DataError(at + f"field {field!r} must be text, got {type(value).__name__}")


def _messages_to_example(messages: Any, spec: SourceSpec, at: str) -> Example:
    field = spec.messages_field
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    if not isinstance(messages, list) or not messages:
        raise DataError(at + f"field {field!r} must be a non-empty list of chat messages")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and "from" in m and "value" in m:  # LLaVA conversation turn
            m = {"role": _LLAVA_ROLES.get(str(m["from"]), str(m["from"])), "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(at + f"field {field!r} message {i} must have 'role' and 'content' (or 'from' and 'value')")
        turns.append((str(m["role"]), _as_text(m["content"], f"{field}[{i}].content", at)))
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise DataError(at + f"field {field!r} has no assistant message (the response is missing)")
    response = turns[last][1]
    if not response.strip():
        raise DataError(at + f"field {field!r}: empty response (the last assistant message is empty)")
    before = turns[:last]
    system = None
    if before and before[0][0] == "system":
        system = before[0][1]
        before = before[1:]
    if not before:
        raise DataError(at + f"field {field!r} has no user message before the last assistant message")
    if len(before) == 1 and before[0][0] == "user":
        prompt = before[0][1]
    else:
        prompt = "\n\n".join(f"{role.capitalize()}: {content}" for role, content in before)
    return Example(prompt=prompt, response=response, system=system or spec.system_prompt)


def record_to_example(record: Any, spec: SourceSpec, place: str, base_dir: Path | None = None) -> Example:
    """One record as an :class:`Example` (rules in the module docstring).

    Args:
        record: a mapping (JSON object, Parquet / dataset row).
        spec: the source spec (field names, system prompt, image field).
        place: where the record is, for messages, e.g. ``"data.jsonl line 7"``.
        base_dir: directory that relative image paths resolve against (the file's).

    Raises:
        DataError: not a mapping, a missing field, a non-text value, an empty response,
            a missing or unreadable image, images and ``<image>`` placeholders that do
            not match in number.
    """
    at = where(spec.name, place)
    if not isinstance(record, dict):
        raise DataError(at + f"expected an object with fields, got {type(record).__name__}")
    example = _text_example(record, spec, at)
    if not spec.image_field:
        return example
    from dataclasses import replace

    from merit_core.data.images import check_placeholders, image_refs

    if spec.image_field not in record:
        raise DataError(at + f"missing image field {spec.image_field!r} (fields present: {sorted(record)})")
    images = image_refs(record[spec.image_field], spec.name, place, base_dir)
    check_placeholders(example.prompt, len(images), spec.name, place)
    return replace(example, images=images)


def _text_example(record: dict, spec: SourceSpec, at: str) -> Example:
    if spec.messages_field:
        if spec.messages_field not in record:
            raise DataError(at + f"missing field {spec.messages_field!r} (fields present: {sorted(record)})")
        return _messages_to_example(record[spec.messages_field], spec, at)
    for field in (spec.prompt_field, spec.response_field):
        if field not in record:
            what = "response field" if field == spec.response_field else "field"
            raise DataError(at + f"missing {what} {field!r} (fields present: {sorted(record)})")
    prompt = _as_text(record[spec.prompt_field], spec.prompt_field, at)
    response = _as_text(record[spec.response_field], spec.response_field, at)
    if not response.strip():
        raise DataError(at + f"empty response in field {spec.response_field!r}")
    return Example(prompt=prompt, response=response, system=spec.system_prompt)


def _existing(spec: SourceSpec) -> Path:
    path = Path(spec.path or "").expanduser()
    if not path.is_file():
        raise DataError(where(spec.name) + f"file {path} does not exist")
    return path


def load_jsonl(spec: SourceSpec) -> list[Example]:
    """Examples of a JSON Lines file (blank lines skipped), in file order.

    Raises:
        DataError: missing file, malformed JSON (file and line number), bad record.
    """
    path = _existing(spec)
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        where(spec.name, f"{path} line {lineno}") + f"malformed JSON: {e.msg} (column {e.colno})"
                    ) from None
                out.append(record_to_example(record, spec, f"{path} line {lineno}", path.parent))
        except UnicodeDecodeError as e:
            raise DataError(where(spec.name) + f"{path} is not UTF-8 text: {e}") from None
    return out


def load_parquet(spec: SourceSpec) -> list[Example]:
    """Examples of a Parquet file, one per row (rows numbered from 1 in messages).

    Raises:
        DataError: missing or unreadable file, bad record.
    """
    import pyarrow.parquet as pq

    path = _existing(spec)
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet files
        raise DataError(where(spec.name) + f"cannot read Parquet file {path}: {e}") from None
    return [record_to_example(r, spec, f"{path} row {i}", path.parent) for i, r in enumerate(rows, 1)]
