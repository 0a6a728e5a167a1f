"""Issue 15, points 2, 4, 10 and 11: nothing wrong is used silently, and bad input is
refused with one message naming the culprit (docs/reliability.md, "Refusals and clear
errors"). Real components throughout: the `merit` command (typer's CliRunner), a local
store, the tiny model and tokenizer, transformers' own remote-code loading."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merit_cli.main import app
from merit_core.config import DataConfig, SourceSpec
from merit_core.data import DataError, resolve_mixture
from merit_core.data.mixture import load_examples
from merit_core.evaluate import evaluate_model
from merit_core.store import CorruptArtifactError, LocalStore
from merit_core.store.manifest import write_manifest
from tests.conftest import build_tiny_llama
from tests.helpers import synthetic_examples, tokenize_all
from tests.test_flow import tiny_config


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERIT_CACHE_DIR", str(tmp_path / "cache"))


def _config_file(tmp_path: Path, model_dir: Path, **over) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, model_dir, **over).model_dump(mode="json")))
    return path


def _eval(model_dir: Path, config: Path):
    return CliRunner().invoke(app, ["eval", str(model_dir), str(config)])


def _committed_copy(src: Path, dest: Path) -> Path:
    """A copy of a model directory with a manifest, as merit commits one."""
    shutil.copytree(src, dest)
    write_manifest(dest, {"kind": "merged"})
    return dest


# -- point 2: `merit eval DIR` verifies the directory against its manifest -------------------


def test_eval_refuses_weights_that_no_longer_match_the_manifest(tmp_path, tiny_model_dir):
    config = _config_file(tmp_path, tiny_model_dir)
    model = _committed_copy(tiny_model_dir, tmp_path / "merged")
    good = _eval(model, config)
    assert good.exit_code == 0, good.output
    assert "| **mean** |" in good.output

    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the last tensor: same size, other weights
    weights.write_bytes(bytes(raw))
    res = _eval(model, config)
    assert res.exit_code == 1, res.output
    assert f"error: model directory {model} failed verification" in res.output
    assert "model.safetensors does not match its sha256" in res.output
    assert "Traceback" not in res.output and "| **mean** |" not in res.output


# -- point 10: clear errors naming the culprit -----------------------------------------------


def test_eval_refuses_a_file_and_a_directory_that_is_no_model(tmp_path, tiny_model_dir):
    config = _config_file(tmp_path, tiny_model_dir)
    res = _eval(config, config)  # a file
    assert res.exit_code == 1 and f"error: {config} is a file, not a model directory" in res.output, res.output
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    res = _eval(empty, config)
    assert res.exit_code == 1, res.output
    assert f"error: {empty} is not a model directory: it has no config.json (it holds ['notes.txt'])" in res.output
    res = _eval(tmp_path / "missing", config)
    assert res.exit_code == 1 and "does not exist" in res.output, res.output
    assert "Traceback" not in res.output


def test_eval_refuses_a_garbled_manifest_naming_the_file(tmp_path, tiny_model_dir):
    config = _config_file(tmp_path, tiny_model_dir)
    model = _committed_copy(tiny_model_dir, tmp_path / "merged")
    (model / "manifest.json").write_text('{"files": {"model.safetensors": ')
    res = _eval(model, config)
    assert res.exit_code == 1, res.output
    assert f"{model / 'manifest.json'}: unreadable manifest, not valid JSON" in res.output
    assert "Traceback" not in res.output


def test_store_refuses_a_garbled_manifest_naming_the_file(tmp_path, tiny_model_dir):
    store = LocalStore(tmp_path / "store")
    store.commit_dir("models/abc", tiny_model_dir)
    manifest = store.root / "models/abc/manifest.json"
    manifest.write_text("not json at all")
    with pytest.raises(CorruptArtifactError, match=f"{manifest}: unreadable manifest"):
        store.fetch_dir("models/abc")
    manifest.write_text(json.dumps({"files": {"config.json": {"size": "12"}}}))
    with pytest.raises(CorruptArtifactError, match="entry 'config.json' needs an integer 'size'"):
        store.fetch_dir("models/abc")


def test_eval_refuses_a_tokenizer_larger_than_the_embedding(tmp_path, tiny_model_dir, tiny_tokenizer):
    config = _config_file(tmp_path, tiny_model_dir)
    small = tmp_path / "small-vocab"
    rows = len(tiny_tokenizer) - 100
    build_tiny_llama(rows).save_pretrained(small)
    tiny_tokenizer.save_pretrained(small)
    res = _eval(small, config)
    assert res.exit_code == 1, res.output
    assert (f"error: model directory {small}: its tokenizer has {len(tiny_tokenizer)} tokens but the model's "
            f"embedding has only {rows} rows") in res.output
    assert "IndexError" not in res.output and "Traceback" not in res.output


def _jsonl(path: Path, lines: list[str]) -> SourceSpec:
    path.write_text("\n".join(lines) + "\n")
    return SourceSpec(name="s", kind="jsonl", path=str(path))


def test_lone_surrogate_names_file_line_and_field(tmp_path):
    ok = json.dumps({"prompt": "fine", "response": "yes"})
    bad = '{"prompt": "broken \\ud800 text", "response": "yes"}'  # valid JSON, not valid Unicode
    spec = _jsonl(tmp_path / "s.jsonl", [ok, ok, bad])
    with pytest.raises(DataError) as e:
        load_examples(spec)
    assert str(e.value) == (f"source 's': {tmp_path / 's.jsonl'} line 3: field 'prompt' is not valid Unicode "
                            "text: a lone surrogate '\\ud800' at character 7")
    chat = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}'
    spec = SourceSpec(name="c", kind="jsonl", path=str(_jsonl(tmp_path / "c.jsonl", [chat]).path),
                      messages_field="messages")
    with pytest.raises(DataError, match=r"c.jsonl line 1: field 'messages\[1\].content' is not valid Unicode"):
        load_examples(spec)


def test_null_prompt_is_refused_naming_file_line_and_field(tmp_path):
    ok = json.dumps({"prompt": "fine", "response": "yes"})
    spec = _jsonl(tmp_path / "s.jsonl", [ok, "", json.dumps({"prompt": None, "response": "yes"})])
    with pytest.raises(DataError) as e:
        load_examples(spec)
    assert str(e.value) == f"source 's': {tmp_path / 's.jsonl'} line 3: field 'prompt' is null; it must be text"


def test_nan_loss_is_warned_and_marked_in_the_report(tiny_tokenizer, caplog):
    from merit_core.report import metrics_markdown

    model = build_tiny_llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every logit NaN
    heldout = {"good": tokenize_all(tiny_tokenizer, synthetic_examples("good", 4, 0), "good"),
               "poisoned": tokenize_all(tiny_tokenizer, synthetic_examples("poisoned", 4, 1), "poisoned")}
    with caplog.at_level(logging.WARNING, logger="merit"):
        table = evaluate_model(model, tiny_tokenizer, heldout, generate=False, name="merged")
    assert all(math.isnan(r.loss) for r in table.rows)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("non-finite held-out loss" in m and "'poisoned'" in m for m in warned), warned
    assert table.row("poisoned").warnings and "'poisoned'" in table.row("poisoned").warnings[0]
    assert "**Warning** (merged): non-finite held-out loss (nan) on source 'poisoned'" in table.to_markdown()
    report = metrics_markdown({"merged": table.model_dump()})
    assert "**Warning** (merged): non-finite held-out loss (nan) on source 'poisoned'" in report


# -- point 4: the same data under two source names ---------------------------------------------


def _records(n: int, answer: str = "The answer is {}.") -> list[dict]:
    return [{"prompt": f"Add {i} and {i + 1}.", "response": answer.format(2 * i + 1)} for i in range(n)]


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _assert_no_heldout_in_any_train_split(mixture) -> None:
    held = {e.example.prompt for s in mixture.sources.values() for e in s.heldout}
    trained = {e.example.prompt for s in mixture.sources.values() for e in s.train}
    assert not held & trained, sorted(held & trained)[:5]


def test_same_data_under_two_names_is_refused(tmp_path, tiny_tokenizer):
    path = _write(tmp_path / "a.jsonl", _records(40))
    cfg = DataConfig(sources=[SourceSpec(name="a", kind="jsonl", path=path),
                              SourceSpec(name="copy_of_a", kind="jsonl", path=path)], max_length=64, heldout_min=8)
    with pytest.raises(DataError) as e:
        resolve_mixture(cfg, tiny_tokenizer, 4)
    assert str(e.value) == ("source 'copy_of_a': all 40 examples are exact duplicates of source(s) ['a'] "
                            "(the same data under two names?); remove one of them")


def test_exact_duplicates_across_sources_are_removed_with_a_warning(tmp_path, tiny_tokenizer, caplog):
    a = _records(40)
    b = a[10:30] + [{"prompt": f"Multiply {i} by 2.", "response": f"{2 * i}"} for i in range(30)]
    cfg = DataConfig(sources=[SourceSpec(name="a", kind="jsonl", path=_write(tmp_path / "a.jsonl", a)),
                              SourceSpec(name="b", kind="jsonl", path=_write(tmp_path / "b.jsonl", b))],
                     max_length=64, heldout_min=8)
    with caplog.at_level(logging.WARNING, logger="merit_core.data.mixture"):
        m = resolve_mixture(cfg, tiny_tokenizer, 4)
    assert "source 'b': removed 20 example(s) that duplicate source 'a' exactly" in caplog.text
    assert m.sources["a"].stats.examples == 40 and m.sources["b"].stats.examples == 30
    assert m.sources["b"].stats.extra["cross_source_duplicates"] == 20
    assert all(e.example.prompt.startswith("Multiply") for s in ("train", "heldout")
               for e in getattr(m.sources["b"], s))
    _assert_no_heldout_in_any_train_split(m)


def test_prompt_held_out_by_one_source_is_not_trained_on_in_another(tmp_path, tiny_tokenizer, caplog):
    """Same prompts, different answers (not exact duplicates): each source's held-out
    prompts leave the other's training split."""
    a, b = _records(40), _records(40, "It is {}.")
    cfg = DataConfig(sources=[SourceSpec(name="a", kind="jsonl", path=_write(tmp_path / "a.jsonl", a)),
                              SourceSpec(name="b", kind="jsonl", path=_write(tmp_path / "b.jsonl", b))],
                     max_length=64, heldout_min=8)
    with caplog.at_level(logging.WARNING, logger="merit_core.data.mixture"):
        m = resolve_mixture(cfg, tiny_tokenizer, 4)
    _assert_no_heldout_in_any_train_split(m)
    held_a = {e.example.prompt for e in m.sources["a"].heldout}
    held_b = {e.example.prompt for e in m.sources["b"].heldout}
    # Each train split lost exactly the prompts the other source holds out (and it did not hold out itself).
    assert len(m.sources["a"].train) == 40 - len(held_a) - len(held_b - held_a)
    assert m.sources["b"].stats.extra["heldout_overlap_removed"] == len(held_a - held_b)
    assert "whose prompt is held out by source 'a'" in caplog.text


