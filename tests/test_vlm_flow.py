"""Acceptance (issue 16): the whole `merit` flow on a tiny random Qwen2.5-VL and image
sources of four kinds; the frozen vision tower and projector (model.trainable=lm) come
out of every branch and of the merged model bit-identical to θ(0)."""

from __future__ import annotations

import json

import pytest
import torch
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import load_file

from merit_core.config import MeritConfig
from merit_core.conflict.gradient import _is_vision
from tests.vlm_helpers import tiny_vlm_dir, write_image_sources


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _weights(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_flow_on_tiny_qwen2_5_vl_keeps_frozen_weights(harness, tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))
    from transformers import AutoModelForImageTextToText

    from flows.merit import merit
    from merit_core.vlm import load_processor

    base_dir = tiny_vlm_dir(tmp_path / "tiny-vlm", tiny_tokenizer)
    specs = write_image_sources(tmp_path / "data", n=24)
    cfg = MeritConfig.model_validate({
        "run": {"name": "vlm"},
        "model": {"source": str(base_dir), "trainable": "lm"},
        "data": {"sources": specs, "max_length": 128, "heldout_min": 4, "heldout_fraction": 0.2},
        "conflict": {"calibration_size": 8, "sketch": "countsketch", "sketch_dim": 256, "batch_size": 8},
        "split": {"r": 1},
        "train": {"learning_rate": 1e-2, "batch_size": 8, "epochs": 1, "save_steps": 50, "logging_steps": 1},
        "eval": {"batch_size": 8, "max_examples_per_source": 4, "max_new_tokens": 3},
        "baselines": {"joint": False, "random_split": False},
        "store": {"uri": str(tmp_path / "store")},
    })
    report = merit(config=cfg)

    store = tmp_path / "store"
    sources = [s["name"] for s in specs]
    assert sorted(s for g in report["partition"]["groups"] for s in g) == sorted(sources)
    assert [r["source"] for r in report["metrics"]["merit"]["rows"]] == sources
    for row in report["metrics"]["merit"]["rows"]:
        assert row["loss"] is not None and row["exact_match"] is not None

    theta0 = _weights(base_dir)
    frozen = [n for n in theta0 if _is_vision(n)]
    trained = [n for n in theta0 if not _is_vision(n)]
    assert frozen and trained
    branch_dirs = [store / b["key"] for b in report["branches"]["merit"]]
    merged_dir = store / report["models"]["merit"]["key"]
    assert len(branch_dirs) == 2
    for d in [*branch_dirs, merged_dir]:
        w = _weights(d)
        for n in frozen:
            assert torch.equal(w[n], theta0[n]), f"{d.name}: frozen tensor {n} changed"
        assert any(not torch.equal(w[n], theta0[n]) for n in trained), f"{d.name}: the language model did not train"

    # trainable / frozen counts: from the model, shown in the report
    b0 = report["branches"]["merit"][0]
    n_frozen = sum(theta0[n].numel() for n in frozen)
    assert b0["frozen_parameters"] == n_frozen
    model = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert b0["trainable_parameters"] + b0["frozen_parameters"] == model.num_parameters()
    md = (store / "runs" / report["run_id"] / "report" / "report.md").read_text()
    assert f"{b0['frozen_parameters']:,} frozen at θ(0)" in md

    # the merged model loads with from_pretrained together with its saved processor
    processor = load_processor(merged_dir)
    assert processor is not None and type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert json.loads((merged_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    # image placeholder tokens never carry loss in the stored training splits
    image_id = model.config.image_token_id
    from merit_core.refs import read_examples

    stored = list((store / "data").rglob("train.jsonl"))
    assert len(stored) == len(sources)
    for f in (store / "data").rglob("train.jsonl"):
        for e in read_examples(f):
            assert all(lab == -100 for tok, lab in zip(e.input_ids, e.labels) if tok == image_id)
            assert e.image_inputs and (f.parent / e.image_inputs).is_file()
