"""merit's own log lines in the Prefect run's logs (what the UI shows on a flow run's
Logs tab), in every process that runs merit's flows and tasks.

Prefect sends the records of its run loggers to its API; ``PREFECT_LOGGING_EXTRA_LOGGERS``
would add other loggers, but only where that variable is set before Prefect sets its
logging up — not in a worker's flow-run process, a Docker or Kubernetes job, or a
process pool's child. So importing :mod:`tasks` (which every flow does, and so every
process that runs one) hands the ``merit`` and ``merit_core`` loggers a
:class:`RunLogHandler` here, at INFO: stage lines, branch summaries and the training
progress of :mod:`merit_core.train.progress` (step, loss, learning rate, steps/s)
reach the flow run's logs, and the console through the root logger as before.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

MERIT_LOGGERS = ("merit", "merit_core")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, quiet outside a run: a record logged where there is
    no flow or task run (a CLI stage command, a thread without the run's context) and
    that names none is left to the console, without Prefect's "missing flow run" warning."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "flow_run_id", None) is None and FlowRunContext.get() is None \
                and TaskRunContext.get() is None:
            return
        super().emit(record)


def send_merit_logs_to_prefect(level: int = logging.INFO) -> None:
    """Give each of :data:`MERIT_LOGGERS` a :class:`RunLogHandler` (unless it already has
    an API handler, e.g. from ``PREFECT_LOGGING_EXTRA_LOGGERS``) and ``level`` when it
    has none. Idempotent."""
    for name in MERIT_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in log.handlers):
            log.addHandler(RunLogHandler())
        if log.level == logging.NOTSET:
            log.setLevel(level)
