"""A TLS 1.3 and TLS 1.2 client whose private key is used only through a
`Signer`.

`connect_tls` runs the handshake over an anyio byte stream and returns a
`TLSClientStream`. The protocol itself lives in the sans-IO `client` module;
see the module list for records, messages, key schedule and verification.
"""

from ..signer import SIGNATURE_TIMEOUT_SECONDS
from .alerts import (
    Alert,
    AlertDescription,
    AlertReceived,
    BadCertificate,
    BadRecordMac,
    CertificateVerifyFailed,
    ConnectionLost,
    DecodeError,
    DecryptError,
    HandshakeFailure,
    HandshakeTimeout,
    IllegalParameter,
    InsufficientSecurity,
    InternalError,
    MissingExtension,
    ProtocolVersion,
    RecordOverflow,
    SignatureFailed,
    TLSError,
    UnexpectedMessage,
    UnsupportedCertificate,
    UnsupportedExtension,
)
from .config import (
    HANDSHAKE_TIMEOUT_SECONDS,
    ClientIdentity,
    TLSClientConfig,
)
from .session_cache import SessionCache, SessionTicket
from .stream import TLSClientStream, connect_tls
from .verify import TrustStore

__all__ = [
    "HANDSHAKE_TIMEOUT_SECONDS",
    "SIGNATURE_TIMEOUT_SECONDS",
    "Alert",
    "AlertDescription",
    "AlertReceived",
    "BadCertificate",
    "BadRecordMac",
    "CertificateVerifyFailed",
    "ClientIdentity",
    "ConnectionLost",
    "DecodeError",
    "DecryptError",
    "HandshakeFailure",
    "HandshakeTimeout",
    "IllegalParameter",
    "InsufficientSecurity",
    "InternalError",
    "MissingExtension",
    "ProtocolVersion",
    "RecordOverflow",
    "SessionCache",
    "SessionTicket",
    "SignatureFailed",
    "TLSClientConfig",
    "TLSClientStream",
    "TLSError",
    "TrustStore",
    "UnexpectedMessage",
    "UnsupportedCertificate",
    "UnsupportedExtension",
    "connect_tls",
]
