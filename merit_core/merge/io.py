"""Lazy tensor reading and sharded writing for Hugging Face safetensors directories.

The only safetensors reader and writer of merit_core (merge and diagnostics use it).
The merge maths never touches files: :class:`Checkpoint` reads the headers of a model
directory (single ``model.safetensors`` or shards + ``model.safetensors.index.json``)
and hands out one tensor, or one block of rows of a tensor, at a time; :class:`ShardWriter` collects merged tensors into
output shards planned up front (``huggingface_hub.split_torch_state_dict_into_shards``
on meta tensors) and writes each shard as soon as it is full, so only one shard is ever
held in memory.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"

# Files of an input directory that are not copied into the merged model: weights in any
# format, weight indexes, the manifest and trainer state belonging to one branch.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP_FILES = {"manifest.json", "manifest.json.tmp", "trainer_state.json"}

# Elements per block of :meth:`Checkpoint.blocks`: a float64 block is at most 32 MiB.
BLOCK_ELEMENTS = 1 << 22

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MergeError(ValueError):
    """Inputs cannot be merged; the message names the tensor and/or the input path."""


class MissingCheckpointError(MergeError, FileNotFoundError):
    """A checkpoint path is not a directory or holds no safetensors weights (the
    message names the path); both a :class:`MergeError` and a ``FileNotFoundError``."""


def is_output_embedding(name: str) -> bool:
    """Whether tensor ``name`` is the output embedding (``lm_head.weight`` at any depth),
    which a model with tied word embeddings shares with the input embedding."""
    return name == "lm_head.weight" or name.endswith(".lm_head.weight")


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the checkpoint directory


class Checkpoint:
    """Headers of a safetensors HF model directory; tensors are read on demand.

    Every :meth:`read` (and every :meth:`blocks` iteration) opens the tensor's file,
    copies tensor data out and closes the file again, so no memory map stays resident
    between tensors and there is nothing to close. ``tensors`` maps each stored name to
    its :class:`TensorInfo` (file order); ``config`` is ``config.json`` (``{}`` if absent).

    Raises:
        MissingCheckpointError: the path is not a directory or has no safetensors weights.
        MergeError: an unreadable index or header, a file or tensor named by the index
            but missing, or an unsupported dtype.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingCheckpointError(f"input {self.path} is not a directory")
        index = self.path / SAFE_WEIGHTS_INDEX_NAME
        single = self.path / SAFE_WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise MergeError(f"input {self.path}: unreadable {SAFE_WEIGHTS_INDEX_NAME}: {e}") from e
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = {}, [SAFE_WEIGHTS_NAME]
        else:
            raise MissingCheckpointError(
                f"input {self.path} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME})"
            )
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise MergeError(f"input {self.path}: weight file {fname} listed in the index is missing")
            try:
                with safe_open(fpath, framework="pt") as f:
                    for name in f.keys():
                        if weight_map and weight_map.get(name) != fname:
                            continue  # the index is authoritative for sharded checkpoints
                        sl = f.get_slice(name)
                        dtype = _DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise MergeError(
                                f"tensor {name!r} in {fpath} has unsupported dtype {sl.get_dtype()}"
                            )
                        self.tensors[name] = TensorInfo(tuple(sl.get_shape()), dtype, fname)
            except MergeError:
                raise
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise MergeError(f"input {self.path}: cannot read {fname}: {e}") from e
        missing = sorted(set(weight_map) - set(self.tensors))
        if missing:
            raise MergeError(
                f"tensor {missing[0]!r} is listed in {self.path / SAFE_WEIGHTS_INDEX_NAME} "
                f"but not stored in {weight_map[missing[0]]}"
            )
        cfg = self.path / "config.json"
        self.config: dict = json.loads(cfg.read_text()) if cfg.is_file() else {}

    @property
    def names(self) -> list[str]:
        """The stored tensor names."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (``KeyError`` if not stored)."""
        return self.tensors[name].shape

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (in its stored dtype) from disk."""
        info = self.tensors[name]
        with safe_open(self.path / info.file, framework="pt") as f:
            return f.get_tensor(name)

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as float64 blocks of whole rows (dim 0), in order.

        Each block holds at most :data:`BLOCK_ELEMENTS` elements (at least one row), so a
        streaming reduction over a large tensor never holds it whole; a 0-d tensor or
        one with no rows comes as a single block.
        """
        shape = self.shape(name)
        if len(shape) == 0 or shape[0] == 0:
            yield self.read(name).to(torch.float64)
            return
        step = max(1, BLOCK_ELEMENTS // (math.prod(shape[1:]) or 1))
        with safe_open(self.path / self.tensors[name].file, framework="pt") as f:
            rows = f.get_slice(name)
            for start in range(0, shape[0], step):
                yield rows[start : start + step].to(torch.float64)

    def config_value(self, key: str) -> Any:
        """``config[key]``, falling back to ``config["text_config"][key]`` (VLMs) when
        absent or null at the top level; ``None`` when neither has it."""
        value = self.config.get(key)
        if value is None:
            value = (self.config.get("text_config") or {}).get(key)
        return value

    @property
    def tied_embeddings(self) -> bool:
        """Whether the config ties the output embedding to the input embedding
        (``tie_word_embeddings``, also under ``text_config``; absent counts as untied)."""
        return bool(self.config_value("tie_word_embeddings"))


def plan_shards(infos: dict[str, TensorInfo], max_shard_size: str | int):
    """Assign tensor names (in the given order) to output shard files.

    Returns:
        ``huggingface_hub.StateDictSplit`` (``filename_to_tensors``,
        ``tensor_to_filename``, ``is_sharded``, ``metadata``).
    """
    meta = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
    return split_torch_state_dict_into_shards(meta, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)


class ShardWriter:
    """Writes tensors into the shards of a plan, flushing each shard once complete.

    Tensors must be added in plan order (shard by shard); at most one shard is held.
    """

    def __init__(self, directory: str | Path, infos: dict[str, TensorInfo], max_shard_size: str | int):
        self.directory = Path(directory)
        self.split = plan_shards(infos, max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._shards = list(self.split.filename_to_tensors.items())
        self._current = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        fname, names = self._shards[self._current]
        if name not in names:
            raise RuntimeError(f"ShardWriter: tensor {name!r} added out of order (current shard {fname})")
        self._pending[name] = tensor.contiguous()
        if len(self._pending) == len(names):
            save_file({n: self._pending[n] for n in names}, self.directory / fname, metadata={"format": "pt"})
            self._pending = {}
            self._current += 1

    def close(self) -> list[str]:
        """Write the index (when sharded); returns the weight file names written."""
        if self._current != len(self._shards):
            raise RuntimeError(f"ShardWriter: only {self._current} of {len(self._shards)} shards were completed")
        if self.split.is_sharded:
            index = {"metadata": dict(self.split.metadata), "weight_map": dict(self.split.tensor_to_filename)}
            (self.directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [f for f, _ in self._shards]


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every top-level non-weight file of ``src`` (config, generation config,
    tokenizer files, chat template, ...) into ``dst``; returns the names copied."""
    copied = []
    for p in sorted(Path(src).iterdir()):
        if not p.is_file() or p.name in _SKIP_FILES or p.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if p.name.endswith(".index.json"):  # weight indexes of any format
            continue
        shutil.copy2(p, Path(dst) / p.name)
        copied.append(p.name)
    return copied
