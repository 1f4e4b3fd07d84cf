"""TLS alerts: the wire codes and the exceptions that carry them.

Every protocol failure the engine detects is an `Alert` subclass whose class
attribute `description` is the code sent to the peer, so the exception raised
locally and the alert on the wire cannot disagree. An alert the server sends
arrives as `AlertReceived`.
"""

from __future__ import annotations

import enum


class AlertLevel(enum.IntEnum):
    """AlertLevel (RFC 8446 section 6). TLS 1.3 treats every alert but
    close_notify and user_canceled as fatal, whatever its level."""

    warning = 1
    fatal = 2


class AlertDescription(enum.IntEnum):
    """AlertDescription code points (RFC 8446 section 6)."""

    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    record_overflow = 22
    handshake_failure = 40
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    # TLS 1.2 only (RFC 5246 section 7.2.2): a warning that refuses a
    # server's request to renegotiate.
    no_renegotiation = 100
    missing_extension = 109
    unsupported_extension = 110
    unrecognized_name = 112
    bad_certificate_status_response = 113
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120


def describe_alert(code: int) -> str:
    """Return `name (code)` for a known code, else `unknown alert (code)`."""
    try:
        return f"{AlertDescription(code).name} ({code})"
    except ValueError:
        return f"unknown alert ({code})"


class TLSError(Exception):
    """Base of every error the TLS engine raises."""


class Alert(TLSError):
    """A failure this side detected; the engine sends `description` first."""

    description: AlertDescription = AlertDescription.internal_error

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnexpectedMessage(Alert):
    description = AlertDescription.unexpected_message


class BadRecordMac(Alert):
    description = AlertDescription.bad_record_mac


class RecordOverflow(Alert):
    description = AlertDescription.record_overflow


class HandshakeFailure(Alert):
    description = AlertDescription.handshake_failure


class BadCertificate(Alert):
    description = AlertDescription.bad_certificate


class UnsupportedCertificate(Alert):
    description = AlertDescription.unsupported_certificate


class IllegalParameter(Alert):
    description = AlertDescription.illegal_parameter


class DecodeError(Alert):
    description = AlertDescription.decode_error


class DecryptError(Alert):
    description = AlertDescription.decrypt_error


class ProtocolVersion(Alert):
    description = AlertDescription.protocol_version


class InsufficientSecurity(Alert):
    description = AlertDescription.insufficient_security


class InternalError(Alert):
    description = AlertDescription.internal_error


class MissingExtension(Alert):
    description = AlertDescription.missing_extension


class UnsupportedExtension(Alert):
    description = AlertDescription.unsupported_extension


class CertificateVerifyFailed(Alert):
    """The server's certificate chain or name failed verification.

    `description` is bad_certificate, certificate_expired or unknown_ca,
    chosen per failure; `str()` gives the reason.
    """

    def __init__(
        self,
        reason: str,
        description: AlertDescription = AlertDescription.bad_certificate,
    ) -> None:
        super().__init__(reason)
        self.description = description


class AlertReceived(TLSError):
    """The server sent a fatal alert (or one TLS 1.3 treats as fatal)."""

    def __init__(self, description: int, level: int = AlertLevel.fatal) -> None:
        message = f"server sent alert {describe_alert(description)}"
        if description == AlertDescription.protocol_version:
            message += (
                "; the server supports none of the TLS versions this client "
                "offered (1.3 and 1.2, or 1.2 alone for a key without a TLS 1.3 "
                "scheme)"
            )
        super().__init__(message)
        self.description = description
        self.level = level


class HandshakeTimeout(TLSError):
    """The handshake did not finish within the configured time."""


class ConnectionLost(TLSError):
    """The transport closed before the handshake finished or without a
    close_notify alert (a truncation the application must not trust)."""


class SignatureFailed(InternalError):
    """The client's Signer failed to sign CertificateVerify; the server gets
    internal_error. The Signer's exception is chained as `__cause__`."""
