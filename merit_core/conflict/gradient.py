"""The mean calibration gradient of one source at θ(0) (MERIT spec step 1).

Algorithm 1, step 1 of Choi & Kim (arXiv 2606.01717): for every source t, the mean
SFT gradient g_t at θ(0) over a calibration sample, reduced by a sketcher
(:mod:`merit_core.conflict.sketch`) to a vector of fixed size.

Choices made here (the paper leaves them open):

- loss on response tokens only (labels -100 elsewhere), mean over *all* response
  tokens of all calibration batches of the source (token-weighted), model in eval
  mode (dropout off), gradients accumulated in float32;
- the flattened gradient is the concatenation of ``param.grad.reshape(-1)`` in
  ``model.named_parameters()`` order over the trainable parameters (tied parameters
  once). Every sketch depends on that order: the same model class, trainable subset
  and sketch settings give comparable sketches; change any of them and sketches from
  before are not comparable (put :meth:`~merit_core.conflict.sketch.Sketcher.settings`
  and the trainable names in cache keys).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from merit_core.batching import response_loss_sum
from merit_core.conflict.sketch import FullSketch, Sketcher
from merit_core.precision import bf16_autocast

__all__ = ["VISION_NAME_PARTS", "source_gradient", "trainable_parameters"]

NamedParams = Sequence[tuple[str, torch.nn.Parameter]]

VISION_NAME_PARTS: tuple[str, ...] = (
    "vision*",  # vision_tower, vision_model, vision_embed_tokens (LLaVA, Gemma3, Mllama, Idefics)
    "visual*",  # Qwen2-VL / Qwen2.5-VL `visual` (includes its merger = projector)
    "multi_modal_projector",
    "mm_projector",
    "connector",  # Idefics3 / SmolVLM projector
    "image_newline",  # LLaVA-NeXT
)
"""Glob patterns matched against each dot-separated component of a parameter name;
a parameter with a matching component is excluded by ``trainable="lm"``."""


def _is_vision(name: str) -> bool:
    return any(fnmatch.fnmatchcase(part, pat) for part in name.split(".") for pat in VISION_NAME_PARTS)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def trainable_parameters(
    model: torch.nn.Module, trainable: str | list[str] = "all"
) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the calibration gradient covers (config ``model.trainable``).

    Args:
        model: any ``torch.nn.Module``.
        trainable:
            - ``"all"``: every parameter with ``requires_grad``;
            - ``"lm"``: as ``"all"`` minus the vision tower / multimodal projector
              (a name component matching one of :data:`VISION_NAME_PARTS`);
            - a list of name patterns: every parameter (frozen or not) whose full name
              matches one pattern — a glob (``fnmatch``, case-sensitive, against the
              whole name, e.g. ``"model.layers.*.mlp.*"``) or, with a ``"re:"`` prefix,
              a regular expression searched in the name (``"re:layers\\.[01]\\."``).

    Returns:
        ``(name, parameter)`` pairs in ``model.named_parameters()`` order; a parameter
        shared under several names (tied embeddings) appears once, under its first name.

    Raises:
        ValueError: unknown mode string, empty pattern list, or nothing selected (the
            message names the patterns).
    """
    named = list(model.named_parameters())  # de-duplicates tied parameters
    if isinstance(trainable, str):
        if trainable == "all":
            out = [(n, p) for n, p in named if p.requires_grad]
        elif trainable == "lm":
            out = [(n, p) for n, p in named if p.requires_grad and not _is_vision(n)]
        else:
            raise ValueError(
                f"trainable must be 'all', 'lm' or a list of name patterns, got {trainable!r}"
            )
    else:
        patterns = list(trainable)
        if not patterns:
            raise ValueError("trainable: empty list of name patterns")
        out = [(n, p) for n, p in named if any(_matches(n, pat) for pat in patterns)]
    if not out:
        raise ValueError(
            f"trainable={trainable!r} selects no parameter of {type(model).__name__} "
            f"({len(named)} parameters, e.g. {[n for n, _ in named[:3]]})"
        )
    return out


