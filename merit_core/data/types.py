"""Plain data types shared by the data, conflict, training and evaluation modules."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100
"""Label value for tokens that carry no loss (prompt, padding); PyTorch's CE default."""


@dataclass(frozen=True)
class Example:
    """One instruction example of a data source, before tokenization.

    Attributes:
        prompt: the user turn (instruction + input), plain text.
        response: the reference answer (the assistant turn), plain text, non-empty.
        options: multiple-choice options (BIG-bench ``target_scores`` keys), or None.
        correct: index into ``options`` of the (first) correct option, or None.
        system: optional system prompt.
        images: absolute paths of the example's image files, in the order of the
            :data:`merit_core.data.images.IMAGE_PLACEHOLDER` markers in ``prompt``
            (empty for a text example; docs/multimodal.md).
    """

    prompt: str
    response: str
    options: tuple[str, ...] | None = None
    correct: int | None = None
    system: str | None = None
    images: tuple[str, ...] = ()


@dataclass
class TokenizedExample:
    """One example as token ids with its loss mask.

    Attributes:
        input_ids: prompt ids (chat template, generation prompt) followed by response
            ids (response + end-of-turn token); list of int, length ≤ max_length.
        labels: same length as ``input_ids``; ``IGNORE_INDEX`` (-100) on prompt
            positions, the token id on response positions (loss on response only).
        prompt_length: number of prompt ids at the start of ``input_ids``.
        source: name of the data source the example came from.
        example: the untokenized example (kept for generation / multiple choice eval).
        truncated: True when the prompt or response was cut to fit ``max_length``.
        image_inputs: for an image example, the safetensors file holding the processor's
            image tensors (``pixel_values``, ``image_grid_thw``, ...; and per-prompt-token
            fields such as ``mm_token_type_ids``, shape (1, prompt_length)); a path
            relative to the stored source directory once in the store. None for text.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    source: str = ""
    example: Example | None = None
    truncated: bool = False
    image_inputs: str | None = None

    @property
    def n_loss_tokens(self) -> int:
        """Number of positions that carry loss (labels != -100), an int ≥ 1."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class SourceStats:
    """Counts for one source after tokenization (all int)."""

    examples: int = 0
    train_examples: int = 0
    heldout_examples: int = 0
    calibration_examples: int = 0
    loss_tokens: int = 0  # loss-bearing tokens of the training split
    truncated: int = 0
    dropped: int = 0
    extra: dict = field(default_factory=dict)
