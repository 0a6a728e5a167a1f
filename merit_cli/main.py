"""`merit` command line: run the pipeline, or one stage on existing artifacts.

    merit run CONFIG [--set a.b=c ...]     the whole `merit` flow (Prefect, in-process); again after
                                           a crash it continues the dead run (--resume RUN, --fresh)
    merit gc CONFIG [--dry-run]            abandon dead unfinished runs: delete checkpoints, work dirs
    merit study CONFIG [--seeds N] [--first-seed I]  joint vs MERIT vs random split over seeds (flow `merit-study`)
    merit study-report FOLDER              rebuild a study report from the seed records in FOLDER
    merit mixture CONFIG                   print the resolved mixture
    merit split CONFIG                     source gradients (cached) -> C -> partition
    merit merge OUT IN... --weights ...    merge HF checkpoints
    merit eval MODEL_DIR CONFIG            held-out metrics of one model
    merit sources add CONFIG --name ...    register a source, emit merit.data_source.added

A user error (config, data, store, model source, train settings) prints one message and
no traceback; `merit --debug ...` shows every traceback. Exit codes: 2 usage, 1 run
failure (merit_cli/errors.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

# The embedded Prefect server of a local run must not try to phone home (no network).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# merit's own log lines (stages, branches, training progress) reach the flow run's logs in
# the API/UI through the handler that importing `tasks` attaches (tasks/logs.py), in this
# process and in every worker's.

from merit_cli.errors import MeritGroup, quiet_user_tracebacks
from merit_cli.sources import sources_app

app = typer.Typer(cls=MeritGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MERIT: conflict-aware splitting and merging.")
app.add_typer(sources_app, name="sources")  # merit sources add|list (merit_cli/sources.py)

ConfigArg = Annotated[Path, typer.Argument(help="MeritConfig YAML file, e.g. configs/demo.yaml")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a field: key.path=value (repeatable)")]


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of every error")] = False,
) -> None:
    """MERIT: conflict-aware splitting and merging."""


def _load(config: Path, overrides: list[str] | None):
    """The validated config; a ConfigError names the file and field (exit code 2)."""
    from merit_core.config import load_config

    return load_config(config, overrides or [])


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so a killed `merit run`/`merit study` unwinds like
    Ctrl-C: Prefect marks the flow run crashed and the local server is stopped."""
    import signal

    def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def _prefect_api(timeout: float = 180) -> Iterator[str | None]:
    """A Prefect API for a local run: the configured one (``PREFECT_API_URL``), or else
    ``prefect server start`` on a free loopback port for the length of the command.
    Yields the UI's base URL when the API is a server that outlives the command (the
    configured one), else None.

    The server gets its own session (process group), so a terminal's Ctrl-C or a
    ``kill``/``timeout`` of the whole group reaches only `merit`, which then marks the
    flow run crashed through the still-running server and stops it (Prefect's own
    temporary server would share the group, die first, and leave the run retrying API
    calls for minutes).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield (settings.ui_url or "").rstrip("/") or None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    log = tempfile.NamedTemporaryFile(prefix="merit-prefect-server-", suffix=".log", delete=False)
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect_exe = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect_exe) if prefect_exe.exists() else "prefect", "server", "start",
           "--host", "127.0.0.1", "--port", str(port)]
    typer.echo(f"starting a local Prefect server on {url} (log: {log.name})", err=True)
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the local Prefect server exited with code {server.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"the local Prefect server at {url} was not healthy after {timeout:.0f} s; "
                                   f"see {log.name}")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url  # process-pool branches and torchrun ranks inherit it
        with temporary_settings({PREFECT_API_URL: url}):
            yield None
    finally:
        _drain_prefect_workers()  # send queued logs/events while the server is still up
        os.environ.pop("PREFECT_API_URL", None)
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        typer.echo(f"stopped the local Prefect server on {url}", err=True)


def _drain_prefect_workers(timeout: float = 10) -> None:
    """Flush Prefect's background log and event workers (as ``prefect_test_harness``
    does before it stops its server); otherwise they retry against the stopped server
    at interpreter exit."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception as e:  # noqa: BLE001 - best effort at shutdown
            logging.getLogger(__name__).debug("draining %s failed: %s", worker.__name__, e)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def run(
    ctx: typer.Context,
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue this unfinished run id "
                                                  "(default: a dead unfinished run of the same config)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start a new run even if a dead one of this config "
                                        "could be continued")] = False,
    rerun: Annotated[str | None, typer.Option(
        "--rerun", help="auto | incremental | full: reuse a finished run's branches for unchanged groups "
        "(docs/incremental.md); same as --set run.rerun=...")] = None,
) -> None:
    """Run the whole MERIT pipeline (flow `merit`) and print the per-source table. Run again after a
    crash, the same command continues the dead run (docs/reliability.md); with a finished run of the
    same settings, only changed groups retrain (docs/incremental.md)."""
    if resume and fresh:
        raise typer.BadParameter("--resume and --fresh exclude each other", param_hint="--fresh")
    if resume or fresh:
        set_ = [*(set_ or []), f"run.resume={resume or 'never'}"]
    if rerun is not None:
        set_ = [*(set_ or []), f"run.rerun={rerun}"]
    _load(config, set_)  # a bad config exits with code 2 before Prefect starts; the flow reads the file again
    _exit_on_sigterm()
    from flows.merit import merit
    from merit_core.report import metrics_markdown

    quiet_user_tracebacks(ctx)
    with _prefect_api() as ui_url:
        state = merit(config_path=str(config), overrides=set_ or None, return_state=True)
        report = state.result()
    typer.echo("\n" + metrics_markdown(report["metrics"]))
    typer.echo("\nstage timings (s): " + ", ".join(f"{t['stage']} {t['seconds']:.0f}" for t in report["timings"]))
    typer.echo(f"merged model: {report['models']['merit']['uri']}")
    typer.echo(f"report: {report['report_uri']}")
    if ui_url:
        typer.echo(f"Prefect UI: {ui_url}/runs/flow-run/{state.state_details.flow_run_id}")


