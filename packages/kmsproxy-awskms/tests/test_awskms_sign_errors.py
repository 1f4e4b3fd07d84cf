"""KMS errors at Sign that moto cannot produce, from a scripted endpoint.

botocore's standard retry mode retries throttling up to
`service.MAX_ATTEMPTS` attempts. Once that budget is spent, the proxy returns
502 naming the throttling and the reconnect backoff. A key disabled,
scheduled for deletion or denied after the proxy opened it is not a
transient failure. It costs one Sign request, with no retry and no backoff,
and the proxy returns 502 naming the key and the cause.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from awskms_fake import KEY_ARN, ScriptedKMS, scripted_kms
from awskms_moto import aws_environment
from cryptography.hazmat.primitives import serialization
from pki import certify
from proxy_site import Site, make_site, serving
from test_awskms_outage import status_of
from test_awskms_proxy import TLS13, anyio_backend, fetch_subject, nginx_for

from kmsproxy import Proxy, Registry, SignatureScheme, SignerError
from kmsproxy_awskms import KMSSigner, service

__all__ = ["anyio_backend", "aws_environment", "scripted_kms"]

pytestmark = [pytest.mark.anyio, pytest.mark.interop]

RATE_EXCEEDED = "Rate exceeded"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)


async def open_kms_signer(scripted_kms: ScriptedKMS) -> KMSSigner:
    """Open the fake's key and forget the self-check's Sign requests."""
    signer = Registry.load().open_signer(scripted_kms.uri())
    assert isinstance(signer, KMSSigner)
    scripted_kms.reset_counts()
    return signer


async def fetch_failing(
    site: Site, scripted_kms: ScriptedKMS, count: int, code: str, message: str
) -> bytes:
    """Start the proxy with the fake's key as client key, then script `count`
    Sign failures and GET through the proxy; return curl's stdout."""
    public_key = scripted_kms.public_key()
    cert = certify(site.client_ca, "kms scripted", public_key, client=True)
    path = site.path("kms-scripted.crt")
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    config = site.config(client_keys=[scripted_kms.uri()], client_certificates=[path])
    with nginx_for(site, TLS13) as nginx:
        async with serving(Proxy(config)) as addresses:
            scripted_kms.reset_counts()
            scripted_kms.fail_next_signs(count, code, message)
            result = await fetch_subject(site, addresses, nginx)
    return result.stdout


async def test_throttling_retried_within_budget(scripted_kms: ScriptedKMS) -> None:
    signer = await open_kms_signer(scripted_kms)
    throttled = service.MAX_ATTEMPTS - 1
    scripted_kms.fail_next_signs(throttled, "ThrottlingException", RATE_EXCEEDED)
    signature = await signer.sign(b"hello", SignatureScheme.ecdsa_secp256r1_sha256)
    assert signature
    assert scripted_kms.count("Sign") == service.MAX_ATTEMPTS
    assert not signer.service.backoff.failing


async def test_throttling_budget_spent_is_502(
    site: Site, scripted_kms: ScriptedKMS
) -> None:
    stdout = await fetch_failing(
        site, scripted_kms, service.MAX_ATTEMPTS, "ThrottlingException", RATE_EXCEEDED
    )
    assert status_of(stdout) == 502
    assert b"KMS throttled the request (ThrottlingException: Rate exceeded)" in stdout
    assert f"after {service.MAX_ATTEMPTS} attempts".encode() in stdout
    assert b"(backoff awskms-reconnect)" in stdout
    assert scripted_kms.count("Sign") == service.MAX_ATTEMPTS


KEY_STATE_ERRORS = [
    pytest.param(
        "DisabledException",
        f"{KEY_ARN} is disabled.",
        "aws kms enable-key --key-id",
        id="disabled",
    ),
    pytest.param(
        "KMSInvalidStateException",
        f"{KEY_ARN} is pending deletion.",
        "aws kms cancel-key-deletion --key-id",
        id="pending-deletion",
    ),
    pytest.param(
        "AccessDeniedException",
        "User is not authorized to perform: kms:Sign",
        "allow kms:Sign",
        id="access-denied",
    ),
]


@pytest.mark.parametrize(("code", "message", "fix"), KEY_STATE_ERRORS)
async def test_key_error_not_retried(
    scripted_kms: ScriptedKMS, code: str, message: str, fix: str
) -> None:
    signer = await open_kms_signer(scripted_kms)
    scripted_kms.fail_next_signs(service.MAX_ATTEMPTS, code, message)
    with pytest.raises(SignerError) as raised:
        await signer.sign(b"hello", SignatureScheme.ecdsa_secp256r1_sha256)
    assert scripted_kms.count("Sign") == 1
    assert not signer.service.backoff.failing
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith(signer.uri)
    assert code in text
    assert fix in text


@pytest.mark.parametrize(("code", "message", "fix"), KEY_STATE_ERRORS)
async def test_key_error_is_502(
    site: Site, scripted_kms: ScriptedKMS, code: str, message: str, fix: str
) -> None:
    stdout = await fetch_failing(
        site, scripted_kms, service.MAX_ATTEMPTS, code, message
    )
    assert status_of(stdout) == 502
    line = next(
        (line for line in stdout.splitlines() if code.encode() in line), b""
    ).decode()
    assert f"key-id={scripted_kms.uri().split('key-id=')[1]}" in line
    assert fix in line
    assert scripted_kms.count("Sign") == 1
