"""Prefect flows: ``merit`` (deployment ``merit/full``) and ``merit-branch``."""

from flows.merit import merit, merit_branch  # noqa: F401