@app.command()
def gc(
    config: ConfigArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed")] = False,
    set_: SetOpt = None,
) -> None:
    """Abandon the dead unfinished runs in CONFIG's store: delete their branch checkpoints and
    local work directories (their finished branches stay; they can no longer be resumed)."""
    cfg = _load(config, set_)
    _setup_logging()
    from merit_core.pipeline.resume import collect_garbage
    from tasks.store import run_store

    runs = collect_garbage(run_store(cfg), dry_run=dry_run)
    for r in runs:
        typer.echo(f"{'would abandon' if dry_run else 'abandoned'} {r.run_id} ({r.status}, pid {r.pid} on {r.host})")
    typer.echo(f"{len(runs)} dead run{'' if len(runs) == 1 else 's'}")


@app.command()
def study(
    ctx: typer.Context,
    config: ConfigArg,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Seeds (default: study.seeds)")] = None,
    first_seed: Annotated[int, typer.Option("--first-seed", min=0,
                                            help="Index of the first seed (continue a study run earlier)")] = 0,
    set_: SetOpt = None,
) -> None:
    """Joint vs MERIT vs random split over N seeds, in and out of the mixture (flow `merit-study`).
    The report covers every finished seed of the study in the store."""
    _load(config, set_)  # a bad config exits with code 2 before Prefect starts; the flow reads the file again
    _exit_on_sigterm()
    from flows.study import merit_study
    from merit_core.report import MAIN_METRICS

    quiet_user_tracebacks(ctx)
    with _prefect_api():
        report = merit_study(config_path=str(config), overrides=set_ or None, n_seeds=seeds, first_seed=first_seed)
    typer.echo("")
    for c in report["summary"]["comparisons"]:
        if c["metric_key"] in MAIN_METRICS:
            typer.echo(f"- {c['verdict']}")
    typer.echo(f"report: {report['report_uri']}")


