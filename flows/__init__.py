"""Prefect flows: ``merit`` (deployment ``merit/full``), ``merit-branch`` and ``merit-study``."""
