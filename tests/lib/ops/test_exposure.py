"""The checks that keep a stack beyond loopback from starting without credentials (pure logic)."""

from __future__ import annotations

import base64

import pytest
from pydantic import SecretStr

from lib.ops.exposure import UnsafeExposure, authorized, check_exposure, exposure_problems
from lib.settings import Settings, is_loopback

GUARDED = {
    "host": "0.0.0.0",
    "s3_access_key": SecretStr("k3y"),
    "s3_secret_key": SecretStr("s3cret-k3y"),
    "serve_auth_token": SecretStr("t0ken"),
}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_bearer_and_basic_credentials():
    assert authorized(None, None) and authorized("Bearer anything", None)
    assert authorized("Bearer s3cret", "s3cret") and authorized("bearer s3cret", "s3cret")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret", _basic("u", "s3cret")):
        assert not authorized(header, "s3cret")
    assert authorized(_basic("anyone", "s3cret"), "s3cret", basic=True)
    not_utf8 = "Basic " + base64.b64encode(b"\xff").decode()
    for header in (_basic("s3cret", "wrong"), "Basic !!not-base64", not_utf8):
        assert not authorized(header, "s3cret", basic=True)


def test_loopback_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.5", "::", "example.org"))


def test_loopback_needs_nothing_and_mlflow_stays_on_loopback_unless_told():
    assert exposure_problems(Settings(host="127.0.0.1")) == {}
    port = {"mlflow_port": 5000}  # the test session's environment sets its own ports
    assert Settings(host="127.0.0.1", **port).mlflow_uri == "http://127.0.0.1:5000"
    assert Settings(host="10.0.0.5", **port).mlflow_uri == "http://127.0.0.1:5000"
    assert Settings(host="10.0.0.5", mlflow_host="10.0.0.5", **port).mlflow_uri == "http://10.0.0.5:5000"


def test_beyond_loopback_every_missing_credential_is_named():
    problems = exposure_problems(Settings(host="0.0.0.0", ray_token_auth=False))
    assert set(problems) == {"s3", "ray", "dash", "serve"}
    assert "RAKUTEN_S3_ACCESS_KEY" in problems["s3"] and "RAKUTEN_SERVE_AUTH_TOKEN" in problems["dash"]
    # one default key is enough to refuse
    assert set(exposure_problems(Settings(**GUARDED | {"s3_secret_key": Settings().s3_secret_key}))) == {"s3"}
    assert exposure_problems(Settings(**GUARDED)) == {}


def test_check_exposure_names_only_the_services_asked_for():
    bare = Settings(host="0.0.0.0")
    with pytest.raises(UnsafeExposure, match="S3 would accept") as raised:
        check_exposure(bare, ["s3", "mlflow"])
    assert "dashboard" not in str(raised.value)
    check_exposure(bare, ["mlflow"])
