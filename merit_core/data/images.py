"""Image-instruction examples: image references, checks, tokenization through the model's
processor, and the image tensors of a batch (docs/multimodal.md).

An image example is an :class:`~merit_core.data.types.Example` with ``images`` (absolute
file paths) whose prompt marks each image's place with :data:`IMAGE_PLACEHOLDER`. It is
tokenized with the processor of θ(0) (``transformers.AutoProcessor``):

1. the prompt becomes one user turn whose content alternates ``{"type": "image"}`` and
   ``{"type": "text"}`` parts in placeholder order, formatted by the processor's chat
   template with the generation prompt;
2. ``processor(text=..., images=...)`` expands each image into the model's image tokens
   (Qwen2.5-VL: ``<|image_pad|>`` × patches / merge²) and makes the image tensors;
3. response ids follow as for text (:func:`merit_core.data.format.response_ids`), so only
   they carry loss: every image token sits in the prompt, whose labels are -100.

The processor's tensors other than ``input_ids`` / ``attention_mask`` are written to a
content-addressed safetensors file (``TokenizedExample.image_inputs``); a batch loads
them again (:func:`image_batch`), so the gradient, training and evaluation stages need no
processor and no image decoding.

Images are decoded with Pillow; one larger than the processor's pixel limit
(:func:`max_image_pixels`: Qwen2-VL ``max_pixels``, else ``size``) is first shrunk to
that many pixels (aspect kept), so a huge image costs its decode and no more.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from merit_core.data.errors import DataError, where
from merit_core.data.format import response_ids
from merit_core.data.types import IGNORE_INDEX, Example, TokenizedExample

IMAGE_PLACEHOLDER = "<image>"
"""Marks an image's place in a prompt (LLaVA convention); one per image, in order."""
SEQUENCE_FIELDS = ("mm_token_type_ids", "token_type_ids")
"""Processor outputs with one entry per prompt token; a batch pads them with 0."""
DEFAULT_MAX_PIXELS = 2048 * 2048
"""Decode bound for a processor that states no pixel limit."""


def image_cache_dir() -> Path:
    """Where image bytes from Parquet / datasets and processed image tensors are written
    (``<merit cache>/images``), content-addressed so equal inputs share a file."""
    from merit_core.store import default_cache_dir

    d = default_cache_dir() / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _write_addressed(data: bytes, suffix: str) -> Path:
    """``data`` in the image cache under its sha256 (written once, atomically)."""
    path = image_cache_dir() / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def check_image(path: str | os.PathLike, source: str, place: str) -> str:
    """``path`` as an absolute string if it is a readable image file.

    Raises:
        DataError: missing or unreadable (not an image, truncated) file; the message
            names the source, the record (``place``) and the path.
    """
    from PIL import Image

    p = Path(path)
    at = where(source, place)
    if not p.is_file():
        raise DataError(at + f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            im.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise DataError(at + f"image {p} cannot be read: {type(e).__name__}: {e}") from None
    return str(p.resolve())


def image_refs(value: Any, source: str, place: str, base_dir: Path | None) -> tuple[str, ...]:
    """The image files of one record's image field, checked (:func:`check_image`).

    Args:
        value: one image or a list of them; each a path (str, relative paths against
            ``base_dir``), bytes, a ``{"bytes", "path"}`` dict (Parquet / ``datasets``
            Image storage) or a ``PIL.Image.Image`` (a decoded ``datasets`` Image column).
            Bytes and decoded images are written to the image cache.
        base_dir: directory of the source file (jsonl), or None.

    Raises:
        DataError: a missing, unreadable or unsupported image (names source, record, path).
    """
    if value is None:
        return ()
    if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
        value = value.tolist()
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        out.append(check_image(_image_file(item, source, place, base_dir), source, place))
    return tuple(out)


def _image_file(item: Any, source: str, place: str, base_dir: Path | None) -> Path:
    if isinstance(item, dict):
        if item.get("bytes"):
            return _write_addressed(bytes(item["bytes"]), ".img")
        item = item.get("path")
    if isinstance(item, (bytes, bytearray)):
        return _write_addressed(bytes(item), ".img")
    if isinstance(item, str) and item:
        p = Path(item).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p
    if hasattr(item, "save") and hasattr(item, "size"):  # PIL.Image.Image
        buf = io.BytesIO()
        item.save(buf, format="PNG")
        return _write_addressed(buf.getvalue(), ".png")
    raise DataError(where(source, place) + f"image value of type {type(item).__name__} is not a path, bytes "
                    "or an image")


def check_placeholders(prompt: str, n_images: int, source: str, place: str) -> None:
    """Require one :data:`IMAGE_PLACEHOLDER` in ``prompt`` per image.

    Raises:
        DataError: the counts differ (names source, record and both counts).
    """
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n != n_images:
        raise DataError(where(source, place) + f"{n_images} image(s) but {n} {IMAGE_PLACEHOLDER} placeholder(s) in "
                        "the prompt; put one placeholder where each image goes")


def max_image_pixels(processor) -> int:
    """Most pixels the processor keeps of one image: Qwen2-VL family ``max_pixels`` /
    ``size["longest_edge"]`` (a pixel count), else ``size`` (longest edge squared, or
    height × width), else :data:`DEFAULT_MAX_PIXELS`."""
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    if getattr(ip, "merge_size", None) is not None:  # Qwen2-VL family: pixel counts
        mp = getattr(ip, "max_pixels", None) or size.get("longest_edge")
        if mp:
            return int(mp)
    if "longest_edge" in size:
        return int(size["longest_edge"]) ** 2
    if "height" in size and "width" in size:
        return int(size["height"]) * int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]) ** 2 * 4
    return DEFAULT_MAX_PIXELS


