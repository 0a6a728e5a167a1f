"""What every flow does before its first stage: the run's config and its stage timer."""


from prefect import get_run_logger
from prefect.runtime import flow_run

from merit_core.config import MeritConfig, apply_overrides, load_config
from merit_core.pipeline import layout
from merit_core.pipeline.study import stage_timer as _stage_timer
from merit_core.refs import StageTiming
from merit_core.train import check_train_setup, resolve_nproc


def resolve_config(config: MeritConfig, config_path: str | None, overrides: list[str] | None) -> MeritConfig:
    """The run's config: the YAML at ``config_path`` (read when the run starts) if set,
    else ``config``; ``overrides`` (``key.path=value``) applied on top. When branches
    train on this machine, settings it cannot train with fail here
    (:func:`merit_core.train.check_train_setup`), before any stage runs.

    Raises:
        merit_core.config.ConfigError: the file or an override is invalid (names the field).
        merit_core.train.TrainSetupError: this machine cannot train with the settings.
    """
    if config_path:
        config = load_config(config_path, overrides)
        get_run_logger().info("config: %s (%d sources)", config_path, len(config.data.sources))
    elif overrides:
        config = MeritConfig.model_validate(apply_overrides(config.model_dump(mode="json"), overrides))
    if config.run.branch_execution != "deployment":  # branches train here: check now, not after the gradients
        check_train_setup(config.train, resolve_nproc(config.train.nproc_per_node))
    return config


def run_id(name: str) -> str:
    """``<name>-<first 8 characters of this flow run's id>`` (``local`` outside a flow run)."""
    return layout.run_id(name, flow_run.get_id())


def study_id(config: MeritConfig) -> str:
    """:func:`merit_core.pipeline.layout.study_id` of this flow run."""
    return layout.study_id(config.study.id, config.run.name, flow_run.get_id())


def stage_timer(timings: list[StageTiming]):
    """:func:`merit_core.pipeline.study.stage_timer` logging to the flow run's logger."""
    return _stage_timer(timings, get_run_logger())
