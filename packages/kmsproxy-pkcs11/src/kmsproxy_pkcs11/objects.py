"""Finding keys and certificates on a token, and reading their public keys.

An object is selected by CKA_ID and/or CKA_LABEL. A private key's public
half comes from its own RSA attributes (CKA_MODULUS, CKA_PUBLIC_EXPONENT),
else from the public key object with the same CKA_ID, else from the
certificate with that CKA_ID.
"""

from __future__ import annotations

from typing import Any

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from kmsproxy.signer import PublicKey, SignerError


def object_template(
    object_class: ObjectClass, object_id: bytes | None, label: str | None
) -> dict[Attribute, Any]:
    """Return a C_FindObjects template for one class, id and label."""
    template: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if object_id is not None:
        template[Attribute.ID] = object_id
    if label is not None:
        template[Attribute.LABEL] = label
    return template


def find_one(
    session: pkcs11.Session,
    template: dict[Attribute, Any],
    description: str,
    where: str,
) -> Any:
    """Return the one object matching `template`; raise `SignerError` if not.

    `description` names the object (`private key id=%01`) and `where` the
    token, for messages.
    """
    found = list(session.get_objects(template))
    if not found:
        raise SignerError(f"no {description} on {where}")
    if len(found) > 1:
        raise SignerError(
            f"{len(found)} objects match {description} on {where}; give both id= and "
            "object= to pick one (see `kmsproxy pkcs11 list`)"
        )
    return found[0]


def attribute_or_none(obj: Any, attribute: Attribute) -> Any:
    """Return an attribute's value, or None where the object lacks it."""
    try:
        return obj[attribute]
    except (p11.AttributeTypeInvalid, p11.AttributeSensitive, NotImplementedError):
        return None


def public_key_of(session: pkcs11.Session, private_key: Any) -> PublicKey:
    """Return the public half of `private_key`; raise `SignerError` if unknown."""
    key_type = private_key.key_type
    if key_type == KeyType.RSA:
        modulus = attribute_or_none(private_key, Attribute.MODULUS)
        exponent = attribute_or_none(private_key, Attribute.PUBLIC_EXPONENT)
        if modulus and exponent:
            numbers = rsa.RSAPublicNumbers(
                int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
            )
            return numbers.public_key()
    elif key_type != KeyType.EC:
        raise SignerError(
            f"key type {getattr(key_type, 'name', key_type)} cannot sign TLS "
            "handshakes; use an EC or RSA key"
        )
    object_id = attribute_or_none(private_key, Attribute.ID)
    if object_id:
        template = object_template(ObjectClass.PUBLIC_KEY, object_id, None)
        for public in session.get_objects(template):
            return decode_public_key(public)
        template = object_template(ObjectClass.CERTIFICATE, object_id, None)
        for certificate in session.get_objects(template):
            return certificate_public_key(certificate)
    raise SignerError(
        "the token has no public key or certificate with the private key's "
        "id, so its public key is unknown; import the certificate with the "
        "same id"
    )


def decode_public_key(public: Any) -> PublicKey:
    """Decode an RSA or EC public key object into a `cryptography` key."""
    if public.key_type == KeyType.RSA:
        return rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big"),
        ).public_key()
    parameters = public[Attribute.EC_PARAMS]
    point = ec_point_bytes(public[Attribute.EC_POINT])
    curve_oid = x509.ObjectIdentifier(_decode_oid(parameters))
    try:
        curve = ec.get_curve_for_oid(curve_oid)
    except LookupError:
        raise SignerError(
            f"the key's EC curve {curve_oid.dotted_string} is not supported; "
            "use a P-256 or P-384 key"
        ) from None
    return ec.EllipticCurvePublicKey.from_encoded_point(curve(), point)


def ec_point_bytes(value: bytes) -> bytes:
    """Return the encoded point from CKA_EC_POINT.

    PKCS#11 wraps the point in a DER OCTET STRING, but some modules return
    the bare point; both forms are accepted.
    """
    inner = _der_contents(value, _DER_OCTET_STRING)
    if inner is not None and inner[:1] in (b"\x02", b"\x03", b"\x04"):
        return inner
    return value


def _decode_oid(parameters: bytes) -> str:
    """Return the dotted OID of a named curve in DER CKA_EC_PARAMS."""
    contents = _der_contents(parameters, _DER_OBJECT_IDENTIFIER)
    if not contents:
        raise SignerError("only named-curve EC keys are supported")
    # X.690 section 8.19: the first byte encodes two arcs, then base-128 groups.
    arcs = [min(contents[0] // 40, 2), contents[0] - 40 * min(contents[0] // 40, 2)]
    value = 0
    for byte in contents[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(str(arc) for arc in arcs)


_DER_OCTET_STRING = 0x04
_DER_OBJECT_IDENTIFIER = 0x06


def _der_contents(data: bytes, tag: int) -> bytes | None:
    """Return the contents of one DER element with `tag` filling `data`."""
    if len(data) < 2 or data[0] != tag:
        return None
    length = data[1]
    offset = 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            return None
        length = int.from_bytes(data[2 : 2 + count], "big")
        offset = 2 + count
    if offset + length != len(data):
        return None
    return data[offset:]


def certificate_public_key(certificate: Any) -> PublicKey:
    """Return the public key of a certificate object."""
    loaded = x509.load_der_x509_certificate(certificate[Attribute.VALUE])
    key = loaded.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise SignerError(f"certificate key type {type(key).__name__} unsupported")
    return key


def read_certificates(session: pkcs11.Session) -> list[x509.Certificate]:
    """Return every X.509 certificate on the token that parses."""
    certificates = []
    template = {Attribute.CLASS: ObjectClass.CERTIFICATE}
    for obj in session.get_objects(template):
        value = attribute_or_none(obj, Attribute.VALUE)
        if not value:
            continue
        try:
            certificates.append(x509.load_der_x509_certificate(value))
        except ValueError:
            continue
    return certificates


def build_chain(
    leaf: x509.Certificate, others: list[x509.Certificate]
) -> list[x509.Certificate]:
    """Return `leaf` followed by the issuers found among `others`.

    Self-signed roots are left out, as a TLS peer has its own. An issuer
    must have signed the certificate before it, not only carry its issuer
    name, so a renewed CA with the same subject is skipped. The walk stops
    after as many steps as there are certificates, so a loop of
    cross-signed certificates cannot make it run forever.
    """
    chain = [leaf]
    for _ in range(len(others)):
        current = chain[-1]
        if current.issuer == current.subject:
            break
        issuer = next(
            (c for c in others if c not in chain and _issued(current, c)),
            None,
        )
        if issuer is None or issuer.issuer == issuer.subject:
            break
        chain.append(issuer)
    return chain


def _issued(certificate: x509.Certificate, candidate: x509.Certificate) -> bool:
    """Return True when `candidate` signed `certificate` (RFC 5280 6.1.3)."""
    try:
        certificate.verify_directly_issued_by(candidate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