def open_image(path: str | os.PathLike, max_pixels: int):
    """Decode an image as RGB, shrunk (aspect kept) to at most ``max_pixels`` pixels."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            scale = math.sqrt(max_pixels / (w * h))
            target = (max(1, int(w * scale)), max(1, int(h * scale)))
            im.draft("RGB", target)  # JPEG: decode at a reduced scale
            im = im.convert("RGB").resize(target, Image.Resampling.BICUBIC)
        else:
            im = im.convert("RGB")
        return im


def image_messages(example: Example) -> list[dict]:
    """Chat messages of an image example's prompt: optional system turn, then one user
    turn whose content alternates image and text parts in placeholder order."""
    content: list[dict] = []
    parts = example.prompt.split(IMAGE_PLACEHOLDER)
    for i, text in enumerate(parts):
        if i > 0:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    msgs: list[dict] = []
    if example.system:
        msgs.append({"role": "system", "content": [{"type": "text", "text": example.system}]})
    msgs.append({"role": "user", "content": content})
    return msgs


def image_prompt(processor, example: Example) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Prompt ids of an image example (image tokens expanded) and the processor's other
    outputs (image tensors; per-token fields of shape (1, prompt length))."""
    text = processor.apply_chat_template(image_messages(example), add_generation_prompt=True, tokenize=False)
    images = [open_image(p, max_image_pixels(processor)) for p in example.images]
    enc = processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
    ids = [int(t) for t in enc["input_ids"][0]]
    extra = {k: torch.as_tensor(v) for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return ids, extra


def write_image_inputs(tensors: dict[str, torch.Tensor]) -> Path:
    """Write processor tensors to the image cache as ``<sha256>.safetensors``."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in sorted(tensors.items())})
    return _write_addressed(data, ".safetensors")


def tokenize_image_example(processor, example: Example, max_length: int, source: str = "") -> TokenizedExample | None:
    """Tokenize an image example (module docstring) within ``max_length`` tokens.

    Image tokens are never cut: a prompt (image tokens included) that leaves no room
    for one response token drops the example (``None``); otherwise a too-long response
    is cut from the right and the example marked ``truncated``.
    """
    p, extra = image_prompt(processor, example)
    r = response_ids(processor.tokenizer, example.response)
    if len(p) >= max_length:
        return None
    truncated = len(p) + len(r) > max_length
    r = r[: max_length - len(p)]
    return TokenizedExample(input_ids=p + r, labels=[IGNORE_INDEX] * len(p) + r, prompt_length=len(p),
                            source=source, example=example, truncated=truncated,
                            image_inputs=str(write_image_inputs(extra)))


def load_image_inputs(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of one ``image_inputs`` file (safetensors, no pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; parts whose other dims differ are zero-padded to the
    largest (Idefics3: images per example; an all-zero image is padding to the model)."""
    if len({tuple(t.shape[1:]) for t in parts}) > 1:
        shape = [max(t.shape[d] for t in parts) for d in range(1, parts[0].dim())]
        padded = []
        for t in parts:
            z = t.new_zeros((t.shape[0], *shape))
            z[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
            padded.append(z)
        parts = padded
    return torch.cat(parts, dim=0)


def image_batch(paths: Sequence[str | None], length: int, offsets: Sequence[int] | None = None
                ) -> dict[str, torch.Tensor]:
    """The image inputs of a batch of ``length`` positions, one ``image_inputs`` path (or
    None for a text example) per row; empty when no row has images.

    Image tensors are concatenated over the rows in order (dim 0). Per-token fields
    (:data:`SEQUENCE_FIELDS`) become (B, length) int64 rows, zero outside each example's
    prompt, which starts at ``offsets[i]`` (0: right padding; left padding passes
    ``length - len(example)``).
    """
    loaded = [load_image_inputs(p) if p else {} for p in paths]
    if not any(loaded):
        return {}
    offsets = list(offsets) if offsets is not None else [0] * len(loaded)
    out: dict[str, torch.Tensor] = {}
    keys = sorted({k for d in loaded for k in d})
    for k in keys:
        if k in SEQUENCE_FIELDS:
            rows = torch.zeros((len(loaded), length), dtype=torch.long)
            for i, d in enumerate(loaded):
                if k in d:
                    v = d[k].reshape(-1)
                    rows[i, offsets[i] : offsets[i] + v.numel()] = v
            out[k] = rows
        else:
            out[k] = _cat_padded([d[k] for d in loaded if k in d])
    return out
