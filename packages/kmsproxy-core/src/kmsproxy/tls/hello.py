"""The ClientHello we send and the checks every ServerHello must pass
(RFC 8446 sections 4.1.2 to 4.1.4), whether or not it is a
HelloRetryRequest."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..signer import SignatureScheme
from . import messages as m
from .alerts import IllegalParameter, MissingExtension
from .config import TLSClientConfig, is_ip_literal
from .key_exchange import KeySharePrivateKey, public_key_bytes
from .key_schedule import SUITES, CipherSuite

# Cipher suites in our preference order: AES-GCM first because it has
# hardware support on common CPUs, ChaCha20-Poly1305 for the rest.
CIPHER_SUITES = (
    CipherSuite.TLS_AES_128_GCM_SHA256,
    CipherSuite.TLS_AES_256_GCM_SHA384,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
)

# Groups in our preference order: the post-quantum hybrid first, so a
# recorded session stays safe against a future quantum computer. secp521r1
# comes last: OpenSSL 3.0 as a TLS 1.2 server accepts a client certificate
# on P-521 only when the client lists that curve here.
SUPPORTED_GROUPS = (
    m.NamedGroup.X25519MLKEM768,
    m.NamedGroup.x25519,
    m.NamedGroup.secp256r1,
    m.NamedGroup.secp384r1,
    m.NamedGroup.secp521r1,
)

# Groups we send a share for in the first ClientHello: the hybrid (1216
# bytes) and x25519 for servers without it. A server that accepts only the
# NIST curves costs a HelloRetryRequest round trip.
INITIAL_KEY_SHARE_GROUPS = (m.NamedGroup.X25519MLKEM768, m.NamedGroup.x25519)


def key_share_groups(hint: int | None) -> tuple[m.NamedGroup, ...]:
    """Return the groups the first ClientHello sends a share for.

    With a group hint (the group this upstream selected last time, from the
    session cache) that is one share for that group. Without one it is
    `INITIAL_KEY_SHARE_GROUPS`. supported_groups always lists every group,
    so a server that now prefers another group sends a HelloRetryRequest
    (RFC 8446 section 4.1.4) and the handshake costs one more round trip.
    """
    if hint is not None and hint in SUPPORTED_GROUPS:
        return (m.NamedGroup(hint),)
    return INITIAL_KEY_SHARE_GROUPS


# signature_algorithms we offer. The RSASSA-PKCS1-v1_5 schemes come last and
# apply to certificate signatures only (RFC 8446 section 4.2.3): many CAs
# still sign with them, but a server CertificateVerify using them is rejected.
SIGNATURE_ALGORITHMS = (
    SignatureScheme.ecdsa_secp256r1_sha256,
    SignatureScheme.ecdsa_secp384r1_sha384,
    SignatureScheme.ecdsa_secp521r1_sha512,
    SignatureScheme.ed25519,
    SignatureScheme.ed448,
    SignatureScheme.rsa_pss_rsae_sha256,
    SignatureScheme.rsa_pss_rsae_sha384,
    SignatureScheme.rsa_pss_rsae_sha512,
    SignatureScheme.rsa_pss_pss_sha256,
    SignatureScheme.rsa_pss_pss_sha384,
    SignatureScheme.rsa_pss_pss_sha512,
    SignatureScheme.rsa_pkcs1_sha256,
    SignatureScheme.rsa_pkcs1_sha384,
    SignatureScheme.rsa_pkcs1_sha512,
)


# The extension bodies that never change, encoded once at import.
_SUPPORTED_VERSIONS = m.push_supported_versions_client([m.TLS_1_3])
_SUPPORTED_GROUPS = m.push_uint16_list_extension(list(SUPPORTED_GROUPS))
_SIGNATURE_ALGORITHMS = m.push_uint16_list_extension(list(SIGNATURE_ALGORITHMS))
_PSK_KEY_EXCHANGE_MODES = m.push_psk_key_exchange_modes(
    [m.PskKeyExchangeMode.psk_dhe_ke]
)


def key_share_extension(key_shares: Mapping[int, KeySharePrivateKey]) -> bytes:
    entries = [
        m.KeyShareEntry(group, public_key_bytes(key))
        for group, key in key_shares.items()
    ]
    return m.push_key_share_client(entries)


def build_client_hello(
    config: TLSClientConfig,
    key_shares: Mapping[int, KeySharePrivateKey],
    random_bytes: Callable[[int], bytes],
) -> m.ClientHello:
    """Build the first ClientHello with one share per entry of `key_shares`."""
    extensions: list[m.Extension] = []
    name = config.server_name
    if not is_ip_literal(name):
        # RFC 6066 section 3: a HostName has no trailing dot, and IP
        # literals are not sent.
        extensions.append(
            (m.ExtensionType.server_name, m.push_server_name(name.rstrip(".")))
        )
    extensions += [
        (m.ExtensionType.supported_versions, _SUPPORTED_VERSIONS),
        (m.ExtensionType.supported_groups, _SUPPORTED_GROUPS),
        (m.ExtensionType.signature_algorithms, _SIGNATURE_ALGORITHMS),
        (m.ExtensionType.key_share, key_share_extension(key_shares)),
    ]
    if config.alpn_protocols:
        names = [p.encode() for p in config.alpn_protocols]
        extensions.append(
            (m.ExtensionType.application_layer_protocol_negotiation, m.push_alpn(names))
        )
    if config.identities:
        # RFC 8446 section 4.2.6: we respond to a CertificateRequest sent
        # after the handshake, as Apache sends for a per-location
        # SSLVerifyClient.
        extensions.append((m.ExtensionType.post_handshake_auth, b""))
    if config.session_cache is not None and config.session_key is not None:
        # Resumption without 0-RTT, and always with a fresh (EC)DHE share
        # so a stolen ticket does not expose the session (forward secrecy).
        extensions.append(
            (m.ExtensionType.psk_key_exchange_modes, _PSK_KEY_EXCHANGE_MODES)
        )
    return m.ClientHello(
        random=random_bytes(m.RANDOM_LENGTH),
        # Middlebox compatibility mode (RFC 8446 appendix D.4).
        legacy_session_id=random_bytes(32),
        cipher_suites=list(CIPHER_SUITES),
        extensions=extensions,
    )


def check_hello(hello: m.ServerHello, client_hello: m.ClientHello) -> int:
    """Apply the checks ServerHello and HelloRetryRequest share; return
    the selected version (RFC 8446 sections 4.1.3 and 4.1.4)."""
    extensions = hello.extensions or []
    version_data = m.find_extension(extensions, m.ExtensionType.supported_versions)
    if version_data is None:
        # The client hands a ServerHello without supported_versions to the
        # TLS 1.2 machine before this check, so only a HelloRetryRequest,
        # which must select TLS 1.3 (RFC 8446 section 4.1.4), gets here.
        raise MissingExtension("HelloRetryRequest has no supported_versions")
    version = m.pull_uint16_extension(version_data, "supported_versions")
    if version == m.TLS_1_2:
        # RFC 8446 section 4.2.1: a server selecting TLS 1.2 does not send
        # supported_versions, so this ServerHello is malformed.
        raise IllegalParameter("TLS 1.2 ServerHello contains supported_versions")
    if version != m.TLS_1_3:
        raise IllegalParameter(f"server selected version 0x{version:04x}, not offered")
    if hello.legacy_version != m.TLS_1_2:
        raise IllegalParameter(
            f"ServerHello legacy_version 0x{hello.legacy_version:04x} is not 0x0303"
        )
    if hello.legacy_session_id_echo != client_hello.legacy_session_id:
        raise IllegalParameter("ServerHello legacy_session_id_echo does not match")
    if hello.cipher_suite not in client_hello.cipher_suites:
        raise IllegalParameter(
            f"server selected cipher suite 0x{hello.cipher_suite:04x}, not offered"
        )
    if hello.legacy_compression_method != 0:
        raise IllegalParameter("ServerHello legacy_compression_method is not 0")
    if hello.cipher_suite not in SUITES:
        raise IllegalParameter(
            f"cipher suite 0x{hello.cipher_suite:04x} is not supported"
        )
    return version


def build_retry_client_hello(
    client_hello: m.ClientHello,
    key_shares: Mapping[int, KeySharePrivateKey],
    cookie: bytes | None,
) -> m.ClientHello:
    """Build the ClientHello sent in response to a HelloRetryRequest.

    RFC 8446 section 4.1.2: the same message, with key_share holding the
    new shares and the server's cookie appended when it sent one.
    """
    share = key_share_extension(key_shares)
    extensions = [
        (extension_type, share if extension_type == m.ExtensionType.key_share else data)
        for extension_type, data in client_hello.extensions
    ]
    if cookie is not None:
        extensions.append((m.ExtensionType.cookie, m.push_cookie(cookie)))
    return m.ClientHello(
        random=client_hello.random,
        legacy_session_id=client_hello.legacy_session_id,
        cipher_suites=client_hello.cipher_suites,
        extensions=extensions,
    )
