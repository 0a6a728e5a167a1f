"""Stage *resolve mixture*: every source loaded, tokenized, split into train / held-out /
calibration examples and stored under ``data/<content-hash>/``."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from merit_core.config import MeritConfig
from merit_core.data import resolve_mixture as load_mixture
from merit_core.data.types import TokenizedExample
from merit_core.pipeline.base import load_base_processor, load_base_tokenizer
from merit_core.pipeline.layout import source_data_key
from merit_core.refs import (
    MixtureRef,
    ModelRef,
    SourceInfo,
    read_examples,
    write_examples,
)
from merit_core.store import ArtifactStore
from merit_core.store.objects import intact_dir

SPLITS = ("train", "heldout", "calibration")


def resolve_mixture(cfg: MeritConfig, store: ArtifactStore, base: ModelRef) -> MixtureRef:
    """Load, tokenize and split every source of ``cfg.data`` with θ(0)'s tokenizer; commit
    each source's splits (train.jsonl, heldout.jsonl, calibration.jsonl) unless stored.

    Returns:
        MixtureRef: per source its content hash, store key and example/token counts.

    Raises:
        merit_core.data.errors.DataError: a source cannot be read (the message names it).
    """
    tokenizer = load_base_tokenizer(store, base, cfg.model.trust_remote_code)
    processor = load_base_processor(store, base, cfg.model.trust_remote_code)
    mixture = load_mixture(cfg.data, tokenizer, cfg.conflict.calibration_size, processor=processor)
    infos = []
    for name in mixture.names:
        sd = mixture.sources[name]
        key = source_data_key(sd.content_hash)
        if not intact_dir(store, key):  # missing, or damaged: written again
            staging = store.staging_dir(key)
            for split, examples in zip(SPLITS, (sd.train, sd.heldout, sd.calibration)):
                write_examples(staging / f"{split}.jsonl", with_stored_images(examples, staging))
            store.commit_dir(key, staging, metadata={"kind": "tokenized-source", "source": name})
        st = sd.stats
        spec = next(s for s in cfg.data.sources if s.name == name)
        infos.append(SourceInfo(
            name=name, kind=spec.kind, content_hash=sd.content_hash, key=key, examples=st.examples,
            train=st.train_examples, heldout=st.heldout_examples, calibration=st.calibration_examples,
            calibration_tokens=sum(len(e.input_ids) for e in sd.calibration),
            loss_tokens=st.loss_tokens, truncated=st.truncated, dropped=st.dropped,
            has_options=any(e.example is not None and e.example.options for e in sd.heldout),
        ))
    return MixtureRef(sources=infos)


IMAGES_DIR = "images"
"""Sub-directory of a stored source holding its examples' image tensors (safetensors)."""


def with_stored_images(examples: list[TokenizedExample], staging: Path) -> list[TokenizedExample]:
    """Copies of ``examples`` whose ``image_inputs`` files are copied into
    ``staging/images/`` and named relative to the source directory."""
    out = []
    for e in examples:
        if e.image_inputs and Path(e.image_inputs).is_absolute():
            rel = f"{IMAGES_DIR}/{Path(e.image_inputs).name}"
            if not (staging / rel).is_file():
                (staging / IMAGES_DIR).mkdir(exist_ok=True)
                shutil.copy2(e.image_inputs, staging / rel)
            e = replace(e, image_inputs=rel)
        out.append(e)
    return out


def load_split(store: ArtifactStore, source: SourceInfo, split: str) -> list[TokenizedExample]:
    """Tokenized examples of one data split (``train`` / ``heldout`` / ``calibration``) of
    a stored source; image examples name their image tensors by absolute path in the
    fetched source directory.

    Raises:
        ValueError: ``split`` is not one of those three.
    """
    if split not in SPLITS:
        raise ValueError(f"data split {split!r}: use one of {', '.join(SPLITS)}")
    return read_stored_examples(store.fetch_dir(source.key), f"{split}.jsonl")


def read_stored_examples(directory: Path, name: str) -> list[TokenizedExample]:
    """The examples of ``directory/name`` with their ``image_inputs`` made absolute
    (inverse of :func:`with_stored_images`)."""
    return [replace(e, image_inputs=str(directory / e.image_inputs)) if e.image_inputs else e
            for e in read_examples(directory / name)]
