"""Sentry error reporting, on when ``SENTRY_DSN`` is set.

Unexpected errors already become one ERROR log line with a traceback (the
FUSE adapter, the control socket, background fetches); Sentry's logging
integration turns those lines into events. Events carry the release and
environment, never local variables (object data), request bodies or
credentials: every string is scrubbed of the AWS secret, the session token
and signature-like values before it leaves the machine.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from s3cachefs import __version__

log = logging.getLogger(__name__)

_SIGNATURES = re.compile(
    r"(X-Amz-Signature=|X-Amz-Credential=|X-Amz-Security-Token=|Signature=|Credential=)[^&\s,\"']+",
    re.IGNORECASE,
)
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def _secrets() -> list[str]:
    return [v for k in _SECRET_VARIABLES if len(v := os.environ.get(k, "")) >= 8]


def scrub(value: Any, secrets: list[str]) -> Any:
    """The same structure with every secret and signature in every string redacted."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[redacted]")
        return _SIGNATURES.sub(r"\1[redacted]", value)
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(v, secrets) for v in value)
    return value


def _before_send(event: Any, hint: Any) -> Any:
    event.pop("request", None)
    event.pop("user", None)
    return scrub(event, _secrets())


def setup_sentry() -> bool:
    """Initialise Sentry from ``SENTRY_DSN`` (and ``SENTRY_ENVIRONMENT``); False if unset."""
    dsn = os.environ.get("SENTRY_DSN")
    if not dsn:
        return False
    # Imported only when on: sentry_sdk costs every daemon start ~0.1 s.
    import sentry_sdk
    from sentry_sdk.integrations.logging import LoggingIntegration

    sentry_sdk.init(
        dsn=dsn,
        release=f"s3cachefs@{__version__}",
        environment=os.environ.get("SENTRY_ENVIRONMENT", "production"),
        send_default_pii=False,
        include_local_variables=False,  # locals hold object data and credentials
        before_send=_before_send,
        before_breadcrumb=lambda crumb, hint: scrub(crumb, _secrets()),
        integrations=[LoggingIntegration(level=logging.INFO, event_level=logging.ERROR)],
        default_integrations=True,
    )
    log.info("sentry enabled environment=%s", os.environ.get("SENTRY_ENVIRONMENT", "production"))
    return True


def flush() -> None:
    import sentry_sdk

    sentry_sdk.flush(timeout=5)
