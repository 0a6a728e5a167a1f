"""flows.infra: the work pool and image named in the parent's error for a crashed branch
(unit tests with the Prefect client faked; the real case is tests/test_docker.py)."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import uuid4

from flows import infra

TEMPLATE = {"variables": {"properties": {"image": {"default": "merit-cpu:latest"}, "network_mode": {"default": "host"},
                                         "env": {"type": "object"}}}}


class FakeClient:
    def __init__(self, deployment_vars: dict):
        self.deployment_vars = deployment_vars

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployment(self, _id):
        return SimpleNamespace(work_pool_name="merit-docker-cpu", job_variables=self.deployment_vars)

    def read_work_pool(self, name):
        assert name == "merit-docker-cpu"
        return SimpleNamespace(base_job_template=TEMPLATE)


def _run(job_variables=None, deployment=True):
    return SimpleNamespace(id=uuid4(), deployment_id=uuid4() if deployment else None, job_variables=job_variables)


def test_pool_defaults_then_deployment_then_run(monkeypatch):
    monkeypatch.setattr(infra, "get_client", lambda sync_client: FakeClient({}))
    assert infra.describe_infrastructure(_run()) == "work pool merit-docker-cpu, image merit-cpu:latest"
    monkeypatch.setattr(infra, "get_client", lambda sync_client: FakeClient({"image": "merit-cpu:abc"}))
    assert infra.describe_infrastructure(_run()) == "work pool merit-docker-cpu, image merit-cpu:abc"
    pool, variables = infra.job_variables_of(_run({"image": "merit-cpu:run"}))
    assert pool == "merit-docker-cpu" and variables == {"image": "merit-cpu:run", "network_mode": "host"}


def test_no_deployment_or_unreadable_api_gives_no_hint(monkeypatch):
    assert infra.describe_infrastructure(_run(deployment=False)) == ""

    def unreachable(sync_client):
        raise ConnectionError("API down")

    monkeypatch.setattr(infra, "get_client", unreachable)
    assert infra.describe_infrastructure(_run()) == ""
