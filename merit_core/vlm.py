"""Vision-language models: which Auto class loads a model directory, its processor, the
trainable / frozen parameter counts, and the tiny random Qwen2.5-VL of the offline demo
and tests (docs/multimodal.md).

A model directory holds a vision-language model when its ``config.json`` has a
``vision_config``; it loads with ``transformers.AutoModelForImageTextToText`` and its
``AutoProcessor`` (image processor + tokenizer + chat template, saved beside the weights).
Text models keep ``AutoModelForCausalLM``.

Qwen2-VL-family processors also hold a video processor, which transformers builds only
with ``torchvision``. Where torchvision is missing (this CPU machine: no wheel for the
CPU torch), :func:`load_processor` builds the same processor class without its video
part (:class:`ImageOnlyQwen2_5_VLProcessor`): images behave identically, videos are
refused. The saved ``processor_config.json`` names the standard class, so the directory
loads with ``AutoProcessor`` wherever torchvision is installed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_QWEN_VL = "tiny-qwen2.5-vl"
"""``model.source`` alias: a random-initialised tiny Qwen2.5-VL (:func:`build_tiny_qwen2_5_vl`)."""
QWEN_VL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Qwen2-VL's vision special tokens, added to a text tokenizer for the tiny model."""
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat template (images as ``<|vision_start|><|image_pad|><|vision_end|>``),
without its default system turn."""
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_vision_language(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir/config.json`` describes a vision-language model (has ``vision_config``)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    return "vision_config" in json.loads(cfg.read_text())


def auto_model_class(model_dir: str | os.PathLike):
    """``AutoModelForImageTextToText`` for a vision-language model dir, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(model_dir) else AutoModelForCausalLM


def _qwen_image_only():
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without its video processor (needs no torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2_5_VLProcessor


def load_processor(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    """The processor saved in ``model_dir`` (``AutoProcessor``), or None for a directory
    without one (a text model). Qwen2-VL-family processors fall back to an image-only
    build where torchvision is missing (module docstring).

    Raises:
        OSError / ValueError: a processor is saved but cannot be loaded.
    """
    d = Path(model_dir)
    if not any((d / f).is_file() for f in _PROCESSOR_FILES):
        return None
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(d, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, OSError, ValueError, TypeError) as e:
        cls = json.loads((d / "processor_config.json").read_text()).get("processor_class", "") \
            if (d / "processor_config.json").is_file() else ""
        if cls not in ("Qwen2_5_VLProcessor", "Qwen2VLProcessor"):
            raise
        log.info("processor of %s without its video part (%s: %s)", d, type(e).__name__, e)
        return _qwen_image_only().from_pretrained(d)


def save_processor(processor, out_dir: str | os.PathLike) -> None:
    """``processor.save_pretrained(out_dir)``, naming the standard class in
    ``processor_config.json`` for an image-only fallback processor."""
    processor.save_pretrained(str(out_dir))
    p = Path(out_dir) / "processor_config.json"
    if p.is_file():
        cfg = json.loads(p.read_text())
        if cfg.get("processor_class") == "ImageOnlyQwen2_5_VLProcessor":
            cfg["processor_class"] = "Qwen2_5_VLProcessor"
            p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def parameter_counts(model: torch.nn.Module, trainable: str | list[str]) -> dict[str, int]:
    """``{"trainable": n, "frozen": m}``: parameter entries (tied ones once) that
    ``model.trainable`` selects (:func:`merit_core.conflict.gradient.trainable_parameters`)
    and the rest."""
    from merit_core.conflict.gradient import trainable_parameters

    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for _, p in trainable_parameters(model, trainable))
    return {"trainable": train, "frozen": total - train}


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, tokenizer, *, seed: int = 0, hidden: int = 32,
                          layers: int = 2, min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 16) -> Path:
    """Save a random-initialised tiny ``Qwen2_5_VLForConditionalGeneration`` with its
    processor to ``out_dir`` (built offline: no hub).

    The processor is Qwen2-VL's image processor with ``min_pixels`` / ``max_pixels``
    (pixel counts: 4–16 patches of 28×28, i.e. 4–16 image tokens after the 2×2 merge)
    and ``tokenizer`` (any chat tokenizer with ``<|im_start|>`` / ``<|im_end|>``, e.g.
    SmolLM2's) with :data:`QWEN_VL_TOKENS` added and :data:`QWEN_VL_TEMPLATE`. The model:
    a vision tower of 2 blocks (hidden ``hidden``) whose merger projects into a 2-layer
    language model of width ``hidden``, tied embeddings, float32.

    Returns:
        ``out_dir`` as a Path.
    """
    import copy

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as ImageProc
    except ImportError:  # older transformers: one class with a PIL path
        from transformers import Qwen2VLImageProcessor as ImageProc

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_VL_TOKENS)})
    tok.chat_template = QWEN_VL_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=True, **special)
    vision = {"depth": 2, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": 2, "out_hidden_size": hidden,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1]}
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True, **special)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = ImageProc(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    processor = _qwen_image_only()(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_VL_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_processor(processor, out)
    tok.save_pretrained(out)
    return out
