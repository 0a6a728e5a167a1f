"""An S3 endpoint that accepts connections but never answers fails fast, with a message
naming the endpoint and the limits, and the limits are settings (issue 15, point 8).

The endpoint is a real TCP socket on 127.0.0.1 that accepts every connection and never
writes a byte; botocore's own timeouts and retries (store.connect_timeout_s,
store.read_timeout_s, store.max_attempts) decide when the store gives up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from merit_core.config import StoreConfig
from merit_core.store import StoreUnreachableError, open_store


class SilentEndpoint:
    """Accepts TCP connections on a free loopback port and never answers; counts them."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


@pytest.fixture()
def silent(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    endpoint = SilentEndpoint()
    yield endpoint
    endpoint.close()


def test_default_limits_fail_within_30_s_naming_the_endpoint(silent, tmp_path):
    store = open_store(StoreConfig(uri="s3://bucket/prefix", endpoint_url=silent.url, addressing_style="path"),
                       cache_dir=tmp_path / "cache")
    t0 = time.perf_counter()
    with pytest.raises(StoreUnreachableError) as err:
        store.is_complete("models/abc")
    wall = time.perf_counter() - t0
    print(f"silent endpoint, default limits: failed after {wall:.1f} s, {len(silent.accepted)} connections")
    assert wall < 30, f"took {wall:.1f} s"
    msg = str(err.value)
    assert silent.url in msg and "did not answer" in msg and "read_timeout=8 s" in msg and "3 attempts" in msg
    assert len(silent.accepted) == 3  # botocore's standard retries: one new connection per attempt


def test_limits_are_configurable(silent, tmp_path):
    cfg = StoreConfig(uri="s3://bucket/prefix", endpoint_url=silent.url, addressing_style="path",
                      read_timeout_s=1, max_attempts=2)
    store = open_store(cfg, cache_dir=tmp_path / "cache")
    t0 = time.perf_counter()
    with pytest.raises(StoreUnreachableError, match="read_timeout=1 s"):
        store.get_json("runs/x/report/report.json")
    wall = time.perf_counter() - t0
    assert 2 <= wall < 2 + 1 + 3  # 2 attempts × 1 s, ≤ 1 s backoff, slack for a loaded machine
    assert len(silent.accepted) == 2


def test_merit_mixture_fails_fast_with_one_message(silent, tmp_path, tiny_model_dir):
    """`merit mixture` against the silent endpoint: exit code 1, one line naming the
    endpoint, no traceback (subprocess: the real command)."""
    from tests.test_flow import tiny_config

    cfg = tiny_config(tmp_path, tiny_model_dir).model_dump(mode="json")
    cfg["store"] = {"uri": "s3://bucket/prefix", "endpoint_url": silent.url, "addressing_style": "path",
                    "read_timeout_s": 1, "max_attempts": 2}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "merit_cli.main", "mixture", str(path)], check=False,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MERIT_CACHE_DIR": str(tmp_path / "c")})
    wall = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"error: S3 endpoint {silent.url} did not answer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert wall < 30
