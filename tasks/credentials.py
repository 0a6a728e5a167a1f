"""Prefect credentials blocks for the artifact store.

:func:`session_from_block` turns a Prefect ``AwsCredentials`` block (named by
``store.credentials_block``) into a ``boto3.Session``. Importing this module (the
``tasks`` package does) registers it with :func:`merit_core.store.set_session_provider`,
so an S3 store whose config names a block resolves it on first use, in this process or
in a process it was pickled into (the provider travels by name). merit_core itself never
imports Prefect. The credentials are never logged: messages name the block only.
"""

from __future__ import annotations

import boto3
from prefect.client import orchestration
from prefect.exceptions import ObjectNotFound

from merit_core.store import StoreError, set_session_provider

AWS_CREDENTIALS_BLOCK_TYPE = "aws-credentials"


def _session_from_prefect_aws(name: str) -> boto3.Session | None:
    """``AwsCredentials.load(name).get_boto3_session()`` when prefect-aws is installed
    (it also handles ``assume_role_arn``); None when it is not."""
    try:
        from prefect_aws import AwsCredentials  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return AwsCredentials.load(name).get_boto3_session()
    except Exception as e:  # noqa: BLE001 — re-raised with the block named
        raise StoreError(f"could not load Prefect AwsCredentials block {name!r}: {type(e).__name__}: {e}") from None


def _read_block_fields(name: str) -> dict:
    """The block document's fields (secrets included) through the Prefect API client."""
    slug = AWS_CREDENTIALS_BLOCK_TYPE
    try:
        with orchestration.get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name=name, block_type_slug=slug, include_secrets=True)
    except ObjectNotFound:
        raise StoreError(
            f"Prefect block {slug}/{name} not found (create it in the UI or "
            "with prefect-aws: AwsCredentials(...).save(name))"
        ) from None
    except Exception as e:  # noqa: BLE001 — e.g. the Prefect API is unreachable
        raise StoreError(f"could not read Prefect block {slug}/{name}: {type(e).__name__}") from None
    return dict(doc.data or {})


def session_from_block(name: str) -> boto3.Session:
    """A boto3 Session from the Prefect ``AwsCredentials`` block called ``name``.

    With ``prefect-aws`` installed this is ``AwsCredentials.load(name).get_boto3_session()``.
    Without it, the block document is read through the Prefect API client (type slug
    ``aws-credentials``, secrets included) and its key id / secret / session token /
    profile / region fields build the session.

    Raises:
        StoreError: naming the block when it is missing, unreadable (e.g. the Prefect
            API is unreachable), or needs ``assume_role_arn`` without prefect-aws.
    """
    session = _session_from_prefect_aws(name)
    if session is not None:
        return session
    data = _read_block_fields(name)

    def field(k: str) -> str | None:
        v = data.get(k)
        if v is not None and hasattr(v, "get_secret_value"):
            v = v.get_secret_value()
        return v or None

    if field("assume_role_arn"):
        raise StoreError(
            f"Prefect block {AWS_CREDENTIALS_BLOCK_TYPE}/{name} uses assume_role_arn; "
            "install prefect-aws (pip install prefect-aws) to use it"
        )
    return boto3.Session(
        aws_access_key_id=field("aws_access_key_id"),
        aws_secret_access_key=field("aws_secret_access_key"),
        aws_session_token=field("aws_session_token"),
        profile_name=field("profile_name"),
        region_name=field("region_name"),
    )


set_session_provider(session_from_block)
