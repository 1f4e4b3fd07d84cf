"""Key locations: the `awskms:` URI, the botocore client and its limits.

This module owns everything that decides which host botocore talks to and
how long it waits. A key URI names the key (`key-id=`) and how to reach it
(`region=`, `profile=`, `credentials-file=`, `endpoint=`). Keys that share
those four settings share one `KMSService`: one limiter on concurrent
requests and one backoff, because they fail and recover together.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import botocore.config
import botocore.exceptions
import botocore.session

from kmsproxy.backoff import Backoff, BackoffPolicy
from kmsproxy.uri import KeyURI, reject_unknown_attributes
from kmsproxy_awskms.errors import MalformedResponse

logger = logging.getLogger(__name__)

SCHEME = "awskms"

# The attributes of step-kms-plugin's `awskms:` URI that this backend reads.
KNOWN_ATTRIBUTES = ("key-id", "region", "profile", "credentials-file", "endpoint")

# Seconds to open a TCP (and TLS) connection to KMS. A regional endpoint
# accepts within tens of milliseconds (an estimate), but botocore's default
# of 60 s would hold a CONNECT that long before the client sees 502.
CONNECT_TIMEOUT_SECONDS = 3.0

# Seconds to wait for a KMS response once the request is sent. A Sign
# usually returns within tens of milliseconds (an estimate, larger across
# regions); 5 s leaves room for a slow one and still fails before a
# browser or curl gives up on the CONNECT.
READ_TIMEOUT_SECONDS = 5.0

# Attempts per KMS call in botocore's "standard" retry mode, the first one
# included. Standard mode retries throttling, 5xx responses and connection
# errors with jittered exponential delays. Three attempts is botocore's own
# default for that mode. With the timeouts above, a call can take at most
# 3 * (3 + 5) s plus the retry delays.
MAX_ATTEMPTS = 3

# Requests one `KMSService` runs at once, which is also the size of
# botocore's connection pool for it, so no request waits for a connection.
# KMS signs in parallel, and 10 is botocore's default pool size. The request
# quota for asymmetric Sign applies to the whole account in a region, so a
# higher number would only move the waiting to the throttling retries.
MAX_CONCURRENT_REQUESTS = 10

# Largest KMS response body parsed. A Sign response is under 1 KiB and a
# GetPublicKey response for RSA-4096 under 2 KiB; an error body is smaller.
# 64 KiB leaves room for DescribeKey's metadata and any new fields.
MAX_RESPONSE_BYTES = 64 * 1024

# An endpoint= example for error messages: a VPC endpoint of KMS.
ENDPOINT_EXAMPLE = "endpoint=https://vpce-0123.kms.eu-west-1.vpce.amazonaws.com"

# botocore (1.44) logs at INFO which credential source it used, for example
# "Found credentials in environment variables.", once per client. That line
# would precede every awskms command's own output. So this logger is raised
# to WARNING unless the program set its level, and `create_client` logs the
# source at DEBUG instead.
CREDENTIALS_LOGGER = logging.getLogger("botocore.credentials")
if CREDENTIALS_LOGGER.level == logging.NOTSET:
    CREDENTIALS_LOGGER.setLevel(logging.WARNING)

# While KMS is unreachable, the proxy returns 502 at once and tries again
# after these delays (seconds): first 1 s, doubling up to 30 s.
RECONNECT_POLICY = BackoffPolicy("awskms-reconnect", initial=1.0, maximum=30.0)


@dataclass(frozen=True)
class KMSLocation:
    """How to reach KMS: the URI's settings other than the key id."""

    region: str | None = None
    profile: str | None = None
    credentials_file: Path | None = None
    endpoint: str | None = None

    def describe(self) -> str:
        """Name the service in logs and errors: region and endpoint, if set."""
        region = self.region or "the default region"
        if self.endpoint is None:
            return f"AWS KMS in {region}"
        return f"AWS KMS in {region} at {self.endpoint}"


@dataclass(frozen=True)
class KeyAddress:
    """A parsed `awskms:` URI: the key id and where the key lives."""

    key_id: str
    location: KMSLocation
    uri: str


def parse_uri(uri: KeyURI) -> KeyAddress:
    """Read an `awskms:` URI; raise `ValueError` naming a wrong attribute."""
    # An unknown attribute may be a misspelt secret: the message omits values.
    reject_unknown_attributes(uri, KNOWN_ATTRIBUTES)
    redacted = uri.redacted()
    key_id = uri.get("key-id")
    if not key_id:
        raise ValueError(
            f"{redacted}: missing key-id= (a key id, key ARN or alias, "
            "for example awskms:key-id=alias/dev-mtls;region=eu-west-1)"
        )
    credentials_file = uri.get("credentials-file")
    credentials_path = Path(credentials_file).expanduser() if credentials_file else None
    if credentials_path is not None:
        check_credentials_file(credentials_path, redacted)
    endpoint = uri.get("endpoint")
    if endpoint is not None:
        check_endpoint(endpoint, redacted)
    location = KMSLocation(
        region=uri.get("region") or None,
        profile=uri.get("profile") or None,
        credentials_file=credentials_path,
        endpoint=endpoint,
    )
    return KeyAddress(key_id=key_id, location=location, uri=redacted)


