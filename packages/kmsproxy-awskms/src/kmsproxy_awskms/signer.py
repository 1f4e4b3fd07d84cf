"""`KMSSigner`: a TLS `Signer` over one asymmetric AWS KMS key.

Opening a key takes four steps, all at startup in the event loop's thread:
1. create a botocore client for the URI's location (`service.py`);
2. DescribeKey: the key must be enabled, of usage SIGN_VERIFY, and of a
   key spec with a TLS scheme;
3. GetPublicKey: the public half, and the signing algorithms KMS offers;
4. the self-check (`self_check.py`): sign fixed messages once per scheme
   and message type, and keep only what verifies locally.

After that, each `sign` is one KMS `Sign` call in a worker thread behind
the location's limiter, and its result is verified locally before it goes
into a handshake.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import botocore.exceptions
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kmsproxy.signer import (
    BlockingSigner,
    PublicKey,
    SignatureScheme,
    SignerError,
    verify_signature,
)
from kmsproxy.uri import KeyURI
from kmsproxy_awskms.algorithms import (
    KEY_SPEC_SCHEMES,
    SIGN_VERIFY,
    SIGNING_ALGORITHMS,
    MessageType,
    message_type_for,
    sign_request,
)
from kmsproxy_awskms.errors import describe_error, response_field
from kmsproxy_awskms.self_check import check_schemes
from kmsproxy_awskms.service import (
    KeyAddress,
    KMSService,
    create_client,
    create_session,
    parse_uri,
    service_for,
)

logger = logging.getLogger(__name__)

# The only key state in which KMS signs (KMS developer guide, "Key states
# of AWS KMS keys").
ENABLED = "Enabled"


def open_signer(uri: KeyURI) -> KMSSigner:
    """Open the key named by an `awskms:` URI; blocking, for startup.

    Raise `SignerError` naming the URI and the fix when the key cannot sign.
    """
    address = parse_uri(uri)
    service = service_for(address.location)
    try:
        client = create_client(create_session(address.location), address.location)
    except botocore.exceptions.BotoCoreError as error:
        raise _open_error(address, error) from None
    try:
        return _open_with_client(address, service, client)
    except BaseException:
        client.close()
        raise


def _open_with_client(
    address: KeyAddress, service: KMSService, client: Any
) -> KMSSigner:
    # Step 2: the key's state, usage and spec.
    try:
        response = client.describe_key(KeyId=address.key_id)
        metadata = response_field(response, "KeyMetadata", dict)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise _open_error(address, e) from None
    check_key_metadata(address, metadata)
    key_spec = str(metadata.get("KeySpec", ""))

    # Step 3: the public key and the algorithms KMS offers for it.
    try:
        response = client.get_public_key(KeyId=address.key_id)
        der = response_field(response, "PublicKey", bytes)
        offered = set(response_field(response, "SigningAlgorithms", list))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise _open_error(address, e) from None
    public_key = load_public_key(address, der)
    candidates = [
        scheme
        for scheme in KEY_SPEC_SCHEMES[key_spec]
        if SIGNING_ALGORITHMS[scheme] in offered
    ]

    # Step 4: the self-check.
    message_types = check_schemes(address, client, public_key, candidates)
    signer = KMSSigner(address, service, client, public_key, message_types)
    logger.info(
        "Opened AWS KMS key uri=%s key_spec=%s schemes=%s",
        address.uri,
        key_spec,
        ",".join(scheme.name for scheme in signer.schemes),
    )
    return signer


def check_key_metadata(address: KeyAddress, metadata: Mapping[str, Any]) -> None:
    """Raise `SignerError` unless DescribeKey shows a key that can sign TLS."""
    state = metadata.get("KeyState")
    if state == "PendingDeletion":
        when = metadata.get("DeletionDate")
        scheduled = f" (scheduled for {when:%Y-%m-%d})" if when else ""
        raise SignerError(
            f"{address.uri}: the key is pending deletion{scheduled}; cancel it "
            f"with `aws kms cancel-key-deletion --key-id {address.key_id}` "
            "and enable it, or use another key"
        )
    if state == "Disabled" or metadata.get("Enabled") is False:
        raise SignerError(
            f"{address.uri}: the key is disabled; enable it with "
            f"`aws kms enable-key --key-id {address.key_id}`"
        )
    if state != ENABLED:
        raise SignerError(
            f"{address.uri}: the key is in state {state} and cannot sign; "
            "wait for it to become Enabled or use another key"
        )
    usage = metadata.get("KeyUsage")
    if usage != SIGN_VERIFY:
        raise SignerError(
            f"{address.uri}: the key's usage is {usage}, not {SIGN_VERIFY}; "
            f"create a key with --key-usage {SIGN_VERIFY}"
        )
    key_spec = metadata.get("KeySpec")
    if not isinstance(key_spec, str) or key_spec not in KEY_SPEC_SCHEMES:
        supported = ", ".join(KEY_SPEC_SCHEMES)
        raise SignerError(
            f"{address.uri}: key spec {key_spec} has no TLS signature scheme; "
            f"use one of {supported}"
        )


def load_public_key(address: KeyAddress, der: bytes) -> PublicKey:
    """Parse GetPublicKey's DER SubjectPublicKeyInfo."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise SignerError(
            f"{address.uri}: GetPublicKey returned no usable public key: {error}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise SignerError(
            f"{address.uri}: GetPublicKey returned a {type(key).__name__}, "
            "expected an EC or RSA key"
        )
    return key