@app.command("study-report")
def study_report(
    folder: Annotated[Path, typer.Argument(help="Results folder with seeds/seed-<i>.json (e.g. bench/results/study-gpu)")],
) -> None:
    """Rebuild a study report (report.md, report.json, PNGs) in FOLDER from every seed record in it."""
    from merit_core.pipeline.study import combine, read_records
    from merit_core.report import MAIN_METRICS, write_study_report

    records = read_records(folder)  # StudyRecordError: exit code 2
    data = write_study_report(folder, **combine(records, where=str(folder)))
    for c in data["summary"]["comparisons"]:
        if c["metric_key"] in MAIN_METRICS:
            typer.echo(f"- {c['verdict']}")
    typer.echo(f"report ({len(records)} seeds): {folder / 'report.md'}")


@app.command()
def mixture(config: ConfigArg, set_: SetOpt = None) -> None:
    """Resolve the training mixture and print per-source examples, tokens, truncation."""
    cfg = _load(config, set_)
    _setup_logging()
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.mixture import resolve_mixture
    from merit_core.report import mixture_table
    from tasks.store import run_store

    store = run_store(cfg)
    m = resolve_mixture(cfg, store, prepare_base(cfg, store))
    typer.echo(mixture_table(m))


@app.command()
def split(config: ConfigArg, set_: SetOpt = None) -> None:
    """Compute (or reuse) every source gradient, the conflict matrix and the partition, and
    print the forecast: split scores of PCA, k-means and random partitions, explained
    variance per PC and a suggested r."""
    cfg = _load(config, set_)
    _setup_logging()
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.conflict import build_conflict_matrix, source_gradients
    from merit_core.pipeline.mixture import resolve_mixture
    import numpy as np

    from merit_core.pipeline.partition import partition_sources
    from merit_core.split.forecast import forecast_markdown, forecast_partitions
    from tasks.store import run_store

    store = run_store(cfg)
    base = prepare_base(cfg, store)
    m = resolve_mixture(cfg, store, base)
    sketches = source_gradients(cfg, store, base, m.sources, threads=cfg.conflict.threads)  # θ(0) loaded once
    conflict = build_conflict_matrix(cfg, store, sketches)
    part = partition_sources(cfg, conflict, m)
    typer.echo(json.dumps(part.model_dump(), indent=2))
    typer.echo("\n" + forecast_markdown(forecast_partitions(np.asarray(conflict.matrix), list(part.weights.values()),
                                                            cfg.split.r, seed=cfg.split.seed)))


@app.command()
def merge(
    output: Annotated[Path, typer.Argument(help="Output HF directory")],
    inputs: Annotated[list[Path], typer.Argument(help="Input HF model directories θ_k")],
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated N_k (token counts)")] = None,
    method: Annotated[str, typer.Option(help="token_weighted, uniform, task_arithmetic, ties, dare")] = "token_weighted",
    base: Annotated[Optional[Path], typer.Option(help="θ(0) dir (task_arithmetic/ties/dare)")] = None,
) -> None:
    """Merge K checkpoints into one HF directory (streaming, manifest written last)."""
    _setup_logging()
    from merit_core.merge import merge_checkpoints

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise typer.BadParameter(f"{weights!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    out = merge_checkpoints(inputs, w, output, method=method, base=base)
    typer.echo(f"merged {len(inputs)} checkpoints -> {out}")


@app.command("eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="HF model directory to evaluate")],
    config: ConfigArg,
    set_: SetOpt = None,
) -> None:
    """Evaluate one model on the held-out split of every source of CONFIG's mixture."""
    cfg = _load(config, set_)
    _setup_logging()
    from merit_core.models import check_model_dir
    from merit_core.pipeline.base import prepare_base
    from merit_core.pipeline.evaluate import evaluate_model_dir
    from merit_core.pipeline.mixture import resolve_mixture
    from tasks.store import run_store

    model_dir = check_model_dir(model_dir)  # a file, no model, weights not matching the manifest: refused first
    store = run_store(cfg)
    m = resolve_mixture(cfg, store, prepare_base(cfg, store))
    table = evaluate_model_dir(cfg, store, model_dir, m, verify=False)
    typer.echo(table.to_markdown())


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
