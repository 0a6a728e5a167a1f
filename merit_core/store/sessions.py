"""Where an S3 store gets a ``boto3.Session`` for a named credentials block.

merit_core never reads credentials blocks itself (it never imports Prefect). The
Prefect layer registers a *session provider* — ``fn(block_name) -> boto3.Session`` —
with :func:`set_session_provider` (``tasks.credentials`` does so when the ``tasks``
package is imported). An :class:`~merit_core.store.S3Store` whose config names
``store.credentials_block`` asks the provider on first use, in whatever process it
is used in; a store pickled into another process carries a reference to the
provider (a module-level function, pickled by name, never the credentials).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from merit_core.store.errors import StoreError

SessionProvider = Callable[[str], Any]
"""``fn(block_name: str) -> boto3.Session``; raises :class:`StoreError` naming the block."""

_provider: SessionProvider | None = None


def set_session_provider(fn: SessionProvider | None) -> SessionProvider | None:
    """Register ``fn`` as the provider of sessions for named credentials blocks (None
    unregisters). For stores that are pickled into other processes ``fn`` must be a
    module-level function.

    Returns:
        The provider registered before (to restore it).
    """
    global _provider
    previous, _provider = _provider, fn
    return previous


def session_provider() -> SessionProvider | None:
    """The registered session provider, or None."""
    return _provider


def session_for_block(name: str, fallback: SessionProvider | None = None) -> Any:
    """A ``boto3.Session`` for the credentials block ``name``, from the registered
    provider, else ``fallback`` (the provider a pickled store brought along).

    Raises:
        StoreError: when no provider is known in this process, or from the provider
            (block missing, unreadable, or unusable).
    """
    fn = _provider or fallback
    if fn is None:
        raise StoreError(
            f"store.credentials_block={name!r}: a credentials block can only be resolved where "
            "the Prefect layer (the tasks package, which registers tasks.credentials) is loaded; "
            "import tasks first, pass open_store(cfg, session=boto3.Session(...)), or leave "
            "credentials_block unset to use the standard AWS chain"
        )
    return fn(name)
