"""Markdown from the Jinja2 templates in ``merit_core/report/templates/``.

Templates lay out the prose and the tables; the Python callers hand them plain numbers
and these filters format them:

- ``fmt(x, spec)``: ``format(x, spec)`` (e.g. ``".1%"``, ``"+.3f"``, ``".3g"``);
- ``num(x, digits=3)``: fixed-point, "–" for None or NaN;
- ``pm(stats, digits=3)``: "mean ± std" of a ``{"values", "mean", "std"}`` dict
  (:func:`merit_core.study.summarise_study`), the mean alone for one value, "–" for None;
- ``pm_pair((mean, std), digits=3)``: "mean ± std", the mean alone when std is NaN.

Whitespace: ``trim_blocks`` and ``lstrip_blocks`` are on, so a line holding only a block
tag leaves no trace; a block tag that ends a line of text needs ``+%}`` to keep the
newline. Undefined names raise (``StrictUndefined``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache
from typing import Any

import jinja2


def num(x: float | None, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals; "–" for None or NaN."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pm(stats: dict | None, digits: int = 3) -> str:
    """"mean ± std" of a ``{"values", "mean", "std"}`` dict; the mean alone for fewer than
    two values; "–" for None or an empty dict."""
    if not stats:
        return "–"
    if len(stats["values"]) < 2:
        return num(stats["mean"], digits)
    return f"{num(stats['mean'], digits)} ± {num(stats['std'], digits)}"


def pm_pair(mean_std: tuple[float, float], digits: int = 3) -> str:
    """"mean ± std" of a (mean, std) pair; the mean alone when std is NaN."""
    mean, std = mean_std
    return num(mean, digits) if math.isnan(std) else f"{num(mean, digits)} ± {num(std, digits)}"


@cache
def environment() -> jinja2.Environment:
    """The reports' Jinja2 environment (templates shipped as package data)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("merit_core.report", "templates"),
        autoescape=False,  # markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(fmt=format, num=num, pm=pm, pm_pair=pm_pair)
    return env


def render(template: str, **context: Any) -> str:
    """Render ``templates/<template>`` with ``context``.

    Raises:
        jinja2.TemplateNotFound: no such template.
        jinja2.UndefinedError: the template uses a name ``context`` does not give.
    """
    return environment().get_template(template).render(**context)


def macro(name: str, template: str = "tables.md.j2") -> Any:
    """The macro ``name`` of ``template``, callable from Python (returns markdown text)."""
    return getattr(environment().get_template(template).module, name)


_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<src>[^)\s:]+)\)")
"""A markdown image whose target is a relative path (no scheme, no spaces)."""


def link_images(md: str, resolve: Callable[[str], str]) -> str:
    """``md`` with the target of every image given by a relative path (``![alt](x.png)``)
    replaced by ``resolve(path)``; absolute URLs and everything else are kept."""
    return _IMAGE.sub(lambda m: f"![{m['alt']}]({resolve(m['src'])})", md)
