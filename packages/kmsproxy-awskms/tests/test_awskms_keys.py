"""Opening AWS KMS keys: what loads, and the one-line errors for what does not.

Keys open through the registry and the package's entry point, against
moto's KMS server on loopback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import botocore.configprovider
import botocore.httpsession
import pytest
from awskms_moto import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_SECRET_ACCESS_KEY,
    REGION,
    MotoKMS,
    SignCall,
    aws_environment,
    moto_kms,
    sign_calls,
)
from cryptography.hazmat.primitives import serialization
from peers import free_port
from pki import certify, make_ca

from kmsproxy import Registry, SignatureScheme, SignerError, UserError
from kmsproxy.signer import verify_signature
from kmsproxy_awskms import KMSSigner, service
from kmsproxy_awskms.algorithms import MessageType

__all__ = ["aws_environment", "moto_kms", "sign_calls"]

# Upper bound for `kmsproxy serve` to fail at startup.
PROCESS_TIMEOUT_SECONDS = 30.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def open_key(uri: str) -> KMSSigner:
    signer = Registry.load().open_signer(uri)
    assert isinstance(signer, KMSSigner)
    return signer


def open_error(uri: str) -> str:
    with pytest.raises(SignerError) as raised:
        Registry.load().open_signer(uri)
    return str(raised.value)


def test_p256_schemes(moto_kms: MotoKMS) -> None:
    signer = open_key(moto_kms.uri(moto_kms.create_key("ECC_NIST_P256")))
    assert signer.schemes == [SignatureScheme.ecdsa_secp256r1_sha256]
    assert signer.public_key() == moto_kms.public_key(signer.address.key_id)


def test_self_check_drops_pss(
    moto_kms: MotoKMS, caplog: pytest.LogCaptureFixture
) -> None:
    """moto 5.2.5 signs RSASSA_PSS with the maximum salt length, which TLS
    rejects; the self-check drops those schemes and names each one."""
    with caplog.at_level(logging.WARNING, logger="kmsproxy_awskms"):
        signer = open_key(moto_kms.uri(moto_kms.create_key("RSA_2048")))
    assert signer.schemes == [
        SignatureScheme.rsa_pkcs1_sha256,
        SignatureScheme.rsa_pkcs1_sha384,
        SignatureScheme.rsa_pkcs1_sha512,
    ]
    dropped = [r.getMessage() for r in caplog.records if "Dropping" in r.getMessage()]
    assert len(dropped) == 3
    assert "scheme=rsa_pss_rsae_sha256 algorithm=RSASSA_PSS_SHA_256" in dropped[0]


def test_self_check_keeps_raw_only(moto_kms: MotoKMS) -> None:
    """moto 5.2.5 hashes a DIGEST message again, so only RAW is kept."""
    signer = open_key(moto_kms.uri(moto_kms.create_key("ECC_NIST_P384")))
    assert signer.message_types == {
        SignatureScheme.ecdsa_secp384r1_sha384: frozenset({MessageType.RAW}),
    }


def test_alias_opens(moto_kms: MotoKMS) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    moto_kms.client().create_alias(AliasName="alias/dev-mtls", TargetKeyId=key_id)
    signer = open_key(moto_kms.uri("alias/dev-mtls"))
    assert signer.public_key() == moto_kms.public_key(key_id)


@pytest.mark.anyio
async def test_sign_verifies(moto_kms: MotoKMS, sign_calls: list[SignCall]) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    signer = open_key(moto_kms.uri(key_id))
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signature = await signer.sign(b"x" * 4096, scheme)
    assert signature[0] == 0x30  # DER SEQUENCE, as KMS returns it
    # Checked here against moto's public key, not only by the signer itself.
    verify_signature(moto_kms.public_key(key_id), signature, b"x" * 4096, scheme)
    assert sign_calls[-1].message_type == "RAW"
    assert sign_calls[-1].message == b"x" * 4096


@pytest.mark.anyio
async def test_sign_above_raw_limit_fails_clearly(
    moto_kms: MotoKMS, sign_calls: list[SignCall]
) -> None:
    signer = open_key(moto_kms.uri(moto_kms.create_key("ECC_NIST_P256")))
    calls_before = len(sign_calls)
    with pytest.raises(SignerError) as raised:
        await signer.sign(b"x" * 4097, SignatureScheme.ecdsa_secp256r1_sha256)
    assert "a 4097-byte message needs MessageType DIGEST" in str(raised.value)
    assert len(sign_calls) == calls_before


@pytest.mark.anyio
async def test_wrong_signature_never_returned(
    moto_kms: MotoKMS, sign_calls: list[SignCall]
) -> None:
    """Forced onto the DIGEST path that failed the self-check, moto returns a
    signature over the digest's digest; the local check rejects it."""
    signer = open_key(moto_kms.uri(moto_kms.create_key("ECC_NIST_P256")))
    scheme = SignatureScheme.ecdsa_secp256r1_sha256
    signer.message_types[scheme] = frozenset(MessageType)
    data = b"t" * 5000
    with pytest.raises(SignerError, match="does not verify") as raised:
        await signer.sign(data, scheme)
    assert "(MessageType DIGEST)" in str(raised.value)
    assert sign_calls[-1].message_type == "DIGEST"
    assert sign_calls[-1].message == hashlib.sha256(data).digest()


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "MAX_ATTEMPTS", 1)
    uri = f"awskms:key-id=k;region={REGION};endpoint=http://127.0.0.1:{free_port()}"
    message = open_error(uri)
    assert "cannot open the key at AWS KMS in eu-west-1 at http://127.0.0.1:" in message
    assert "KMS unreachable: Could not connect to the endpoint URL" in message


