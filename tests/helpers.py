"""Test helpers: synthetic instruction sources tokenized with the tiny tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from merit_core.data.format import prompt_ids, response_ids
from merit_core.data.types import IGNORE_INDEX, Example, TokenizedExample

WORDS = "the quick brown fox jumps over lazy dog what is capital of france paris add answer yes no true false".split()


def synthetic_examples(source: str, n: int, seed: int) -> list[Example]:
    """n deterministic toy examples of one 'task' (a fixed instruction + random words)."""
    rng = random.Random(f"{source}-{seed}")
    instr = " ".join(rng.choice(WORDS) for _ in range(3))
    out = []
    for _ in range(n):
        x = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        y = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        out.append(Example(prompt=f"{instr}: {x}", response=y))
    return out


def tokenize_all(tokenizer, examples: list[Example], source: str) -> list[TokenizedExample]:
    out = []
    for e in examples:
        p = prompt_ids(tokenizer, e)
        r = response_ids(tokenizer, e.response)
        out.append(
            TokenizedExample(
                input_ids=p + r, labels=[IGNORE_INDEX] * len(p) + r, prompt_length=len(p), source=source, example=e
            )
        )
    return out


def write_jsonl_sources(directory: Path, names: list[str], n: int = 24) -> list[dict]:
    """Write one JSONL file per source; return SourceSpec dicts for a config."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, name in enumerate(names):
        path = directory / f"{name}.jsonl"
        with path.open("w") as f:
            for e in synthetic_examples(name, n, i):
                f.write(json.dumps({"prompt": e.prompt, "response": e.response}) + "\n")
        specs.append({"name": name, "kind": "jsonl", "path": str(path)})
    return specs
