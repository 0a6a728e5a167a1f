"""merit_core.evaluate: per-source loss, exact match and multiple-choice accuracy on a
tiny random Llama, each checked against an independent computation in the test."""

from __future__ import annotations

import math

import pytest
import torch

from merit_core.data.format import prompt_ids, response_ids
from merit_core.data.types import IGNORE_INDEX, Example, TokenizedExample
from merit_core.evaluate import (
    EvalRow,
    EvalTable,
    evaluate_dir,
    evaluate_model,
    exact_match,
    greedy_generate,
    mean_row,
    normalize_answer,
)
from tests.conftest import build_tiny_llama


def tokenize(tokenizer, examples: list[Example], source: str) -> list[TokenizedExample]:
    out = []
    for e in examples:
        p = prompt_ids(tokenizer, e)
        r = response_ids(tokenizer, e.response)
        out.append(TokenizedExample(p + r, [IGNORE_INDEX] * len(p) + r, len(p), source, e))
    return out


PROMPTS = [
    "What is the capital of France?",
    "Add 2 and 3.",
    "The quick brown fox",
    "Translate the sentence: yes no",
    "Choose the best option among A B C D.",
    "Summarise the text. The lazy dog",
]


@pytest.fixture()
def heldout(tiny_tokenizer):
    qa = [Example(p, r) for p, r in zip(PROMPTS, ["Paris", "The answer is 5.", "jumps", "true", "A", "dog"])]
    options = ("yes", "no", "true false", "The quick brown fox")
    mc = [Example(p, options[i % 4], options=options, correct=i % 4) for i, p in enumerate(PROMPTS[:5])]
    return {"qa": tokenize(tiny_tokenizer, qa, "qa"), "mc": tokenize(tiny_tokenizer, mc, "mc")}


@torch.no_grad()
def independent_loss(model, examples: list[TokenizedExample]) -> float:
    """Token-weighted mean of HF's own per-example loss (model(..., labels=...))."""
    total, count = 0.0, 0
    for te in examples:
        out = model(input_ids=torch.tensor([te.input_ids]), labels=torch.tensor([te.labels]))
        n = sum(1 for t in te.labels[1:] if t != IGNORE_INDEX)
        total += float(out.loss) * n
        count += n
    return total / count


@torch.no_grad()
def independent_option_logprob(model, tokenizer, example: Example, option: str) -> tuple[float, int]:
    """Σ log p(option tokens + eos | prompt), one unpadded sequence, manual log_softmax."""
    p = prompt_ids(tokenizer, example)
    c = response_ids(tokenizer, option)
    ids = torch.tensor([p + c])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(p) + j - 1, tok]) for j, tok in enumerate(c)), len(c)


