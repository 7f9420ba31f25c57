"""Bearer-token check for the scoring API.

The token comes from a secret file (``token_file``, e.g. a mounted Kubernetes/Docker secret) or
an environment variable of the replica (``LASB_SERVE_TOKEN`` by default). When neither is set,
the API is open, which is only sensible on loopback; the ingress logs a warning.
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # fastapi is imported lazily: `lasb --help` should not pay for it
    from fastapi.security import HTTPAuthorizationCredentials

log = logging.getLogger("lasb.serve")

DEFAULT_TOKEN_ENV = "LASB_SERVE_TOKEN"


def load_token(token_file: str | None = None, token_env: str = DEFAULT_TOKEN_ENV) -> str | None:
    """The configured token, or None for no auth. A named but unreadable/empty file is an error:
    silently serving without auth because a secret failed to mount would be worse."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    token = os.environ.get(token_env, "").strip()
    return token or None


class BearerAuth:
    def __init__(self, token: str | None):
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self._token is None:
            return
        given = credentials.credentials.encode() if credentials else b""
        # constant-time comparison: response timing must not reveal the token prefix
        if not credentials or not hmac.compare_digest(given, self._token):
            from fastapi import HTTPException

            raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
