"""Image-instruction sources (issue 16): formats, loss masks, splits, and bad input —
missing / unreadable images, image and placeholder counts that differ, huge images."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from merit_core.config import DataConfig, SourceSpec
from merit_core.data import DataError, load_examples, resolve_mixture
from merit_core.data.images import IMAGE_PLACEHOLDER, image_batch, max_image_pixels, tokenize_image_example
from merit_core.data.types import IGNORE_INDEX, Example
from tests.vlm_helpers import tiny_vlm_dir, write_image_sources


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def processor(tmp_path_factory, tiny_tokenizer):
    from merit_core.vlm import load_processor

    return load_processor(tiny_vlm_dir(tmp_path_factory.mktemp("vlm") / "m", tiny_tokenizer))


def _llava(tmp_path, records: list[dict]):
    path = tmp_path / "src.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return SourceSpec(name="pics", kind="jsonl", path=str(path), messages_field="conversations", image_field="image")


def _record(image, question=f"{IMAGE_PLACEHOLDER}\nWhat colour?", answer="red"):
    return {"image": image, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _png(path, size=(40, 30), colour=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_every_kind_resolves_with_masks_splits_and_counts(tmp_path, processor):
    specs = [SourceSpec.model_validate(s) for s in write_image_sources(tmp_path / "data", n=20)]
    cfg = DataConfig(sources=specs, max_length=128, heldout_min=4, heldout_fraction=0.2)
    mixture = resolve_mixture(cfg, processor.tokenizer, calibration_size=6, processor=processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for name, sd in mixture.sources.items():
        st = sd.stats
        assert st.examples == 20 and st.train_examples + st.heldout_examples == 20 and st.heldout_examples >= 4, name
        assert len(sd.calibration) == 6 and {id(e) for e in sd.calibration} <= {id(e) for e in sd.train}
        train_prompts = {(e.example.prompt, e.example.images) for e in sd.train}
        assert not train_prompts & {(e.example.prompt, e.example.images) for e in sd.heldout}
        for e in sd.train + sd.heldout:
            n_image = sum(t == image_id for t in e.input_ids)
            assert n_image == 4  # a 64×64 picture: 4×4 patches of 14 px, merged 2×2
            assert all(lab == IGNORE_INDEX for lab in e.labels[: e.prompt_length])
            response = processor.tokenizer(e.example.response, add_special_tokens=False)["input_ids"]
            assert e.labels[e.prompt_length :] == [*response, processor.tokenizer.eos_token_id]
        assert sd.stats.loss_tokens == sum(len(e.input_ids) - e.prompt_length for e in sd.train)


def test_missing_image_names_source_line_and_path(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    spec = _llava(tmp_path, [_record("imgs/a.png"), _record("imgs/a.png"), _record("imgs/gone.png")])
    with pytest.raises(DataError) as err:
        load_examples(spec)
    msg = str(err.value)
    assert "source 'pics'" in msg and "line 3" in msg and str(tmp_path / "imgs" / "gone.png") in msg
    assert "does not exist" in msg


def test_unreadable_image_names_source_line_and_path(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image at all")
    spec = _llava(tmp_path, [_record("imgs/broken.png"), _record("imgs/a.png")])
    with pytest.raises(DataError, match=r"source 'pics': .*line 1: image .*broken\.png cannot be read"):
        load_examples(spec)


def test_unreadable_parquet_bytes_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = _png(tmp_path / "a.png").read_bytes()
    rows = [{"prompt": f"{IMAGE_PLACEHOLDER} what?", "response": "x", "image": b}
            for b in (good, good, good[:40])]  # the third is truncated
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    spec = SourceSpec(name="pq", kind="parquet", path=str(tmp_path / "s.parquet"), image_field="image")
    with pytest.raises(DataError, match=r"source 'pq': .*s\.parquet row 3: image .* cannot be read"):
        load_examples(spec)


def test_missing_image_in_hf_dataset_names_the_row(tmp_path):
    import datasets

    _png(tmp_path / "ds_imgs" / "a.png")
    ds = datasets.Dataset.from_dict({"prompt": [f"{IMAGE_PLACEHOLDER} q"] * 2, "response": ["a", "b"],
                                     "image": [str(tmp_path / "ds_imgs" / "a.png"), str(tmp_path / "nope.png")]})
    ds.save_to_disk(str(tmp_path / "ds"))
    spec = SourceSpec(name="hfsrc", kind="hf", dataset=str(tmp_path / "ds"), image_field="image")
    with pytest.raises(DataError, match=r"source 'hfsrc': dataset .* row 1: image .*nope\.png does not exist"):
        load_examples(spec)


@pytest.mark.parametrize(("question", "images", "counts"), [
    (f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}: same colour?", ["imgs/a.png"], "1 image(s) but 2"),
    ("What colour?", ["imgs/a.png"], "1 image(s) but 0"),
    (f"{IMAGE_PLACEHOLDER} which?", ["imgs/a.png", "imgs/a.png"], "2 image(s) but 1"),
])
def test_images_and_placeholders_must_match(tmp_path, question, images, counts):
    _png(tmp_path / "imgs" / "a.png")
    spec = _llava(tmp_path, [_record(images, question=question)])
    with pytest.raises(DataError, match=rf"source 'pics': .*line 1: {re.escape(counts)} <image> placeholder"):
        load_examples(spec)


def test_huge_image_is_bounded_by_the_processors_pixel_limit(tmp_path, processor):
    path = _png(tmp_path / "huge.png", size=(6000, 4500), colour=(10, 120, 200))
    example = Example(prompt=f"{IMAGE_PLACEHOLDER}\nWhat colour?", response="blue", images=(str(path),))
    te = tokenize_image_example(processor, example, max_length=256, source="huge")
    limit = max_image_pixels(processor)
    assert limit == 28 * 28 * 16  # the tiny processor's max_pixels
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_tokens = sum(t == image_id for t in te.input_ids)
    # at most max_pixels / (28·28) merged patches, whatever the input size
    assert 0 < n_tokens <= limit // (28 * 28)
    batch = image_batch([te.image_inputs], len(te.input_ids))
    assert batch["pixel_values"].shape[0] == 4 * n_tokens  # 2×2 patches per image token
    assert int(batch["image_grid_thw"].prod()) == batch["pixel_values"].shape[0]


def test_image_batch_aligns_per_token_fields_with_padding(tmp_path, processor):
    e1 = tokenize_image_example(processor, Example(prompt=f"{IMAGE_PLACEHOLDER} a?", response="x",
                                                   images=(str(_png(tmp_path / "1.png")),)), 128)
    e2 = tokenize_image_example(processor, Example(prompt=f"{IMAGE_PLACEHOLDER} a much longer question?",
                                                   response="y", images=(str(_png(tmp_path / "2.png", (90, 90))),)), 128)
    length = max(len(e1.input_ids), len(e2.input_ids)) + 3
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for offsets in ([0, 0], [length - len(e1.input_ids), length - len(e2.input_ids)]):
        batch = image_batch([e1.image_inputs, None, e2.image_inputs], length, [offsets[0], 0, offsets[1]])
        types = batch["mm_token_type_ids"]
        assert types.shape == (3, length) and int(types[1].sum()) == 0
        for row, e, off in ((0, e1, offsets[0]), (2, e2, offsets[1])):
            expected = torch.zeros(length, dtype=torch.long)
            ids = torch.tensor(e.input_ids[: e.prompt_length])
            expected[off : off + e.prompt_length] = (ids == image_id).long()
            assert torch.equal(types[row], expected)
        grids = batch["image_grid_thw"]
        assert grids.shape == (2, 3) and batch["pixel_values"].shape[0] == int(grids.prod(dim=1).sum())


def test_image_source_needs_a_vision_language_model(tmp_path, tiny_tokenizer):
    _png(tmp_path / "imgs" / "a.png")
    spec = _llava(tmp_path, [_record("imgs/a.png")] * 3)
    with pytest.raises(DataError, match="source 'pics': its examples have images, but θ\\(0\\) has no image processor"):
        resolve_mixture(DataConfig(sources=[spec], heldout_min=1), tiny_tokenizer, calibration_size=2)


def test_vlm_configs_validate_and_synthetic_sources_are_reproducible():
    from pathlib import Path

    from merit_core.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    demo = load_config(root / "vlm-demo.yaml")
    assert demo.model.source == "tiny-qwen2.5-vl" and demo.model.trainable == "lm"
    assert {s.kind for s in demo.data.sources} == {"synthetic_images"} and len(demo.data.sources) == 4
    assert [b.task for b in demo.eval.benchmarks] == ["name_shape"]
    paper = load_config(root / "vlm-qwen2.5-vl-3b.yaml")
    assert (paper.model.trainable, paper.split.r, paper.train.epochs) == ("lm", 3, 1.0)
    assert all(s.image_field for s in paper.data.sources)

    spec = demo.data.sources[0].model_copy(update={"max_examples": 5})
    a, b = load_examples(spec, seed=0), load_examples(spec, seed=0)
    assert [Path(e.images[0]).read_bytes() for e in a] == [Path(e.images[0]).read_bytes() for e in b]
    assert [e.response for e in a] == [e.response for e in b]
    assert [e.images for e in load_examples(spec, seed=1)] != [e.images for e in a]
    with pytest.raises(DataError, match="unknown synthetic image task 'nope'"):
        load_examples(spec.model_copy(update={"task": "nope"}))