def test_disabled_key(moto_kms: MotoKMS) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    moto_kms.client().disable_key(KeyId=key_id)
    message = open_error(moto_kms.uri(key_id))
    assert message.startswith(f"awskms:key-id={key_id};region={REGION};")
    assert (
        f"the key is disabled; enable it with `aws kms enable-key --key-id {key_id}`"
        in message
    )


def test_pending_deletion_key(moto_kms: MotoKMS) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    moto_kms.client().schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    message = open_error(moto_kms.uri(key_id))
    assert "the key is pending deletion (scheduled for " in message
    assert f"`aws kms cancel-key-deletion --key-id {key_id}`" in message


def test_encryption_key(moto_kms: MotoKMS) -> None:
    key_id = moto_kms.create_key("RSA_2048", key_usage="ENCRYPT_DECRYPT")
    message = open_error(moto_kms.uri(key_id))
    assert "the key's usage is ENCRYPT_DECRYPT, not SIGN_VERIFY" in message


def test_key_spec_without_tls_scheme(moto_kms: MotoKMS) -> None:
    message = open_error(moto_kms.uri(moto_kms.create_key("ECC_SECG_P256K1")))
    assert "key spec ECC_SECG_P256K1 has no TLS signature scheme" in message


def test_access_denied(moto_kms: MotoKMS) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Deny", "Action": "kms:DescribeKey", "Resource": "*"}],
    }
    key_id = moto_kms.client().create_key(
        KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256", Policy=json.dumps(policy)
    )["KeyMetadata"]["KeyId"]
    message = open_error(moto_kms.uri(key_id))
    assert "AccessDeniedException" in message
    assert "allow kms:Sign, kms:GetPublicKey and kms:DescribeKey" in message


def test_missing_alias(moto_kms: MotoKMS) -> None:
    message = open_error(moto_kms.uri("alias/none-such"))
    assert "NotFoundException" in message
    assert "check key-id= and region=" in message


def test_missing_key_id() -> None:
    with pytest.raises(UserError, match="missing key-id="):
        Registry.load().open_signer("awskms:region=eu-west-1")


def test_unknown_attribute_keeps_secret_out() -> None:
    uri = "awskms:key-id=k;secret-access-key=hunter2"
    with pytest.raises(UserError, match="unknown attribute") as raised:
        Registry.load().open_signer(uri)
    assert "unknown attribute secret-access-key" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_endpoint_must_be_url() -> None:
    with pytest.raises(UserError, match="is not an http"):
        Registry.load().open_signer("awskms:key-id=k;endpoint=127.0.0.1:4566")


def test_secret_not_logged(moto_kms: MotoKMS, caplog: pytest.LogCaptureFixture) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    moto_kms.client().disable_key(KeyId=key_id)
    with caplog.at_level(logging.DEBUG, logger="kmsproxy_awskms"):
        open_key(moto_kms.uri(moto_kms.create_key("RSA_2048")))
        message = open_error(moto_kms.uri(key_id))
    assert caplog.records
    assert DUMMY_SECRET_ACCESS_KEY not in caplog.text
    assert DUMMY_SECRET_ACCESS_KEY not in message


