"""Who may reach the stack: the checks a stack beyond loopback must pass before a service starts, and the
one credential check Serve and the dashboard share."""

from __future__ import annotations

import base64
import binascii
import hmac

from lib.errors import UserError
from lib.settings import Settings, is_loopback


class UnsafeExposure(UserError):
    """A service would listen beyond loopback without the credentials that guard it."""


def exposure_problems(settings: Settings) -> dict[str, str]:
    """Per service of the stack (s3, ray, dash, serve): why it must not start on ``settings.host``.

    Empty on loopback, where only this machine's processes reach the services. MLflow has no
    authentication; it is not listed because it stays on loopback unless ``mlflow_host`` says otherwise.
    """
    host = settings.host
    if is_loopback(host):
        return {}
    defaults = Settings.model_fields
    problems = {}
    if (
        settings.s3_access_key.get_secret_value() == defaults["s3_access_key"].default.get_secret_value()
        or settings.s3_secret_key.get_secret_value() == defaults["s3_secret_key"].default.get_secret_value()
    ):
        problems["s3"] = (
            f"S3 would accept its published default keys on {host}: set RAKUTEN_S3_ACCESS_KEY and "
            "RAKUTEN_S3_SECRET_KEY"
        )
    if not settings.ray_token_auth:
        problems["ray"] = (
            f"Ray runs any code sent to it: on {host} it needs its token, keep RAKUTEN_RAY_TOKEN_AUTH=true"
        )
    if settings.serve_auth_token is None:
        for service, what in (("dash", "the dashboard"), ("serve", "Serve")):
            problems[service] = (
                f"{what} would answer anyone on {host}: set RAKUTEN_SERVE_AUTH_TOKEN (Serve asks for it as a "
                "bearer token, the dashboard as the password of HTTP basic auth)"
            )
    return problems


def check_exposure(settings: Settings, services: list[str]) -> None:
    """Raise :class:`UnsafeExposure` naming every problem of ``services`` (nothing is started)."""
    problems = exposure_problems(settings)
    found = [problems[name] for name in services if name in problems]
    if found:
        raise UnsafeExposure("refusing to start: " + "; ".join(found))


def authorized(authorization: str | None, token: str | None, *, basic: bool = False) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always true when no token is configured):
    as a bearer token, or with ``basic`` also as the password of HTTP basic auth (any user name), which
    a browser asks for by itself."""
    if not token:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    scheme, given = scheme.lower(), given.strip()
    if scheme == "basic" and basic:
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme != "bearer":
        return False
    return hmac.compare_digest(given.encode(), token.encode())
