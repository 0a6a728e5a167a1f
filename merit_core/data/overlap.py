"""Overlap between the sources of a mixture (issue 15, point 4): the same example
under two source names must neither be trained on twice nor leak from one source's
held-out split into another source's training split.

- :func:`drop_cross_source_duplicates`: exact duplicates (same prompt, response and
  options) are kept once, in the first source in config order, and removed from later
  sources with a warning; a source that is nothing but duplicates is refused.
- :func:`without_heldout_prompts_of_others`: after each source is split, every training
  example whose prompt another source holds out is removed, with a warning.

See docs/reliability.md, "Refusals and clear errors".
"""

from __future__ import annotations

import logging

from merit_core.data.errors import DataError, where
from merit_core.data.types import Example, TokenizedExample

log = logging.getLogger("merit_core.data.mixture")


def _duplicate_key(ex: Example) -> tuple:
    """What makes two examples the same example across sources: prompt, response and
    multiple-choice options and images (not the system prompt, which a source may add)."""
    return ex.prompt, ex.response, ex.options, ex.correct, tuple(ex.images or ())


def _prompt_key(e: TokenizedExample) -> str:
    """The user text of a tokenized example, with its images (the same question about
    another image is another prompt); its prompt ids where it has no Example."""
    if e.example is None:
        return repr(e.input_ids[: e.prompt_length])
    return "\0".join([e.example.prompt, *(e.example.images or ())])


def drop_cross_source_duplicates(loaded: dict[str, list[Example]]) -> dict[str, list[Example]]:
    """Remove from each source the examples that an earlier source (config order) has
    already: same prompt, response and options (:func:`_duplicate_key`). Each removal is
    logged as a warning naming both sources and the count.

    Args:
        loaded: source name -> its examples, in config order.

    Returns:
        The same mapping with the duplicates removed from the later sources.

    Raises:
        DataError: a source is left with no example (all of it duplicates earlier
            sources: the same data under two names), naming both sources.
    """
    first: dict[tuple, str] = {}
    out: dict[str, list[Example]] = {}
    for name, examples in loaded.items():
        kept, dup_of = [], {}
        for ex in examples:
            owner = first.get(_duplicate_key(ex))
            if owner is not None and owner != name:
                dup_of[owner] = dup_of.get(owner, 0) + 1
                continue
            first.setdefault(_duplicate_key(ex), name)
            kept.append(ex)
        if dup_of and not kept:
            raise DataError(where(name) + f"all {len(examples)} examples are exact duplicates of source(s) "
                            f"{sorted(dup_of)} (the same data under two names?); remove one of them")
        for owner, n in dup_of.items():
            log.warning("source %r: removed %d example(s) that duplicate source %r exactly (prompt, response "
                        "and options); each example is kept once, in the first source", name, n, owner)
        out[name] = kept
    return out


def without_heldout_prompts_of_others(
    train: dict[str, list[TokenizedExample]], heldout: dict[str, list[TokenizedExample]]
) -> dict[str, list[TokenizedExample]]:
    """Each source's training split without the examples whose user text is held out by
    another source (so no held-out example is ever trained on, whichever source holds
    it); each removal is a warning naming both sources.

    Raises:
        DataError: a source is left without training examples (names it).
    """
    held_by: dict[str, str] = {}
    for name, part in heldout.items():
        for e in part:
            held_by.setdefault(_prompt_key(e), name)
    out = {}
    for name, part in train.items():
        kept, hits = [], {}
        for e in part:
            owner = held_by.get(_prompt_key(e))
            if owner is not None and owner != name:
                hits[owner] = hits.get(owner, 0) + 1
            else:
                kept.append(e)
        for owner, n in hits.items():
            log.warning("source %r: removed %d training example(s) whose prompt is held out by source %r "
                        "(no held-out example may be trained on)", name, n, owner)
        if not kept:
            raise DataError(where(name) + f"no training example left: all {len(part)} share their prompt with "
                            f"held-out examples of source(s) {sorted(hits)}; remove the overlap")
        out[name] = kept
    return out