def read_until(process: subprocess.Popen[str], marker: str) -> list[str]:
    """Collect stderr lines up to the one containing `marker` (bounded), then
    stop the process with SIGTERM and add the rest of its output."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + PROCESS_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            if marker in line:
                break
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=PROCESS_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    return [*lines, rest]


# A session token as SSO, assumed roles and instance roles supply.
SESSION_TOKEN = "kmsproxy-test-session-token-not-real"


def test_verbose_logs_no_credentials(
    moto_kms: MotoKMS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --verbose` logs at root DEBUG; no logger, botocore's included,
    writes the session token or the secret access key."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    key_id = moto_kms.create_key("ECC_NIST_P256")
    ca = make_ca()
    ca_key, ca_cert = ca.write(tmp_path, "ca")
    client_cert = tmp_path / "client.crt"
    certificate = certify(ca, "kms client", moto_kms.public_key(key_id), client=True)
    client_cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    process = subprocess.Popen(
        [
            sys.executable, "-m", "kmsproxy", "serve", str(ca_key), str(ca_cert),
            "--clientkey", moto_kms.uri(key_id), "--clientcert", str(client_cert),
            "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0", "--verbose",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines = read_until(process, "Proxy listening addresses=")
    stderr = "".join(lines)
    assert "Proxy listening addresses=" in stderr
    assert " DEBUG " in stderr
    assert SESSION_TOKEN not in stderr
    assert DUMMY_SECRET_ACCESS_KEY not in stderr
    assert "X-Amz-Security-Token" not in stderr


@pytest.fixture
def no_credentials(aws_environment: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Remove the dummy credentials; yield the URL of every HTTP request
    botocore sends. A request to any host but 127.0.0.1 fails the test
    before it leaves the process."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert (aws_environment / "credentials").read_text() == ""
    assert (aws_environment / "config").read_text() == ""
    urls: list[str] = []
    send = botocore.httpsession.URLLib3Session.send

    def send_to_loopback_only(self: Any, request: Any) -> Any:
        urls.append(request.url)
        if not request.url.startswith("http://127.0.0.1:"):
            raise AssertionError(f"botocore tried to reach {request.url}")
        return send(self, request)

    monkeypatch.setattr(
        botocore.httpsession.URLLib3Session, "send", send_to_loopback_only
    )
    return urls


def test_no_credentials(moto_kms: MotoKMS, no_credentials: list[str]) -> None:
    uri = moto_kms.uri(moto_kms.create_key("ECC_NIST_P256"))
    requests_before = len(no_credentials)
    message = open_error(uri)
    assert "no AWS credentials found" in message
    # endpoint= keeps the whole chain, so the message lists every source.
    assert "SSO, roles and instance metadata" in message
    assert "no endpoint=" not in message
    # botocore walks the whole chain and finds no credentials before it
    # signs the first request, so nothing at all is sent: not to moto, and
    # not to the instance metadata service, which is disabled.
    assert no_credentials[requests_before:] == []


def test_no_credentials_regional(no_credentials: list[str]) -> None:
    """Without endpoint= the same chain runs, and no request leaves either
    (the recorder fails the test before one could reach AWS)."""
    message = open_error(f"awskms:key-id=alias/none;region={REGION}")
    assert "no AWS credentials found" in message
    assert no_credentials == []


def test_endpoint_skips_auto_defaults_mode(
    moto_kms: MotoKMS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In "auto" defaults mode botocore looks up the region in instance
    metadata; with endpoint= that lookup must not even start."""
    uri = moto_kms.uri(moto_kms.create_key("ECC_NIST_P256"))
    lookups: list[object] = []

    def resolve_auto_mode(self: object, region_name: object) -> str:
        lookups.append(region_name)
        raise AssertionError("botocore resolved the auto defaults mode")

    monkeypatch.setattr(
        botocore.configprovider.SmartDefaultsConfigStoreFactory,
        "resolve_auto_mode",
        resolve_auto_mode,
    )
    monkeypatch.setenv("AWS_DEFAULTS_MODE", "auto")
    signer = open_key(uri)
    assert signer.schemes == [SignatureScheme.ecdsa_secp256r1_sha256]
    assert lookups == []


def test_profile_in_credentials_file(
    moto_kms: MotoKMS, no_credentials: list[str], tmp_path: Path
) -> None:
    credentials = tmp_path / "team-credentials"
    credentials.write_text(
        "[kmsproxy-test]\n"
        f"aws_access_key_id = {DUMMY_ACCESS_KEY_ID}\n"
        f"aws_secret_access_key = {DUMMY_SECRET_ACCESS_KEY}\n"
    )
    key_id = moto_kms.create_key("ECC_NIST_P256")
    uri = moto_kms.uri(
        key_id, profile="kmsproxy-test", credentials_file=str(credentials)
    )
    signer = open_key(uri)
    assert signer.public_key() == moto_kms.public_key(key_id)
    assert f"credentials-file={credentials}" in signer.uri


def test_missing_profile(moto_kms: MotoKMS) -> None:
    message = open_error(moto_kms.uri("k", profile="none-such"))
    assert "The config profile (none-such) could not be found" in message
    assert "check profile= and the AWS config files" in message


