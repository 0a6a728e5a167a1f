"""Which errors are the user's to fix: retrying cannot help them (issue 15, point 9).

A user error is one whose message names the file, line, field, source or endpoint at
fault: a bad config, bad data, a model source that does not exist, settings this machine
cannot train with, a merge that makes no sense, or an S3 endpoint that did not answer
within the configured limits (botocore has already retried it ``store.max_attempts``
times). The Prefect layer retries every other failure (a dropped connection, a worker
that died) and never retries these; the ``merit`` command prints them without a
traceback (merit_cli/errors.py).
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that are user errors (imported lazily: every layer of
    merit_core may raise one, and this module must not import them all at start-up)."""
    from merit_core.config import ConfigError
    from merit_core.data import ChatTemplateError, DataError
    from merit_core.merge import MergeError
    from merit_core.models import ModelSourceError
    from merit_core.pipeline.study import StudyRecordError
    from merit_core.store import StoreUnreachableError
    from merit_core.train import TrainSetupError

    return (ConfigError, DataError, ChatTemplateError, ModelSourceError, TrainSetupError, MergeError,
            StudyRecordError, StoreUnreachableError)


def is_user_error(exc: BaseException | object) -> bool:
    """Whether ``exc`` is (an instance of) a user error: retrying it would fail the same way."""
    return isinstance(exc, user_errors())
