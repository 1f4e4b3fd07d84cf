"""`TPMSigner`: a TLS `Signer` over a key loaded in a TPM.

Opening a key (at startup, in the event loop's thread) reads its TSS2 PEM,
loads it under its parent, and signs a test digest with every scheme the
template and the TPM allow. Only the schemes whose signature verifies
against the public key are offered. This catches a wrong auth value before
the first handshake, and an RSA-PSS salt length other than the digest
length that TLS requires (RFC 8446 section 4.2.3). TPM 2.0 Part 1
(Architecture), annex B.7, has the TPM use the largest salt that the key
and digest sizes allow. libtpms, behind swtpm, uses the digest length
unless it does not fit.

Each signature hashes the message in software and sends the digest to
TPM2_Sign in a worker thread, one TPM call at a time per TPM.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_RH
from tpm2_pytss.tsskey import TSSPrivKey

from kmsproxy.signer import (
    BlockingSigner,
    PublicKey,
    SignatureScheme,
    SignerError,
    verify_signature,
)
from kmsproxy_tpm import device as devices
from kmsproxy_tpm.device import TPMAuthError, TPMDevice, TPMError, TPMUnavailable
from kmsproxy_tpm.keyblob import (
    KeyBlob,
    KeyFileError,
    candidate_schemes,
    digest_for,
    read_key_file,
    sign_digest,
    supported_algorithms,
)
from kmsproxy_tpm.reference import KeyReference

logger = logging.getLogger(__name__)

# Bytes signed by the self-check at open: random, so no two checks match.
SELF_CHECK_BYTES = 32

# Schemes that passed the self-check, by TCTI, key file content and auth
# value, so that reopening a key (each reload does) needs no TPM command.
_checked_schemes: dict[tuple[str, bytes, bytes | None], list[SignatureScheme]] = {}
_checked_lock = threading.Lock()


def load_blob(esapi: Any, blob: KeyBlob, auth: bytes | None) -> Any:
    """Load the key under its parent and set its auth value; return the handle."""
    # The file's emptyAuth flag is only a hint: `tpm2_encodeobject` without
    # --key-auth writes FALSE for keys that have no auth value. The TPM
    # decides, so load with whatever the URI gives.
    key = TSSPrivKey(
        blob.key.private, blob.key.public, empty_auth=not auth, parent=blob.key.parent
    )
    try:
        return key.load(esapi, auth or None)
    except TSS2_Exception as error:
        parent = int(blob.key.parent)
        if parent != int(TPM2_RH.OWNER):
            raise TPMError(
                f"cannot load the key under its parent 0x{parent:08x} ({error}): "
                "check that this persistent key exists in this TPM "
                "(`tpm2_getcap handles-persistent`)"
            ) from None
        raise


def auth_error_message(reference: KeyReference, blob: KeyBlob) -> str:
    """Say why the TPM rejected the auth value: missing or wrong."""
    if not reference.auth and blob.needs_auth:
        return (
            "the key has an auth value and the TPM rejected an empty one; give "
            "it with pin-source=FILE or pin-value="
        )
    if reference.auth:
        return (
            "the TPM rejected the key's auth value: check pin-value= or the "
            "first line of pin-source="
        )
    return "the TPM rejected the empty auth value: give one with pin-source=FILE"


class TPMSigner(BlockingSigner):
    """A key in a TPM; signatures run behind the TPM's shared limiter."""

    def __init__(
        self, reference: KeyReference, blob: KeyBlob, device: TPMDevice
    ) -> None:
        super().__init__(device.limiter())
        self._reference = reference
        self._blob = blob
        self._device = device
        self._handle: Any = None
        self._generation = -1
        self._schemes: list[SignatureScheme] = []
        self._closed = False

    @classmethod
    def open(cls, reference: KeyReference) -> TPMSigner:
        """Read, load and self-check the key; raise `SignerError` naming the URI."""
        try:
            blob = read_key_file(reference.key_path)
        except KeyFileError as error:
            hint = ""
            if reference.name is not None:
                hint = (
                    "; `kmsproxy tpm list` shows the keys, "
                    "`kmsproxy tpm create` makes one"
                )
            raise SignerError(f"{reference.uri}: {error}{hint}") from None
        device = devices.acquire_device(reference.tcti)
        signer = cls(reference, blob, device)
        check_key = (reference.tcti, blob.to_pem(), reference.auth)
        with _checked_lock:
            checked = _checked_schemes.get(check_key)
        if checked is not None:
            # A reload reopens every key: the TPM already signed with this
            # key and auth value, and the key loads at its first signature.
            signer._schemes = checked
            logger.debug("Reopened TPM key uri=%s", reference.uri)
            return signer
        try:
            signer._schemes = device.call(signer._self_check)
        except TPMAuthError:
            signer._flush_and_release()
            raise SignerError(
                f"{reference.uri}: {auth_error_message(reference, blob)}"
            ) from None
        except TPMError as error:
            signer._flush_and_release()
            raise SignerError(f"{reference.uri}: {error}") from None
        except BaseException:
            signer._flush_and_release()
            raise
        if not signer._schemes:
            signer._flush_and_release()
            raise SignerError(
                f"{reference.uri}: the TPM at {reference.tcti} produced no "
                f"signature with this {blob.description} key that verifies "
                "against its public key"
            )
        with _checked_lock:
            _checked_schemes[check_key] = signer._schemes
        logger.info(
            "Opened TPM key uri=%s type=%s schemes=%s",
            reference.uri,
            blob.description,
            ",".join(s.name for s in signer._schemes),
        )
        return signer

    @property
    def uri(self) -> str:
        return self._reference.uri

    @property
    def description(self) -> str:
        """The key type, such as `EC P-256` or `RSA 2048`."""
        return self._blob.description

    def public_key(self) -> PublicKey:
        return self._blob.public_key

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self._schemes

    def sign_blocking(self, data: bytes, scheme: SignatureScheme) -> bytes:
        backoff = self._device.backoff
        if not backoff.ready():
            raise SignerError(
                f"{self.uri}: {self._device.last_failure}; {backoff.waiting_message()}"
            )
        digest = digest_for(scheme, data)
        try:
            signature = self._device.call(
                lambda esapi, generation: self._sign_loaded(
                    esapi, generation, scheme, digest
                )
            )
        except TPMUnavailable as error:
            self._device.last_failure = str(error)
            backoff.record_failure(str(error))
            raise SignerError(
                f"{self.uri}: {error}; {backoff.waiting_message()}"
            ) from None
        except TPMError as error:
            raise SignerError(f"{self.uri}: {error}") from None
        backoff.record_success()
        return signature

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.run_blocking(self._flush_and_release)

    def _loaded(self, esapi: Any, generation: int) -> Any:
        """Return the key's handle, loading the blob into a new context."""
        if self._generation != generation or self._handle is None:
            self._handle = load_blob(esapi, self._blob, self._reference.auth)
            self._generation = generation
        return self._handle

    def _sign_loaded(
        self, esapi: Any, generation: int, scheme: SignatureScheme, digest: bytes
    ) -> bytes:
        return sign_digest(esapi, self._loaded(esapi, generation), scheme, digest)

    def _self_check(self, esapi: Any, generation: int) -> list[SignatureScheme]:
        """Sign a random message with each candidate scheme; keep what verifies."""
        handle = self._loaded(esapi, generation)
        algorithms = supported_algorithms(esapi)
        message = os.urandom(SELF_CHECK_BYTES)
        working: list[SignatureScheme] = []
        for scheme in candidate_schemes(self._blob, algorithms):
            signature = sign_digest(esapi, handle, scheme, digest_for(scheme, message))
            try:
                verify_signature(self._blob.public_key, signature, message, scheme)
            except InvalidSignature:
                logger.info(
                    "TPM signature does not verify, scheme not offered uri=%s "
                    "scheme=%s",
                    self.uri,
                    scheme.name,
                )
                continue
            working.append(scheme)
        return working

    def _flush_and_release(self) -> None:
        def flush(esapi: Any, generation: int) -> None:
            if self._handle is not None and self._generation == generation:
                esapi.flush_context(self._handle)
            self._handle = None

        try:
            self._device.call_if_open(flush)
        except TPMError as error:
            logger.debug("Flushing the TPM key failed uri=%s: %s", self.uri, error)
        self._release()

    def _release(self) -> None:
        devices.release_device(self._device)