def test_certificate_uri_rejected(moto_kms: MotoKMS) -> None:
    """KMS stores no certificates: the chain must be a file."""
    with pytest.raises(UserError, match="give --clientcert as a file"):
        Registry.load().open_certificates(moto_kms.uri("k"))


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:1"])
def test_standard_credential_chain(endpoint: str | None) -> None:
    """The chain keeps instance and container roles, SSO and assumed roles,
    with and without endpoint= (inspected only; building it sends nothing)."""
    location = service.KMSLocation(region=REGION, endpoint=endpoint)
    names = service.credential_provider_names(service.create_session(location))
    assert "iam-role" in names
    assert "container-role" in names
    assert "sso" in names
    assert "assume-role" in names


def test_cli_disabled_key_is_one_line(moto_kms: MotoKMS, tmp_path: Path) -> None:
    key_id = moto_kms.create_key("ECC_NIST_P256")
    moto_kms.client().disable_key(KeyId=key_id)
    ca_key, ca_cert = make_ca().write(tmp_path, "ca")
    result = subprocess.run(
        [
            sys.executable, "-m", "kmsproxy", "serve", str(ca_key), str(ca_cert),
            "--clientkey", moto_kms.uri(key_id), "--clientcert", str(ca_cert),
            "--listen", "127.0.0.1:0", "--pac-listen", "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "the key is disabled" in result.stderr
    assert "Traceback" not in result.stderr


def refused_endpoint() -> str:
    """Return an http URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def test_missing_credentials_file(no_credentials: list[str], tmp_path: Path) -> None:
    """A credentials-file= that does not exist fails before any request, and
    botocore does not fall back to other credentials."""
    missing = tmp_path / "none-such"
    uri = (
        f"awskms:key-id=k;region={REGION};credentials-file={missing};"
        f"endpoint={refused_endpoint()}"
    )
    with pytest.raises(UserError) as raised:
        Registry.load().open_signer(uri)
    message = str(raised.value)
    assert f"credentials-file {missing}: No such file or directory" in message
    assert no_credentials == []


def test_credentials_file_is_directory(tmp_path: Path) -> None:
    uri = (
        f"awskms:key-id=k;region={REGION};credentials-file={tmp_path};"
        f"endpoint={refused_endpoint()}"
    )
    with pytest.raises(UserError, match="is not a file"):
        Registry.load().open_signer(uri)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:1&x=y", "has an invalid port"),
        ("http://127.0.0.1:99999", "has an invalid port"),
        ("http://[127.0.0.1", "is not a valid URL"),
        ("ftp://127.0.0.1:1", "is not an http(s) URL"),
        ("127.0.0.1:4566", "is not an http(s) URL"),
    ],
)
def test_invalid_endpoint_is_one_line(endpoint: str, expected: str) -> None:
    uri = f"awskms:key-id=k;region={REGION};endpoint={endpoint}"
    with pytest.raises(UserError) as raised:
        Registry.load().open_signer(uri)
    message = str(raised.value)
    assert expected in message
    assert "for example endpoint=https://" in message
    assert "\n" not in message


def test_refused_endpoint_names_next_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "MAX_ATTEMPTS", 1)
    message = open_error(
        f"awskms:key-id=k;region={REGION};endpoint={refused_endpoint()}"
    )
    assert "KMS unreachable" in message
    assert "check that endpoint= names a running KMS endpoint" in message


def test_cli_error_without_botocore_info() -> None:
    """botocore logs which credentials it found at INFO; a failing command
    prints only its own error line."""
    uri = f"awskms:key-id=k;region={REGION};endpoint={refused_endpoint()}"
    result = subprocess.run(
        [sys.executable, "-m", "kmsproxy", "csr", uri, "--subject", "CN=x"],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 2
    assert "botocore" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "KMS unreachable" in result.stderr


def test_credentials_source_logged(
    moto_kms: MotoKMS, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore's own INFO line is quiet; ours names the source at DEBUG."""
    with caplog.at_level(logging.DEBUG, logger="kmsproxy_awskms"):
        open_key(moto_kms.uri(moto_kms.create_key("ECC_NIST_P256")))
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("AWS credentials ") for m in messages), messages
    assert any(m.endswith("source=env") for m in messages), messages
    assert not any(r.name == "botocore.credentials" for r in caplog.records)


def test_environment_shadows_credentials_file(
    moto_kms: MotoKMS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore reads the environment before credentials-file=: warn."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\n"
        f"aws_access_key_id = {DUMMY_ACCESS_KEY_ID}\n"
        f"aws_secret_access_key = {DUMMY_SECRET_ACCESS_KEY}\n"
    )
    key_id = moto_kms.create_key("ECC_NIST_P256")
    with caplog.at_level(logging.WARNING, logger="kmsproxy_awskms"):
        open_key(moto_kms.uri(key_id, credentials_file=str(credentials)))
    assert "not from credentials-file=" in caplog.text
    assert DUMMY_SECRET_ACCESS_KEY not in caplog.text
