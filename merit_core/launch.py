"""Re-export of :func:`merit_core.train.launch.resolve_nproc` for ``flows/merit.py``,
which imports it from here; the launcher itself lives in :mod:`merit_core.train.launch`."""

from merit_core.train.launch import resolve_nproc

__all__ = ["resolve_nproc"]