def _open_error(address: KeyAddress, error: Exception) -> SignerError:
    description = describe_error(error, address.key_id, address.location.endpoint)
    return SignerError(
        f"{address.uri}: cannot open the key at {address.location.describe()}: "
        f"{description.reason}"
    )


class KMSSigner(BlockingSigner):
    """An asymmetric KMS key; each signature is one KMS `Sign` request."""

    def __init__(
        self,
        address: KeyAddress,
        service: KMSService,
        client: Any,
        public_key: PublicKey,
        message_types: Mapping[SignatureScheme, frozenset[MessageType]],
    ) -> None:
        super().__init__(service.limiter)
        self.address = address
        self.service = service
        self.client = client
        self._public_key = public_key
        self.message_types = dict(message_types)
        self._schemes = list(self.message_types)

    @property
    def uri(self) -> str:
        return self.address.uri

    def public_key(self) -> PublicKey:
        return self._public_key

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self._schemes

    def sign_blocking(self, data: bytes, scheme: SignatureScheme) -> bytes:
        try:
            message_type = message_type_for(len(data), self.message_types[scheme])
        except ValueError as error:
            raise SignerError(
                f"{self.uri}: cannot sign with {scheme.name}: {error}"
            ) from None
        request = sign_request(self.address.key_id, data, scheme, message_type)
        logger.debug(
            "KMS Sign uri=%s algorithm=%s message_type=%s bytes=%d",
            self.uri,
            request["SigningAlgorithm"],
            message_type,
            len(data),
        )
        backoff = self.service.backoff
        if not backoff.failing:
            return self._send(request, data, scheme)
        probe = self.service.probe
        if not backoff.ready() or not probe.acquire(blocking=False):
            raise SignerError(
                f"{self.uri}: {self.address.location.describe()} is unavailable; "
                f"{backoff.waiting_message()}"
            )
        try:
            return self._send(request, data, scheme)
        finally:
            probe.release()

    def _send(self, request: Any, data: bytes, scheme: SignatureScheme) -> bytes:
        backoff = self.service.backoff
        try:
            response = self.client.sign(**request)
            signature = response_field(response, "Signature", bytes)
        except (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
        ) as error:
            description = describe_error(
                error, self.address.key_id, self.address.location.endpoint
            )
            reason = description.reason
            if description.transient:
                backoff.record_failure(reason)
                reason = f"{reason}; {backoff.waiting_message()}"
            raise SignerError(f"{self.uri}: KMS Sign failed: {reason}") from None
        backoff.record_success()
        try:
            verify_signature(self._public_key, signature, data, scheme)
        except InvalidSignature:
            raise SignerError(
                f"{self.uri}: KMS returned a {scheme.name} signature that does "
                f"not verify against the key's public key "
                f"(MessageType {request['MessageType']})"
            ) from None
        return signature

    async def aclose(self) -> None:
        self.client.close()