def greedy_loop(model, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Plain argmax decoding, no cache, no padding."""
    ids = list(prompt)
    new = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos:
            break
        new.append(nxt)
        ids.append(nxt)
    return new


@torch.no_grad()
def test_loss_matches_hf_loss(tiny_model, tiny_tokenizer, heldout):
    table = evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=4, generate=False, multiple_choice=False)
    for source, examples in heldout.items():
        row = table.row(source)
        assert row.n == len(examples)
        assert row.n_tokens == sum(te.n_loss_tokens for te in examples)
        assert row.loss == pytest.approx(independent_loss(tiny_model, examples), rel=1e-5)
        assert row.exact_match is None and row.mc_accuracy is None


@pytest.fixture()
def sharp_model(tiny_tokenizer):
    """The tiny Llama with large random matrices (std 0.3): its greedy output varies from
    prompt to prompt (the default init emits only newlines, which normalise to "")."""
    model = build_tiny_llama(len(tiny_tokenizer), seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@torch.no_grad()
def test_exact_match_on_own_greedy_output(sharp_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    right, wrong, texts = [], [], []
    for p in PROMPTS:
        ex = Example(p, "placeholder")
        gen = greedy_loop(sharp_model, prompt_ids(tiny_tokenizer, ex), eos, max_new_tokens=8)
        text = tiny_tokenizer.decode(gen, skip_special_tokens=True)
        texts.append(normalize_answer(text))
        right.append(Example(p, text))
        wrong.append(Example(p, text + " zebra quux"))
    assert len(set(texts)) == len(PROMPTS) and all(texts)  # the reference is not trivial
    heldout = {"right": tokenize(tiny_tokenizer, right, "right"), "wrong": tokenize(tiny_tokenizer, wrong, "wrong")}
    for bs in (1, 4):  # batch 4 mixes prompt lengths: left padding must not change the output
        table = evaluate_model(
            sharp_model, tiny_tokenizer, heldout, batch_size=bs, max_new_tokens=8, multiple_choice=False
        )
        assert table.row("right").exact_match == 1.0
        assert table.row("wrong").exact_match == 0.0
        assert table.mean.exact_match == 0.5


@torch.no_grad()
def test_greedy_generate_stops_at_stop_id(sharp_model, tiny_tokenizer):
    prompts = [prompt_ids(tiny_tokenizer, Example(p, "x")) for p in PROMPTS[:3]]
    full = [greedy_loop(sharp_model, p, eos=-1, max_new_tokens=6) for p in prompts]
    assert greedy_generate(sharp_model, prompts, max_new_tokens=6, pad_token_id=2, stop_ids=[]) == full
    stop = full[0][2]
    cut = greedy_generate(sharp_model, prompts, max_new_tokens=6, pad_token_id=2, stop_ids=[stop])
    assert cut == [g[: g.index(stop)] if stop in g else g for g in full]
    assert len(cut[0]) <= 2


@torch.no_grad()
def test_multiple_choice_matches_independent_scores(tiny_model, tiny_tokenizer, heldout):
    table = evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=3, generate=False)
    assert table.row("qa").mc_accuracy is None and table.row("qa").n_mc == 0
    hits = hits_norm = hits_tok = 0
    for te in heldout["mc"]:
        ex = te.example
        scored = [independent_option_logprob(tiny_model, tiny_tokenizer, ex, o) for o in ex.options]
        sums = [s for s, _ in scored]
        hits += max(range(len(sums)), key=lambda i: (sums[i], -i)) == ex.correct
        per_byte = [s / len(o.encode()) for (s, _), o in zip(scored, ex.options)]
        hits_norm += max(range(len(sums)), key=lambda i: (per_byte[i], -i)) == ex.correct
        per_tok = [s / n for s, n in scored]
        hits_tok += max(range(len(sums)), key=lambda i: (per_tok[i], -i)) == ex.correct
    n = len(heldout["mc"])
    row = table.row("mc")
    assert row.n_mc == n
    assert row.mc_accuracy == pytest.approx(hits / n)
    assert row.mc_accuracy_norm == pytest.approx(hits_norm / n)
    tok = evaluate_model(tiny_model, tiny_tokenizer, {"mc": heldout["mc"]}, generate=False, mc_norm="tokens")
    assert tok.row("mc").mc_accuracy_norm == pytest.approx(hits_tok / n)


@torch.no_grad()
def test_multiple_choice_always_right_when_correct_is_argmax(tiny_model, tiny_tokenizer):
    """Set `correct` to the independently computed best option: accuracy must be 1."""
    options = ("yes", "no", "Paris", "the lazy dog jumps")
    examples = []
    for p in PROMPTS:
        ex = Example(p, options[0], options=options)
        sums = [independent_option_logprob(tiny_model, tiny_tokenizer, ex, o)[0] for o in options]
        best = max(range(len(sums)), key=lambda i: sums[i])
        examples.append(Example(p, options[best], options=options, correct=best))
    table = evaluate_model(tiny_model, tiny_tokenizer, {"s": tokenize(tiny_tokenizer, examples, "s")}, generate=False)
    assert table.row("s").mc_accuracy == 1.0


@torch.no_grad()
def test_padding_invariance(tiny_model, tiny_tokenizer, heldout):
    kw = dict(max_new_tokens=6)
    a = evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=1, **kw)
    b = evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=4, **kw)
    for ra, rb in zip([*a.rows, a.mean], [*b.rows, b.mean]):
        assert ra.source == rb.source and ra.n == rb.n and ra.n_tokens == rb.n_tokens
        assert ra.loss == pytest.approx(rb.loss, abs=1e-5)
        assert ra.exact_match == rb.exact_match
        assert ra.mc_accuracy == rb.mc_accuracy and ra.mc_accuracy_norm == rb.mc_accuracy_norm


def test_restores_training_mode_and_limits_examples(tiny_model, tiny_tokenizer, heldout):
    tiny_model.train()
    table = evaluate_model(tiny_model, tiny_tokenizer, heldout, max_examples_per_source=2, generate=False)
    assert tiny_model.training
    assert [r.n for r in table.rows] == [2, 2]
    assert table.row("qa").loss == pytest.approx(independent_loss(tiny_model.eval(), heldout["qa"][:2]), rel=1e-5)


def test_empty_source_and_errors(tiny_model, tiny_tokenizer, heldout):
    table = evaluate_model(tiny_model, tiny_tokenizer, {"qa": heldout["qa"][:2], "none": []}, generate=False)
    assert table.row("none").n == 0 and table.row("none").loss is None
    assert table.mean.loss == table.row("qa").loss
    with pytest.raises(ValueError, match="no held-out"):
        evaluate_model(tiny_model, tiny_tokenizer, {})
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(tiny_model, tiny_tokenizer, heldout, batch_size=0)
    bad = tokenize(tiny_tokenizer, [Example("Say yes", "yes", options=("yes", "no"), correct=2)], "bad")
    with pytest.raises(ValueError, match="correct=2"):
        evaluate_model(tiny_model, tiny_tokenizer, {"bad": bad}, generate=False)
    with pytest.raises(KeyError, match="nope"):
        table.row("nope")


def test_evaluate_dir_matches_in_memory(tiny_model_dir, tiny_model, tiny_tokenizer, heldout):
    from_dir = evaluate_dir(tiny_model_dir, heldout, device="cpu", generate=False)
    in_mem = evaluate_model(tiny_model, tiny_tokenizer, heldout, generate=False)
    assert from_dir.model == str(tiny_model_dir)
    for ra, rb in zip(from_dir.rows, in_mem.rows):
        assert ra.loss == pytest.approx(rb.loss, rel=1e-6)
        assert ra.mc_accuracy == rb.mc_accuracy


# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Answer is 5.", "answer is 5"),
        ("  Paris!! ", "paris"),
        ("a cat, an owl and the dog", "cat owl and dog"),
        ("Theory", "theory"),  # articles only as whole words
        ("yes\n\tno", "yes no"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_function():
    assert exact_match("The answer: Paris.", "answer paris")
    assert not exact_match("Paris", "London")


def table(model: str, rows: list[tuple]) -> EvalTable:
    rows = [EvalRow(source=s, n=n, loss=loss, exact_match=em, mc_accuracy=mc) for s, n, loss, em, mc in rows]
    return EvalTable.from_rows(rows, model)


def test_mean_row_is_mean_of_rows():
    t = table("m", [("a", 3, 1.0, 0.5, None), ("b", 5, 2.0, 0.0, 0.25), ("c", 2, 4.5, 1.0, 0.75)])
    assert t.mean.source == "mean" and t.mean.n == 10
    assert t.mean.loss == pytest.approx((1.0 + 2.0 + 4.5) / 3)
    assert t.mean.exact_match == pytest.approx(0.5)
    assert t.mean.mc_accuracy == pytest.approx(0.5)  # only where it exists
    assert t.mean.mc_accuracy_norm is None
    assert mean_row(t.rows) == t.mean
    assert t.metrics() == ["loss", "exact_match", "mc_accuracy"]
    md = t.to_markdown()
    assert md.count("\n") == 1 + 3 + 1 and "mc_accuracy_norm" not in md and "| – |" in md
    d = t.model_dump()
    assert EvalTable.model_validate(d) == t
    assert math.isclose(d["mean"]["loss"], 2.5)