# -- point 11: model.trust_remote_code is honoured everywhere ---------------------------------

_CONFIG_PY = '''from transformers import LlamaConfig


class MeritTinyConfig(LlamaConfig):
    model_type = "merit_tiny"
'''
_MODELING_PY = '''from transformers import LlamaForCausalLM

from .configuration_merit_tiny import MeritTinyConfig


class MeritTinyForCausalLM(LlamaForCausalLM):
    config_class = MeritTinyConfig
'''


def _remote_code_model(tmp_path: Path, tokenizer) -> Path:
    """The tiny Llama as a model whose architecture lives in code shipped with it
    (``auto_map``), which transformers loads only with ``trust_remote_code=True``."""
    d = tmp_path / "remote-code-model"
    build_tiny_llama(len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    (d / "configuration_merit_tiny.py").write_text(_CONFIG_PY)
    (d / "modeling_merit_tiny.py").write_text(_MODELING_PY)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="merit_tiny", architectures=["MeritTinyForCausalLM"],
               auto_map={"AutoConfig": "configuration_merit_tiny.MeritTinyConfig",
                         "AutoModelForCausalLM": "modeling_merit_tiny.MeritTinyForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_trust_remote_code_is_honoured_by_training_and_evaluation(tmp_path, tiny_tokenizer):
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.branches import train_branch
    from merit_core.pipeline.evaluate import evaluate_model
    from merit_core.pipeline.mixture import resolve_mixture as resolve_stored_mixture
    from merit_core.refs import ModelRef
    from merit_core.store import open_store

    model_dir = _remote_code_model(tmp_path, tiny_tokenizer)
    cfg = tiny_config(tmp_path, model_dir, model={"trust_remote_code": True},
                      train={"max_steps": 2, "save_steps": 10, "batch_size": 4})
    store = open_store(cfg.store)
    base = prepare_base(cfg, store)
    mixture = resolve_stored_mixture(cfg, store, base)
    ref = train_branch(cfg, store, base, mixture, ["alpha"], "rc-run", "merit", 0)
    assert ref.steps == 2
    branch_dir = store.fetch_dir(ref.key)
    assert json.loads((branch_dir / "config.json").read_text())["model_type"] == "merit_tiny"
    table = evaluate_model(cfg, store, ModelRef(key=ref.key, uri=ref.uri, sha256="-", label="branch"), mixture)
    assert table["rows"][0]["n"] > 0 and math.isfinite(table["mean"]["loss"])