def source_gradient(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    trainable: str | list[str] = "all",
    sketcher: Sketcher | None = None,
    bf16: bool = False,
) -> np.ndarray:
    """Sketch of the mean SFT gradient of one source at θ(0) (spec step 1, Algorithm 1).

    g = ∇_θ [ Σ_batches Σ_response-tokens CE ] / (number of response tokens), over the
    trainable parameters only (:func:`trainable_parameters`), with the model in eval
    mode (dropout off). Per-batch losses come from
    :func:`merit_core.batching.response_loss_sum` (float32 CE, causal shift, labels
    -100 ignored). Gradients are accumulated in float32 (:func:`_summed_gradients`).
    The model is left as it was (:func:`_gradients_of`): parameter values,
    ``requires_grad`` flags and train/eval modes are restored, and every ``.grad`` is
    ``None`` before and after (existing ``.grad`` values are discarded).

    Args:
        model: causal LM (``model(input_ids=, attention_mask=).logits``) at θ(0).
        batches: dicts of int64 tensors ``input_ids``, ``attention_mask``, ``labels``
            (B, L) as made by :func:`merit_core.batching.batches`.
        trainable: parameter subset, see :func:`trainable_parameters`.
        sketcher: reduces the gradient; ``None`` = :class:`FullSketch` (the full
            flattened gradient, d entries).
        bf16: run the forward/backward passes under bf16 autocast
            (:func:`merit_core.precision.bf16_autocast`; the caller checks device
            support with :func:`merit_core.precision.resolve_bf16`). Gradients still
            accumulate in float32; on the 7-source tiny-Llama test set the cosines
            move by at most 3.4e-4 (tests/test_precision.py).

    Returns:
        float32 array (D,): the sketch of the mean gradient.

    Raises:
        ValueError: the batches carry no response token, or ``trainable`` selects
            nothing.
    """
    sketcher = sketcher or FullSketch()
    params = trainable_parameters(model, trainable)
    with _gradients_of(model, params):
        acc, n_tokens = _summed_gradients(model, params, batches, bf16)
        if n_tokens == 0:
            raise ValueError("source_gradient: the calibration batches carry no response token (all labels -100)")
        return sketcher.sketch(_mean_gradients(params, acc, n_tokens))


@contextmanager
def _gradients_of(model: torch.nn.Module, params: NamedParams) -> Iterator[None]:
    """Within the block: gradients on exactly ``params``, eval mode, every ``.grad``
    None at entry. On exit, every ``.grad`` is None again and the ``requires_grad``
    flags and train/eval modes of all parameters and submodules are restored."""
    selected = {id(p) for _, p in params}
    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_modes = [m.training for m in model.modules()]
    try:
        for p in all_params:
            p.grad = None
            p.requires_grad_(id(p) in selected)
        model.eval()
        yield
    finally:
        for p, flag in zip(all_params, saved_flags):
            p.grad = None
            p.requires_grad_(flag)
        for m, mode in zip(model.modules(), saved_modes):
            m.training = mode


def _summed_gradients(
    model: torch.nn.Module, params: NamedParams, batches: Iterable[dict[str, torch.Tensor]], bf16: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """Backward pass of every batch's summed response-token loss.

    When every parameter of ``params`` is float32, the sum of the gradients over all
    batches accumulates in ``param.grad`` and the returned dict is empty. Otherwise
    (bf16/fp16 models) each batch's mean-loss gradient, times its token count, is
    added into float32 buffers, returned by parameter name (``.grad`` left None), so
    nothing is summed in low precision. Also returns the number of response tokens.
    """
    low_precision = dict(params) if any(p.dtype != torch.float32 for _, p in params) else {}
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in low_precision.items()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    n_tokens = 0
    with torch.enable_grad():
        for batch in batches:
            with bf16_autocast(device, bf16):
                loss_sum, n = response_loss_sum(model, batch)
            if n == 0:
                continue
            n_tokens += n
            if low_precision:
                (loss_sum / n).backward()
                for name, p in low_precision.items():
                    if p.grad is not None:
                        acc[name].add_(p.grad.float(), alpha=float(n))
                        p.grad = None
            else:
                loss_sum.backward()  # float32 .grad accumulates the sum
    return acc, n_tokens


def _mean_gradients(
    params: NamedParams, acc: dict[str, torch.Tensor], n_tokens: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, summed gradient / n_tokens)`` per parameter, float32, one at a time:
    from ``acc`` when it holds the parameter, else ``param.grad``, else zeros (a
    parameter the loss did not reach)."""
    for name, p in params:
        if name in acc:
            g = acc[name]
        elif p.grad is not None:
            g = p.grad.float()
        else:
            g = torch.zeros_like(p, dtype=torch.float32)
        yield name, g / n_tokens
