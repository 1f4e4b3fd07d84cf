"""botocore exceptions turned into one line that names the cause and the fix.

`describe_error` is the only place that interprets KMS error codes. It also
decides which failures are transient (the service may come back by itself,
so the caller records them in its backoff) and which need the user to act.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import botocore.exceptions

_V = TypeVar("_V")

# KMS error codes, besides throttling, for a service that is briefly failing
# (KMS API reference, "Common Errors" and the Sign errors). botocore's
# standard retry mode has already retried them when they reach this module.
TRANSIENT_CODES = frozenset(
    {
        "KMSInternalException",
        "DependencyTimeoutException",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

# The code KMS returns when a request exceeds the account's request quota.
THROTTLING_CODE = "ThrottlingException"

# Codes for credentials that AWS rejected (wrong, expired or revoked).
CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "ExpiredToken",
        "IncompleteSignature",
    }
)


@dataclass(frozen=True)
class FailureDescription:
    """The reason a KMS call failed, in words for the user, and whether to retry."""

    reason: str
    transient: bool


class MalformedResponse(botocore.exceptions.BotoCoreError):  # type: ignore[misc]
    """A KMS response without a field the backend needs, or too large.

    A `BotoCoreError`, so every handler of botocore failures catches it.
    """

    fmt = "KMS returned a malformed response: {detail}"


def response_field(response: Any, name: str, kind: type[_V]) -> _V:
    """Return `response[name]` if it is a `kind`, else raise `MalformedResponse`."""
    value = response.get(name) if isinstance(response, Mapping) else None
    if not isinstance(value, kind):
        raise MalformedResponse(detail=f"{name} is missing or not {kind.__name__}")
    return value


def describe_error(
    error: Exception, key_id: str, endpoint: str | None = None
) -> FailureDescription:
    """Describe a botocore exception from a call on `key_id` at `endpoint`
    (the URI's `endpoint=`, None for botocore's regional endpoint).

    The text never contains credentials: botocore's messages name the
    profile or file at most, and a KMS error message names the caller's ARN
    and the key, not a secret.
    """
    if isinstance(error, botocore.exceptions.ClientError):
        return _describe_client_error(error, key_id)
    if isinstance(error, MalformedResponse):
        return FailureDescription(
            f"{error}; check that endpoint= names a KMS endpoint", transient=False
        )
    if isinstance(error, botocore.exceptions.NoCredentialsError):
        return FailureDescription(
            "no AWS credentials found (environment variables, shared "
            "credentials and config files, SSO, roles and instance "
            "metadata); set AWS_PROFILE, add profile= or "
            "credentials-file= to the URI, or run `aws configure`",
            transient=False,
        )
    if isinstance(error, botocore.exceptions.PartialCredentialsError):
        return FailureDescription(
            f"incomplete AWS credentials: {error}; set both the access key id "
            "and the secret access key",
            transient=False,
        )
    if isinstance(error, botocore.exceptions.ProfileNotFound):
        return FailureDescription(
            f"{error}; check profile= and the AWS config files", transient=False
        )
    if isinstance(error, botocore.exceptions.NoRegionError):
        return FailureDescription(
            "no AWS region; add region= to the URI or set AWS_REGION",
            transient=False,
        )
    if isinstance(
        error,
        botocore.exceptions.SSOError
        | botocore.exceptions.TokenRetrievalError
        | botocore.exceptions.CredentialRetrievalError,
    ):
        return FailureDescription(
            f"cannot get AWS credentials: {error}; for SSO run `aws sso login`",
            transient=False,
        )
    if isinstance(
        error,
        botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError,
    ):
        if endpoint is not None:
            fix = "check that endpoint= names a running KMS endpoint (host and port)"
        else:
            fix = "check the network connection, any proxy settings, and region="
        return FailureDescription(f"KMS unreachable: {error}; {fix}", transient=True)
    return FailureDescription(f"{type(error).__name__}: {error}", transient=False)


def _describe_client_error(
    error: botocore.exceptions.ClientError, key_id: str
) -> FailureDescription:
    details = error.response.get("Error", {})
    code = str(details.get("Code", "Unknown"))
    message = str(details.get("Message", "")).rstrip(".")
    summary = f"{code}: {message}" if message else code
    metadata = error.response.get("ResponseMetadata", {})
    attempts = _attempts(metadata)
    if code == THROTTLING_CODE:
        return FailureDescription(
            f"KMS throttled the request ({summary}) after {attempts} in "
            "botocore's standard retry mode; lower the request rate or ask "
            "AWS for a higher KMS request quota",
            transient=True,
        )
    status = metadata.get("HTTPStatusCode")
    if code in TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
        return FailureDescription(
            f"KMS failed the request ({summary}) after {attempts}", True
        )
    if code == "AccessDeniedException":
        fix = (
            "allow kms:Sign, kms:GetPublicKey and kms:DescribeKey on this key "
            "for the caller"
        )
    elif code == "DisabledException":
        fix = f"enable it with `aws kms enable-key --key-id {key_id}`"
    elif code == "KMSInvalidStateException":
        fix = (
            "if the key is pending deletion, cancel it with "
            f"`aws kms cancel-key-deletion --key-id {key_id}` and enable it"
        )
    elif code == "NotFoundException":
        fix = "check key-id= and region= (an alias exists in one region only)"
    elif code == "InvalidKeyUsageException":
        fix = "use a key created with --key-usage SIGN_VERIFY"
    elif code in CREDENTIAL_CODES:
        fix = "AWS rejected the credentials; renew them (`aws sso login` for SSO)"
    else:
        fix = "see the KMS API reference for this error code"
    return FailureDescription(f"{summary}; {fix}", transient=False)


def _attempts(metadata: Mapping[str, Any]) -> str:
    """Name the attempts botocore made, from its `RetryAttempts` count."""
    retries = metadata.get("RetryAttempts")
    if not isinstance(retries, int):
        return "botocore's retries"
    return "1 attempt" if retries == 0 else f"{retries + 1} attempts"
