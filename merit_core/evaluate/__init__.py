"""Held-out evaluation of one model, per data source (MERIT_SPEC.md step 6).

One module per part: :mod:`.heldout` (:func:`evaluate_model`, :func:`evaluate_dir` and
the loss), :mod:`.generation` (exact match), :mod:`.choice` (multiple choice),
:mod:`.table` (:class:`EvalTable`), :mod:`.inputs` (prompt ids, pad id, device).

Three metrics per source, all batched and computed under ``torch.no_grad`` in eval mode:

- ``loss``: mean answer-token cross-entropy in nats/token, token-weighted within the
  source (sum of response-token losses / number of response tokens), exactly the SFT
  loss of :func:`merit_core.batching.response_loss_sum` (prompt tokens masked, eos of
  the response included).
- ``exact_match``: greedy generation (``do_sample=False``, left-padded batches, stop at
  eos or ``max_new_tokens``) compared with ``example.response`` after SQuAD-style
  normalisation (:func:`normalize_answer`); mean over examples.
- ``mc_accuracy`` / ``mc_accuracy_norm``: for examples with ``options`` and ``correct``,
  each option is scored by the summed log-likelihood of ``response_ids(option)`` (option
  tokens + eos) after the prompt; the prediction is the first option with the highest
  score. ``mc_accuracy_norm`` divides each score by the option's length (UTF-8 bytes of
  the option text by default, as lm-evaluation-harness ``acc_norm``; or tokens).

Prompts are the tokenized example's own prompt ids (``input_ids[:prompt_length]``), i.e.
the ids :func:`merit_core.data.format.prompt_ids` produced for training, so training and
evaluation see identical prompts. This package never imports prefect.
"""

from merit_core.evaluate.choice import has_options, multiple_choice_accuracy, sequence_logprobs
from merit_core.evaluate.generation import exact_match, exact_match_rate, greedy_generate, normalize_answer
from merit_core.evaluate.heldout import evaluate_dir, evaluate_model, source_loss
from merit_core.evaluate.inputs import example_prompt, model_device, pad_token_id
from merit_core.evaluate.table import MEAN_ROW, METRICS, EvalRow, EvalTable, mean_row

__all__ = [
    "MEAN_ROW",
    "METRICS",
    "EvalRow",
    "EvalTable",
    "evaluate_dir",
    "evaluate_model",
    "exact_match",
    "exact_match_rate",
    "example_prompt",
    "greedy_generate",
    "has_options",
    "mean_row",
    "model_device",
    "multiple_choice_accuracy",
    "normalize_answer",
    "pad_token_id",
    "sequence_logprobs",
    "source_loss",
]
