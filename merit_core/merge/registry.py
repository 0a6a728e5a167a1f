"""The merge-operator registry: the one place that says which operators exist.

Every operator module declares itself with :func:`register`: its name, whether it works
on task vectors and so needs θ(0) (``needs_base``), its weight policy and its
hyper-parameters (:class:`HyperParam`: name, type, default, valid range) and whether it
is elementwise (then it is applied to blocks of elements, so a large tensor is never held
whole). The merge
(:func:`merit_core.merge.merge_checkpoints`) and the config
(:class:`merit_core.config.MergeConfig`) both ask this registry, so an operator
registered here is reachable from a config with no other change.

Weight policies (how the per-branch weights w_k, summing to 1, are chosen):

- ``"tokens"``: w_k = N_k / Σ_j N_j from the branches' trained token counts (required);
- ``"uniform"``: w_k = 1/K (weights passed in are checked, then ignored);
- ``"given"``: the weights passed in, normalised to sum 1; 1/K when none are passed.

A hyper-parameter name means one thing across the registry (the config has one field
per name), so every operator that declares ``density`` declares the same
:class:`HyperParam`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from merit_core.merge.io import MergeError

WeightPolicy = Literal["tokens", "uniform", "given"]

# Names a hyper-parameter cannot take: merge_checkpoints' own arguments and the other
# fields of MergeConfig.
_RESERVED = {"inputs", "weights", "output", "method", "base", "max_shard_size", "metadata", "name"}


@dataclass(frozen=True)
class HyperParam:
    """One hyper-parameter of an operator: a keyword argument of its per-tensor function.

    ``type`` is ``int`` or ``float``; ``gt``/``ge``/``lt``/``le`` bound the valid range
    (``None``: unbounded on that side); a float must also be finite.
    """

    name: str
    type: type
    default: int | float
    description: str
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def range_text(self) -> str:
        """The valid range in words, e.g. ``"> 0 and ≤ 1"`` (``"any int"`` if unbounded)."""
        bounds = [(">", self.gt), ("≥", self.ge), ("<", self.lt), ("≤", self.le)]
        parts = [f"{op} {v:g}" for op, v in bounds if v is not None]
        return " and ".join(parts) or f"any {self.type.__name__}"

    def check(self, value: Any) -> int | float:
        """``value`` converted to ``type`` when it is a number inside the valid range.

        Raises:
            MergeError: not a number, a float that is not finite, a fractional value
                for an int, or out of range; the message names the hyper-parameter.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeError(f"{self.name} must be a {self.type.__name__}, got {value!r}")
        if not math.isfinite(value) or (self.type is int and value != int(value)):
            kind = "an integer" if self.type is int else "a finite number"
            raise MergeError(f"{self.name} must be {kind}, got {value!r}")
        v = self.type(value)
        inside = ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                  and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))
        if not inside:
            raise MergeError(f"{self.name} must be {self.range_text()}, got {value!r}")
        return v


@dataclass(frozen=True)
class MergeMethod:
    """A registered operator: ``fn(tensors, weights, base, name=..., **hyperparams)``
    merges one tensor (K float32 tensors of one shape, float64 weights w of shape (K,)
    summing to 1, θ(0)'s tensor or ``None``) into one float32 tensor of that shape
    (float64 throughout for float64 checkpoints).

    ``needs_base``: the operator works on task vectors θ_k − θ(0) and requires ``base``.
    ``weights``: the weight policy (module docstring). ``hyperparams``: what ``fn``
    takes as keywords besides ``name`` (the tensor name).
    ``elementwise``: every output element depends only on the same element of the
    inputs. Such an operator is called on flat float64 blocks of a tensor (any length,
    the same elements of every input and θ(0); the input blocks are scratch that it may
    overwrite and return) and gets one more keyword, ``counts``: the K weights before
    normalisation (float64, (K,); all ones under the ``uniform`` policy or when none are
    given), so that it can form Σ_k c_k θ_k and divide by Σ_k c_k once. Its float64 result is rounded once to the checkpoint's dtype. It must let
    NaN/Inf inputs through to its result (they are detected there).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_base: bool = False
    weights: WeightPolicy = "given"
    hyperparams: tuple[HyperParam, ...] = ()
    elementwise: bool = False

    def __call__(self, tensors: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor | None = None,
                 **kw: Any) -> torch.Tensor:
        return self.fn(tensors, weights, base, **kw)

    def settings(self, given: Mapping[str, Any]) -> dict[str, int | float]:
        """This operator's hyper-parameter values: ``given`` ones (checked) or defaults.

        ``given`` may name hyper-parameters of other registered operators (checked,
        then not passed on), as a config does with its fixed ``scale``/``density``/``seed``.

        Raises:
            MergeError: an unknown hyper-parameter name or a value out of range.
        """
        checked = {name: hyperparameter(name).check(v) for name, v in given.items()}
        return {hp.name: checked.get(hp.name, hp.default) for hp in self.hyperparams}


MERGE_METHODS: dict[str, MergeMethod] = {}


def hyperparameters() -> dict[str, HyperParam]:
    """Every hyper-parameter declared by a registered operator, by name (registration order)."""
    return {hp.name: hp for m in MERGE_METHODS.values() for hp in m.hyperparams}


def hyperparameter(name: str) -> HyperParam:
    """The declaration of hyper-parameter ``name``.

    Raises:
        MergeError: no registered operator declares ``name`` (the message lists those that exist).
    """
    known = hyperparameters()
    if name not in known:
        raise MergeError(f"unknown merge hyper-parameter {name!r}; the registered operators take: "
                         f"{', '.join(known) or 'none'}")
    return known[name]


def get_method(name: str) -> MergeMethod:
    """The operator registered as ``name``.

    Raises:
        MergeError: ``name`` is not registered (the message lists the registered names).
    """
    if name not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {name!r}; registered: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]


def register(name: str, *, needs_base: bool = False, weights: WeightPolicy = "given",
             hyperparams: tuple[HyperParam, ...] = (), elementwise: bool = False
             ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator adding a per-tensor operator to :data:`MERGE_METHODS` under ``name``
    (replacing one of that name); the function is returned unchanged. ``elementwise``:
    see :class:`MergeMethod`.

    Raises:
        ValueError: an unknown weight policy, a reserved hyper-parameter name, or a
            hyper-parameter declared differently by another registered operator.
    """
    if weights not in get_args(WeightPolicy):
        raise ValueError(f"merge operator {name!r}: weights must be one of {get_args(WeightPolicy)}, got {weights!r}")
    for hp in hyperparams:
        if hp.name in _RESERVED:
            raise ValueError(f"merge operator {name!r}: hyper-parameter name {hp.name!r} is reserved")
        for other in MERGE_METHODS.values():
            theirs = next((h for h in other.hyperparams if h.name == hp.name), None)
            if other.name != name and theirs is not None and theirs != hp:
                raise ValueError(f"merge operator {name!r}: hyper-parameter {hp.name!r} is declared differently by "
                                 f"operator {other.name!r} ({theirs}); reuse that declaration")

    def deco(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        MERGE_METHODS[name] = MergeMethod(name, fn, needs_base, weights, tuple(hyperparams), elementwise)
        return fn

    return deco
