"""A self-signed local CA certificate for a CA key held in the TPM.

`kmsproxy init` signs its CA certificate with a software key. For a TPM key
the certificate is built from the same template (`ca_certificate_builder`),
then signed the way `LocalCA.sign` signs leaves:

1. a throwaway key of the same algorithm signs the builder, which gives the
   TBSCertificate and its signatureAlgorithm;
2. the TPM key signs that TBSCertificate;
3. the Certificate is assembled around the TPM's signature (RFC 5280
   section 4.1) and checked against its own public key.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from kmsproxy import der
from kmsproxy.ca import (
    ca_certificate_builder,
    choose_ca_scheme,
    sign_with_template_key,
    template_key_for,
)
from kmsproxy.signer import Signer, SignerError


async def self_signed_ca_certificate(
    signer: Signer, common_name: str
) -> x509.Certificate:
    """Return a CA certificate over the signer's key, signed by that key."""
    builder = ca_certificate_builder(signer.public_key(), common_name)
    scheme = choose_ca_scheme(signer)
    template = sign_with_template_key(builder, template_key_for(scheme), scheme)
    tbs = template.tbs_certificate_bytes
    algorithm = der.signature_algorithm(
        template.public_bytes(serialization.Encoding.DER)
    )
    signature = await signer.sign(tbs, scheme)
    certificate = x509.load_der_x509_certificate(
        der.assemble_signed(tbs, algorithm, signature)
    )
    try:
        certificate.verify_directly_issued_by(certificate)
    except (InvalidSignature, ValueError, TypeError) as error:
        raise SignerError(
            f"{signer.uri}: the key's signature on the CA certificate does not "
            f"verify ({error or 'bad signature'})"
        ) from error
    return certificate
