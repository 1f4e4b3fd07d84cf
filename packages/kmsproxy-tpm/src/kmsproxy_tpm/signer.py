"""`TPMSigner`: a TLS `Signer` over a key loaded in a TPM.

Opening a key (at startup) reads its TSS2 PEM,
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

Without a resource manager (swtpm, /dev/tpm0) the TPM keeps a loaded object
until someone flushes it, for every program, and it has few slots (3 in
libtpms). So a key is loaded only for the length of one call and flushed
before the call returns, on errors too. Between calls the signer keeps the
key's saved context (TPM2_ContextSave). TPM2_ContextLoad restores it faster
than a load of the key file, which needs a new primary key each time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import anyio
from cryptography.exceptions import InvalidSignature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_RC, TPM2_RH
from tpm2_pytss.tsskey import TSSPrivKey

from kmsproxy.signer import (
    BlockingSigner,
    PublicKey,
    SignatureScheme,
    SignerError,
    verify_signature,
)
from kmsproxy_tpm import device as devices
from kmsproxy_tpm.device import (
    TPMAuthError,
    TPMDevice,
    TPMError,
    TPMUnavailable,
    describe_tss_error,
)
from kmsproxy_tpm.keyblob import (
    KeyBlob,
    KeyFileError,
    candidate_schemes,
    digest_for,
    fixed_scheme_name,
    read_key_file,
    sign_digest,
    supported_algorithms,
)
from kmsproxy_tpm.reference import KeyReference

logger = logging.getLogger(__name__)

# Bytes signed by the self-check at open: random, so no two checks match.
SELF_CHECK_BYTES = 32

_T = TypeVar("_T")


# Response codes of a load under a persistent parent that the TPM lacks.
_MISSING_PARENT_CODES = frozenset(
    {int(TPM2_RC.HANDLE), int(TPM2_RC.REFERENCE_H0), int(TPM2_RC.VALUE)}
)


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
        if parent != int(TPM2_RH.OWNER) and int(error.error) in _MISSING_PARENT_CODES:
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
        # BlockingSigner.__init__ is not called: `limiter` is a property.
        self._reference = reference
        self._blob = blob
        self._device = device
        # The key's TPMS_CONTEXT from TPM2_ContextSave, once it was loaded.
        self._saved: Any = None
        self._schemes: list[SignatureScheme] = []
        self._closed = False

    @property
    def limiter(self) -> anyio.CapacityLimiter:  # type: ignore[override]
        """The TPM's limiter in the event loop that runs the call.

        It is looked up at each call, because a key may be opened in a
        worker thread, where no event loop runs.
        """
        return self._device.limiter()

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
        try:
            signer._schemes = device.call(signer._self_check)
        except TPMAuthError:
            signer._release()
            raise SignerError(
                f"{reference.uri}: {auth_error_message(reference, blob)}"
            ) from None
        except TPMError as error:
            signer._release()
            raise SignerError(f"{reference.uri}: {error}") from None
        except BaseException:
            signer._release()
            raise
        if not signer._schemes:
            signer._release()
            raise SignerError(f"{reference.uri}: {no_scheme_message(reference, blob)}")
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
                lambda esapi: self._with_key(
                    esapi, lambda handle: sign_digest(esapi, handle, scheme, digest)
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
        """Forget the key. Nothing is loaded in the TPM between calls."""
        if self._closed:
            return
        self._closed = True
        await anyio.to_thread.run_sync(self._release, abandon_on_cancel=True)

    def _with_key(self, esapi: Any, action: Callable[[Any], _T]) -> _T:
        """Load the key, run `action(handle)`, and flush the key again."""
        handle = self._load(esapi)
        try:
            return action(handle)
        finally:
            self._flush(esapi, handle)

    def _load(self, esapi: Any) -> Any:
        """Load the key from its saved context, else from the key file."""
        if self._saved is not None:
            try:
                handle = esapi.context_load(self._saved)
            except TSS2_Exception as error:
                if isinstance(
                    describe_tss_error(error, self._device.tcti), TPMUnavailable
                ):
                    raise
                # A TPM reset invalidates saved contexts (TPM_RC_INTEGRITY).
                logger.debug(
                    "Saved TPM key context rejected, loading the key file uri=%s: %s",
                    self.uri,
                    error,
                )
                self._saved = None
            else:
                esapi.tr_set_auth(handle, self._reference.auth or None)
                return handle
        handle = load_blob(esapi, self._blob, self._reference.auth)
        try:
            self._saved = esapi.context_save(handle)
        except BaseException:
            self._flush(esapi, handle)
            raise
        return handle

    def _flush(self, esapi: Any, handle: Any) -> None:
        try:
            esapi.flush_context(handle)
        except TSS2_Exception as error:
            logger.warning(
                "Flushing the TPM key failed uri=%s: %s; without a resource "
                "manager, `tpm2_flushcontext -t` unloads it",
                self.uri,
                error,
            )

    def _self_check(self, esapi: Any) -> list[SignatureScheme]:
        return self._with_key(esapi, lambda handle: self._check_schemes(esapi, handle))

    def _check_schemes(self, esapi: Any, handle: Any) -> list[SignatureScheme]:
        """Sign a random message with each candidate scheme; keep what verifies."""
        algorithms = supported_algorithms(esapi)
        message = os.urandom(SELF_CHECK_BYTES)
        working: list[SignatureScheme] = []
        for scheme in candidate_schemes(self._blob, algorithms):
            try:
                signature = sign_digest(
                    esapi, handle, scheme, digest_for(scheme, message)
                )
            except TSS2_Exception as error:
                described = describe_tss_error(error, self._device.tcti)
                if isinstance(described, (TPMUnavailable, TPMAuthError)):
                    raise
                # A TPM may list an algorithm that it rejects for this key
                # (TPM_RC_SCHEME, TPM_RC_HASH); the other schemes may work.
                logger.info(
                    "TPM cannot sign with this scheme, not offered uri=%s "
                    "scheme=%s error=%s",
                    self.uri,
                    scheme.name,
                    error,
                )
                continue
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

    def _release(self) -> None:
        devices.release_device(self._device)


def no_scheme_message(reference: KeyReference, blob: KeyBlob) -> str:
    """Say why a key offers no TLS scheme: its template or the TPM."""
    fixed = fixed_scheme_name(blob)
    if fixed is not None:
        return (
            f"the {blob.description} key's template allows only {fixed}, which "
            "no TLS signature scheme uses; create a key without a fixed scheme "
            "(`kmsproxy tpm create`)"
        )
    return (
        f"the TPM at {reference.tcti} produced no signature with this "
        f"{blob.description} key that verifies against its public key"
    )
