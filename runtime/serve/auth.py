"""The optional API key: with one set, every endpoint but ``/healthz`` (and ``/metrics`` when left open) needs
``Authorization: Bearer <key>``; anything else is 401. Keys are compared in constant time (``hmac.compare_digest``
of their SHA-256 digests, so neither the content nor the length leaks through timing).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

ENV = "VDEPLOY_API_KEY"  # the key itself (--api-key-file FILE takes precedence)
OPEN_PATHS = ("/healthz",)  # answered without a key: a load balancer's liveness probe


def read_key(path: str | os.PathLike | None = None, environ=os.environ) -> str | None:
    """The key from ``path`` (its text, surrounding whitespace stripped) or else ``$VDEPLOY_API_KEY``; None if
    neither is given.

    Raises:
        ValueError: the file cannot be read, or the key is empty or holds characters a header cannot carry.
    """
    if path is not None:
        try:
            key, where = Path(path).read_text(encoding="utf-8").strip(), f"the API key file {path}"
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key file {path}: {getattr(e, 'strerror', None) or e}") from None
    elif environ.get(ENV) is not None:
        key, where = environ[ENV].strip(), f"${ENV}"
    else:
        return None
    if not key:
        raise ValueError(f"{where} is empty")
    if not all(33 <= ord(ch) <= 126 for ch in key):
        raise ValueError(f"{where} holds characters an HTTP header cannot carry (spaces, control or non-ASCII "
                         "characters); use printable ASCII, e.g. `openssl rand -hex 32`")
    return key


class ApiKey:
    """Checks requests against one key.

    Args:
        key: the key (None: no key required: every request passes).
        metrics_open: ``/metrics`` answers without a key too (for a Prometheus scraper).
    """

    def __init__(self, key: str | None, *, metrics_open: bool = False):
        self._digest = hashlib.sha256(key.encode()).digest() if key else None
        self.open_paths = (*OPEN_PATHS, "/metrics") if metrics_open else OPEN_PATHS

    @property
    def required(self) -> bool:
        return self._digest is not None

    def refusal(self, path: str, authorization: str | None) -> str | None:
        """None if the request may pass; else why not (the 401's message)."""
        if self._digest is None or path in self.open_paths:
            return None
        if not authorization:
            return "this server needs an API key: send Authorization: Bearer <key>"
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "the Authorization header must be Bearer <key>"
        if not hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._digest):
            return "the API key is wrong"
        return None
