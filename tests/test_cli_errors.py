"""What a person sees when `merit` fails: a user error is one message naming the culprit,
no traceback (exit code 2 for usage, 1 for a run failure); a bug keeps its traceback
(exit code 1); `merit --debug` shows every traceback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from merit_cli.errors import _WithoutUserTraceback
from merit_cli.main import app
from merit_core.data import DataError
from tests.test_flow import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _merit(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command line in a fresh process (stdout and stderr together)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), MERIT_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "merit_cli.main", *args], cwd=REPO, env=env, timeout=timeout, check=False,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _config_file(tmp_path: Path, model_dir: Path, unknown_key: str | None = None) -> Path:
    """The tiny config as YAML; with ``unknown_key`` ('section.key') set to 1 as well."""
    raw = tiny_config(tmp_path, model_dir).model_dump(mode="json")
    if unknown_key:
        section, key = unknown_key.split(".")
        raw[section][key] = 1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _break_line_2(config: Path) -> Path:
    """Make line 2 of the config's first source not JSON; returns that source file."""
    source = Path(yaml.safe_load(config.read_text())["data"]["sources"][0]["path"])
    lines = source.read_text().splitlines()
    lines[1] = "{not json"
    source.write_text("\n".join(lines) + "\n")
    return source


def test_missing_config_file(tmp_path):
    res = _merit("mixture", str(tmp_path / "nope.yaml"), tmp_path=tmp_path)
    assert res.returncode == 2, res.stdout
    assert res.stdout.strip() == f"error: config file {tmp_path / 'nope.yaml'} does not exist"


def test_malformed_source_line(tmp_path, tiny_model_dir):
    config = _config_file(tmp_path, tiny_model_dir)
    source = _break_line_2(config)
    res = CliRunner().invoke(app, ["mixture", str(config)])
    assert res.exit_code == 1, res.output
    assert f"error: source 'alpha': {source} line 2: malformed JSON" in res.output
    assert "Traceback" not in res.output


def test_unknown_config_key(tmp_path):
    config = _config_file(tmp_path, tmp_path / "model", unknown_key="run.bogus_key")
    res = CliRunner().invoke(app, ["mixture", str(config)])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: {config}: invalid config\n  run.bogus_key: Extra inputs are not permitted"


def test_bad_argument_is_a_usage_error():
    res = CliRunner().invoke(app, ["run"])
    assert res.exit_code == 2 and "Missing argument" in res.output
    assert "Traceback" not in res.output


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    config = _config_file(tmp_path, tmp_path / "model", unknown_key="run.bogus_key")
    res = CliRunner().invoke(app, ["--debug", "mixture", str(config)])
    assert res.exit_code == 2, res.output
    assert "Traceback (most recent call last)" in res.output and "run.bogus_key" in res.output


def test_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    import merit_core.pipeline.base
    import tasks.stages  # noqa: F401 — imported before the patch, so it keeps the real prepare_base

    def boom(cfg, store):
        raise RuntimeError("a bug")

    monkeypatch.setattr(merit_core.pipeline.base, "prepare_base", boom)
    res = CliRunner().invoke(app, ["mixture", str(_config_file(tmp_path, tmp_path / "model"))])
    assert res.exit_code == 1
    assert isinstance(res.exception, RuntimeError)  # not caught: the interpreter prints its traceback
    assert "error:" not in res.output


def test_internal_error_prints_a_plain_traceback(tmp_path):
    """The real entry point: Python's own traceback (no Typer box), exit code 1."""
    code = ("import merit_core.pipeline.base as b, sys\n"
            "def boom(cfg, store): raise RuntimeError('a bug')\n"
            "b.prepare_base = boom\n"
            "from merit_cli.main import app\n"
            f"app(['mixture', {str(_config_file(tmp_path, tmp_path / 'model'))!r}])\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True, check=False, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=120,
                         env={**os.environ, "MERIT_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stdout and res.stdout.rstrip().endswith("RuntimeError: a bug")
    assert "╭" not in res.stdout


def _record(exc: Exception) -> logging.LogRecord:
    """A log record with ``exc`` and its traceback, as Prefect logs a failed task run."""
    with pytest.raises(type(exc)) as raised:
        raise exc
    return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed", None,
                             (raised.type, raised.value, raised.tb))


@pytest.mark.parametrize("exc,shown", [(DataError("alpha.jsonl line 2: malformed JSON"), False),
                                       (RuntimeError("a bug"), True)])
def test_console_formatter_drops_only_user_tracebacks(exc, shown):
    record = _record(exc)
    console = _WithoutUserTraceback(logging.Formatter("%(message)s"))
    assert ("Traceback" in console.format(record)) is shown
    assert record.exc_info is not None  # the API log handler still gets the whole record
    assert "Traceback" in logging.Formatter("%(message)s").format(record)


@pytest.mark.parametrize("debug", [False, True])
def test_run_quiets_prefect_console_tracebacks_unless_debug(tmp_path, monkeypatch, debug):
    import contextlib

    from prefect.logging.handlers import PrefectConsoleHandler

    import flows.merit
    import merit_cli.main

    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles
    for h in consoles:
        monkeypatch.setattr(h, "formatter", h.formatter)  # restored after the test
    monkeypatch.setattr(merit_cli.main, "_exit_on_sigterm", lambda: None)

    def fail(**parameters):
        raise DataError("source 'alpha': a.jsonl line 2: malformed JSON")

    monkeypatch.setattr(flows.merit, "merit", fail)
    monkeypatch.setattr(merit_cli.main, "_prefect_api", lambda: contextlib.nullcontext(None))
    config = _config_file(tmp_path, tmp_path / "model")
    res = CliRunner().invoke(app, [*(["--debug"] if debug else []), "run", str(config)])
    assert res.exit_code == 1 and "error: source 'alpha': a.jsonl line 2: malformed JSON" in res.output
    assert ("Traceback" in res.output) is debug
    assert all(isinstance(h.formatter, _WithoutUserTraceback) for h in consoles) is not debug


def test_run_with_a_malformed_source_line(tmp_path, tiny_model_dir):
    """`merit run` for real (local Prefect server): the task's traceback stays out of the
    console, the last line names the file and line, exit code 1, no retries."""
    config = _config_file(tmp_path, tiny_model_dir)
    source = _break_line_2(config)
    res = _merit("run", str(config), tmp_path=tmp_path, timeout=240)
    assert res.returncode == 1, res.stdout
    assert "Traceback" not in res.stdout, res.stdout
    assert res.stdout.rstrip().splitlines()[-1].startswith(f"error: source 'alpha': {source} line 2: malformed JSON")
    assert "Retry 1/2" not in res.stdout
