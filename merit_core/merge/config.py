"""The ``merge`` section of :class:`merit_core.config.MeritConfig`, built from the registry.

The defaults, valid ranges and descriptions of the hyper-parameter fields are those the
operators declare in :mod:`merit_core.merge.registry`, and ``method`` is checked against
the registered names, so an operator added with :func:`merit_core.merge.register` (and
its hyper-parameters) is reachable from a config with no other change.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merit_core.merge import registry
from merit_core.merge.io import MergeError


def _hyperparameter(name: str) -> Any:
    """A MergeConfig field with the registry's default, valid range and description."""
    hp = registry.hyperparameter(name)
    return Field(hp.default, gt=hp.gt, ge=hp.ge, lt=hp.lt, le=hp.le, allow_inf_nan=False if hp.type is float else None,
                 description=f"{hp.description} ({hp.range_text()}).")


class MergeConfig(BaseModel):
    """The one-shot merge (spec step 5): ``method`` and hyper-parameters as registered in
    :mod:`merit_core.merge.registry`; keys for hyper-parameters of operators added with
    :func:`merit_core.merge.register` are accepted too, any other key is refused."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str = Field("token_weighted", description="A registered merge operator: token_weighted, uniform, "
                        "task_arithmetic, ties, dare, or one added with merit_core.merge.register.")
    scale: float = _hyperparameter("scale")
    density: float = _hyperparameter("density")
    seed: int = _hyperparameter("seed")
    max_shard_size: str = Field("2GB", description="Largest output shard, e.g. '2GB'.")

    @field_validator("method")
    @classmethod
    def _registered_method(cls, v: str) -> str:
        return registry.get_method(v).name  # refuses an unregistered name, listing the registered ones

    @model_validator(mode="after")
    def _registered_hyperparameters(self) -> MergeConfig:
        for name, value in (self.model_extra or {}).items():
            try:
                self.model_extra[name] = registry.hyperparameter(name).check(value)
            except MergeError as e:
                raise ValueError(f"merge.{name}: {e}") from None
        return self
