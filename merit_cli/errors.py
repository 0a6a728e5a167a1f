"""How `merit` reports errors: a person's mistake is one message, a bug is a traceback.

- A user error (a config, data, store, model-source, train-setting or merge error, whose
  message names the file, line, field or source) prints ``error: <message>`` and no
  traceback. Exit code 2 for a usage error (bad config or config file, bad arguments,
  unusable seed records), 1 for a run failure (data, store, model, train, merge).
- Any other exception is a bug: the full traceback, exit code 1.
- ``merit --debug ...`` prints the traceback of every error (exit codes unchanged).
- Bad command-line arguments are click's usage errors: click prints them, exit code 2.

Prefect's console log also prints a failed task's traceback while the flow run fails;
:func:`quiet_user_tracebacks` keeps those out of the console for user errors (the API
log handler, and with it the Prefect UI, still gets the full record).
"""

from __future__ import annotations

import copy
import logging
import traceback
from typing import Any

import typer
from typer.core import TyperGroup


def usage_errors() -> tuple[type[BaseException], ...]:
    """Errors in what the person asked for: exit code 2."""
    from merit_cli.sources import SourceError
    from merit_core.config import ConfigError
    from merit_core.pipeline.study import StudyRecordError

    return (ConfigError, StudyRecordError, SourceError)


def run_errors() -> tuple[type[BaseException], ...]:
    """Errors in the inputs or settings that a run met: exit code 1."""
    from merit_core.data import ChatTemplateError, DataError
    from merit_core.merge import MergeError
    from merit_core.models import ModelSourceError
    from merit_core.store import StoreError
    from merit_core.train import TrainSetupError

    return (DataError, ChatTemplateError, StoreError, ModelSourceError, TrainSetupError, MergeError)


def user_error_exit_code(exc: BaseException) -> int | None:
    """2 or 1 for a user error (see the module docstring), None for anything else."""
    if isinstance(exc, usage_errors()):
        return 2
    if isinstance(exc, run_errors()):
        return 1
    return None


class MeritGroup(TyperGroup):
    """The `merit` command group: turns a user error raised by any command into one
    message and an exit code (see the module docstring)."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            code = user_error_exit_code(e)
            if code is None:
                raise  # a bug: the interpreter prints the full traceback, exit code 1
            if ctx.params.get("debug"):
                traceback.print_exc()
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code) from None


class _WithoutUserTraceback(logging.Formatter):
    """Wraps a console handler's formatter: a record whose exception is a user error is
    formatted without its traceback. Formats a copy; the record other handlers see
    (Prefect's API log handler) keeps its ``exc_info``."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[1] is not None and user_error_exit_code(record.exc_info[1]):
            record = copy.copy(record)
            record.exc_info = None
            record.exc_text = None
        return self.inner.format(record)


def quiet_user_tracebacks(ctx: typer.Context) -> None:
    """Keep the tracebacks of user errors out of Prefect's console log (the root
    logger's :class:`~prefect.logging.handlers.PrefectConsoleHandler`) for this
    process, unless the command ``ctx`` runs in was called with ``--debug``. The
    messages stay; only the traceback goes."""
    if ctx.find_root().params.get("debug"):
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutUserTraceback):
            handler.setFormatter(_WithoutUserTraceback(handler.formatter))
