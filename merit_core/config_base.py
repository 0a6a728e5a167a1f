"""The base of every config section (:mod:`merit_core.config`): unknown keys are refused,
input values are kept out of error messages, and no field may hold a URL with credentials.

A config travels as a Prefect flow parameter and is stored with the flow run in the
Prefect database (and shown in the UI), so a password written into ``store.endpoint_url``
(``http://user:pw@host``) or an access key in ``store.uri`` (``s3://KEY:SECRET@bucket``)
would be kept there in clear text. Every string field is checked, whatever its name.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

CREDENTIALS_HINT = (
    "a config is stored with the flow run's parameters in the Prefect database, so give the URL without them "
    "and put them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3, HF_TOKEN for the hub) "
    "or in a Prefect AwsCredentials block named by store.credentials_block (docs/store.md)"
)


def has_credentials(value: str) -> bool:
    """Whether ``value`` is a URL (``scheme://...``) carrying user info before its host:
    ``http://user:pw@host``, ``s3://KEY:SECRET@bucket`` or a bare ``https://token@host``.

    Also caught: a password containing ``/``, ``?`` or ``#`` (an AWS secret key often
    contains ``/``), which makes :func:`urllib.parse.urlsplit` end the host early, e.g.
    ``s3://KEY:se/cret@bucket``: the "port" is not a number and an ``@`` follows. A plain
    ``@`` in a path or query (``s3://bucket/a@b``, ``http://host:9000/x?to=a@b``) is not
    user info.
    """
    if "://" not in value:
        return False
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc:
        return False
    if "@" in parts.netloc:
        return True
    host, sep, port = parts.netloc.rpartition(":")
    return bool(sep and host and not port.isdigit() and "@" in value.split(parts.netloc, 1)[1])


def refuse_credentials(field: str, value: Any) -> Any:
    """``value`` unchanged unless it (or a string in it, for a list) is a URL with
    credentials (:func:`has_credentials`).

    Raises:
        ValueError: naming ``field`` and telling where credentials go; the value itself
            (and so the password) is never part of the message.
    """
    items = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, str) and has_credentials(v) for v in items):
        raise ValueError(f"{field} holds a URL with credentials (a user name or password before '@'): "
                         + CREDENTIALS_HINT)
    return value


class StrictModel(BaseModel):
    """A config section: unknown keys refused (``extra="forbid"``, so a typo fails naming
    the field), assignments validated, input values never echoed in validation errors,
    and no string field holding a URL with credentials (:func:`refuse_credentials`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    @field_validator("*")
    @classmethod
    def _no_credentials_in_urls(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_credentials(info.field_name or "field", value)
