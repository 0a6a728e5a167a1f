"""Run and study reports: report.md rendered from the Jinja2 templates in ``templates/``,
report.json with every number, and matplotlib PNGs (:mod:`merit_core.report.plots`).

- :mod:`merit_core.report.run`: one MERIT run (:func:`write_report`);
- :mod:`merit_core.report.study`: a study over seeds (:func:`write_study_report`).
"""

from merit_core.report.run import metrics_markdown, mixture_table, write_report
from merit_core.report.study import MAIN_METRICS, write_study_report

__all__ = ["MAIN_METRICS", "metrics_markdown", "mixture_table", "write_report", "write_study_report"]
