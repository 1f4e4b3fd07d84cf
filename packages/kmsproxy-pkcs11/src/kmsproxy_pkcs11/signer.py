"""`Pkcs11Signer`: a private key on a PKCS#11 token as a kmsproxy `Signer`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
import pkcs11
from cryptography.exceptions import InvalidSignature
from pkcs11 import Attribute, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from kmsproxy.signer import (
    BlockingSigner,
    PublicKey,
    SignatureScheme,
    SignerError,
    verify_signature,
)

from .address import KeyAddress
from .mechanisms import (
    SIGNING_MECHANISMS,
    SigningPlan,
    fits_key_size,
    mechanism_names,
    plan_signing,
)
from .objects import attribute_or_none, find_one, object_template, public_key_of
from .pin import read_pin
from .token import (
    TokenSession,
    describe_token,
    pin_was_rejected,
    record_rejected_pin,
    rejected_pin_message,
    release_token,
    return_value_name,
)

logger = logging.getLogger(__name__)


class Pkcs11Signer(BlockingSigner):
    """A private key on a token; signatures run on the token's worker thread.

    Opening reads the key's public half and plans one mechanism per TLS
    scheme (see `mechanisms`). Each signature is checked against the public
    key before it is returned, so a key that changed on the token fails
    with a clear message rather than a failed handshake.
    """

    def __init__(self, address: KeyAddress, token: TokenSession) -> None:
        super().__init__(token.limiter)
        self._address = address
        self._token = token
        self._uri = address.uri
        self._key: Any = None
        self._key_session = -1
        self._closed = False
        public_key, plans, always_authenticate = token.run(self._inspect)
        self._public_key: PublicKey = public_key
        self._plans = {plan.scheme: plan for plan in plans}
        self._schemes = [plan.scheme for plan in plans]
        self._always_authenticate = always_authenticate
        logger.info(
            "PKCS#11 key opened key=%s schemes=%s mechanisms=%s",
            self._uri,
            ",".join(s.name for s in self._schemes),
            ",".join(sorted({f"CKM_{p.mechanism.name}" for p in plans})),
        )

    @property
    def uri(self) -> str:
        return self._uri

    def public_key(self) -> PublicKey:
        return self._public_key

    @property
    def schemes(self) -> Sequence[SignatureScheme]:
        return self._schemes

    @property
    def always_authenticate(self) -> bool:
        """True when each signature logs in again (CKA_ALWAYS_AUTHENTICATE)."""
        return self._always_authenticate

    def plan_for(self, scheme: SignatureScheme) -> SigningPlan:
        """Return how `scheme` is signed on this token (for listings)."""
        return self._plans[scheme]

    def sign_blocking(self, data: bytes, scheme: SignatureScheme) -> bytes:
        plan = self._plans.get(scheme)
        if plan is None:
            raise ValueError(f"{self._uri}: cannot sign with {scheme.name}")
        payload = plan.prepare(data)
        pin = (
            read_pin(self._address.pin, self._uri)
            if self._always_authenticate
            else None
        )

        def operation(session: pkcs11.Session) -> bytes:
            key = self._current_key(session)
            if pin is not None:
                # The per-signature login (CKU_CONTEXT_SPECIFIC) counts
                # against the same PIN tries as the session's login.
                assert self._token.key is not None
                if pin_was_rejected(self._token.key, pin):
                    raise SignerError(rejected_pin_message(self._uri))
            signature: bytes = key.sign(
                payload,
                mechanism=plan.mechanism,
                mechanism_param=plan.parameter,
                pin=pin,
            )
            return signature

        try:
            signature = plan.finish(self._token.run(operation))
        except p11.PinIncorrect:
            # `TokenSession.run` closed the session, which ends the signing
            # operation that the failed login left active.
            if pin is not None and self._token.key is not None:
                record_rejected_pin(self._token.key, pin)
            raise SignerError(
                f"{self._uri}: the token rejected the PIN for this key's "
                "per-signature login, so kmsproxy does not send it again; "
                "correct pin-source or pin-value"
            ) from None
        except (p11.PKCS11Error, ValueError) as error:
            message = (
                return_value_name(error)
                if isinstance(error, p11.PKCS11Error)
                else str(error)
            )
            raise SignerError(
                f"{self._uri}: C_Sign with CKM_{plan.mechanism.name} failed: {message}"
            ) from None
        try:
            verify_signature(self._public_key, signature, data, scheme)
        except InvalidSignature:
            raise SignerError(
                f"{self._uri}: the token's {scheme.name} signature does not "
                "verify with the key's public key; check that id= names the "
                "key the certificate was issued for"
            ) from None
        return signature

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Closing the session waits for the module's lock, which a signature
        # waiting for a touch may hold, so it must not block the event loop.
        await anyio.to_thread.run_sync(release_token, self._token)

    def _current_key(self, session: pkcs11.Session) -> Any:
        """Return the key object for this session, finding it after a reopen."""
        if self._key is not None and self._key_session == self._token.session_number:
            return self._key
        key = self._find_key(session)
        if public_key_of(session, key) != self._public_key:
            raise SignerError(
                f"{self._uri}: the token came back with a different key under "
                f"{self._address.describe_object()}; restore the original key "
                "or restart kmsproxy with the right id="
            )
        self._key = key
        self._key_session = self._token.session_number
        return key

    def _find_key(self, session: pkcs11.Session) -> Any:
        token = self._token.token
        where = describe_token(token) if token is not None else "the token"
        template = object_template(
            ObjectClass.PRIVATE_KEY, self._address.object_id, self._address.label
        )
        try:
            return find_one(
                session,
                template,
                f"private key {self._address.describe_object()}",
                where,
            )
        except SignerError as error:
            hint = ""
            if not self._token.logged_in:
                hint = (
                    "; private keys are visible only after login, so add "
                    "?pin-source=/path/to/pin-file to the URI"
                )
            raise SignerError(f"{self._uri}: {error}{hint}") from None

    def _inspect(
        self, session: pkcs11.Session
    ) -> tuple[PublicKey, list[SigningPlan], bool]:
        """Read the key, its public half and the usable mechanisms."""
        key = self._find_key(session)
        if attribute_or_none(key, Attribute.SIGN) is False:
            raise SignerError(
                f"{self._uri}: the key has CKA_SIGN false, so the token will "
                "not sign with it; use a signing key"
            )
        try:
            public_key = public_key_of(session, key)
        except SignerError as error:
            raise SignerError(f"{self._uri}: {error}") from None

        available = self._signing_mechanisms(public_key)
        allowed = attribute_or_none(key, Attribute.ALLOWED_MECHANISMS) or None
        plans = plan_signing(public_key, available, allowed)
        if not plans:
            offered = ", ".join(mechanism_names(available)) or "none"
            limited = (
                f"; the key allows only {', '.join(mechanism_names(allowed))}"
                if allowed
                else ""
            )
            raise SignerError(
                f"{self._uri}: no signing mechanism fits this "
                f"{type(public_key).__name__.removeprefix('_')} key (the token "
                f"offers {offered}{limited})"
            )

        self._key = key
        self._key_session = self._token.session_number
        always = bool(attribute_or_none(key, Attribute.ALWAYS_AUTHENTICATE))
        if always and not self._address.pin.given:
            raise SignerError(
                f"{self._uri}: the key needs the PIN for every signature "
                "(CKA_ALWAYS_AUTHENTICATE); add ?pin-source=/path/to/pin-file"
            )
        return public_key, plans, always

    def _signing_mechanisms(self, public_key: PublicKey) -> set[pkcs11.Mechanism]:
        """Return the token's mechanisms that can sign with `public_key`'s key."""
        token = self._token.token
        assert token is not None
        slot = token.slot
        usable = set()
        for mechanism in slot.get_mechanisms() & SIGNING_MECHANISMS:
            try:
                info = slot.get_mechanism_info(mechanism)
            except p11.PKCS11Error:
                continue
            if info.flags & MechanismFlag.SIGN and fits_key_size(
                mechanism, info.min_key_length, info.max_key_length, public_key
            ):
                usable.add(mechanism)
        return usable
