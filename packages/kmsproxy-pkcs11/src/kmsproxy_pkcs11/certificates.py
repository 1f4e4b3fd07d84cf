"""`TokenCertificateSource`: a certificate chain read from the token.

The leaf is the certificate object with the URI's `id=` (else its
`object=` label). Its issuers follow when they are on the token, so one URI
serves for `--clientkey` and `--clientcert`. Certificates are public
objects, so a read never logs in, even when the URI carries a PIN. It uses
the session that a key on the same token has open, else a session opened
for the time of the read.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pkcs11
from cryptography import x509
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11

from kmsproxy.certificates import CertificateError, CertificateSource
from kmsproxy.signer import SignerError

from .address import KeyAddress, PinSource, format_id
from .modules import Module
from .objects import build_chain, find_one, object_template, read_certificates
from .token import (
    TokenMissing,
    TokenSession,
    acquire_token,
    describe_token,
    release_token,
    with_uri,
)

# Builds a backend's own message for "no token matches" (the yubikey backend
# returns "no YubiKey found" and how to check for one).
MissingExplainer = Callable[[KeyAddress, TokenMissing], str]


class TokenCertificateSource(CertificateSource):
    """The chain of the certificate object that `address` names."""

    def __init__(
        self,
        address: KeyAddress,
        module: Module,
        explain_missing: MissingExplainer | None = None,
    ) -> None:
        self._address = address
        self._module = module
        self._explain_missing = explain_missing

    @property
    def uri(self) -> str:
        return self._address.uri

    async def load(self) -> list[x509.Certificate]:
        # Opening the token blocks for a slot scan and maybe a login, so all
        # of it runs in a worker thread. The token's lock orders it with signing.
        return await anyio.to_thread.run_sync(self.load_blocking)

    def load_blocking(self) -> list[x509.Certificate]:
        """Read the chain in the calling thread (startup and the CLI)."""
        token = self._acquire()
        try:
            return token.run(self._reader(token))
        except SignerError as error:
            raise CertificateError(str(error)) from None
        finally:
            release_token(token)

    def _acquire(self) -> TokenSession:
        try:
            return acquire_token(
                self._module,
                self._address.token,
                # Certificates are public objects: no login, whatever PIN
                # the URI carries, so a reload never sends a PIN.
                PinSource(),
                self._address.uri,
                need_login=False,
            )
        except TokenMissing as error:
            if self._explain_missing is None:
                raise CertificateError(with_uri(self._address.uri, error)) from None
            message = self._explain_missing(self._address, error)
            raise CertificateError(message) from None
        except SignerError as error:
            raise CertificateError(with_uri(self._address.uri, error)) from None

    def _reader(
        self, token: TokenSession
    ) -> Callable[[pkcs11.Session], list[x509.Certificate]]:
        address = self._address

        def read(session: pkcs11.Session) -> list[x509.Certificate]:
            where = describe_token(token.token) if token.token else "the token"
            # A PIV slot's certificate has the key's id but another label.
            label = address.label if address.object_id is None else None
            template = object_template(
                ObjectClass.CERTIFICATE, address.object_id, label
            )
            if address.object_id is not None:
                description = f"certificate id={format_id(address.object_id)}"
            else:
                description = f"certificate object={address.label}"
            try:
                leaf_object = find_one(session, template, description, where)
                der = leaf_object[Attribute.VALUE]
            except SignerError as error:
                raise SignerError(
                    f"{address.uri}: {error}; import the certificate with the "
                    "key's id, or give --clientcert as a file"
                ) from None
            except p11.PKCS11Error as error:
                raise SignerError(
                    f"{address.uri}: cannot read the certificate: "
                    f"{type(error).__name__}"
                ) from None
            try:
                leaf = x509.load_der_x509_certificate(der)
            except ValueError as error:
                raise SignerError(
                    f"{address.uri}: the certificate object is not DER X.509: {error}"
                ) from None
            return build_chain(leaf, read_certificates(session))

        return read
