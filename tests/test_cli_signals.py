"""`merit run` stopped by a signal stops the local Prefect server it started, promptly:
SIGTERM to the `merit` process (a scheduler, `kill PID`) and SIGINT to its whole
process group (a terminal's Ctrl-C, `timeout`). A real CLI process, a real server."""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.test_flow import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _popen_with_sigint(args: list[str], **kw) -> subprocess.Popen:
    """Popen with SIGINT caught in this process while it starts: a caught signal is reset
    to its default in the child at exec, as in a terminal. A suite started in the
    background by a non-interactive shell (`cmd &`) has SIGINT *ignored*, which the child
    would inherit, and Python then never raises KeyboardInterrupt: the test would measure
    the launcher's shell, not merit."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, **kw)
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("target,sig", [("process", signal.SIGTERM), ("group", signal.SIGINT)])
def test_signal_stops_the_run_and_its_server(tmp_path, tiny_model_dir, target, sig):
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"epochs": 100})  # branches train for a while
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), MERIT_CACHE_DIR=str(tmp_path / "cache"))
    proc = _popen_with_sigint([sys.executable, "-m", "merit_cli.main", "run", str(config)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    port, training, seen = None, False, []
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 180
        while not training and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=1):
                line = proc.stdout.readline()
                seen.append(line)
                if m := re.search(r"local Prefect server on http://127\.0\.0\.1:(\d+)", line):
                    port = int(m.group(1))
                training = training or bool(re.search(r"Beginning subflow run '[^']*merit-branch-0'", line))
        assert port is not None, "no local server started:\n" + "".join(seen[-30:])
        assert training, "no branch started training:\n" + "".join(seen[-30:])
        # keep draining the output so that the run never blocks on a full pipe
        threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while not _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _port_open(port), f"temporary server never listened on {port}"
        t0 = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        waited = time.monotonic() - t0
        assert rc != 0  # interrupted, not completed
        assert waited < 60, f"merit took {waited:.0f} s to stop after {sig.name} to the {target}"
        deadline = time.monotonic() + 30
        while _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _port_open(port), f"the local Prefect server still listens on {port} after {sig.name}"
    finally:  # whatever happened, nothing of the run may outlive the test (its server included)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
