"""Test helpers for vision-language models: a tiny random Qwen2.5-VL directory and image
sources of every kind (LLaVA JSONL, Parquet bytes, a saved HF dataset with an Image
column, synthetic), written from the synthetic image tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from merit_core.config import SourceSpec
from merit_core.data.synthetic_images import generate


def tiny_vlm_dir(out: Path, tokenizer) -> Path:
    """A saved tiny random Qwen2.5-VL (hidden 32, 2 + 2 layers) with its processor."""
    from merit_core.vlm import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(out, tokenizer, seed=0)


def _examples(task: str, n: int):
    return generate(SourceSpec(name=task, kind="synthetic_images", task=task, max_examples=n), seed=1)


def write_image_sources(directory: Path, n: int = 24) -> list[dict]:
    """Four image sources of different kinds; returns SourceSpec dicts for a config.

    - ``colours_llava``: LLaVA JSONL (``image`` relative to the file, ``conversations``);
    - ``shapes_parquet``: Parquet with PNG bytes in ``image`` and prompt/response fields;
    - ``digits_hf``: a ``datasets`` dataset with an ``Image`` column, saved to disk;
    - ``spatial``: ``kind: synthetic_images``.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "imgs").mkdir(exist_ok=True)
    with open(directory / "colours.jsonl", "w") as f:
        for i, e in enumerate(_examples("name_colour", n)):
            shutil.copy(e.images[0], directory / "imgs" / f"c{i}.png")
            f.write(json.dumps({"image": f"imgs/c{i}.png", "conversations": [
                {"from": "human", "value": e.prompt}, {"from": "gpt", "value": e.response}]}) + "\n")
    rows = [{"prompt": e.prompt, "response": e.response, "image": Path(e.images[0]).read_bytes()}
            for e in _examples("count_shapes", n)]
    pq.write_table(pa.Table.from_pylist(rows), directory / "shapes.parquet")
    digits = _examples("read_digits", n)
    ds = datasets.Dataset.from_dict(
        {"prompt": [e.prompt for e in digits], "response": [e.response for e in digits],
         "image": [e.images[0] for e in digits]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(directory / "digits_ds"))
    return [
        {"name": "colours_llava", "kind": "jsonl", "path": str(directory / "colours.jsonl"),
         "messages_field": "conversations", "image_field": "image"},
        {"name": "shapes_parquet", "kind": "parquet", "path": str(directory / "shapes.parquet"),
         "image_field": "image"},
        {"name": "digits_hf", "kind": "hf", "dataset": str(directory / "digits_ds"), "image_field": "image"},
        {"name": "spatial", "kind": "synthetic_images", "task": "spatial", "max_examples": n},
    ]


LLAVA_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_dir(out: Path, tokenizer, seed: int = 0) -> Path:
    """A saved tiny random LLaVA (CLIP vision tower of 2 layers on 28×28 pictures -> 4
    image tokens, a 2-layer MLP projector, a 2-layer Llama of width 32) with its
    ``LlavaProcessor`` (CLIP image processor + ``tokenizer`` with ``<image>`` added)."""
    import copy

    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = LLAVA_TEMPLATE
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                       "projection_dim": 32},
        text_config={"model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "tie_word_embeddings": True, **special},
        image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
