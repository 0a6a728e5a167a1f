"""Is the Hugging Face hub usable from here? Answered in seconds, never by retrying.

``huggingface_hub`` and ``datasets`` retry an unreachable hub with back-off (``datasets``
spends ~25 s before giving up). The model and data loaders ask :func:`hub_offline` and
:func:`hub_reachable` first and fail fast with a message that names the culprit.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def hub_endpoint() -> str:
    """The hub URL in use (``HF_ENDPOINT`` or https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_offline() -> bool:
    """True when offline mode is on (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` /
    ``HF_DATASETS_OFFLINE``): only cached files may be used."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(n, "").strip().lower() in _TRUE for n in names):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    The attempt (DNS lookup included, which ignores socket timeouts) runs in a daemon
    thread, so a black-holed network costs at most ``timeout`` seconds.
    """
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    ok: list[bool] = []

    def _try() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except Exception:  # DNS failure, refused, timed out
            ok.append(False)

    t = threading.Thread(target=_try, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])