def check_credentials_file(path: Path, uri: str) -> None:
    """Raise `ValueError` unless `path` is a readable regular file.

    botocore skips a shared credentials file that it cannot read and goes
    on with the rest of its credential chain, so a typo in the path would
    sign with other credentials. `stat` is used, not `open`, so that a FIFO
    does not block.
    """
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ValueError(
            f"{uri}: credentials-file {path}: {error.strerror or error}; give the "
            "path of an AWS shared credentials file (`aws configure` writes "
            "~/.aws/credentials)"
        ) from None
    if not stat.S_ISREG(mode):
        raise ValueError(
            f"{uri}: credentials-file {path} is not a file; give the path of an "
            "AWS shared credentials file"
        )
    if not os.access(path, os.R_OK):
        raise ValueError(
            f"{uri}: credentials-file {path}: permission denied; make it "
            "readable by this user (chmod 600 as its owner)"
        )


def check_endpoint(endpoint: str, uri: str) -> None:
    """Reject an endpoint that is not an http(s) URL with a host and a valid port."""
    try:
        parts = urlsplit(endpoint)
    except ValueError as error:
        raise ValueError(
            f"{uri}: endpoint={endpoint} is not a valid URL ({error}); write it as "
            f"https://HOST[:PORT], for example {ENDPOINT_EXAMPLE}"
        ) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(
            f"{uri}: endpoint={endpoint} is not an http(s) URL with a host "
            f"(for example {ENDPOINT_EXAMPLE})"
        )
    try:
        # `port` parses the digits after the host and checks the range.
        _ = parts.port
    except ValueError as error:
        raise ValueError(
            f"{uri}: endpoint={endpoint} has an invalid port ({error}); give a "
            f"port number up to 65535 or none, for example {ENDPOINT_EXAMPLE}"
        ) from None
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        logger.warning(
            "KMS endpoint without TLS: messages and signatures travel in clear "
            "text uri=%s endpoint=%s",
            uri,
            endpoint,
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class KMSService:
    """The limiter and backoff shared by every key at one `KMSLocation`.

    `probe` is held by the one request that tests a failing service after
    the backoff delay, so that the others fail fast instead of all waiting
    for the timeouts.
    """

    location: KMSLocation
    limiter: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(MAX_CONCURRENT_REQUESTS)
    )
    probe: threading.Lock = field(default_factory=threading.Lock)
    backoff: Backoff = field(init=False)

    def __post_init__(self) -> None:
        self.backoff = Backoff(RECONNECT_POLICY, self.location.describe())


_SERVICES: dict[KMSLocation, KMSService] = {}
_SERVICES_LOCK = threading.Lock()


def service_for(location: KMSLocation) -> KMSService:
    """Return the one `KMSService` for `location`, creating it on first use.

    The open hooks call this from worker threads, hence the lock.
    """
    with _SERVICES_LOCK:
        service = _SERVICES.get(location)
        if service is None:
            service = _SERVICES[location] = KMSService(location)
        return service


def client_config() -> botocore.config.Config:
    """Build the botocore settings every KMS client gets: timeouts and retries."""
    return botocore.config.Config(
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        max_pool_connections=MAX_CONCURRENT_REQUESTS,
    )


def create_session(location: KMSLocation) -> botocore.session.Session:
    """Create a botocore session for `location`'s profile and files.

    The session keeps botocore's whole credential chain, with or without an
    endpoint, so an EC2 instance behind a VPC endpoint uses its instance
    role. Raise `botocore.exceptions.BotoCoreError` for a missing profile or
    an unreadable configuration.
    """
    session = botocore.session.Session(profile=location.profile)
    if location.credentials_file is not None:
        session.set_config_variable("credentials_file", str(location.credentials_file))
    return session


def credential_provider_names(session: botocore.session.Session) -> list[str]:
    """List the credential providers `session` tries, in order."""
    resolver = session.get_component("credential_provider")
    return [str(provider.METHOD) for provider in resolver.providers]


def create_client(session: botocore.session.Session, location: KMSLocation) -> Any:
    """Create the KMS client; blocking (it resolves credentials).

    The result is botocore's generated client, which has no static type.
    With an endpoint, the defaults mode is pinned to "legacy": in "auto"
    mode (set by AWS_DEFAULTS_MODE or the config file) botocore asks the
    instance metadata service for the region.
    """
    config = client_config()
    if location.endpoint is not None:
        config = config.merge(botocore.config.Config(defaults_mode="legacy"))
    client = session.create_client(
        "kms",
        region_name=location.region,
        endpoint_url=location.endpoint,
        config=config,
    )
    client.meta.events.register("before-parse.kms.*", reject_large_response)
    # The credentials are resolved and cached by now; `method` names their
    # source (such as "env" or "shared-credentials-file"), never a secret.
    credentials = session.get_credentials()
    source = getattr(credentials, "method", None)
    logger.debug(
        "AWS credentials location=%r source=%s",
        location.describe(),
        source or "none found",
    )
    if source == "env" and location.credentials_file is not None:
        # botocore tries the environment before the shared credentials
        # file, unless a profile is named (botocore 1.44 credentials.py).
        logger.warning(
            "AWS credentials come from AWS_ACCESS_KEY_ID in the environment, "
            "not from credentials-file=; unset AWS_ACCESS_KEY_ID or add "
            "profile= to the URI location=%r credentials_file=%s",
            location.describe(),
            location.credentials_file,
        )
    return client


def reject_large_response(response_dict: dict[str, Any], **_: Any) -> None:
    """Raise `MalformedResponse` for a body over `MAX_RESPONSE_BYTES`.

    NOTE: botocore 1.44 has read the whole body into memory when this runs,
    and has no setting for a maximum size, so this stops the parsing (JSON,
    then base64) of a huge body but not its download.
    """
    body = response_dict.get("body")
    if isinstance(body, bytes) and len(body) > MAX_RESPONSE_BYTES:
        raise MalformedResponse(
            detail=f"{len(body)} bytes, more than {MAX_RESPONSE_BYTES}"
        )
