"""Lazy tensor reading and sharded writing for Hugging Face safetensors directories.

The merge maths never touches files: :class:`Checkpoint` reads the headers of a model
directory (single ``model.safetensors`` or shards + ``model.safetensors.index.json``)
and hands out one tensor at a time; :class:`ShardWriter` collects merged tensors into
output shards planned up front (``huggingface_hub.split_torch_state_dict_into_shards``
on meta tensors) and writes each shard as soon as it is full, so only one shard is ever
held in memory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # file name inside the checkpoint directory


class Checkpoint:
    """Headers of a safetensors HF model directory; tensors are read on demand.

    Every :meth:`read` opens the tensor's file, copies that one tensor out and closes
    the file again, so no memory map stays resident between tensors.

    Raises:
        MergeError: the path is not a directory, has no safetensors weights, or its
            index names a missing file or tensor.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"input {self.path} is not a directory")
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
            raise MergeError(
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

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor (in its stored dtype) from disk."""
        info = self.tensors[name]
        with safe_open(self.path / info.file, framework="pt") as f:
            return f.get_tensor(name)

    def config_value(self, key: str):
        """``config[key]``, falling back to ``config["text_config"][key]`` (VLMs)."""
        if key in self.config:
            return self.config[key]
        return (self.config.get("text_config") or {}).get(key)


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
