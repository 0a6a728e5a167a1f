"""`merit run` stopped with SIGTERM (a scheduler, `timeout`, `kill`) stops the temporary
Prefect server it started, as Ctrl-C does: a real CLI process, a real server."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.test_flow import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_the_temporary_server(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), MERIT_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "merit_cli.main", "run", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    port, seen = None, []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 180
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1):
                line = proc.stdout.readline()
                seen.append(line)
                if m := re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", line):
                    port = int(m.group(1))
        assert port is not None, "no temporary server started:\n" + "".join(seen[-30:])
        deadline = time.monotonic() + 120
        while not _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _port_open(port), f"temporary server never listened on {port}"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        assert rc != 0  # interrupted, not completed
        deadline = time.monotonic() + 30
        while _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _port_open(port), f"the temporary Prefect server still listens on {port} after SIGTERM"
    finally:  # whatever happened, nothing of the run may outlive the test (its server included)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
