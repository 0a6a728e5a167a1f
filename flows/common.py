"""What every flow does before its first stage: the run's config (published as the
``merit-config`` artifact), its stage timer, and the flow-run names built from the config."""

import logging
from collections.abc import Mapping
from typing import Any

import yaml
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from merit_core.config import ChosenConfig, MeritConfig, choose_config
from merit_core.pipeline import layout
from merit_core.pipeline.study import stage_timer as _stage_timer
from merit_core.refs import StageTiming
from merit_core.train import check_train_setup, resolve_nproc
from tasks.artifacts import tracked  # noqa: F401 — for the flows: a progress bar over a stage's loop

BRANCH_RUN_NAME = "{run_id}-{label}-branch-{index}"
"""Flow-run name of one branch (``merit-quick-1a2b3c4d-merit-branch-0``), from its parameters."""


def resolve_config(config_path: str | None, overrides: list[str] | None,
                   config: MeritConfig | None) -> tuple[MeritConfig, str]:
    """The run's config (:func:`merit_core.config.choose_config`: ``config_path`` wins over
    the ``config`` form; ``overrides`` on top) and where it came from (``configs/quick.yaml + overrides [...]`` or ``the config form``).

    Logs which config is used, and a warning when a filled-in config form is ignored;
    publishes the config as the ``merit-config`` markdown artifact (YAML). When branches
    train on this machine, settings it cannot train with fail here
    (:func:`merit_core.train.check_train_setup`), before any stage runs.

    Raises:
        merit_core.config.ConfigError: the file, the form or an override is invalid (names
            the field), or the config has no data sources.
        merit_core.train.TrainSetupError: this machine cannot train with the settings.
    """
    chosen = choose_config(config, config_path, overrides)
    log = get_run_logger()
    if chosen.form_ignored:
        log.warning("config form ignored: config_path is set (%s)", config_path)
    log.info("config: %s (%d sources)", chosen.source, len(chosen.config.data.sources))
    publish_config(chosen)
    config = chosen.config
    if config.run.branch_execution != "deployment":  # branches train here: check now, not after the gradients
        check_train_setup(config.train, resolve_nproc(config.train.nproc_per_node))
    return config, chosen.source


def publish_config(chosen: ChosenConfig) -> None:
    """The config as the flow run's ``merit-config`` markdown artifact: where it came from
    and the whole resolved config as YAML (it holds no credentials: MeritConfig refuses them)."""
    text = yaml.safe_dump(chosen.config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    create_markdown_artifact(key="merit-config", markdown=f"Config: {chosen.source}\n\n```yaml\n{text}```\n",
                             description=f"The config of this run: {chosen.source}")


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """The current flow or task run's logger; the logger ``fallback`` outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)


def run_id(name: str) -> str:
    """``<name>-<first 8 characters of this flow run's id>`` (``local`` outside a flow run)."""
    return layout.run_id(name, flow_run.get_id())


def study_id(config: MeritConfig) -> str:
    """:func:`merit_core.pipeline.layout.study_id` of this flow run."""
    return layout.study_id(config.study.id, config.run.name, flow_run.get_id())


def named_config(parameters: Mapping[str, Any]) -> MeritConfig:
    """The config that a flow run's ``parameters`` (``config_path``, ``overrides``,
    ``config``) select, for naming the run: :func:`choose_config`, or the MeritConfig
    defaults when that fails (the run then fails on the same error as it starts)."""
    try:
        return choose_config(parameters.get("config"), parameters.get("config_path"),
                             parameters.get("overrides")).config
    except (ValueError, TypeError, OSError):  # ConfigError is a ValueError
        return MeritConfig()


def merit_run_name() -> str:
    """Flow-run name of ``merit``: the run id its store keys use (``merit-quick-1a2b3c4d``)."""
    return run_id(named_config(flow_run.parameters).run.name)


def study_run_name() -> str:
    """Flow-run name of ``merit-study``: its study id (``merit-quick-study-1a2b3c4d`` or ``study.id``)."""
    return study_id(named_config(flow_run.parameters))


def stage_timer(timings: list[StageTiming]):
    """:func:`merit_core.pipeline.study.stage_timer` logging to the flow run's logger."""
    return _stage_timer(timings, get_run_logger())
